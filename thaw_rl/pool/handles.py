"""The parent's records of a ForkPool's sequences: ``PoolHandle`` (where a sequence lives) and ``PoolCompletion``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(eq=False)
class PoolHandle:
    """One sequence of the pool: which worker holds it, under which session id, and its tokens.

    The parent mirrors the tokens, so a sequence lost with its worker is rebuilt by prefilling them again.
    """

    handle_id: int
    worker: int
    session_id: int
    incarnation: int  # the worker process it lives in; a replaced worker's sessions are gone
    token_ids: list[int]
    num_prompt_tokens: int
    pool_id: int
    freed: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        state = "freed" if self.freed else f"{self.num_tokens} tokens"
        return f"PoolHandle(id={self.handle_id}, worker={self.worker}, {state})"


@dataclass
class PoolCompletion:
    """What ``generate`` produced for one handle (the handle keeps the tokens too)."""

    token_ids: list[int]
    logprobs: list[float]
    entropies: list[float]
    finish_reason: str
    handle: PoolHandle
