"""A tensor-parallel worker: ranks 1..n-1 of an LLMEngine with tensor_parallel_size n.

It joins the group, runs the same start-up as rank 0 (its shard of the model and of the KV
cache; num_blocks the minimum over the ranks), then, for each plan rank 0 broadcasts, runs the
forward pass on its shard: the all-reduces and the logits gather meet rank 0's. It never
schedules and never samples. A STOP plan ends it; an error is sent back to rank 0.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import Any

import torch

from engine.core.config import EngineConfig, ModelConfig
from engine.runtime.distributed import PlanChannel, close_tp, init_tp, rank_device
from engine.runtime.model_runner import ModelRunner
from engine.runtime.startup import start_runner


def worker_main(rank: int, size: int, port: int, model_config: ModelConfig,
                config: EngineConfig, model_path: str | Path | None, device_type: str,
                errors: Any) -> None:
    try:
        device = rank_device(torch.device(device_type), rank)
        if device.type == "cpu":  # the ranks share the host's cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
        init_tp(rank, size, port, device)
        torch.manual_seed(config.seed)
        started = start_runner(model_config, config, device,
                               None if model_path is None else str(model_path))
        serve_plans(started.runner, PlanChannel())
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        close_tp()


@torch.inference_mode()
def serve_plans(runner: ModelRunner, channel: PlanChannel) -> None:
    """Run the forward pass of every plan until STOP."""
    while (host := channel.recv()) is not None:
        runner.compute_step_logits(runner.upload(host))
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
