"""PinnedBufferPool and KVTransfer: snapshots round-trip exactly and buffers are reused.

On a CPU machine everything runs synchronously over plain memory (the same API as on CUDA).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest  # noqa: E402

from thaw_rl.engine.kv_cache import KVCacheSpec, PagedKVCache  # noqa: E402
from thaw_rl_kernels import KVTransfer, PinnedBufferPool  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MiB = 1 << 20


def same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def random_cache(layout: str, num_blocks: int, seed: int) -> PagedKVCache:
    spec = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=80, block_size=16, dtype=torch.bfloat16)
    cache = PagedKVCache(spec, num_blocks=num_blocks, device=DEVICE, layout=layout)
    noise = torch.randn(cache.storage.shape, generator=torch.Generator().manual_seed(seed))
    cache.storage.copy_(noise.to(spec.dtype))
    return cache


def test_pool_hands_a_released_buffer_back():
    pool = PinnedBufferPool(pin=False)
    first = pool.acquire(3 * MiB)
    assert first.numel() == 3 * MiB and first.dtype == torch.uint8
    assert (pool.num_lent, pool.num_free) == (1, 0)
    pool.release(first)
    assert (pool.num_lent, pool.num_free) == (0, 1)
    again = pool.acquire(3 * MiB)
    assert same_memory(again, first)
    assert (pool.num_lent, pool.num_free) == (1, 0)


def test_pool_reuses_a_larger_buffer_only_within_twice_the_size():
    pool = PinnedBufferPool(pin=False)
    big = pool.acquire(4 * MiB)
    pool.release(big)
    small = pool.acquire(1 * MiB)  # 4 MiB would waste more than half: a new buffer
    assert not same_memory(small, big)
    slightly_smaller = pool.acquire(3 * MiB - 5)  # rounds to 3 MiB; the idle 4 MiB buffer fits
    assert same_memory(slightly_smaller, big) and slightly_smaller.numel() == 3 * MiB - 5
    assert (pool.num_lent, pool.num_free) == (2, 0)


def test_pool_typed_views_release_and_clear():
    pool = PinnedBufferPool(pin=False)
    snapshot = pool.empty((4, 3, 2, 16, 2, 80), torch.bfloat16)
    assert snapshot.shape == (4, 3, 2, 16, 2, 80) and snapshot.is_contiguous()
    pool.release(snapshot[1:])  # any view of the buffer returns it
    with pytest.raises(ValueError, match="released twice"):
        pool.release(snapshot)
    with pytest.raises(ValueError, match="not handed out by this pool"):
        pool.release(torch.empty(8))
    pool.clear()
    assert pool.num_free == 0


@pytest.mark.parametrize("src_layout,dst_layout", [("block_major", "layer_major"), ("layer_major", "block_major")])
def test_snapshot_restores_exactly_into_another_cache_at_other_blocks(src_layout, dst_layout):
    src, dst = random_cache(src_layout, 10, seed=0), random_cache(dst_layout, 14, seed=1)
    dst_before = dst.kv.clone()
    transfer = KVTransfer(DEVICE)
    src_ids, dst_ids = [7, 2, 9, 0], [3, 13, 5, 8]

    handle = transfer.snapshot_async(src.kv, src_ids)
    snapshot = handle.wait()
    assert snapshot.device.type == "cpu" and snapshot.shape == (4, 3, 2, 16, 2, 80)
    assert snapshot.is_pinned() == (DEVICE == "cuda")
    transfer.restore_async(snapshot, dst.kv, torch.tensor(dst_ids)).wait()

    for s, d in zip(src_ids, dst_ids):
        assert torch.equal(dst.kv[:, :, d], src.kv[:, :, s])
    others = [b for b in range(14) if b not in dst_ids]
    assert torch.equal(dst.kv[:, :, others], dst_before[:, :, others])


def test_released_snapshot_buffer_serves_the_next_snapshot():
    cache = random_cache("block_major", 8, seed=2)
    transfer = KVTransfer(DEVICE)
    first = transfer.snapshot_async(cache.kv, [1, 2]).wait()
    transfer.release(first)
    handle = transfer.snapshot_async(cache.kv, [5, 6])
    assert handle.done() or DEVICE == "cuda"
    second = handle.wait()
    assert same_memory(second, first)
    assert torch.equal(second[0], cache.kv[:, :, 5])


def test_device_tensor_ids_work_too():
    cache = random_cache("layer_major", 8, seed=3)
    transfer = KVTransfer(DEVICE)
    snapshot = transfer.snapshot_async(cache.kv, torch.tensor([4, 0], device=DEVICE)).wait()
    assert torch.equal(snapshot[1], cache.kv[:, :, 0])


def test_bad_ids_are_reported_before_anything_is_queued():
    cache = random_cache("block_major", 8, seed=4)
    transfer = KVTransfer(DEVICE)
    with pytest.raises(ValueError, match=r"must lie in \[0, 8\)"):
        transfer.snapshot_async(cache.kv, [1, 8])
    with pytest.raises(ValueError, match="twice"):
        transfer.restore_async(torch.zeros(2, 3, 2, 16, 2, 80, dtype=torch.bfloat16), cache.kv, [3, 3])
    with pytest.raises(ValueError, match="flat list"):
        transfer.snapshot_async(cache.kv, [[1, 2]])
    with pytest.raises(ValueError, match="make one per device"):
        transfer.snapshot_async(cache.kv.to("meta"), [1])
    with pytest.raises(ValueError, match="supported KV dtypes"):  # raised after the buffer was taken
        transfer.snapshot_async(cache.kv.double(), [1])
    assert transfer.pool.num_lent == 0  # rejected snapshots gave their buffers back


def test_pool_picks_the_smallest_fitting_buffer_among_several_sizes():
    """Regression: with idle buffers of different sizes, acquire must not compare tensors with ==."""
    from thaw_rl_kernels.host_transfer import PinnedBufferPool

    pool = PinnedBufferPool(pin=False, granularity=1024)
    small, big = pool.acquire(3000), pool.acquire(5000)  # 3 KiB and 5 KiB buffers
    small_ptr = small.untyped_storage().data_ptr()
    pool.release(big)
    pool.release(small)
    again = pool.acquire(2500)  # both idle buffers fit (3 KiB <= 5 KiB <= 6 KiB); the smaller is chosen
    assert again.untyped_storage().data_ptr() == small_ptr
    assert pool.num_free == 1
