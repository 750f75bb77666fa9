"""Sampling parameters and the batched sampler.

Every sampled token comes with its logprob under ``softmax(logits / temperature)`` of the model's raw
logits (temperature 1 for greedy): that is the quantity TRL recomputes in training, so the two can be
compared for importance-sampling correction. Top-k, top-p, min-p and the repetition penalty shape only
the distribution tokens are drawn from, not the reported logprob.

Randomness is counter-based: the noise for the token at position ``p`` of a request with seed ``s`` is a
hash of ``(s, p, token id)``. So a request's tokens do not depend on which other requests share its
batch, the same seed reproduces the same tokens on any device, the whole batch draws its noise in a
few vectorised ops (no per-row generator loop), and it is safe under CUDA-graph replay.

Seeds follow one rule: a request's seed is used as given. Only one ``SamplingParams`` for n sessions
derives per-session seeds, here (``params_per_session``), so forked children differ; nothing downstream
re-derives or inverts a seed.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from thaw_rl_kernels.gumbel_sampling import gumbel_noise, gumbel_sample

_M32 = 0xFFFFFFFF


@dataclass
class SamplingParams:
    """How to sample one request (vLLM's names and meanings)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None  # per request; None draws one from the engine's generator

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r} must be a finite number.")
        for name in ("top_k", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name}={value!r} must be an int (e.g. {name}={_int_hint(value)}).")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)):
            raise ValueError(f"seed={self.seed!r} must be an int or None.")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 means greedy).")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]; use 1.0 to turn it off.")
        if self.top_k < -1:
            raise ValueError(f"top_k={self.top_k} must be >= 1, or 0/-1 to turn it off.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p={self.min_p} must be in [0, 1]; use 0 to turn it off.")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1.0 is off).")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1.")
        self.stop_token_ids = check_token_ids(self.stop_token_ids, "stop_token_ids", allow_empty=True)
        self.top_k, self.max_tokens = int(self.top_k), int(self.max_tokens)
        self.seed = None if self.seed is None else int(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def with_seed(self, seed: int) -> "SamplingParams":
        """A copy with another seed. The fields were checked when ``self`` was made, so they are not checked
        again: ``dataclasses.replace`` re-runs ``__post_init__``, 50 ms for the 1,024 copies of one GRPO step's
        params on a 2-core CPU, paid by every generate call before its first step."""
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed={seed!r} must be an int.")
        new = object.__new__(SamplingParams)
        new.__dict__.update(self.__dict__, seed=int(seed), stop_token_ids=list(self.stop_token_ids))
        return new


def derive_seed(seed: int, *path: int) -> int:
    """A seed derived from ``seed`` and the indices in ``path`` (``derive_seed(s, a, b)`` is
    ``derive_seed(derive_seed(s, a), b)``): the index-th session of a call given one seed, a tree node."""
    for index in path:
        seed = _mix32_int((_mix32_int(seed & _M32) ^ (index * 0x9E3779B1)) & _M32) | ((seed >> 32) << 32)
    return seed


def derive_seeds(seed: int, n: int) -> list[int]:
    """``[derive_seed(seed, i) for i in range(n)]`` in a few numpy ops (1,024 Python calls cost ~1 ms)."""
    mixed = _mix32_np(np.full(n, _mix32_int(seed & _M32), dtype=np.uint64)
                      ^ (np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B1) & np.uint64(_M32)))
    high = (seed >> 32) << 32  # its low 32 bits are zero: adding is or-ing, for negative seeds too
    return [high + int(x) for x in mixed.tolist()] if high else mixed.tolist()


def params_and_seeds(params: SamplingParams | Sequence[SamplingParams] | None, n: int
                     ) -> tuple[list[SamplingParams], list[int | None]]:
    """One ``SamplingParams`` and one seed per session, the single place where per-session seeds are derived.

    A sequence is returned as given, each request's seed its own (``p.seed``). One ``SamplingParams`` with a
    seed is shared by the n sessions, session i seeded ``derive_seed(seed, i)`` so forked children differ and
    the call reproduces; without a seed the n seeds are None (the engine draws a seed per session). The
    params object is shared, not copied: its own ``seed`` is the call's, the seeds list holds the sessions'.
    """
    if params is None:
        params = SamplingParams()
    if isinstance(params, SamplingParams):
        seeds = [None] * n if params.seed is None else derive_seeds(params.seed, n)
        return [params] * n, seeds
    plist = list(params)
    bad = [type(p).__name__ for p in plist if not isinstance(p, SamplingParams)]
    if bad:
        raise TypeError(f"expected SamplingParams or a list of them, got a list holding {bad[0]}.")
    if len(plist) != n:
        raise ValueError(f"got {len(plist)} SamplingParams for {n} sessions; give one, or one per session.")
    return plist, [p.seed for p in plist]


def params_per_session(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    """``params_and_seeds`` as one ``SamplingParams`` per session, each carrying its session's seed (copies
    when one seeded params is given; for callers that hand the list to another engine or process)."""
    plist, seeds = params_and_seeds(params, n)
    if isinstance(params, SamplingParams) and params.seed is not None:
        return [params.with_seed(seed) for seed in seeds]
    return plist


def check_token_ids(token_ids, what: str = "prompt", allow_empty: bool = False) -> list[int]:
    """A flat list of int token ids, or a ValueError that says what to pass instead."""
    fix = (f"pass {what} as a flat list of int token ids, e.g. tokenizer(text)[\"input_ids\"] for one text "
           f"(not the string, the BatchEncoding, or a batch)")
    if isinstance(token_ids, (str, bytes)):
        raise ValueError(f"{what} is a string; {fix}.")
    if isinstance(token_ids, dict) or hasattr(token_ids, "keys"):
        raise ValueError(f"{what} is a {type(token_ids).__name__} (a mapping); {fix}.")
    if isinstance(token_ids, torch.Tensor) or hasattr(token_ids, "ndim"):
        if token_ids.ndim != 1:
            raise ValueError(f"{what} is a {token_ids.ndim}-D {type(token_ids).__name__} of shape "
                             f"{tuple(token_ids.shape)}; {fix}; for a (1, T) tensor pass t[0].")
        if isinstance(token_ids, torch.Tensor) and (token_ids.is_floating_point() or token_ids.is_complex()):
            raise ValueError(f"{what} is a {token_ids.dtype} tensor; token ids are integers: {fix}.")
        token_ids = token_ids.tolist()
    try:
        ids = list(token_ids)
    except TypeError:
        raise ValueError(f"{what} is a {type(token_ids).__name__}; {fix}.") from None
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise ValueError(f"{what} holds {t!r} ({type(t).__name__}); token ids are ints: {fix}.")
    if not ids and not allow_empty:
        raise ValueError(f"empty {what}: give at least one token id (e.g. the BOS token or a chat template).")
    return [int(t) for t in ids]


def _int_hint(value) -> str:
    try:
        return str(int(value))
    except (TypeError, ValueError, OverflowError):
        return "16"


def _mix32_np(x: np.ndarray) -> np.ndarray:
    """``_mix32_int`` over a uint64 array of 32-bit values (each product stays below 2**63)."""
    m = np.uint64(_M32)
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x7FEB352D)) & m
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x846CA68B)) & m
    return x ^ (x >> np.uint64(16))


def _mix32_int(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    x ^= x >> 16
    return x


@dataclass
class SamplingBatch:
    """Per-row sampling parameters as tensors on the logits' device."""

    temperature: torch.Tensor  # (S,) float32, 0 = greedy
    top_p: torch.Tensor  # (S,)
    top_k: torch.Tensor  # (S,) int64, V = off
    min_p: torch.Tensor  # (S,)
    seeds: torch.Tensor  # (S,) int64
    positions: torch.Tensor  # (S,) int64: index of the token being sampled
    repetition_penalty: list[float]
    seen_token_ids: list[list[int]]  # for the repetition penalty
    any_filter: bool
    all_greedy: bool

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        seeds: list[int],
        positions: list[int],
        seen_token_ids: list[list[int]],
        vocab_size: int,
        device: torch.device,
    ) -> "SamplingBatch":
        f32 = dict(dtype=torch.float32, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        top_k_of = lambda p: p.top_k if p.top_k > 0 else vocab_size
        shared = _shared(params)
        if shared is not None:  # one params object for every row (one generate call's): fill, no per-row lists
            n = len(params)
            temperature, top_p = torch.full((n,), shared.temperature, **f32), torch.full((n,), shared.top_p, **f32)
            top_k, min_p = torch.full((n,), top_k_of(shared), **i64), torch.full((n,), shared.min_p, **f32)
        else:
            temperature = torch.tensor([p.temperature for p in params], **f32)
            top_p = torch.tensor([p.top_p for p in params], **f32)
            top_k = torch.tensor([top_k_of(p) for p in params], **i64)
            min_p = torch.tensor([p.min_p for p in params], **f32)
        batch = cls(
            temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
            seeds=torch.tensor([s & 0x7FFFFFFFFFFFFFFF for s in seeds], **i64),
            positions=torch.tensor(positions, **i64),
            repetition_penalty=[], seen_token_ids=seen_token_ids, any_filter=False, all_greedy=False,
        )
        batch._set_flags(params, vocab_size, shared)
        return batch


    # -- a persistent decode batch (decode_batch.py) reshapes its rows on the device, without host syncs --
    def select(self, idx: torch.Tensor) -> "SamplingBatch":
        """The rows ``idx`` (a device index tensor); call ``refresh_flags`` after with their params."""
        return dataclasses.replace(
            self, temperature=self.temperature.index_select(0, idx), top_p=self.top_p.index_select(0, idx),
            top_k=self.top_k.index_select(0, idx), min_p=self.min_p.index_select(0, idx),
            seeds=self.seeds.index_select(0, idx), positions=self.positions.index_select(0, idx))

    @staticmethod
    def concat(a: "SamplingBatch", b: "SamplingBatch") -> "SamplingBatch":
        """Rows of ``a`` then rows of ``b``; call ``refresh_flags`` after with their params."""
        cat = lambda name: torch.cat([getattr(a, name), getattr(b, name)])
        return dataclasses.replace(
            a, temperature=cat("temperature"), top_p=cat("top_p"), top_k=cat("top_k"), min_p=cat("min_p"),
            seeds=cat("seeds"), positions=cat("positions"),
            repetition_penalty=a.repetition_penalty + b.repetition_penalty,
            seen_token_ids=a.seen_token_ids + b.seen_token_ids)

    def to(self, device: torch.device) -> "SamplingBatch":
        """The same batch on ``device``; from CPU to CUDA through pinned memory, without blocking the host."""
        from thaw_rl.engine.decode_batch import to_device

        move = lambda t: to_device(t, device)
        return dataclasses.replace(self, temperature=move(self.temperature), top_p=move(self.top_p),
                                   top_k=move(self.top_k), min_p=move(self.min_p), seeds=move(self.seeds),
                                   positions=move(self.positions))

    def refresh_flags(self, params: list[SamplingParams], vocab_size: int) -> None:
        """Recompute the host-side flags (which code path ``sample`` takes) for these rows' params.

        They are what ``build`` computes for the same params, so a batch reshaped on the device samples
        exactly as one built from scratch for the same rows. Seen tokens are not carried: a row with a
        repetition penalty needs its tokens on the host, so the engine samples it synchronously instead.
        """
        self.seen_token_ids = [[] for _ in params]
        self._set_flags(params, vocab_size, _shared(params))

    def _set_flags(self, params: list[SamplingParams], vocab_size: int, shared: SamplingParams | None) -> None:
        """The repetition penalties and the two flags, looked at once per distinct params object."""
        if shared is not None:
            self.repetition_penalty = [shared.repetition_penalty] * len(params)
            distinct = {(shared.temperature, shared.top_p, shared.top_k, shared.min_p)}
        else:
            self.repetition_penalty = [p.repetition_penalty for p in params]
            distinct = {(p.temperature, p.top_p, p.top_k, p.min_p) for p in params}
        self.any_filter = any(t != 0.0 and (top_p < 1.0 or 0 < top_k < vocab_size or min_p > 0)
                              for t, top_p, top_k, min_p in distinct)
        self.all_greedy = all(t == 0.0 for t, _, _, _ in distinct)

    def at_positions(self, positions: torch.Tensor) -> "SamplingBatch":
        """The same rows drawing the token at ``positions`` (a device tensor; the noise depends on it)."""
        return dataclasses.replace(self, positions=positions)


def _shared(params: list[SamplingParams]) -> SamplingParams | None:
    """The one params object every row holds (a generate call given one ``SamplingParams``), else None."""
    if not params:
        return None
    first = params[0]
    return first if all(p is first for p in params) else None


def _apply_repetition_penalty(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """HF's rule: a seen token's logit is divided by the penalty if positive, multiplied if negative."""
    rows = [i for i, p in enumerate(batch.repetition_penalty) if p != 1.0]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        ids = torch.tensor(sorted(set(batch.seen_token_ids[i])), dtype=torch.long, device=logits.device)
        if ids.numel() == 0:
            continue
        p = batch.repetition_penalty[i]
        vals = logits[i, ids]
        logits[i, ids] = torch.where(vals > 0, vals / p, vals * p)
    return logits


def _filter(scaled: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Mask (to -inf) what top-k, top-p and min-p remove; the most likely token always stays."""
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # (S, V)
    probs = sorted_logits.softmax(dim=-1)
    rank = torch.arange(scaled.shape[-1], device=scaled.device)[None, :]
    remove = rank >= batch.top_k[:, None]
    remove |= (probs.cumsum(dim=-1) - probs) > batch.top_p[:, None]
    remove |= probs < batch.min_p[:, None] * probs[:, :1]
    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, -math.inf)
    return torch.empty_like(scaled).scatter_(-1, order, sorted_logits)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one token per row: logits (S, V) -> token ids (S,), their logprobs (S,), entropies (S,).

    Logprob and entropy are of softmax(logits / T) (T = 1 for greedy rows). Logits may come in the model's
    dtype (the async decode loop passes bf16 graph outputs as they are); everything is computed in fp32.
    """
    if not batch.any_filter and all(p == 1.0 for p in batch.repetition_penalty):
        return gumbel_sample(logits, batch.temperature, batch.seeds, batch.positions)  # one fused pass on CUDA
    logits = logits.float()
    temperature = batch.temperature.clamp(min=1e-6)
    greedy = batch.temperature == 0
    report_t = torch.where(greedy, torch.ones_like(temperature), temperature)
    logprobs_all = torch.log_softmax(logits / report_t[:, None], dim=-1)  # (S, V)

    shaped = _apply_repetition_penalty(logits, batch)
    if batch.all_greedy:
        tokens = shaped.argmax(dim=-1)
    else:
        scaled = shaped / temperature[:, None]
        if batch.any_filter:
            scaled = _filter(scaled, batch)
        noise = gumbel_noise(batch.seeds, batch.positions, logits.shape[-1])
        drawn = (scaled + noise).argmax(dim=-1)
        tokens = torch.where(greedy, shaped.argmax(dim=-1), drawn)
    logprobs = logprobs_all.gather(-1, tokens[:, None])[:, 0]
    # 0 * log 0 = 0 for a -inf logit (as gumbel_sample_reference), where exp(-inf) * -inf would be nan
    entropies = -torch.where(logprobs_all == -math.inf, 0.0, logprobs_all.exp() * logprobs_all).sum(dim=-1)
    return tokens, logprobs, entropies
