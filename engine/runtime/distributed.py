"""Tensor parallelism's processes: one per device, the caller's process rank 0.

Rank 0 is the LLMEngine: it schedules, broadcasts each step's plan and samples. Ranks 1..n-1
are spawned (`torch.multiprocessing`, spawn) and run `engine.runtime.tp_worker.worker_main`:
the same start-up as rank 0, then one forward pass per plan received. Two process groups:
the device group carries the model's collectives (NCCL on GPUs, gloo on the CPU), a gloo group
carries the plans and start-up values (the world group itself on the CPU). Nothing here runs
at TP=1.

The plan of a step is its `HostBatch` (engine/runtime/step_input.py), which rank 0 builds from
the scheduler's output and every rank turns into the same device inputs: token ids,
positions, KV slots, query starts, KV lengths, block tables, the rows that sample and the
prefix-gather slots. It travels as two int64 tensors: a fixed header of lengths
(`PLAN_HEADER` entries) and one payload of every array laid end to end.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from engine.layers.parallel import TPGroup, get_tp, set_tp
from engine.runtime.step_input import HostBatch

STOP, STEP = 0, 1
PLAN_HEADER = 12
# How long a rank waits in a collective for the others (a rank that died leaves the others
# waiting this long on NCCL; gloo notices a closed peer at once).
TIMEOUT_S = int(os.environ.get("KVTWIN_TP_TIMEOUT_S", "600"))


def available(device_type: str = "cpu") -> bool:
    """Whether torch.distributed has the backend this device needs."""
    if not dist.is_available():
        return False
    return dist.is_nccl_available() if device_type == "cuda" else dist.is_gloo_available()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: cuda:r on GPUs (made current), the CPU otherwise."""
    if device.type != "cuda":
        return device
    torch.cuda.set_device(rank)
    return torch.device("cuda", rank)


def init_tp(rank: int, size: int, port: int, device: torch.device) -> TPGroup:
    """Join the group of `size` processes (rendezvous on 127.0.0.1:`port`)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size, timeout=timedelta(seconds=TIMEOUT_S))
    world = dist.group.WORLD
    cpu = world if backend == "gloo" else dist.new_group(backend="gloo")
    group = TPGroup(rank, size, world, cpu)
    set_tp(group)
    return group


def close_tp() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    set_tp(TPGroup())


def min_over_ranks(value: int) -> int:
    """The smallest `value` of all ranks (an all-reduce MIN); `value` at TP=1."""
    tp = get_tp()
    if tp.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=tp.cpu_group)
    return int(t.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank ([obj] at TP=1)."""
    tp = get_tp()
    if tp.size == 1:
        return [obj]
    out: list[Any] = [None] * tp.size
    dist.all_gather_object(out, obj, group=tp.cpu_group)
    return out


def spawn_workers(target: Callable[..., None], size: int, args: tuple) -> tuple[list, Any]:
    """Start ranks 1..size-1 as `target(rank, *args, errors)`; returns them and the queue
    their start-up or step errors come back on."""
    ctx = torch.multiprocessing.get_context("spawn")
    errors = ctx.SimpleQueue()
    procs = [ctx.Process(target=target, args=(rank, *args, errors), daemon=True,
                         name=f"kvtwin-tp-rank{rank}") for rank in range(1, size)]
    for proc in procs:
        proc.start()
    return procs, errors


# -- the step plan ----------------------------------------------------------------------------

class PlanChannel:
    """Rank 0 sends each step's HostBatch (or STOP); the other ranks receive it."""

    def send(self, host: HostBatch | None) -> None:
        if host is None:
            self._broadcast(torch.zeros(PLAN_HEADER, dtype=torch.int64))
            return
        header, payload = pack_plan(host)
        self._broadcast(header)
        self._broadcast(payload)

    def recv(self) -> HostBatch | None:
        header = torch.empty(PLAN_HEADER, dtype=torch.int64)
        self._broadcast(header)
        if int(header[0]) == STOP:
            return None
        payload = torch.empty(int(header[-1]), dtype=torch.int64)
        self._broadcast(payload)
        return unpack_plan(header.numpy(), payload.numpy())

    @staticmethod
    def _broadcast(t: torch.Tensor) -> None:
        dist.broadcast(t, src=0, group=get_tp().cpu_group)


def pack_plan(host: HostBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(header, payload): the header holds every array's length, the payload the arrays."""
    kv = host.prefill_kv_slots
    parts = [host.order, host.input_ids, host.positions, host.slot_mapping,
             host.query_start_loc, host.seq_lens, host.block_tables.ravel(), host.sample_seqs,
             host.sample_rows, kv if kv is not None else []]
    arrays = [np.asarray(p, dtype=np.int64) for p in parts]
    payload = np.concatenate(arrays)
    rows, cols = host.block_tables.shape
    header = [STEP, host.num_decodes, len(host.order), host.num_tokens,
              len(host.query_start_loc), rows, cols, len(host.sample_seqs),
              -1 if kv is None else len(kv), 0, 0, len(payload)]
    return torch.tensor(header, dtype=torch.int64), torch.from_numpy(payload)


def unpack_plan(header: np.ndarray, payload: np.ndarray) -> HostBatch:
    _, num_decodes, n_order, tokens, n_qsl, rows, cols, n_sample, n_kv = header[:9].tolist()
    sizes = [n_order, tokens, tokens, tokens, n_qsl, n_qsl - 1, rows * cols, n_sample,
             n_sample, max(n_kv, 0)]
    parts, at = [], 0
    for n in sizes:
        parts.append(payload[at:at + n])
        at += n
    order, ids, pos, slots, qsl, seq_lens, tables, sample_seqs, sample_rows, kv = parts
    return HostBatch(order.tolist(), num_decodes, ids.copy(), pos.copy(), slots.copy(),
                     qsl.tolist(), seq_lens.tolist(),
                     tables.astype(np.int32).reshape(rows, cols), sample_seqs.tolist(),
                     sample_rows.tolist(), kv.copy() if n_kv >= 0 else None)
