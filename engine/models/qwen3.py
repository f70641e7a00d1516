"""Qwen3: the Llama decoder plus a per-head RMSNorm on q and k before RoPE."""

from __future__ import annotations

from engine.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
