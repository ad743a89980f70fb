"""Does every node of the cluster see the same storage? Asked of the nodes themselves.

A location that only the driver's machine can see (a local path on a cluster whose nodes share no
disk, an object store whose credentials only the driver has) makes training fail late, on some
node, after resources are taken. Instead the driver writes a probe file at each location and a
zero-CPU task pinned to every alive node looks for it; a node that cannot see it is named in one
line. This holds for any cluster (shared mounts, object stores, isolated test nodes) without
guessing from node addresses.
"""

from __future__ import annotations

import uuid

from data_pipeline import storage
from data_pipeline.errors import InputError


def _sees(uris: list[str]) -> list[str]:
    """On a node: '' for each probe found, else why not."""
    answers = []
    for uri in uris:
        try:
            answers.append("" if storage.is_file(uri) else "not found there")
        except Exception as error:  # noqa: BLE001 - any failure to read is the answer
            answers.append(str(error).splitlines()[0])
    return answers


def check_reaches_every_node(locations: dict[str, str], timeout_s: float = 120.0) -> None:
    """Raise InputError unless every alive node reads every location (config key -> URI).

    Skipped when the only node is the driver's own (an embedded local Ray)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [node for node in ray.nodes() if node["Alive"]]
    if [node["NodeID"] for node in nodes] == [ray.get_runtime_context().get_node_id()]:
        return
    name = f".aiayn-reach-{uuid.uuid4().hex[:12]}"
    probes = {key: storage.join(str(storage.nearest_existing(uri)) if storage.is_local(uri) else uri, name)
              for key, uri in locations.items()}  # local: creates no directory
    try:
        for probe in probes.values():
            storage.write_bytes_atomic(probe, b"probe")
        probe_task = ray.remote(num_cpus=0, max_retries=0)(_sees)
        pending = [
            probe_task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
            .remote(list(probes.values())) for node in nodes
        ]
        answers = list(zip(nodes, ray.get(pending, timeout=timeout_s)))
    finally:
        for probe in probes.values():
            storage.delete_file(probe)
    for node, node_answers in answers:
        for (key, uri), answer in zip(locations.items(), node_answers):
            if answer:
                raise InputError(
                    f"{key}={uri} is not reachable from node {node['NodeManagerAddress']} "
                    f"({node['NodeID'][:12]}): {answer}; use storage that every node reaches (an s3:// or gs:// "
                    "URI with credentials on every node, or a path mounted on every node)"
                )
