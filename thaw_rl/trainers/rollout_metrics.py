"""``thaw/...`` metrics: what the tree rollouts of one generation saved, summed over every rank.

Each rank packs its ``RolloutStats`` (and, when TRL computed them, its sampling-vs-training logprob
gaps) into one vector; the trainer gathers the vectors with ``accelerator.gather`` (one collective per
generation, on every rank) and ``reduce_rollout_metrics`` turns the ``(world, K)`` result into the
metric values. Counts are summed over ranks, wall time is the slowest rank's, and ratios are computed
from the sums, so a metric means the same on 1 rank or 64.

Keys (all prefixed ``thaw/``):

- ``prompt_tokens_prefilled``: prompt tokens that went through the model.
- ``prompt_tokens_reused``: prompt tokens the engine's prefix cache served instead.
- ``prefill_tokens_saved``: what a flat sampler would have prefilled (each sample's prompt on its own)
  minus ``prompt_tokens_prefilled``.
- ``decode_tokens``: every other token that went through the model.
- ``decode_tokens_saved``: flat decode tokens (shared segments decoded once per leaf) minus ``decode_tokens``.
- ``savings``: ``1 - computed / flat`` tokens; ``compute_ratio``: ``flat / computed``.
- ``kv_bytes_shared``: KV bytes leaves hold in common (what a flat sampler would have held twice or more).
- ``num_forks``, ``fork_ms``: fork calls and their total time (summed over ranks).
- ``cascade_steps``: decode steps whose attention read each group's shared prompt (or a tree's shared trunk)
  once for all its rows (cascade attention, ``engine_cascade_attention``), summed over ranks.
- ``rollout_seconds``: the slowest rank's rollout wall time; ``rollout_tokens_per_s``: completion tokens
  of all ranks per ``rollout_seconds``.
- ``leaves_filled``: leaves sampled to complete groups a tree left short (see ``group_fill``).
- ``sampling_logp_diff/mean`` and ``/max``: ``|engine logprob - training logprob|`` over completion tokens,
  when the trainer computed training logprobs at generation time (importance sampling on, or
  ``steps_per_generation`` not aligned with gradient accumulation); absent otherwise.
"""

from __future__ import annotations

import math

import torch

from thaw_rl.rollout import RolloutStats

# the order of the gathered vector
FIELDS = (
    "prefill_tokens", "reused_tokens", "decode_tokens", "flat_prefill_tokens", "flat_decode_tokens",
    "completion_tokens", "shared_kv_tokens", "kv_bytes_shared", "num_forks", "fork_seconds", "wall_seconds",
    "leaves_filled", "logp_diff_sum", "logp_diff_count", "logp_diff_max", "cascade_steps",
)
PREFIX = "thaw/"
# the metrics that add up over generations (a run's totals: ThawGRPOTrainer.rollout_totals)
TOTALLED_METRICS = tuple(PREFIX + k for k in (
    "prompt_tokens_prefilled", "prompt_tokens_reused", "prefill_tokens_saved", "decode_tokens",
    "decode_tokens_saved", "num_forks", "rollout_seconds", "cascade_steps"))


def local_vector(stats: RolloutStats | None, leaves_filled: int, logp_diff: torch.Tensor | None,
                 device: torch.device) -> torch.Tensor:
    """This rank's numbers in ``FIELDS`` order, float64 ``(K,)`` on ``device``; ``logp_diff`` is the masked |gap|."""
    s = stats or RolloutStats()
    if logp_diff is not None and logp_diff.numel():
        diff = (float(logp_diff.sum()), float(logp_diff.numel()), float(logp_diff.max()))
    else:
        diff = (0.0, 0.0, -math.inf)
    values = (s.prefill_tokens, s.reused_tokens, s.decode_tokens, s.flat_prefill_tokens, s.flat_decode_tokens,
              s.completion_tokens, s.shared_kv_tokens, s.kv_bytes_shared, s.num_forks, s.fork_seconds,
              s.wall_seconds, leaves_filled, *diff, s.cascade_steps)
    return torch.tensor(values, dtype=torch.float64, device=device)  # (K,)


def reduce_rollout_metrics(gathered: torch.Tensor) -> dict[str, float]:
    """``thaw/...`` metric values from the gathered ``(world * K,)`` or ``(world, K)`` vectors."""
    rows = gathered.detach().double().cpu().view(-1, len(FIELDS))  # (W, K)
    total = dict(zip(FIELDS, rows.sum(0).tolist()))
    wall = float(rows[:, FIELDS.index("wall_seconds")].max())
    computed = total["prefill_tokens"] + total["decode_tokens"]
    flat = total["flat_prefill_tokens"] + total["flat_decode_tokens"]
    out = {
        "prompt_tokens_prefilled": total["prefill_tokens"],
        "prompt_tokens_reused": total["reused_tokens"],
        "prefill_tokens_saved": total["flat_prefill_tokens"] - total["prefill_tokens"],
        "decode_tokens": total["decode_tokens"],
        "decode_tokens_saved": total["flat_decode_tokens"] - total["decode_tokens"],
        "savings": 1.0 - computed / flat if flat else 0.0,
        "compute_ratio": flat / computed if computed else 0.0,
        "kv_bytes_shared": total["kv_bytes_shared"],
        "num_forks": total["num_forks"],
        "fork_ms": total["fork_seconds"] * 1e3,
        "rollout_seconds": wall,
        "rollout_tokens_per_s": total["completion_tokens"] / wall if wall > 0 else 0.0,
        "leaves_filled": total["leaves_filled"],
        "cascade_steps": total["cascade_steps"],
    }
    if total["logp_diff_count"] > 0:
        out["sampling_logp_diff/mean"] = total["logp_diff_sum"] / total["logp_diff_count"]
        out["sampling_logp_diff/max"] = float(rows[:, FIELDS.index("logp_diff_max")].max())
    return {PREFIX + k: float(v) for k, v in out.items()}
