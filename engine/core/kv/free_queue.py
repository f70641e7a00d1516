"""The free block queue: freed blocks in the order they were freed, the least recently freed
taken first (so cached content is evicted LRU). Pure Python (no torch)."""

from __future__ import annotations

from collections.abc import Iterator


class FreeBlockQueue:
    """Freed block ids, least recently freed first, with O(1) removal from the middle.

    Removing a block (a prefix hit revives it) leaves its entry in place, stale, and counts it
    in `_stale[block]`. A block's entries are in the order it was freed and only its last can
    be live, so a pop skips an entry exactly while its block has stale entries counted. While
    none is, pops are one list slice.
    """

    def __init__(self) -> None:
        self._ids: list[int] = []
        self._head = 0  # entries before it were popped
        self._base = 0  # entries ever dropped from the front of `_ids` (compaction)
        self._stale: dict[int, int] = {}  # block id -> its stale entries at or after the head
        self._live = 0

    def __len__(self) -> int:
        return self._live

    @property
    def num_popped(self) -> int:
        """Entries popped so far: the entry at position p (counting from the first ever
        queued) was popped, and its block taken, iff p < num_popped."""
        return self._base + self._head

    def __contains__(self, block_id: int) -> bool:
        return block_id in set(self)

    def __iter__(self) -> Iterator[int]:
        """The live entries, oldest first."""
        stale, live = dict(self._stale), []
        for b in self._ids[self._head:]:
            if stale.get(b):
                stale[b] -= 1
            else:
                live.append(b)
        return iter(live)

    def release(self, block_ids: list[int], ref_counts: list[int]) -> tuple[int, int]:
        """Drop one reference to each block; queue, in order, those no one holds any more.
        Returns (position of the first one queued, how many were)."""
        ids = self._ids
        before = len(ids)
        for b in block_ids:
            count = ref_counts[b] - 1
            ref_counts[b] = count
            if not count:
                ids.append(b)
        self._live += len(ids) - before
        return self._base + before, len(ids) - before

    def remove(self, block_id: int) -> None:
        self._stale[block_id] = self._stale.get(block_id, 0) + 1
        self._live -= 1

    def pop_front(self, n: int) -> list[int]:
        """The `n` least recently freed blocks (n <= len(self))."""
        head = self._head
        if not self._stale:
            out = self._ids[head:head + n]
            head += n
        else:
            out, ids, stale = [], self._ids, self._stale
            while len(out) < n:
                b = ids[head]
                head += 1
                if b not in stale:
                    out.append(b)
                elif stale[b] == 1:
                    del stale[b]
                else:
                    stale[b] -= 1
        self._live -= n
        if head > 4096 and 2 * head > len(self._ids):  # compact
            del self._ids[:head]
            self._base += head
            head = 0
        self._head = head
        return out
