"""Refcounted KV blocks, a free list that doubles as an LRU prefix cache, and chained block hashes.

Blocks are plain data; ``BlockPool`` is their only mutator. A block is either in use (refcount > 0,
owned by one or more sessions' block tables) or free (refcount 0, on the free queue). A free block that
was full keeps its hash, so a later prompt with the same prefix can take it back from the free queue
instead of recomputing it (the same scheme as vLLM v1's ``block_pool.py``): eviction happens only when
the block is handed out again, oldest-freed first.

Block 0 is reserved as the null block: padded rows of a CUDA-graph batch write their KV there, so it is
never handed out.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

NULL_BLOCK_ID = 0


def hash_block_tokens(parent_hash: bytes | None, token_ids: Sequence[int], salt: bytes = b"") -> bytes:
    """Chained hash of one full block: depends on every token of the prefix, not just this block.

    SHA-256 over explicit bytes, so two processes (or a snapshot file read later) agree on the hash
    without sharing a Python hash seed. ``salt`` separates models (the engine passes its fingerprint).
    """
    h = hashlib.sha256()
    h.update(salt)
    h.update(parent_hash or b"root")
    h.update(len(token_ids).to_bytes(4, "little"))
    for t in token_ids:
        h.update(int(t).to_bytes(8, "little", signed=True))
    return h.digest()[:16]


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # set once the block is full and registered in the prefix cache


@dataclass
class BlockPool:
    """Owns every block's refcount and the prefix-cache map ``hash -> block``."""

    num_blocks: int
    blocks: list[Block] = field(init=False)
    _free: OrderedDict[int, None] = field(init=False)  # oldest-freed first; insertion order is LRU order
    _cached: dict[bytes, int] = field(init=False)

    def __post_init__(self) -> None:
        if self.num_blocks < 2:
            raise ValueError(f"num_blocks={self.num_blocks}: need at least 2 (block 0 is reserved).")
        self.blocks = [Block(i) for i in range(self.num_blocks)]
        self.blocks[NULL_BLOCK_ID].ref_count = 1  # never freed, never handed out
        self._free = OrderedDict((i, None) for i in range(1, self.num_blocks))
        self._cached = {}

    # -- queries ---------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - 1 - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def ref_count(self, block_id: int) -> int:
        return self.blocks[block_id].ref_count

    def lookup(self, block_hash: bytes) -> int | None:
        """The block holding this prefix hash, in use or free; ``None`` when not cached."""
        return self._cached.get(block_hash)

    # -- mutations -------------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """Hand out ``n`` fresh blocks (refcount 1), evicting the oldest free cached blocks."""
        if not self.can_allocate(n):
            raise RuntimeError(f"allocate({n}) with only {len(self._free)} free blocks: call can_allocate first.")
        ids = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            assert block.ref_count == 0, f"free block {block_id} has refcount {block.ref_count}"
            if block.block_hash is not None:  # evict it from the prefix cache
                if self._cached.get(block.block_hash) == block_id:
                    del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_count = 1
            ids.append(block_id)
        return ids

    def share(self, block_ids: Sequence[int]) -> None:
        """Add one reference to each block; a free cached block comes back from the free queue."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                assert block.block_hash is not None, f"sharing free uncached block {block_id}"
                del self._free[block_id]
            block.ref_count += 1

    def release(self, block_ids: Sequence[int]) -> None:
        """Drop one reference from each block; blocks reaching zero go to the back of the free queue.

        Release a sequence's blocks last-to-first so its tail is evicted before its head (the head is
        the prefix other prompts are most likely to share).
        """
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            if block_id == NULL_BLOCK_ID or block.ref_count <= 0:
                raise RuntimeError(f"release of block {block_id} with refcount {block.ref_count}")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None

    def register_full(self, block_id: int, block_hash: bytes) -> None:
        """Make a just-filled block findable by its chained hash (first writer wins on duplicates)."""
        block = self.blocks[block_id]
        assert block.ref_count > 0, f"registering unreferenced block {block_id}"
        if block.block_hash is not None:
            return
        block.block_hash = block_hash
        self._cached.setdefault(block_hash, block_id)

    def reset_prefix_cache(self) -> None:
        """Forget every hash (after a weight update the cached KV is stale)."""
        for block in self.blocks:
            block.block_hash = None
        self._cached.clear()
