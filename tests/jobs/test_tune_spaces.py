"""`aiayn tune`'s checks before Ray: the search syntax, and each trial's config at every edge of
every space, answered in one line (exit 2) by the real command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from ray import tune

from data_pipeline.errors import InputError
from jobs.run.config import load_job_config
from jobs.tune.spaces import parse_search
from jobs.tune.sweep import plan_sweep, trial_job

ROOT = Path(__file__).resolve().parents[2]
CADENCE = ["train.max_steps=20", "train.validate_every=5", "train.checkpoint_every_steps=5"]


def test_each_space_is_ray_tunes_own() -> None:
    lr = parse_search("optim.lr=loguniform(1e-4, 3e-3)")
    assert isinstance(lr.domain(), tune.search.sample.Float) and lr.extremes() == (1e-4, 3e-3)
    assert lr.domain().lower == 1e-4 and isinstance(lr.domain().sampler, tune.search.sample.LogUniform)
    dropout = parse_search("model.dropout=choice(0.1, 0.3)")
    assert dropout.domain().categories == [0.1, 0.3]
    layers = parse_search("model.layers=int(2,6)")
    assert (layers.domain().lower, layers.domain().upper) == (2, 7)  # both ends included
    assert parse_search("train.zero_stage=grid(1,2,3)").domain() == {"grid_search": [1, 2, 3]}


@pytest.mark.parametrize(("text", "message"), [
    ("optim.lr", "write KEY=SPACE"),
    ("optim.lr=normal(0,1)", "write KEY=SPACE"),
    ("optim.lr=uniform(1)", "takes two numbers"),
    ("optim.lr=loguniform(0, 1)", "both above 0"),
    ("model.layers=int(2.5, 6)", "two whole numbers"),
    ("model.preset=choice(base, big)", "search the sizes themselves"),
    ("optim.lr=choice()", "at least one value"),
])
def test_a_bad_space_is_one_line_naming_it(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_search(text)


@pytest.mark.parametrize(("search", "message"), [
    ("optim.lrate=uniform(0.1, 1)", r"--search optim.lrate=uniform\(0.1, 1\): optim.lrate: unknown key"),
    ("model.dropout=uniform(0.1, 1.5)", r"--search model.dropout=uniform\(0.1, 1.5\): model.dropout"),
    ("cluster.placement_strategy=choice(PACK, WIDE)", "'WIDE' is not allowed"),
])
def test_every_trials_config_is_checked_at_the_edges_of_its_space(search: str, message: str) -> None:
    base = load_job_config(None, CADENCE)
    with pytest.raises(InputError, match=message):
        plan_sweep(base, [parse_search(search)], name="s", trials=4, scheduler="asha", metric="valid/loss",
                   concurrent=0)


def test_a_trial_is_a_run_of_its_own_under_the_sweep() -> None:
    base = load_job_config(None, [*CADENCE, "tracking.registered_model=translator", "model.preset=tiny"])
    job = trial_job(base, {"optim.lr": 0.002, "model.dropout": 0.3}, "lr-sweep", "a1b2c3", "parent-run-id")
    assert (job.optim.lr, job.model.dropout, job.model.d_model) == (0.002, 0.3, base.model.d_model)
    assert job.name == "lr-sweep-a1b2c3" and job.tracking.parent_run == "parent-run-id"
    assert job.tracking.registered_model == ""  # the sweep registers its best trial's model itself


def test_bad_sweeps_answer_before_ray_starts(tmp_path) -> None:
    """The real command: one line, exit 2, and no Ray started (no session directory made)."""
    env_home = tmp_path / "home"
    for arguments, message in [
        (["--search", "optim.lr=uniform(0.1,1)", *CADENCE], "needs --name"),
        (["--name", "s", *CADENCE], "at least one --search"),
        (["--name", "s", "--search", "optim.lr=uniform(0.1,1)"], "multiple of train.validate_every"),
        (["--name", "s", "--search", "optim.lr=uniform(0.1,1)", "--metric", "valid/ppl", *CADENCE],
         "--metric valid/ppl: use valid/loss or valid/bleu"),
        (["--name", "../s", "--search", "optim.lr=uniform(0.1,1)", *CADENCE], "--name='../s'"),
    ]:
        result = subprocess.run([sys.executable, "-m", "jobs.cli", "tune", *arguments], capture_output=True, text=True,
                                cwd=ROOT, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "AIAYN_HOME": str(env_home),
                                               "TMPDIR": str(tmp_path)}, timeout=120)
        assert result.returncode == 2 and message in result.stderr, (arguments, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("aiayn-*")) and not (tmp_path / "ray").exists()


@pytest.mark.parametrize("plant", ["another account's file", "a file others may write"])
def test_a_sweep_state_not_all_ours_is_refused_before_ray_starts(plant: str, tmp_path, tiny_corpus, monkeypatch) -> None:
    """Tune restores a sweep by unpickling its state: one entry there that is not this account's
    alone, and the real command refuses in one line (exit 2) before Ray starts or anything loads."""
    import os

    from jobs.train.driver import with_absolute_paths
    from jobs.tune.sweep import _state_root
    from tests.jobs.helpers import tiny_overrides

    home = tmp_path / "home"
    monkeypatch.setenv("AIAYN_HOME", str(home))
    overrides = [o for o in tiny_overrides(tiny_corpus, tmp_path, "s") if not o.startswith("name=")]
    overrides += ["train.max_steps=20", "train.validate_every=5", "train.checkpoint_every_steps=5"]
    state = _state_root(with_absolute_paths(load_job_config(None, overrides))) / "s"
    state.mkdir(mode=0o700)
    planted = state / "tuner.pkl"
    planted.write_bytes(b"not this account's pickle")
    if plant == "another account's file":
        os.chown(planted, 65534, 65534)
    else:
        planted.chmod(0o666)
    result = subprocess.run([sys.executable, "-m", "jobs.cli", "tune", "--name", "s", "--search",
                             "optim.lr=grid(0.001,0.002)", *overrides], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "TMPDIR": str(tmp_path)}, timeout=300)
    assert result.returncode == 2 and f"{planted}: not this account's alone" in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / f"aiayn-{os.getuid()}").exists()  # no Ray session was made
