"""The CUDA attention backends: Triton kernels against references, the paged path against HF.

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 and varlen flash attention is
replaced by an SDPA reference, so the step layout (decodes first, prefix gather, cu_seqlens,
graph padding rows) is checked on the CPU; on a GPU everything runs for real.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from engine.layers import attention_backends  # noqa: E402
from engine.layers.attention import store_kv  # noqa: E402
from engine.layers.kernels import paged_cache  # noqa: E402
from engine.layers.kernels.paged_cache import (  # noqa: E402
    MAX_SPLITS,
    decode_splits,
    paged_decode,
    store_kv_triton,
)
from tests.engine import test_model_runner as runner_tests  # noqa: E402
from tests.engine.hf_tiny import hf_model  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"


# -- kernels -----------------------------------------------------------------------------------

def random_cache(num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return tuple(torch.randn(shape, generator=gen).to(DEVICE, dtype) for _ in range(2))


def test_store_kv_kernel_equals_index_copy() -> None:
    k_cache, v_cache = random_cache(8, 4, 2, 16, torch.float32, seed=0)
    qkv = torch.randn(5, 3 * 2 * 16, device=DEVICE)  # K and V are strided views, like qkv_proj
    k, v = qkv[:, 32:64].view(5, 2, 16), qkv[:, 64:].view(5, 2, 16)
    slots = torch.tensor([3, -1, 17, 0, 31], device=DEVICE)
    expected = k_cache.clone(), v_cache.clone()
    store_kv(k, v, *expected, slots)
    store_kv_triton(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected[0]) and torch.equal(v_cache, expected[1])


@pytest.mark.parametrize(("block_size", "heads", "kv_heads"), [(1, 4, 4), (16, 4, 2), (64, 8, 2)])
@pytest.mark.parametrize(("num_splits", "head_major", "ordered"),
                         [(1, True, False), (4, True, True), (4, False, False)])
def test_paged_decode_matches_gathered_sdpa(block_size: int, heads: int, kv_heads: int,
                                            num_splits: int, head_major: bool, ordered: bool,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Split 4 ways (16 keys or more each), some sequences leave splits empty and one spans
    them all; programs ordered by KV head or by sequence, sequences started longest first."""
    monkeypatch.setattr(paged_cache, "HEAD_MAJOR", head_major)
    lens = [1, 7, 70, 0, 129]  # 0: a CUDA-graph padding row, must come out finite
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    k_cache, v_cache = random_cache(num_blocks, block_size, kv_heads, 32, torch.float32, 1)
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(2)).tolist()
    width = max(-(-n // block_size) for n in lens)
    tables = torch.zeros(len(lens), width, dtype=torch.int32)
    for i, n in enumerate(lens):
        for j in range(-(-n // block_size)):
            tables[i, j] = order.pop()
    q = torch.randn(len(lens), heads, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    order = torch.tensor([4, 2, 1, 0, 3], dtype=torch.int32, device=DEVICE) if ordered else None
    out = paged_decode(q, k_cache, v_cache, tables.to(DEVICE), seq_lens, 32 ** -0.5,
                       num_splits=num_splits, min_share=16, order=order, BLOCK_N=16)
    for i, n in enumerate(lens):
        if n == 0:
            assert torch.equal(out[i], torch.zeros_like(out[i]))
            continue
        blocks = tables[i, : -(-n // block_size)].long().to(DEVICE)
        k, v = (c[blocks].flatten(0, 1)[:n].transpose(0, 1) for c in (k_cache, v_cache))
        ref = F.scaled_dot_product_attention(q[i][:, None], k, v, scale=32 ** -0.5,
                                             enable_gqa=True)[:, 0]
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=1e-5)


def test_decode_splits_fill_small_batches_and_leave_full_ones_whole() -> None:
    splits = [decode_splits(batch, 8) for batch in (1, 4, 16, 64, 128, 256, 512)]
    assert all(s & (s - 1) == 0 and 1 <= s <= MAX_SPLITS for s in splits)
    assert splits == sorted(splits, reverse=True)
    assert splits[0] == MAX_SPLITS and splits[-2:] == [1, 1]
    with pytest.raises(ValueError, match="num_splits"):
        paged_decode(torch.zeros(1, 2, 16), *random_cache(2, 4, 1, 16, torch.float32, 0),
                     torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32),
                     1.0, num_splits=3)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_splits", [1, 8])
def test_paged_decode_bfloat16_full_size_heads(num_splits: int) -> None:
    """Qwen3-0.6B's attention shape (16 heads over 8 KV heads of 128) in bf16."""
    k_cache, v_cache = random_cache(300, 16, 8, 128, torch.bfloat16, seed=4)
    lens = [1000, 17, 2048 - 1]
    tables = torch.randperm(300)[: 3 * 64].view(3, 64).repeat(1, 2).int().cuda()
    q = torch.randn(3, 16, 128, device="cuda", dtype=torch.bfloat16)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    out = paged_decode(q, k_cache, v_cache, tables, seq_lens, 128 ** -0.5,
                       num_splits=num_splits)
    for i, n in enumerate(lens):
        blocks = tables[i, : -(-n // 16)].long()
        k, v = (c[blocks].flatten(0, 1)[:n].transpose(0, 1).float() for c in (k_cache, v_cache))
        ref = F.scaled_dot_product_attention(q[i].float()[:, None], k, v, scale=128 ** -0.5,
                                             enable_gqa=True)[:, 0]
        torch.testing.assert_close(out[i].float(), ref, atol=2e-2, rtol=2e-2)


# -- the paged path end to end -----------------------------------------------------------------

@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_torch_backend_mixed_batch_matches_hf(hf_saved: tuple, block_size: int,
                                              torch_backend: str) -> None:
    """Chunked prefill (a chunk ending mid-block), a prefix hit and decodes in one step."""
    runner_tests.run_mixed_batch(*hf_saved, block_size, DEVICE, attention_backend=torch_backend)


@pytest.mark.parametrize("block_size", [1, 16])
def test_mixed_graphs_mixed_batch_matches_hf(hf_saved: tuple, block_size: int,
                                             torch_backend: str) -> None:
    """The same steps with the mixed ones through the mixed-step graphs, attention by the
    mixed kernel straight from the cache (on the CPU the same static buffers run eagerly),
    rows padded to a bucket; the decode-only step is not theirs."""
    runner = runner_tests.run_mixed_batch(*hf_saved, block_size, DEVICE, mixed_graphs=True,
                                          attention_backend=torch_backend)
    assert runner.mixed.replays == 2
    assert runner.eager_rows(65) == 128 and runner.eager_rows(200) == 256
    mixed = runner.mixed  # the last mixed step: A's last chunk, B, C's decode (bs + 13 rows)
    tokens = int(mixed.query_start_loc[3])
    slots = runner.config.max_num_seqs + 1  # + the padding sequence
    assert mixed.query_start_loc[3:slots].tolist() == [tokens] * (slots - 3)
    assert mixed.query_start_loc[-1] == runner.eager_rows(tokens)
    assert mixed.seq_lens[3:].tolist() == [0] * (slots - 3)
    assert (mixed.slot_mapping[tokens:] == -1).all()


def test_a_step_past_the_graphs_is_refused_by_them(torch_backend: str) -> None:
    from engine.runtime.step_input import HostBatch

    runner = runner_tests.make_runner(None, 16, device=DEVICE, max_cudagraph_tokens=256,
                                      attention_backend=torch_backend)
    runner_tests.attach_mixed_graphs(runner)
    rows = np.zeros(300, dtype=np.int64)
    host = HostBatch([0, 1], 0, rows, rows, rows, [0, 100, 300], [100, 200],
                     np.zeros((2, 13), dtype=np.int32), [0, 1], [99, 299], None)
    assert not runner.mixed.covers(host)
    with pytest.raises(ValueError, match="300 tokens and 2 sequences is not a mixed-graph"):
        runner.mixed.run(host)


def test_mixed_buffer_formula_is_what_the_graphs_allocate() -> None:
    """engine.core.memory.mixed_buffer_bytes (the sim's graph-memory formula at another
    token limit) counts exactly the static buffers MixedGraphs holds."""
    from engine.core.memory import blocks_per_request, mixed_buffer_bytes

    runner = runner_tests.make_runner(None, 16, dtype="bfloat16", max_cudagraph_tokens=256,
                                      max_model_len=1000, max_num_seqs=12)
    graphs = runner.new_mixed_graphs()
    held = [v for v in vars(graphs).values() if isinstance(v, torch.Tensor)]
    assert sum(t.numel() * t.element_size() for t in held) == mixed_buffer_bytes(
        runner.model_config, 256, "bfloat16", 12, blocks_per_request(1000, 16))


def test_the_sim_pads_mixed_steps_as_the_runner_does(torch_backend: str) -> None:
    """The rows the runner gives a step (a graph bucket up to the limit, else a multiple
    of 64) are the rows the sim's `padded_tokens` terms count."""
    from sim.step_terms import padded_tokens

    runner = runner_tests.make_runner(None, 16, device=DEVICE, max_num_batched_tokens=1024,
                                      max_cudagraph_tokens=256, attention_backend=torch_backend)
    runner_tests.attach_mixed_graphs(runner)
    n = np.arange(1, 1025)
    assert [runner.eager_rows(int(k)) for k in n] == padded_tokens(n, 256).tolist()


hf_saved = runner_tests.hf_saved


@pytest.mark.parametrize("enforce_eager", [True, False])
def test_llm_on_the_torch_backend_generates_like_hf(tmp_path: object, torch_backend: str,
                                                    enforce_eager: bool) -> None:
    """The real scheduler with chunked prefill and prefix hits; on a GPU with CUDA graphs."""
    llm = runner_tests.generate_like_hf(hf_model("qwen3"), tmp_path / "qwen3", max_tokens=6,
                                        device=DEVICE, attention_backend=torch_backend,
                                        enforce_eager=enforce_eager)
    assert llm.model_runner.cuda_graphs_enabled == (CUDA and not enforce_eager)
    if llm.model_runner.cuda_graphs_enabled:  # decode graphs and mixed-step graphs
        assert llm.model_runner.graphs.replays > 0
        assert llm.model_runner.mixed.replays > 0


# -- host-side step layout ---------------------------------------------------------------------

def test_block_table_rows_follow_growth_and_preemption() -> None:
    from engine.core.sequence import Sequence
    from engine.runtime.step_input import BlockTables

    tables = BlockTables(block_size=4)
    seq = Sequence(list(range(10)))
    seq.block_table = [7, 3]
    assert tables.row(seq).tolist() == [7, 3]
    seq.block_table += [9] * 40  # grows past the row's capacity
    assert tables.row(seq).tolist() == [7, 3] + [9] * 40
    seq.block_table.clear()
    seq.num_preemptions += 1  # preempted and re-admitted with other blocks, same length
    seq.block_table += [1, 2] + [5] * 40
    assert tables.row(seq).tolist() == [1, 2] + [5] * 40
    tables.retain([])
    assert tables.row(seq).tolist() == [1, 2] + [5] * 40


def test_padded_row_counts() -> None:
    from engine.core.shapes import padded_len
    from engine.runtime.step_input import pad_tail

    assert [padded_len(n, 64) for n in (1, 63, 64, 65, 8191)] == [64, 64, 64, 128, 8192]
    assert padded_len(1000, 64, cap=1000) == 1000  # never past the token budget...
    assert padded_len(990, 64, cap=1000) == 1000
    assert padded_len(1100, 64, cap=1000) == 1100  # ...nor below the count itself
    assert pad_tail(np.array([5, 6]), 4, -1).tolist() == [5, 6, -1, -1]
    assert pad_tail(np.array([5, 6]), 1, -1).tolist() == [5, 6]


def test_decode_order_starts_the_longest_decodes_first_then_graph_padding() -> None:
    from engine.core.sequence import Sequence
    from engine.runtime.step_input import BlockTables, build_host_batch

    class Item:
        def __init__(self, seq: Sequence, n: int):
            self.seq, self.num_new_tokens = seq, n

    items = []
    for length, n in ((5, 1), (9, 1), (30, 8), (9, 1), (2, 1)):
        seq = Sequence(list(range(length)))
        seq.block_table = list(range(len(items) * 10, len(items) * 10 + 8))
        seq.num_computed_tokens = length - n
        items.append(Item(seq, n))
    host = build_host_batch(items, BlockTables(block_size=4), gather_prefix=True)
    assert host.num_decodes == 4 and host.seq_lens[:4] == [5, 9, 9, 2]
    assert host.decode_order().tolist() == [1, 2, 0, 3]  # ties keep their order
    assert host.decode_order(6).tolist() == [1, 2, 0, 3, 4, 5]


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and attention_backends.flash_attn_available()),
                    reason="needs a CUDA GPU and the flash-attn package")
def test_flash_attn_backend_mixed_batch_matches_hf(hf_saved: tuple) -> None:
    """flash_attn_with_kvcache pages by 256-token blocks, so only block_size 256 runs it."""
    runner_tests.run_mixed_batch(*hf_saved, 256, DEVICE, dtype="bfloat16", atol=0.25,
                                 attention_backend="flash_attn")


def test_backend_choice_and_its_errors() -> None:
    from engine.core.config import ConfigError
    from engine.runtime.model_runner import resolve_backend

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu, 16) == "sdpa"
    assert resolve_backend("auto", cuda, 16) == "torch"  # flash_attn pages by 256 only
    assert resolve_backend("sdpa", cuda, 16) == "sdpa"
    with pytest.raises(ConfigError, match="attention_backend='torch'.*need CUDA"):
        resolve_backend("torch", cpu, 16)
    if attention_backends.flash_attn_available():
        assert resolve_backend("auto", cuda, 256) == "flash_attn"
        with pytest.raises(ConfigError, match="block_size=16 is invalid.*multiple of 256"):
            resolve_backend("flash_attn", cuda, 16)
    else:
        assert resolve_backend("auto", cuda, 256) == "torch"
        with pytest.raises(ConfigError, match="flash_attn package is not installed"):
            resolve_backend("flash_attn", cuda, 256)
