"""`aiayn tune --search KEY=SPACE`: Ray Tune's search spaces over any config key, written short.

    choice(a, b, c)       one of the values (each read as YAML: 0.1, true, base)
    uniform(lo, hi)       a number drawn uniformly from lo to hi
    loguniform(lo, hi)    a number drawn uniformly in log space (learning rates, label smoothing)
    int(lo, hi)           a whole number from lo to hi, both included
    grid(a, b, c)         every value, each in trials of its own (a grid search)

`--search optim.lr=loguniform(1e-4,3e-3) --search model.dropout=choice(0.1,0.3)`
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from data_pipeline.errors import InputError

KINDS = ("choice", "uniform", "loguniform", "int", "grid")
_SEARCH = re.compile(r"^\s*(?P<key>[A-Za-z_][\w.]*)\s*=\s*(?P<kind>\w+)\((?P<values>.*)\)\s*$")


@dataclass(frozen=True)
class Search:
    key: str  # a config key, as in an override
    kind: str
    values: tuple[Any, ...]
    text: str  # as the user wrote it, for the sweep's record

    def domain(self):
        """The Ray Tune space."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        low, high = self.values
        if self.kind == "int":
            return tune.randint(low, high + 1)  # Tune's upper bound is left out
        return tune.uniform(low, high) if self.kind == "uniform" else tune.loguniform(low, high)

    def extremes(self) -> tuple[Any, ...]:
        """The values a trial's config can hold at its edges: every value of a list, both bounds
        of a range. A config checked with each is checked for the whole space."""
        return self.values


def parse_search(text: str) -> Search:
    """One `--search KEY=SPACE`; a bad one is one line naming it and the syntax."""
    match = _SEARCH.match(text)
    syntax = f"--search {text}: write KEY=SPACE with SPACE one of {', '.join(k + '(...)' for k in KINDS)}"
    if match is None or match["kind"] not in KINDS:
        raise InputError(syntax)
    key, kind = match["key"], match["kind"]
    try:
        values = tuple(_number(value) for value in yaml.safe_load(f"[{match['values']}]"))
    except yaml.YAMLError:
        raise InputError(f"{syntax}; its values could not be read") from None
    if key == "model.preset":
        raise InputError(f"--search {text}: a preset sets every size at once; search the sizes themselves "
                         "(model.d_model, model.layers, ...) or run one sweep per preset")
    if kind in ("choice", "grid"):
        if not values:
            raise InputError(f"--search {text}: {kind} needs at least one value")
        return Search(key, kind, values, text)
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise InputError(f"--search {text}: {kind} takes two numbers, low and high")
    low, high = values
    if kind == "int" and not all(isinstance(v, int) for v in values):
        raise InputError(f"--search {text}: int takes two whole numbers")
    if not low < high or (kind == "loguniform" and low <= 0):
        raise InputError(f"--search {text}: needs low < high" + (", both above 0" if kind == "loguniform" else ""))
    return Search(key, kind, (low, high) if kind == "int" else (float(low), float(high)), text)


def _number(value: Any) -> Any:
    """YAML 1.1 reads 1e-4 (no dot) as a string; as a config value it is the number it looks like."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value
