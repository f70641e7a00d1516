"""Paged KV blocks: ref counts, the free queue, allocation. Pure Python (no torch).

Block state is kept as lists indexed by block id (struct of arrays), so that a prompt's blocks
are taken, published and freed in bulk rather than one object at a time. Lists grow only as
never-used blocks are first handed out: start-up costs nothing per block, even with millions
of blocks.

Free blocks sit in one queue ordered by when they were freed. Allocation takes the front, so a
freed block that still holds cached KV is evicted least-recently-used first, and stays
reusable by a prefix hit until then. Never-used blocks come before every freed block. What the
cache holds, and how a hit is found and verified, is `engine.core.kv.prefix_cache`'s.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from collections.abc import Sequence as SeqOf
from dataclasses import dataclass

from engine.core.kv.free_queue import FreeBlockQueue
from engine.core.kv.prefix_cache import (  # noqa: F401  (hash_block, token_bytes: this module's API)
    CONTENT,
    HASH,
    PARENT,
    ROOT,
    SRC,
    START,
    LazyPrefix,
    PrefixCache,
    extend_chain,
    hash_block,
    token_bytes,
)
from engine.core.sequence import Sequence

NEVER = sys.maxsize  # a token count no sequence reaches


@dataclass(slots=True)
class Block:
    """A snapshot of one block's state (for inspection and tests)."""

    block_id: int
    ref_count: int = 0
    block_hash: int | None = None  # set while the block is published in the prefix cache
    token_src: SeqOf[int] | None = None
    token_start: int = 0
    content_id: int = ROOT         # unique per publication
    parent_content_id: int = ROOT


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


class BlocksView(Mapping[int, Block]):
    def __init__(self, manager: BlockManager):
        self._bm = manager
        self._lazy = manager.cache.lazy_blocks()

    def __len__(self) -> int:
        return self._bm.next_fresh

    def __iter__(self) -> Iterator[int]:
        return iter(range(self._bm.next_fresh))

    def __getitem__(self, block_id: int) -> Block:
        if not 0 <= block_id < self._bm.next_fresh:
            raise KeyError(block_id)
        ref_count, pub = self._bm.ref_counts[block_id], self._bm.cache.published[block_id]
        if block_id in self._lazy:
            return self._lazy_block(block_id, ref_count, *self._lazy[block_id])
        if pub is None:
            return Block(block_id, ref_count)
        return Block(block_id, ref_count, pub[HASH], pub[SRC], pub[START], pub[CONTENT],
                     pub[PARENT])

    def _lazy_block(self, block_id: int, ref_count: int, prefix: LazyPrefix,
                    index: int) -> Block:
        """A lazily published block, with the hash it will be published under and, for a
        content id, `provisional_content_id(block_id)` (it has none yet)."""
        bs = self._bm.block_size
        hashes = list(prefix.hashes)
        extend_chain(prefix.tokens, hashes, bs, index + 1)
        parent = provisional_content_id(prefix.table[index - 1]) if index else ROOT
        return Block(block_id, ref_count, hashes[index], prefix.tokens, index * bs,
                     provisional_content_id(block_id), parent)


def provisional_content_id(block_id: int) -> int:
    """Stands for a lazily published block's content id in snapshots (negative: unique)."""
    return -2 - block_id


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 lazy_publication: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.next_fresh = 0  # blocks [next_fresh, num_blocks) were never used
        self.ref_counts: list[int] = []     # per block id < next_fresh
        self.free_queue = FreeBlockQueue()  # freed blocks, oldest first
        self.cache = PrefixCache(block_size, lazy_publication, self.free_queue)
        self.stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        return self.num_blocks - self.next_fresh + len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.next_fresh - len(self.free_queue)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks if self.num_blocks else 0.0

    @property
    def blocks(self) -> BlocksView:
        """Every block handed out so far, by id, as snapshots (for inspection and tests)."""
        return BlocksView(self)

    @property
    def cached(self) -> dict[int, int]:
        """Block hash -> block id, for the blocks published with their hash."""
        return self.cache.cached

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, seq: Sequence) -> list[int]:
        """Longest verified cached prefix of `seq`, in full blocks, never the whole sequence."""
        return self.cache.lookup(seq) if self.enable_prefix_caching else []

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
            refs = self.ref_counts
            new += sum(1 for b in computed_blocks if refs[b] == 0)
        return total, new

    def allocate_slots(self, seq: Sequence, num_new_tokens: int,
                       computed_blocks: SeqOf[int] = ()) -> bool:
        """Give `seq` blocks for `num_new_tokens` more tokens (after its prefix hit, if any).

        All or nothing: returns False and changes nothing when the free blocks do not suffice.
        """
        if computed_blocks:
            total, take = self._num_blocks_to_take(seq, num_new_tokens, computed_blocks)
            if take > self.num_free_blocks:
                return False
            self._take_cached(computed_blocks)
            seq.block_table.extend(computed_blocks)
        else:
            total = seq.num_computed_tokens + num_new_tokens
        table, bs = seq.block_table, self.block_size
        if total > len(table) * bs:
            num_new = -(-total // bs) - len(table)
            if num_new > self.num_free_blocks:
                return False
            table.extend(self._take_free(num_new))
        if self.enable_prefix_caching and total // bs > len(seq.block_content_ids):
            self.cache.publish(seq, total)
        return True

    def decode_events(self, seq: Sequence) -> tuple[int, int]:
        """(the fewest tokens for which `allocate_slots` takes a block for `seq`, the fewest
        for which it publishes one), from its table and published blocks as they are: what
        a decode that grows one token a step does next to the block manager."""
        bs = self.block_size
        takes_at = len(seq.block_table) * bs + 1
        if not self.enable_prefix_caching:
            return takes_at, NEVER
        return takes_at, (len(seq.block_content_ids) + 1) * bs

    def _take_cached(self, block_ids: SeqOf[int]) -> None:
        refs = self.ref_counts
        for block_id in block_ids:
            if refs[block_id] == 0:
                self.free_queue.remove(block_id)
            refs[block_id] += 1

    def _take_free(self, n: int) -> list[int]:
        """`n` blocks from the front of the free queue (never-used ones first), held once."""
        block_ids = self._pop_free(n)
        self._claim(block_ids)
        return block_ids

    def _pop_free(self, n: int) -> list[int]:
        """The next `n` blocks to hand out, not yet claimed (ref count 0, content intact)."""
        fresh = min(n, self.num_blocks - self.next_fresh)
        if fresh <= 0:
            return self.free_queue.pop_front(n)
        start = self.next_fresh
        self.next_fresh += fresh
        self.ref_counts.extend([0] * fresh)
        self.cache.grow(fresh)
        block_ids = list(range(start, start + fresh))
        if n > fresh:
            block_ids.extend(self.free_queue.pop_front(n - fresh))
        return block_ids

    def _claim(self, block_ids: list[int]) -> None:
        """Hold popped blocks once, evicting the cached content they still hold."""
        refs = self.ref_counts
        for block_id in block_ids:
            refs[block_id] = 1
        if not self.cache.is_empty:
            self.cache.evict(block_ids)

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references. Tail blocks go to the queue first so they are evicted first."""
        first, count = self.free_queue.release(seq.block_table[::-1], self.ref_counts)
        if self.cache.lazy:
            self.cache.freed(seq, first, count)
        seq.block_table, seq.block_content_ids = [], []  # new lists: a lazy prefix keeps these

    def reset_prefix_cache(self) -> None:
        """Evict the cached content of every free block."""
        self.cache.evict(list(self.free_queue))
        self.cache.drop_freed_prefixes()

    # -- runs of decode steps ----------------------------------------------------------------

    def decode_blocks_needed(self, seqs: SeqOf[Sequence], num_steps: int | SeqOf[int]) -> int:
        """Blocks that `num_steps` decode steps of `seqs` (one token each per step; or, given
        one count per sequence, that many steps of each) take."""
        bs = self.block_size
        if isinstance(num_steps, int):
            num_steps = [num_steps] * len(seqs)
        return sum(max(0, (s.num_computed_tokens + k + bs - 1) // bs - len(s.block_table))
                   for s, k in zip(seqs, num_steps, strict=True))

    def max_decode_steps(self, seqs: SeqOf[Sequence], limit: int) -> int:
        """How many of the next `limit` decode steps of `seqs` get all their blocks."""
        free = self.num_free_blocks
        if self.decode_blocks_needed(seqs, limit) <= free:
            return limit
        lo, hi = 0, limit  # need(lo) <= free < need(hi); need is monotone in the steps
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.decode_blocks_needed(seqs, mid) <= free:
                lo = mid
            else:
                hi = mid
        return lo

    def allocate_decode_steps(self, seqs: SeqOf[Sequence], num_steps: int) -> list[int] | None:
        """Do what `num_steps` rounds of `allocate_slots(seq, 1)` for each of `seqs`, in order,
        do when every sequence's `num_computed_tokens` grows by one per round (the caller
        advances it). Each sequence must hold its tokens up to the last one computed.

        All or nothing: None when a round would run out of blocks. Otherwise the round of each
        block taken, in order (a decode takes a block when it starts one).
        """
        n = len(seqs)
        computed = [s.num_computed_tokens for s in seqs]
        takes = self._decode_keys(seqs, computed, num_steps, fills=False)
        if len(takes) > self.num_free_blocks:
            return None
        fillers = self._bulk_fillers(seqs, computed, num_steps) \
            if self.enable_prefix_caching else []
        if fillers is None:
            fills = self._decode_keys(seqs, computed, num_steps, fills=True)
            self._decode_in_order(seqs, computed, sorted(set(takes) | set(fills)))
            return [key // n for key in takes]
        if takes:
            tables = [s.block_table for s in seqs]
            for key, block_id in zip(takes, self._take_free(len(takes)), strict=True):
                tables[key % n].append(block_id)
        for seq, num_blocks, prefix in fillers:
            if prefix is not None:
                self.cache.extend_lazily(prefix, num_blocks)
            else:
                self.cache.publish_new(seq, self.cache.new_content_ids(num_blocks))
        return [key // n for key in takes]

    def _decode_keys(self, seqs: SeqOf[Sequence], computed: list[int], num_steps: int,
                     fills: bool) -> list[int]:
        """Sorted keys round * len(seqs) + index of each decode that takes a block (or, with
        `fills`, that fills one: it is then published)."""
        bs, n, end = self.block_size, len(seqs), num_steps * len(seqs)
        keys: list[int] = []
        for i, (seq, c) in enumerate(zip(seqs, computed, strict=True)):
            if fills:  # rounds that complete a block, and round 0 if one is pending
                first = (-c - 1) % bs
                if first and (c + 1) // bs > len(seq.block_content_ids) and end:
                    keys.append(i)
            else:  # the first round that overflows the table, then every block_size rounds
                first = max(0, len(seq.block_table) * bs - c)
            keys.extend(range(first * n + i, end, bs * n))
        keys.sort()
        return keys

    def _bulk_fillers(self, seqs: SeqOf[Sequence], computed: list[int], num_steps: int
                      ) -> list[tuple[Sequence, int, LazyPrefix | None]] | None:
        """The sequences whose blocks the run fills, with how many and how they publish them
        (into their lazy prefix, or None: hashed); or None when that cannot be done in bulk:
        a sequence's earlier full blocks are pending, or a hash to publish is not new (to the
        cache or to the others)."""
        bs = self.block_size
        if any(len(s.block_content_ids) != c // bs for s, c in zip(seqs, computed, strict=True)):
            return None
        fillers = [(s, (c + num_steps) // bs - c // bs) for s, c in zip(seqs, computed,
                                                                        strict=True)
                   if (c + num_steps) // bs > c // bs]
        prefixes = self._settle_publication([s for s, _ in fillers])
        hashes: list[int] = []
        for (seq, num_blocks), prefix in zip(fillers, prefixes, strict=True):
            if prefix is None:
                first = len(seq.block_content_ids)
                extend_chain(seq.token_ids, seq.block_hashes, bs, first + num_blocks)
                hashes.extend(seq.block_hashes[first:first + num_blocks])
        if hashes and (not self.cache.cached.keys().isdisjoint(hashes)
                       or len(set(hashes)) != len(hashes)):
            return None
        return [(s, k, p) for (s, k), p in zip(fillers, prefixes, strict=True)]

    def _settle_publication(self, seqs: list[Sequence]) -> list[LazyPrefix | None]:
        """How each sequence publishes. A pass that changed the lazy prefixes (made one, or
        hashed one two sequences share) is followed by another, which changes none."""
        version = self.cache.version
        prefixes = [self.cache.prefix_to_extend(s) for s in seqs]
        if self.cache.version != version:
            prefixes = [self.cache.prefix_to_extend(s) for s in seqs]
        return prefixes

    def _decode_in_order(self, seqs: SeqOf[Sequence], computed: list[int],
                         keys: list[int]) -> None:
        """The rounds one decode at a time, where one takes or fills a block."""
        bs, n = self.block_size, len(seqs)
        for key in keys:
            step, i = divmod(key, n)
            seq, total = seqs[i], computed[i] + step + 1
            if (total + bs - 1) // bs > len(seq.block_table):
                seq.block_table.extend(self._take_free(1))
            if total // bs > len(seq.block_content_ids):
                self.cache.publish(seq, total)
