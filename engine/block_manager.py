"""Paged KV blocks with ref counts and a chained-xxhash prefix cache. Pure Python (no torch).

Free blocks sit in one queue ordered by when they were freed. Allocation takes the front, so a
freed block that still holds cached KV is evicted least-recently-used first, and stays
reusable by a prefix hit until then.

A hit is verified, not trusted to the hash: the block's tokens must match, and so must its
parent, by the content id the parent had when this block's KV was computed. By induction the
whole prefix is then the one the KV was computed from, even under a hash collision.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Sequence as SeqOf
from dataclasses import dataclass

import xxhash

from engine.sequence import Sequence

NO_PARENT = 0  # hash seed of the first block
ROOT = -1      # parent content id of the first block


def hash_block(parent_hash: int, token_ids: SeqOf[int]) -> int:
    """xxh3-64 of the parent block's hash followed by this block's token ids (int64 LE)."""
    h = xxhash.xxh3_64(parent_hash.to_bytes(8, "little"))
    h.update(array("q", token_ids).tobytes())
    return h.intdigest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None  # set while the block is published in the prefix cache
    token_ids: tuple[int, ...] = ()
    content_id: int = ROOT         # unique per publication
    parent_content_id: int = ROOT

    def unpublish(self) -> None:
        self.block_hash, self.token_ids = None, ()
        self.content_id = self.parent_content_id = ROOT


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0     # of which found in the cache

    def record(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.queries += num_query_tokens
        self.hits += num_hit_tokens

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.stats = PrefixCacheStats()
        self._next_content_id = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks if self.num_blocks else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache -------------------------------------------------------------------------

    def get_computed_blocks(self, seq: Sequence) -> list[int]:
        """Longest verified cached prefix of `seq`, in full blocks, never the whole sequence."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self._extend_hashes(seq, max_blocks)
        hit: list[int] = []
        parent = ROOT
        for i in range(max_blocks):
            block_id = self._lookup(seq.block_hashes[i], self._block_tokens(seq, i), parent)
            if block_id is None:
                break
            hit.append(block_id)
            parent = self.blocks[block_id].content_id
        return hit

    def _lookup(self, block_hash: int, tokens: tuple[int, ...], parent: int) -> int | None:
        block_id = self.cached.get(block_hash)
        if block_id is None:
            return None
        block = self.blocks[block_id]
        if block.token_ids != tokens or block.parent_content_id != parent:
            return None
        return block_id

    def _block_tokens(self, seq: Sequence, index: int) -> tuple[int, ...]:
        start = index * self.block_size
        return tuple(seq.token_ids[start:start + self.block_size])

    def _extend_hashes(self, seq: Sequence, num_full_blocks: int) -> None:
        hashes = seq.block_hashes
        while len(hashes) < num_full_blocks:
            parent = hashes[-1] if hashes else NO_PARENT
            hashes.append(hash_block(parent, self._block_tokens(seq, len(hashes))))

    def _cache_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Publish the blocks that `num_tokens` tokens fill completely.

        `seq.block_content_ids` records, per full block, the content id its KV is equal to:
        its own publication, or an identical block published first by another sequence.
        """
        num_full = num_tokens // self.block_size
        self._extend_hashes(seq, num_full)
        contents = seq.block_content_ids
        for i in range(len(contents), num_full):
            block = self.blocks[seq.block_table[i]]
            parent = contents[-1] if contents else ROOT
            if block.block_hash is None:
                tokens = self._block_tokens(seq, i)
                twin = self._lookup(seq.block_hashes[i], tokens, parent)
                if twin is not None:
                    contents.append(self.blocks[twin].content_id)
                    continue
                if seq.block_hashes[i] in self.cached:  # a hash collision: stay private
                    contents.append(self._new_content_id())
                    continue
                self._publish(block, seq.block_hashes[i], tokens, parent)
            contents.append(block.content_id)

    def _publish(self, block: Block, block_hash: int, tokens: tuple[int, ...],
                 parent: int) -> None:
        block.block_hash, block.token_ids, block.parent_content_id = block_hash, tokens, parent
        block.content_id = self._new_content_id()
        self.cached[block_hash] = block.block_id

    def _new_content_id(self) -> int:
        self._next_content_id += 1
        return self._next_content_id

    # -- allocation ---------------------------------------------------------------------------

    def can_allocate(self, seq: Sequence, num_new_tokens: int,
                     computed_blocks: SeqOf[int] = ()) -> bool:
        return self._num_blocks_to_take(seq, num_new_tokens, computed_blocks) \
            <= self.num_free_blocks

    def _num_blocks_to_take(self, seq: Sequence, num_new_tokens: int,
                            computed_blocks: SeqOf[int]) -> int:
        held = len(seq.block_table) + len(computed_blocks)
        total = seq.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        new = max(0, self.blocks_needed(total) - held)
        revived = sum(1 for b in computed_blocks if self.blocks[b].ref_count == 0)
        return new + revived

    def allocate_slots(self, seq: Sequence, num_new_tokens: int,
                       computed_blocks: SeqOf[int] = ()) -> bool:
        """Give `seq` blocks for `num_new_tokens` more tokens (after its prefix hit, if any).

        All or nothing: returns False and changes nothing when the free blocks do not suffice.
        """
        if not self.can_allocate(seq, num_new_tokens, computed_blocks):
            return False
        for block_id in computed_blocks:
            self._take(block_id)
            seq.block_table.append(block_id)
        total = seq.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        while len(seq.block_table) < self.blocks_needed(total):
            seq.block_table.append(self._take_free())
        if self.enable_prefix_caching:
            self._cache_full_blocks(seq, total)
        return True

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def _take_free(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict its cached content
            del self.cached[block.block_hash]
            block.unpublish()
        block.ref_count = 1
        return block_id

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references. Tail blocks go to the queue first so they are evicted first."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
        seq.block_table.clear()
        seq.block_content_ids.clear()

    def reset_prefix_cache(self) -> None:
        for block_id in self.free_queue:
            self.blocks[block_id].unpublish()
        self.cached = {h: b for h, b in self.cached.items() if self.blocks[b].ref_count > 0}
