"""``TreeSpec``: the shape of a rollout tree, as plain data.

Four shapes, one constructor each:

- ``TreeSpec.grpo(n)``: the prompt is forked into n children, each decodes up to ``max_tokens``. The
  prompt is computed once instead of n times; the samples are what a flat GRPO sampler would give.
- ``TreeSpec.segments(branching=[b1, ..., bd], segment_tokens=k)`` (TreePO): the prompt is forked into
  b1 children at once (the root decodes nothing of its own), each decodes k tokens and forks into b2
  children, ... and the d-th level decodes the rest, up to ``max_tokens`` in all. So every completion
  is ``k * (d - 1)`` tokens of shared segments plus its own tail, and there are ``b1 * ... * bd``
  leaves per prompt. ``grpo(n)`` is ``segments([n])``.
  A branch that stops (eos or a stop id) inside a segment does not fork: it becomes a leaf on its own,
  and the prompt gets fewer leaves (``RolloutStats.num_missing_leaves`` counts them). With
  ``fill=True`` the lost leaves are made up at the last fork: the surviving parents of the last level
  get extra children, one each in tree order, until the prompt again has ``b1 * ... * bd`` leaves. If
  every branch of a prompt stopped before the last fork there is nothing left to fork and the prompt
  stays short.
- ``TreeSpec.entropy(max_leaves, threshold, initial, branch, segment_tokens)`` (TreeRL's EPTree): see
  ``entropy`` below.
- ``TreeSpec.best_of_n(n, keep)``: sampled exactly like ``grpo(n)``; ``keep`` tells a best-of-n trainer
  how many of the n to keep by reward. The sampler returns all n.

Specs that cannot work raise ``ValueError`` saying what to change. ``check_params`` checks the spec
against the sampling parameters (segments must fit in ``max_tokens``) and ``check_leaves`` against a
trainer's group size (TRL's ``num_generations``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from thaw_rl.engine.sampling import SamplingParams

KINDS = ("grpo", "segments", "entropy", "best_of_n")


@dataclass(frozen=True)
class TreeSpec:
    """The shape of a rollout tree. Build it with ``grpo``, ``segments``, ``entropy`` or ``best_of_n``."""

    kind: str = field(metadata={"help": f"one of {KINDS}"})
    branching: tuple[int, ...] = field(
        default=(1,), metadata={"help": "children per fork, level by level (grpo, segments, best_of_n)"})
    segment_tokens: int | None = field(
        default=None, metadata={"help": "tokens each level decodes before it forks (segments); tokens per "
                                        "decode round (entropy; None = max_tokens)"})
    fill: bool = field(
        default=False, metadata={"help": "segments: make up leaves lost to early stops at the last fork"})
    max_leaves: int | None = field(default=None, metadata={"help": "entropy: leaf budget per prompt"})
    threshold: float | None = field(
        default=None, metadata={"help": "entropy: fork at tokens whose entropy (nats) is above this"})
    initial: int = field(default=1, metadata={"help": "entropy: chains forked from the prompt before any branching"})
    branch: int = field(
        default=2, metadata={"help": "entropy: new children per fork point (the original path goes on)"})
    keep: int | None = field(default=None, metadata={"help": "best_of_n: how many leaves a trainer keeps by reward"})

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"TreeSpec kind={self.kind!r}: use TreeSpec.grpo, .segments, .entropy or .best_of_n.")
        if self.kind == "entropy":
            self._check_entropy()
        else:
            self._check_branching()

    def _check_branching(self) -> None:
        b = self.branching
        if len(b) == 0:
            raise ValueError(
                "TreeSpec.segments(branching=[]): give at least one level, e.g. branching=[4] (= grpo(4)).")
        bad = [x for x in b if not isinstance(x, int) or x < 1]
        if bad:
            raise ValueError(f"branching={list(b)} has {bad}: every level needs an integer >= 1 child per fork.")
        if len(b) > 1 and (self.segment_tokens is None or self.segment_tokens < 1):
            raise ValueError(
                f"TreeSpec.segments(branching={list(b)}) needs segment_tokens >= 1 (tokens each level decodes "
                f"before it forks), got {self.segment_tokens}.")
        if self.keep is not None and not 1 <= self.keep <= b[0]:
            raise ValueError(f"best_of_n(n={b[0]}, keep={self.keep}): keep must be in [1, n].")

    def _check_entropy(self) -> None:
        if self.max_leaves is None or self.max_leaves < 1:
            raise ValueError(f"TreeSpec.entropy(max_leaves={self.max_leaves}): the leaf budget must be >= 1.")
        if self.threshold is None or not math.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(
                f"TreeSpec.entropy(threshold={self.threshold}): give an entropy in nats >= 0 (log(vocab) is the "
                f"most a distribution can have).")
        if not 1 <= self.initial <= self.max_leaves:
            raise ValueError(f"TreeSpec.entropy(initial={self.initial}): must be in [1, max_leaves={self.max_leaves}].")
        if self.branch < 1:
            raise ValueError(f"TreeSpec.entropy(branch={self.branch}): fork into at least 1 new child.")
        if self.segment_tokens is not None and self.segment_tokens < 1:
            raise ValueError(
                f"TreeSpec.entropy(segment_tokens={self.segment_tokens}): give >= 1, or None for max_tokens.")

    # -- constructors -----------------------------------------------------------------------------------
    @classmethod
    def grpo(cls, n: int) -> "TreeSpec":
        """n samples per prompt, forked from the prompt's KV (the prompt is computed once)."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"TreeSpec.grpo(n={n}): n is the group size, an integer >= 1.")
        return cls(kind="grpo", branching=(n,))

    @classmethod
    def segments(cls, branching: list[int] | tuple[int, ...], segment_tokens: int | None = None,
                 fill: bool = False) -> "TreeSpec":
        """Fork b1 at the prompt, then b2, b3, ... every ``segment_tokens`` tokens (see the module doc)."""
        return cls(kind="segments", branching=tuple(branching), segment_tokens=segment_tokens, fill=fill)

    @classmethod
    def entropy(cls, max_leaves: int, threshold: float, initial: int = 1, branch: int = 2,
                segment_tokens: int | None = None) -> "TreeSpec":
        """Entropy-triggered branching (TreeRL's EPTree), per prompt:

        1. ``initial`` chains are forked from the prompt.
        2. A round: every live path (not stopped, shorter than ``max_tokens``) decodes up to
           ``segment_tokens`` more tokens (None: to the end), all prompts in one ``generate`` call.
        3. Then, per prompt, the tokens decoded in that round whose sampling entropy is above
           ``threshold`` are the fork candidates, highest entropy first (ties in tree order). Forking at
           a token keeps the path up to it and gives ``branch`` new children that resample that token
           from the same distribution (``fork(session, n, at=position)``); the original path goes on,
           so each fork adds ``branch`` leaves (fewer at the last fork, to land on ``max_leaves``).
           A token that already starts a tree node (a child's first token, or a place already forked) is
           never a candidate, so no position is forked twice. Forking stops when the prompt has
           ``max_leaves`` leaves.
        4. New children are live paths; rounds go on until no path is live.

        So a prompt has between ``initial`` and ``max_leaves`` leaves, and exactly ``max_leaves``
        whenever enough tokens were above the threshold. At temperature 0 the children resample the
        same token and duplicate the path: use temperature > 0.
        """
        return cls(kind="entropy", max_leaves=max_leaves, threshold=float(threshold), initial=initial,
                   branch=branch, segment_tokens=segment_tokens)

    @classmethod
    def best_of_n(cls, n: int, keep: int = 1) -> "TreeSpec":
        """n samples per prompt (as ``grpo(n)``); a trainer keeps the ``keep`` best by reward."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"TreeSpec.best_of_n(n={n}): n is the number of samples, an integer >= 1.")
        return cls(kind="best_of_n", branching=(n,), keep=keep)

    # -- queries --------------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Levels of forking below the prompt (entropy trees have no fixed depth: 0)."""
        return 0 if self.kind == "entropy" else len(self.branching)

    @property
    def leaves_per_prompt(self) -> int:
        """Leaves per prompt when nothing stops early (entropy: the budget, an upper bound)."""
        return self.max_leaves if self.kind == "entropy" else math.prod(self.branching)

    def segment_lengths(self, max_tokens: int) -> list[int]:
        """Tokens each level decodes (segments, grpo, best_of_n): k, k, ..., then the rest."""
        k = self.segment_tokens or 0
        return [k] * (self.depth - 1) + [max_tokens - k * (self.depth - 1)]

    def check_params(self, params: SamplingParams) -> None:
        """The spec must fit ``params.max_tokens``: the shared segments need room for a last one."""
        if self.kind == "entropy" or self.depth <= 1:
            return
        k, d = self.segment_tokens, self.depth
        if k * (d - 1) >= params.max_tokens:
            raise ValueError(
                f"segment_tokens * (len(branching)-1) must be < max_tokens: {k} * {d - 1} = {k * (d - 1)} >= "
                f"max_tokens={params.max_tokens}, so the last level would decode nothing. Lower segment_tokens "
                f"to at most {(params.max_tokens - 1) // (d - 1)}, use fewer levels, or raise max_tokens.")

    def check_leaves(self, num_generations: int) -> None:
        """A trainer's group size must equal the leaves per prompt (TRL's ``num_generations``)."""
        if self.leaves_per_prompt == num_generations:
            return
        if self.kind == "entropy":
            fix = f"set max_leaves={num_generations}"
        elif self.kind == "segments":
            fix = f"choose branching whose product is {num_generations} (e.g. {_example_branching(num_generations)})"
        else:
            fix = f"use {self.kind}({num_generations})"
        raise ValueError(
            f"{self} gives {self.leaves_per_prompt} leaves per prompt but num_generations={num_generations}: "
            f"set num_generations={self.leaves_per_prompt} or {fix}.")

    def __str__(self) -> str:
        if self.kind == "grpo":
            return f"TreeSpec.grpo({self.branching[0]})"
        if self.kind == "best_of_n":
            return f"TreeSpec.best_of_n({self.branching[0]}, keep={self.keep})"
        if self.kind == "segments":
            fill = ", fill=True" if self.fill else ""
            return f"TreeSpec.segments({list(self.branching)}, segment_tokens={self.segment_tokens}{fill})"
        return (f"TreeSpec.entropy(max_leaves={self.max_leaves}, threshold={self.threshold}, initial={self.initial}, "
                f"branch={self.branch}, segment_tokens={self.segment_tokens})")


def _example_branching(n: int) -> list[int]:
    """A small factorization of n into levels, for error messages: 8 -> [2, 2, 2], 12 -> [3, 2, 2]."""
    out, rest = [], n
    for p in (2, 3, 5, 7):
        while rest % p == 0 and rest > 1:
            out.append(p)
            rest //= p
    if rest > 1:
        out.append(rest)
    return sorted(out, reverse=True) or [1]
