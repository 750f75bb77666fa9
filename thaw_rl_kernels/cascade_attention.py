"""Cascade (shared-prefix) decode attention: torch references, the softmax merge, and dispatch.

A decode batch whose rows share leading KV blocks (a GRPO group's prompt, a tree's trunk; found by
``cascade_plan.plan_cascade``) is attended in two passes whose results are merged exactly:

(a) shared pass: per group, the queries of all its rows (rows x query heads, a small multi-query batch,
    so the shared blocks are read once and multiplied on tensor cores) over the group's shared blocks,
    returning each row's output and log-sum-exp;
(b) tail pass: each row over its own blocks from ``plan.tail_start`` on (the paged kernel with a start
    position), also returning its log-sum-exp;
(c) merge: ``o = (o_a e^{lse_a} + o_b e^{lse_b}) / (e^{lse_a} + e^{lse_b})``, computed around the max.

The result equals ``paged_attention`` over the whole context. Cascade is for pure-decode batches (one
query row per sequence) without a sliding window; callers fall back to ``paged_attention`` otherwise.
LSEs are natural-log, of the scaled scores ``scale * q.k``; a row with no key has lse -inf and output 0.
"""

from __future__ import annotations

import torch

from thaw_rl_kernels.cascade_plan import CascadePlan


def _scores_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: float):
    """Masked attention in fp32 with its LSE. q (n, H, D), k/v (n, L, KVH, D), valid (n, L)."""
    group = q.shape[1] // k.shape[2]
    k = k.float().repeat_interleave(group, 2)  # (n, L, H, D)
    v = v.float().repeat_interleave(group, 2).masked_fill(~valid[:, :, None, None], 0.0)  # padding may hold NaN
    scores = torch.einsum("nhd,nlhd->nhl", q.float(), k) * scale  # (n, H, L)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (n, H)
    weights = torch.exp(scores - lse.clamp_min(torch.finfo(torch.float32).min)[..., None])  # 0 where masked
    out = torch.einsum("nhl,nlhd->nhd", weights, v)  # (n, H, D)
    return out, lse


def shared_prefix_attention_reference(
    query: torch.Tensor,  # (S, H, D), one decode row per sequence
    key_cache: torch.Tensor,  # (NB, BS, KVH, D)
    value_cache: torch.Tensor,  # (NB, BS, KVH, D)
    block_tables: torch.Tensor,  # (S, W) int32
    plan: CascadePlan,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass (a): (S, H, D) fp32 output and (S, H) fp32 LSE of each grouped row over its group's shared
    blocks; rows in no group get output 0 and LSE -inf."""
    S, H, D = query.shape
    bs = key_cache.shape[1]
    out = torch.zeros(S, H, D, dtype=torch.float32, device=query.device)
    lse = torch.full((S, H), float("-inf"), dtype=torch.float32, device=query.device)
    cu = plan.cu_group_rows.tolist()
    for g, n in enumerate(plan.group_num_blocks.tolist()):
        if n == 0 or cu[g + 1] == cu[g]:  # an empty group of a padded plan
            continue
        rows = plan.group_rows[cu[g] : cu[g + 1]].long().to(query.device)  # (r,)
        blocks = block_tables[rows[0], :n].long()  # the first row's ids: every row of the group has them
        k = key_cache[blocks].reshape(1, n * bs, *key_cache.shape[2:]).expand(len(rows), -1, -1, -1)  # (r, L, KVH, D)
        v = value_cache[blocks].reshape(1, n * bs, *value_cache.shape[2:]).expand(len(rows), -1, -1, -1)
        valid = torch.ones(len(rows), n * bs, dtype=torch.bool, device=query.device)
        out[rows], lse[rows] = _scores_softmax(query[rows], k, v, valid, scale)
    return out, lse


def tail_attention_reference(
    query: torch.Tensor,  # (S, H, D)
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # (S, W) int32
    seq_lens: torch.Tensor,  # (S,) int32
    tail_start: torch.Tensor,  # (S,) int32
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass (b): each decode row over positions ``tail_start[s] .. seq_lens[s] - 1``; fp32 output and LSE."""
    S = query.shape[0]
    bs = key_cache.shape[1]
    if S == 0:
        return query.float().clone(), query.new_zeros(0, query.shape[1], dtype=torch.float32)
    num_blocks = -(-int(seq_lens.max()) // bs)
    blocks = block_tables[:, :num_blocks].long()  # (S, nb)
    k = key_cache[blocks].flatten(1, 2)  # (S, L, KVH, D)
    v = value_cache[blocks].flatten(1, 2)
    keys = torch.arange(num_blocks * bs, device=query.device)[None, :]  # (1, L)
    valid = (keys < seq_lens[:, None].long()) & (keys >= tail_start[:, None].long())  # (S, L)
    return _scores_softmax(query, k, v, valid, scale)


def merge_attention_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass (c): the softmax over the union of two disjoint key sets from each one's (output, LSE).

    out_* (S, H, D), lse_* (S, H); fp32 in and out. A side with LSE -inf (no keys) gets weight 0 and its
    output is never multiplied (it may hold anything, NaN included).
    """
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # both -inf: weights 0, result 0
    w_a = torch.exp(lse_a - m)  # (S, H)
    w_b = torch.exp(lse_b - m)
    total = w_a + w_b
    part_a = torch.where((w_a > 0)[..., None], out_a * w_a[..., None], 0.0)
    part_b = torch.where((w_b > 0)[..., None], out_b * w_b[..., None], 0.0)
    out = (part_a + part_b) / total.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    return out, m + torch.log(total)


def cascade_attention_reference(
    query: torch.Tensor,  # (S, H, D)
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    plan: CascadePlan,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(a) + (b) + (c) in torch: equals ``paged_attention_reference`` of the same decode batch."""
    _check_plan(query, block_tables, seq_lens, plan, key_cache.shape[1])
    shared_out, shared_lse = shared_prefix_attention_reference(query, key_cache, value_cache, block_tables, plan, scale)
    tail_out, tail_lse = tail_attention_reference(
        query, key_cache, value_cache, block_tables, seq_lens, plan.tail_start.to(query.device), scale
    )
    merged, _ = merge_attention_states(shared_out, shared_lse, tail_out, tail_lse)
    if out is None:
        return merged.to(query.dtype)
    out.copy_(merged)
    return out


def cascade_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    plan: CascadePlan,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton on CUDA tensors, the torch reference elsewhere (decode rows only, no sliding window)."""
    if query.is_cuda:
        from thaw_rl_kernels.triton_cascade_attention import cascade_attention_triton

        return cascade_attention_triton(query, key_cache, value_cache, block_tables, seq_lens, plan, scale, out)
    return cascade_attention_reference(query, key_cache, value_cache, block_tables, seq_lens, plan, scale, out)


def _check_plan(query, block_tables, seq_lens, plan: CascadePlan, block_size: int) -> None:
    """Misuse raises ValueError; shapes only, no tensor contents read."""
    if query.dim() != 3 or query.shape[0] != seq_lens.shape[0] or block_tables.shape[0] != seq_lens.shape[0]:
        raise ValueError(
            f"cascade attention takes one decode row per sequence: query {tuple(query.shape)}, block_tables "
            f"{tuple(block_tables.shape)}, seq_lens {tuple(seq_lens.shape)} must agree on S; use paged_attention "
            "for batches with prefill chunks.")
    if plan.num_rows != seq_lens.shape[0]:
        raise ValueError(f"the plan covers {plan.num_rows} rows but the batch has {seq_lens.shape[0]}; rebuild it "
                         "with plan_cascade (or CascadePlan.select after rows left).")
    if plan.max_shared_blocks > block_tables.shape[1]:
        raise ValueError(f"the plan shares {plan.max_shared_blocks} blocks but block_tables has only "
                         f"{block_tables.shape[1]} columns; rebuild the plan from these tables.")
