"""ModelRunner over a paged KV cache against HF full-sequence logits; Sampler properties."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from engine.core.config import ConfigError, EngineConfig
from engine.core.sequence import SamplingParams, Sequence
from engine.layers.attention import store_kv
from engine.layers.sampler import Sampler
from engine.runtime.loader import read_model_config
from engine.runtime.model_runner import ModelRunner
from tests.engine.hf_tiny import hf_logits, hf_model, save_hf, tiny_model_config

ATOL = 1e-4
GREEDY = SamplingParams(temperature=0.0, max_tokens=64)


# -- a tiny stand-in for the scheduler: same output contract as engine.core.scheduler -------------

@dataclass
class Scheduled:
    seq: Sequence
    num_new_tokens: int


@dataclass
class StepPlan:
    scheduled: list[Scheduled] = field(default_factory=list)


class Blocks:
    """Hands out block ids in a shuffled order, so a runner that assumed contiguity fails."""

    def __init__(self, num_blocks: int, block_size: int, seed: int = 0):
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.block_size = block_size

    def cover(self, seq: Sequence, num_tokens: int) -> None:
        while len(seq.block_table) * self.block_size < num_tokens:
            seq.block_table.append(self.free.pop())


def schedule(blocks: Blocks, *items: tuple[Sequence, int]) -> StepPlan:
    plan = StepPlan()
    for seq, n in items:
        blocks.cover(seq, seq.num_computed_tokens + n)
        plan.scheduled.append(Scheduled(seq, n))
    return plan


def finish_step(plan: StepPlan, next_tokens: dict[int, int]) -> None:
    """What the scheduler does after a step: advance, and append a token where one is sampled."""
    for item in plan.scheduled:
        seq = item.seq
        seq.num_computed_tokens += item.num_new_tokens
        if seq.num_computed_tokens == seq.num_tokens:
            seq.append_token(next_tokens[seq.seq_id])


# -- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["qwen3", "llama3"])
def hf_saved(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    model = hf_model(request.param)
    return model, save_hf(model, tmp_path_factory.mktemp(request.param))


def make_runner(path: Path | None, block_size: int, num_blocks: int = 64,
                device: str = "cpu", **kwargs: object) -> ModelRunner:
    settings = dict(block_size=block_size, dtype="float32", max_num_batched_tokens=256,
                    max_num_seqs=8, max_model_len=512)
    config = EngineConfig(**(settings | kwargs)).validate()
    model_config = read_model_config(path) if path else tiny_model_config("qwen3")
    runner = ModelRunner(model_config, config, device, str(path) if path else None)
    runner.allocate_kv_cache(num_blocks)
    return runner


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(1, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def check_step(runner: ModelRunner, hf: object, plan: StepPlan,
               atol: float = ATOL) -> list[Sequence]:
    """Runner logits of every sampling row == HF logits of that sequence's full prefix."""
    step = runner.prepare_inputs(plan.scheduled)
    logits = runner.compute_step_logits(step)
    sampled = [plan.scheduled[i].seq for i in step.sample_seqs]
    assert len(logits) == len(sampled)
    for seq, row in zip(sampled, logits, strict=True):
        expected = hf_logits(hf, seq.token_ids.tolist())[-1]
        torch.testing.assert_close(row.float().cpu(), expected.float(), atol=atol, rtol=0)
    return sampled


# -- the mixed batch ---------------------------------------------------------------------------

@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_mixed_batch_matches_hf(hf_saved: tuple, block_size: int) -> None:
    run_mixed_batch(*hf_saved, block_size, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_mixed_batch_matches_hf_on_cuda(hf_saved: tuple, block_size: int) -> None:
    run_mixed_batch(*hf_saved, block_size, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bfloat16_mixed_batch_on_cuda_is_close_to_hf(hf_saved: tuple) -> None:
    """bf16 takes SDPA's fused kernels (flash with a lower-right causal bias for chunks);
    a misaligned chunk mask is off by ~2.5 here, bf16 rounding by ~0.05."""
    run_mixed_batch(*hf_saved, 16, "cuda", dtype="bfloat16", atol=0.25)


def run_mixed_batch(hf: object, path: Path, bs: int, device: str, dtype: str = "float32",
                    atol: float = ATOL, mixed_graphs: bool = False,
                    **engine_args: object) -> ModelRunner:
    """Step 1: A's first chunk (ends mid-block) + C's whole prefill.
    Step 2: A's last chunk + B (prefix hit on A's computed blocks) + C's first decode.
    Step 3: decodes of A, B and C. `mixed_graphs`: mixed steps through the mixed-step
    graphs (captured on CUDA, run eagerly through the same static buffers elsewhere)."""
    runner = make_runner(path, bs, num_blocks=3 * (2 * bs + 9) // bs + 16, device=device,
                         dtype=dtype, **engine_args)
    if mixed_graphs:
        attach_mixed_graphs(runner)
    blocks = Blocks(runner.kv_cache.shape[2], bs)
    a = Sequence(tokens(2 * bs + 9, seed=1), GREEDY)
    c = Sequence(tokens(bs + 5, seed=3), GREEDY)
    chunk = bs + 3

    plan = schedule(blocks, (a, chunk), (c, c.num_tokens))
    assert check_step(runner, hf, plan, atol) == [c]
    finish_step(plan, {c.seq_id: 17})

    hit_blocks = chunk // bs
    b = Sequence(a.token_ids[: hit_blocks * bs].tolist() + tokens(6, seed=2), GREEDY)
    b.block_table = a.block_table[:hit_blocks]  # shared, already computed by A in step 1
    b.num_computed_tokens = b.num_cached_tokens = hit_blocks * bs
    plan = schedule(blocks, (a, a.num_tokens - chunk), (b, b.num_uncomputed_tokens), (c, 1))
    step = runner.prepare_inputs(plan.scheduled)
    shared = {blk * bs + off for blk in a.block_table[:hit_blocks] for off in range(bs)}
    assert not shared & set(step.host.slot_mapping.tolist())  # the hit is not rewritten
    assert step.host.num_tokens == a.num_tokens - chunk + 6 + 1
    check_padding(runner, step)
    assert check_step(runner, hf, plan, atol) == [a, b, c]
    finish_step(plan, {a.seq_id: 5, b.seq_id: 6, c.seq_id: 7})

    plan = schedule(blocks, (c, 1), (a, 1), (b, 1))
    assert check_step(runner, hf, plan, atol) == [c, a, b]
    return runner


def attach_mixed_graphs(runner: ModelRunner) -> None:
    runner.mixed = runner.new_mixed_graphs()
    if runner.device.type == "cuda":
        runner.mixed.capture()


def check_padding(runner: ModelRunner, step: object) -> None:
    """Eager rows on the varlen backends: padded to TOKEN_MULTIPLE (within the token budget)
    with token 0, position 0 and slot -1 (nothing stored); none on sdpa."""
    from engine.core.shapes import TOKEN_MULTIPLE

    if step.input_ids is None:  # a mixed-graph step: its buffers are checked with the graphs
        assert runner.mixed is not None and runner.mixed.covers(step.host)
        return
    n, rows = step.host.num_tokens, step.input_ids.shape[0]
    if not runner.pads_rows:
        assert rows == n
        return
    assert rows >= n and (rows % TOKEN_MULTIPLE == 0
                         or rows == runner.config.max_num_batched_tokens)
    assert step.context.slot_mapping[n:].tolist() == [-1] * (rows - n)
    assert step.input_ids[n:].tolist() == step.positions[n:].tolist() == [0] * (rows - n)


@pytest.mark.parametrize("block_size", [1, 32])
def test_three_chunk_prefill_and_execute_model_outputs(hf_saved: tuple, block_size: int) -> None:
    hf, path = hf_saved
    runner = make_runner(path, block_size, num_blocks=4096 // block_size)
    blocks = Blocks(runner.kv_cache.shape[2], block_size, seed=5)
    seq = Sequence(tokens(70, seed=9), GREEDY)
    for n in (20, 31):
        plan = schedule(blocks, (seq, n))
        assert runner.execute_model(plan) == [None]
        finish_step(plan, {})
    plan = schedule(blocks, (seq, seq.num_uncomputed_tokens))
    (token,) = runner.execute_model(plan)
    assert token == int(hf_logits(hf, seq.token_ids.tolist())[-1].argmax())


def test_greedy_generation_matches_hf(hf_saved: tuple) -> None:
    """execute_model end to end: two prompts prefilled together, then decoded token by token."""
    hf, path = hf_saved
    runner = make_runner(path, 4, num_blocks=64)
    blocks = Blocks(64, 4, seed=1)
    seqs = [Sequence(tokens(11, seed=21), GREEDY), Sequence(tokens(6, seed=22), GREEDY)]
    expected = [list(s.token_ids) for s in seqs]
    for _ in range(6):
        for ids in expected:
            ids.append(int(hf_logits(hf, ids)[-1].argmax()))
    for _ in range(6):
        plan = schedule(blocks, *[(s, s.num_uncomputed_tokens) for s in seqs])
        out = runner.execute_model(plan)
        finish_step(plan, {s.seq_id: t for s, t in zip(seqs, out, strict=True)})
    assert [s.token_ids.tolist() for s in seqs] == expected


@pytest.mark.parametrize("kind", ["qwen3", "llama3"])
def test_llm_engine_generates_like_hf(kind: str, tmp_path: Path) -> None:
    """The real scheduler (chunked prefill, prefix hits) driving this runner, end to end."""
    generate_like_hf(hf_model(kind), tmp_path / kind, max_tokens=5, device="cpu")


def generate_like_hf(hf: object, path: Path, max_tokens: int,
                     **engine_args: object) -> object:
    """LLM.generate (chunked prefill, prefix hits) on HF's saved weights == HF greedy; returns
    the engine for further checks."""
    from engine.runtime.llm import LLM

    save_hf(hf, path)
    prefix = tokens(30, seed=40)
    prompts = [prefix + tokens(3 + i, seed=50 + i) for i in range(4)] + [tokens(70, seed=60)]
    llm = LLM(str(path), dtype="float32", block_size=4, max_num_seqs=3,
              max_num_batched_tokens=32, max_model_len=256, num_gpu_blocks_override=200,
              **engine_args)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                   ignore_eos=True))
    assert sum(o.metrics.num_cached_tokens for o in outputs) > 0
    for prompt, output in zip(prompts, outputs, strict=True):
        ids = list(prompt)
        for _ in range(max_tokens):
            ids.append(int(hf_logits(hf, ids)[-1].argmax()))
        assert output.output_token_ids == ids[len(prompt):]
    return llm


# -- runner plumbing ---------------------------------------------------------------------------

def test_weight_bytes_kv_cache_and_profile(hf_saved: tuple) -> None:
    _, path = hf_saved
    runner = make_runner(path, 16, num_blocks=10)
    config = runner.model_config
    assert runner.weight_bytes == config.weight_bytes("float32")
    assert runner.attention_backend == "sdpa"
    shape = (2, config.num_hidden_layers, 10, 16, config.num_key_value_heads, config.head_dim)
    assert tuple(runner.kv_cache.shape) == shape
    layer1 = runner.attention_layers[1]
    assert layer1.k_cache.data_ptr() == runner.kv_cache[0, 1].data_ptr()
    assert layer1.v_cache.data_ptr() == runner.kv_cache[1, 1].data_ptr()
    assert runner.profile_run() is None  # CPU: the engine estimates activation itself


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_profile_and_seeded_sampling() -> None:
    runner = make_runner(None, 16, device="cuda", dtype="bfloat16")
    peak = runner.profile_run()
    assert isinstance(peak, int) and peak > 0
    assert runner.kv_cache.dtype == torch.bfloat16 and runner.kv_cache.is_cuda
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=7)

    def sample() -> list[int | None]:
        seqs = [Sequence(tokens(9, seed=i), params) for i in range(3)]
        return runner.execute_model(schedule(Blocks(64, 16), *[(s, 9) for s in seqs]))

    first = sample()
    assert all(isinstance(t, int) for t in first) and sample() == first


def test_profile_run_leaves_sampling_reproducible() -> None:
    params = SamplingParams(temperature=1.0, max_tokens=8)

    def sample(profile: bool) -> list[int | None]:
        runner = make_runner(None, 16, seed=11)
        if profile:
            runner.profile_run()
        seqs = [Sequence(tokens(9, seed=i), params) for i in range(3)]
        return runner.execute_model(schedule(Blocks(64, 16), *[(s, 9) for s in seqs]))

    assert sample(True) == sample(False)


def test_runner_rejects_bad_inputs() -> None:
    runner = make_runner(None, 4, num_blocks=8)
    seq = Sequence(tokens(10, seed=1), GREEDY)
    seq.block_table = [0, 1]  # covers 8 of the 10 tokens
    with pytest.raises(ValueError, match="needs 3 blocks"):
        runner.execute_model(StepPlan([Scheduled(seq, 10)]))
    assert runner.execute_model(StepPlan()) == []
    for backend in ("flash_attn", "torch"):
        with pytest.raises(ConfigError, match=f"attention_backend='{backend}'.*need CUDA"):
            make_runner(None, 4, attention_backend=backend)
    fresh = ModelRunner(runner.model_config, runner.config, "cpu")
    with pytest.raises(RuntimeError, match="allocate_kv_cache"):
        fresh.execute_model(StepPlan([Scheduled(seq, 1)]))


def test_seeded_request_samples_the_same_in_any_batch() -> None:
    """A request with its own seed draws from its own generator, wherever it sits."""
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=8)
    other = SamplingParams(temperature=1.0, max_tokens=8)

    def run(neighbours: int) -> list[int]:
        runner = make_runner(None, 8)  # same weights; neighbours use the engine generator
        blocks = Blocks(64, 8)
        seqs = [Sequence(tokens(7, seed=100 + i), other) for i in range(neighbours)]
        target = Sequence(tokens(7, seed=1), seeded)
        seqs.insert(neighbours // 2, target)
        for _ in range(4):
            plan = schedule(blocks, *[(s, s.num_uncomputed_tokens) for s in seqs])
            out = runner.execute_model(plan)
            finish_step(plan, {s.seq_id: t for s, t in zip(seqs, out, strict=True)})
        return target.output_token_ids

    assert run(0) == run(3) == run(2)


def test_store_kv_skips_negative_slots() -> None:
    k_cache = torch.zeros(3, 2, 1, 4)
    v_cache = torch.zeros(3, 2, 1, 4)
    k = torch.arange(1.0, 4.0).view(3, 1, 1).expand(3, 1, 4)
    slots = torch.tensor([5, -1, 0])
    store_kv(k, -k, k_cache, v_cache, slots)
    assert k_cache[2, 1].tolist() == [[1.0] * 4] and k_cache[0, 0].tolist() == [[3.0] * 4]
    assert v_cache[2, 1].tolist() == [[-1.0] * 4]
    assert int((k_cache != 0).any(-1).sum()) == 2  # token 1 went nowhere


# -- sampler -----------------------------------------------------------------------------------

def random_logits(rows: int, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_and_top_k_1_is_greedy() -> None:
    logits = random_logits(16)
    sampler = Sampler(torch.Generator().manual_seed(0))
    argmax = logits.argmax(-1)
    assert torch.equal(sampler(logits, [SamplingParams(temperature=0.0)] * 16), argmax)
    top1 = [SamplingParams(temperature=1.5, top_k=1)] * 16
    assert torch.equal(sampler(logits, top1), argmax)


def test_sampling_is_reproducible_under_the_engine_seed() -> None:
    logits = random_logits(32)
    params = [SamplingParams(temperature=1.0, top_k=40, top_p=0.95)] * 32

    def draw(seed: int) -> torch.Tensor:
        return Sampler(torch.Generator().manual_seed(seed))(logits, params)

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))
    assert not torch.equal(draw(3), logits.argmax(-1))


def test_greedy_rows_do_not_shift_random_rows() -> None:
    logits = random_logits(8)
    hot = SamplingParams(temperature=1.0)
    mixed = [hot, SamplingParams(temperature=0.0), hot, hot]
    a = Sampler(torch.Generator().manual_seed(1))(logits[[0, 1, 2, 3]], mixed)
    b = Sampler(torch.Generator().manual_seed(1))(logits[[0, 2, 3]], [hot] * 3)
    assert a[1] == logits[1].argmax()
    assert a[[0, 2, 3]].tolist() == b.tolist()


def _frequencies(probs: list[float], params: SamplingParams, rows: int = 4000) -> torch.Tensor:
    logits = torch.tensor(probs).log().repeat(rows, 1)
    sampled = Sampler(torch.Generator().manual_seed(0))(logits, [params] * rows)
    return torch.bincount(sampled, minlength=len(probs)).float() / rows


PROBS = [0.5, 0.3, 0.15, 0.05]


def test_top_p_keeps_the_nucleus_and_renormalises() -> None:
    freq = _frequencies(PROBS, SamplingParams(temperature=1.0, top_p=0.7))
    assert freq[2:].sum() == 0  # 0.5 + 0.3 already reaches 0.7
    torch.testing.assert_close(freq[:2], torch.tensor([0.625, 0.375]), atol=0.03, rtol=0)
    freq = _frequencies(PROBS, SamplingParams(temperature=1.0, top_p=0.85))
    assert freq[3] == 0 and (freq[:3] > 0).all()


def test_top_k_and_temperature_shape_the_distribution() -> None:
    freq = _frequencies(PROBS, SamplingParams(temperature=1.0))
    torch.testing.assert_close(freq, torch.tensor(PROBS), atol=0.03, rtol=0)
    freq = _frequencies(PROBS, SamplingParams(temperature=1.0, top_k=2))
    assert freq[2:].sum() == 0 and (freq[:2] > 0).all()
    sharpened = torch.tensor(PROBS) ** 2  # temperature 0.5 squares the probabilities
    freq = _frequencies(PROBS, SamplingParams(temperature=0.5))
    torch.testing.assert_close(freq, sharpened / sharpened.sum(), atol=0.03, rtol=0)
