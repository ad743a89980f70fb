"""Checkpoints in an object store: bytes written to the bucket per checkpoint, and the time to
export from the bucket against exporting the same checkpoint from local disk (the peer), in one run.

For each measured preset a real DeepSpeed ZeRO-2 engine (fp32, Adam, one process) takes one step
and saves an aiayn checkpoint, which is uploaded to an S3 server (the isolated cluster's Swift store, on 127.0.0.1)
and exported twice: from the local directory, and the way `aiayn train` does from a bucket
(download the DeepSpeed files into a temporary directory, then export). Presets too large to
measure here are computed from the measured bytes per parameter (the model's fp32 weights plus
Adam's two moments and ZeRO's fp32 partition: about 16 bytes per parameter in fp32 training).

    python bench/object_store.py --measure small base --compute big
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def _single_process_distributed() -> None:
    import deepspeed

    from cluster.services import free_port

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    deepspeed.init_distributed(dist_backend="gloo")


def _checkpoint(preset: str, vocab_size: int, directory: Path) -> int:
    """Save one step's ZeRO-2 checkpoint of `preset` into `directory`; returns its parameter count."""
    import deepspeed

    from data_pipeline.stream import StreamPosition
    from jobs import checkpoint as ckpt
    from jobs.run.config import JobConfig
    from jobs.train.deepspeed_config import deepspeed_config
    from transformer import build_model, count_parameters
    from transformer.config import PRESETS

    job = JobConfig(model=PRESETS[preset])
    model = build_model(job.model.replace(vocab_size=vocab_size))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=deepspeed_config(job, 1))
    loss = sum(p.float().sum() for p in engine.module.parameters()) * 0.0  # creates Adam's state
    engine.backward(loss)
    engine.step()
    state = ckpt.JobState(step=1, world_size=1, zero_stage=job.train.zero_stage, config={})
    ckpt.save_checkpoint(engine, directory, directory.name, 0, state, ckpt.RankState(StreamPosition(), torch.get_rng_state()),
                         ckpt.Signer.of_account())
    return count_parameters(model)


def _export_seconds(checkpoint: str, preset: str, vocab_size: int, scratch: Path) -> float:
    from jobs import checkpoint as ckpt
    from jobs.inference.export import export_model
    from transformer.config import PRESETS

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=scratch) as work:
        local = ckpt.local_copy(checkpoint, Path(work))
        export_model([local], PRESETS[preset].replace(vocab_size=vocab_size), b"", {}, Path(work) / "export")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--measure", nargs="+", default=["small", "base"])
    parser.add_argument("--compute", nargs="*", default=["big"])
    parser.add_argument("--vocab-size", type=int, default=37000)
    args = parser.parse_args()

    from cluster.services import start_scratch_object_store
    from data_pipeline import storage
    from transformer import build_model, count_parameters
    from transformer.config import PRESETS

    _single_process_distributed()
    results: dict = {"vocab_size": args.vocab_size, "zero_stage": 2, "precision": "fp32", "presets": {}}
    with tempfile.TemporaryDirectory(prefix="aiayn-bench-") as scratch_name:
        scratch = Path(scratch_name)
        service, store_env = start_scratch_object_store(scratch / "store", "bench")
        os.environ.update(store_env)
        try:
            for preset in args.measure:
                local = scratch / preset / "checkpoint_step00000001"
                parameters = _checkpoint(preset, args.vocab_size, local)
                remote = f"s3://bench/{preset}/checkpoint_step00000001"
                start = time.perf_counter()
                storage.copy_dir(str(local), remote)
                upload = time.perf_counter() - start
                written = sum(storage.file_sizes(remote).values())
                from_disk = _export_seconds(str(local), preset, args.vocab_size, scratch)
                from_bucket = _export_seconds(remote, preset, args.vocab_size, scratch)
                results["presets"][preset] = {
                    "parameters": parameters, "bucket_bytes_per_checkpoint": written,
                    "bytes_per_parameter": round(written / parameters, 2), "upload_s": round(upload, 2),
                    "export_from_local_disk_s": round(from_disk, 2), "export_from_bucket_s": round(from_bucket, 2),
                    "bucket_vs_disk": round(from_bucket / from_disk, 2),
                }
        finally:
            service.stop()
    per_parameter = max(r["bytes_per_parameter"] for r in results["presets"].values())
    for preset in args.compute:
        parameters = count_parameters(build_model(PRESETS[preset].replace(vocab_size=args.vocab_size)))
        results["presets"][preset] = {"parameters": parameters, "computed": True,
                                      "bucket_bytes_per_checkpoint": int(parameters * per_parameter),
                                      "bytes_per_parameter": per_parameter}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
