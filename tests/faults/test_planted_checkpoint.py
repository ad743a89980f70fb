"""Storage that others can write: a checkpoint planted by another account is never unpickled.

Another local account (nobody, uid 65534, through `setpriv`) with write access to the run's
storage (not to what aiayn wrote in it: that stays private) plants a copy of a genuine checkpoint
(one shared with them, say) as a later step, its DeepSpeed model file replaced
by a pickle that writes a file when loaded, and every size and sha256 in its markers rewritten to
match: integrity checks pass, only authorship fails. It is planted while the run trains and is
still there when the same command runs again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from jobs import checkpoint as ckpt
from jobs.train.driver import train
from tests.jobs.helpers import tiny_job, when_checkpoint_exists

pytestmark = pytest.mark.slow
PLANTED = ckpt.checkpoint_dir_name(99)

_FORGER = r"""
import hashlib, json, os, pickle, shutil, sys
run, source, planted, sentinel = sys.argv[1:5]

class Payload:
    def __reduce__(self):
        return (eval, (f"open({sentinel!r}, 'w').write('unpickled')",))

target = os.path.join(run, planted)
shutil.copytree(source, target)
with open(os.path.join(target, "deepspeed", "state", "mp_rank_00_model_states.pt"), "wb") as handle:
    pickle.dump(Payload(), handle)
for name in os.listdir(target):
    if name.endswith(".complete"):
        path = os.path.join(target, name)
        marker = json.load(open(path))
        for file, entry in marker.get("files", marker).items():
            data = open(os.path.join(target, file), "rb").read()
            entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
        json.dump(marker, open(path, "w"))
print("planted")
"""


def _plant_as_another_account(run_dir: Path, source: Path, sentinel: Path) -> None:
    shared_copy = run_dir.parent.parent / "shared-copy"
    shutil.copytree(source, shared_copy)
    subprocess.run(["chmod", "-R", "a+rX", str(shared_copy)], check=True)
    run_dir.parent.chmod(0o755)
    run_dir.chmod(0o777)  # the run's storage is writable by others, as a shared bucket may be
    planted = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/env", "python3",
                              "-c", _FORGER, str(run_dir), str(shared_copy), PLANTED, str(sentinel)],
                             capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"})
    assert planted.returncode == 0 and (run_dir / PLANTED).is_dir(), planted.stderr[-2000:]
    assert ckpt.is_complete(run_dir / PLANTED)  # sizes match; and so do the sha256s:
    recorded = json.loads((run_dir / PLANTED / "rank_00000.complete").read_text())["files"]
    payload = "deepspeed/state/mp_rank_00_model_states.pt"
    assert recorded[payload]["sha256"] == hashlib.sha256((run_dir / PLANTED / payload).read_bytes()).hexdigest()


def test_a_checkpoint_planted_by_another_account_is_never_loaded(ray_cluster, tiny_corpus, fault_row) -> None:
    shared = Path(tempfile.mkdtemp(prefix="aiayn-shared-"))  # outside pytest's private temp: others can enter
    shared.chmod(0o755)
    sentinel = shared / "sentinel"
    try:
        job = tiny_job(tiny_corpus, shared, "shared", address=ray_cluster)
        run_dir = shared / "runs" / "shared"
        lines: list[str] = []
        # planted while the run trains: its end (the export, retention) must pass over it
        when_checkpoint_exists(run_dir, 10, lambda: _plant_as_another_account(run_dir, run_dir / ckpt.checkpoint_dir_name(10),
                                                                              sentinel))
        first = train(job, log=lines.append)
        assert (run_dir / PLANTED).is_dir(), "the plant never happened"
        assert first.steps == 30 and not sentinel.exists()
        assert (run_dir / PLANTED).is_dir()  # never delete what aiayn did not write
        # still there when the same command runs again: the rerun resumes from the newest genuine one and says why
        again: list[str] = []
        second = train(job, log=again.append)
        assert not sentinel.exists(), "the planted pickle ran"
        assert second.steps == 30
        [passed] = [line for line in again if line.startswith(f"passing over {PLANTED}")]
        assert "signature does not match" in passed, passed
        assert any(f"resuming at step 30 from {run_dir / ckpt.checkpoint_dir_name(30)}" in line for line in again), again
        signer = ckpt.Signer.of_account()
        signed, refused = ckpt.signed_checkpoints(str(run_dir), signer)
        assert list(refused) == [str(run_dir / PLANTED)] and signed
        # the key reached the workers, and nothing of it the run's storage or Ray's logs
        import ray

        session = Path(ray._private.worker._global_node.get_session_dir_path())
        assert [p for p in (session / "logs").rglob("*") if p.is_file() and signer.key in p.read_bytes()] == []
        assert [p for p in run_dir.rglob("*") if p.is_file() and signer.key in p.read_bytes()] == []
        fault_row(fault="another account plants a checkpoint (pickle payload, sha256 markers rewritten)",
                  injected="checkpoint_step99 beside a running run, kept for the rerun", at_step="10",
                  outcome="never unpickled; the run and its rerun use the newest signed checkpoint and say why",
                  steps_lost="0", data_lost="none")
    finally:
        shutil.rmtree(shared, ignore_errors=True)
