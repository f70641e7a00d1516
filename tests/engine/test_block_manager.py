"""BlockManager: chained-hash prefix cache, verification, ref counts, LRU eviction."""

from __future__ import annotations

import pytest

import engine.core.kv.prefix_cache as prefix_cache
from engine.core.kv.block_manager import BlockManager, hash_block
from engine.core.sequence import Sequence

MASK = (1 << 64) - 1


def admit(bm: BlockManager, tokens: list[int]) -> Sequence:
    """Admit a prompt like the scheduler does: prefix hit, then blocks for the rest."""
    seq = Sequence(tokens)
    hit = bm.get_computed_blocks(seq)
    assert bm.allocate_slots(seq, len(tokens) - len(hit) * bm.block_size, hit)
    seq.num_computed_tokens = len(tokens)
    return seq


def test_hash_chains_parent_and_is_stable() -> None:
    a = hash_block(0, [1, 2, 3, 4])
    assert a == hash_block(0, [1, 2, 3, 4])
    assert a != hash_block(1, [1, 2, 3, 4])
    assert a != hash_block(0, [1, 2, 3, 5])
    # A fixed value: the same on every machine and Python version (no reliance on hash()).
    assert a == 0x4393F8E7C137D5FB


def test_shared_prefix_hits_full_blocks_only() -> None:
    bm = BlockManager(16, 4)
    first = admit(bm, list(range(10)))             # blocks [0..3], [4..7], [8, 9]
    second = Sequence(list(range(9)) + [99])
    hit = bm.get_computed_blocks(second)
    assert hit == first.block_table[:2]            # the partial third block never hits


def test_hit_never_covers_the_whole_prompt() -> None:
    bm = BlockManager(16, 4)
    first = admit(bm, list(range(8)))
    again = Sequence(list(range(8)))
    assert bm.get_computed_blocks(again) == first.block_table[:1]


def test_ref_counts_and_free_order() -> None:
    bm = BlockManager(8, 4)
    a = admit(bm, list(range(8)) + [50])
    b = admit(bm, list(range(8)) + [60])
    shared = a.block_table[:1]  # block 2 of 'b' is its own: the first hit stops at len-1
    assert b.block_table[0] == shared[0]
    assert bm.blocks[shared[0]].ref_count == 2
    bm.free(a)
    assert bm.blocks[shared[0]].ref_count == 1
    bm.free(b)
    assert bm.num_free_blocks == 8
    assert all(block.ref_count == 0 for block in bm.blocks.values())


def test_freed_cached_blocks_are_evicted_lru_and_tail_first() -> None:
    bm = BlockManager(6, 2)
    old = admit(bm, [1, 2, 3, 4, 5])      # 3 blocks
    old_blocks = list(old.block_table)
    bm.free(old)
    new = admit(bm, [9, 9, 9, 9, 9, 9])   # 3 blocks: takes the never-used ones first
    assert not set(new.block_table) & set(old_blocks)
    bm.free(new)
    victim = admit(bm, [7, 7])            # must evict: the least recently freed, tail first
    assert victim.block_table == [old_blocks[2]]
    hit = bm.get_computed_blocks(Sequence([1, 2, 3, 4, 5]))
    assert hit == old_blocks[:2]          # the head of the old prefix survived


def test_allocation_is_all_or_nothing() -> None:
    bm = BlockManager(3, 4)
    seq = Sequence(list(range(20)))
    assert not bm.allocate_slots(seq, 20)
    assert bm.num_free_blocks == 3 and seq.block_table == []


def test_hit_is_verified_against_tokens_under_collision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prefix_cache, "xxh3_64_intdigest", lambda data: 42)
    bm = BlockManager(16, 4, lazy_publication=False)
    admit(bm, [1, 2, 3, 4, 5])
    assert bm.get_computed_blocks(Sequence([9, 9, 9, 9, 5])) == []


def test_hit_is_verified_against_parent_under_collision(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same block tokens, same (colliding) hash, different prefix: KV differs, so no hit.
    (A first-block miss already stops these lookups; the parent check itself fails
    test_block_manager_reference's collision test when removed.)"""
    # the hash ignores the parent (its first 8 bytes): only the parent check can tell
    monkeypatch.setattr(prefix_cache, "xxh3_64_intdigest", lambda data: hash(data[8:]) & MASK)
    bm = BlockManager(16, 2, lazy_publication=False)
    admit(bm, [1, 1, 2, 2, 0])            # block [2, 2] published after parent [1, 1]
    seq = Sequence([3, 3, 2, 2, 0])
    admit_hit = bm.get_computed_blocks(seq)
    assert admit_hit == []                # [3, 3] misses, so [2, 2] is never reached
    bm2 = BlockManager(16, 2, lazy_publication=False)
    admit(bm2, [1, 1, 2, 2, 0])
    admit(bm2, [1, 1, 3, 3, 0])
    other = Sequence([4, 4, 2, 2, 0])
    assert bm2.get_computed_blocks(other) == []


def test_prefix_caching_off_never_hits() -> None:
    bm = BlockManager(16, 4, enable_prefix_caching=False)
    admit(bm, list(range(12)))
    assert bm.get_computed_blocks(Sequence(list(range(12)))) == []
    assert not bm.cached


def test_decode_tokens_publish_full_blocks() -> None:
    bm = BlockManager(16, 2)
    seq = admit(bm, [1, 2, 3])
    seq.append_token(4)
    assert bm.allocate_slots(seq, 1)      # the step that computes token 4 fills block 2
    seq.num_computed_tokens = 4
    assert bm.get_computed_blocks(Sequence([1, 2, 3, 4, 5])) == seq.block_table[:2]


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("prompt_len", [1, 3, 4, 9])
def test_decode_events_say_when_a_decode_takes_or_publishes(caching: bool,
                                                            prompt_len: int) -> None:
    """decode_events describes allocate_slots: decoding one token at a time, a block is
    taken exactly at takes_at tokens and one is published exactly at publishes_at."""
    bm = BlockManager(64, 4, enable_prefix_caching=caching)
    seq = admit(bm, list(range(100, 100 + prompt_len)))
    for token in range(40):
        takes_at, publishes_at = bm.decode_events(seq)
        seq.append_token(token)
        total = seq.num_computed_tokens + 1
        tables, published = len(seq.block_table), len(seq.block_content_ids)
        assert bm.allocate_slots(seq, 1)
        seq.num_computed_tokens = total
        assert (len(seq.block_table) > tables) == (total == takes_at)
        assert total <= takes_at
        assert (len(seq.block_content_ids) > published) == (total == publishes_at)
        assert total <= publishes_at
