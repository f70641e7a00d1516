"""ModelRunner: owns the model and its paged KV cache, turns a scheduler step into tokens."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from engine.core.config import ConfigError, EngineConfig, ModelConfig
from engine.core.memory import blocks_per_request
from engine.core.parallel import RankShapes
from engine.core.sequence import SamplingParams, Sequence
from engine.core.shapes import (
    SAMPLE_MULTIPLE,
    graph_buckets,
    padded_len,
    step_rows,
    token_buckets,
)
from engine.layers.attention import Attention
from engine.layers.attention_backends import (
    FLASH_ATTN_BLOCK_MULTIPLE,
    dense_metadata,
    flash_attn_available,
)
from engine.layers.context import ForwardContext, PagedMetadata, dense_context, forward_context
from engine.layers.host import to_device
from engine.layers.kv_quant import kv_torch_dtype
from engine.layers.linear import Linear
from engine.layers.parallel import get_tp
from engine.layers.sampler import Sampler
from engine.runtime.decode_graphs import DecodeGraphs
from engine.runtime.loader import build_model, load_model, to_torch_dtype
from engine.runtime.mixed_graphs import MixedGraphs
from engine.runtime.step_input import (
    BlockTables,
    HostBatch,
    ScheduledLike,
    build_host_batch,
    pad_tail,
)


class SchedulerOutputLike(Protocol):
    @property
    def scheduled(self) -> list[ScheduledLike]: ...


@dataclass
class StepInput:
    """One step's flattened batch on the device; `sample_rows[j]` is the token row scheduled
    item `sample_seqs[j]` samples from (its last new token). A step that replays a CUDA graph
    has no input tensors here: the graph's static buffers take `host`'s arrays."""

    input_ids: torch.Tensor | None
    positions: torch.Tensor | None
    context: ForwardContext
    sample_seqs: list[int]
    sample_rows: torch.Tensor
    host: HostBatch


InputFill = Callable[[torch.Tensor], None]


class LaunchedStep:
    """A step queued on the device. `tokens` (device) holds one token per sampling item,
    in `sample_seqs` order; `sampled()` waits for them and returns one per scheduled item
    (None where the step ends mid-prefill). It returns once all the step's kernels are done,
    also when nothing is sampled, so a step's wall time holds its own device time."""

    def __init__(self, num_scheduled: int, sample_seqs: list[int], tokens: torch.Tensor):
        self.num_scheduled = num_scheduled
        self.sample_seqs = sample_seqs
        self.tokens = tokens
        self._read = _read_back(tokens)

    def sampled(self) -> list[int | None]:
        out: list[int | None] = [None] * self.num_scheduled
        for i, token in zip(self.sample_seqs, self._read(), strict=True):
            out[i] = token
        return out


def _read_back(tokens: torch.Tensor) -> Callable[[], list[int]]:
    """Start copying `tokens` to pinned host memory; the returned call waits for the copy."""
    if tokens.device.type != "cuda":
        return tokens.tolist
    host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
    host.copy_(tokens, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def wait() -> list[int]:
        done.synchronize()
        return host.tolist()
    return wait


def resolve_backend(name: str, device: torch.device, block_size: int,
                    kv_cache_dtype: str = "auto") -> str:
    """`auto`: flash_attn when importable (and its page size fits, and the cache is in the
    model dtype), else torch on CUDA, sdpa on the CPU."""
    if device.type != "cuda":
        if name not in ("auto", "sdpa"):
            raise ConfigError("attention_backend", name, "auto or sdpa on the CPU "
                              "(torch and flash_attn need CUDA)")
        return "sdpa"
    flash_ok = flash_attn_available() and block_size % FLASH_ATTN_BLOCK_MULTIPLE == 0
    if kv_cache_dtype == "fp8":
        if name == "flash_attn":
            raise ConfigError("kv_cache_dtype", kv_cache_dtype, "auto with attention_backend="
                              "flash_attn (its paged kernel reads no fp8 cache)")
        check_fp8_device(device)
        flash_ok = False
    if name == "auto":
        return "flash_attn" if flash_ok else "torch"
    if name == "flash_attn" and not flash_attn_available():
        raise ConfigError("attention_backend", name, "auto, sdpa or torch: the flash_attn "
                          "package is not installed (pip install kvtwin[flash])")
    if name == "flash_attn" and not flash_ok:
        raise ConfigError("block_size", block_size, "a multiple of 256 with "
                          "attention_backend=flash_attn (its paged-KV page size)")
    return name


def check_fp8_device(device: torch.device) -> None:
    """The Triton kernels convert float8 e4m3 natively from compute capability 8.9 on."""
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise ConfigError("kv_cache_dtype", "fp8", "auto on a GPU of compute capability "
                          f"{capability[0]}.{capability[1]} (fp8 needs 8.9 or later)")


class ModelRunner:
    def __init__(self, model_config: ModelConfig, engine_config: EngineConfig,
                 device: torch.device | str, model_path: str | Path | None = None):
        self.model_config = model_config
        self.config = engine_config
        self.device = torch.device(device)
        self.dtype = to_torch_dtype(engine_config.dtype)
        self.block_size = engine_config.block_size
        self.kv_dtype = kv_torch_dtype(engine_config.kv_dtype, self.dtype)
        self.attention_backend = resolve_backend(engine_config.attention_backend, self.device,
                                                 self.block_size, engine_config.kv_cache_dtype)
        quantization = engine_config.quantization
        if model_path is None:
            self.model = build_model(model_config, self.dtype, self.device, engine_config.seed,
                                     quantization)
        else:
            self.model = load_model(model_path, self.dtype, self.device, model_config,
                                    quantization)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        # Per layer, the K and V scales of an fp8 cache (engine/layers/kv_quant.py): 1.0.
        self.kv_scales = torch.ones(2, len(self.attention_layers), 1, device=self.device)
        for i, attn in enumerate(self.attention_layers):
            attn.backend = self.attention_backend
            attn.kv_scales = (self.kv_scales[0, i], self.kv_scales[1, i])
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.sampler = Sampler(self._generator(engine_config.seed))
        self.kv_cache: torch.Tensor | None = None
        self.block_tables = BlockTables(self.block_size)
        self.graphs: DecodeGraphs | None = None
        self.mixed: MixedGraphs | None = None
        self._seeded: dict[int, tuple[Sequence, torch.Generator]] = {}
        # Tensor parallelism, rank 0: where each step's plan goes to the other ranks
        # (engine.runtime.distributed.PlanChannel); None at TP=1 and on the other ranks.
        self.plan_channel = None

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(seed)

    @property
    def uses_cuda_graphs(self) -> bool:
        """Graphs need CUDA and a backend whose metadata lives on the device."""
        return (self.device.type == "cuda" and not self.config.enforce_eager
                and self.attention_backend != "sdpa")

    @property
    def cuda_graphs_enabled(self) -> bool:
        return self.graphs is not None and bool(self.graphs.graphs)

    @property
    def mixed_graph_buckets(self) -> list[int]:
        """Token counts whose mixed steps replay CUDA graphs (empty: none)."""
        return sorted(self.mixed.graphs) if self.mixed is not None else []

    # -- start-up ------------------------------------------------------------------------------

    @torch.inference_mode()
    def profile_run(self, num_tokens: int | None = None) -> int | None:
        """Peak activation bytes of a dummy step of `num_tokens` (default
        max_num_batched_tokens) tokens; None off CUDA.

        Like vLLM's dummy run: the tokens split evenly over min(max_num_seqs, tokens)
        sequences, no KV cache, then logits and sampling for one row per sequence.
        Call it before allocate_kv_cache, or the cache counts as activation.
        """
        lens = self._dummy_lens(num_tokens or self.config.max_num_batched_tokens)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._dummy_step(lens)
        if not cuda:
            return None
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - self.weight_bytes

    @property
    def pads_rows(self) -> bool:
        """Whether eager steps pad their rows (the varlen backends; see TOKEN_MULTIPLE)."""
        return self.attention_backend != "sdpa"

    def eager_rows(self, num_tokens: int) -> int:
        """Rows a non-graph-decode step runs: its mixed-graph bucket, else padded for cuBLAS
        (engine.core.shapes.step_rows, the twin's rule too)."""
        if not self.pads_rows:
            return num_tokens
        buckets = self.mixed.buckets if self.mixed is not None else None
        return step_rows(num_tokens, buckets, self.config.max_num_batched_tokens)

    def sample_rows_padded(self, num_samples: int) -> int:
        return padded_len(num_samples, SAMPLE_MULTIPLE) if self.pads_rows else num_samples

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Untimed, once the cache and the graphs are in place: every linear layer's GEMM at
        every padded row count an eager step can have, the LM head's at every padded sample
        count, so that no timed step waits for cuBLAS to choose a kernel. CUDA only."""
        if self.device.type != "cuda" or not self.pads_rows:
            return
        layers = {(tuple(m.weight.shape), m.weight.dtype): m for m in self.model.modules()
                  if isinstance(m, Linear) and m.weight.dim() == 2}
        head = self.model.lm_head.weight
        width = max(m.in_features for m in layers.values())
        x = torch.zeros(self.config.max_num_batched_tokens, width, dtype=self.dtype,
                        device=self.device)
        counts = sorted({self.eager_rows(n) for n in
                         range(1, self.config.max_num_batched_tokens + 1)})
        for rows in counts:  # int8 layers: their Triton kernel compiles per row bucket
            for layer in layers.values():
                layer(x[:rows, :layer.in_features])
        for rows in sorted({self.sample_rows_padded(n)
                            for n in range(1, self.config.max_num_seqs + 1)}):
            torch.nn.functional.linear(x[:rows, :head.shape[1]], head)
        torch.cuda.synchronize(self.device)

    def _dummy_lens(self, num_tokens: int) -> list[int]:
        """`num_tokens` split evenly over min(max_num_seqs, num_tokens) sequences."""
        num_seqs = min(self.config.max_num_seqs, num_tokens)
        lens = [num_tokens // num_seqs] * num_seqs
        lens[-1] += num_tokens % num_seqs
        return lens

    def _dummy_step(self, lens: list[int]) -> None:
        input_ids = torch.zeros(sum(lens), dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(n) for n in lens]).to(self.device)
        context = dense_context(lens)
        if self.attention_backend != "sdpa":
            context.paged = dense_metadata(lens, self.device)
        with forward_context(context):
            hidden = self.model(input_ids, positions)
        last_rows = torch.tensor(list(accumulate(lens)), device=self.device) - 1
        logits = self.model.compute_logits(hidden[last_rows])
        if logits is None:  # TP > 1: only rank 0 samples
            return
        params = [SamplingParams(temperature=0.7, top_k=50, top_p=0.9)] * len(lens)
        Sampler(self._generator(0))(logits, params)  # own generator: the engine's stays put

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """One [2, layers, num_blocks, block_size, kv_heads, head_dim] tensor in the KV dtype,
        viewed per layer; the KV heads this rank holds (all of them at TP=1)."""
        cfg = self.model_config
        kv_heads = RankShapes.of(cfg, get_tp().size).num_kv_heads
        shape = (2, len(self.attention_layers), num_blocks, self.block_size, kv_heads,
                 cfg.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        for i, attn in enumerate(self.attention_layers):
            attn.k_cache, attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]

    def release_kv_cache(self) -> None:
        self.kv_cache = None
        for attn in self.attention_layers:
            attn.k_cache = attn.v_cache = torch.empty(0)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def capture_cuda_graphs(self, buckets: list[int] | None = None,
                            token_counts: list[int] | None = None) -> int:
        """Capture the decode graphs, then the graphs of mixed steps in the same
        pool (after allocate_kv_cache); returns the device memory they took (the pool and
        the static buffers). `buckets` / `token_counts`: capture only these."""
        if not self.uses_cuda_graphs:
            return 0
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # capture empties the cache too: do it before measuring
        free_before = torch.cuda.mem_get_info(self.device)[0]
        max_blocks = blocks_per_request(self.config.max_model_len, self.block_size)
        self.graphs = DecodeGraphs(self.model, graph_buckets(self.config.max_num_seqs),
                                   max_blocks, self.model_config.hidden_size, self.dtype,
                                   self.device)
        self.graphs.capture(buckets)
        self.mixed = self.new_mixed_graphs(self.graphs.pool)
        if self.mixed is not None:
            self.mixed.capture(token_counts)
        return max(0, free_before - torch.cuda.mem_get_info(self.device)[0])

    def new_mixed_graphs(self, pool: tuple[int, int] | None = None) -> MixedGraphs | None:
        """Static buffers for mixed steps up to the token limit (None: no limit)."""
        limit = self.config.cudagraph_token_limit
        if not limit:
            return None
        max_blocks = blocks_per_request(self.config.max_model_len, self.block_size)
        return MixedGraphs(self.model, token_buckets(limit), self.config.max_num_seqs,
                           max_blocks, self.model_config.hidden_size, self.dtype, self.device,
                           pool)

    def release_cuda_graphs(self) -> None:
        self.graphs = None
        self.mixed = None
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()

    # -- one step ------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutputLike) -> list[int | None]:
        """One sampled token per scheduled sequence; None where the step ends mid-prefill."""
        scheduled = scheduler_output.scheduled
        if not scheduled:
            return []
        return self.launch(scheduled, self.build_host(scheduled)).sampled()

    def build_host(self, scheduled: list[ScheduledLike]) -> HostBatch:
        """The step's flattened batch on the host (numpy; no device work)."""
        gather = self.attention_backend != "sdpa" and not self._mixed_covers(scheduled)
        return build_host_batch(scheduled, self.block_tables, gather_prefix=gather)

    def _mixed_covers(self, scheduled: list[ScheduledLike]) -> bool:
        """Whether the step will replay a mixed graph (which reads keys from the cache)."""
        if self.mixed is None:
            return False
        lens = [item.num_new_tokens for item in scheduled]
        return self.mixed.serves(sum(lens), len(lens), all(n == 1 for n in lens))

    @torch.inference_mode()
    def launch(self, scheduled: list[ScheduledLike], host: HostBatch,
               fill: InputFill | None = None) -> LaunchedStep:
        """Queue the step's forward pass and sampling on the device without waiting for them;
        the tokens come back through `LaunchedStep.sampled()`. At TP > 1 the plan goes to
        the other ranks first, which run the same forward pass."""
        if self.plan_channel is not None:
            self.plan_channel.send(host)
        step = self.upload(host)
        logits = self.compute_step_logits(step, fill)
        seqs = [scheduled[i].seq for i in step.sample_seqs]
        tokens = self.sampler(logits, [s.sampling_params for s in seqs], self._generators(seqs))
        self.block_tables.retain([item.seq for item in scheduled])
        return LaunchedStep(len(scheduled), step.sample_seqs, tokens)

    @torch.inference_mode()
    def compute_step_logits(self, step: StepInput,
                            fill: InputFill | None = None) -> torch.Tensor | None:
        """Run the model on the step; logits of the sampling rows [len(sample_seqs), V].
        `fill` writes device-resident token ids into the step's input ids first. At TP > 1
        the logits are rank 0's; the other ranks get None."""
        if self.kv_cache is None:
            raise RuntimeError("allocate_kv_cache() must run before execute_model()")
        bucket = self._graph_bucket(step.host)
        if bucket is not None:
            self.graphs.load(step.host, bucket)
            if fill is not None:
                fill(self.graphs.input_ids)
            hidden = self.graphs.replay(bucket, step.host.num_tokens)
        elif self._runs_mixed(step.host):
            hidden = self.mixed.run(step.host, fill)
        else:
            if fill is not None:
                fill(step.input_ids)
            with forward_context(step.context):
                hidden = self.model(step.input_ids, step.positions)
        logits = self.model.compute_logits(hidden[step.sample_rows])
        if logits is None:
            return None
        return logits[:len(step.sample_seqs)]  # the rest: padding rows

    def _runs_mixed(self, host: HostBatch) -> bool:
        return self.mixed is not None and self.mixed.covers(host)

    def _graph_bucket(self, host: HostBatch) -> int | None:
        if self.graphs is None or not host.is_decode_only:
            return None
        return self.graphs.bucket(host.num_decodes)

    def prepare_inputs(self, scheduled: list[ScheduledLike]) -> StepInput:
        return self.upload(self.build_host(scheduled))

    def upload(self, host: HostBatch) -> StepInput:
        """The device side of a host batch (nothing to copy for a graph-replay step: the
        graph's own buffers take the inputs)."""
        rows = np.asarray(host.sample_rows, dtype=np.int64)
        sample_rows = self._to_device(pad_tail(rows, self.sample_rows_padded(len(rows)), 0))
        if self._graph_bucket(host) is not None or self._runs_mixed(host):
            return StepInput(None, None, ForwardContext(), host.sample_seqs, sample_rows, host)
        to_dev = self._to_device
        num_rows = self.eager_rows(host.num_tokens)  # rows past num_tokens: padding
        slots = pad_tail(host.slot_mapping, num_rows, -1)
        context = ForwardContext(
            query_start_loc=to_dev(np.asarray(host.query_start_loc, dtype=np.int32)),
            seq_lens=to_dev(np.asarray(host.seq_lens, dtype=np.int32)),
            slot_mapping=to_dev(slots), block_tables=to_dev(host.block_tables),
            query_start_loc_cpu=host.query_start_loc, seq_lens_cpu=host.seq_lens,
            all_slots_valid=bool((slots >= 0).all()))
        if self.attention_backend != "sdpa":
            context.paged = self._paged_metadata(host, context)
        return StepInput(to_dev(pad_tail(host.input_ids, num_rows, 0)),
                         to_dev(pad_tail(host.positions, num_rows, 0)), context,
                         host.sample_seqs, sample_rows, host)

    def _paged_metadata(self, host: HostBatch, context: ForwardContext) -> PagedMetadata:
        nd, qsl = host.num_decodes, host.query_start_loc
        prefill_q = [e - s for s, e in zip(qsl[nd:-1], qsl[nd + 1:], strict=True)]
        prefill_k = host.seq_lens[nd:] if host.prefill_kv_slots is not None else prefill_q
        cu = [np.asarray([0, *accumulate(x)], dtype=np.int32) for x in (prefill_q, prefill_k)]
        kv_slots = host.prefill_kv_slots
        return PagedMetadata(
            num_decodes=nd, decode_seq_lens=context.seq_lens[:nd],
            decode_block_tables=context.block_tables[:nd],
            decode_order=self._to_device(host.decode_order()) if nd else None,
            prefill_cu_q=self._to_device(cu[0]), prefill_cu_k=self._to_device(cu[1]),
            prefill_max_q=max(prefill_q, default=0), prefill_max_k=max(prefill_k, default=0),
            prefill_kv_slots=None if kv_slots is None else self._to_device(kv_slots))

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return to_device(array, self.device)

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
