"""The block gather/scatter/copy kernels against their torch references.

On a CPU machine the Triton kernels run under the Triton interpreter; on a GPU they run for real.
Every run writes into a poisoned buffer (NaN) and every element is compared exactly: it is a copy.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest  # noqa: E402

from thaw_rl.engine.kv_cache import KVCacheSpec, PagedKVCache  # noqa: E402
from thaw_rl_kernels import (  # noqa: E402
    copy_blocks,
    copy_blocks_reference,
    copy_blocks_triton,
    gather_blocks,
    gather_blocks_reference,
    gather_blocks_triton,
    scatter_blocks,
    scatter_blocks_reference,
    scatter_blocks_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUM_BLOCKS = 12
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn]  # fp8: kv_cache_dtype="fp8"
LAYOUTS = ["block_major", "layer_major"]
# (num_layers, block_size, kv_heads, head_dim, ids dtype): odd sizes, 1 and 7 layers, 1 and 3 heads.
SHAPES = [
    (1, 16, 1, 64, torch.int64),
    (7, 32, 3, 80, torch.int32),
    (7, 16, 1, 128, torch.int64),
    (1, 32, 3, 128, torch.int32),
]
SHAPE_IDS = [f"L{s[0]}-bs{s[1]}-h{s[2]}-d{s[3]}-{str(s[4])[6:]}" for s in SHAPES]


def make_kv(shape, dtype, layout, num_blocks=NUM_BLOCKS, seed=0):
    """A random 6-D KV view (L, 2, NB, BS, KVH, D) laid out the way PagedKVCache lays it out."""
    num_layers, block_size, kv_heads, head_dim = shape[:4]
    g = torch.Generator().manual_seed(seed)
    if layout == "block_major":
        storage = torch.randn(num_blocks, num_layers, 2, block_size, kv_heads, head_dim, generator=g)
        kv = storage.to(dtype).permute(1, 2, 0, 3, 4, 5)
    else:
        kv = torch.randn(num_layers, 2, num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    return kv.to(DEVICE)


def make_ids(values, dtype=torch.int64):
    """Unsorted ids held in a non-contiguous tensor (every other element of a longer one)."""
    padded = [v for value in values for v in (value, -1)]
    return torch.tensor(padded, dtype=dtype, device=DEVICE)[::2]


def poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def snapshot_shape(kv, n):
    return (n, kv.shape[0], 2, *kv.shape[3:])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_gather_matches_reference(shape, dtype, layout):
    kv = make_kv(shape, dtype, layout)
    ids = make_ids([9, 2, 6], shape[4])
    out = gather_blocks_triton(kv, ids, poisoned(snapshot_shape(kv, 3), dtype))
    expected = gather_blocks_reference(kv, ids, poisoned(snapshot_shape(kv, 3), dtype))
    assert torch.equal(out, expected)
    assert torch.equal(out[1], kv[:, :, 2])  # block 2 of every layer, K and V


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_scatter_matches_reference_and_leaves_other_blocks(shape, dtype, layout):
    kv = make_kv(shape, dtype, layout)
    before = kv.clone()
    src = make_kv(shape, dtype, "layer_major", num_blocks=3, seed=1).permute(2, 0, 1, 3, 4, 5).contiguous()
    ids = make_ids([10, 1, 5], shape[4])
    got = scatter_blocks_triton(src, kv.clone(), ids)
    expected = scatter_blocks_reference(src, kv.clone(), ids)
    assert torch.equal(got, expected)
    assert torch.equal(got[:, :, 1], src[1])
    untouched = [b for b in range(NUM_BLOCKS) if b not in (10, 1, 5)]
    assert torch.equal(got[:, :, untouched], before[:, :, untouched])


@pytest.mark.parametrize("num_tokens", [None, 5])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_copy_between_caches_matches_reference(shape, dtype, layout, num_tokens):
    """Copy from a cache of one layout into a cache of the other; other blocks and rows stay."""
    other_layout = LAYOUTS[1 - LAYOUTS.index(layout)]
    src_kv = make_kv(shape, dtype, layout, seed=2)
    dst_kv = make_kv(shape, dtype, other_layout, num_blocks=NUM_BLOCKS + 3, seed=3)
    src_ids, dst_ids = make_ids([4, 11, 0], shape[4]), make_ids([13, 2, 7], shape[4])
    got = copy_blocks_triton(src_kv, dst_kv.clone(), src_ids, dst_ids, num_tokens)
    expected = copy_blocks_reference(src_kv, dst_kv.clone(), src_ids, dst_ids, num_tokens)
    assert torch.equal(got, expected)
    rows = shape[1] if num_tokens is None else num_tokens
    assert torch.equal(got[:, :, 2, :rows], src_kv[:, :, 11, :rows])
    assert torch.equal(got[:, :, 2, rows:], dst_kv[:, :, 2, rows:])
    untouched = [b for b in range(NUM_BLOCKS + 3) if b not in (13, 2, 7)]
    assert torch.equal(got[:, :, untouched], dst_kv[:, :, untouched])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_copy_within_one_cache_copies_a_partial_block(dtype):
    """The fork's copy-on-write: the first 3 token rows of block 5 go to free block 8."""
    cache = PagedKVCache(KVCacheSpec(7, 3, 80, 16, dtype), num_blocks=NUM_BLOCKS, device=DEVICE)
    cache.storage.copy_(torch.randn(cache.storage.shape, generator=torch.Generator().manual_seed(4)).to(dtype))
    cache.kv[:, :, 8] = float("nan")
    before = cache.kv.clone()
    copy_blocks_triton(cache.kv, cache.kv, make_ids([5]), make_ids([8]), num_tokens=3)
    assert torch.equal(cache.kv[:, :, 8, :3], before[:, :, 5, :3])
    assert before[:, :, 8, 3:].isnan().all() and cache.kv[:, :, 8, 3:].isnan().all()
    others = [b for b in range(NUM_BLOCKS) if b != 8]
    assert torch.equal(cache.kv[:, :, others], before[:, :, others])


def test_gather_then_scatter_round_trips_through_a_snapshot():
    shape = (7, 16, 3, 64)
    src_kv = make_kv(shape, torch.bfloat16, "block_major")
    dst_kv = make_kv(shape, torch.bfloat16, "layer_major", seed=5)
    snapshot = gather_blocks_triton(src_kv, make_ids([3, 8, 1, 0]), poisoned(snapshot_shape(src_kv, 4), torch.bfloat16))
    scatter_blocks_triton(snapshot, dst_kv, make_ids([11, 4, 6, 9]))
    for src_block, dst_block in [(3, 11), (8, 4), (1, 6), (0, 9)]:
        assert torch.equal(dst_kv[:, :, dst_block], src_kv[:, :, src_block])


def test_reference_matches_a_per_block_loop():
    """Pins the semantics of the references themselves: out[i, l, t] = kv[l, t, block_ids[i]]."""
    kv = make_kv((7, 16, 3, 80), torch.float32, "layer_major")
    ids = [9, 2, 6]
    out = gather_blocks_reference(kv, make_ids(ids), poisoned(snapshot_shape(kv, 3), torch.float32))
    for i, block in enumerate(ids):
        for layer in range(7):
            for k_or_v in range(2):
                assert torch.equal(out[i, layer, k_or_v], kv[layer, k_or_v, block])


def test_empty_id_lists_are_no_ops():
    kv = make_kv((1, 16, 1, 64), torch.float16, "block_major")
    before = kv.clone()
    empty = torch.empty(0, dtype=torch.int64, device=DEVICE)
    assert gather_blocks_triton(kv, empty, poisoned(snapshot_shape(kv, 0), torch.float16)).numel() == 0
    scatter_blocks_triton(poisoned(snapshot_shape(kv, 0), torch.float16), kv, empty)
    copy_blocks_triton(kv, kv, empty, empty)
    assert torch.equal(kv, before)


def test_dispatchers_run_the_reference_on_cpu_and_triton_on_cuda():
    kv = make_kv((1, 16, 1, 64), torch.float32, "layer_major")
    ids = make_ids([1, 0])
    out = gather_blocks(kv, ids, poisoned(snapshot_shape(kv, 2), torch.float32))
    scatter_blocks(out, kv, make_ids([3, 4]))
    copy_blocks(kv, kv, make_ids([3]), make_ids([5]), num_tokens=2)
    assert torch.equal(kv[:, :, 4], kv[:, :, 0])
    assert torch.equal(kv[:, :, 5, :2], kv[:, :, 1, :2])


# ----------------------------------------------------------------------------------------------
# Errors: the same ValueError from the Triton wrapper and the reference
# ----------------------------------------------------------------------------------------------

GATHERS = pytest.mark.parametrize("gather", [gather_blocks_triton, gather_blocks_reference], ids=["triton", "ref"])
SCATTERS = pytest.mark.parametrize("scatter", [scatter_blocks_triton, scatter_blocks_reference], ids=["triton", "ref"])
COPIES = pytest.mark.parametrize("copy", [copy_blocks_triton, copy_blocks_reference], ids=["triton", "ref"])


def small_kv(dtype=torch.float32, head_dim=64):
    return make_kv((2, 16, 1, head_dim), dtype, "block_major")


@GATHERS
def test_gather_rejects_wrong_shapes_dtypes_and_ids(gather):
    kv = small_kv()
    ids = make_ids([0, 1])
    with pytest.raises(ValueError, match="6-D KV view"):
        gather(kv[0], ids, poisoned(snapshot_shape(kv, 2), torch.float32))
    with pytest.raises(ValueError, match=r"shape \[n, L, 2, BS, KVH, D\]"):
        gather(kv, ids, poisoned(snapshot_shape(kv, 3), torch.float32))
    with pytest.raises(ValueError, match="dtype torch.float16 but the cache has torch.float32"):
        gather(kv, ids, poisoned(snapshot_shape(kv, 2), torch.float16))
    with pytest.raises(ValueError, match="must be contiguous"):
        gather(kv, ids, poisoned((2, 2, 2, 64, 1, 16), torch.float32).transpose(3, 5))
    with pytest.raises(ValueError, match="last three dimensions"):
        gather(kv.transpose(3, 5), ids, poisoned((2, 2, 2, 64, 1, 16), torch.float32))
    with pytest.raises(ValueError, match=r"must lie in \[0, 12\).*from 0 to 12"):
        gather(kv, make_ids([0, 12]), poisoned(snapshot_shape(kv, 2), torch.float32))
    with pytest.raises(ValueError, match="from -1 to 3"):
        gather(kv, make_ids([3, -1]), poisoned(snapshot_shape(kv, 2), torch.float32))
    with pytest.raises(ValueError, match="1-D int32 or int64"):
        gather(kv, ids.float(), poisoned(snapshot_shape(kv, 2), torch.float32))
    with pytest.raises(ValueError, match="is on meta but the cache is on"):
        gather(kv, ids.to("meta"), poisoned(snapshot_shape(kv, 2), torch.float32))
    with pytest.raises(ValueError, match="must be a tensor of block ids"):
        gather(kv, [0, 1], poisoned(snapshot_shape(kv, 2), torch.float32))
    with pytest.raises(ValueError, match="host_path"):
        gather(kv, ids, poisoned(snapshot_shape(kv, 2), torch.float32), host_path="pcie")


def test_unsupported_dtype_is_named():
    kv = small_kv().to(torch.float64)
    with pytest.raises(ValueError, match="supported KV dtypes"):
        gather_blocks(kv, make_ids([0]), poisoned(snapshot_shape(kv, 1), torch.float64))


@SCATTERS
def test_scatter_rejects_repeated_destination_blocks(scatter):
    kv = small_kv()
    with pytest.raises(ValueError, match="lists a destination block twice"):
        scatter(poisoned(snapshot_shape(kv, 3), torch.float32), kv, make_ids([4, 1, 4]))


@COPIES
def test_copy_rejects_mismatched_caches_and_bad_ids(copy):
    kv = small_kv()
    with pytest.raises(ValueError, match="must agree on"):
        copy(kv, small_kv(head_dim=80), make_ids([0]), make_ids([1]))
    with pytest.raises(ValueError, match="must agree on"):
        copy(kv, small_kv(dtype=torch.bfloat16), make_ids([0]), make_ids([1]))
    with pytest.raises(ValueError, match="src_ids has 2 ids but dst_ids has 1"):
        copy(kv, kv, make_ids([0, 1]), make_ids([2]))
    with pytest.raises(ValueError, match=r"num_tokens must be an int in \[0, block_size=16\]"):
        copy(kv, kv, make_ids([0]), make_ids([1]), num_tokens=17)
    with pytest.raises(ValueError, match="disjoint"):
        copy(kv, kv, make_ids([0, 1]), make_ids([1, 2]))
    with pytest.raises(ValueError, match="dst_ids must lie in"):
        copy(kv, kv, make_ids([0]), make_ids([40]))
    with pytest.raises(ValueError, match="twice"):
        copy(kv, small_kv(), make_ids([0, 1]), make_ids([3, 3]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="host paths need CUDA and pinned memory")
@pytest.mark.parametrize("host_path", ["direct", "stage"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_pinned_host_snapshot_and_restore_on_cuda(layout, host_path):
    """gather into / scatter from pinned host memory, written by the kernel itself or via one DMA."""
    shape = (7, 16, 3, 80)
    kv = make_kv(shape, torch.bfloat16, layout)
    host = torch.full(snapshot_shape(kv, 3), float("nan"), dtype=torch.bfloat16, pin_memory=True)
    gather_blocks_triton(kv, make_ids([9, 2, 6]), host, host_path=host_path)
    torch.cuda.synchronize()
    assert torch.equal(host, gather_blocks_reference(kv, make_ids([9, 2, 6]), torch.empty_like(host)))
    restored = torch.full_like(kv, float("nan"))
    scatter_blocks_triton(host, restored, make_ids([0, 4, 11]), host_path=host_path)
    torch.cuda.synchronize()
    assert torch.equal(restored[:, :, [0, 4, 11]], kv[:, :, [9, 2, 6]])
    with pytest.raises(ValueError, match="pinned"):
        pageable = torch.empty(snapshot_shape(kv, 1), dtype=torch.bfloat16)
        gather_blocks_triton(kv, make_ids([1]), pageable, host_path="direct")
