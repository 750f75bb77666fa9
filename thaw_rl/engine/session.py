"""A session: one sequence's tokens, how many of them have KV in the cache, and its block table."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

_session_ids = itertools.count()


@dataclass(eq=False)
class Session:
    """One sequence inside a ``ThawEngine``.

    ``token_ids[:num_computed]`` have their K/V written in the blocks of ``block_table`` (token t lives in
    block ``block_table[t // block_size]`` at offset ``t % block_size``). The tokens after
    ``num_computed`` still have to go through the model. ``block_hashes[i]`` is the chained hash of
    full block i (``None`` past the full blocks). ``next_logits`` holds the logits that predict the token
    after ``token_ids[-1]`` when they are already known (right after a prefill, shared by forks), so
    sampling the first token costs no forward pass.
    """

    engine_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_computed: int = 0
    next_logits: torch.Tensor | None = None  # (V,) float32
    parent_id: int | None = None
    weight_version: int = 0  # the engine's weight version when its oldest KV was computed
    freed: bool = False
    session_id: int = field(default_factory=lambda: next(_session_ids))

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    def __repr__(self) -> str:
        state = "freed" if self.freed else f"{self.num_computed}/{self.num_tokens} computed"
        return f"Session(id={self.session_id}, {state}, blocks={len(self.block_table)})"
