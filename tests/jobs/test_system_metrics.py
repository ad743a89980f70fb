"""Each node's system figures, sampled by MLflow's collectors, and their summary over the nodes:
the same few metric names whatever the number of nodes and GPUs."""

from __future__ import annotations

import time

from jobs.report.system_metrics import NodeSampler, node_metrics


def test_a_node_samples_its_figures_from_the_start_until_taken(tmp_path, monkeypatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sampler = NodeSampler(interval_s=0.2, tracking_uri=f"sqlite:///{tmp_path / 'runs.db'}")
    # nothing made in the worker's working directory (MLflow's default store was, once)
    assert list(work.iterdir()) == []
    try:
        time.sleep(0.1)  # the first sample is taken at once
        figures = sampler.take()
        assert figures["system_memory_usage_megabytes"] > 0 and "disk_usage_percentage" in figures
        deadline = time.monotonic() + 10
        while not (later := sampler.take()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert later["system_memory_usage_megabytes"] > 0  # sampling goes on between takes
    finally:
        sampler.finish()
    assert not sampler._thread.is_alive()


def test_nodes_and_gpus_fold_into_the_same_few_names() -> None:
    nodes = [{"cpu_utilization_percentage": 50.0, "gpu_0_utilization_percentage": 90.0,
              "gpu_1_utilization_percentage": 30.0},
             None,  # a rank that is not its node's first samples nothing
             {"cpu_utilization_percentage": 70.0, "gpu_0_utilization_percentage": 60.0,
              "gpu_1_utilization_percentage": 80.0}]
    assert node_metrics(nodes) == {
        "system/cpu_utilization_percentage/min": 50.0, "system/cpu_utilization_percentage/median": 60.0,
        "system/cpu_utilization_percentage/max": 70.0,
        "system/gpu_utilization_percentage/min": 30.0, "system/gpu_utilization_percentage/median": 70.0,
        "system/gpu_utilization_percentage/max": 90.0}
    many = [{"cpu_utilization_percentage": float(n), **{f"gpu_{g}_utilization_percentage": 1.0 for g in range(8)}}
            for n in range(500)]
    assert set(node_metrics(many)) == set(node_metrics(nodes))
