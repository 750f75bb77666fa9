"""Scheduler step by step, without a model: token budget, row budget, chunking, preemption order."""

from __future__ import annotations

import pytest

from thaw_rl.engine.block_manager import BlockManager, KVCacheExhaustedError
from thaw_rl.engine.scheduler import Scheduler
from thaw_rl.engine.session import Session

BS = 4


def session(n: int, start: int = 0) -> Session:
    return Session(engine_id=0, token_ids=list(range(start, start + n)), num_prompt_tokens=n)


def step(sched: Scheduler, pending) -> list[tuple[int, int, int]]:
    """Schedule one step and run it (mark the chunks computed); returns (session id, start, num_new)."""
    chunks = sched.schedule(pending)
    out = [(c.session.session_id, c.start, c.num_new) for c in chunks]
    for c in chunks:
        c.session.num_computed = c.end
    return out


def test_the_token_budget_chunks_a_long_prompt_and_packs_the_rest_behind_it():
    bm = BlockManager(32, BS)
    sched = Scheduler(bm, max_num_batched_tokens=6, max_num_seqs=8)
    a, b = session(10), session(3, 100)
    assert step(sched, [a, b]) == [(a.session_id, 0, 6)]
    assert a.block_table == [1, 2] and b.block_table == []
    assert step(sched, [a, b]) == [(a.session_id, 6, 4), (b.session_id, 0, 2)]
    assert a.block_table == [1, 2, 3] and b.block_table == [4]
    assert step(sched, [b]) == [(b.session_id, 2, 1)]


def test_the_row_budget_caps_the_sessions_per_step():
    bm = BlockManager(32, BS)
    sched = Scheduler(bm, max_num_batched_tokens=100, max_num_seqs=2)
    sessions = [session(3, 10 * i) for i in range(3)]
    assert [sid for sid, _, _ in step(sched, sessions)] == [s.session_id for s in sessions[:2]]
    assert sessions[2].block_table == []


def test_a_chunk_shrinks_to_what_the_free_blocks_hold():
    bm = BlockManager(5, BS)  # 4 usable blocks = 16 tokens
    sched = Scheduler(bm, max_num_batched_tokens=100, max_num_seqs=8)
    a, b = session(10), session(10, 100)
    assert step(sched, [a, b]) == [(a.session_id, 0, 10), (b.session_id, 0, 4)]
    assert (a.block_table, b.block_table, bm.num_free_blocks) == ([1, 2, 3], [4], 0)
    assert step(sched, [b]) == []  # b's block is full and none is free: nothing fits


def test_make_room_preempts_finished_sessions_first_then_the_newest_pending():
    bm = BlockManager(6, BS)  # 5 usable blocks
    sched = Scheduler(bm, max_num_batched_tokens=100, max_num_seqs=8)
    done, head, newest = session(4), session(8, 100), session(8, 200)
    step(sched, [done, head, newest])
    assert (done.block_table, head.block_table, newest.block_table) == ([1], [2, 3], [4, 5])
    head.token_ids.append(7)
    newest.token_ids.append(8)
    assert step(sched, [head, newest]) == []  # both need a third block; none is free
    victim = sched.make_room([done, head, newest], [head, newest], generating=True)
    assert victim is done and done.block_table == [] and done.num_computed == 0
    victim = sched.make_room([done, head, newest], [head, newest], generating=True)
    assert victim is newest and newest.block_table == [] and newest.num_computed == 0
    assert newest.num_tokens == 9  # its tokens are kept
    assert step(sched, [head, newest]) == [(head.session_id, 8, 1), (newest.session_id, 0, 8)]
    assert head.block_table == [2, 3, 1]  # freed blocks in the order they were freed: 1, then 5 and 4
    assert newest.block_table == [5, 4]


def test_make_room_never_preempts_the_head_and_says_who_holds_the_pool():
    bm = BlockManager(3, BS)  # 2 usable blocks
    sched = Scheduler(bm, max_num_batched_tokens=100, max_num_seqs=8)
    head = session(12)
    step(sched, [head])
    assert head.num_computed == 8
    with pytest.raises(KVCacheExhaustedError, match="no other session holds any"):
        sched.make_room([head], [head], generating=True)
    bm.free(head)
    other = session(4, 50)
    bm.allocate(other, 4)
    head2 = session(12, 100)
    with pytest.raises(KVCacheExhaustedError, match="0 by other sessions of this call and 1 by sessions outside it"):
        sched.make_room([head2], [head2], generating=False)


def test_preempt_to_finish_frees_enough_for_the_rest_to_reach_max_tokens_in_one_go():
    """Blocks ran out with four rows of 2 blocks each, every one of which needs 2 more to reach its final length:
    the finished session goes first, then the newest rows, until the rest fit; the head never goes."""
    bm = BlockManager(11, BS)  # 10 usable blocks
    sched = Scheduler(bm, max_num_batched_tokens=100, max_num_seqs=8)
    done = session(8, 900)
    rows = [session(8, 100 * i) for i in range(4)]
    step(sched, [done, *rows])
    assert bm.num_free_blocks == 0 and [len(r.block_table) for r in rows] == [2, 2, 2, 2]
    final = [16] * 4  # 4 blocks each at the end: 2 more each
    victims = sched.preempt_to_finish([done, *rows], rows, final)
    # done frees 2 (need still 8 > 2); rows[3] frees 2 and drops its need of 2 (6 > 4); rows[2]: 4 <= 6
    assert victims == [done, rows[3], rows[2]]
    assert bm.num_free_blocks == 6 and all(v.block_table == [] and v.num_computed == 0 for v in victims)
    assert [len(r.block_table) for r in rows[:2]] == [2, 2]
    assert sched.preempt_to_finish([done, *rows], rows[:2], final[:2]) == []  # they fit now: nobody else goes
    # the head alone is never preempted, even when it cannot fit
    assert sched.preempt_to_finish([rows[0]], rows[:1], [400]) == []


def test_rows_recomputing_one_prefix_compute_it_once_then_share_it_from_the_cache():
    """Three preempted rows of one group (same 9-token prompt, different tails) and an unrelated row: the first
    of the group computes the shared blocks, the other two wait one step and then match them (the
    unrelated row runs alongside); a row whose blocks are still cached takes them without computing."""
    bm = BlockManager(32, BS)
    sched = Scheduler(bm, max_num_batched_tokens=100, max_num_seqs=8)
    prompt = list(range(9))
    rows = [Session(engine_id=0, token_ids=prompt + [50 + i, 60 + i], num_prompt_tokens=9) for i in range(3)]
    other = session(6, 300)
    assert step(sched, [*rows, other]) == [(rows[0].session_id, 0, 11), (other.session_id, 0, 6)]
    bm.register_full(rows[0])  # the engine registers full blocks after each step
    assert rows[1].block_table == [] and rows[2].block_table == []
    assert step(sched, rows[1:]) == [(rows[1].session_id, 8, 3), (rows[2].session_id, 8, 3)]
    assert rows[1].block_table[:2] == rows[0].block_table[:2] == rows[2].block_table[:2]  # shared, not recomputed
    assert bm.ref_count(rows[0].block_table[0]) == 3
    bm.register_full(rows[1])
    bm.preempt(rows[1])  # its blocks are freed but stay cached...
    assert step(sched, [rows[1]]) == [(rows[1].session_id, 8, 3)]  # ...so it matches its full blocks back


def test_allocate_decode_gives_a_block_only_to_rows_starting_one_and_is_all_or_nothing():
    """The async decode loop's step: one token per row at known positions, blocks taken before the tokens are."""
    bm = BlockManager(num_blocks=6, block_size=BS)
    sched = Scheduler(bm, max_num_batched_tokens=64, max_num_seqs=8)
    a, b = session(4), session(3)
    bm.allocate(a, 4)  # block 1, full after 4 tokens
    bm.allocate(b, 3)  # block 2
    assert sched.allocate_decode([a, b], [4, 3]) == [(0, 1, 3)]  # a's position 4 starts block column 1
    assert a.block_table == [1, 3] and b.block_table == [2]
    assert sched.allocate_decode([a, b], [5, 4]) == [(1, 1, 4)]
    c = session(8)
    bm.allocate(c, 4)  # block 5: the pool is now empty
    assert bm.num_free_blocks == 0
    assert sched.allocate_decode([b, c], [5, 4]) is None  # c needs a block, none is free: nothing taken
    assert c.block_table == [5] and b.block_table == [2, 4]
    assert sched.allocate_decode([], []) == [] and sched.allocate_decode([b], [6]) == []
    bm.free(a)
    with pytest.raises(RuntimeError, match="decode position 8 .* is past the block after its table's last"):
        sched.allocate_decode([c], [8])  # c's table covers tokens 0-3: position 8 would need two blocks
