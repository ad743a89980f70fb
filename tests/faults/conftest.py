"""The fault table: each test here injects one fault into a real run, asserts the outcome and
adds a row; the table is printed at the end of the session (recorded in bench/results/)."""

from __future__ import annotations

import pytest

ROWS: list[dict] = []
COLUMNS = ("fault", "injected", "at step", "outcome", "steps lost", "data lost")


@pytest.fixture
def fault_row():
    """Call with the row's cells once the test's assertions hold."""
    def add(**cells: str) -> None:
        ROWS.append({column: str(cells.get(column.replace(" ", "_"), "")) for column in COLUMNS})
    return add


def pytest_terminal_summary(terminalreporter) -> None:
    if not ROWS:
        return
    terminalreporter.write_sep("=", "fault table")
    terminalreporter.write_line("| " + " | ".join(COLUMNS) + " |")
    terminalreporter.write_line("|" + "---|" * len(COLUMNS))
    for row in ROWS:
        terminalreporter.write_line("| " + " | ".join(row[c] for c in COLUMNS) + " |")
