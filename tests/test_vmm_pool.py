"""The KV pool mapped on demand (vmm_pool.py): bookkeeping and the choice of path, on CPU.

The driver calls themselves need a CUDA device: benchmarks/kv_sleep_wake.py checks them on a GPU.
"""

import ctypes
import logging

import pytest
import torch

from thaw_rl import SamplingParams, ThawEngine
from thaw_rl.engine import kv_cache
from thaw_rl.engine.block_manager import BlockManager
from thaw_rl.engine.kv_cache import KVCacheSpec, PagedKVCache, block_byte_ranges, use_vmm
from thaw_rl.engine.session import Session
from thaw_rl.engine.vmm_pool import (VmmRange, _AccessDesc, _AllocationProp, granule_runs, subtract_runs,
                                     vmm_unavailable_reason)
from thaw_rl.testing import tiny_model_and_tokenizer

# 2 layers, 1 KV head of 4 dims, 2 tokens a block, fp32: one layer's K of one block is 32 bytes, a block 128
SPEC = KVCacheSpec(num_layers=2, num_kv_heads=1, head_dim=4, block_size=2, dtype=torch.float32)


def test_byte_ranges_round_out_to_whole_granules_and_merge_when_they_touch():
    assert granule_runs([(0, 5), (6, 9), (40, 41), (17, 24), (10, 10)], 8) == [(0, 3), (5, 6)]
    assert granule_runs([(16, 17)], 8) == [(2, 3)]
    assert granule_runs([], 8) == []


def test_only_granules_not_mapped_yet_are_mapped():
    assert subtract_runs([(0, 10), (12, 20)], [(8, 13), (2, 4), (19, 25)]) == [(0, 2), (4, 8), (13, 19)]
    assert subtract_runs([(0, 4)], [(0, 4)]) == []
    assert subtract_runs([(3, 6)], []) == [(3, 6)]


def test_the_first_blocks_of_a_layer_major_pool_are_one_range_per_layer_and_kv():
    assert SPEC.bytes_per_block == 128
    # capacity 10 blocks: each layer's K (or V) is a slab of 320 bytes; 3 blocks use its first 96
    assert block_byte_ranges(SPEC, "layer_major", 10, 3) == [(0, 96), (320, 416), (640, 736), (960, 1056)]
    assert block_byte_ranges(SPEC, "block_major", 10, 3) == [(0, 384)]
    assert granule_runs(block_byte_ranges(SPEC, "layer_major", 10, 3), 64) == [(0, 2), (5, 7), (10, 12), (15, 17)]
    # the whole pool is one run: every byte of the storage, nothing past it
    assert granule_runs(block_byte_ranges(SPEC, "layer_major", 10, 10), 64) == [(0, 20)]
    assert 20 * 64 == 10 * SPEC.bytes_per_block


def test_the_driver_structs_have_the_cuda_headers_layout():
    assert ctypes.sizeof(_AllocationProp) == 32  # type, handle types, location (8), win32 pointer, allocFlags (8)
    assert _AllocationProp.location.offset == 8 and _AllocationProp.allocFlags.offset == 24
    assert ctypes.sizeof(_AccessDesc) == 12


def test_vmm_is_chosen_only_where_the_driver_can_and_auto_falls_back_with_one_log_line(monkeypatch, caplog):
    assert vmm_unavailable_reason(torch.device("cpu")) == "the device is cpu, not CUDA"
    assert use_vmm(None, "cpu") is False and use_vmm(False, "cpu") is False
    with pytest.raises(ValueError, match="kv_cache_vmm=True but the KV pool on cpu cannot be mapped on demand: "
                                         "the device is cpu, not CUDA. Leave kv_cache_vmm=None"):
        use_vmm(True, "cpu")
    with pytest.raises(ValueError, match="VmmRange on cpu: the device is cpu"):
        VmmRange(1 << 20, torch.device("cpu"))
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the fallback below needs a device the driver cannot serve")
    monkeypatch.setattr(kv_cache, "_vmm_fallback_logged", False)
    with caplog.at_level(logging.WARNING, logger="thaw_rl.engine.kv_cache"):
        assert use_vmm(None, "cuda") is False  # torch without CUDA here: the reason names it
        assert use_vmm(None, "cuda:0") is False
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "not mapped on demand (AssertionError: Torch not compiled with CUDA" in lines[0]


def test_a_block_manager_starts_over_with_fewer_blocks_once_everything_is_free():
    bm = BlockManager(16, block_size=2)
    s = Session(engine_id=0, token_ids=list(range(9)), num_prompt_tokens=9)
    bm.allocate(s, 9)
    assert s.block_table == [1, 2, 3, 4, 5]
    with pytest.raises(RuntimeError, match="reset\\(4\\) while sessions hold 5 blocks"):
        bm.reset(4)
    bm.free(s)
    bm.reset(4)
    assert (bm.num_blocks, bm.num_free_blocks, bm.num_used_blocks) == (4, 3, 0)
    t = Session(engine_id=0, token_ids=[1, 2, 3], num_prompt_tokens=3)
    bm.allocate(t, 3)
    assert t.block_table == [1, 2]  # lowest ids first again: inside what is mapped
    assert not bm.can_allocate(2)
    bm.grow(8)
    assert bm.can_allocate(5) and not bm.can_allocate(6)  # 8 blocks: the null block and t's 2 taken


def test_a_cpu_engine_keeps_allocating_through_pytorch_and_close_frees_the_pool():
    model, tok = tiny_model_and_tokenizer("qwen2")
    with pytest.raises(ValueError, match="kv_cache_vmm=True but the KV pool on cpu"):
        ThawEngine(model, tok, kv_cache_memory=1 << 20, kv_cache_vmm=True)
    engine = ThawEngine(model, tok, kv_cache_memory=1 << 20)
    assert engine.kv_cache.vmm is None and engine.kv_cache.mapped_bytes == engine.kv_cache.nbytes
    s = engine.prefill([5, 6, 7, 8, 9, 10, 11, 12, 13])
    with pytest.raises(ValueError, match="close\\(\\) while sessions hold 1 KV blocks"):
        engine.close()
    engine.free(s)
    engine.close()
    assert engine.kv_cache.storage is None and engine.kv_cache.mapped_bytes == 0
    with pytest.raises(ValueError, match="this KV cache was closed \\(ThawEngine.close\\): build a new engine"):
        engine.prefill([1, 2, 3])


def test_a_pytorch_cache_grown_reports_its_new_capacity():
    cache = PagedKVCache(SPEC, 4, "cpu")
    cache.kv[1, 0, 3].fill_(7.0)
    cache.grow(6)
    assert (cache.num_blocks, cache.capacity, tuple(cache.kv.shape[:3])) == (6, 6, (2, 2, 6))
    assert cache.kv[1, 0, 3].eq(7.0).all() and cache.kv[:, :, 4:].eq(0).all()


class HostRange(VmmRange):
    """``VmmRange``'s bookkeeping run over host memory in place of the driver: bytes not mapped read as NaN, and
    so do bytes just mapped (the driver promises nothing about them), so an engine that reads either, or forgets
    to zero what it maps, computes NaN and samples other tokens."""

    def _open(self, device):
        self.device, self.granularity, self.events = torch.device("cpu"), 512, []

    def _reserve(self, nbytes):
        self.host = torch.full((nbytes // 4,), float("nan")).view(torch.uint8)  # (nbytes,)
        return self.host.data_ptr()

    def _poison(self, offset, size):
        self.host[offset:offset + size].view(torch.float32).fill_(float("nan"))

    def _map_run(self, offset, size):
        self._poison(offset, size)
        self.events.append(("map", offset, size))
        return len(self.events)

    def _unmap_run(self, offset, size, handle):
        self._poison(offset, size)
        self.events.append(("unmap", offset, size))

    def _synchronize(self):
        pass

    def _free(self):
        self.events.append(("free",))

    def tensor(self):
        return self.host


def greedy_rollout(engine, prompts, group=3, max_tokens=20):
    parents = engine.prefill_many(prompts)
    kids = [k for p in parents for k in engine.fork(p, group)]
    tokens = [o.token_ids for o in engine.generate(kids, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                        ignore_eos=True))]
    for s in parents + kids:
        engine.free(s)
    return tokens


def test_a_pool_mapped_on_demand_maps_what_calls_use_unmaps_on_sleep_and_never_moves(monkeypatch):
    monkeypatch.setattr(kv_cache, "VmmRange", HostRange)
    monkeypatch.setattr(kv_cache, "vmm_unavailable_reason", lambda device: None)
    model, tok = tiny_model_and_tokenizer("qwen2")
    prompts = [[5 + i for i in range(11)], [40 + i for i in range(9)]]
    reference = greedy_rollout(ThawEngine(model, tok, block_size=2, kv_cache_memory=1 << 20), prompts)
    engine = ThawEngine(model, tok, block_size=2, kv_cache_memory=1 << 20, kv_cache_vmm=True)
    cache, bm = engine.kv_cache, engine.block_manager
    assert isinstance(cache.vmm, HostRange) and cache.capacity == engine.max_num_blocks + 1
    assert bm.num_blocks == 64 and engine.stats.num_free_blocks == engine.max_num_blocks  # unmapped counts as free
    ptr, shape = cache.kv.data_ptr(), cache.kv.shape
    assert greedy_rollout(engine, prompts) == reference  # 6 rows of ~16 blocks: the pool grows past 64 blocks
    assert 64 < bm.num_blocks < cache.capacity and 0 < cache.mapped_bytes < cache.vmm.nbytes
    assert cache.vmm.events[0][0] == "map" and ("unmap",) not in [e[:1] for e in cache.vmm.events]
    engine.sleep()
    assert engine.is_sleeping and cache.mapped_bytes == 0 and cache.num_blocks == 0
    assert torch.isnan(cache.storage).all()  # every byte back to the "driver"
    assert greedy_rollout(engine, prompts) == reference  # mapped (and zeroed) again at the same address
    assert (cache.kv.data_ptr(), cache.kv.shape) == (ptr, shape) and not engine.is_sleeping
    engine.sleep()
    engine.wake_up()
    assert bm.num_blocks == 64 and cache.num_blocks == 64  # the manager starts over with what is mapped
    events = cache.vmm.events
    engine.close()
    assert events[-1] == ("free",) and cache.storage is None and cache.vmm.ptr is None
