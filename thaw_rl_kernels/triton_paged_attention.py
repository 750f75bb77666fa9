"""Triton paged attention for one engine step: prefill chunks and decode tokens in one launch.

The engine packs the new tokens of many sequences into one flat batch (``cu_seqlens_q`` says which
rows belong to which sequence) and writes their keys and values into the paged cache before calling
attention, so every query row reads its whole causal context from the cache, wherever it lives.

How the work is cut (flash-attention with a paged K/V gather, as in vLLM's unified Triton kernel):

- A program owns one KV head and one *query tile*: ``BLOCK_Q`` consecutive tokens of one sequence
  times the ``GROUP`` query heads that share the KV head (GQA), i.e. ``BLOCK_M >= BLOCK_Q * GROUP``
  rows. Each K/V tile is loaded once for the whole group and fed to ``tl.dot`` twice (QK^T, PV).
- The grid is an upper bound computed from shapes only (``T // BLOCK_Q + S`` query tiles, or exactly
  ``T`` when ``BLOCK_Q == 1``): a program finds its sequence by binary search over ``cu_seqlens_q``
  and exits if the tile is past the sequence's end. Nothing is read back to the host, so the call
  can be captured in a CUDA graph at fixed T and S.
- A program walks the sequence's KV positions in tiles of ``TILE_N`` (gathering block ids from the
  block table) only up to the causal limit of its last row, with an online softmax in fp32.
- Decode batches too small to fill the GPU are split along the KV axis (flash-decoding): each of
  ``NUM_SPLITS`` programs writes a partial (max, sum, acc) and a second small kernel merges them.
- An FP8 cache (``float8_e4m3fn``, unscaled) is read as is and widened to the query's dtype tile by tile
  (exact: every e4m3 value is a bf16/fp16/fp32 value), so a step reads half the bytes of a bf16 cache.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from thaw_rl_kernels.kv_write import FP8_DTYPE

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # of the query; the cache may also be FP8_DTYPE
LOG2E = 1.4426950408889634


@triton.jit
def _sequence_of_tile(cu_seqlens_q_ptr, tile_idx, num_seqs, BLOCK_Q: tl.constexpr):
    """The last sequence whose first query tile is <= tile_idx (first tile of s: cu[s] // BLOCK_Q + s)."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(cu_seqlens_q_ptr + mid)
        if BLOCK_Q > 1:
            first_tile = first_tile // BLOCK_Q + mid
        if first_tile <= tile_idx:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot, or an fp32 dot of the same (already rounded) inputs where bf16 dots are broken (interpreter)."""
    if UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PRECISION)
    return c


@triton.jit
def _widen(kv, dtype: tl.constexpr):
    """A K or V tile in the query's dtype: an FP8 cache's tile converted (exactly); in the query's dtype already,
    ``.to`` is a no-op (one return: the compiler types both branches of a non-constexpr ``if``)."""
    return kv.to(dtype)


@triton.jit(do_not_specialize=["num_seqs"])  # S == 1 must stay a tensor: the binary search reassigns it
def _paged_attention_kernel(
    out_ptr,  # (T, H, D) final output, used when NUM_SPLITS == 1
    part_acc_ptr,  # (T, H, NUM_SPLITS, HEAD_DIM_PAD) fp32 unnormalised partial outputs
    part_max_ptr,  # (T, H, NUM_SPLITS) fp32 running max (log2 units)
    part_sum_ptr,  # (T, H, NUM_SPLITS) fp32 running sum of exp2
    q_ptr,  # (T, H, D)
    k_cache_ptr,  # (NB, BS, KVH, D)
    v_cache_ptr,  # (NB, BS, KVH, D), same strides as k_cache
    block_tables_ptr,  # (S, max_blocks) int32
    seq_lens_ptr,  # (S,) int32
    cu_seqlens_q_ptr,  # (S + 1,) int32
    num_seqs,
    qk_scale,  # softmax scale * log2(e)
    stride_q_token,
    stride_q_head,
    stride_o_token,
    stride_o_head,
    stride_kv_block,
    stride_kv_slot,
    stride_kv_head,
    stride_block_table,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TILE_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr = 0,  # 0: full causal; w: a row at p sees keys in (p - w, p]
    kv_start_ptr=None,  # (S,) int32 first key position of each sequence (cascade tail pass), if HAS_KV_START
    lse_ptr=None,  # (T, H) fp32 natural-log LSE of each row, written if STORE_LSE (and NUM_SPLITS == 1)
    prefix_acc_ptr=None,  # (T, H, PREFIX_SPLITS, HEAD_DIM_PAD) fp32 the shared pass's unnormalised partial outputs
    prefix_max_ptr=None,  # (T, H, PREFIX_SPLITS) fp32 their running max (log2 units)
    prefix_sum_ptr=None,  # (T, H, PREFIX_SPLITS) fp32 their running sum of exp2
    HAS_KV_START: tl.constexpr = False,
    STORE_LSE: tl.constexpr = False,
    PREFIX_SPLITS: tl.constexpr = 0,  # > 0: start the online softmax from the shared pass's split states (fused merge)
):
    tile_idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq = _sequence_of_tile(cu_seqlens_q_ptr, tile_idx, num_seqs, BLOCK_Q)
    q_begin = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_begin
    if BLOCK_Q == 1:
        first_q = tile_idx - q_begin
    else:
        first_q = (tile_idx - (q_begin // BLOCK_Q + seq)) * BLOCK_Q
    if first_q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - q_len  # cache position of this sequence's query row 0

    # Rows are token-major, head-minor: row m is token first_q + m // GROUP, head kv_head * GROUP + m % GROUP.
    offs_m = tl.arange(0, BLOCK_M)
    row_q = first_q + offs_m // GROUP
    row_head = kv_head * GROUP + offs_m % GROUP
    row_valid = (offs_m < BLOCK_Q * GROUP) & (row_q < q_len)
    row_pos = first_pos + row_q
    row_token = (q_begin + row_q).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = offs_d < HEAD_DIM

    q_offs = row_token[:, None] * stride_q_token + row_head[:, None] * stride_q_head + offs_d[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_valid[:, None] & d_valid[None, :], other=0.0)  # (BLOCK_M, D_PAD)

    # Keys this tile may see: up to the causal position of its last row (from its first row's window start).
    kv_len = first_pos + tl.minimum(first_q + BLOCK_Q, q_len)
    num_tiles = tl.cdiv(kv_len, TILE_N)
    first_tile = 0
    if SLIDING_WINDOW > 0:
        first_tile = tl.maximum(first_pos + first_q - SLIDING_WINDOW + 1, 0) // TILE_N
    kv_start = 0
    if HAS_KV_START:
        kv_start = tl.load(kv_start_ptr + seq)
        first_tile = tl.maximum(first_tile, kv_start // TILE_N)
    if NUM_SPLITS == 1:
        tile_lo = first_tile
        tile_hi = num_tiles
    else:
        tiles_per_split = tl.cdiv(num_tiles - first_tile, NUM_SPLITS)
        tile_lo = first_tile + split * tiles_per_split
        tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    if PREFIX_SPLITS > 0:  # the shared pass's per-split (m, l, acc) states, merged into this row's starting state
        first_split_start = tl.where(split == 0, kv_start, 0)  # only split 0 takes the shared state
        use = row_valid & (offs_m * 0 + first_split_start > 0)  # block-shaped: the interpreter rejects bool scalars
        state = (row_token * NUM_HEADS + row_head) * PREFIX_SPLITS  # (BLOCK_M,)
        for shared_split in tl.static_range(PREFIX_SPLITS):
            m_s = tl.load(prefix_max_ptr + state + shared_split, mask=use, other=float("-inf"))
            l_s = tl.load(prefix_sum_ptr + state + shared_split, mask=use, other=0.0)
            acc_s = tl.load(prefix_acc_ptr + (state + shared_split)[:, None] * HEAD_DIM_PAD + offs_d[None, :],
                            mask=use[:, None], other=0.0)
            m_new = tl.maximum(m_i, m_s)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # an empty split (m = -inf) weighs 0
            alpha = tl.exp2(m_i - m_safe)
            beta = tl.exp2(m_s - m_safe)
            l_i = l_i * alpha + l_s * beta
            acc = acc * alpha[:, None] + acc_s * beta[:, None]
            m_i = m_new
    offs_n = tl.arange(0, TILE_N)
    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_block_table
    for tile in range(tile_lo, tile_hi):
        key_pos = tile * TILE_N + offs_n
        key_valid = key_pos < kv_len
        if HAS_KV_START:
            key_valid = key_valid & (key_pos >= kv_start)
        block = tl.load(block_table_row + key_pos // BLOCK_SIZE, mask=key_valid, other=0).to(tl.int64)
        kv_offs = (
            block[:, None] * stride_kv_block
            + (key_pos % BLOCK_SIZE)[:, None] * stride_kv_slot
            + kv_head * stride_kv_head
            + offs_d[None, :]
        )
        kv_mask = key_valid[:, None] & d_valid[None, :]
        k = _widen(tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0), q.dtype)  # (TILE_N, D_PAD)
        v = _widen(tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0), q.dtype)  # (TILE_N, D_PAD)

        # .to: under torch.compile the scalar arrives as fp64, which would make the softmax state fp64
        s = (_dot(q, tl.trans(k), DOT_PRECISION, DOT_UPCAST) * qk_scale).to(tl.float32)  # (BLOCK_M, TILE_N)
        visible = key_pos[None, :] <= row_pos[:, None]
        if HAS_KV_START:
            visible = visible & key_valid[None, :]
        if SLIDING_WINDOW > 0:
            visible = visible & (key_pos[None, :] > row_pos[:, None] - SLIDING_WINDOW)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet stays at 0 weight
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, DOT_UPCAST)
        m_i = m_new

    if NUM_SPLITS == 1:
        o_offs = row_token[:, None] * stride_o_token + row_head[:, None] * stride_o_head + offs_d[None, :]
        out = acc / l_i[:, None]
        tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])
        if STORE_LSE:
            lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # natural log
            tl.store(lse_ptr + row_token * NUM_HEADS + row_head, lse, mask=row_valid)
    else:
        part = (row_token * NUM_HEADS + row_head) * NUM_SPLITS + split  # (BLOCK_M,)
        tl.store(part_max_ptr + part, m_i, mask=row_valid)
        tl.store(part_sum_ptr + part, l_i, mask=row_valid)
        acc_offs = part[:, None] * HEAD_DIM_PAD + offs_d[None, :]
        tl.store(part_acc_ptr + acc_offs, acc, mask=row_valid[:, None])


@triton.jit
def _merge_splits_kernel(
    out_ptr,  # (T, H, D)
    part_acc_ptr,  # (T, H, NUM_SPLITS, HEAD_DIM_PAD) fp32
    part_max_ptr,  # (T, H, NUM_SPLITS) fp32
    part_sum_ptr,  # (T, H, NUM_SPLITS) fp32
    cu_seqlens_q_ptr,  # (S + 1,) int32
    num_seqs,
    stride_o_token,
    stride_o_head,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    lse_ptr=None,  # (T, H) fp32 natural-log LSE, written if STORE_LSE
    STORE_LSE: tl.constexpr = False,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    if token >= tl.load(cu_seqlens_q_ptr + num_seqs):  # padding rows past the last sequence
        return
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    part = (token.to(tl.int64) * NUM_HEADS + head) * NUM_SPLITS + offs_s  # (NUM_SPLITS,)
    m = tl.load(part_max_ptr + part)
    l = tl.load(part_sum_ptr + part)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM_PAD + offs_d[None, :])  # (NUM_SPLITS, D_PAD)
    m_max = tl.max(m, axis=0)  # finite: the split holding the row's own position always has a key
    w = tl.exp2(m - m_max)  # 0 for empty splits (m = -inf)
    total = tl.sum(l * w, axis=0)
    out = tl.sum(acc * w[:, None], axis=0) / total
    o_offs = token.to(tl.int64) * stride_o_token + head * stride_o_head + offs_d
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)
    if STORE_LSE:
        tl.store(lse_ptr + token.to(tl.int64) * NUM_HEADS + head, (m_max + tl.log2(total)) * 0.6931471805599453)


def paged_attention_triton(
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
    """Causal attention of packed new tokens over a paged KV cache, one launch for the whole batch.

    Args:
        query: (T, H, D) queries of all new tokens of all sequences, packed, RoPE applied.
        key_cache / value_cache: (NB, BS, KVH, D) one layer's cache, last dim contiguous, any other
            strides (equal for K and V). The new tokens' keys/values are already written.
        block_tables: (S, max_blocks) int32 block ids per sequence; entries past the context are ignored.
        seq_lens: (S,) int32 context length of each sequence, new tokens included.
        cu_seqlens_q: (S + 1,) int32 query offsets; sequence s owns rows cu[s]:cu[s+1] (may be empty).
        max_seqlen_q: host-side upper bound of the per-sequence query lengths (picks the tiling only).
        scale: softmax scale.
        out: optional (T, H, D) buffer in query's dtype; rows past cu_seqlens_q[-1] are left untouched.
        sliding_window: None (full causal attention) or w >= 1: row p attends to positions in (p - w, p].

    Query row j of sequence s (q_len rows, context ctx) sits at position ctx - q_len + j and attends to
    cache positions 0..ctx - q_len + j; query head h reads KV head h // (H // KVH).
    """
    _check_inputs(query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, out)
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window={sliding_window} must be None (full attention) or >= 1.")
    if out is None:
        out = torch.empty_like(query)
    group = query.shape[1] // key_cache.shape[2]
    config = choose_config(
        num_tokens=query.shape[0],
        num_seqs=seq_lens.shape[0],
        num_kv_heads=key_cache.shape[2],
        group=group,
        max_seqlen_q=max_seqlen_q,
        max_context=block_tables.shape[1] * key_cache.shape[1],
        dtype=query.dtype,
        device=query.device,
        kv_dtype=key_cache.dtype,
    )
    return launch_paged_attention(
        query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale, out,
        sliding_window=sliding_window or 0, **config
    )


def choose_config(
    num_tokens: int,
    num_seqs: int,
    num_kv_heads: int,
    group: int,
    max_seqlen_q: int,
    max_context: int,
    dtype: torch.dtype,
    device: torch.device,
    kv_dtype: torch.dtype | None = None,
) -> dict:
    """Tiling from shapes only (never from tensor contents), so a CUDA graph can replay it.

    Decode-only steps (max_seqlen_q <= 1) take one token per program and split the KV axis when the
    grid would leave SMs idle; steps with prefill rows take up to BLOCK_M = 64 rows (BLOCK_M // GROUP
    tokens) so each K/V tile is reused by several tokens. fp32 dots run on FMAs, which need 8 warps to
    stay out of register spills (ptxas, sm_90).
    """
    num_warps = 8 if dtype == torch.float32 else 4
    if max_seqlen_q <= 1:
        # H100 sweep (benchmarks/results/paged_attention_sweep_h100.json): 64-key tiles, 3 stages, and
        # splitting only until the grid holds ~1.5 programs per SM won at batch 1, 16 and 128.
        block_m = max(16, triton.next_power_of_2(group))
        tile_n = 32 if dtype == torch.float32 else 64
        if kv_dtype == FP8_DTYPE and dtype != torch.float32:
            # An FP8 cache's tiles are widened in registers before the dots, so Triton (3.6, H200) cannot feed them
            # straight from its pipelined loads: 128-key tiles won all three GRPO decode shapes of session 11's
            # sweep (1,024 rows x 512 / 2,048 prompts, 128 x 2,048: 0.80 / 0.75 / 0.94x of the bf16 kernel, against
            # 0.63 / 0.59 / 0.84x with 64), over 32/64/128 keys x 4/8 warps x 1-4 stages.
            tile_n = 128
        num_splits = _decode_splits(num_tokens * num_kv_heads, triton.cdiv(max_context, tile_n), device)
        return dict(block_q=1, block_m=block_m, tile_n=tile_n, num_splits=num_splits, num_warps=num_warps, num_stages=3)
    block_m = max(16, triton.next_power_of_2(group), min(64, triton.next_power_of_2(max_seqlen_q * group)))
    return dict(block_q=block_m // group, block_m=block_m, tile_n=32, num_splits=1, num_warps=num_warps, num_stages=2)


def _decode_splits(num_programs: int, max_tiles: int, device: torch.device) -> int:
    """Power of two such that the grid has ~1.5 programs per SM, each split keeping >= 2 KV tiles."""
    if device.type != "cuda" or num_programs == 0:
        return 1
    target = 3 * num_sms(device) // 2
    splits = 1
    while splits < 16 and num_programs * splits < target and 2 * splits * 2 <= max_tiles:
        splits *= 2
    return splits


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device: launch heuristics ask on every decode step, so it is cached."""
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    *,
    block_q: int,
    block_m: int,
    tile_n: int,
    num_splits: int = 1,
    num_warps: int = 4,
    num_stages: int = 2,
    sliding_window: int = 0,
    kv_start: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    prefix_parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Launch with an explicit tiling (inputs already checked); tests and benchmarks sweep it here.

    The cascade tail pass (``triton_cascade_attention.py``) adds: ``kv_start`` (S,) int32, keys before it are
    skipped; ``lse`` (T, H) fp32, written with each row's natural-log LSE; ``prefix_parts`` = (acc (T, H, P,
    D_PAD), max (T, H, P), sum (T, H, P)) fp32 contiguous, the shared pass's unnormalised state for each of its
    P KV splits, which rows with ``kv_start > 0`` merge and start their softmax from (the cascade's merge and
    the shared pass's split merge, fused: no merge kernel, no normalised round trip). Without them the kernel
    compiles exactly as before.
    """
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    num_seqs = seq_lens.shape[0]
    if block_q < 1 or block_q * group > block_m or block_m < 16 or tile_n < 16:
        raise ValueError(f"Bad tiling block_q={block_q} block_m={block_m} tile_n={tile_n} for group={group}.")
    if num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits={num_splits} must be a power of two >= 1.")
    if prefix_parts is not None and kv_start is None:
        raise ValueError("prefix_parts needs kv_start (rows with kv_start > 0 start from them).")
    prefix_acc, prefix_max, prefix_sum = prefix_parts if prefix_parts is not None else (None, None, None)
    if num_tokens == 0 or num_seqs == 0:
        return out
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    num_q_tiles = num_tokens if block_q == 1 else num_tokens // block_q + num_seqs
    if num_splits > 1:
        part_acc = torch.empty(  # (T, H, NUM_SPLITS, D_PAD)
            num_tokens, num_heads, num_splits, head_dim_pad, dtype=torch.float32, device=query.device
        )
        part_max = torch.empty(num_tokens, num_heads, num_splits, dtype=torch.float32, device=query.device)
        part_sum = torch.empty_like(part_max)  # (T, H, NUM_SPLITS)
    else:
        part_acc = part_max = part_sum = out  # unused
    _paged_attention_kernel[(num_q_tiles, num_kv_heads, num_splits)](
        out,
        part_acc,
        part_max,
        part_sum,
        query,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        cu_seqlens_q,
        num_seqs,
        float(scale) * LOG2E,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        block_tables.stride(0),
        NUM_HEADS=num_heads,
        GROUP=group,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=key_cache.shape[1],
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        TILE_N=tile_n,
        NUM_SPLITS=num_splits,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        DOT_UPCAST=query.device.type != "cuda",  # the Triton 3.9 interpreter's bf16 tl.dot returns garbage
        SLIDING_WINDOW=int(sliding_window),
        kv_start_ptr=kv_start,
        lse_ptr=lse,
        prefix_acc_ptr=prefix_acc,
        prefix_max_ptr=prefix_max,
        prefix_sum_ptr=prefix_sum,
        HAS_KV_START=kv_start is not None,
        STORE_LSE=lse is not None,
        PREFIX_SPLITS=0 if prefix_max is None else prefix_max.shape[-1],
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            out,
            part_acc,
            part_max,
            part_sum,
            cu_seqlens_q,
            num_seqs,
            out.stride(0),
            out.stride(1),
            NUM_HEADS=num_heads,
            HEAD_DIM=head_dim,
            HEAD_DIM_PAD=head_dim_pad,
            NUM_SPLITS=num_splits,
            lse_ptr=lse,
            STORE_LSE=lse is not None,
            num_warps=4,
        )
    return out


def _check_inputs(query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, out) -> None:
    """Misuse raises ValueError naming the problem and the fix; no tensor contents are read (no sync)."""
    _check_attention_shapes(query, key_cache, value_cache)
    _check_strides(query, key_cache, value_cache, out)
    _check_metadata(block_tables, seq_lens, cu_seqlens_q, max_seqlen_q)
    _check_devices(query=query, key_cache=key_cache, value_cache=value_cache, block_tables=block_tables,
                   seq_lens=seq_lens, cu_seqlens_q=cu_seqlens_q, out=out)  # fmt: skip


def _check_attention_shapes(query, key_cache, value_cache) -> None:
    if query.dim() != 3:
        raise ValueError(f"query must be (T, H, D), got shape {tuple(query.shape)}; pack all sequences' new tokens.")
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(
            f"key_cache and value_cache must both be (NB, BS, KVH, D), got {tuple(key_cache.shape)} and "
            f"{tuple(value_cache.shape)}; pass one layer's views, e.g. PagedKVCache.key_cache(layer)."
        )
    (num_heads, head_dim), num_kv_heads = query.shape[1:], key_cache.shape[2]
    if key_cache.shape[3] != head_dim:
        raise ValueError(f"query head_dim {head_dim} != cache head_dim {key_cache.shape[3]}; use one model config.")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads} (GQA: H = KVH * G).")
    if query.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"query dtype {query.dtype} is not supported; use one of {SUPPORTED_DTYPES}.")
    if key_cache.dtype != value_cache.dtype or key_cache.dtype not in (query.dtype, FP8_DTYPE):
        raise ValueError(
            f"cache dtype {key_cache.dtype}/{value_cache.dtype} does not serve query dtype {query.dtype}: the cache "
            f"must hold the query's dtype or {FP8_DTYPE} (kv_cache_dtype='fp8'), the same for K and V."
        )


def _check_strides(query, key_cache, value_cache, out) -> None:
    if out is not None and (out.shape != query.shape or out.dtype != query.dtype):
        raise ValueError(
            f"out must match query's shape {tuple(query.shape)} and dtype {query.dtype}, got {tuple(out.shape)} "
            f"{out.dtype}; allocate it with torch.empty_like(query)."
        )
    named = {"query": query, "key_cache": key_cache, "value_cache": value_cache, "out": out}
    for name, t in named.items():
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dimension (stride {t.stride(-1)}); call .contiguous().")
    if key_cache.stride() != value_cache.stride():
        raise ValueError(
            f"key_cache strides {key_cache.stride()} != value_cache strides {value_cache.stride()}; take both "
            "views from one cache (PagedKVCache.key_cache / value_cache)."
        )


def _check_metadata(block_tables, seq_lens, cu_seqlens_q, max_seqlen_q) -> None:
    num_seqs = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    max_blocks = block_tables.shape[-1] if block_tables.dim() == 2 else -1
    expected = {"block_tables": (num_seqs, max_blocks), "seq_lens": (num_seqs,), "cu_seqlens_q": (num_seqs + 1,)}
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens), ("cu_seqlens_q", cu_seqlens_q)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}; convert it with .to(torch.int32).")
        if tuple(t.shape) != expected[name] or num_seqs < 0 or max_blocks < 0:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {expected[name]} (S={num_seqs} sequences).")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dimension; call .contiguous().")
    if max_seqlen_q < 0:
        raise ValueError(f"max_seqlen_q={max_seqlen_q} must be >= 0 (an upper bound of the query lengths).")


def _check_devices(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) != 1:
        raise ValueError(f"all tensors must be on one device, got {devices}; move them with .to(query.device).")
    if tensors["query"].device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"paged_attention_triton needs CUDA tensors, got {tensors['query'].device}; on CPU use "
            "paged_attention_reference (or set TRITON_INTERPRET=1 before importing triton, to debug)."
        )


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
