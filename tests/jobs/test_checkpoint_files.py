"""What aiayn itself unpickles from a checkpoint: only tensors and plain data."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipeline.stream import StreamPosition
from jobs import checkpoint as ckpt
from jobs.checkpoint.upload import staging_root
from jobs.train.engine import NonFiniteTraining
from jobs.train.run_report import RankReport
from jobs.train.save import Saver


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_rank_state_round_trips_and_refuses_arbitrary_objects(tmp_path) -> None:
    position = StreamPosition(epoch=1, window=2, batch=3, plan=((4, 5),), plan_window_units=6)
    torch.save({"position": position.to_dict(), "rng_state": torch.get_rng_state()}, tmp_path / "rank_00000.pt")
    loaded = ckpt.load_rank_state(tmp_path, 0)
    assert loaded.position == position and torch.equal(loaded.rng_state, torch.get_rng_state())
    torch.save({"position": position.to_dict(), "rng_state": _RunsCodeWhenUnpickled()}, tmp_path / "rank_00001.pt")
    with pytest.raises(pickle.UnpicklingError):
        ckpt.load_rank_state(tmp_path, 1)


def test_a_save_that_fails_before_its_upload_leaves_no_staging_and_does_not_block_the_next(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    uploads = ckpt.Uploads(0, asynchronous=True, fence=lambda what: None, uploaded=lambda step, seconds, in_background: None)
    with pytest.raises(OSError):
        with uploads.staging() as local:
            (local / "rank_00000.pt").write_bytes(b"part")
            raise OSError("No space left on device")
    assert list(staging_root().iterdir()) == []
    with uploads.staging() as local:  # returns at once: no upload is in flight
        assert local.is_dir()


def test_staging_left_by_a_killed_rank_is_removed_by_the_next_rank_to_start(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    killed = subprocess.Popen([sys.executable, "-c", "import sys, tempfile; from jobs.checkpoint.upload import Uploads; "
                               "u = Uploads(3, True, None, None); c = u.staging(); print(c.__enter__(), flush=True); "
                               "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "TMPDIR": str(tmp_path)})
    orphan = Path(killed.stdout.readline().strip())
    (orphan / "rank_00003.pt").write_bytes(b"part")
    killed.kill()
    killed.wait()
    live = ckpt.Uploads(0, asynchronous=True, fence=lambda what: None, uploaded=lambda step, seconds, in_background: None)
    with live.staging() as in_use:
        other_namespace = staging_root() / "r1-1-1-x"  # process 1 of another pid namespace: not judged
        other_namespace.mkdir()
        (staging_root() / "not-a-rank").mkdir()
        ckpt.Uploads(1, asynchronous=True, fence=lambda what: None, uploaded=lambda step, seconds, in_background: None)
        assert orphan.parent == staging_root() and not orphan.exists()
        assert in_use.is_dir() and other_namespace.is_dir() and (staging_root() / "not-a-rank").is_dir()


def test_the_weights_moving_average_is_saved_with_its_updates_and_continues_from_them(tmp_path) -> None:
    from transformer.ema import WeightAverage

    class _Engine:  # stands in for DeepSpeed's engine only where it writes its own files
        def save_checkpoint(self, directory, tag, save_latest):
            (tmp_path / "part" / ckpt.DEEPSPEED_DIR).mkdir(parents=True)

    average = WeightAverage(0.9, {"w": torch.tensor([1.0, 2.0])})
    average.update([("w", torch.tensor([3.0, 4.0]))])
    position = StreamPosition(epoch=0, window=0, batch=1, plan=(), plan_window_units=0)
    signer = ckpt.Signer(b"the account's own signing key, 32+ bytes")
    ckpt.save_checkpoint(_Engine(), tmp_path / "part", 0, ckpt.JobState(),
                         ckpt.RankState(position, torch.get_rng_state()), signer, average)
    ckpt.verify(str(tmp_path / "part"), signer)  # the average is one of rank 0's recorded files
    weights, updates = ckpt.saved_weight_average(tmp_path / "part")
    assert updates == 1 and torch.equal(weights["w"], average.weights["w"])
    continued = ckpt.load_weight_average(tmp_path / "part", 0.9)
    continued.update([("w", torch.tensor([3.0, 4.0]))])
    average.update([("w", torch.tensor([3.0, 4.0]))])  # the same second update as if never saved
    assert torch.equal(continued.weights["w"], average.weights["w"])
    assert ckpt.saved_weight_average(tmp_path) is None  # a checkpoint from before the run kept one


class _SavingEngine:
    """DeepSpeed's engine where a save touches it: its weights, and its own files (or a full disk)."""

    def __init__(self, weight: float, disk_full: bool = False) -> None:
        self.module, self.disk_full = torch.nn.Linear(1, 1), disk_full
        torch.nn.init.constant_(self.module.weight, weight)

    def save_checkpoint(self, directory, tag, save_latest) -> None:
        if self.disk_full:
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0\nmore")


def _saver(engine: _SavingEngine) -> Saver:
    report = RankReport()  # another rank's: reports nothing
    return Saver(0, zero_stage=2, asynchronous=True, engine=engine, average=None, report=report, fence=lambda what: None,
                 signer=ckpt.Signer(b"the account's own signing key, 32+ bytes"))


def test_a_save_refuses_non_finite_weights_and_names_the_setting_when_staging_is_full(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    state, rank_state = ckpt.JobState(step=7), ckpt.RankState(StreamPosition(), torch.get_rng_state())
    with pytest.raises(NonFiniteTraining, match="step 7: the weights are not finite"):
        _saver(_SavingEngine(float("nan"))).save(state, rank_state, {}, wait=False, validate=False)
    assert list(staging_root().iterdir()) == []  # refused before anything was staged
    saver = _saver(_SavingEngine(1.0, disk_full=True))
    with pytest.raises(ckpt.CheckpointError, match=r"step 7: writing this rank's checkpoint part to .* failed with "
                                                   r"\d+ MiB free .*set cluster.staging_dir to a local disk"):
        saver.save(state, rank_state, {}, wait=False, validate=False)
    assert list(staging_root().iterdir()) == []  # the staging of the failed save is gone
    with saver.uploads.staging() as local:  # and the next save is not left waiting for it
        assert local.is_dir()


_DEEPSPEED_LOAD = """
import os, pickle, sys, tempfile
from pathlib import Path
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0")
from jobs import checkpoint as ckpt
from jobs.run.config import load_job_config
from jobs.train.engine import build_engine
job = load_job_config(None, ["model.preset=tiny", "train.zero_stage=2", "data.tokenizer.vocab_size=64"])
engine, _ = build_engine(job, job.model.replace(vocab_size=64), 1, load_universal=False)
directory = Path(tempfile.mkdtemp())
engine.save_checkpoint(str(directory / ckpt.DEEPSPEED_DIR), tag=ckpt.DEEPSPEED_TAG, save_latest=False)
ckpt.load_engine_state(engine, directory, None)  # DeepSpeed's own files: their types are allowed
print("genuine loaded", flush=True)

class Payload:
    def __reduce__(self):
        return (eval, (f"open({sys.argv[1]!r}, 'w').write('ran')",))

optimizer = next((directory / ckpt.DEEPSPEED_DIR / ckpt.DEEPSPEED_TAG).glob("*optim_states.pt"))
optimizer.write_bytes(pickle.dumps({"optimizer_state_dict": Payload()}))
try:
    ckpt.load_engine_state(engine, directory, None)
except ckpt.CheckpointError as error:
    print("refused:", error)
"""


def test_deepspeeds_own_loads_read_plain_data_and_its_allowed_types_only(tmp_path) -> None:
    """Behind the signature: even a signed checkpoint's DeepSpeed files are read weights-only."""
    sentinel = tmp_path / "sentinel"
    loaded = subprocess.run([sys.executable, "-c", _DEEPSPEED_LOAD, str(sentinel), str(29500 + os.getpid() % 500)],
                            capture_output=True, text=True, timeout=300)
    assert "genuine loaded" in loaded.stdout, loaded.stderr[-3000:]
    assert "refused:" in loaded.stdout and "not plain data" in loaded.stdout, loaded.stdout + loaded.stderr[-3000:]
    assert not sentinel.exists()


def test_fp16s_loss_scalers_load_weights_only_with_their_state(tmp_path) -> None:
    """What DeepSpeed's fp16 optimizers save beside the tensors (`state_dict["loss_scaler"]`), as
    the real objects: they load under the allow-list with their state; fp16 itself needs a GPU."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

    dynamic = DynamicLossScaler(init_scale=2**16, scale_window=1000, min_scale=1, delayed_shift=2,
                                consecutive_hysteresis=False, raise_error_at_min_scale=True, dtype=torch.half)
    dynamic.cur_scale, dynamic.cur_hysteresis, dynamic.last_overflow_iter = 2.0**15, 1, 7  # not its first state
    torch.save({"loss_scaler": dynamic, "static": LossScaler(128.0)}, tmp_path / "optim_states.pt")
    with ckpt.weights_only_loads(tmp_path):
        loaded = torch.load(tmp_path / "optim_states.pt", weights_only=False)  # as DeepSpeed's loader asks
    assert vars(loaded["loss_scaler"]) == vars(dynamic) and loaded["loss_scaler"].cur_scale == 2.0**15
    assert loaded["static"].cur_scale == 128.0
