"""BlockManager step by step, without a model: exact block ids, refcounts, free order and eviction order.

Block size 4 throughout; a pool of 8 blocks has 7 usable ones (block 0 is the reserved null block).
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from thaw_rl.engine.block_manager import BlockManager, KVCacheExhaustedError, hash_block_tokens
from thaw_rl.engine.session import Session

BS = 4


def session(tokens, computed: int = 0) -> Session:
    return Session(engine_id=0, token_ids=list(tokens), num_prompt_tokens=len(tokens), num_computed=computed)


def computed(bm: BlockManager, tokens) -> Session:
    """A session whose tokens all went through the model: blocks allocated, full blocks registered."""
    s = session(tokens)
    bm.allocate(s, len(tokens))
    s.num_computed = len(tokens)
    bm.register_full(s)
    return s


def refcounts(bm: BlockManager, ids) -> list[int]:
    return [bm.ref_count(b) for b in ids]


def test_append_blocks_hands_out_what_one_allocate_per_session_would():
    """One block for each of many sessions in one take (the async decode loop's boundary step): the same ids, in
    the same order, as allocating them one by one: fresh, then freed uncached, then cached least recent first."""
    def pool():
        bm = BlockManager(9, BS)
        cached, plain = computed(bm, range(8)), session(range(3))
        bm.allocate(plain, 3)
        bm.free(plain)  # block 3: free, no hash
        bm.free(cached)  # blocks 2, 1: free and cached (the tail first)
        rows = [session(range(4), 4) for _ in range(9)]
        for r in rows:
            r.block_table = [0]  # a stand-in first block (the null block): each row's next token starts block 1
        return bm, rows

    bm, rows = pool()
    ids = bm.append_blocks(rows[:7])
    one, one_rows = pool()
    for r in one_rows[:7]:
        one.allocate(r, 5)
    assert ids == [4, 5, 6, 7, 8, 3, 2] == [r.block_table[1] for r in one_rows[:7]]
    assert [r.block_table for r in rows] == [r.block_table for r in one_rows]
    assert bm.num_cached_blocks == one.num_cached_blocks == 1 and refcounts(bm, ids) == [1] * 7
    with pytest.raises(RuntimeError, match="call can_allocate first"):
        bm.append_blocks(rows[7:])  # two rows, one free block


def test_fresh_blocks_come_in_id_order_and_a_free_releases_the_tail_first():
    bm = BlockManager(8, BS)
    a = session(range(10))
    bm.allocate(a, 10)
    assert a.block_table == [1, 2, 3]
    assert refcounts(bm, [0, 1, 2, 3]) == [1, 1, 1, 1]  # the null block is held forever
    assert (bm.num_used_blocks, bm.num_free_blocks) == (3, 4)
    bm.allocate(a, 13)  # one more token past 12 needs a fourth block
    assert a.block_table == [1, 2, 3, 4]
    bm.free(a)
    assert a.block_table == [] and refcounts(bm, [1, 2, 3, 4]) == [0, 0, 0, 0]
    b = session(range(100, 128))
    bm.allocate(b, 28)  # 7 blocks: the never-used ones first, then the freed ones, tail first
    assert b.block_table == [5, 6, 7, 4, 3, 2, 1]
    assert bm.num_free_blocks == 0 and not bm.can_allocate(1)
    with pytest.raises(RuntimeError, match="call can_allocate first"):
        bm.allocate(session(range(3)), 3)


def test_full_blocks_are_registered_and_a_second_prompt_shares_them():
    bm = BlockManager(8, BS)
    a = computed(bm, range(10))  # blocks 1, 2 full, 3 partial
    assert bm.num_cached_blocks == 2 and len(a.block_hashes) == 2
    assert a.block_hashes[1] == hash_block_tokens(hash_block_tokens(None, [0, 1, 2, 3]), [4, 5, 6, 7])
    b = session(list(range(9)) + [99])
    assert bm.match_prefix(b) == 8
    assert b.block_table == [1, 2] and b.num_computed == 8
    assert refcounts(bm, [1, 2, 3]) == [2, 2, 1]
    c = session(range(8))  # exactly two full blocks: the last token is left to compute, so only one matches
    assert bm.match_prefix(c) == 4 and c.block_table == [1]
    d = session([0, 1, 2, 3, 5, 5, 5, 5, 5])  # differs in block 1: the chain stops there
    assert bm.match_prefix(d) == 4 and d.block_table == [1]
    assert refcounts(bm, [1, 2]) == [4, 2]


def test_a_different_salt_never_matches():
    bm = BlockManager(8, BS, salt=b"weights-v0")
    computed(bm, range(10))
    other = BlockManager(8, BS, salt=b"weights-v1")
    assert other.chain_hashes(list(range(10)), 2) != bm.chain_hashes(list(range(10)), 2)
    bm.reset_prefix_cache(salt=b"weights-v1")
    assert bm.num_cached_blocks == 0
    assert bm.match_prefix(session(range(10))) == 0


def test_freed_cached_blocks_stay_findable_and_are_evicted_last_least_recent_first():
    bm = BlockManager(8, BS)
    a = computed(bm, range(10))  # 1, 2 cached; 3 partial
    b = computed(bm, range(50, 59))  # 4, 5 cached; 6 partial
    bm.free(a)  # 3 goes to the uncached free set; 2 then 1 to the cached LRU set
    bm.free(b)  # 6 uncached; 5 then 4 cached
    assert bm.num_free_blocks == 7 and bm.num_cached_blocks == 4
    c = session(range(10))
    assert bm.match_prefix(c) == 8 and c.block_table == [1, 2]  # revived from the free set
    assert refcounts(bm, [1, 2]) == [1, 1] and bm.num_free_blocks == 5
    d = session(range(200, 220))
    bm.allocate(d, 4)  # never-used first: 7
    bm.allocate(d, 12)  # then uncached freed ones in free order: 3, 6
    assert d.block_table == [7, 3, 6]
    assert bm.num_cached_blocks == 4
    bm.allocate(d, 16)  # then the cached LRU: 5 was freed before 4, so it is evicted first
    assert d.block_table[-1] == 5
    assert bm.num_cached_blocks == 3
    assert bm.lookup(b.block_hashes[1]) is None and bm.lookup(b.block_hashes[0]) == 4


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    bm = BlockManager(8, BS)
    parent = computed(bm, range(10))  # [1, 2, 3]
    kids = [session(range(10)) for _ in range(3)]
    copies = bm.fork(parent, kids, num_computed=10)
    assert copies == [(3, 4), (3, 5), (3, 6)]
    assert [k.block_table for k in kids] == [[1, 2, 4], [1, 2, 5], [1, 2, 6]]
    assert all(k.block_hashes == parent.block_hashes for k in kids)
    assert refcounts(bm, [1, 2, 3, 4]) == [4, 4, 1, 1]
    more = [session(range(10)) for _ in range(2)]
    with pytest.raises(KVCacheExhaustedError, match="fork\\(n=2\\) needs 2 free KV blocks"):
        bm.fork(parent, more, num_computed=10)  # one block left
    assert refcounts(bm, [1, 2]) == [4, 4] and bm.num_free_blocks == 1  # nothing changed
    aligned = [session(range(8))]
    assert bm.fork(parent, aligned, num_computed=8) == []  # at a block boundary nothing is copied
    assert aligned[0].block_table == [1, 2] and refcounts(bm, [1, 2]) == [5, 5]
    for k in kids + aligned:
        bm.free(k)
    assert refcounts(bm, [1, 2, 3]) == [1, 1, 1] and bm.num_free_blocks == 4


def test_preempt_drops_the_kv_and_keeps_the_tokens():
    bm = BlockManager(8, BS)
    s = computed(bm, range(10))
    bm.preempt(s)
    assert (s.block_table, s.block_hashes, s.num_computed, s.num_tokens) == ([], [], 0, 10)
    assert bm.num_used_blocks == 0 and bm.num_cached_blocks == 2  # still findable by a later prompt


def test_hold_and_release_keep_blocks_alive_past_a_free():
    bm = BlockManager(8, BS)
    s = computed(bm, range(6))  # [1, 2]
    bm.hold(s.block_table)
    bm.free(s)
    assert refcounts(bm, [1, 2]) == [1, 1] and bm.num_free_blocks == 5
    bm.release([1, 2])
    assert bm.num_free_blocks == 7
    with pytest.raises(RuntimeError, match="refcount 0"):
        bm.release([1])
    with pytest.raises(RuntimeError, match="not in use"):
        bm.hold([1])


def test_adopt_shares_cached_blocks_allocates_the_rest_and_registers_nothing():
    bm = BlockManager(8, BS)
    tokens = list(range(10))
    hashes = bm.chain_hashes(tokens, 2)
    snap = SimpleNamespace(token_ids=tokens, block_hashes=hashes)
    computed(bm, range(6))  # caches block 1 = tokens 0..3 (the snapshot's first block); 2 partial
    adoption = bm.adopt(snap, num_computed=10)
    assert adoption.block_table == [1, 3, 4] and adoption.num_shared == 1
    assert (adoption.fresh_positions, adoption.fresh_block_ids) == ([1, 2], [3, 4])
    assert bm.lookup(hashes[1]) is None  # registered only once the caller has written the KV
    restored = session(tokens, computed=10)
    restored.block_table = adoption.block_table
    bm.register_full(restored)
    assert bm.lookup(hashes[1]) == 3 and restored.block_hashes == hashes
    with pytest.raises(ValueError, match="do not match its token ids"):
        bm.adopt(SimpleNamespace(token_ids=tokens, block_hashes=hashes[::-1]), num_computed=10)
    big = list(range(300, 330))
    with pytest.raises(KVCacheExhaustedError, match="restore needs 8 free KV blocks"):
        bm.adopt(SimpleNamespace(token_ids=big, block_hashes=bm.chain_hashes(big, 7)), num_computed=30)
    assert bm.num_free_blocks == 3  # unchanged by the refused restore


def test_grow_appends_never_used_blocks():
    bm = BlockManager(4, BS)
    s = computed(bm, range(12))  # [1, 2, 3]
    bm.grow(6)
    assert bm.num_free_blocks == 2
    bm.allocate(s, 20)
    assert s.block_table == [1, 2, 3, 4, 5]


def test_a_million_block_pool_builds_and_works_in_milliseconds():
    start = time.perf_counter()
    bm = BlockManager(1_000_000, 16)
    built = time.perf_counter() - start
    s = session(range(100))
    start = time.perf_counter()
    bm.allocate(s, 100)
    kids = [session(range(100)) for _ in range(64)]
    s.num_computed = 100
    bm.register_full(s)
    bm.fork(s, kids, 100)
    for k in kids:
        bm.free(k)
    bm.free(s)
    used = time.perf_counter() - start
    assert bm.num_free_blocks == 999_999
    assert built < 0.25, f"building took {built:.3f} s"  # one list of 10^6 ints: ~5 ms unloaded
    assert used < 0.25, f"allocate/fork/free took {used:.3f} s"  # O(blocks touched), not O(pool)
