"""Per-token credit from a rollout tree (TreeRL's process supervision without a reward model).

A flat GRPO group gives every token of a completion the same advantage. A tree knows more: tokens of a
shared segment led to several leaves, so their value can be estimated from all of them, and a branch
point tells how much the choice made there mattered. With ``V(n)`` the mean reward of the leaves below
node ``n`` (a leaf's value is its own reward) and ``root`` the prompt, a token in node ``n`` gets

    A(n) = (V(n) - V(root)) + (V(n) - V(parent(n)))

the *global* term (is this partial answer better than the prompt's average?) plus the *local* term (did
the segment improve on where it was forked from?). For a one-level tree (``TreeSpec.grpo``) both terms
are ``r - mean(group)``, so ``A = 2 (r - mean)``: GRPO's advantage up to a factor. With
``leaf_scaling=True``, ``A(n)`` is divided by ``sqrt(|leaves below n|)``, TreeRL's reweighting for
nodes that appear in many training sequences (a trunk shared by 8 leaves is trained on 8 times).

Leaves whose reward is NaN (unscorable) are left out of every mean; a node with no scorable leaf below
has advantage 0, as do the padding positions past a completion's end.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from thaw_rl.rollout.rollout_batch import RolloutBatch


def node_values(batch: RolloutBatch, rewards: Sequence[float]) -> dict[int, float]:
    """Mean reward of the (scorable) leaves below each node; NaN where there is none."""
    sums: dict[int, float] = {n: 0.0 for n in batch.nodes}
    counts: dict[int, int] = {n: 0 for n in batch.nodes}
    for leaf, r in zip(batch.leaves, rewards, strict=True):
        if math.isnan(r):
            continue
        for n in leaf.node_ids:
            sums[n] += r
            counts[n] += 1
    return {n: sums[n] / counts[n] if counts[n] else math.nan for n in batch.nodes}


def node_advantages(batch: RolloutBatch, rewards: Sequence[float], leaf_scaling: bool = False) -> dict[int, float]:
    """``A(n) = (V(n) - V(root)) + (V(n) - V(parent(n)))`` for every node below a root (0 where undefined)."""
    values = node_values(batch, rewards)
    num_leaves = {n: 0 for n in batch.nodes}
    for leaf in batch.leaves:
        for n in leaf.node_ids:
            num_leaves[n] += 1
    root_of = {}
    for leaf in batch.leaves:
        for n in leaf.node_ids:
            root_of[n] = leaf.node_ids[0]
    out: dict[int, float] = {}
    for n, node in batch.nodes.items():
        if node.parent_id is None or n not in root_of:
            out[n] = 0.0
            continue
        v, v_root, v_parent = values[n], values[root_of[n]], values[node.parent_id]
        a = (v - v_root) + (v - v_parent)
        if leaf_scaling:
            a /= math.sqrt(num_leaves[n])
        out[n] = 0.0 if math.isnan(a) else a
    return out


def tree_advantages(batch: RolloutBatch, rewards: Sequence[float] | torch.Tensor, leaf_scaling: bool = False,
                    num_columns: int | None = None) -> torch.Tensor:
    """Per-token advantages ``(num_leaves, T)``: row i is leaf i, column t its completion token t.

    ``rewards[i]`` is the reward of ``batch.leaves[i]``. ``T`` is ``num_columns`` or the longest completion;
    positions past a completion's end are 0 (they are masked in the loss anyway).
    """
    if isinstance(rewards, torch.Tensor):
        rewards = rewards.detach().float().cpu().tolist()
    rewards = [float(r) for r in rewards]
    if len(rewards) != len(batch.leaves):
        raise ValueError(f"tree_advantages got {len(rewards)} rewards for {len(batch.leaves)} leaves.")
    per_node = node_advantages(batch, rewards, leaf_scaling)
    width = num_columns if num_columns is not None else max((len(leaf.completion_ids) for leaf in batch.leaves),
                                                            default=0)
    out = torch.zeros(len(batch.leaves), width, dtype=torch.float32)  # (B, T)
    for i, leaf in enumerate(batch.leaves):
        for n, (start, end) in zip(leaf.node_ids, leaf.spans):
            if end > start and start < width:
                out[i, start:min(end, width)] = per_node[n]
    return out
