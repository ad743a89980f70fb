"""The full training stack against a bare PyTorch loop, and 2 workers against 1, in one run.

- bare: one fresh process with as many threads as cores, started as a CPU worker is (its memory
  and OpenMP settings), the same model, batches (the same worker stream), Adam and gradient clipping;
- bare in Ray Train: that loop as the training function of a 1-worker TorchTrainer on a local Ray
  started as `aiayn train` starts it, its worker given the same environment: what Ray and Ray
  Train cost the loop, so that the stack's gap splits into theirs and aiayn's own;
- stack-1: `aiayn train` with 1 worker x the same threads (Ray Train + DeepSpeed ZeRO-2 + the stream);
- stack-2: the same with 2 workers sharing those threads;
- seconds from starting `aiayn train` to its first optimizer step (the MLflow timestamp of the
  metrics the worker logs after step 1).
One statistic for all four: target tokens/s of each 10-step window after step 10 (window wall
time, as jobs/report/metrics.py measures the stack's), median over windows. The four are measured in
interleaved rounds (bare, bare in Ray Train, 1, 2, bare, ...) and the ratios are of per-configuration medians,
so that a noisy minute does not decide a ratio alone.

    python bench/training_stack.py --data-dir data --steps 70 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _optimizer import paper_adam
from _provenance import provenance
from mlflow.tracking import MlflowClient

from data_pipeline.batching import Batch
from data_pipeline.config import StreamConfig
from data_pipeline.manifest import load_manifest
from data_pipeline.stream import ShardStream
from data_pipeline.tokenizer import PAD_ID
from jobs.report.tracking import RUN_NAME_TAG
from jobs.run.config import JobConfig
from jobs.train.cpu_allocator import keep_freed_memory
from jobs.train.openmp_spin import spin_environment
from transformer import build_model
from transformer.loss import label_smoothed_loss

WINDOW = 10  # steps per log window, in both


def bare_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch) -> None:
    """One step of the bare loop: the model, the label-smoothed loss, Adam and gradient clipping."""
    at = batch.target_positions()
    loss, _ = label_smoothed_loss(model(batch.src, batch.tgt_in, at, src_padded=batch.src_padded),
                                  batch.tgt_out.flatten()[at], 0.1, PAD_ID)
    optimizer.zero_grad(set_to_none=True)
    (loss / len(at)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def bare_model(vocab_size: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The recipe's model (seed 0) and the paper's Adam, as the bare loop holds them."""
    torch.manual_seed(0)
    model = build_model(JobConfig().model.replace(vocab_size=vocab_size))
    return model, paper_adam(model.parameters(), lr=1e-4)


def bare_loop(dataset: str, steps: int, max_tokens: int, threads: int) -> float:
    torch.set_num_threads(threads)
    keep_freed_memory()  # as a CPU worker's process is set up
    manifest = load_manifest(dataset)
    model, optimizer = bare_model(manifest.vocab_size)
    batches = ShardStream(manifest, "train", StreamConfig(max_tokens=max_tokens)).epoch_batches()
    rates, tokens, start = [], 0, time.perf_counter()
    for step, batch in zip(range(1, steps + 1), batches):
        bare_step(model, optimizer, batch)
        tokens += batch.target_tokens
        if step % WINDOW == 0:
            if step > WINDOW:
                rates.append(tokens / (time.perf_counter() - start))
            tokens, start = 0, time.perf_counter()
    return statistics.median(rates)


def bare_loop_in_ray_train(dataset: str, steps: int, max_tokens: int, threads: int) -> float:
    """`bare_loop` run by one Ray Train worker with `threads` CPUs, on a local Ray and with the
    worker environment and health-check interval that `aiayn train` gives its own."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cluster.ray_connection import connect
    from jobs.train.cpu_allocator import worker_environment

    def loop(config: dict) -> None:  # Ray Train 2.60 keeps no metrics without a checkpoint: a file (one node)
        out = Path(config.pop("out"))
        out.write_text(str(bare_loop(**config)))

    connect(num_cpus=threads)
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(JobConfig().cluster.poll_interval_s)
    try:
        with tempfile.TemporaryDirectory() as storage:
            TorchTrainer(
                loop, train_loop_config={"dataset": dataset, "steps": steps, "max_tokens": max_tokens, "threads": threads,
                                         "out": f"{storage}/tokens_per_s"},
                scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": threads}),
                run_config=RunConfig(storage_path=storage, worker_runtime_env={"env_vars": worker_environment(JobConfig().cluster, uses_gpu=False)}),
            ).fit()
            return float(Path(storage, "tokens_per_s").read_text())
    finally:
        ray.shutdown()


def in_own_process(function, *args) -> float:
    """`function(*args)` in a fresh Python (Ray's daemons and state leave with it); its float result.
    It starts as a CPU worker's process does (jobs/train/openmp_spin.py), and the processes Ray starts
    inherit the path that imports this module."""
    here = Path(__file__).resolve().parent
    path = os.pathsep.join(filter(None, [str(here), str(here.parent), os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", f"import training_stack; print(training_stack.{function.__name__}(*{args!r}))"],
                          check=True, capture_output=True, text=True,
                          env={**os.environ, **spin_environment(), "PYTHONPATH": path})
    return float(done.stdout.strip().splitlines()[-1])


def train_command(name: str, data_dir: str, workers: int, threads: int, steps: int, max_tokens: int,
                  scratch: Path) -> list[str]:
    """`aiayn train` for throughput alone: no validation, one checkpoint at the end, log every
    WINDOW steps to an MLflow store in `scratch`."""
    return [
        sys.executable, "-m", "jobs.cli", "train", f"--name={name}", f"data.output_dir={data_dir}",
        f"cluster.num_workers={workers}", f"cluster.cpus_per_worker={threads // workers}",
        f"train.threads_per_worker={threads // workers}", f"train.max_steps={steps}", "train.max_minutes=0",
        f"train.log_every={WINDOW}", "train.validate_every=0", "optim.decay_steps=0",
        f"train.checkpoint_every_steps={steps}", "train.average_checkpoints=1", "train.keep_checkpoints=1",
        f"stream.max_tokens={max_tokens}", f"cluster.storage_path={scratch / 'runs'}",
        f"tracking.uri={tracking_uri(scratch)}", "train.beam_size=1",
    ]


def tracking_uri(scratch: Path) -> str:
    return f"sqlite:///{scratch / 'mlflow.db'}"


def tokens_per_s_history(scratch: Path, name: str) -> list:
    """The finished run's `train/tokens_per_s` metrics by step."""
    client = MlflowClient(tracking_uri(scratch))
    run = client.search_runs([e.experiment_id for e in client.search_experiments()],
                             filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'")[0]
    return sorted(client.get_metric_history(run.info.run_id, "train/tokens_per_s"), key=lambda m: m.step)


def stack_run(data_dir: str, workers: int, threads: int, steps: int, max_tokens: int, scratch: Path) -> dict:
    name = f"bench-{workers}w"
    started = time.time()
    subprocess.run(train_command(name, data_dir, workers, threads, steps, max_tokens, scratch), check=True,
                   capture_output=True, text=True)
    history = tokens_per_s_history(scratch, name)
    first_step = min(history, key=lambda m: m.step)
    return {
        "target_tokens_per_s": statistics.median(m.value for m in history if m.step > WINDOW),
        "seconds_to_first_step": round(first_step.timestamp / 1000 - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="data", help="where `aiayn prepare` put multi30k-en-de")
    parser.add_argument("--steps", type=int, default=70)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of all three")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads in all (default: the cores)")
    args = parser.parse_args()
    data_dir = str(Path(args.data_dir).resolve())
    rounds: list[dict] = []
    for index in range(args.rounds):
        with tempfile.TemporaryDirectory() as scratch:
            bare = in_own_process(bare_loop, f"{data_dir}/multi30k-en-de", args.steps, args.max_tokens, args.threads)
            in_ray_train = in_own_process(bare_loop_in_ray_train, f"{data_dir}/multi30k-en-de", args.steps,
                                          args.max_tokens, args.threads)
            one = stack_run(data_dir, 1, args.threads, args.steps, args.max_tokens, Path(scratch))
            two = stack_run(data_dir, 2, args.threads, args.steps, args.max_tokens, Path(scratch))
        rounds.append({"bare": round(bare), "bare_in_ray_train": round(in_ray_train), "stack_1": round(one["target_tokens_per_s"]),
                       "stack_2": round(two["target_tokens_per_s"]),
                       "first_step_s_1": one["seconds_to_first_step"], "first_step_s_2": two["seconds_to_first_step"]})
        print(f"round {index + 1}: {rounds[-1]}", file=sys.stderr)
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    print(json.dumps({
        "threads": args.threads, "provenance": provenance(),
        "bare_loop_tokens_per_s": median["bare"],
        "bare_loop_in_ray_train_tokens_per_s": median["bare_in_ray_train"],
        "stack_1_worker_tokens_per_s": median["stack_1"],
        "stack_2_workers_tokens_per_s": median["stack_2"],
        "ratio_stack_1_worker_vs_bare": round(median["stack_1"] / median["bare"], 3),
        "ratio_bare_in_ray_train_vs_bare": round(median["bare_in_ray_train"] / median["bare"], 3),
        "ratio_stack_1_worker_vs_bare_in_ray_train": round(median["stack_1"] / median["bare_in_ray_train"], 3),
        "ratio_2_workers_vs_1_worker": round(median["stack_2"] / median["stack_1"], 3),
        "seconds_to_first_step_1_worker": median["first_step_s_1"],
        "seconds_to_first_step_2_workers": median["first_step_s_2"],
        "rounds": rounds, "steps": args.steps, "max_tokens": args.max_tokens,
    }, indent=2))


if __name__ == "__main__":
    main()
