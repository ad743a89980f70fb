"""What ranks exchange: JSON in byte tensors over a real gloo group of two processes, no pickle."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from jobs.train.collectives import all_gather


def _rank(rank: int, store_file: str, results) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(store_file, 2), rank=rank, world_size=2)
    try:
        dist.all_gather_object = None  # never used: a pickle from a peer could run code here
        values = [f"host-{rank}/node", 0.25 * (rank + 1), [(index, [int(np.int64(7)), 8][:rank + 1]) for index in range(rank + 2)],
                  np.int64(3 + rank), {"é": "ünïcode" * (rank * 40 + 1)}]
        results[rank] = [all_gather(value) for value in values]
    finally:
        dist.destroy_process_group()


def test_ranks_gather_each_others_values_of_any_length_without_pickle(tmp_path) -> None:
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(str(tmp_path / "store"), results), nprocs=2, join=True)
    assert results[0] == results[1]
    hosts, floats, pairs, numbers, texts = results[0]
    assert hosts == ["host-0/node", "host-1/node"] and floats == [0.25, 0.5] and numbers == [3, 4]
    assert pairs == [[[0, [7]], [1, [7]]], [[0, [7, 8]], [1, [7, 8]], [2, [7, 8]]]]  # tuples arrive as lists
    assert texts == [{"é": "ünïcode"}, {"é": "ünïcode" * 41}]
