"""The tensor-parallel group the layers shard over, and its two collectives.

One process per GPU (engine/runtime/distributed.py starts them). A process's rank and size are
set here before its model is built; at TP=1 (the default, and always without
`tensor_parallel_size > 1`) nothing is initialised and both collectives return their input.

- `all_reduce`: sums the partial outputs of a row-parallel layer (and the vocab-parallel
  embedding) in place, on the device group (NCCL on GPUs: capturable in CUDA graphs once the
  communicator exists, which the start-up profile run's eager forward ensures; gloo on CPU).
- `gather_to_first`: the LM head's logits shards, concatenated on rank 0 (None elsewhere):
  only rank 0 samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class TPGroup:
    rank: int = 0
    size: int = 1
    device_group: Any = None  # torch.distributed ProcessGroup of the model's tensors
    cpu_group: Any = None     # gloo: step plans and start-up values (engine.runtime)


_GROUP = TPGroup()


def get_tp() -> TPGroup:
    return _GROUP


def set_tp(group: TPGroup) -> None:
    global _GROUP
    _GROUP = group


@contextmanager
def tensor_parallel(rank: int, size: int) -> Iterator[TPGroup]:
    """Build layers as rank `rank` of `size` (no process group: shapes and sharding only)."""
    previous = get_tp()
    set_tp(TPGroup(rank, size))
    try:
        yield get_tp()
    finally:
        set_tp(previous)


def divide(numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by tensor parallel size {denominator}")
    return numerator // denominator


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the ranks, in place (identity at TP=1)."""
    tp = get_tp()
    if tp.size == 1:
        return x
    dist.all_reduce(x, group=tp.device_group)
    return x


def gather_to_first(x: torch.Tensor) -> torch.Tensor | None:
    """[N, V / tp] on every rank -> [N, V] on rank 0, None on the others (identity at TP=1)."""
    tp = get_tp()
    if tp.size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(tp.size)] if tp.rank == 0 else None
    dist.gather(x, parts, dst=0, group=tp.device_group)
    return torch.cat(parts, dim=-1) if parts is not None else None
