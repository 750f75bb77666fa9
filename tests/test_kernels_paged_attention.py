"""Triton paged attention against the torch reference, on mixed prefill + decode batches.

Each batch is built the way the engine builds one: every sequence has a dense history of keys and
values, which is scattered into randomly permuted (unsorted, non-contiguous) blocks of a paged cache;
its last q_len tokens are the new query rows. The cache slots that belong to no context, the padding
entries of the block tables and the output buffer are poisoned with NaN, so a kernel that reads or
leaves anything it should not shows up as NaN. Without a GPU the kernel runs in Triton's interpreter,
so the shapes are small.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dataclasses import dataclass, replace  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from thaw_rl_kernels.kv_write import to_cache_dtype  # noqa: E402
from thaw_rl_kernels.triton_paged_attention import (  # noqa: E402
    choose_config,
    launch_paged_attention,
    paged_attention_triton,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _own_reference(query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, scale, out=None):
    """The contract in a few lines (used only while thaw_rl_kernels.paged_attention is missing)."""
    _, block_size, num_kv_heads, head_dim = key_cache.shape
    group = query.shape[1] // num_kv_heads
    out = torch.empty_like(query) if out is None else out
    cu = cu_seqlens_q.tolist()
    for s, ctx in enumerate(seq_lens.tolist()):
        q_len = cu[s + 1] - cu[s]
        if q_len == 0:
            continue
        blocks = block_tables[s, : -(-ctx // block_size)].long()
        k = key_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx].float().repeat_interleave(group, 1)
        v = value_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx].float().repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", query[cu[s] : cu[s + 1]].float(), k) * scale  # (H, q_len, ctx)
        pos = torch.arange(ctx - q_len, ctx, device=query.device)
        scores = scores.masked_fill(torch.arange(ctx, device=query.device)[None, :] > pos[:, None], float("-inf"))
        out[cu[s] : cu[s + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(out.dtype)
    return out


try:
    from thaw_rl_kernels.paged_attention import paged_attention_reference
except ImportError:
    paged_attention_reference = _own_reference


@dataclass
class PagedBatch:
    """One engine step's attention inputs, plus the dense data they were built from."""

    query: torch.Tensor  # (T, H, D)
    key_cache: torch.Tensor  # (NB, BS, KVH, D), NaN outside every context
    value_cache: torch.Tensor  # (NB, BS, KVH, D)
    block_tables: torch.Tensor  # (S, max_blocks) int32, padded with a NaN block
    seq_lens: torch.Tensor  # (S,) int32
    cu_seqlens_q: torch.Tensor  # (S + 1,) int32
    max_seqlen_q: int
    scale: float
    dense_queries: list  # per sequence: (ctx, H, D) queries of every position, the new ones last
    dense_keys: list  # per sequence: (ctx, KVH, D)
    dense_values: list

    @property
    def args(self) -> tuple:
        return (self.query, self.key_cache, self.value_cache, self.block_tables, self.seq_lens,
                self.cu_seqlens_q, self.max_seqlen_q, self.scale)  # fmt: skip

    def expected(self) -> torch.Tensor:
        """The reference in fp32 on a copy of the cache with the poison replaced by zeros."""
        clean_k = torch.nan_to_num(self.key_cache.float(), nan=0.0)
        clean_v = torch.nan_to_num(self.value_cache.float(), nan=0.0)
        return paged_attention_reference(self.query.float(), clean_k, clean_v, *self.args[3:])


def make_batch(
    q_lens, ctx_lens, *, num_heads, num_kv_heads, head_dim, block_size, dtype, layout="layer_major", seed=0
) -> PagedBatch:
    """Random sequences scattered into a shuffled paged cache; layout block_major gives a strided view."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-ctx // block_size) for ctx in ctx_lens]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks stay NaN; one of them pads the tables
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    pad_block = perm.pop()
    block_tables = torch.full((len(ctx_lens), max(blocks_per_seq) + 2), pad_block, dtype=torch.int32)  # (S, MB)
    shape = (num_kv_heads, head_dim)
    if layout == "block_major":  # storage (NB, L=3, 2, BS, KVH, D): one block of all layers is contiguous
        storage = torch.full((num_blocks, 3, 2, block_size, *shape), float("nan"), dtype=dtype, device=DEVICE)
        key_cache, value_cache = storage[:, 1, 0], storage[:, 1, 1]  # (NB, BS, KVH, D), block stride 6*BS*KVH*D
    else:
        storage = torch.full((2, num_blocks, block_size, *shape), float("nan"), dtype=dtype, device=DEVICE)
        key_cache, value_cache = storage[0], storage[1]  # (NB, BS, KVH, D)
    queries, keys, values = [], [], []
    for s, (q_len, ctx) in enumerate(zip(q_lens, ctx_lens)):
        assert q_len <= ctx
        blocks = [perm.pop() for _ in range(blocks_per_seq[s])]
        block_tables[s, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        queries.append(torch.randn(ctx, num_heads, head_dim, generator=gen).to(dtype))  # (ctx, H, D)
        keys.append(torch.randn(ctx, *shape, generator=gen).to(dtype))  # (ctx, KVH, D)
        values.append(torch.randn(ctx, *shape, generator=gen).to(dtype))
        pos = torch.arange(ctx, device=DEVICE)
        slot_blocks = torch.tensor(blocks, device=DEVICE)[pos // block_size]
        key_cache[slot_blocks, pos % block_size] = keys[-1].to(DEVICE)
        value_cache[slot_blocks, pos % block_size] = values[-1].to(DEVICE)
    query = torch.cat([q[ctx - q_len :] for q, q_len, ctx in zip(queries, q_lens, ctx_lens)])  # (T, H, D)
    cu = torch.tensor([0, *q_lens]).cumsum(0).to(torch.int32)  # (S + 1,)
    return PagedBatch(
        query=query.to(DEVICE),
        key_cache=key_cache,
        value_cache=value_cache,
        block_tables=block_tables.to(DEVICE),
        seq_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE),
        cu_seqlens_q=cu.to(DEVICE),
        max_seqlen_q=max(q_lens),
        scale=head_dim**-0.5,
        dense_queries=queries,
        dense_keys=keys,
        dense_values=values,
    )


def run_kernel(batch: PagedBatch, **tiling) -> torch.Tensor:
    """Into a NaN-poisoned out: the public entry point, or launch_paged_attention with a forced tiling."""
    out = torch.full_like(batch.query, float("nan"))
    if not tiling:
        return paged_attention_triton(*batch.args, out=out)
    query, key_cache, value_cache, block_tables, seq_lens, cu, _, scale = batch.args
    return launch_paged_attention(query, key_cache, value_cache, block_tables, seq_lens, cu, scale, out, **tiling)


def assert_matches(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype
    assert not out.isnan().any(), "the kernel left rows unwritten or read poisoned cache slots"
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


# Decode with context, a prompt prefilled from scratch, an idle sequence (q_len 0), the very first
# decode token, a prefill chunk after 27 cached tokens, a short chunk, a decode at a block boundary.
MIXED_Q_LENS = [1, 9, 0, 1, 23, 4, 1]
MIXED_CTX_LENS = [37, 9, 12, 1, 50, 70, 32]


def test_reference_matches_dense_causal_sdpa():
    """The reference equals plain causal SDPA over each sequence's unpaged history (new rows last)."""
    batch = make_batch(
        MIXED_Q_LENS, MIXED_CTX_LENS, num_heads=6, num_kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32
    )
    expected = []
    for q, k, v, q_len in zip(batch.dense_queries, batch.dense_keys, batch.dense_values, MIXED_Q_LENS):
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=batch.scale,
            enable_gqa=True,
        )  # (H, ctx, D)
        expected.append(o.transpose(0, 1)[len(q) - q_len :])
    torch.testing.assert_close(batch.expected().cpu(), torch.cat(expected), atol=1e-5, rtol=1e-5)


CASES = [  # dtype, H, KVH, D, BS, layout
    pytest.param(torch.float32, 2, 2, 64, 16, "layer_major", id="fp32-G1-D64-BS16"),
    pytest.param(torch.float32, 6, 2, 80, 32, "block_major", id="fp32-G3-D80-BS32-block_major"),
    pytest.param(torch.bfloat16, 8, 2, 64, 16, "block_major", id="bf16-G4-D64-BS16-block_major"),
    pytest.param(torch.float16, 3, 1, 80, 16, "layer_major", id="fp16-G3-D80-BS16"),
    pytest.param(torch.bfloat16, 4, 1, 80, 32, "layer_major", id="bf16-G4-D80-BS32"),
]


@pytest.mark.parametrize(("dtype", "num_heads", "num_kv_heads", "head_dim", "block_size", "layout"), CASES)
def test_mixed_batch_matches_reference(dtype, num_heads, num_kv_heads, head_dim, block_size, layout):
    """Every tiling gives the reference's answer: max_seqlen_q only picks the tiling, never the result."""
    batch = make_batch(
        MIXED_Q_LENS, MIXED_CTX_LENS, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        block_size=block_size, dtype=dtype, layout=layout, seed=head_dim + num_heads,
    )  # fmt: skip
    expected = batch.expected()
    group = num_heads // num_kv_heads
    assert_matches(run_kernel(batch), expected, dtype)
    # One token per program (the decode tiling) over the prefill rows too, with the KV axis split in 2.
    assert_matches(run_kernel(batch, block_q=1, block_m=16, tile_n=16, num_splits=2), expected, dtype)
    # Small query tiles that straddle sequence ends (16 // group tokens each).
    assert_matches(run_kernel(batch, block_q=16 // group, block_m=16, tile_n=32), expected, dtype)


@pytest.mark.parametrize("num_splits", [1, 2, 8])
def test_decode_batch_split_kv(num_splits):
    """Split-KV decode merges partial softmaxes exactly; splits past a short context stay empty."""
    batch = make_batch(
        [1] * 5, [1, 17, 64, 100, 33], num_heads=12, num_kv_heads=2, head_dim=64, block_size=16,
        dtype=torch.bfloat16, layout="block_major", seed=num_splits,
    )  # fmt: skip
    expected = batch.expected()
    assert_matches(run_kernel(batch, block_q=1, block_m=16, tile_n=16, num_splits=num_splits), expected, torch.bfloat16)
    if num_splits == 1:
        assert_matches(run_kernel(batch), expected, torch.bfloat16)  # the default decode tiling


@pytest.mark.parametrize("num_splits", [1, 4])
def test_padding_rows_past_the_last_sequence_are_untouched(num_splits):
    """A CUDA-graph batch padded to a fixed T: rows past cu_seqlens_q[-1] keep whatever out held."""
    batch = make_batch(
        [1, 3, 1], [20, 40, 9], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32
    )
    expected = batch.expected()
    batch.query = torch.cat([batch.query, torch.randn(3, 4, 64, device=DEVICE)])  # (T + 3, H, D)
    out = run_kernel(batch, block_q=1, block_m=16, tile_n=16, num_splits=num_splits)
    assert out[5:].isnan().all()
    assert_matches(out[:5], expected, torch.float32)


def test_strided_query_and_out_views():
    """q sliced out of a fused qkv projection and out written into a wider buffer, in place."""
    batch = make_batch(
        MIXED_Q_LENS, MIXED_CTX_LENS, num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32
    )
    expected = batch.expected()
    qkv = torch.randn(batch.query.shape[0], 8, 64, device=DEVICE)  # (T, H + 2 * KVH, D)
    qkv[:, :4] = batch.query
    batch.query = qkv[:, :4]
    wide = torch.full((batch.query.shape[0], 6, 64), float("nan"), device=DEVICE)  # (T, H + 2, D)
    result = paged_attention_triton(*batch.args, out=wide[:, 1:5])
    assert result.data_ptr() == wide[:, 1:5].data_ptr()
    assert_matches(wide[:, 1:5], expected, torch.float32)
    assert wide[:, 0].isnan().all() and wide[:, 5].isnan().all()


def test_no_query_rows_launches_nothing():
    batch = make_batch([0, 0], [5, 9], num_heads=2, num_kv_heads=1, head_dim=64, block_size=16, dtype=torch.float32)
    out = paged_attention_triton(*batch.args)
    assert out.shape == (0, 2, 64)


def test_default_tiling_depends_only_on_shapes():
    """Decode takes one token per program; prefill fills at least half of BLOCK_M; no split off CUDA."""
    for group in (1, 3, 4, 6, 8):
        for max_q in (1, 2, 7, 512):
            cfg = choose_config(
                num_tokens=128, num_seqs=64, num_kv_heads=2, group=group, max_seqlen_q=max_q, max_context=768,
                dtype=torch.bfloat16, device=torch.device("cpu"),
            )  # fmt: skip
            assert cfg["block_q"] * group <= cfg["block_m"] and cfg["block_m"] >= 16
            assert cfg["block_q"] == 1 if max_q == 1 else 2 * cfg["block_q"] * group >= cfg["block_m"]
            assert cfg["num_splits"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fp8_cache_is_read_as_its_widened_values(dtype):
    """An FP8 cache (kv_cache_dtype="fp8") serves a query in the model's dtype: the kernel equals the reference over
    the same cache widened to that dtype (every e4m3 value is exact in it), in the default and split tilings of a
    mixed prefill + decode batch; the torch reference reads the FP8 cache as that widened cache too."""
    batch = make_batch(MIXED_Q_LENS, MIXED_CTX_LENS, num_heads=6, num_kv_heads=2, head_dim=32, block_size=16,
                       dtype=dtype, seed=11)  # fmt: skip
    fp8 = replace(batch, key_cache=to_cache_dtype(batch.key_cache, torch.float8_e4m3fn),
                  value_cache=to_cache_dtype(batch.value_cache, torch.float8_e4m3fn))  # fmt: skip
    widened = replace(fp8, key_cache=fp8.key_cache.to(dtype), value_cache=fp8.value_cache.to(dtype))
    assert not torch.equal(torch.nan_to_num(widened.key_cache), torch.nan_to_num(batch.key_cache))  # really rounded
    expected = widened.expected()
    assert_matches(run_kernel(fp8), expected, dtype)
    assert_matches(run_kernel(fp8, block_q=1, block_m=16, tile_n=16, num_splits=2), expected, dtype)
    torch.testing.assert_close(paged_attention_reference(*fp8.args), paged_attention_reference(*widened.args),
                               atol=0, rtol=0, equal_nan=True)  # fmt: skip


def _misuse_cases():
    def base():
        return make_batch([1, 2], [5, 9], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32)

    def with_(**changes):
        batch = base()
        for name, value in changes.items():
            setattr(batch, name, value(batch))
        return batch

    return {
        "int64 block table": (with_(block_tables=lambda b: b.block_tables.long()), "must be int32"),
        "int64 seq_lens": (with_(seq_lens=lambda b: b.seq_lens.long()), "must be int32"),
        "short cu_seqlens_q": (with_(cu_seqlens_q=lambda b: b.cu_seqlens_q[:2]), "cu_seqlens_q has shape"),
        "heads not a multiple": (with_(query=lambda b: b.query[:, :3]), "not a multiple"),
        "cache dtype": (with_(key_cache=lambda b: b.key_cache.half(), value_cache=lambda b: b.value_cache.half()),
                        "must hold the query's dtype or torch.float8_e4m3fn"),  # fmt: skip
        "k fp8, v not": (with_(key_cache=lambda b: b.key_cache.to(torch.float8_e4m3fn)), "the same for K and V"),
        "strided head dim": (with_(query=lambda b: b.query.transpose(1, 2).contiguous().transpose(1, 2)),
                             "contiguous last dimension"),  # fmt: skip
        "k/v strides differ": (with_(value_cache=lambda b: b.value_cache.transpose(0, 1).contiguous().transpose(0, 1)),
                               "strides"),  # fmt: skip
        "head_dim mismatch": (with_(query=lambda b: b.query[:, :, :32].contiguous()), "head_dim"),
    }


@pytest.mark.parametrize("case", list(_misuse_cases()))
def test_misuse_raises_value_error_with_the_fix(case):
    batch, message = _misuse_cases()[case]
    with pytest.raises(ValueError, match=message):
        paged_attention_triton(*batch.args)


def test_bad_out_buffer_raises():
    batch = make_batch([1, 2], [5, 9], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32)
    with pytest.raises(ValueError, match="empty_like"):
        paged_attention_triton(*batch.args, out=torch.empty(3, 4, 64, dtype=torch.bfloat16, device=DEVICE))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check")
def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    batch = make_batch([1], [5], num_heads=2, num_kv_heads=1, head_dim=64, block_size=16, dtype=torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="paged_attention_reference"):
        paged_attention_triton(*batch.args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replay_follows_new_metadata():
    """Captured once at fixed T and S, replayed after the engine rewrites queries, lengths and tables in place."""
    ctx_lens = [30, 64, 7, 100]
    first = make_batch([1] * 4, ctx_lens, num_heads=12, num_kv_heads=2, head_dim=128, block_size=16,
                       dtype=torch.bfloat16, seed=1)  # fmt: skip
    # The next step over the same cache: sequences reordered, each decoding an earlier position.
    order = [2, 0, 3, 1]
    new_lens = [ctx_lens[i] - i for i in order]
    second = replace(
        first,
        query=torch.stack([first.dense_queries[i][n - 1] for i, n in zip(order, new_lens)]).to(DEVICE),
        block_tables=first.block_tables[order].contiguous(),
        seq_lens=torch.tensor(new_lens, dtype=torch.int32, device=DEVICE),
    )
    query, block_tables, seq_lens = first.query.clone(), first.block_tables.clone(), first.seq_lens.clone()
    out = torch.empty_like(query)

    def step():
        paged_attention_triton(query, first.key_cache, first.value_cache, block_tables, seq_lens,
                               first.cu_seqlens_q, 1, first.scale, out=out)  # fmt: skip

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for batch in (first, second):
        query.copy_(batch.query)
        block_tables.copy_(batch.block_tables)
        seq_lens.copy_(batch.seq_lens)
        graph.replay()
        torch.cuda.synchronize()
        assert_matches(out, batch.expected(), torch.bfloat16)


# -- sliding window (Mistral, Qwen2/Qwen3 sliding layers) ------------------------------------------------
def dense_window_attention(batch: PagedBatch, q_lens, window: int) -> torch.Tensor:
    """HF's sliding-window mask on the unpaged history: row p sees keys in (p - window, p]."""
    out = []
    for q, k, v, q_len in zip(batch.dense_queries, batch.dense_keys, batch.dense_values, q_lens):
        ctx = len(q)
        keys, pos = torch.arange(ctx)[None, :], torch.arange(ctx)[:, None]
        mask = (keys <= pos) & (keys > pos - window)  # (ctx, ctx)
        o = F.scaled_dot_product_attention(
            q.float().transpose(0, 1), k.float().transpose(0, 1), v.float().transpose(0, 1), attn_mask=mask,
            scale=batch.scale, enable_gqa=True,
        )  # (H, ctx, D)
        out.append(o.transpose(0, 1)[ctx - q_len:])
    return torch.cat(out)


@pytest.mark.parametrize("window", [5, pytest.param(1, marks=pytest.mark.slow), pytest.param(16, marks=pytest.mark.slow),
                                    pytest.param(40, marks=pytest.mark.slow)])
def test_sliding_window_reference_and_kernel_match_the_dense_window_mask(window):
    """Windows shorter than a block, equal to it and spanning blocks; every tiling, split KV included."""
    batch = make_batch(
        MIXED_Q_LENS, MIXED_CTX_LENS, num_heads=4, num_kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32,
        seed=window,
    )  # fmt: skip
    expected = dense_window_attention(batch, MIXED_Q_LENS, window).to(DEVICE)
    clean_k = torch.nan_to_num(batch.key_cache, nan=0.0)
    clean_v = torch.nan_to_num(batch.value_cache, nan=0.0)
    ref = paged_attention_reference(batch.query, clean_k, clean_v, *batch.args[3:], sliding_window=window)
    torch.testing.assert_close(ref, expected, atol=1e-5, rtol=1e-5)
    out = torch.full_like(batch.query, float("nan"))
    assert_matches(paged_attention_triton(*batch.args, out=out, sliding_window=window), expected, torch.float32)
    query, key_cache, value_cache, block_tables, seq_lens, cu, _, scale = batch.args
    for tiling in (dict(block_q=1, block_m=16, tile_n=16, num_splits=4), dict(block_q=8, block_m=16, tile_n=16)):
        out = torch.full_like(batch.query, float("nan"))
        launch_paged_attention(query, key_cache, value_cache, block_tables, seq_lens, cu, scale, out,
                               sliding_window=window, **tiling)
        assert_matches(out, expected, torch.float32)
    if window < max(MIXED_CTX_LENS):  # the window changes the answer: the test can fail
        assert not torch.allclose(expected, batch.expected(), atol=1e-3)
