"""CUDA graphs of the model's forward pass for decode-only steps, one per batch-size bucket.

A graph replays fixed device addresses, so a step's inputs are copied into static buffers;
a batch of n decodes replays the smallest bucket >= n, its padded rows storing nothing
(slot -1) and attending to nothing (KV length 0). All graphs share one memory pool, captured
largest first so the smaller ones reuse its blocks. Logits and sampling stay eager.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from engine.core.shapes import graph_bucket, graph_buckets
from engine.layers.context import ForwardContext, PagedMetadata, forward_context
from engine.runtime.step_input import HostBatch

__all__ = ["DecodeGraphs", "graph_buckets", "load_buffer"]

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class DecodeGraphs:
    def __init__(self, forward: Forward, buckets: list[int], max_blocks_per_seq: int,
                 hidden_size: int, dtype: torch.dtype, device: torch.device):
        n = buckets[-1]
        self.forward = forward
        self.buckets = buckets
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.decode_order = torch.arange(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool: tuple[int, int] | None = None
        self.replays = 0

    def capture(self, buckets: list[int] | None = None) -> None:
        for bs in sorted(buckets or self.buckets, reverse=True):
            with forward_context(self._context(bs)):
                self.hidden[:bs] = self.forward(self.input_ids[:bs], self.positions[:bs])
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self.hidden[:bs] = self.forward(self.input_ids[:bs], self.positions[:bs])
            self.pool = self.pool or graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def _context(self, bs: int) -> ForwardContext:
        meta = PagedMetadata(num_decodes=bs, decode_seq_lens=self.seq_lens[:bs],
                             decode_block_tables=self.block_tables[:bs],
                             decode_order=self.decode_order[:bs])
        return ForwardContext(slot_mapping=self.slot_mapping[:bs], all_slots_valid=True,
                              paged=meta)

    def bucket(self, num_decodes: int) -> int | None:
        bs = graph_bucket(num_decodes, self.buckets)
        return bs if bs in self.graphs else None

    def load(self, batch: HostBatch, bucket: int) -> None:
        """Copy a decode-only batch of n <= bucket sequences into the static buffers."""
        n = batch.num_tokens
        width = batch.block_tables.shape[1]
        load_buffer(self.input_ids[:n], batch.input_ids)
        load_buffer(self.positions[:n], batch.positions)
        load_buffer(self.slot_mapping[:n], batch.slot_mapping)
        load_buffer(self.seq_lens[:n], np.asarray(batch.seq_lens, dtype=np.int32))
        load_buffer(self.block_tables[:n, :width], batch.block_tables)
        load_buffer(self.decode_order[:bucket], batch.decode_order(bucket))
        self.slot_mapping[n:bucket].fill_(-1)
        self.seq_lens[n:bucket].zero_()

    def replay(self, bucket: int, n: int) -> torch.Tensor:
        """Hidden states [n, hidden] of the loaded batch."""
        self.graphs[bucket].replay()
        self.replays += 1
        return self.hidden[:n]

    def run(self, batch: HostBatch, bucket: int) -> torch.Tensor:
        self.load(batch, bucket)
        return self.replay(bucket, batch.num_tokens)


def load_buffer(buffer: torch.Tensor, host: np.ndarray) -> None:
    """Copy a host array into a device buffer without waiting (through pinned memory)."""
    source = torch.from_numpy(host)
    if buffer.device.type == "cuda":
        source = source.pin_memory()
    buffer.copy_(source, non_blocking=True)
