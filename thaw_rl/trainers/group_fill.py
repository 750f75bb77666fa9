"""Make every prompt's group whole: TRL needs exactly ``num_generations`` completions per prompt.

A segments tree loses leaves when a branch stops (eos) before it forks, and an entropy tree has fewer
leaves than its budget when few tokens were uncertain enough. ``complete_groups`` samples the missing
leaves as independent chains forked from the prompt (one extra ``grpo(k)`` rollout per distinct
deficit k) and grafts them into the tree as children of that prompt's root, after its own leaves. The
grafted leaves are real samples of the same policy, so the group stays an unbiased sample; tree credit
treats them as one-node branches from the prompt.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from thaw_rl.backends.base import RolloutBackend
from thaw_rl.engine.sampling import SamplingParams, derive_seed
from thaw_rl.rollout import Leaf, Node, RolloutBatch, RolloutStats, TreeSampler, TreeSpec

_FILL_SEED_OFFSET = 0x5EED_F111


def complete_groups(backend: RolloutBackend, batch: RolloutBatch, num_leaves: int,
                    params: SamplingParams) -> tuple[RolloutBatch, int]:
    """``batch`` with every prompt at ``num_leaves`` leaves, and how many leaves were added."""
    counts = batch.num_leaves_per_prompt
    if any(c > num_leaves for c in counts):
        raise RuntimeError(f"a prompt has more than {num_leaves} leaves ({counts}): tree spec and group size disagree")
    by_deficit: dict[int, list[int]] = defaultdict(list)
    for p, c in enumerate(counts):
        if c < num_leaves:
            by_deficit[num_leaves - c].append(p)
    added = 0
    for deficit, prompt_indices in sorted(by_deficit.items()):
        seed = None if params.seed is None else derive_seed(params.seed, _FILL_SEED_OFFSET + deficit)
        prompts = [_prompt_ids(batch, p) for p in prompt_indices]
        extra = TreeSampler(backend, TreeSpec.grpo(deficit)).rollout(prompts, dataclasses.replace(params, seed=seed))
        batch = graft(batch, extra, prompt_indices)
        added += len(extra.leaves)
    return batch, added


def _prompt_ids(batch: RolloutBatch, prompt_index: int) -> list[int]:
    for leaf in batch.leaves:
        if leaf.prompt_index == prompt_index:
            return leaf.prompt_ids
    raise RuntimeError(f"prompt {prompt_index} has no leaf to take its token ids from; every tree keeps >= 1 leaf")


def graft(batch: RolloutBatch, extra: RolloutBatch, prompt_indices: list[int]) -> RolloutBatch:
    """``extra``'s trees grafted under ``batch``'s roots (``extra``'s prompt j is ``batch``'s ``prompt_indices[j]``)."""
    offset = max(batch.nodes) + 1
    root_map = {extra.roots[j]: batch.roots[p] for j, p in enumerate(prompt_indices)}

    def new_id(n: int) -> int:
        return root_map.get(n, n + offset)

    nodes = {n: dataclasses.replace(node, children=list(node.children)) for n, node in batch.nodes.items()}
    for n, node in extra.nodes.items():
        if node.parent_id is None:
            nodes[new_id(n)].children += [new_id(c) for c in node.children]
            continue
        nodes[new_id(n)] = Node(new_id(n), new_id(node.parent_id), prompt_indices[node.prompt_index], node.start,
                                node.end, [new_id(c) for c in node.children])
    grafted: dict[int, list[Leaf]] = defaultdict(list)
    for leaf in extra.leaves:
        p = prompt_indices[leaf.prompt_index]
        grafted[p].append(dataclasses.replace(leaf, prompt_index=p, node_ids=[new_id(n) for n in leaf.node_ids]))
    leaves: list[Leaf] = []
    for p in range(len(batch.roots)):
        leaves += [leaf for leaf in batch.leaves if leaf.prompt_index == p] + grafted[p]
    return RolloutBatch(leaves, nodes, list(batch.roots), add_stats(batch.stats, extra.stats, keep_prompts=True))


def add_stats(a: RolloutStats, b: RolloutStats, keep_prompts: bool = False) -> RolloutStats:
    """Field-wise sum of two rollouts' stats.

    ``keep_prompts``: ``b`` sampled more leaves for ``a``'s prompts, so the prompt and missing-leaf counts stay ``a``'s.
    """
    out = {f.name: getattr(a, f.name) + getattr(b, f.name) for f in dataclasses.fields(RolloutStats)}
    out["kv_bytes_per_token"] = a.kv_bytes_per_token or b.kv_bytes_per_token
    if keep_prompts:
        out["num_prompts"] = a.num_prompts
        out["num_missing_leaves"] = a.num_missing_leaves
    return RolloutStats(**out)
