"""Triton cascade (shared-prefix) decode attention: the shared pass, and the tail pass with a fused merge.

Semantics and the torch reference: ``cascade_attention.py``. How the work is cut:

- Shared pass (``_shared_prefix_kernel``): a program owns one KV head and a *row tile* of one group:
  ``BLOCK_R`` rows of the group times the ``GROUP`` query heads of that KV head, i.e. up to ``BLOCK_M``
  query vectors, stacked like the prefill tiles of the paged kernel. Each K/V tile of the shared blocks is
  loaded once for all of them and fed to ``tl.dot`` (QK^T, PV): a group of 16 rows at GQA 6 is a 96-row
  matmul over the prompt instead of 16 matrix-vector passes reading it 16 times. The grid is an upper bound
  from shapes (``R // BLOCK_R + num_groups`` row tiles); a program finds its group by binary search over
  ``cu_group_rows``. Few groups (128 rows = 8 groups) would leave SMs idle, so the shared KV axis is split
  (flash-decoding) while the grid stays within one program per SM (``_shared_splits``).
- Tail pass: the paged decode kernel with ``kv_start = plan.tail_start`` (keys before it skipped). By
  default (``merge="fused"``) the shared pass writes each split's unnormalised (max, sum, acc) state and
  the tail pass merges them into each grouped row's starting softmax state, which *is* the cascade's merge:
  no merge kernel, no normalised output round trip (on an H200 at 1,024 rows the separate split merge cost
  ~11 us a layer, as much as the shared pass saved). With ``merge="torch"`` the shared pass writes its
  output and LSE (merging its splits with the paged kernel's merge kernel), the tail pass its own, and
  ``merge_attention_states`` combines them.

Both passes read no tensor contents on the host and size their grids from tensor shapes only, so with a
plan padded to fixed sizes (``CascadePlan.padded``) and fixed tilings they are captured in the engine's CUDA
graphs (``engine/cuda_graphs.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from thaw_rl_kernels.cascade_attention import _check_plan, merge_attention_states
from thaw_rl_kernels.cascade_plan import CascadePlan
from thaw_rl_kernels.triton_paged_attention import (
    LOG2E,
    _check_inputs,
    _dot,
    _merge_splits_kernel,
    _sequence_of_tile,
    _widen,
    choose_config,
    launch_paged_attention,
    num_sms,
)


@triton.jit(do_not_specialize=["num_groups"])
def _shared_prefix_kernel(
    out_ptr,  # (T, H, HEAD_DIM) fp32 contiguous, used when NUM_SPLITS == 1
    lse_ptr,  # (T, H) fp32 natural-log LSE, used when NUM_SPLITS == 1
    part_acc_ptr,  # (T, H, NUM_SPLITS, HEAD_DIM_PAD) fp32 unnormalised partial outputs
    part_max_ptr,  # (T, H, NUM_SPLITS) fp32 running max (log2 units)
    part_sum_ptr,  # (T, H, NUM_SPLITS) fp32 running sum of exp2
    q_ptr,  # (T, H, D), one decode row per sequence
    k_cache_ptr,  # (NB, BS, KVH, D)
    v_cache_ptr,  # (NB, BS, KVH, D), same strides as k_cache
    block_tables_ptr,  # (S, max_blocks) int32
    group_rows_ptr,  # (R,) int32 rows of all groups, group by group
    cu_group_rows_ptr,  # (num_groups + 1,) int32
    group_num_blocks_ptr,  # (num_groups,) int32
    num_groups,
    qk_scale,  # softmax scale * log2(e)
    stride_q_token,
    stride_q_head,
    stride_kv_block,
    stride_kv_slot,
    stride_kv_head,
    stride_block_table,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TILE_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    WRITE_PARTS: tl.constexpr = False,  # partial states even with one split (the fused tail pass merges them)
):
    tile_idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    group_id = _sequence_of_tile(cu_group_rows_ptr, tile_idx, num_groups, BLOCK_R)
    r_begin = tl.load(cu_group_rows_ptr + group_id)
    num_rows = tl.load(cu_group_rows_ptr + group_id + 1) - r_begin
    if BLOCK_R == 1:
        first_r = tile_idx - r_begin
    else:
        first_r = (tile_idx - (r_begin // BLOCK_R + group_id)) * BLOCK_R
    if first_r >= num_rows:
        return

    # Rows are row-major, head-minor: m is the group's row first_r + m // GROUP, head kv_head * GROUP + m % GROUP.
    offs_m = tl.arange(0, BLOCK_M)
    row_r = first_r + offs_m // GROUP
    row_head = kv_head * GROUP + offs_m % GROUP
    row_valid = (offs_m < BLOCK_R * GROUP) & (row_r < num_rows)
    row_token = tl.load(group_rows_ptr + r_begin + row_r, mask=row_valid, other=0).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = offs_d < HEAD_DIM
    q_offs = row_token[:, None] * stride_q_token + row_head[:, None] * stride_q_head + offs_d[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_valid[:, None] & d_valid[None, :], other=0.0)  # (BLOCK_M, D_PAD)

    # The shared blocks, read from the group's first row (every row of the group has the same ids there).
    kv_len = tl.load(group_num_blocks_ptr + group_id) * BLOCK_SIZE
    leader = tl.load(group_rows_ptr + r_begin).to(tl.int64)
    block_table_row = block_tables_ptr + leader * stride_block_table
    num_tiles = tl.cdiv(kv_len, TILE_N)
    if NUM_SPLITS == 1:
        tile_lo = 0
        tile_hi = num_tiles
    else:
        tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
        tile_lo = split * tiles_per_split
        tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    offs_n = tl.arange(0, TILE_N)
    for tile in range(tile_lo, tile_hi):
        key_pos = tile * TILE_N + offs_n
        key_valid = key_pos < kv_len
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
        s = (_dot(q, tl.trans(k), DOT_PRECISION, DOT_UPCAST) * qk_scale).to(tl.float32)  # (BLOCK_M, TILE_N)
        s = tl.where(key_valid[None, :], s, float("-inf"))  # every shared key precedes every row: no causal mask
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, DOT_UPCAST)
        m_i = m_new

    state = row_token * NUM_HEADS + row_head  # (BLOCK_M,)
    if NUM_SPLITS == 1 and not WRITE_PARTS:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + state[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_valid[:, None] & d_valid[None, :])
        tl.store(lse_ptr + state, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=row_valid)
    else:
        part = state * NUM_SPLITS + split  # (BLOCK_M,)
        tl.store(part_max_ptr + part, m_i, mask=row_valid)
        tl.store(part_sum_ptr + part, l_i, mask=row_valid)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM_PAD + offs_d[None, :], acc, mask=row_valid[:, None])


def choose_shared_config(num_rows: int, num_groups: int, max_group_rows: int, max_shared_blocks: int,
                         num_kv_heads: int, group: int, block_size: int, dtype: torch.dtype,
                         device: torch.device) -> dict:
    """Tiling of the shared pass from host-known sizes: one row tile per group where it fits in 128 query
    vectors (a group of 16 rows at GQA 6 is 96), and KV splits only while the grid stays within one program
    per SM (``_shared_splits``)."""
    block_m = max(16, min(128, triton.next_power_of_2(max(1, max_group_rows) * group)))
    block_m = max(block_m, triton.next_power_of_2(group))
    active_tiles = num_groups * triton.cdiv(max(1, max_group_rows), block_m // group)  # the grid's bound is looser
    # splits are counted in 64-key pieces whatever the tile, as the H200 sweeps measured them
    num_splits = _shared_splits(active_tiles * num_kv_heads, triton.cdiv(max_shared_blocks * block_size, 64), device)
    num_warps = 8 if block_m >= 128 or dtype == torch.float32 else 4
    # fp32 dots run on FMAs: small tiles keep them out of register spills. bf16/fp16: 128-key tiles, 3 stages, the
    # best or within 1% of it in every case of grpo_decode_attention_h200_s10_shared_tilings.json (1.10x over
    # 64-key tiles, 2 stages at 1,024 rows x 2,048)
    tile_n, num_stages = (32, 2) if dtype == torch.float32 else (128, 3)
    return dict(block_r=block_m // group, block_m=block_m, tile_n=tile_n, num_splits=num_splits, num_warps=num_warps,
                num_stages=num_stages)  # fmt: skip


def _shared_splits(num_programs: int, max_tiles: int, device: torch.device) -> int:
    """Power of two (<= 16) of KV splits for the shared pass: doubled while the grid stays within one program per
    SM and each split keeps >= 2 of the ``max_tiles`` pieces of the shared keys. Unlike the plain decode kernel
    (``_decode_splits``, ~1.5 programs per SM), a split here writes 96-row partial states that the tail pass reads
    back: on an H200 (GRPO groups of 16, Qwen2.5-1.5B heads; ``grpo_decode_attention_h200_s10_splits.json``) 64
    groups ran best unsplit, 32 with 2 splits, 16 with 4 and 8 with 8."""
    if device.type != "cuda" or num_programs == 0:
        return 1
    sms = num_sms(device)
    splits = 1
    while splits < 16 and num_programs * splits * 2 <= sms and 2 * splits * 2 <= max_tiles:
        splits *= 2
    return splits


def launch_shared_prefix(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    plan: CascadePlan,
    scale: float,
    out: torch.Tensor | None,  # (T, H, D) fp32 contiguous
    lse: torch.Tensor | None,  # (T, H) fp32
    *,
    block_r: int,
    block_m: int,
    tile_n: int,
    num_splits: int = 1,
    num_warps: int = 4,
    num_stages: int = 2,
    parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Pass (a) with an explicit tiling: writes out and lse of every grouped row (other rows untouched).

    With ``parts`` = (acc (T, H, num_splits, D_PAD), max (T, H, num_splits), sum (T, H, num_splits)) fp32
    (``shared_parts``) it writes each split's unnormalised state there instead, even unsplit, and runs no merge:
    the tail pass merges them (``launch_paged_attention(prefix_parts=...)``); out and lse are not touched."""
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    if block_r < 1 or block_r * group > block_m or block_m < 16 or tile_n < 16:
        raise ValueError(f"Bad tiling block_r={block_r} block_m={block_m} tile_n={tile_n} for group={group}.")
    if num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits={num_splits} must be a power of two >= 1.")
    num_groups, num_rows = plan.num_groups, plan.group_rows.shape[0]
    if num_groups == 0:
        return
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    num_tiles = num_rows if block_r == 1 else num_rows // block_r + num_groups
    if parts is not None:
        part_acc, part_max, part_sum = parts
        if part_max.shape != (num_tokens, num_heads, num_splits) or part_acc.shape[-1] != head_dim_pad:
            raise ValueError(f"parts {tuple(part_acc.shape)}/{tuple(part_max.shape)} do not fit {num_splits} splits; "
                             "allocate them with shared_parts.")
        out = lse = part_max  # unused
    elif num_splits > 1:
        part_acc = torch.empty(  # (T, H, NUM_SPLITS, D_PAD)
            num_tokens, num_heads, num_splits, head_dim_pad, dtype=torch.float32, device=query.device)
        part_max = torch.empty(num_tokens, num_heads, num_splits, dtype=torch.float32, device=query.device)
        part_sum = torch.empty_like(part_max)  # (T, H, NUM_SPLITS)
    else:
        part_acc = part_max = part_sum = out  # unused
    _shared_prefix_kernel[(num_tiles, num_kv_heads, num_splits)](
        out, lse, part_acc, part_max, part_sum, query, key_cache, value_cache, block_tables,
        plan.group_rows, plan.cu_group_rows, plan.group_num_blocks, num_groups, float(scale) * LOG2E,
        query.stride(0), query.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        block_tables.stride(0),
        NUM_HEADS=num_heads, GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_SIZE=key_cache.shape[1],
        BLOCK_R=block_r, BLOCK_M=block_m, TILE_N=tile_n, NUM_SPLITS=num_splits,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        DOT_UPCAST=query.device.type != "cuda",  # the interpreter's bf16 tl.dot is broken (see the paged kernel)
        WRITE_PARTS=parts is not None, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if num_splits > 1 and parts is None:  # every row of the batch is merged; only grouped rows are read afterwards
        cu_all = torch.arange(num_tokens + 1, dtype=torch.int32, device=query.device)
        _merge_splits_kernel[(num_tokens, num_heads)](
            out, part_acc, part_max, part_sum, cu_all, num_tokens, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, NUM_SPLITS=num_splits,
            lse_ptr=lse, STORE_LSE=True, num_warps=4,
        )  # fmt: skip


def shared_parts(query: torch.Tensor, num_splits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Buffers for the shared pass's per-split states: acc (T, H, num_splits, D_PAD), max and sum (T, H, num_splits),
    fp32. Rows outside groups are never written (the tail pass does not read them)."""
    num_tokens, num_heads, head_dim = query.shape
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    acc = torch.empty(num_tokens, num_heads, num_splits, head_dim_pad, dtype=torch.float32, device=query.device)
    part_max = torch.empty(num_tokens, num_heads, num_splits, dtype=torch.float32, device=query.device)
    return acc, part_max, torch.empty_like(part_max)


def cascade_attention_triton(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    plan: CascadePlan,
    scale: float,
    out: torch.Tensor | None = None,
    merge: str = "fused",
    shared_config: dict | None = None,
    tail_config: dict | None = None,
) -> torch.Tensor:
    """Decode attention of one query row per sequence over a paged cache, shared prefixes read once per group.

    Args:
        query: (S, H, D) one new token per sequence, RoPE applied.
        key_cache / value_cache, block_tables, seq_lens: as ``paged_attention_triton``.
        plan: ``plan_cascade`` of these block tables and lengths, on query's device.
        scale: softmax scale.
        out: optional (S, H, D) buffer in query's dtype.
        merge: "fused" (the tail pass merges the shared pass's split states and starts from them) or "torch"
            (shared and tail outputs + LSEs, then ``merge_attention_states``); both exact, kept for measuring.
        shared_config / tail_config: explicit tilings (tests and sweeps), else chosen from shapes.
    """
    num_seqs = seq_lens.shape[0]
    cu_seqlens_q = torch.arange(num_seqs + 1, dtype=torch.int32, device=query.device)
    _check_inputs(query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, 1, out)
    _check_plan(query, block_tables, seq_lens, plan, key_cache.shape[1])
    for name in ("group_rows", "cu_group_rows", "group_num_blocks", "tail_start"):
        t = getattr(plan, name)
        if t.device != query.device or t.dtype != torch.int32:
            raise ValueError(f"plan.{name} is {t.dtype} on {t.device}; move the plan with plan.to(query.device).")
    if merge not in ("fused", "torch"):
        raise ValueError(f"merge={merge!r} must be 'fused' or 'torch'.")
    if out is None:
        out = torch.empty_like(query)
    num_heads, num_kv_heads = query.shape[1], key_cache.shape[2]
    group, block_size = num_heads // num_kv_heads, key_cache.shape[1]
    shared_config = shared_config or choose_shared_config(
        plan.group_rows.shape[0], plan.num_groups, plan.max_group_rows, plan.max_shared_blocks, num_kv_heads, group,
        block_size, query.dtype, query.device)  # fmt: skip
    tail_config = tail_config or choose_config(
        num_tokens=num_seqs, num_seqs=num_seqs, num_kv_heads=num_kv_heads, group=group, max_seqlen_q=1,
        max_context=block_tables.shape[1] * block_size - plan.max_shared_blocks * block_size * (plan.num_groups > 0),
        dtype=query.dtype, device=query.device, kv_dtype=key_cache.dtype,
    )  # fmt: skip
    tail = dict(kv_start=plan.tail_start)
    if merge == "fused":  # the shared pass's split states go straight to the tail pass, which merges them
        parts = shared_parts(query, shared_config.get("num_splits", 1))
        launch_shared_prefix(query, key_cache, value_cache, block_tables, plan, scale, None, None, parts=parts,
                             **shared_config)  # fmt: skip
        return launch_paged_attention(query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale, out,
                                      prefix_parts=parts, **tail, **tail_config)
    shared_out = torch.empty(num_seqs, num_heads, query.shape[2], dtype=torch.float32, device=query.device)
    shared_lse = torch.empty(num_seqs, num_heads, dtype=torch.float32, device=query.device)
    launch_shared_prefix(query, key_cache, value_cache, block_tables, plan, scale, shared_out, shared_lse,
                         **shared_config)  # fmt: skip
    tail_out = torch.empty_like(shared_out)
    tail_lse = torch.empty_like(shared_lse)
    launch_paged_attention(query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale, tail_out,
                           lse=tail_lse, **tail, **tail_config)  # fmt: skip
    grouped = (plan.tail_start > 0)[:, None]  # (S, 1): other rows' shared state was never written
    shared_lse = torch.where(grouped, shared_lse, float("-inf"))
    merged, _ = merge_attention_states(shared_out, shared_lse, tail_out, tail_lse)
    return out.copy_(merged)
