"""Attention of packed varlen queries over a paged KV cache: torch reference and dispatch.

``paged_attention`` is what the engine's attention hook calls once per layer. On CUDA it runs the
Triton kernel in ``triton_paged_attention.py`` (one launch, no host sync, CUDA-graph safe); elsewhere it
runs ``paged_attention_reference``, which is also the CPU engine's attention path: decode rows of all
sequences go through one batched SDPA over their gathered blocks, prefill chunks one SDPA per sequence.

Semantics (shared by both): the new tokens' K/V are already in the cache. Sequence s owns query rows
``cu_seqlens_q[s]:cu_seqlens_q[s+1]`` (q_len rows) and has ``seq_lens[s]`` tokens of context including
them, so query row j sits at position ``seq_lens[s] - q_len + j`` and attends to positions 0..that
position. Token t of sequence s lives in block ``block_tables[s, t // block_size]`` at offset
``t % block_size``. GQA: query head h reads kv head ``h // (H // KVH)``. With ``sliding_window=w`` (HF's
``sliding_window`` of Mistral and of Qwen2/Qwen3's sliding layers) a row at position p attends only to
positions in ``(p - w, p]``, as HF's sliding-window mask does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _gather_context(cache: torch.Tensor, block_row: torch.Tensor, num_blocks: int,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """One sequence's first num_blocks blocks as a dense (num_blocks*BS, KVH, D) tensor, in ``dtype`` when given
    (an FP8 cache widened to the query's dtype, exactly)."""
    _, bs, kvh, d = cache.shape
    dense = cache[block_row[:num_blocks].long()].reshape(num_blocks * bs, kvh, d)
    return dense if dtype is None else dense.to(dtype)


def paged_attention_reference(
    query: torch.Tensor,  # (T, H, D)
    key_cache: torch.Tensor,  # (NB, BS, KVH, D)
    value_cache: torch.Tensor,  # (NB, BS, KVH, D)
    block_tables: torch.Tensor,  # (S, max_blocks) int32
    seq_lens: torch.Tensor,  # (S,) int32, context incl. new tokens
    cu_seqlens_q: torch.Tensor,  # (S+1,) int32
    max_seqlen_q: int,
    scale: float,
    out: torch.Tensor | None = None,  # (T, H, D)
    sliding_window: int | None = None,
) -> torch.Tensor:
    T, H, D = query.shape
    bs = key_cache.shape[1]
    if out is None:
        out = torch.empty_like(query)
    ctx = seq_lens.tolist()
    cu = cu_seqlens_q.tolist()
    q_lens = [cu[s + 1] - cu[s] for s in range(len(ctx))]

    decode = [s for s, q in enumerate(q_lens) if q == 1]
    if decode:
        # All single-token rows in one SDPA: keys padded to the longest context, padding masked out.
        idx = torch.tensor(decode, device=query.device)
        lens = seq_lens[idx].long()  # (Sd,)
        nblk = -(-max(ctx[s] for s in decode) // bs)
        blocks = block_tables[idx, :nblk].long()  # (Sd, nblk)
        k = key_cache[blocks].flatten(1, 2).to(query.dtype)  # (Sd, L, KVH, D); an FP8 cache widened
        v = value_cache[blocks].flatten(1, 2).to(query.dtype)
        keys = torch.arange(nblk * bs, device=query.device)[None, :]  # (1, L)
        valid = keys < lens[:, None]  # (Sd, L)
        if sliding_window:
            valid &= keys > lens[:, None] - 1 - sliding_window
        rows = torch.tensor([cu[s] for s in decode], device=query.device)
        q = query[rows][:, :, None, :]  # (Sd, H, 1, D)
        o = F.scaled_dot_product_attention(
            q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=valid[:, None, None, :], scale=scale,
            enable_gqa=True,
        )  # (Sd, H, 1, D)
        out[rows] = o[:, :, 0, :].to(out.dtype)

    for s, q_len in enumerate(q_lens):
        if q_len <= 1:
            continue
        n = ctx[s]
        nblk = -(-n // bs)
        k = _gather_context(key_cache, block_tables[s], nblk, query.dtype)[:n]  # (n, KVH, D)
        v = _gather_context(value_cache, block_tables[s], nblk, query.dtype)[:n]
        q = query[cu[s] : cu[s + 1]]  # (q_len, H, D)
        pos = torch.arange(n - q_len, n, device=query.device)
        keys = torch.arange(n, device=query.device)[None, :]  # (1, n)
        mask = keys <= pos[:, None]  # (q_len, n)
        if sliding_window:
            mask &= keys > pos[:, None] - sliding_window
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale, enable_gqa=True
        )  # (H, q_len, D)
        out[cu[s] : cu[s + 1]] = o.transpose(0, 1).to(out.dtype)
    return out


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    scale: float,
    out: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Triton on CUDA tensors, the torch reference elsewhere."""
    if query.is_cuda:
        from thaw_rl_kernels.triton_paged_attention import paged_attention_triton

        return paged_attention_triton(
            query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, scale, out,
            sliding_window=sliding_window,
        )
    return paged_attention_reference(
        query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, scale, out,
        sliding_window=sliding_window,
    )
