"""PPO's objective on token rows: per-token rewards, GAE (per row, or once per tree node), clipped losses.

Rows are completions ``(B, T)``, right-padded; ``mask`` is 1 on real completion tokens. Token ``t`` is the
action taken in state ``s_t`` (the prompt and tokens ``< t``); ``values[:, t] = V(s_t)``.

- ``token_rewards``: ``r_t = -kl_coef * KL_t``, plus the sequence's score at its last token (TRL PPO).
- ``token_gae``: ``delta_t = r_t + gamma V(s_{t+1}) - V(s_t)``, ``A_t = delta_t + gamma lam A_{t+1}``, with
  ``V = A = 0`` after a row's last token (the episode ends there); returns ``A + V``.
- ``tree_gae``: the same recursion run once per node of a rollout tree. A node's tokens are shared by
  every leaf below it, so they get one value (read from one leaf's row: the contexts are identical)
  and one advantage; at a branch point the bootstrap ``A_{t+1}``, ``V(s_{t+1})`` is the mean over the
  children, i.e. the expectation over the sampled continuations instead of one of them. With no shared
  tokens (flat groups) it equals ``token_gae``.
- ``policy_loss`` / ``value_loss``: TRL PPO's clipped surrogate and clipped value loss, token means.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from thaw_rl.rollout.rollout_batch import RolloutBatch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of the masked entries (0 with fewer than 2)."""
    n = mask.sum()
    if n < 2:
        return x.new_zeros(())
    mean = masked_mean(x, mask)
    return ((x - mean) ** 2 * mask).sum() / (n - 1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(x - mean) / std`` over the masked entries (mean kept when ``shift_mean=False``); 0 where masked."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    white = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        white = white + mean
    return white * mask


def per_token_kl(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """KL(policy || ref) estimate per sampled token: k1 = log p - log p_ref; k3 = e^-d - 1 + d with d = log p - log p_ref."""
    diff = logps - ref_logps
    if estimator == "k1":
        return diff
    if estimator == "k3":
        return torch.expm1(-diff) + diff
    raise ValueError(f"kl estimator {estimator!r}: use 'k1' or 'k3'.")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """``(B, T)`` rewards: ``-kl_coef * kl`` on every token, plus ``scores[i]`` at row i's last token."""
    rewards = -kl_coef * kl * mask  # (B, T)
    lengths = mask.sum(dim=1).long()  # (B,)
    rows = torch.nonzero(lengths > 0).squeeze(1)
    rewards[rows, lengths[rows] - 1] += scores[rows].to(rewards.dtype)
    return rewards


def token_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
              lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both ``(B, T)`` and 0 past each row's end."""
    values = values * mask
    advantages = torch.zeros_like(rewards)  # (B, T)
    next_adv = torch.zeros_like(rewards[:, 0])  # (B,)
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        next_value = values[:, t]
        advantages[:, t] = next_adv
    return advantages, (advantages + values) * mask


def tree_gae(batch: RolloutBatch, rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
             lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(advantages, returns, values) ``(B, T)`` with GAE run once per tree node (see the module docstring).

    Row i is ``batch.leaves[i]``. The tokens of a node are read (rewards, values) from the first leaf below
    it, and every leaf below it gets the node's values and advantages back, so the returned ``values``
    are what the value loss should clip around.
    """
    if len(batch.leaves) != rewards.size(0):
        raise ValueError(f"tree_gae got {rewards.size(0)} rows for {len(batch.leaves)} leaves.")
    plan = _NodePlan(batch, mask)
    r, v = rewards.detach().cpu().double(), (values * mask).detach().cpu().double()
    node_adv: dict[int, torch.Tensor] = {}
    node_val: dict[int, torch.Tensor] = {}
    for n in plan.post_order:
        row, (start, end) = plan.owner[n], plan.span[n]
        next_adv, next_value = plan.bootstrap(n, node_adv, node_val)
        adv = torch.zeros(end - start, dtype=torch.float64)
        for k, t in enumerate(reversed(range(start, end))):
            delta = r[row, t] + gamma * next_value - v[row, t]
            next_adv = float(delta + gamma * lam * next_adv)
            next_value = float(v[row, t])
            adv[end - start - 1 - k] = next_adv
        node_adv[n], node_val[n] = adv, v[row, start:end]
    advantages, shared_values = torch.zeros_like(r), torch.zeros_like(v)
    for i, leaf in enumerate(batch.leaves):
        for n in leaf.node_ids:
            start, end = plan.span[n]
            advantages[i, start:end] = node_adv[n]
            shared_values[i, start:end] = node_val[n]
    advantages = advantages.to(rewards) * mask
    shared_values = shared_values.to(values) * mask
    return advantages, (advantages + shared_values) * mask, shared_values


@dataclass
class _NodePlan:
    """Which row holds each node's tokens, the spans clipped to the rows, and a children-first order."""

    batch: RolloutBatch
    mask: torch.Tensor

    def __post_init__(self) -> None:
        lengths = self.mask.sum(dim=1).long().tolist()
        width = self.mask.size(1)
        self.owner: dict[int, int] = {}
        self.span: dict[int, tuple[int, int]] = {}
        depth: dict[int, int] = {}
        for i, leaf in enumerate(self.batch.leaves):
            for d, (n, (start, end)) in enumerate(zip(leaf.node_ids, leaf.spans)):
                depth[n] = d
                self.span[n] = (min(start, width), min(end, width))
                # prefer a row whose unmasked tokens cover the node (a masked row has rewards and values 0)
                if n not in self.owner or (end > lengths[self.owner[n]] and end <= lengths[i]):
                    self.owner[n] = i
        self.post_order = sorted(self.owner, key=lambda n: -depth[n])

    def bootstrap(self, n: int, node_adv: dict[int, torch.Tensor], node_val: dict[int, torch.Tensor]
                  ) -> tuple[float, float]:
        """(A, V) of the state after node n's last token: the mean over its children's first tokens; 0 at a leaf."""
        children = [c for c in self.batch.nodes[n].children if c in self.owner]
        if not children:
            return 0.0, 0.0
        firsts = [self._first(c, node_adv, node_val) for c in children]
        return sum(a for a, _ in firsts) / len(firsts), sum(v for _, v in firsts) / len(firsts)

    def _first(self, c: int, node_adv, node_val) -> tuple[float, float]:
        if node_adv[c].numel():
            return float(node_adv[c][0]), float(node_val[c][0])
        return self.bootstrap(c, node_adv, node_val)  # an empty node passes its children's estimate through


@dataclass
class LossStats:
    """Detached scalars of one loss evaluation (TRL PPO's metric names in ``ThawPPOTrainer``)."""

    approx_kl: torch.Tensor  # 0.5 * mean (log ratio)^2
    clipfrac: torch.Tensor  # fraction of tokens where the clipped term was the active one
    ratio: torch.Tensor  # mean probability ratio


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float) -> tuple[torch.Tensor, LossStats]:
    """Clipped surrogate ``mean_t max(-A r, -A clip(r, 1 - c, 1 + c))`` with ``r = exp(logp - old_logp)``."""
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = LossStats(approx_kl=0.5 * masked_mean(log_ratio**2, mask),
                          clipfrac=masked_mean((clipped > unclipped).float(), mask),
                          ratio=masked_mean(ratio, mask))
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(``0.5 mean_t max((v - R)^2, (clip(v, v_old +- c) - R)^2)``, clip fraction); no clipping when c is None."""
    unclipped = (values - returns) ** 2
    if cliprange_value is None:
        return 0.5 * masked_mean(unclipped, mask), values.new_zeros(())
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(R - V) / Var(R)`` over the masked tokens (1: the critic predicts the returns; <= 0: no better than a constant)."""
    var_returns = masked_var(returns, mask)
    if var_returns <= 0:
        return values.new_zeros(())
    return 1.0 - masked_var(returns - values, mask) / var_returns
