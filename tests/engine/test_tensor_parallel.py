"""Tensor parallelism on the CPU: gloo, 2 processes, the tiny models in float32.

In-process (no process group): the shards' shapes, KV-head replication, that every rank's
seeded weights are slices of the TP=1 model's and sum back to its outputs, loading an HF
checkpoint into a shard, int8 on a shard, the divisibility errors. Spawned (2 ranks):
greedy tokens at TP=2 equal TP=1's for requests sharing a prefix (prefix caching on), and each
rank's memory terms equal the twin's per-rank arithmetic.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.core.catalog import load_hardware, load_model
from engine.core.config import ConfigError, EngineConfig, ModelConfig, TensorParallelError
from engine.core.parallel import RankShapes, rank_weight_bytes
from engine.core.sequence import SamplingParams
from engine.layers.parallel import tensor_parallel
from engine.layers.quantization import quantize_linears
from engine.models.weights import export_hf_state_dict, load_hf_weights
from engine.runtime.distributed import available
from engine.runtime.loader import build_model
from sim.memory_model import predict_memory

TINY = ("tiny_qwen3", "tiny_llama")


def rank_models(name: str, tp: int, seed: int = 0) -> list[torch.nn.Module]:
    model = load_model(name)
    models = []
    for rank in range(tp):
        with tensor_parallel(rank, tp):
            models.append(build_model(model, "float32", "cpu", seed))
    return models


# -- shards, in process -----------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
def test_shard_shapes_at_tp2(name: str) -> None:
    cfg = load_model(name)
    (rank1,) = rank_models(name, 2)[1:]
    layer = rank1.model.layers[0]
    hd, h = cfg.head_dim, cfg.hidden_size  # 4 heads, 2 KV heads, intermediate 128
    assert layer.self_attn.qkv_proj.weight.shape == ((2 + 1 + 1) * hd, h)
    assert layer.self_attn.o_proj.weight.shape == (h, 2 * hd)
    assert layer.mlp.gate_up_proj.weight.shape == (2 * 64, h)
    assert layer.mlp.down_proj.weight.shape == (h, 64)
    assert rank1.model.embed_tokens.weight.shape == (256, h)
    assert rank1.lm_head.weight.shape == (256, h)
    assert layer.input_layernorm.weight.shape == (h,)  # replicated
    assert (layer.self_attn.num_heads, layer.self_attn.num_kv_heads) == (2, 1)
    assert (cfg.tie_word_embeddings
            == (rank1.lm_head.weight is rank1.model.embed_tokens.weight))
    own = sum(p.numel() * p.element_size() for p in rank1.parameters())
    assert own == rank_weight_bytes(cfg, 2, "float32")


def test_kv_heads_replicated_past_their_count() -> None:
    """TP=4 over 2 KV heads: one KV head a rank, ranks 0-1 hold head 0 and ranks 2-3 head 1
    (vLLM's QKVParallelLinear); the query heads are split."""
    full = rank_models("tiny_qwen3", 1)[0].model.layers[0].self_attn.qkv_proj.weight
    hd, q = 16, 4 * 16
    for rank, model in enumerate(rank_models("tiny_qwen3", 4)):
        w = model.model.layers[0].self_attn.qkv_proj.weight
        head = rank // 2
        assert w.shape == (3 * hd, 64)
        torch.testing.assert_close(w[:hd], full[rank * hd:(rank + 1) * hd], rtol=0, atol=0)
        k = full[q + head * hd:q + (head + 1) * hd]
        v = full[q + 2 * hd + head * hd:q + 2 * hd + (head + 1) * hd]
        torch.testing.assert_close(w[hd:2 * hd], k, rtol=0, atol=0)
        torch.testing.assert_close(w[2 * hd:], v, rtol=0, atol=0)
    assert RankShapes.of(load_model("tiny_qwen3"), 4).kv_head_replicas == 2


@pytest.mark.parametrize("name", TINY)
def test_rank_shards_sum_to_the_full_layers(name: str) -> None:
    """Column then row parallel: the ranks' partial outputs sum to the TP=1 layer's; the
    vocab-parallel embedding's and LM head's shards cover the vocabulary."""
    full = rank_models(name, 1)[0]
    ranks = rank_models(name, 2)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    mlp = full.model.layers[0].mlp
    partial = [F.linear(F.silu(g) * u, r.model.layers[0].mlp.down_proj.weight)
               for r in ranks
               for g, u in [r.model.layers[0].mlp.gate_up_proj(x).chunk(2, dim=-1)]]
    torch.testing.assert_close(sum(partial), mlp(x), rtol=1e-5, atol=1e-6)
    ids = torch.tensor([0, 255, 256, 511])
    rows = [F.embedding((ids - r.model.embed_tokens.start).clamp(0, 255),
                        r.model.embed_tokens.weight)
            * ((ids >= r.model.embed_tokens.start)
               & (ids < r.model.embed_tokens.start + 256))[:, None] for r in ranks]
    torch.testing.assert_close(sum(rows), full.model.embed_tokens(ids), rtol=0, atol=0)
    logits = torch.cat([F.linear(x, r.lm_head.weight) for r in ranks], dim=-1)
    torch.testing.assert_close(logits, full.compute_logits(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", TINY)
def test_checkpoint_loads_into_a_shard(name: str) -> None:
    """An HF-named full state dict loads into rank 1's shard as the seeded shard itself."""
    state = export_hf_state_dict(build_model(load_model(name), "float32", "cpu", seed=7))
    expected = rank_models(name, 2, seed=7)[1]
    with tensor_parallel(1, 2):
        shard = build_model(load_model(name), "float32", "cpu", seed=99)
    load_hf_weights(shard, state.items())
    for (n, a), (_, b) in zip(shard.named_parameters(), expected.named_parameters(),
                              strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


def test_int8_quantizes_each_shard() -> None:
    """int8 with TP: every rank quantizes its own shard (a row-parallel layer keeps a scale
    per output channel); the twin's per-rank int8 bytes are the shard's."""
    cfg = load_model("tiny_llama")
    (rank1,) = rank_models("tiny_llama", 2)[1:]
    quantize_linears(rank1)
    down = rank1.model.layers[0].mlp.down_proj
    assert down.weight.dtype == torch.int8 and down.weight_scale.shape == (64,)
    own = sum(p.numel() * p.element_size() for p in rank1.parameters())
    assert own == rank_weight_bytes(cfg, 2, "float32", "int8")


# -- configuration ----------------------------------------------------------------------------

def shape(heads: int, kv: int, inter: int = 128) -> ModelConfig:
    return ModelConfig("LlamaForCausalLM", 512, 64, inter, 2, heads, kv, 64 // heads, 2048)


@pytest.mark.parametrize("tp", [0, 3, 16, True, "2"])
def test_tensor_parallel_size_is_1_2_4_or_8(tp) -> None:
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=tp).validate()


@pytest.mark.parametrize(("model", "tp", "message"), [
    (shape(4, 2), 8, r"Total number of attention heads \(4\) must be divisible by tensor "
                     r"parallel size \(8\)\."),
    (shape(8, 6), 4, r"Total number of key-value heads \(6\) must be divisible by tensor "
                     r"parallel size \(4\)\."),
    (shape(8, 3), 4, r"Tensor parallel size \(4\) must be a multiple of the number of "
                     r"key-value heads \(3\)"),
    (shape(4, 4, inter=130), 4, r"intermediate_size \(130\) must be divisible"),
])
def test_divisibility_errors(model: ModelConfig, tp: int, message: str) -> None:
    with pytest.raises(TensorParallelError, match=message) as err:
        EngineConfig(tensor_parallel_size=tp, max_model_len=1024).validate(model)
    assert err.value.field == "tensor_parallel_size"


def test_fewer_kv_heads_than_ranks_is_accepted() -> None:
    model = load_model("tiny_qwen3")  # 2 KV heads: each replicated on 2 of the 4 ranks
    EngineConfig(tensor_parallel_size=4, max_model_len=1024).validate(model)


# -- two processes (gloo) ---------------------------------------------------------------------

needs_gloo = pytest.mark.skipif(not available("cpu"),
                                reason="torch.distributed with gloo is unavailable")
MAX_TOKENS = 8
ENGINE = dict(dtype="float32", device="cpu", max_model_len=256, max_num_seqs=8,
              max_num_batched_tokens=64, block_size=16, cpu_memory_gib=0.02,
              enable_prefix_caching=True)


def random_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


SYSTEM = random_tokens(40, seed=1)
PROMPTS = [SYSTEM + random_tokens(2 + 7 * i, seed=10 + i) for i in range(6)] \
    + [random_tokens(70, seed=30)]


@pytest.fixture(scope="module", params=["qwen3", "llama3"])
def runs(request, tmp_path_factory) -> dict:
    """The same HF checkpoint served at TP=1 and TP=2 (2 processes): tokens and memory."""
    from engine.runtime.llm import LLM
    from tests.engine.hf_tiny import hf_model, save_hf

    path: Path = save_hf(hf_model(request.param), tmp_path_factory.mktemp(request.param))
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    one = LLM(path, **ENGINE)
    tokens1 = [o.output_token_ids for o in one.generate(PROMPTS, greedy)]
    with LLM(path, tensor_parallel_size=2, **ENGINE) as two:
        outputs = two.generate(PROMPTS, greedy)
        result = {
            "path": path, "tp1": tokens1, "tp2": [o.output_token_ids for o in outputs],
            "cached": sum(o.metrics.num_cached_tokens for o in outputs),
            "report": two.memory_report(), "num_blocks": two.num_blocks,
            "kv_shape": tuple(two.model_runner.kv_cache.shape),
            "kv_bytes": two.model_runner.kv_cache.nbytes,
            "model": two.model_config, "config": two.config,
        }
    return result


@needs_gloo
def test_tp2_tokens_equal_tp1(runs: dict) -> None:
    assert runs["tp2"] == runs["tp1"]
    assert runs["cached"] > 0  # the shared prefix was served from the prefix cache
    assert len({tuple(t) for t in runs["tp1"]}) > 1  # not one trivial continuation


@needs_gloo
def test_twin_rank_memory_equals_the_engines(runs: dict) -> None:
    """Every rank's weights, activation and num_blocks, and the KV cache rank 0 allocated,
    as engine.core's per-rank arithmetic predicts them through the twin."""
    model, config = runs["model"], runs["config"]
    predicted = predict_memory(model, load_hardware("cpu"), config)
    ranks = runs["report"]["rank_memory"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["num_blocks"] for r in ranks] == predicted.rank_num_blocks
    assert runs["num_blocks"] == predicted.num_blocks == min(predicted.rank_num_blocks)
    assert ranks[0]["num_blocks"] < ranks[1]["num_blocks"]  # rank 0 samples: the minimum
    for rank in ranks:
        assert rank["weights_bytes"] == predicted.terms.weights_bytes
        assert rank["bytes_per_block"] == predicted.block_bytes
    assert ranks[0]["activation_peak_bytes"] == predicted.terms.activation_peak_bytes
    assert runs["kv_shape"] == (2, model.num_hidden_layers, predicted.num_blocks,
                                config.block_size, 1, model.head_dim)
    assert runs["kv_bytes"] == predicted.num_blocks * predicted.block_bytes
    assert runs["report"]["kv_heads_per_rank"] == predicted.parallel["kv_heads_per_rank"] == 1
