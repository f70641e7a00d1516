"""CUDA graphs of whole mixed and prefill steps, one per padded token count.

An eager mixed step is host-bound: Python launches some ten kernels per layer, and the GPU
waits. Varlen flash attention cannot join a graph (it sizes its grid from the step's sequence
lengths), so graphed steps use the mixed attention kernel (engine/layers/mixed_attention.py),
whose grid depends only on the row count and the number of sequence slots. A step of n tokens
is loaded into static buffers and replays the graph of the smallest bucket >= n: the whole
forward pass, attention included, in one launch.

Sequence slots: the step's sequences first, then empty ones, then one padding sequence that
owns the rows past the step's tokens, with no keys (its rows come out zero and store nothing,
slot -1). Without CUDA the same buffers run eagerly (the CPU tests check the layout that way).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from engine.core.shapes import graph_bucket
from engine.layers.context import ForwardContext, PagedMetadata, forward_context
from engine.runtime.decode_graphs import load_buffer
from engine.runtime.step_input import HostBatch

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
InputFill = Callable[[torch.Tensor], None]


class MixedGraphs:
    def __init__(self, forward: Forward, buckets: list[int], max_num_seqs: int,
                 max_blocks_per_seq: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device, pool: tuple[int, int] | None = None):
        n, slots = buckets[-1], max_num_seqs + 1  # + the padding sequence
        self.forward = forward
        self.buckets = buckets
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.query_start_loc = torch.zeros(slots + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(slots, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(slots, max_blocks_per_seq, dtype=torch.int32,
                                        device=device)
        self.hidden = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = pool
        self.replays = 0

    @property
    def max_num_seqs(self) -> int:
        return self.seq_lens.shape[0] - 1

    def bucket(self, num_tokens: int) -> int | None:
        return graph_bucket(num_tokens, self.buckets)

    def serves(self, num_tokens: int, num_seqs: int, decode_only: bool) -> bool:
        """Whether such a step replays these graphs (decode-only steps have their own)."""
        return (not decode_only and num_seqs <= self.max_num_seqs
                and self.bucket(num_tokens) is not None)

    def covers(self, host: HostBatch) -> bool:
        return self.serves(host.num_tokens, len(host.order), host.is_decode_only)

    def _context(self, n: int) -> ForwardContext:
        return ForwardContext(query_start_loc=self.query_start_loc, seq_lens=self.seq_lens,
                              slot_mapping=self.slot_mapping[:n], block_tables=self.block_tables,
                              paged=PagedMetadata(num_decodes=0, whole_step=True))

    def _forward(self, n: int) -> None:
        with forward_context(self._context(n)):
            self.hidden[:n] = self.forward(self.input_ids[:n], self.positions[:n])

    def capture(self, counts: list[int] | None = None) -> None:
        """Every bucket's graph (or only `counts`'), largest first (the smaller reuse its
        pool blocks), each after one eager run (Triton compiles outside the capture). A bucket
        left out runs eagerly through the same buffers."""
        for n in sorted(counts or self.buckets, reverse=True):
            self._load_empty(n)
            self._forward(n)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self._forward(n)
            self.pool = self.pool or graph.pool()
            self.graphs[n] = graph
        torch.cuda.synchronize()

    def _load_empty(self, n: int) -> None:
        """Every row to the padding sequence (what capture runs over)."""
        self.query_start_loc[:-1].zero_()
        self.query_start_loc[-1] = n
        self.seq_lens.zero_()

    def load(self, host: HostBatch, n: int) -> None:
        """Copy a step of at most n tokens and max_num_seqs sequences into the buffers."""
        tokens, seqs = host.num_tokens, len(host.order)
        width = host.block_tables.shape[1]
        load_buffer(self.input_ids[:tokens], host.input_ids)
        load_buffer(self.positions[:tokens], host.positions)
        load_buffer(self.slot_mapping[:tokens], host.slot_mapping)
        self.slot_mapping[tokens:n].fill_(-1)
        starts = np.full(self.query_start_loc.shape[0], tokens, dtype=np.int32)
        starts[:seqs + 1], starts[-1] = host.query_start_loc, n
        load_buffer(self.query_start_loc, starts)
        lens = np.zeros(self.seq_lens.shape[0], dtype=np.int32)
        lens[:seqs] = host.seq_lens
        load_buffer(self.seq_lens, lens)
        load_buffer(self.block_tables[:seqs, :width], host.block_tables)

    def run(self, host: HostBatch, fill: InputFill | None = None) -> torch.Tensor:
        """Hidden states [n, hidden] of the step padded to its bucket's n rows; `fill`
        writes device-resident token ids into the static input ids first."""
        n = self.bucket(host.num_tokens)
        if n is None or not self.covers(host):
            raise ValueError(f"a step of {host.num_tokens} tokens and {len(host.order)} "
                             f"sequences is not a mixed-graph step (buckets up to "
                             f"{self.buckets[-1]}, {self.max_num_seqs} sequences)")
        self.load(host, n)
        if fill is not None:
            fill(self.input_ids[:n])
        if n in self.graphs:
            self.graphs[n].replay()
        else:
            self._forward(n)
        self.replays += 1
        return self.hidden[:n]
