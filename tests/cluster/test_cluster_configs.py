"""Cloud and Kubernetes configs: validated against the schema shipped inside Ray, and for structure."""

from __future__ import annotations

import json
import pathlib

import jsonschema
import pytest
import yaml

CLUSTER = pathlib.Path(__file__).resolve().parents[2] / "cluster"


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((pathlib.Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("name, provider", [("aws.yaml", "aws"), ("gcp.yaml", "gcp")])
def test_launcher_configs_match_rays_schema(name: str, provider: str) -> None:
    config = yaml.safe_load((CLUSTER / "launcher" / name).read_text())
    jsonschema.validate(config, _ray_schema())
    assert config["provider"]["type"] == provider
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["min_workers"] <= gpu["max_workers"] <= config["max_workers"]
    assert config["head_node_type"] in config["available_node_types"]
    assert config["docker"]["image"]


def test_a_broken_launcher_config_is_caught_by_the_schema() -> None:
    config = yaml.safe_load((CLUSTER / "launcher" / "aws.yaml").read_text())
    config["max_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, _ray_schema())


def test_kuberay_raycluster_structure() -> None:
    cluster = yaml.safe_load((CLUSTER / "k8s" / "raycluster.yaml").read_text())
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in head["ports"]} >= {6379, 8265}
    for group in cluster["spec"]["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] == head["image"]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def test_kuberay_rayjob_runs_aiayn_train() -> None:
    job = yaml.safe_load((CLUSTER / "k8s" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["entrypoint"].startswith("python -m jobs.cli train")
    assert "cluster.use_gpu=true" in job["spec"]["entrypoint"]
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]


def test_dockerfile_installs_the_project_on_a_cuda_base() -> None:
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM nvidia/cuda:" in dockerfile
    assert "pip install -e ." in dockerfile
    for package in ("transformer", "data_pipeline", "jobs", "cluster"):
        assert f"COPY {package} {package}" in dockerfile


def _ray_start_commands(config: dict) -> list[str]:
    commands = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    return [command for command in commands if "ray start" in command]


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_no_launcher_config_starts_ray_without_authentication(name: str) -> None:
    config = yaml.safe_load((CLUSTER / "launcher" / name).read_text())
    starts = _ray_start_commands(config)
    assert starts and all(command.startswith("RAY_AUTH_MODE=token ray start") for command in starts)
    head = [command for command in starts if "--head" in command]
    assert head and all("--dashboard-host=127.0.0.1" in command for command in head)
    assert "~/.ray/auth_token" in config["file_mounts"]  # every node gets the token


@pytest.mark.parametrize("name, spec", [("raycluster.yaml", ("spec",)), ("rayjob.yaml", ("spec", "rayClusterSpec"))])
def test_no_kuberay_manifest_starts_ray_without_authentication(name: str, spec: tuple[str, ...]) -> None:
    manifest = yaml.safe_load((CLUSTER / "k8s" / name).read_text())
    for key in spec:
        manifest = manifest[key]
    assert manifest["authOptions"]["mode"] == "token"
    services = [manifest["headGroupSpec"]] + manifest["workerGroupSpecs"]
    for group in services:  # no Service of type LoadBalancer / NodePort is declared for the head
        assert "serviceType" not in group or group["serviceType"] == "ClusterIP"
