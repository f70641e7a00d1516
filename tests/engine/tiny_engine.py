"""The tiny Qwen3 engine on the CPU beside the twin's memory prediction for the same
configuration (the int8 and fp8 tests compare the two)."""

from __future__ import annotations

from typing import Any

from engine.core.catalog import load_hardware, load_model
from engine.core.config import EngineConfig
from engine.runtime.llm import LLM
from sim.memory_model import MemoryPrediction, predict_memory


def engine_beside_twin(**fields: Any) -> tuple[LLM, dict[str, Any], MemoryPrediction]:
    """(engine, its memory report, the twin's prediction) for a small float32 CPU engine."""
    config = EngineConfig(dtype="float32", device="cpu", max_model_len=256,
                          max_num_batched_tokens=256, max_num_seqs=8, **fields)
    llm = LLM(load_model("tiny_qwen3"), config)
    predicted = predict_memory(load_model("tiny_qwen3"), load_hardware("cpu"), config)
    return llm, llm.memory_report(), predicted
