"""Piecewise CUDA graphs for mixed and prefill steps, one set per padded token count.

An eager mixed step is host-bound: Python launches some ten kernels per layer, and the GPU
waits. Attention cannot join a graph (varlen flash attention sizes its grid from the step's
sequence lengths), but everything between two attention calls can: piece 0 is the embedding
and layer 0 up to attention, piece i finishes layer i-1 (o_proj, MLP) and runs layer i up to
attention, the last piece finishes the last layer and the final norm. A step of n tokens
replays the pieces of the smallest bucket >= n and runs attention eagerly between them on
static buffers; padded rows store nothing (slot -1) and attention leaves them zero.

The pieces pass q, k, v and the residual stream through static buffers shared by every
bucket, so all graphs can share the decode graphs' memory pool. `capture=False` runs the same
pieces without graphs (the CPU tests check the plumbing that way).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from engine.layers.context import ForwardContext, forward_context
from engine.models.llama import LlamaForCausalLM

InputFill = Callable[[torch.Tensor], None]


class PiecewiseGraphs:
    def __init__(self, model: LlamaForCausalLM, buckets: list[int], dtype: torch.dtype,
                 device: torch.device, pool: tuple[int, int] | None = None):
        cfg = model.config
        n, self.buckets = buckets[-1], buckets
        self.decoder = model.model
        self.layers = list(self.decoder.layers)
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        heads, kv_heads, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

        def buffer(*shape: int) -> torch.Tensor:
            return torch.zeros(n, *shape, dtype=dtype, device=device)
        self.q, self.k, self.v = buffer(heads, hd), buffer(kv_heads, hd), buffer(kv_heads, hd)
        self.attn_out = buffer(heads, hd)
        self.residual, self.hidden = buffer(cfg.hidden_size), buffer(cfg.hidden_size)
        self.kv_stored = False
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.pool = pool
        self.replays = 0

    @property
    def num_pieces(self) -> int:
        return len(self.layers) + 1

    def bucket(self, num_tokens: int) -> int | None:
        for n in self.buckets:
            if n >= num_tokens:
                return n
        return None

    # -- the pieces ------------------------------------------------------------------------

    def _piece(self, i: int, n: int) -> None:
        """Piece i over the first n rows of the static buffers."""
        positions = self.positions[:n]
        if i == 0:
            q, k, v, stored, residual = self.layers[0].before_attention(
                positions, self.decoder.embed_tokens(self.input_ids[:n]), None)
        else:
            hidden, residual = self.layers[i - 1].after_attention(
                self.attn_out[:n].flatten(1), self.residual[:n])
            if i == len(self.layers):
                self.hidden[:n].copy_(self.decoder.final_norm(hidden, residual))
                return
            q, k, v, stored, residual = self.layers[i].before_attention(positions, hidden,
                                                                        residual)
        for buf, x in ((self.q, q), (self.k, k), (self.v, v), (self.residual, residual)):
            buf[:n].copy_(x.view_as(buf[:n]))
        self.kv_stored = stored

    def _capture_context(self, n: int) -> ForwardContext:
        """What the pieces read from the context: where the fused kernel stores K/V."""
        return ForwardContext(slot_mapping=self.slot_mapping[:n], all_slots_valid=False)

    def capture(self, counts: list[int] | None = None) -> None:
        """Every bucket's pieces (or only `counts`'), largest bucket first (the smaller reuse
        its pool blocks); each piece runs once eagerly first (Triton compiles outside the
        capture). A bucket left out runs its pieces eagerly."""
        for n in sorted(counts or self.buckets, reverse=True):
            graphs = []
            with forward_context(self._capture_context(n)):
                for i in range(self.num_pieces):
                    self._piece(i, n)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self.pool):
                        self._piece(i, n)
                    self.pool = self.pool or graph.pool()
                    graphs.append(graph)
            self.graphs[n] = graphs
        torch.cuda.synchronize()

    # -- one step --------------------------------------------------------------------------

    def run(self, context: ForwardContext, input_ids: torch.Tensor, positions: torch.Tensor,
            fill: InputFill | None = None) -> torch.Tensor:
        """Hidden states [n, hidden] of a step whose inputs are padded to a bucket's n rows;
        `fill` writes device-resident token ids into the static input ids first."""
        n = input_ids.shape[0]
        if n not in self.buckets:
            raise ValueError(f"a piecewise step needs a bucket's row count, got {n}")
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(context.slot_mapping)
        if fill is not None:
            fill(self.input_ids[:n])
        with forward_context(replace(context, slot_mapping=self.slot_mapping[:n])):
            for i, layer in enumerate(self.layers):
                self._run_piece(i, n)
                layer.self_attn.attn(self.q[:n], self.k[:n], self.v[:n],
                                     kv_stored=self.kv_stored, out=self.attn_out[:n])
            self._run_piece(len(self.layers), n)
        self.replays += 1
        return self.hidden[:n]

    def _run_piece(self, i: int, n: int) -> None:
        graphs = self.graphs.get(n)
        if graphs is None:
            self._piece(i, n)
        else:
            graphs[i].replay()
