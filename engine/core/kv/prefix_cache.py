"""The prefix cache: full KV blocks published under a chained xxhash and found again by it.
Pure Python (no torch).

A block's hash chains its parent's (xxh3 over the parent's hash, then the token ids), so equal
hashes mean equal prefixes. A hit is verified, not trusted to the hash: the block's tokens must
match, and so must its parent, by the content id the parent had when this block's KV was
computed. By induction the whole prefix is then the one the KV was computed from, even under a
hash collision.

Lazy publication. Hashing every full block costs more than the rest of a block's bookkeeping.
A sequence whose first block no other cached block starts with (its *root*, the first block's
hash, is unknown to the cache) can meet no lookup and no publication of another sequence until
one with the same root comes: its blocks are published as a `LazyPrefix`, without their hashes.
The first lookup or publication with that root hashes them (`materialize`) into the cache, as
eager publication would have put them; a sequence pays one hash otherwise. The results are
eager publication's, except under a 64-bit collision of an unhashed block's chain hash with
another block's: which of the two stays cached may then differ (hits are verified either way).

A lazy prefix costs next to nothing per block. Its blocks get their content ids when hashed
(only whether two blocks' ids are equal matters, never their values). And its owner frees all
its blocks at once, as one run of free-queue entries, a block being evicted exactly when the
queue's front passes its entry: a lazy block is alive while its owner holds it or its entry is
not yet popped.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence as SeqOf
from dataclasses import dataclass
from itertools import repeat
from typing import Protocol

from xxhash import xxh3_64_intdigest

from engine.core.sequence import Sequence

NO_PARENT = 0  # hash seed of the first block
ROOT = -1      # parent content id of the first block
PENDING = 0    # the content id of a lazily published block, until it is hashed

# A block published with its hash: (block hash, content id, parent content id, token source,
# token start). The tokens are (a sequence's append-only token list, offset): never copied.
Published = tuple[int, int, int, SeqOf[int], int]
HASH, CONTENT, PARENT, SRC, START = range(5)


def token_bytes(token_ids: SeqOf[int]) -> bytes:
    """The ids as int64 little-endian bytes ('Q' converts faster, same bytes when >= 0)."""
    if isinstance(token_ids, array) and token_ids.typecode == "q":  # a Sequence's own
        return token_ids.tobytes()
    try:
        return array("Q", token_ids).tobytes()
    except OverflowError:
        return array("q", token_ids).tobytes()


def hash_block(parent_hash: int, token_ids: SeqOf[int]) -> int:
    """xxh3-64 of the parent block's hash (8 bytes LE) then the token ids (int64 LE each)."""
    return xxh3_64_intdigest(parent_hash.to_bytes(8, "little") + token_bytes(token_ids))


def extend_chain(tokens: SeqOf[int], hashes: list[int], block_size: int,
                 num_blocks: int) -> None:
    """Append the chain hashes of `tokens`' blocks up to `num_blocks` (hash_block, in bulk)."""
    done = len(hashes)
    if done >= num_blocks:
        return
    data = token_bytes(tokens[done * block_size:num_blocks * block_size])
    parent = hashes[-1] if hashes else NO_PARENT
    width, append = 8 * block_size, hashes.append
    for offset in range(0, len(data), width):
        parent = xxh3_64_intdigest(parent.to_bytes(8, "little") + data[offset:offset + width])
        append(parent)


class FreeQueue(Protocol):
    @property
    def num_popped(self) -> int: ...


@dataclass(slots=True, eq=False)
class LazyPrefix:
    """The full blocks of one sequence, published without their hashes: block i is
    `table[i]`, and `contents` has one PENDING content id per block. The lists are the
    sequence's own (its tokens, block hashes, block table and block content ids), kept when it
    frees its blocks."""

    root: int              # the first block's hash
    tokens: SeqOf[int]
    hashes: list[int]      # as far as computed
    table: list[int]
    contents: list[int]
    # Once its owner freed its table of `freed_len` blocks: the free-queue position of the
    # entry of the table's last block (the table was queued tail first).
    freed_at: int | None = None
    freed_len: int = 0

    def is_owned_by(self, seq: Sequence) -> bool:
        """Whether `seq` publishes into it (it holds the prefix's blocks, none freed)."""
        return self.contents is seq.block_content_ids

    def is_alive(self, index: int, num_popped: int) -> bool:
        """Whether block `index` still holds its KV (its free-queue entry is not popped)."""
        return self.freed_at is None or self.freed_at + self.freed_len - 1 - index >= num_popped


class PrefixCache:
    def __init__(self, block_size: int, lazy_publication: bool, free_queue: FreeQueue):
        self.block_size = block_size
        self.lazy_publication = lazy_publication
        self.free_queue = free_queue
        self.published: list[Published | None] = []  # per block id: published with its hash
        self.cached: dict[int, int] = {}  # block hash -> id of the block publishing it
        self.lazy: dict[int, LazyPrefix] = {}  # root -> the one prefix with that root
        self.hashed_roots: set[int] = set()  # roots whose blocks may be in `cached`
        self._next_content_id = 0
        self._prune_at = 1024  # drop dead lazy prefixes when there are this many
        self.version = 0  # counts lazy prefixes made or hashed

    @property
    def is_empty(self) -> bool:
        """Whether no block is published with its hash (lazy ones need no eviction)."""
        return not self.cached

    def grow(self, num_blocks: int) -> None:
        self.published.extend([None] * num_blocks)

    def new_content_ids(self, n: int) -> range:
        first = self._next_content_id + 1
        self._next_content_id += n
        return range(first, first + n)

    # -- lookup -------------------------------------------------------------------------------

    def lookup(self, seq: Sequence) -> list[int]:
        """Longest verified cached prefix of `seq`, in full blocks, never the whole sequence."""
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        if max_blocks <= 0:
            return []
        prefix = self.lazy.get(self._root(seq))
        if prefix is not None:
            self.materialize(prefix)
        block_id = self._verified(seq, 0, ROOT)
        if block_id is None:
            return []
        extend_chain(seq.token_ids, seq.block_hashes, bs, max_blocks)
        hit = [block_id]
        for i in range(1, max_blocks):
            block_id = self._verified(seq, i, self.published[block_id][CONTENT])
            if block_id is None:
                break
            hit.append(block_id)
        return hit

    def _root(self, seq: Sequence) -> int:
        if not seq.block_hashes:
            extend_chain(seq.token_ids, seq.block_hashes, self.block_size, 1)
        return seq.block_hashes[0]

    def _verified(self, seq: Sequence, index: int, parent: int) -> int | None:
        """The cached block equal to `seq`'s block `index` after `parent`, verified."""
        block_id = self.cached.get(seq.block_hashes[index])
        if block_id is None:
            return None
        _, _, their_parent, src, start = self.published[block_id]
        if their_parent != parent:
            return None
        bs, mine = self.block_size, index * self.block_size
        return block_id if src[start:start + bs] == seq.token_ids[mine:mine + bs] else None

    # -- publication ----------------------------------------------------------------------------

    def publish(self, seq: Sequence, num_tokens: int) -> None:
        """Publish the blocks that `num_tokens` tokens fill completely.

        `seq.block_content_ids` records, per full block, the content id its KV is equal to:
        its own publication, or an identical block published first by another sequence.
        A table is the prefix hit (blocks published with their hash) then blocks only `seq`
        holds.
        """
        known = seq.num_tokens - seq.num_pending_tokens  # a pending token's id is unknown
        num_full = min(num_tokens, known) // self.block_size
        contents, table, published = seq.block_content_ids, seq.block_table, self.published
        i = len(contents)
        while i < num_full and published[table[i]] is not None:
            contents.append(published[table[i]][CONTENT])
            i += 1
        if i == num_full:
            return
        prefix = self.prefix_to_extend(seq)
        if prefix is not None:
            self.extend_lazily(prefix, num_full - i)
            return
        extend_chain(seq.token_ids, seq.block_hashes, self.block_size, num_full)
        new_hashes = seq.block_hashes[i:num_full]
        if self.cached.keys().isdisjoint(new_hashes) and \
                len(set(new_hashes)) == len(new_hashes):
            self.publish_new(seq, self.new_content_ids(num_full - i))
        else:
            for index in range(i, num_full):
                self._publish_one(seq, index)

    def prefix_to_extend(self, seq: Sequence) -> LazyPrefix | None:
        """The lazy prefix that `seq`'s next full blocks join, or None: publish them with their
        hashes. Another sequence's lazy prefix with the same root is hashed first."""
        root = self._root(seq)
        prefix = self.lazy.get(root)
        if prefix is not None:
            if prefix.is_owned_by(seq):
                return prefix
            self.materialize(prefix)
        elif self.lazy_publication and not seq.block_content_ids and \
                root not in self.hashed_roots and root not in self.cached:
            if len(self.lazy) >= self._prune_at:
                self._prune()
            prefix = self.lazy[root] = LazyPrefix(root, seq.token_ids, seq.block_hashes,
                                                  seq.block_table, seq.block_content_ids)
            self.version += 1
            return prefix
        if self.lazy_publication:
            self.hashed_roots.add(root)
        return None

    @staticmethod
    def extend_lazily(prefix: LazyPrefix, num_blocks: int) -> None:
        """Publish its owner's next `num_blocks` full blocks into a lazy prefix."""
        prefix.contents.extend(repeat(PENDING, num_blocks))

    def publish_new(self, seq: Sequence, content_ids: SeqOf[int]) -> None:
        """Publish `seq`'s next full blocks, hashed, as new contents: the cache holds none of
        their hashes (checked by the caller)."""
        contents, table, bs = seq.block_content_ids, seq.block_table, self.block_size
        first, end = len(contents), len(contents) + len(content_ids)
        parent = contents[-1] if contents else ROOT
        ids, hashes = table[first:end], seq.block_hashes[first:end]
        records = zip(hashes, content_ids, [parent, *content_ids[:-1]],
                      [seq.token_ids] * len(ids), range(first * bs, end * bs, bs), strict=True)
        published = self.published
        for block_id, record in zip(ids, records, strict=True):
            published[block_id] = record
        self.cached.update(zip(hashes, ids, strict=True))
        contents.extend(content_ids)

    def _publish_one(self, seq: Sequence, index: int) -> None:
        contents, block_id = seq.block_content_ids, seq.block_table[index]
        parent = contents[-1] if contents else ROOT
        block_hash = seq.block_hashes[index]
        if block_hash in self.cached:
            twin = self._verified(seq, index, parent)
            # A twin holds identical KV; a mismatch is a hash collision: stay private.
            contents.append(self.new_content_ids(1)[0] if twin is None
                            else self.published[twin][CONTENT])
            return
        content_id = self.new_content_ids(1)[0]
        self.published[block_id] = (block_hash, content_id, parent, seq.token_ids,
                                    index * self.block_size)
        self.cached[block_hash] = block_id
        contents.append(content_id)

    def materialize(self, prefix: LazyPrefix) -> None:
        """Hash a lazy prefix's live blocks into the cache, in order, and forget the prefix."""
        if self.lazy.get(prefix.root) is prefix:
            del self.lazy[prefix.root]
        self.hashed_roots.add(prefix.root)
        self.version += 1
        bs, published, cached = self.block_size, self.published, self.cached
        n = len(prefix.contents)
        extend_chain(prefix.tokens, prefix.hashes, bs, n)
        prefix.contents[:] = self.new_content_ids(n)  # the owner's, if it still runs
        popped, parent = self.free_queue.num_popped, ROOT
        for index, (block_id, content_id) in enumerate(zip(prefix.table[:n], prefix.contents,
                                                            strict=True)):
            block_hash = prefix.hashes[index]
            # Skip evicted blocks, and hash collisions (those stay private).
            if prefix.is_alive(index, popped) and block_hash not in cached:
                published[block_id] = (block_hash, content_id, parent, prefix.tokens, index * bs)
                cached[block_hash] = block_id
            parent = content_id

    def freed(self, seq: Sequence, first: int, count: int) -> None:
        """`seq` freed its table: `count` blocks queued from free-queue position `first`."""
        prefix = self.lazy.get(seq.block_hashes[0]) if seq.block_hashes else None
        if prefix is None or not prefix.is_owned_by(seq):
            return
        if count != len(seq.block_table):  # some blocks are shared: not one run of entries
            self.materialize(prefix)
            return
        prefix.freed_at, prefix.freed_len = first, count

    def lazy_blocks(self) -> dict[int, tuple[LazyPrefix, int]]:
        """Block id -> (its lazy prefix, its index), for the live lazy blocks (slow)."""
        popped = self.free_queue.num_popped
        return {block_id: (prefix, index) for prefix in self.lazy.values()
                for index, block_id in enumerate(prefix.table[:len(prefix.contents)])
                if prefix.is_alive(index, popped)}

    def _prune(self) -> None:
        """Forget the lazy prefixes whose blocks were all evicted."""
        popped = self.free_queue.num_popped
        self.lazy = {root: p for root, p in self.lazy.items() if p.is_alive(0, popped)}
        self._prune_at = max(1024, 2 * len(self.lazy))

    def drop_freed_prefixes(self) -> None:
        """Forget the lazy prefixes whose owner freed their blocks (they are being evicted)."""
        self.lazy = {root: p for root, p in self.lazy.items() if p.freed_at is None}

    # -- eviction -----------------------------------------------------------------------------

    def evict(self, block_ids: SeqOf[int]) -> None:
        """Drop what the blocks publish with their hash (they are about to hold other KV)."""
        published, cached = self.published, self.cached
        for block_id in block_ids:
            pub = published[block_id]
            if pub is not None:
                published[block_id] = None
                del cached[pub[HASH]]
