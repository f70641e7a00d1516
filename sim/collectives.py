"""Tensor parallelism in the step-time model: per-rank compute plus the all-reduces.

A step at TP = n runs every rank's shard of the forward pass at once, then sums partial
results: an all-reduce of [tokens, hidden] in the model dtype after each layer's attention
output projection and MLP down projection, and one after the vocab-parallel embedding
(`engine.core.parallel.allreduces_per_step`). So

    t_step = t_compute(rank shard) + allreduces_per_step x t_allreduce(tokens x hidden x bytes)

t_compute is the roofline over one rank's work (FLOPs and weight bytes divided over the ranks,
KV bytes of its KV heads: `rank_roofline`). t_allreduce comes from either
- `AllReduceRoofline`: t = latency + bytes x 2 (n - 1) / n / bus bandwidth (a ring moves
  2 (n - 1) / n of the buffer through each GPU's link; nccl-tests' busbw is defined so that
  this holds), the two numbers from the hardware catalog (NVLink entries, their sources);
- `AllReduceProfile`: all-reduce times measured at a list of sizes on the real GPUs
  (engine/tools/bench_tp.py), interpolated linearly in size, extended past the largest size
  at the bandwidth of the last interval. Format "kvtwin-allreduce/1", one JSON file per
  hardware and TP size under sim/profiles/allreduce/.

Not modelled: the logits gather to rank 0 (rows x vocab, once a step), overlap of
communication with compute, and the padded rows of graph buckets (the all-reduce is timed over
the step's tokens).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from engine.core.catalog import Hardware
from engine.core.config import DTYPE_BYTES, EngineConfig, ModelConfig
from engine.core.features import StepFeatures, StepRow
from engine.core.parallel import (
    allreduces_per_step,
)
from sim.step_time import DecodeRun, RooflineStepTime, StepTimeModel

ALLREDUCE_FORMAT = "kvtwin-allreduce/1"
ALLREDUCE_DIR = Path(__file__).resolve().parent / "profiles" / "allreduce"


class AllReduceModel(Protocol):
    source: str

    def seconds(self, nbytes: np.ndarray) -> np.ndarray:
        """Seconds of one all-reduce of each buffer size (bytes, float array)."""
        ...


@dataclass(frozen=True)
class AllReduceRoofline:
    """latency + bytes x 2 (n - 1) / n / bus bandwidth."""

    tp: int
    latency_s: float
    bus_bandwidth: float
    source: str = "all-reduce roofline"

    def seconds(self, nbytes: np.ndarray) -> np.ndarray:
        factor = 2.0 * (self.tp - 1) / self.tp
        return self.latency_s + nbytes * factor / self.bus_bandwidth

    @classmethod
    def of(cls, hardware: Hardware, tp: int) -> AllReduceRoofline:
        bw, lat = hardware.allreduce_bus_bandwidth_bytes_per_s, hardware.allreduce_latency_s
        if not bw > 0:
            raise ValueError(f"hardware {hardware.name!r} has no allreduce_bus_bandwidth_"
                             f"bytes_per_s: tensor_parallel_size={tp} needs a multi-GPU entry "
                             "(e.g. h100_80gb_x8) or an all-reduce profile")
        return cls(tp, lat, bw, f"all-reduce roofline of {hardware.name} (catalog: "
                   f"{lat * 1e6:g} us + bytes x {2 * (tp - 1)}/{tp} / {bw / 1e9:g} GB/s)")


@dataclass(frozen=True)
class AllReduceProfile:
    """Measured all-reduce times at increasing buffer sizes, at one TP size."""

    tp: int
    sizes_bytes: tuple[float, ...]
    seconds_at: tuple[float, ...]
    hardware: str = ""
    dtype: str = "bfloat16"
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    source: str = field(default="all-reduce profile", compare=False)

    def __post_init__(self) -> None:
        sizes = np.asarray(self.sizes_bytes, dtype=float)
        if len(sizes) < 2 or len(sizes) != len(self.seconds_at) or np.any(np.diff(sizes) <= 0):
            raise ValueError("an all-reduce profile needs >= 2 sizes, strictly increasing, "
                             "one time each")

    def seconds(self, nbytes: np.ndarray) -> np.ndarray:
        sizes, secs = np.asarray(self.sizes_bytes), np.asarray(self.seconds_at)
        slope = (secs[-1] - secs[-2]) / (sizes[-1] - sizes[-2])
        inside = np.interp(nbytes, sizes, secs)
        return np.where(nbytes > sizes[-1], secs[-1] + (nbytes - sizes[-1]) * slope, inside)

    def to_dict(self) -> dict[str, Any]:
        return {"format": ALLREDUCE_FORMAT, "hardware": self.hardware, "tp": self.tp,
                "dtype": self.dtype, "sizes_bytes": list(self.sizes_bytes),
                "seconds": list(self.seconds_at), "meta": dict(self.meta)}

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> AllReduceProfile:
        data = json.loads(Path(path).read_text())
        if data.get("format") != ALLREDUCE_FORMAT:
            raise ValueError(f"{path}: format={data.get('format')!r} is invalid: must be "
                             f"{ALLREDUCE_FORMAT!r}")
        return cls(int(data["tp"]), tuple(map(float, data["sizes_bytes"])),
                   tuple(map(float, data["seconds"])), str(data.get("hardware", "")),
                   str(data.get("dtype", "bfloat16")), dict(data.get("meta") or {}),
                   source=f"all-reduce profile {Path(path).name}")


def allreduce_profile_path(hardware_key: str, tp: int,
                           directory: Path = ALLREDUCE_DIR) -> Path:
    return directory / f"{hardware_key}__tp{tp}.json"


def allreduce_model(hardware: Hardware, hardware_key: str, tp: int,
                    directory: Path = ALLREDUCE_DIR) -> AllReduceModel:
    """The measured profile for this hardware and TP size when one exists, else the roofline."""
    path = allreduce_profile_path(hardware_key, tp, directory)
    if path.is_file():
        return AllReduceProfile.load(path)
    return AllReduceRoofline.of(hardware, tp)


def rank_roofline(model: ModelConfig, hardware: Hardware, config: EngineConfig) -> RooflineStepTime:
    """The roofline of one rank's shard (its FLOPs and bytes), the catalog's peaks per GPU."""
    tp = config.tensor_parallel_size
    return RooflineStepTime(model, config.dtype, hardware.peak_bf16_flops,
                            hardware.hbm_bandwidth_bytes_per_s,
                            source=f"roofline of one {hardware.name} rank of TP={tp} "
                                   "(catalog peaks, documented efficiencies)",
                            quantization=config.quantization, kv_dtype=config.kv_dtype, tp=tp)


class TensorParallelStepTime:
    """`compute` (one rank's step) plus the step's all-reduces; `predict`, `step` and
    `decode_run` stay bit-identical to each other (the same float operations per step)."""

    def __init__(self, compute: StepTimeModel, comm: AllReduceModel, model: ModelConfig,
                 dtype: str, tp: int):
        self.compute, self.comm, self.tp = compute, comm, tp
        self.count = float(allreduces_per_step(model))
        self.token_bytes = float(model.hidden_size * DTYPE_BYTES[dtype])
        self.kind = compute.kind
        self.source = f"{compute.source}; + {int(self.count)} all-reduces a step: {comm.source}"
        self.reads_longest = compute.reads_longest
        self.reads_shared = compute.reads_shared

    def comm_seconds(self, num_tokens: np.ndarray) -> np.ndarray:
        """Seconds of a step's all-reduces, for steps of `num_tokens` tokens."""
        nbytes = np.asarray(num_tokens, dtype=float) * self.token_bytes
        return self.count * self.comm.seconds(nbytes)

    def predict(self, features: StepFeatures, first_step: int = 0) -> np.ndarray:
        return self.compute.predict(features, first_step) + self.comm_seconds(
            features.num_tokens)

    def step(self, row: StepRow, index: int = 0) -> float:
        comm = self.comm_seconds(np.array([row.prefill_tokens + row.decode_seqs]))
        return self.compute.step(row, index) + float(comm[0])

    def decode_run(self, run: DecodeRun, first_step: int = 0) -> np.ndarray:
        comm = self.comm_seconds(np.full(run.num_steps, run.num_seqs))
        return self.compute.decode_run(run, first_step) + comm


def tensor_parallel_step_time(model: ModelConfig, hardware: Hardware, hardware_key: str,
                              config: EngineConfig,
                              directory: Path = ALLREDUCE_DIR) -> TensorParallelStepTime:
    """The twin's step time at TP > 1: one rank's roofline plus the all-reduces."""
    tp = config.tensor_parallel_size
    comm = allreduce_model(hardware, hardware_key, tp, directory)
    return TensorParallelStepTime(rank_roofline(model, hardware, config), comm, model,
                                  config.dtype, tp)
