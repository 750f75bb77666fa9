"""The generation-backend protocol the tree sampler is written against.

A backend holds sequences ("handles") whose KV it keeps between calls. The sampler only ever asks it
to prefill prompts, fork a handle into children that share its prefix, continue handles, and free
them. ``NativeBackend`` (``native.py``) maps this one-to-one onto ``ThawEngine`` sessions; a vLLM
backend can implement it with token-id prompts and vLLM's prefix cache (a fork is then a new request
whose prompt is the parent's tokens, and the shared blocks are found by hash instead of refcounted).

Counters are how the sampler measures what a rollout cost: it reads ``counters()`` before and after
and reports the difference, so a backend must count what it *really* computed (tokens that went
through the model), not what it was asked for.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

from thaw_rl.engine.sampling import SamplingParams

Handle = Any  # a backend's own sequence object (a ThawEngine Session, a vLLM request's token ids, ...)

# Keys of ``RolloutBackend.counters()``; every backend reports all of them (0 where it has no such thing).
COUNTER_KEYS = (
    "prefill_tokens",  # prompt tokens that went through the model
    "decode_tokens",  # every other token that went through the model (decode, recompute after a fork)
    "reused_tokens",  # prompt tokens taken from the prefix cache instead of computed
    "sampled_tokens",  # tokens sampled
    "num_forks",  # fork calls
    "fork_seconds",
    "snapshot_seconds",
    "restore_seconds",
    "cascade_steps",  # decode steps that read shared prefixes once for all their rows (0 where there is no such thing)
)


@runtime_checkable
class CompletionLike(Protocol):
    """What ``generate`` returns per handle: the new tokens and how they were sampled."""

    token_ids: list[int]
    logprobs: list[float]  # log softmax(logits / T) of each sampled token
    entropies: list[float]  # entropy (nats) of softmax(logits / T) where each token was sampled
    finish_reason: str  # "stop" (stop token included in token_ids) or "length"


@runtime_checkable
class RolloutBackend(Protocol):
    """Prefill, fork, generate, free; plus the counters and weight-update hooks a trainer needs."""

    kv_bytes_per_token: int  # bytes of KV one token occupies (all layers, K and V)

    def prefill(self, prompts: Sequence[Sequence[int]]) -> list[Handle]:
        """One handle per prompt, its KV computed (all prompts in as few forwards as the backend can)."""
        ...

    def fork(self, handle: Handle, n: int, at: int | None = None) -> list[Handle]:
        """n children sharing the handle's first ``at`` tokens (all of them when ``at`` is None).

        ``at`` counts prompt and generated tokens together; children resample the token at ``at``.
        """
        ...

    def generate(
        self, handles: Sequence[Handle], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[CompletionLike]:
        """Continue every handle (in one batch) until a stop token or its max_tokens; handles keep the tokens."""
        ...

    def free(self, handle: Handle) -> None:
        """Release the handle's KV; it must not be used afterwards."""
        ...

    def counters(self) -> dict[str, float]:
        """Cumulative counters, with every key of ``COUNTER_KEYS``."""
        ...

    def update_weights(self, state_dict: dict | None = None) -> None:
        """New policy weights are in place (or load ``state_dict``): drop KV computed with the old ones."""
        ...

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (freed KV must not be found and reused)."""
        ...
