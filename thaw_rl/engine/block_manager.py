"""BlockManager: the only code that changes block tables, refcounts and prefix-cache hashes.

Blocks are indices into the KV pool, not objects: the manager keeps one refcount per block in a flat
list, a ``hash -> block`` dict and a ``block -> hash`` dict for the full blocks it has registered, and
three free sets. So building a manager over a million blocks costs one list allocation, and every
operation costs O(blocks it touches), never O(blocks in the pool).

A block is in use (refcount > 0, in one or more sessions' block tables) or free (refcount 0). Free
blocks are handed out in this order:

1. never-used blocks, lowest id first (a counter, not a list: ``[next_fresh, num_blocks)``);
2. freed blocks that hold no prefix-cache entry, in the order they were freed;
3. freed blocks that still hold a prefix-cache entry, least recently freed first (LRU eviction).

So a cached prefix survives as long as any block without one is left (vLLM v1's ``block_pool.py`` keeps
one queue for 2 and 3; splitting them evicts cached KV only when nothing else is free). A cached free
block is taken back out of its set, not copied, when a later prompt with the same prefix matches it.

Full blocks are hashed by chaining (``hash_block_tokens``): block i's hash depends on every token of
blocks 0..i and on a salt that names the model and the weight version, so a prefix computed with other
weights is never matched. Block 0 is reserved as the null block (CUDA-graph padding rows write there).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from thaw_rl.engine.session import Session

if TYPE_CHECKING:
    from thaw_rl.engine.snapshot import KVSnapshot

NULL_BLOCK_ID = 0


class KVCacheExhaustedError(ValueError):
    """The KV pool cannot hold what was asked, even after preempting everything it may preempt."""


def hash_block_tokens(parent_hash: bytes | None, token_ids: Sequence[int], salt: bytes = b"") -> bytes:
    """Chained hash of one full block: depends on every token of the prefix, not just this block.

    SHA-256 over explicit bytes, so two processes (or a snapshot file read later) agree on the hash
    without sharing a Python hash seed. ``salt`` separates models and weight versions (``prefix_salt``).
    """
    h = hashlib.sha256()
    h.update(salt)
    h.update(parent_hash or b"root")
    h.update(len(token_ids).to_bytes(4, "little"))
    for t in token_ids:
        h.update(int(t).to_bytes(8, "little", signed=True))
    return h.digest()[:16]


def prefix_salt(fingerprint: dict, weight_version: int = 0) -> bytes:
    """The hash salt of an engine: its fingerprint (model, sizes, dtype) and the weight version."""
    return json.dumps(fingerprint, sort_keys=True).encode() + f"|weights-v{int(weight_version)}".encode()


@dataclass
class Adoption:
    """What ``adopt`` decided for a restore: the table, and which of its blocks the caller must write."""

    block_table: list[int]
    fresh_positions: list[int]  # indices into the snapshot's blocks that need their KV written
    fresh_block_ids: list[int]  # where to write them (same order)
    num_shared: int  # blocks taken from the prefix cache instead of written


class BlockManager:
    """Refcounts, free sets and the prefix cache of one KV pool of ``num_blocks`` blocks (block 0 reserved)."""

    def __init__(self, num_blocks: int, block_size: int, salt: bytes = b"") -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks}: need at least 2 (block 0 is reserved).")
        self.block_size = block_size
        self.salt = salt
        self._start_over(num_blocks)

    def _start_over(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        self._ref_counts[NULL_BLOCK_ID] = 1  # never freed, never handed out
        self._next_fresh = 1  # blocks [next_fresh, num_blocks) were never handed out
        self._free_uncached: deque[int] = deque()  # freed, no hash: first freed, first reused
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # freed, hashed: LRU order
        self._hash_of: dict[int, bytes] = {}  # block -> its prefix-cache hash (in use or free)
        self._cached: dict[bytes, int] = {}  # hash -> block

    # -- queries ---------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.num_blocks - self._next_fresh + len(self._free_uncached) + len(self._free_cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - 1 - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def lookup(self, block_hash: bytes) -> int | None:
        """The block holding this prefix hash, in use or free; ``None`` when not cached."""
        return self._cached.get(block_hash)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def num_blocks_to_reach(self, session: Session, num_tokens: int) -> int:
        """New blocks ``session`` needs so its table covers ``num_tokens`` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(session.block_table))

    def chain_hashes(self, token_ids: Sequence[int], num_full: int, parent: bytes | None = None,
                     start: int = 0) -> list[bytes]:
        """Hashes of full blocks ``start .. num_full - 1`` of ``token_ids``, chained from ``parent``."""
        bs, out = self.block_size, []
        for i in range(start, num_full):
            parent = hash_block_tokens(parent, token_ids[i * bs:(i + 1) * bs], self.salt)
            out.append(parent)
        return out

    # -- mutations: sessions -------------------------------------------------------------------------
    def match_prefix(self, session: Session) -> int:
        """Share the longest run of cached full blocks of a new session; returns the tokens it reused.

        The last token is always left to compute, so the session gets next-token logits from a forward.
        """
        if session.block_table:
            raise RuntimeError(f"match_prefix on {session!r}, which already has blocks")
        parent = None
        for i in range((session.num_tokens - 1) // self.block_size):
            (h,) = self.chain_hashes(session.token_ids, i + 1, parent, start=i)
            block_id = self._cached.get(h)
            if block_id is None:
                break
            self._share(block_id)
            session.block_table.append(block_id)
            session.block_hashes.append(h)
            parent = h
        session.num_computed = len(session.block_table) * self.block_size
        return session.num_computed

    def allocate(self, session: Session, num_tokens: int) -> None:
        """Extend the session's table to cover ``num_tokens`` tokens (ask ``can_allocate`` first)."""
        need = self.num_blocks_to_reach(session, num_tokens)
        session.block_table.extend(self._take(need))

    def append_blocks(self, sessions: Sequence[Session]) -> list[int]:
        """One new block at the end of each session's table, in order (ask ``can_allocate(len(sessions))``
        first); returns their ids. The same ids as ``allocate`` one session at a time, in one ``_take``: the
        async decode loop's step where 1,024 rows each start a block."""
        ids = self._take(len(sessions))
        for session, block_id in zip(sessions, ids):
            session.block_table.append(block_id)
        return ids

    def fork(self, parent: Session, children: Sequence[Session], num_computed: int) -> list[tuple[int, int]]:
        """Give each child the parent's first ``num_computed`` tokens of KV; returns (src, dst) block copies.

        Full blocks are shared (refcount + 1 per child); a partial last block is copied into a fresh block
        per child, because the children will write different tokens after it. Raises
        ``KVCacheExhaustedError`` (changing nothing) when there are not enough free blocks for the copies.
        """
        num_full, partial = divmod(num_computed, self.block_size)
        if partial and not self.can_allocate(len(children)):
            raise KVCacheExhaustedError(
                f"fork(n={len(children)}) needs {len(children)} free KV blocks for the children's partial blocks "
                f"but only {self.num_free_blocks} are free. Free sessions you no longer need or raise kv_cache_memory."
            )
        copies = []
        for child in children:
            if child.block_table:
                raise RuntimeError(f"fork into {child!r}, which already has blocks")
            for block_id in parent.block_table[:num_full]:
                self._share(block_id)
            child.block_table = list(parent.block_table[:num_full])
            child.block_hashes = list(parent.block_hashes[:num_full])
            if partial:
                (block_id,) = self._take(1)
                child.block_table.append(block_id)
                copies.append((parent.block_table[num_full], block_id))
        return copies

    def free(self, session: Session) -> None:
        """Release every block of the session (tail first, so its tail is evicted before its head)."""
        self.release(session.block_table)
        session.block_table = []

    def trim(self, session: Session) -> None:
        """Release the blocks past what the session's computed tokens need (tail first).

        The async decode loop allocates a block for a row's next token before it learns that the row
        stopped; trimming gives the table exactly the blocks a synchronous step would have left.
        """
        keep = self.blocks_for(session.num_computed)
        if len(session.block_table) > keep:
            self.release(session.block_table[keep:])
            del session.block_table[keep:]

    def preempt(self, session: Session) -> None:
        """Drop the session's KV; its tokens stay and are recomputed later from scratch.

        It does not re-match the prefix cache here: its own blocks were just freed and are still cached,
        so re-sharing them would free nothing and livelock the scheduler.
        """
        self.free(session)
        session.block_hashes = []
        session.num_computed = 0
        session.next_logits = None

    def register_full(self, session: Session) -> None:
        """Hash the session's newly computed full blocks and make them findable in the prefix cache."""
        num_full = session.num_computed // self.block_size
        start = len(session.block_hashes)
        if start >= num_full:
            return
        parent = session.block_hashes[-1] if session.block_hashes else None
        for i, h in enumerate(self.chain_hashes(session.token_ids, num_full, parent, start=start), start):
            session.block_hashes.append(h)
            self._register(session.block_table[i], h)

    def adopt(self, snapshot: KVSnapshot, num_computed: int) -> Adoption:
        """Blocks for a restored session holding the snapshot's first ``num_computed`` tokens.

        Full blocks the prefix cache already holds are shared; the rest are allocated for the caller to
        write. Nothing is registered here: the caller writes the KV, then calls ``register_full`` on the
        new session (or ``release`` on the table when the write failed). Raises ``KVCacheExhaustedError``
        and changes nothing when the pool is too small, ``ValueError`` when the snapshot's hashes do not
        match its tokens under this manager's salt.
        """
        num_blocks, num_full = self.blocks_for(num_computed), num_computed // self.block_size
        hashes = self.chain_hashes(snapshot.token_ids, num_full)
        if hashes != snapshot.block_hashes[:num_full]:
            raise ValueError(
                "the snapshot's block hashes do not match its token ids under this engine's fingerprint and weight "
                "version; it was edited or built by hand. Take the snapshot again with ThawEngine.snapshot."
            )
        cached = {i: b for i, h in enumerate(hashes) if (b := self._cached.get(h)) is not None}
        fresh = [i for i in range(num_blocks) if i not in cached]
        num_revived = sum(self._ref_counts[b] == 0 for b in cached.values())  # leave the free sets on share
        num_free = self.num_free_blocks - num_revived
        if len(fresh) > num_free:
            raise KVCacheExhaustedError(
                f"restore needs {len(fresh)} free KV blocks of {self.block_size} tokens ({len(cached)} more are "
                f"shared from the prefix cache) but only {num_free} are free. Free sessions you no longer need or "
                f"raise kv_cache_memory."
            )
        for block_id in cached.values():
            self._share(block_id)
        fresh_ids = self._take(len(fresh))
        table = [cached.get(i) for i in range(num_blocks)]
        for i, block_id in zip(fresh, fresh_ids):
            table[i] = block_id
        return Adoption(table, fresh, fresh_ids, len(cached))

    # -- mutations: blocks -----------------------------------------------------------------------------
    def hold(self, block_ids: Sequence[int]) -> None:
        """One more reference on blocks in use (a snapshot holds them while its copy reads them)."""
        for block_id in block_ids:
            if self._ref_counts[block_id] <= 0:
                raise RuntimeError(f"hold of block {block_id}, which is not in use")
            self._ref_counts[block_id] += 1

    def release(self, block_ids: Sequence[int]) -> None:
        """Drop one reference from each block, last to first; blocks reaching zero become free."""
        for block_id in reversed(block_ids):
            count = self._ref_counts[block_id]
            if block_id == NULL_BLOCK_ID or count <= 0:
                raise RuntimeError(f"release of block {block_id} with refcount {count}")
            self._ref_counts[block_id] = count - 1
            if count == 1:
                if block_id in self._hash_of:
                    self._free_cached[block_id] = None
                else:
                    self._free_uncached.append(block_id)

    def reset_prefix_cache(self, salt: bytes | None = None) -> None:
        """Forget every hash (after a weight update the cached KV is stale); optionally change the salt."""
        self._free_uncached.extend(self._free_cached)
        self._free_cached.clear()
        self._hash_of.clear()
        self._cached.clear()
        if salt is not None:
            self.salt = salt

    def grow(self, num_blocks: int) -> None:
        """Make the pool ``num_blocks`` long: the never-used range ``[next_fresh, num_blocks)`` gets longer."""
        if num_blocks < self.num_blocks:
            raise RuntimeError(f"grow({num_blocks}) would shrink a pool of {self.num_blocks} blocks")
        self._ref_counts.extend([0] * (num_blocks - self.num_blocks))
        self.num_blocks = num_blocks

    def reset(self, num_blocks: int) -> None:
        """Start over with a pool of ``num_blocks`` never-used blocks (every block must be free; the prefix cache
        is dropped). An engine whose pool is mapped on demand (``vmm_pool.py``) wakes up with only its first
        blocks mapped again, and ``grow``s the manager as it maps more."""
        if num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks}: need at least 2 (block 0 is reserved).")
        if self.num_used_blocks:
            raise RuntimeError(f"reset({num_blocks}) while sessions hold {self.num_used_blocks} blocks")
        self._start_over(num_blocks)

    # -- internals ---------------------------------------------------------------------------------
    def _take(self, n: int) -> list[int]:
        """Hand out ``n`` free blocks with refcount 1 (fresh, then uncached freed, then LRU cached)."""
        if n > self.num_free_blocks:
            raise RuntimeError(f"allocate({n}) with only {self.num_free_blocks} free blocks: call can_allocate first.")
        ids = []
        num_fresh = min(n, self.num_blocks - self._next_fresh)
        ids.extend(range(self._next_fresh, self._next_fresh + num_fresh))
        self._next_fresh += num_fresh
        while len(ids) < n and self._free_uncached:
            ids.append(self._free_uncached.popleft())
        while len(ids) < n:
            block_id, _ = self._free_cached.popitem(last=False)
            self._evict(block_id)
            ids.append(block_id)
        for block_id in ids:
            assert self._ref_counts[block_id] == 0, f"free block {block_id} has refcount {self._ref_counts[block_id]}"
            self._ref_counts[block_id] = 1
        return ids

    def _share(self, block_id: int) -> None:
        """One more reference; a free cached block comes back out of the LRU set."""
        if self._ref_counts[block_id] == 0:
            if block_id not in self._free_cached:
                raise RuntimeError(f"sharing free block {block_id}, which holds no prefix-cache entry")
            del self._free_cached[block_id]
        self._ref_counts[block_id] += 1

    def _register(self, block_id: int, block_hash: bytes) -> None:
        """Make a just-filled block findable (first writer wins: a duplicate stays unregistered)."""
        assert self._ref_counts[block_id] > 0, f"registering unreferenced block {block_id}"
        if block_id in self._hash_of or block_hash in self._cached:
            return
        self._hash_of[block_id] = block_hash
        self._cached[block_hash] = block_id

    def _evict(self, block_id: int) -> None:
        block_hash = self._hash_of.pop(block_id)
        del self._cached[block_hash]
