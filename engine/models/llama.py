"""Llama-family decoder (Llama 2/3.x, Mistral without sliding window), built from ModelConfig.

Parameter names follow HF's except for the fused projections: ``q_proj``/``k_proj``/``v_proj``
live in ``qkv_proj`` and ``gate_proj``/``up_proj`` in ``gate_up_proj`` (see
``packed_modules``, used by engine.models.weights).

Tensor parallel as Megatron and vLLM shard it (engine/layers/parallel_linear.py): q/k/v and
gate/up column-parallel, o and down row-parallel (each followed by an all-reduce), embedding
and LM head vocab-parallel; this process builds the shard of its rank (engine.layers.parallel).
At TP=1 the layers are the plain ones.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.core.config import ModelConfig
from engine.layers.activation import SiluAndMul
from engine.layers.attention import Attention
from engine.layers.kernels import dispatch
from engine.layers.norm import RMSNorm
from engine.layers.parallel_linear import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from engine.layers.rotary import RotaryEmbedding


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding, qk_norm: bool = False):
        super().__init__()
        self.head_dim = hd = config.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, hd, config.num_attention_heads,
                                          config.num_key_value_heads, config.attention_bias)
        self.num_heads = self.qkv_proj.num_heads  # this rank's
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.num_heads * hd, self.num_kv_heads * hd
        self.o_proj = RowParallelLinear(config.num_attention_heads * hd, config.hidden_size,
                                        bias=config.attention_bias)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(hd, config.rms_norm_eps) if qk_norm else None
        self.rotary_emb = rotary_emb  # one cos/sin cache shared by all layers
        self.attn = Attention(self.num_heads, self.num_kv_heads, hd, scale=hd ** -0.5)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v, stored = self.project(positions, hidden)
        return self.o_proj(self.attn(q, k, v, kv_stored=stored))

    def project(self, positions: torch.Tensor,
                hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """q, k, v for attention, and whether K/V are in the cache already (the fused
        kernel stores them where `kv_store` points)."""
        qkv = self.qkv_proj(hidden)
        v = qkv[:, self.q_size + self.kv_size:].view(-1, self.num_kv_heads, self.head_dim)
        if dispatch.use_triton(qkv):
            store = self.attn.kv_store()
            q, k = self._fused_qk(positions, qkv, store)
            return q, k, v, store is not None
        q, k = self._qk(positions, qkv)
        return q, k, v, False

    def _qk(self, positions: torch.Tensor, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q = qkv[:, :self.q_size].view(-1, self.num_heads, self.head_dim)
        k = qkv[:, self.q_size:self.q_size + self.kv_size].view(-1, self.num_kv_heads,
                                                                self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.rotary_emb(positions, q, k)

    def _fused_qk(self, positions: torch.Tensor, qkv: torch.Tensor,
                  store: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, ...]:
        """One kernel for q/k norm and RoPE, which also writes K/V to `store`, if given."""
        # Triton compiles at import: only the GPU path loads its kernels
        from engine.layers.kernels.elementwise import qk_norm_rope

        norm = (self.q_norm.weight, self.k_norm.weight) if self.q_norm is not None else None
        eps = self.q_norm.eps if self.q_norm is not None else 0.0
        rope = self.rotary_emb
        return qk_norm_rope(qkv, self.num_heads, self.num_kv_heads, rope.cos_cache,
                            rope.sin_cache, positions, norm, eps, store)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter])
        self.down_proj = RowParallelLinear(inter, config.hidden_size)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding, qk_norm: bool = False):
        super().__init__()
        self.self_attn = LlamaAttention(config, rotary_emb, qk_norm)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm.forward_with_residual(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm.forward_with_residual(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, qk_norm: bool = False):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        rotary_emb = RotaryEmbedding(config.head_dim, config.max_position_embeddings,
                                     config.rope_theta, config.rope_scaling)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, rotary_emb, qk_norm)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        if residual is None:
            return self.norm(hidden)
        return self.norm.forward_with_residual(hidden, residual)[0]


class LlamaForCausalLM(nn.Module):
    qk_norm = False
    packed_modules: dict[str, tuple[str, int]] = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, self.qk_norm)
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] over a flattened batch -> hidden states [T, hidden]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden: [N, hidden] -> logits [N, vocab] in the model's dtype. The sampler reads
        them in float32 itself: a float32 copy of a 256 x 151,936 batch costs a full extra
        write and read of it per decode step. At TP > 1: on rank 0, None on the others."""
        return self.lm_head(hidden)

    def ignores_checkpoint_tensor(self, name: str) -> bool:
        """Tensors a checkpoint may hold that this model derives or shares instead."""
        if name.endswith("rotary_emb.inv_freq"):
            return True
        return self.config.tie_word_embeddings and name == "lm_head.weight"


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral-7B-v0.3: the Llama architecture with full (not sliding-window) attention."""
