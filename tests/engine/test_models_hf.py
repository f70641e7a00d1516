"""Our Qwen3 / Llama / Mistral against HF transformers on tiny fp32 models (CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.core.config import ModelConfig
from engine.layers.context import dense_context, forward_context
from engine.layers.rotary import compute_inv_freq, default_inv_freq
from engine.models import get_model_class
from engine.models.weights import WeightLoadError, export_hf_state_dict, load_hf_weights
from engine.runtime.loader import (
    build_model,
    create_model,
    iter_safetensors,
    load_model,
    read_model_config,
)
from tests.engine.hf_tiny import LLAMA3_SCALING, hf_logits, hf_model, save_hf

KINDS = ["qwen3", "llama3", "mistral"]
ATOL = 1e-4
PROMPT_LENS = [1, 7, 33, 200]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[object, Path]]:
    """kind -> (HF model, folder it was saved to)."""
    out = {}
    for kind in KINDS:
        model = hf_model(kind)
        out[kind] = (model, save_hf(model, tmp_path_factory.mktemp(kind)))
    return out


def prompts(vocab: int, lens: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


@torch.no_grad()
def our_logits(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    ids = torch.tensor(token_ids)
    return model.compute_logits(model(ids, torch.arange(len(ids))))


@pytest.mark.parametrize("kind", KINDS)
def test_loaded_model_matches_hf_logits(saved: dict, kind: str) -> None:
    hf, path = saved[kind]
    ours = load_model(path, "float32", "cpu")
    assert type(ours).__name__ == type(hf).__name__
    for token_ids in prompts(512, PROMPT_LENS):
        torch.testing.assert_close(our_logits(ours, token_ids), hf_logits(hf, token_ids),
                                   atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_flattened_batch_of_prompts_matches_hf(saved: dict, kind: str) -> None:
    """Several prompts in one forward: attention must not leak across sequences."""
    hf, path = saved[kind]
    ours = load_model(path, "float32", "cpu")
    batch = prompts(512, [5, 1, 40, 12], seed=2)
    ids = torch.tensor([t for p in batch for t in p])
    positions = torch.cat([torch.arange(len(p)) for p in batch])
    with torch.no_grad(), forward_context(dense_context([len(p) for p in batch])):
        logits = ours.compute_logits(ours(ids, positions))
    for token_ids, got in zip(batch, logits.split([len(p) for p in batch]), strict=True):
        torch.testing.assert_close(got, hf_logits(hf, token_ids), atol=ATOL, rtol=0)


def test_llama3_scaling_is_read_and_matters(saved: dict) -> None:
    """The llama3 test model really exercises rope scaling: without it, logits differ."""
    hf, path = saved["llama3"]
    config = read_model_config(path)
    assert config.rope_scaling["rope_type"] == "llama3"
    assert config.rope_scaling["factor"] == LLAMA3_SCALING["factor"]
    config.rope_scaling = None
    unscaled = create_model(config, "float32", "cpu")
    load_hf_weights(unscaled, iter_safetensors(path))
    token_ids = prompts(512, [200])[0]
    diff = (our_logits(unscaled, token_ids) - hf_logits(hf, token_ids)).abs().max()
    assert diff > 100 * ATOL


def test_llama3_frequencies_cover_all_three_bands() -> None:
    base = default_inv_freq(16, 500000.0)
    scaled = compute_inv_freq(16, 500000.0, LLAMA3_SCALING)
    ratio = (base / scaled).tolist()
    assert ratio[0] == pytest.approx(1.0)  # short wavelength: kept
    assert all(r == pytest.approx(8.0) for r in ratio[2:])  # long wavelength: / factor
    assert 1.0 < ratio[1] < 8.0  # in between: blended
    with pytest.raises(NotImplementedError, match="yarn"):
        compute_inv_freq(16, 10000.0, {"rope_type": "yarn", "factor": 4.0})


def test_sharded_checkpoint_loads(tmp_path: Path) -> None:
    hf = hf_model("qwen3")
    path = save_hf(hf, tmp_path, max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 1
    ours = load_model(path, "float32", "cpu")
    token_ids = prompts(512, [20])[0]
    torch.testing.assert_close(our_logits(ours, token_ids), hf_logits(hf, token_ids),
                               atol=ATOL, rtol=0)


def _rewrite(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(str(src / "model.safetensors"))
    save_file(edit(tensors), str(dst / "model.safetensors"))
    return dst


def test_loader_names_missing_and_unexpected_tensors(saved: dict, tmp_path: Path) -> None:
    _, path = saved["llama3"]
    gone = "model.layers.1.self_attn.k_proj.weight"

    def edit(tensors: dict) -> dict:
        tensors.pop(gone)
        tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
        return tensors

    broken = _rewrite(path, tmp_path / "broken", edit)
    with pytest.raises(WeightLoadError, match=gone) as info:
        load_model(broken, "float32", "cpu")
    assert info.value.missing == [gone]
    assert info.value.unexpected == ["model.layers.0.mlp.extra.weight"]


def test_loader_names_shape_mismatch(saved: dict, tmp_path: Path) -> None:
    _, path = saved["qwen3"]
    name = "model.layers.0.mlp.up_proj.weight"

    def edit(tensors: dict) -> dict:
        tensors[name] = tensors[name][:-1]
        return tensors

    broken = _rewrite(path, tmp_path / "broken", edit)
    with pytest.raises(WeightLoadError, match="up_proj") as info:
        load_model(broken, "float32", "cpu")
    assert info.value.mismatched == [f"{name} (127, 64)"]
    assert info.value.missing == [name]


def test_tied_checkpoint_has_no_lm_head_and_untied_requires_it(saved: dict) -> None:
    qwen_keys = load_file(str(saved["qwen3"][1] / "model.safetensors")).keys()
    assert "lm_head.weight" not in qwen_keys
    ours = load_model(saved["qwen3"][1], "float32", "cpu")
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    llama = load_model(saved["llama3"][1], "float32", "cpu")
    assert llama.lm_head.weight.data_ptr() != llama.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("kind", KINDS)
def test_seeded_init_is_deterministic(saved: dict, kind: str) -> None:
    config = read_model_config(saved[kind][1])
    a, b = (build_model(config, "float32", "cpu", seed=7) for _ in range(2))
    c = build_model(config, "float32", "cpu", seed=8)
    state_a, state_b, state_c = a.state_dict(), b.state_dict(), c.state_dict()
    assert state_a.keys() == state_b.keys()
    for name, tensor in state_a.items():
        assert torch.equal(tensor, state_b[name]), name
        if "norm" in name:
            assert torch.equal(tensor, torch.ones_like(tensor)), name
        else:
            assert not torch.equal(tensor, state_c[name]), name
            assert 0.015 < tensor.std().item() < 0.025, name


def test_seeded_init_is_the_same_in_every_process(saved: dict) -> None:
    """Pinned values: a change of init order or rule shows here, not only across seeds."""
    config = read_model_config(saved["qwen3"][1])
    model = build_model(config, "float32", "cpu", seed=0)
    fresh = torch.Generator().manual_seed(0)
    expected = torch.empty(512, 64).normal_(0.0, 0.02, generator=fresh)
    torch.testing.assert_close(model.model.embed_tokens.weight, expected, atol=0, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_exported_weights_load_into_hf(saved: dict, kind: str) -> None:
    """Seeded weights -> HF names -> HF model: same logits (the reverse direction)."""
    hf_ref, path = saved[kind]
    config = read_model_config(path)
    ours = build_model(config, "float32", "cpu", seed=3)
    hf = type(hf_ref)(hf_ref.config).eval()
    missing, unexpected = hf.load_state_dict(export_hf_state_dict(ours), strict=False)
    assert unexpected == []
    assert missing == (["lm_head.weight"] if config.tie_word_embeddings else [])
    for token_ids in prompts(512, [9, 64], seed=4):
        torch.testing.assert_close(our_logits(ours, token_ids), hf_logits(hf, token_ids),
                                   atol=ATOL, rtol=0)


def test_registry_rejects_unknown_architecture(saved: dict) -> None:
    config = read_model_config(saved["mistral"][1])
    assert get_model_class(config).__name__ == "MistralForCausalLM"
    config.architecture = "GPT2LMHeadModel"
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        get_model_class(config)


@pytest.mark.parametrize("kind", KINDS)
def test_parameter_count_matches_model_config(saved: dict, kind: str) -> None:
    config: ModelConfig = read_model_config(saved[kind][1])
    model = build_model(config, "float32", "cpu")
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters()
    hf = saved[kind][0]
    assert sum(p.numel() for p in hf.parameters()) == config.num_parameters()


def test_bfloat16_model_is_built_in_bfloat16(saved: dict) -> None:
    config = read_model_config(saved["qwen3"][1])
    model = build_model(config, "bfloat16", "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    rotary = model.model.layers[0].self_attn.rotary_emb
    assert rotary.cos_cache.dtype == torch.float32
    logits = our_logits(model, [1, 2, 3])
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()  # sampler upcasts



def test_loader_refuses_a_config_that_disagrees_with_the_folder(saved: dict) -> None:
    """E.g. a caller's config that lost the llama3 rope scaling must not load silently."""
    _, path = saved["llama3"]
    config = read_model_config(path)
    config.rope_scaling = None
    with pytest.raises(ValueError, match="rope_scaling"):
        load_model(path, "float32", "cpu", config)
    config = read_model_config(path)
    config.num_key_value_heads = 4
    with pytest.raises(ValueError, match="num_key_value_heads"):
        load_model(path, "float32", "cpu", config)


def test_sliding_window_config_warns(saved: dict, tmp_path: Path) -> None:
    _, path = saved["mistral"]
    raw = json.loads((path / "config.json").read_text())
    raw["sliding_window"] = 64
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.warns(UserWarning, match="sliding_window=64"):
        read_model_config(tmp_path)
