"""ModelRunner: owns the model and its paged KV cache, turns a scheduler step into tokens."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate, chain
from pathlib import Path
from typing import Protocol

import torch

from engine.config import EngineConfig, ModelConfig
from engine.layers.attention import BACKENDS, Attention
from engine.layers.context import ForwardContext, dense_context, forward_context
from engine.layers.sampler import Sampler
from engine.loader import build_model, load_model, to_torch_dtype
from engine.sequence import SamplingParams, Sequence


class ScheduledLike(Protocol):
    seq: Sequence
    num_new_tokens: int


class SchedulerOutputLike(Protocol):
    @property
    def scheduled(self) -> list[ScheduledLike]: ...


@dataclass
class StepInput:
    """One step's flattened batch; `sample_rows[j]` is the token row sequence `sample_seqs[j]`
    samples from (its last new token)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    context: ForwardContext
    sample_seqs: list[int]
    sample_rows: torch.Tensor


def resolve_backend(name: str) -> str:
    backend = "sdpa" if name == "auto" else name
    if backend not in BACKENDS:
        raise NotImplementedError(f"attention_backend={name!r} is not implemented yet "
                                  f"(available: auto, {', '.join(BACKENDS)})")
    return backend


class ModelRunner:
    def __init__(self, model_config: ModelConfig, engine_config: EngineConfig,
                 device: torch.device | str, model_path: str | Path | None = None):
        self.model_config = model_config
        self.config = engine_config
        self.device = torch.device(device)
        self.dtype = to_torch_dtype(engine_config.dtype)
        self.block_size = engine_config.block_size
        self.attention_backend = resolve_backend(engine_config.attention_backend)
        if model_path is None:
            self.model = build_model(model_config, self.dtype, self.device, engine_config.seed)
        else:
            self.model = load_model(model_path, self.dtype, self.device, model_config)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.sampler = Sampler(self._generator(engine_config.seed))
        self.kv_cache: torch.Tensor | None = None
        self._seeded: dict[int, tuple[Sequence, torch.Generator]] = {}

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(seed)

    # -- start-up ------------------------------------------------------------------------------

    @torch.inference_mode()
    def profile_run(self, num_tokens: int | None = None) -> int | None:
        """Peak activation bytes of a dummy step of `num_tokens` (default
        max_num_batched_tokens) tokens; None off CUDA.

        Like vLLM's dummy run: the tokens split evenly over min(max_num_seqs, tokens)
        sequences, no KV cache, then logits and sampling for one row per sequence.
        Call it before allocate_kv_cache, or the cache counts as activation.
        """
        num_tokens = num_tokens or self.config.max_num_batched_tokens
        num_seqs = min(self.config.max_num_seqs, num_tokens)
        lens = [num_tokens // num_seqs] * num_seqs
        lens[-1] += num_tokens % num_seqs
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._dummy_step(lens)
        if not cuda:
            return None
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - self.weight_bytes

    def _dummy_step(self, lens: list[int]) -> None:
        input_ids = torch.zeros(sum(lens), dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(n) for n in lens]).to(self.device)
        with forward_context(dense_context(lens)):
            hidden = self.model(input_ids, positions)
        last_rows = torch.tensor(list(accumulate(lens)), device=self.device) - 1
        logits = self.model.compute_logits(hidden[last_rows])
        params = [SamplingParams(temperature=0.7, top_k=50, top_p=0.9)] * len(lens)
        Sampler(self._generator(0))(logits, params)  # own generator: the engine's stays put

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """One [2, layers, num_blocks, block_size, kv_heads, head_dim] tensor, viewed per layer."""
        cfg = self.model_config
        shape = (2, len(self.attention_layers), num_blocks, self.block_size,
                 cfg.num_key_value_heads, cfg.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, attn in enumerate(self.attention_layers):
            attn.k_cache, attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]

    # -- one step ------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutputLike) -> list[int | None]:
        """One sampled token per scheduled sequence; None where the step ends mid-prefill."""
        scheduled = scheduler_output.scheduled
        if not scheduled:
            return []
        step = self.prepare_inputs(scheduled)
        logits = self.compute_step_logits(step)
        seqs = [scheduled[i].seq for i in step.sample_seqs]
        tokens = self.sampler(logits, [s.sampling_params for s in seqs], self._generators(seqs))
        sampled: list[int | None] = [None] * len(scheduled)
        for i, token in zip(step.sample_seqs, tokens.tolist(), strict=True):
            sampled[i] = token
        return sampled

    @torch.inference_mode()
    def compute_step_logits(self, step: StepInput) -> torch.Tensor:
        """Run the model on the step; float32 logits of the sampling rows [len(sample_seqs), V]."""
        if self.kv_cache is None:
            raise RuntimeError("allocate_kv_cache() must run before execute_model()")
        with forward_context(step.context):
            hidden = self.model(step.input_ids, step.positions)
        return self.model.compute_logits(hidden[step.sample_rows])

    def prepare_inputs(self, scheduled: list[ScheduledLike]) -> StepInput:
        seqs = [item.seq for item in scheduled]
        starts = [seq.num_computed_tokens for seq in seqs]
        num_new = [item.num_new_tokens for item in scheduled]
        ends = [s + n for s, n in zip(starts, num_new, strict=True)]
        query_start_loc = [0, *accumulate(num_new)]
        input_ids = list(chain.from_iterable(
            seq.token_ids[s:e] for seq, s, e in zip(seqs, starts, ends, strict=True)))
        positions, seq_index = token_positions(starts, num_new)
        block_tables = self._block_tables(seqs, ends)
        slot_mapping = block_tables[seq_index, positions // self.block_size].long() \
            * self.block_size + positions % self.block_size
        sample_seqs = [i for i, (seq, e) in enumerate(zip(seqs, ends, strict=True))
                       if e == seq.num_tokens]
        to_dev = self._to_device
        context = ForwardContext(
            query_start_loc=to_dev(torch.tensor(query_start_loc, dtype=torch.int32)),
            seq_lens=to_dev(torch.tensor(ends, dtype=torch.int32)),
            slot_mapping=to_dev(slot_mapping), block_tables=to_dev(block_tables),
            query_start_loc_cpu=query_start_loc, seq_lens_cpu=ends,
            all_slots_valid=bool((slot_mapping >= 0).all()))
        sample_rows = torch.tensor([query_start_loc[i + 1] - 1 for i in sample_seqs])
        return StepInput(to_dev(torch.tensor(input_ids, dtype=torch.long)), to_dev(positions),
                         context, sample_seqs, to_dev(sample_rows.long()))

    def _block_tables(self, seqs: list[Sequence], ends: list[int]) -> torch.Tensor:
        """[num_seqs, max blocks needed] int32, each row the blocks covering its first `end`
        tokens, padded with 0."""
        needed = [-(-end // self.block_size) for end in ends]
        table = torch.zeros(len(seqs), max(needed), dtype=torch.int32)
        for i, (seq, n) in enumerate(zip(seqs, needed, strict=True)):
            if len(seq.block_table) < n:
                raise ValueError(f"sequence {seq.request_id} needs {n} blocks for "
                                 f"{ends[i]} tokens but its block_table has "
                                 f"{len(seq.block_table)}")
            if ends[i] > seq.num_tokens:
                raise ValueError(f"sequence {seq.request_id} schedules tokens up to "
                                 f"{ends[i]} but has {seq.num_tokens}")
            table[i, :n] = torch.tensor(seq.block_table[:n], dtype=torch.int32)
        return table

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=True)

    def _generators(self, seqs: list[Sequence]) -> list[torch.Generator | None]:
        """Per-request generators for seeded, non-greedy requests, kept across steps."""
        self._seeded = {k: v for k, v in self._seeded.items() if not v[0].is_finished}
        generators: list[torch.Generator | None] = []
        for seq in seqs:
            params = seq.sampling_params
            if params.seed is None or params.greedy:
                generators.append(None)
                continue
            if seq.seq_id not in self._seeded:
                self._seeded[seq.seq_id] = (seq, self._generator(params.seed))
            generators.append(self._seeded[seq.seq_id][1])
        return generators


def token_positions(starts: list[int], num_new: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Position of every new token and the index of the sequence it belongs to (CPU, int64)."""
    counts = torch.tensor(num_new)
    seq_index = torch.repeat_interleave(torch.arange(len(num_new)), counts)
    first_row = torch.tensor([0, *accumulate(num_new)][:-1])
    offsets = torch.arange(int(counts.sum())) - first_row[seq_index]
    return torch.tensor(starts)[seq_index] + offsets, seq_index
