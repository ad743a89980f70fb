"""docs/config-reference.md is what .ci/config_reference.py prints from the config dataclasses,
and names every key a config accepts."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from jobs.run.config import JobConfig, config_to_dict, flatten, load_job_config

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("config_reference", ROOT / ".ci" / "config_reference.py")
generator = sys.modules["config_reference"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generator)


def test_the_reference_is_current() -> None:
    written = (ROOT / "docs" / "config-reference.md").read_text()
    assert written == generator.reference(), "run: python .ci/config_reference.py > docs/config-reference.md"


def test_every_key_a_config_accepts_is_in_the_reference_and_each_named_key_is_accepted() -> None:
    reference = generator.reference()
    keys = set(flatten(config_to_dict(JobConfig())))
    assert keys and all(f"`{key}`" in reference for key in keys), sorted(k for k in keys if f"`{k}`" not in reference)
    # each key the reference lists is one the config loader takes (at the main job's value): the
    # reference names no key that does not exist
    values = flatten(config_to_dict(load_job_config(None, [])))
    settable = {line.split("`")[1] for line in reference.splitlines() if line.startswith("| `")}
    assert settable == keys
    from_tokenizer = {"model.vocab_size", "model.pad_id", "model.bos_id", "model.eos_id"}
    for key in sorted(settable - from_tokenizer - {"deepspeed"}):
        load_job_config(None, [f"{key}={json.dumps(values[key])}"])
