"""Cascade (shared-prefix) decode attention against the plain paged kernel and the torch reference.

Batches are built the way GRPO forks build them: each group's rows share a prompt; its full blocks are the
same physical blocks in every row's table, the partial last block (a prompt ending mid-block) is copied per
row, and each row then decodes its own tokens into its own blocks. Blocks are shuffled, rows of different
groups interleaved, and every cache slot outside a context is NaN, so reading anything not in a row's
context shows up. Without a GPU the Triton kernels run in the interpreter, so shapes are tiny.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dataclasses import dataclass, replace  # noqa: E402

import pytest  # noqa: E402

from thaw_rl_kernels.cascade_attention import (  # noqa: E402
    cascade_attention_reference,
    merge_attention_states,
    shared_prefix_attention_reference,
    tail_attention_reference,
)
from thaw_rl_kernels.cascade_plan import plan_cascade  # noqa: E402
from thaw_rl_kernels.kv_write import to_cache_dtype  # noqa: E402
from thaw_rl_kernels.paged_attention import paged_attention_reference  # noqa: E402
from thaw_rl_kernels.triton_cascade_attention import cascade_attention_triton  # noqa: E402
from thaw_rl_kernels.triton_paged_attention import paged_attention_triton  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@dataclass
class DecodeBatch:
    query: torch.Tensor  # (S, H, D)
    key_cache: torch.Tensor  # (NB, BS, KVH, D), NaN outside every context
    value_cache: torch.Tensor
    block_tables: torch.Tensor  # (S, W) int32
    seq_lens: torch.Tensor  # (S,) int32
    scale: float

    def plain_reference(self) -> torch.Tensor:
        """paged_attention_reference in fp32 over the NaN-free cache: the answer cascade must give."""
        clean_k = torch.nan_to_num(self.key_cache.float(), nan=0.0)
        clean_v = torch.nan_to_num(self.value_cache.float(), nan=0.0)
        cu = torch.arange(len(self.seq_lens) + 1, dtype=torch.int32, device=DEVICE)
        return paged_attention_reference(self.query.float(), clean_k, clean_v, self.block_tables, self.seq_lens, cu,
                                         1, self.scale)  # fmt: skip


def make_forked_batch(groups, *, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0) -> DecodeBatch:
    """groups: [(prompt_len, [context length of each row])]; rows are interleaved across groups."""
    gen = torch.Generator().manual_seed(seed)
    shape = (num_kv_heads, head_dim)
    rows = []  # (dense keys, dense values, logical blocks, where -1 means "a fresh block of this row")
    shared_ids = []
    for g, (prompt_len, ctx_lens) in enumerate(groups):
        prompt_k = torch.randn(prompt_len, *shape, generator=gen)  # (P, KVH, D)
        prompt_v = torch.randn(prompt_len, *shape, generator=gen)
        num_full = prompt_len // block_size
        ids = [("shared", g, b) for b in range(num_full)]
        shared_ids += ids
        for ctx in ctx_lens:
            assert ctx > prompt_len
            own = ctx - prompt_len
            k = torch.cat([prompt_k, torch.randn(own, *shape, generator=gen)])  # (ctx, KVH, D)
            v = torch.cat([prompt_v, torch.randn(own, *shape, generator=gen)])
            rows.append((k, v, ids + [None] * (-(-ctx // block_size) - num_full)))
    order = torch.randperm(len(rows), generator=gen).tolist()  # interleave the groups' rows
    rows = [rows[i] for i in order]
    num_blocks = len(shared_ids) + sum(t.count(None) for _, _, t in rows) + 2
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    physical = {key: perm.pop() for key in shared_ids}
    storage = torch.full((2, num_blocks, block_size, *shape), float("nan"), dtype=dtype, device=DEVICE)
    key_cache, value_cache = storage[0], storage[1]
    pad_block = perm.pop()  # stays NaN: the padding of the tables
    width = max(len(t) for _, _, t in rows) + 1
    tables = torch.full((len(rows), width), pad_block, dtype=torch.int32)
    for s, (k, v, logical) in enumerate(rows):
        blocks = [physical[b] if b is not None else perm.pop() for b in logical]
        tables[s, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        pos = torch.arange(len(k))
        where = torch.tensor(blocks)[pos // block_size].to(DEVICE)
        key_cache[where, (pos % block_size).to(DEVICE)] = k.to(dtype).to(DEVICE)
        value_cache[where, (pos % block_size).to(DEVICE)] = v.to(dtype).to(DEVICE)
    return DecodeBatch(
        query=torch.randn(len(rows), num_heads, head_dim, generator=gen).to(dtype).to(DEVICE),  # (S, H, D)
        key_cache=key_cache,
        value_cache=value_cache,
        block_tables=tables.to(DEVICE),
        seq_lens=torch.tensor([len(k) for k, _, _ in rows], dtype=torch.int32, device=DEVICE),
        scale=head_dim**-0.5,
    )


# A group of 4 rows over a 2-block prompt, a group of 2 whose prompt ends mid-block (only its full block is
# shared), a group of 3 over 1 block, and a lone row (no shared blocks).
GROUPS = [(32, [40, 37, 55, 33]), (25, [30, 47]), (16, [20, 29, 17]), (5, [21])]


def test_plan_groups_rows_by_shared_full_blocks():
    batch = make_forked_batch(GROUPS, num_heads=4, num_kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32)
    plan = plan_cascade(batch.block_tables, batch.seq_lens, block_size=16)
    lens = batch.seq_lens.tolist()
    cu = plan.cu_group_rows.tolist()
    groups = sorted((sorted(lens[r] for r in plan.group_rows[cu[g]:cu[g + 1]].tolist()), n)
                    for g, n in enumerate(plan.group_num_blocks.tolist()))  # fmt: skip
    assert groups == [([17, 20, 29], 1), ([30, 47], 1), ([33, 37, 40, 55], 2)]
    lone = lens.index(21)
    assert plan.tail_start[lone] == 0
    assert plan.tail_start.tolist() == [{40: 32, 37: 32, 55: 32, 33: 32}.get(n, 16 if n != 21 else 0) for n in lens]
    assert (plan.max_group_rows, plan.max_shared_blocks) == (4, 2)


def test_plan_keeps_each_rows_last_token_in_its_tail():
    """A row whose context ends at the end of a shared block shares one block less (its own token is in it)."""
    plan = plan_cascade([[7, 8, 9], [7, 8, 3]], [32, 40], block_size=16)
    assert plan.group_num_blocks.tolist() == [1] and plan.tail_start.tolist() == [16, 16]
    plan = plan_cascade([[7, 8], [7, 9]], [16, 20], block_size=16)  # the first row's only block is its own
    assert plan.num_groups == 0 and plan.tail_start.tolist() == [0, 0]


def test_plan_prefers_per_prompt_groups_over_a_shared_system_prompt():
    """Two prompts of 3 rows sharing a 2-block system prompt: 2 groups of 4 blocks (saves 16 block reads),
    not 1 group of 2 blocks (saves 10)."""
    tables = [[1, 2, 3, 4, 10 + i] for i in range(3)] + [[1, 2, 5, 6, 20 + i] for i in range(3)] + [[7, 8]]
    plan = plan_cascade(tables, [80] * 6 + [20], block_size=16)
    assert plan.group_rows.tolist() == [0, 1, 2, 3, 4, 5] and plan.cu_group_rows.tolist() == [0, 3, 6]
    assert plan.group_num_blocks.tolist() == [4, 4]
    assert plan.tail_start.tolist() == [64] * 6 + [0]
    # With one row per prompt the per-prompt groups save nothing; the system prompt is shared.
    plan = plan_cascade([tables[0], tables[3], tables[6]], [80, 80, 20], block_size=16)
    assert plan.group_rows.tolist() == [0, 1] and plan.group_num_blocks.tolist() == [2]


def test_plan_select_after_rows_leave():
    tables = [[1, 2, 3, 10 + i] for i in range(3)] + [[4, 5, 6, 20 + i] for i in range(2)]
    plan = plan_cascade(tables, [60] * 5, block_size=16)
    assert plan.cu_group_rows.tolist() == [0, 3, 5]
    kept = plan.select([4, 0, 2], block_size=16)  # the second group is left with one row: dropped
    assert kept.group_rows.tolist() == [1, 2] and kept.group_num_blocks.tolist() == [3]
    assert kept.tail_start.tolist() == [0, 48, 48]
    assert (kept.max_group_rows, kept.max_shared_blocks) == (2, 3)
    assert kept.select([0], block_size=16).num_groups == 0  # no group left
    assert kept.select([0], block_size=16).select([0], block_size=16).tail_start.tolist() == [0]  # and none to narrow
    fresh = plan_cascade([tables[i] for i in (4, 0, 2)], [60] * 3, block_size=16)
    assert fresh.group_rows.tolist() == kept.group_rows.tolist()


def test_plan_misuse_raises():
    with pytest.raises(ValueError, match="min_group_rows"):
        plan_cascade([[1]], [3], block_size=16, min_group_rows=1)
    with pytest.raises(ValueError, match="seq_len >= 1"):
        plan_cascade([[1], [1]], [3, 0], block_size=16)


def test_merge_of_two_halves_is_attention_over_the_union():
    """merge(attention over keys A, attention over keys B) == attention over A + B, and -inf sides drop out."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 8, generator=gen), torch.randn(3, 10, 2, 8, generator=gen), torch.randn(3, 10, 2, 8)
    from thaw_rl_kernels.cascade_attention import _scores_softmax

    full = torch.ones(3, 10, dtype=torch.bool)
    first = torch.zeros(3, 10, dtype=torch.bool)
    first[:, :4] = True
    first[2] = False  # row 2: side A is empty
    expected, expected_lse = _scores_softmax(q, k, v, full, 0.3)
    out_a, lse_a = _scores_softmax(q, k, v, first, 0.3)
    out_b, lse_b = _scores_softmax(q, k, v, ~first, 0.3)
    out_a[2] = float("nan")  # an empty side's output is never multiplied
    out, lse = merge_attention_states(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, expected_lse, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 2), (6, 1), (2, 2)])
def test_reference_cascade_equals_plain_paged_reference(num_heads, num_kv_heads):
    """(a) + (b) + (c) in torch == paged_attention_reference, fp32 within 1e-5; each pass covers its keys."""
    batch = make_forked_batch(GROUPS, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=16, block_size=16,
                              dtype=torch.float32, seed=num_heads)  # fmt: skip
    plan = plan_cascade(batch.block_tables, batch.seq_lens, block_size=16).to(DEVICE)
    args = (batch.key_cache, batch.value_cache, batch.block_tables)
    out = cascade_attention_reference(batch.query, *args, batch.seq_lens, plan, batch.scale)
    assert not out.isnan().any(), "a pass read a slot outside its rows' contexts"
    torch.testing.assert_close(out, batch.plain_reference(), atol=1e-5, rtol=1e-5)
    # The split is real: grouped rows have finite shared LSEs, the lone row -inf; every tail is finite.
    _, shared_lse = shared_prefix_attention_reference(batch.query, *args, plan, batch.scale)
    _, tail_lse = tail_attention_reference(batch.query, *args, batch.seq_lens, plan.tail_start, batch.scale)
    grouped = plan.tail_start > 0
    assert shared_lse[grouped].isfinite().all() and shared_lse[~grouped].isneginf().all()
    assert tail_lse.isfinite().all() and grouped.sum() == 9


def run_triton(batch: DecodeBatch, plan, **kwargs) -> torch.Tensor:
    out = torch.full_like(batch.query, float("nan"))
    return cascade_attention_triton(batch.query, batch.key_cache, batch.value_cache, batch.block_tables,
                                    batch.seq_lens, plan, batch.scale, out=out, **kwargs)  # fmt: skip


def assert_matches(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype and not out.isnan().any()
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


TRITON_CASES = [  # dtype, H, KVH, D, merge, tilings
    pytest.param(torch.float32, 4, 2, 16, "fused", id="fp32-G2-fused"),
    pytest.param(torch.float32, 6, 1, 16, "torch", id="fp32-G6-torch-merge"),
    pytest.param(torch.bfloat16, 6, 2, 32, "fused", id="bf16-G3-fused"),
]


@pytest.mark.parametrize(("dtype", "num_heads", "num_kv_heads", "head_dim", "merge"), TRITON_CASES)
def test_triton_cascade_equals_plain_kernel_and_reference(dtype, num_heads, num_kv_heads, head_dim, merge):
    """Default tilings, then row tiles of 1 and 2 rows with both passes split along the KV axis."""
    batch = make_forked_batch(GROUPS, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                              block_size=16, dtype=dtype, seed=head_dim)  # fmt: skip
    plan = plan_cascade(batch.block_tables, batch.seq_lens, block_size=16).to(DEVICE)
    expected = batch.plain_reference()
    cu = torch.arange(len(batch.seq_lens) + 1, dtype=torch.int32, device=DEVICE)
    plain = paged_attention_triton(batch.query, batch.key_cache, batch.value_cache, batch.block_tables,
                                   batch.seq_lens, cu, 1, batch.scale)  # fmt: skip
    assert_matches(plain, expected, dtype)
    assert_matches(run_triton(batch, plan, merge=merge), expected, dtype)
    group = num_heads // num_kv_heads
    split = dict(shared_config=dict(block_r=2, block_m=16, tile_n=16, num_splits=2),
                 tail_config=dict(block_q=1, block_m=16, tile_n=16, num_splits=2))  # fmt: skip
    assert_matches(run_triton(batch, plan, merge=merge, **split), expected, dtype)
    if group <= 8:
        one_row = dict(shared_config=dict(block_r=1, block_m=16, tile_n=32, num_splits=1))
        assert_matches(run_triton(batch, plan, merge=merge, **one_row), expected, dtype)


def test_triton_cascade_reads_an_fp8_cache_as_its_widened_values():
    """kv_cache_dtype="fp8": both passes widen the FP8 tiles to the query's bf16, so cascade (split and unsplit)
    equals the plain reference over the widened cache, as does the torch cascade reference."""
    batch = make_forked_batch(GROUPS, num_heads=6, num_kv_heads=2, head_dim=32, block_size=16, dtype=torch.bfloat16,
                              seed=8)  # fmt: skip
    fp8 = replace(batch, key_cache=to_cache_dtype(batch.key_cache, torch.float8_e4m3fn),
                  value_cache=to_cache_dtype(batch.value_cache, torch.float8_e4m3fn))  # fmt: skip
    plan = plan_cascade(fp8.block_tables, fp8.seq_lens, block_size=16).to(DEVICE)
    expected = fp8.plain_reference()  # .float() widens the FP8 cache
    assert_matches(run_triton(fp8, plan), expected, torch.bfloat16)
    split = dict(shared_config=dict(block_r=2, block_m=16, tile_n=16, num_splits=2),
                 tail_config=dict(block_q=1, block_m=16, tile_n=16, num_splits=2))  # fmt: skip
    assert_matches(run_triton(fp8, plan, **split), expected, torch.bfloat16)
    clean = replace(fp8, key_cache=to_cache_dtype(torch.nan_to_num(fp8.key_cache.float()), torch.float8_e4m3fn),
                    value_cache=to_cache_dtype(torch.nan_to_num(fp8.value_cache.float()), torch.float8_e4m3fn))
    ref = cascade_attention_reference(clean.query, clean.key_cache, clean.value_cache, clean.block_tables,
                                      clean.seq_lens, plan, clean.scale)  # fmt: skip
    assert_matches(ref, expected, torch.bfloat16)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_fused_tail_pass_merges_the_shared_pass_split_states(num_splits):
    """merge="fused": the shared pass writes each split's unnormalised state (one split included) and the tail
    pass merges them itself. 4 splits of 16-key tiles over 1-2 shared blocks leave splits empty (max -inf, sum
    0), which must weigh nothing; the tail pass is split too, and only its first split takes the shared state."""
    batch = make_forked_batch(GROUPS, num_heads=6, num_kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32,
                              seed=num_splits)  # fmt: skip
    plan = plan_cascade(batch.block_tables, batch.seq_lens, block_size=16).to(DEVICE)
    shared = dict(block_r=2, block_m=16, tile_n=16, num_splits=num_splits)
    for tail_splits in (1, 2):
        tail = dict(block_q=1, block_m=16, tile_n=16, num_splits=tail_splits)
        out = run_triton(batch, plan, merge="fused", shared_config=shared, tail_config=tail)
        assert_matches(out, batch.plain_reference(), torch.float32)
        torch.testing.assert_close(out, run_triton(batch, plan, merge="torch", shared_config=shared, tail_config=tail),
                                   atol=1e-5, rtol=1e-5)  # fmt: skip


def test_triton_cascade_without_groups_is_the_plain_kernel():
    """A batch where no rows share blocks: the plan is empty and the tail pass is the whole attention."""
    batch = make_forked_batch([(5, [21]), (3, [40])], num_heads=4, num_kv_heads=2, head_dim=16, block_size=16,
                              dtype=torch.float32)  # fmt: skip
    plan = plan_cascade(batch.block_tables, batch.seq_lens, block_size=16).to(DEVICE)
    assert plan.num_groups == 0
    assert_matches(run_triton(batch, plan), batch.plain_reference(), torch.float32)


def test_a_plan_padded_to_static_sizes_gives_the_same_result():
    """CUDA-graph shapes: the grouped-row list padded to every row and 5 empty groups appended change nothing."""
    batch = make_forked_batch(GROUPS, num_heads=4, num_kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32)
    plan = plan_cascade(batch.block_tables, batch.seq_lens, block_size=16)
    padded = plan.padded(num_rows=plan.num_rows, num_groups=plan.num_groups + 5)
    assert padded.group_rows.shape == (10,) and padded.cu_group_rows.tolist()[-6:] == [9] * 6
    expected = batch.plain_reference()
    args = (batch.query, batch.key_cache, batch.value_cache, batch.block_tables, batch.seq_lens)
    torch.testing.assert_close(cascade_attention_reference(*args, padded.to(DEVICE), batch.scale), expected,
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    assert_matches(run_triton(batch, padded.to(DEVICE)), expected, torch.float32)
    with pytest.raises(ValueError, match="smaller than the plan"):
        plan.padded(num_rows=plan.num_rows, num_groups=1)


def test_triton_cascade_misuse_raises():
    batch = make_forked_batch(GROUPS[:1], num_heads=4, num_kv_heads=2, head_dim=16, block_size=16,
                              dtype=torch.float32)  # fmt: skip
    plan = plan_cascade(batch.block_tables, batch.seq_lens, block_size=16)
    with pytest.raises(ValueError, match="merge="):
        run_triton(batch, plan.to(DEVICE), merge="sum")
    with pytest.raises(ValueError, match="plan covers 3 rows"):
        run_triton(batch, plan.select([0, 1, 2], block_size=16).to(DEVICE))
    bad = plan.to(DEVICE)
    bad.tail_start = bad.tail_start.long()
    with pytest.raises(ValueError, match="plan.tail_start"):
        run_triton(batch, bad)


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [
    pytest.param(12, 2, id="qwen2.5-1.5b-heads"), pytest.param(32, 8, id="llama3-8b-heads", marks=pytest.mark.slow)])
def test_triton_cascade_at_model_head_shapes(num_heads, num_kv_heads):
    """Real GQA head counts and head_dim 128, a group of 16 rows (a GRPO group: one 128-vector row tile at GQA 6)
    beside a group of 3, default tilings."""
    batch = make_forked_batch([(32, [33 + 2 * i for i in range(16)]), (16, [18, 40, 21])], num_heads=num_heads,
                              num_kv_heads=num_kv_heads, head_dim=128, block_size=16, dtype=torch.bfloat16, seed=3)
    plan = plan_cascade(batch.block_tables, batch.seq_lens, block_size=16).to(DEVICE)
    assert sorted(plan.group_num_blocks.tolist()) == [1, 2] and plan.max_group_rows == 16
    expected = batch.plain_reference()
    assert_matches(run_triton(batch, plan), expected, torch.bfloat16)
