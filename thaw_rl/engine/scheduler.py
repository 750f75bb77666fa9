"""Scheduler: which sessions run in the next engine step, and which one gives its KV back when none fits.

One step packs prefill chunks and decode tokens of many sessions into one forward, bounded by a token
budget (``max_num_batched_tokens``) and a row budget (``max_num_seqs``). Sessions are taken in queue
order; each gets as many of its uncomputed tokens as the budget and the free blocks allow (a prompt
that does not fit is chunked). When not even the head of the queue can get a block, ``make_room``
preempts one session: its blocks are released and its tokens recomputed later. A generate call
preempts in bulk instead (``preempt_to_finish``): enough sessions that the rest can run to max_tokens.
Because sampling noise is a function of (seed, position), a preempted session continues exactly as it
would have.

The scheduler decides; the ``BlockManager`` is what it asks and what it tells to allocate or preempt.
Neither touches the model, so both are tested step by step without one (tests/test_scheduler.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from thaw_rl.engine.block_manager import BlockManager, KVCacheExhaustedError
from thaw_rl.engine.session import Session


@dataclass
class Chunk:
    """``num_new`` tokens of a session, starting at its ``num_computed``, in one step."""

    session: Session
    num_new: int

    @property
    def start(self) -> int:
        return self.session.num_computed

    @property
    def end(self) -> int:
        return self.session.num_computed + self.num_new


class Scheduler:
    """Fills one step within the token and row budgets, allocating blocks; preempts when nothing fits."""

    def __init__(self, block_manager: BlockManager, max_num_batched_tokens: int, max_num_seqs: int) -> None:
        self.block_manager = block_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs

    def schedule(self, pending: Sequence[Session]) -> list[Chunk]:
        """Chunks for one step, in queue order; their blocks are allocated when this returns.

        A session without blocks (preempted, or new and uncached) first takes the cached blocks of its prefix
        (``match_prefix``). Of several sessions about to compute the same uncached full block (a preempted
        GRPO group's rows, all recomputing their prompt), only the first runs this step; the others find its
        blocks in the cache at the next. Without that, each of a group's G rows recomputed the whole prompt.
        """
        bm, bs = self.block_manager, self.block_manager.block_size
        budget = self.max_num_batched_tokens
        chunks: list[Chunk] = []
        computing: set[bytes] = set()  # hashes of the first full block each chunk of this step computes
        for s in pending:
            if budget <= 0 or len(chunks) >= self.max_num_seqs:
                break
            if not s.block_table:
                bm.match_prefix(s)
            first = self._next_full_block_hash(s)
            if first is not None:
                if first in computing:
                    continue
                computing.add(first)
            n = min(s.num_uncomputed, budget)
            if not bm.can_allocate(bm.num_blocks_to_reach(s, s.num_computed + n)):
                n = (len(s.block_table) + bm.num_free_blocks) * bs - s.num_computed  # what the free blocks hold
                if n <= 0:
                    break
            bm.allocate(s, s.num_computed + n)
            chunks.append(Chunk(s, n))
            budget -= n
        return chunks

    def _next_full_block_hash(self, s: Session) -> bytes | None:
        """The prefix-cache hash of the full block a session's next chunk starts, when it starts one at a block
        boundary after its hashed blocks (a prefill or recompute, not a decode token); else None."""
        bm, bs = self.block_manager, self.block_manager.block_size
        k = len(s.block_hashes)
        if s.num_computed != k * bs or s.num_tokens < (k + 1) * bs + 1:  # the last token is always computed
            return None
        (h,) = bm.chain_hashes(s.token_ids, k + 1, s.block_hashes[-1] if k else None, start=k)
        return h

    def allocate_decode(self, sessions: Sequence[Session], positions: Sequence[int]
                        ) -> list[tuple[int, int, int]] | None:
        """Blocks for one decode token per session at ``positions`` (a step of the async decode loop).

        Returns the ``(row, column, block_id)`` table writes of the sessions whose token starts a new
        block, for the device copy of the tables; or None, allocating nothing, when the free blocks
        cannot cover them all (the engine then drains and steps through ``schedule``, which preempts).
        """
        bm, bs = self.block_manager, self.block_manager.block_size
        need = [i for i, (s, p) in enumerate(zip(sessions, positions)) if p >= len(s.block_table) * bs]
        if not bm.can_allocate(len(need)):
            return None
        for i in need:
            if positions[i] // bs != len(sessions[i].block_table):
                raise RuntimeError(f"decode position {positions[i]} of {sessions[i]!r} is past the block after its "
                                   f"table's last")
        ids = bm.append_blocks([sessions[i] for i in need])
        return [(i, positions[i] // bs, block_id) for i, block_id in zip(need, ids)]

    def make_room(self, sessions: Sequence[Session], pending: Sequence[Session], generating: bool) -> Session:
        """No chunk fit: preempt one session of this call and return it, or raise with a clear error.

        Victims, in order: sessions of a generate call that already finished (their tokens are kept and
        their KV is recomputed if they are ever continued), then the most recently admitted pending ones.
        The head of the queue is never preempted, so every round makes progress. A prefill call never
        drops a finished prompt (its KV is the result), so it raises when the prompts cannot fit.
        """
        victims = self._victims(sessions, pending, generating)
        if not victims:
            raise self._exhausted(pending[0], sessions)
        self.block_manager.preempt(victims[0])
        return victims[0]

    @staticmethod
    def _victims(sessions: Sequence[Session], pending: Sequence[Session], generating: bool) -> list[Session]:
        """Sessions that may give their KV back, in the order they should: the call's finished sessions (generate
        calls only), then the pending ones newest first; never the head of the queue, nor a session without KV."""
        waiting = {id(s) for s in pending}
        finished = [s for s in reversed(sessions) if id(s) not in waiting and s.block_table] if generating else []
        return finished + [s for s in reversed(pending[1:]) if s.block_table]

    def preempt_to_finish(self, sessions: Sequence[Session], active: Sequence[Session],
                          final_lengths: Sequence[int]) -> list[Session]:
        """Blocks ran out in a generate call: preempt until the ``active`` sessions can all reach their
        ``final_lengths`` (tokens computed at max_tokens) with the free blocks; return the victims.

        Why in bulk: preempting one session at a time frees a few blocks that the next step uses up, so a
        call whose rows need several times the pool preempted about once a step, each time leaving the
        async loop for synchronous steps (H200, 1,024 GRPO rows in a 6 GB pool: 2,122 preemptions, 77 s
        against 6 s unconstrained). Victims, in ``make_room``'s order: the call's finished sessions, then
        the most recently admitted active ones; never the head of the queue. The caller holds the victims
        back until every active session is done (vLLM's running-before-waiting), so they are not
        recomputed into the blocks just reserved. May return none (only the head is left, or it
        already fits); the caller then steps through ``schedule`` / ``make_room``, which raise when the
        head alone cannot fit.
        """
        bm = self.block_manager
        need = {id(s): max(0, bm.blocks_for(n) - len(s.block_table)) for s, n in zip(active, final_lengths)}
        total = sum(need.values())
        victims = []
        for v in self._victims(sessions, active, generating=True):
            if total <= bm.num_free_blocks:
                break
            bm.preempt(v)
            total -= need.pop(id(v), 0)
            victims.append(v)
        return victims

    def _exhausted(self, head: Session, sessions: Sequence[Session]) -> KVCacheExhaustedError:
        bm = self.block_manager
        in_call = {b for s in sessions for b in s.block_table}
        others_in_call = len(in_call - set(head.block_table))
        outside = bm.num_used_blocks - len(in_call)
        held = (f"{others_in_call} by other sessions of this call and {outside} by sessions outside it"
                if others_in_call or outside else "no other session holds any")
        return KVCacheExhaustedError(
            f"KV pool exhausted: {head!r} needs {bm.blocks_for(head.num_tokens)} blocks of {bm.block_size} tokens; "
            f"the pool has {bm.num_blocks - 1} usable blocks, {bm.num_free_blocks} free, held: {held}. Free sessions "
            f"you no longer need, generate fewer sessions at once, or raise kv_cache_memory."
        )
