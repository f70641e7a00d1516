"""The previous BlockManager (one object per block, an OrderedDict free queue), kept verbatim
as an oracle: the struct-of-arrays engine.core.kv.block_manager must behave exactly like it.
Its hash chain is xxh3 over (parent hash, token bytes), as engine.core.kv.block_manager's."""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Sequence as SeqOf
from dataclasses import dataclass

from xxhash import xxh3_64_intdigest

from engine.core.kv.block_manager import PrefixCacheStats
from engine.core.sequence import Sequence

NO_PARENT = 0  # hash seed of the first block
ROOT = -1      # parent content id of the first block


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None  # set while the block is published in the prefix cache
    # The tokens, kept as (a sequence's append-only token list, offset) to avoid copying.
    token_src: list[int] | None = None
    token_start: int = 0
    content_id: int = ROOT         # unique per publication
    parent_content_id: int = ROOT

    def unpublish(self) -> None:
        self.block_hash, self.token_src = None, None
        self.content_id = self.parent_content_id = ROOT


class ReferenceBlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks: dict[int, Block] = {}  # every block used so far
        self.next_fresh = 0  # blocks [next_fresh, num_blocks) were never used
        self.free_queue: OrderedDict[int, None] = OrderedDict()  # freed blocks, oldest first
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.stats = PrefixCacheStats()
        self._next_content_id = 0

    @property
    def num_free_blocks(self) -> int:
        return self.num_blocks - self.next_fresh + len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.next_fresh - len(self.free_queue)

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
            block_id = self._lookup(seq, i, parent)
            if block_id is None:
                break
            hit.append(block_id)
            parent = self.blocks[block_id].content_id
        return hit

    def _lookup(self, seq: Sequence, index: int, parent: int) -> int | None:
        """The cached block equal to `seq`'s block `index` after `parent`, verified."""
        block_id = self.cached.get(seq.block_hashes[index])
        if block_id is None:
            return None
        block, bs = self.blocks[block_id], self.block_size
        if block.parent_content_id != parent or block.token_src is None:
            return None
        start = index * bs
        theirs = block.token_src[block.token_start:block.token_start + bs]
        return block_id if theirs == seq.token_ids[start:start + bs] else None

    def _extend_hashes(self, seq: Sequence, num_full_blocks: int) -> None:
        """Chain hashes up to `num_full_blocks` (equal to hash_block, computed in bulk)."""
        hashes, bs = seq.block_hashes, self.block_size
        done = len(hashes)
        if done >= num_full_blocks:
            return
        data = array("q", seq.token_ids[done * bs:num_full_blocks * bs]).tobytes()
        parent = hashes[-1] if hashes else NO_PARENT
        width = 8 * bs
        for offset in range(0, len(data), width):
            parent = xxh3_64_intdigest(parent.to_bytes(8, "little")
                                       + data[offset:offset + width])
            hashes.append(parent)

    def _cache_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Publish the blocks that `num_tokens` tokens fill completely.

        `seq.block_content_ids` records, per full block, the content id its KV is equal to:
        its own publication, or an identical block published first by another sequence.
        """
        bs = self.block_size
        num_full = num_tokens // bs
        self._extend_hashes(seq, num_full)
        contents, hashes, table = seq.block_content_ids, seq.block_hashes, seq.block_table
        blocks, cached = self.blocks, self.cached
        for i in range(len(contents), num_full):
            block = blocks[table[i]]
            if block.block_hash is None:
                parent = contents[-1] if contents else ROOT
                if hashes[i] in cached:
                    twin = self._lookup(seq, i, parent)
                    # A twin holds identical KV; a mismatch is a hash collision: stay private.
                    contents.append(self._new_content_id() if twin is None
                                    else blocks[twin].content_id)
                    continue
                block.block_hash, block.parent_content_id = hashes[i], parent
                block.token_src, block.token_start = seq.token_ids, i * bs
                block.content_id = self._new_content_id()
                cached[block.block_hash] = block.block_id
            contents.append(block.content_id)

    def _new_content_id(self) -> int:
        self._next_content_id += 1
        return self._next_content_id

    # -- allocation ---------------------------------------------------------------------------

    def can_allocate(self, seq: Sequence, num_new_tokens: int,
                     computed_blocks: SeqOf[int] = ()) -> bool:
        return self._num_blocks_to_take(seq, num_new_tokens, computed_blocks)[1] \
            <= self.num_free_blocks

    def _num_blocks_to_take(self, seq: Sequence, num_new_tokens: int,
                            computed_blocks: SeqOf[int]) -> tuple[int, int]:
        """(total tokens after the step, blocks it takes from the free queue)."""
        bs = self.block_size
        total = seq.num_computed_tokens + len(computed_blocks) * bs + num_new_tokens
        new = max(0, (total + bs - 1) // bs - len(seq.block_table) - len(computed_blocks))
        if computed_blocks:  # cached blocks nobody holds are revived out of the free queue
            new += sum(1 for b in computed_blocks if self.blocks[b].ref_count == 0)
        return total, new

    def allocate_slots(self, seq: Sequence, num_new_tokens: int,
                       computed_blocks: SeqOf[int] = ()) -> bool:
        """Give `seq` blocks for `num_new_tokens` more tokens (after its prefix hit, if any).

        All or nothing: returns False and changes nothing when the free blocks do not suffice.
        """
        total, take = self._num_blocks_to_take(seq, num_new_tokens, computed_blocks)
        if take > self.num_free_blocks:
            return False
        table = seq.block_table
        for block_id in computed_blocks:
            self._take(block_id)
            table.append(block_id)
        self._take_free_into(table, (total + self.block_size - 1) // self.block_size - len(table))
        if self.enable_prefix_caching and \
                total // self.block_size > len(seq.block_content_ids):
            self._cache_full_blocks(seq, total)
        return True

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def _take_free_into(self, table: list[int], n: int) -> None:
        """Append `n` blocks from the front of the free queue (never-used ones first)."""
        fresh = min(n, self.num_blocks - self.next_fresh)
        if fresh > 0:
            start, self.next_fresh = self.next_fresh, self.next_fresh + fresh
            for block_id in range(start, start + fresh):
                self.blocks[block_id] = Block(block_id, ref_count=1)
            table.extend(range(start, start + fresh))
        pop, blocks, cached = self.free_queue.popitem, self.blocks, self.cached
        for _ in range(n - max(fresh, 0)):
            block = blocks[pop(last=False)[0]]
            if block.block_hash is not None:  # evict its cached content
                del cached[block.block_hash]
                block.unpublish()
            block.ref_count = 1
            table.append(block.block_id)

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
