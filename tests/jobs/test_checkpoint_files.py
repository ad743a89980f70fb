"""What aiayn itself unpickles from a checkpoint: only tensors and plain data."""

from __future__ import annotations

import pickle

import pytest
import torch

from data_pipeline.stream import StreamPosition
from jobs import checkpoint as ckpt


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
    assert list(tmp_path.iterdir()) == []
    with uploads.staging() as local:  # returns at once: no upload is in flight
        assert local.is_dir()


def test_the_weights_moving_average_is_saved_with_its_updates_and_continues_from_them(tmp_path) -> None:
    from transformer.ema import WeightAverage

    class _Engine:  # stands in for DeepSpeed's engine only where it writes its own files
        def save_checkpoint(self, directory, tag, save_latest):
            (tmp_path / "part" / ckpt.DEEPSPEED_DIR).mkdir(parents=True)

    average = WeightAverage(0.9, {"w": torch.tensor([1.0, 2.0])})
    average.update([("w", torch.tensor([3.0, 4.0]))])
    position = StreamPosition(epoch=0, window=0, batch=1, plan=(), plan_window_units=0)
    ckpt.save_checkpoint(_Engine(), tmp_path / "part", 0, ckpt.JobState(), ckpt.RankState(position, torch.get_rng_state()),
                         average)
    ckpt.verify(str(tmp_path / "part"))  # the average is one of rank 0's recorded files
    weights, updates = ckpt.saved_weight_average(tmp_path / "part")
    assert updates == 1 and torch.equal(weights["w"], average.weights["w"])
    continued = ckpt.load_weight_average(tmp_path / "part", 0.9)
    continued.update([("w", torch.tensor([3.0, 4.0]))])
    average.update([("w", torch.tensor([3.0, 4.0]))])  # the same second update as if never saved
    assert torch.equal(continued.weights["w"], average.weights["w"])
    assert ckpt.saved_weight_average(tmp_path) is None  # a checkpoint from before the run kept one
