"""The twin's step time under int8 weights and an fp8 cache: fewer bytes read, the same FLOPs,
so memory-bound decode steps get faster and compute-bound prefill does not."""

from __future__ import annotations

import dataclasses

import pytest

from engine.core.catalog import load_hardware, load_model
from engine.core.config import EngineConfig
from engine.core.features import StepRow
from sim.memory_model import predict_memory
from sim.profile import ProfileKey
from sim.step_time import ModelWork, RooflineStepTime
from sim.twin import setup_twin

MODEL, L4 = "mistral_7b_v0_3", "l4_24gb"
DECODE = StepRow(0, 0, 8, 8 * 2000, 8)       # 8 decodes, 2k context each
PREFILL = StepRow(4096, 4096 * 4097 // 2, 0, 0, 1)


def roofline(quantization: str = "none", kv: str = "auto") -> RooflineStepTime:
    config = EngineConfig(max_model_len=2048, gpu_memory_utilization=0.95,
                          quantization=quantization, kv_cache_dtype=kv)
    step_time = setup_twin(MODEL, L4, config, predictor="roofline").step_time
    assert isinstance(step_time, RooflineStepTime)
    return step_time


def test_int8_reads_the_quantized_weights_and_fp8_half_the_cache() -> None:
    model = load_model(MODEL)
    plain, int8 = ModelWork.of(model, "bfloat16"), ModelWork.of(model, "bfloat16", "int8")
    looked_up = model.vocab_size * model.hidden_size * 2  # the untied input embedding
    assert int8.weight_bytes == model.weight_bytes("bfloat16", "int8") - looked_up
    assert plain.weight_bytes == model.weight_bytes("bfloat16") - looked_up
    assert int8.weight_bytes < 0.6 * plain.weight_bytes
    fp8 = ModelWork.of(model, "bfloat16", kv_dtype="float8_e4m3fn")
    assert fp8.kv_token_bytes == plain.kv_token_bytes / 2
    assert (int8.body_params, int8.attn_unit) == (plain.body_params, plain.attn_unit)


def test_the_twin_passes_the_configuration_to_its_roofline() -> None:
    assert roofline("int8", "fp8").work == ModelWork.of(load_model(MODEL), "bfloat16", "int8",
                                                        "float8_e4m3fn")


def test_decode_gets_faster_and_prefill_does_not() -> None:
    plain, int8, fp8 = roofline(), roofline("int8"), roofline(kv="fp8")
    kv = plain.work.kv_token_bytes * DECODE.decode_ctx
    decode = [(m.step(DECODE) - m.overhead_s) for m in (plain, int8, fp8)]
    # memory-bound: the time scales with the bytes read, weights plus the cache
    assert decode[1] / decode[0] == pytest.approx(
        (int8.work.weight_bytes + kv) / (plain.work.weight_bytes + kv))
    assert decode[2] / decode[0] == pytest.approx(
        (plain.work.weight_bytes + kv / 2) / (plain.work.weight_bytes + kv))
    assert int8.step(PREFILL) == pytest.approx(plain.step(PREFILL))


@pytest.mark.parametrize(("quantization", "utilization", "starts"),
                         [("none", 0.6, False), ("none", 0.9, False), ("int8", 0.6, True),
                          ("int8", 0.65, True), ("int8", 0.66, False)])
def test_beside_a_7_gib_neighbour_only_int8_below_066_starts(quantization: str,
                                                             utilization: float,
                                                             starts: bool) -> None:
    """The README's L4 conclusion (conf/sweep/l4_mistral_shared.yaml)."""
    hw = dataclasses.replace(load_hardware(L4), used_by_others_gib=7.0)
    config = EngineConfig(max_model_len=4096, gpu_memory_utilization=utilization,
                          quantization=quantization)
    assert predict_memory(load_model(MODEL), hw, config).starts == starts


def test_a_bf16_profile_does_not_time_an_int8_or_fp8_engine() -> None:
    """Profiles are keyed by quantization and cache dtype: auto falls back to the roofline,
    calibrated names the profile it would need."""
    plain = setup_twin("qwen3_0_6b", "h100_80gb", EngineConfig())
    assert plain.profile is not None
    for fields, suffix in (({"quantization": "int8"}, "__int8.json"),
                           ({"kv_cache_dtype": "fp8"}, "__fp8_kv.json")):
        config = EngineConfig(**fields)
        twin = setup_twin("qwen3_0_6b", "h100_80gb", config)
        assert twin.profile is None and twin.step_time.kind == "roofline"
        # start-up memory is the plain engine's, measured: only weights or cache differ
        assert twin.memory.sources["activation"] == plain.memory.sources["activation"]
        assert twin.memory.terms.activation_peak_bytes == plain.memory.terms.activation_peak_bytes
        assert twin.memory.num_blocks > plain.memory.num_blocks
        with pytest.raises(FileNotFoundError, match=suffix):
            setup_twin("qwen3_0_6b", "h100_80gb", config, predictor="calibrated")


def test_profile_keys_of_the_plain_engine_keep_their_filenames() -> None:
    assert ProfileKey("h100_80gb", "qwen3_0_6b", "bfloat16", "torch").filename == \
        "h100_80gb__qwen3_0_6b__bfloat16__torch.json"
    assert ProfileKey("h", "m", "bfloat16", "torch", "int8", "fp8").filename == \
        "h__m__bfloat16__torch__int8__fp8_kv.json"
