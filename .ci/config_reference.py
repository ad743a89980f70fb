"""The config reference, generated from the config dataclasses: every key with its type, default
and the comment the code gives it. `python .ci/config_reference.py > docs/config-reference.md`
writes it; tests/test_config_reference.py fails when the file is not what this prints.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import sys
import tokenize
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.run.config import JobConfig  # noqa: E402  (the project root is on the path only now)

HEADER = """# Config reference

Generated from the config dataclasses by `python .ci/config_reference.py > docs/config-reference.md`
(`tests/test_config_reference.py` keeps it current). Give any key as `section.key=value` on the
command line or nested in a recipe's YAML; [configuration.md](configuration.md) says how recipes,
overrides and defaults combine. `deepspeed` takes raw DeepSpeed keys, merged over the generated
JSON. `model.vocab_size`, `model.pad_id`, `model.bos_id` and `model.eos_id` come from the
dataset's tokenizer (`data.tokenizer.vocab_size`) and are refused in a config.
"""


def comments_of(cls: type) -> dict[str, str]:
    """Each field's comment in the class's source: the comment on its line, else the comment
    lines right above it."""
    source = inspect.getsource(cls)
    found: dict[str, str] = {}
    above: list[str] = []
    for line in source.splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        if stripped.startswith(("def ", "@")):
            break
        name = stripped.split(":", 1)[0].strip()
        if ":" in stripped and name.isidentifier():
            tokens = list(tokenize.generate_tokens(io.StringIO(stripped + "\n").readline))
            trailing = [token.string.lstrip("#").strip() for token in tokens if token.type == tokenize.COMMENT]
            found[name] = " ".join(trailing or above)
        above = []
    return found


def annotation_of(cls: type, field: dataclasses.Field) -> str:
    """The annotation as written, with a Literal's choices spelled out."""
    hint = typing.get_type_hints(cls, include_extras=False)[field.name]
    if typing.get_origin(hint) is typing.Literal:
        return " | ".join(repr(choice) for choice in typing.get_args(hint))
    return str(field.type)


def default_of(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return repr(field.default)
    if field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
        return "" if dataclasses.is_dataclass(value) else repr(value)
    return "(required)"


def sections(cls: type, prefix: str) -> list[tuple[str, type]]:
    """(dotted name, dataclass) of every section under `cls`, depth first."""
    found = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            name = f"{prefix}{field.name}"
            found.append((name, hint))
            found.extend(sections(hint, f"{name}."))
    return found


def reference() -> str:
    parts = [HEADER]
    parts.append(table("", JobConfig, "top-level keys"))
    for name, cls in sections(JobConfig, ""):
        parts.append(table(f"{name}.", cls, f"`{name}`"))
    return "\n".join(parts)


def table(prefix: str, cls: type, title: str) -> str:
    comments = comments_of(cls)
    hints = typing.get_type_hints(cls)
    doc = inspect.getdoc(cls) or ""
    summary = "" if doc.startswith(f"{cls.__name__}(") else doc.split("\n\n")[0].replace("\n", " ")  # none of its own
    rows = [f"## {title}", "", *([summary, ""] if summary else []),
            "| key | type | default | what it is |", "| --- | --- | --- | --- |"]
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            continue
        cells = [f"`{prefix}{field.name}`", annotation_of(cls, field), default_of(field), comments.get(field.name, "")]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference())
