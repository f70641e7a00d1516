"""The mixed attention kernel (one graph-safe launch for every row of a step) against SDPA.

Without a GPU it runs under TRITON_INTERPRET=1 in float32; on a GPU also in bf16 at
Qwen3-0.6B's attention shape.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from engine.layers.kernels.mixed_attention import block_q, mixed_attention, mixed_grid_tiles  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"


def paged_step(q_lens: list[int], kv_lens: list[int], block_size: int, kv_heads: int,
               head_dim: int, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """A cache whose blocks are shuffled across sequences, and the step's tensors."""
    gen = torch.Generator().manual_seed(seed)
    per_seq = [-(-n // block_size) for n in kv_lens]
    num_blocks = sum(per_seq) + 2
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache, v_cache = (torch.randn(shape, generator=gen) for _ in range(2))
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(kv_lens), max(per_seq, default=1) + 1, dtype=torch.int32)
    for i, n in enumerate(per_seq):
        tables[i, :n] = torch.tensor([free.pop() for _ in range(n)], dtype=torch.int32)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return {"k_cache": k_cache.to(DEVICE, dtype), "v_cache": v_cache.to(DEVICE, dtype),
            "block_tables": tables.to(DEVICE), "query_start_loc": starts.to(DEVICE),
            "seq_lens": torch.tensor(kv_lens, dtype=torch.int32, device=DEVICE)}


def reference(q: torch.Tensor, step: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    """Each sequence's queries (the last q_len of its kv_len tokens) over its gathered keys,
    bottom-right causal, in float32."""
    out = torch.zeros_like(q, dtype=torch.float32)
    starts = step["query_start_loc"].tolist()
    block_size = step["k_cache"].shape[1]
    for i, kv_len in enumerate(step["seq_lens"].tolist()):
        s, e = starts[i], starts[i + 1]
        if e == s or kv_len == 0:
            continue
        blocks = step["block_tables"][i, : -(-kv_len // block_size)].long()
        k, v = (c[blocks].flatten(0, 1)[:kv_len].float().transpose(0, 1)
                for c in (step["k_cache"], step["v_cache"]))
        mask = torch.ones(e - s, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - (e - s))
        out[s:e] = F.scaled_dot_product_attention(
            q[s:e].float().transpose(0, 1), k, v, attn_mask=mask, scale=scale,
            enable_gqa=True).transpose(0, 1)
    return out


CASES = {
    # decodes, a chunk with cached keys before it, a whole prompt, a chunk spanning tiles
    "mixed": ([1, 1, 37, 5, 1, 70], [9, 130, 37, 40, 1, 200]),
    "one long prefill": ([150], [150]),
    "chunk after a long context": ([3], [300]),
    "empty slots": ([4, 0, 0, 1], [10, 0, 0, 22]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(("block_size", "heads", "kv_heads"),
                         [(1, 4, 4), (16, 4, 2), (16, 6, 2), (64, 8, 1)])
def test_mixed_attention_matches_sdpa(case: str, block_size: int, heads: int,
                                      kv_heads: int) -> None:
    """GQA groups of 1, 2, 3 (padded to 4) and 8 heads; small tiles so sequences span several."""
    q_lens, kv_lens = CASES[case]
    step = paged_step(q_lens, kv_lens, block_size, kv_heads, 32, torch.float32, seed=len(case))
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(sum(q_lens), heads, 32, generator=gen).to(DEVICE)
    out = mixed_attention(q, step["k_cache"], step["v_cache"], step["block_tables"],
                          step["seq_lens"], step["query_start_loc"], 32 ** -0.5,
                          BLOCK_M=16, BLOCK_N=16)
    torch.testing.assert_close(out, reference(q, step, 32 ** -0.5), atol=1e-5, rtol=1e-5)


def test_padding_rows_come_out_zero_and_foreign_rows_untouched() -> None:
    """A graph's padding sequence (rows with no keys) gives zeros; rows that no sequence owns
    keep what `out` held."""
    step = paged_step([2, 6], [5, 0], 16, 2, 32, torch.float32, seed=3)
    q = torch.randn(10, 4, 32, device=DEVICE)
    out = torch.full_like(q, 7.0)
    mixed_attention(q, step["k_cache"], step["v_cache"], step["block_tables"],
                    step["seq_lens"], step["query_start_loc"], 0.2, out, BLOCK_M=16,
                    BLOCK_N=16)
    assert torch.equal(out[2:8], torch.zeros_like(out[2:8]))
    assert torch.equal(out[8:], torch.full_like(out[8:], 7.0))
    torch.testing.assert_close(out[:2], reference(q, step, 0.2)[:2], atol=1e-5, rtol=1e-5)


def test_grid_covers_every_sequence_whatever_its_start() -> None:
    """Sequence s owns tiles from start[s] // BLOCK_Q + s: enough for its rows wherever it
    starts, and the grid (rows // BLOCK_Q + sequences) reaches the last one's last tile."""
    bq = block_q(16, 8, 64)
    assert bq == 32
    for starts in ([0, 31, 33, 95, 96, 200], [0, 1, 2, 3, 64, 64, 64, 300]):
        seqs = len(starts) - 1
        for s in range(seqs):
            first, last = starts[s] // bq + s, starts[s + 1] // bq + s + 1
            assert last - first >= -(-(starts[s + 1] - starts[s]) // bq)
        assert starts[-1] // bq + seqs <= mixed_grid_tiles(starts[-1], seqs, bq)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_mixed_attention_bfloat16_qwen3_shape() -> None:
    """16 heads over 8 KV heads of 128, bf16, a long chunk after a cached prefix and decodes."""
    q_lens, kv_lens = [1, 1, 600, 1000, 1], [2000, 17, 2600, 1000, 4096]
    step = paged_step(q_lens, kv_lens, 16, 8, 128, torch.bfloat16, seed=5)
    q = torch.randn(sum(q_lens), 16, 128, device="cuda", dtype=torch.bfloat16)
    out = mixed_attention(q, step["k_cache"], step["v_cache"], step["block_tables"],
                          step["seq_lens"], step["query_start_loc"], 128 ** -0.5)
    torch.testing.assert_close(out.float(), reference(q, step, 128 ** -0.5), atol=2e-2,
                               rtol=2e-2)
