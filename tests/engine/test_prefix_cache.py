"""Lazy publication (a sequence alone with its first block publishes without hashing) and the
free queue's stale entries: behaviour equal to eager publication, checked against the previous
implementation (`ReferenceBlockManager`) on hand-made cases."""

from __future__ import annotations

from engine.core.kv.block_manager import BlockManager
from engine.core.kv.free_queue import FreeBlockQueue
from engine.core.kv.prefix_cache import NO_PARENT, hash_block
from engine.core.sequence import Sequence
from tests.engine.reference_block_manager import ReferenceBlockManager


def admit(bm, tokens: list[int]) -> Sequence:
    """Admit a prompt like the scheduler does: prefix hit, then blocks for the rest."""
    seq = Sequence(tokens)
    hit = bm.get_computed_blocks(seq)
    assert bm.allocate_slots(seq, len(tokens) - len(hit) * bm.block_size, hit)
    seq.num_computed_tokens = len(tokens)
    return seq


def both(num_blocks: int, block_size: int) -> tuple[BlockManager, ReferenceBlockManager]:
    return BlockManager(num_blocks, block_size), ReferenceBlockManager(num_blocks, block_size)


def chain(tokens: list[int], block_size: int, n: int) -> list[int]:
    hashes, parent = [], NO_PARENT
    for i in range(n):
        parent = hash_block(parent, tokens[i * block_size:(i + 1) * block_size])
        hashes.append(parent)
    return hashes


def test_a_prompt_alone_with_its_first_block_hashes_only_that_block() -> None:
    bm = BlockManager(32, 4)
    seq = admit(bm, list(range(40)))
    assert len(seq.block_hashes) == 1 and not bm.cached  # ten full blocks, one hash
    assert len(bm.cache.lazy) == 1
    expected = chain(list(range(40)), 4, 10)
    assert [bm.blocks[b].block_hash for b in seq.block_table] == expected


def test_the_first_lookup_with_that_block_hashes_the_prefix_and_hits() -> None:
    tokens = list(range(40))
    for bm in both(32, 4):
        first = admit(bm, tokens)
        again = Sequence(tokens + [7])
        assert bm.get_computed_blocks(again) == first.block_table
    bm = both(32, 4)[0]
    admit(bm, tokens)
    admit(bm, tokens + [7])
    assert not bm.cache.lazy and len(bm.cached) == 10  # hashed, into the cache


def test_lazy_blocks_are_evicted_lru_and_tail_first() -> None:
    """test_block_manager's LRU case, with the evicted blocks unhashed when evicted."""
    results = []
    for bm in both(6, 2):
        old = admit(bm, [1, 2, 3, 4, 5])
        old_blocks = list(old.block_table)
        bm.free(old)
        bm.free(admit(bm, [9, 9, 9, 9, 9, 9]))
        victim = admit(bm, [7, 7])
        hit = bm.get_computed_blocks(Sequence([1, 2, 3, 4, 5]))
        results.append((old_blocks, victim.block_table, hit))
    assert results[0] == results[1]
    old_blocks, victim, hit = results[0]
    assert victim == [old_blocks[2]] and hit == old_blocks[:2]


def test_a_shared_first_block_hashes_the_other_sequence_first() -> None:
    """Published without a lookup (as calibration does): the second one finds a twin."""
    results = []
    for bm in both(16, 2):
        a, b = Sequence([1, 2, 3, 4, 5]), Sequence([1, 2, 3, 4, 6])
        for seq in (a, b):
            assert bm.allocate_slots(seq, 5)
        results.append((a.block_content_ids, b.block_content_ids, dict(bm.cached)))
    assert results[0] == results[1]
    assert results[0][0] == results[0][1]  # b's blocks are twins of a's


def test_reset_prefix_cache_evicts_free_lazy_blocks_too() -> None:
    hits = []
    for bm in both(16, 4):
        bm.free(admit(bm, list(range(12))))
        held = admit(bm, list(range(100, 112)))
        bm.reset_prefix_cache()
        hits.append((bm.get_computed_blocks(Sequence(list(range(13)))),
                     bm.get_computed_blocks(Sequence(list(range(100, 113)))), held.block_table))
    assert hits[0] == hits[1]
    assert hits[0][0] == [] and hits[0][1] == hits[0][2]


def test_prefixes_whose_blocks_were_all_evicted_are_forgotten() -> None:
    bm = BlockManager(8, 4)
    for i in range(5000):
        bm.free(admit(bm, [i] * 8))
    assert len(bm.cache.lazy) <= 1024


def test_free_queue_skips_the_stale_entries_of_revived_blocks() -> None:
    refs = [1, 1, 1, 1]
    queue = FreeBlockQueue()
    queue.release([0, 1, 2, 3], refs)
    queue.remove(1)      # revived by a prefix hit
    refs[1] = 1
    queue.release([1], refs)  # freed again: queued behind the others
    assert list(queue) == [0, 2, 3, 1] and len(queue) == 4 and 1 in queue
    assert queue.pop_front(2) == [0, 2]
    assert queue.pop_front(2) == [3, 1] and len(queue) == 0
