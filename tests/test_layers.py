"""jobs/ in layers: no circle, no arrow back up between its subpackages, at most 8 floors."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("layers", ROOT / ".ci" / "layers.py")
layers_script = sys.modules["layers"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(layers_script)


def test_jobs_is_in_layers() -> None:
    found = layers_script.layers("jobs")
    assert found.circles == [] and found.arrows_up == []
    assert max(found.room_floors.values()) <= 8, found.room_floors


def test_a_circle_through_a_lazy_import_and_an_arrow_back_up_are_found(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    for folder in ("low", "high"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "low" / "a.py").write_text("from pkg.low import b\n")
    (package / "low" / "b.py").write_text("def f():\n    from pkg.low.a import g  # lazy\n")
    (package / "high" / "c.py").write_text("from pkg.low.a import x\n")
    (package / "low" / "d.py").write_text("if True:\n    from pkg.high import c\n")  # low needs high back
    found = layers_script.layers("pkg", root=tmp_path)
    assert found.circles == [["pkg.low.a", "pkg.low.b"]]
    assert set(found.arrows_up) == {("pkg.high.c", "pkg.low.a"), ("pkg.low.d", "pkg.high.c")}
    assert found.floors["pkg.high.c"] == found.floors["pkg.low.a"] + 1
