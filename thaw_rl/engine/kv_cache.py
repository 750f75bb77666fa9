"""Paged KV storage for every layer of a model, in one tensor.

The engine, the kernels in ``thaw_rl_kernels`` and the vLLM backend all speak one shape: a 6-D view
``kv[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`` where ``kv[l, 0]`` is layer l's
keys and ``kv[l, 1]`` its values, each the vLLM-style per-layer view
``[num_blocks, block_size, num_kv_heads, head_dim]``. Inside one block the last three dimensions are
contiguous; the block, layer and K/V strides depend on the physical layout:

- ``layer_major`` (default): storage ``[num_layers, 2, num_blocks, ...]``, so each layer's cache is
  contiguous.
- ``block_major``: storage ``[num_blocks, num_layers, 2, block_size, kv_heads, head_dim]``, so one block
  of all layers is one contiguous piece.

Chosen by measurement: the Triton gather/scatter kernels move a 2,048-token trunk at the same speed in
both layouts on an H100 (52.3 vs 52.4 GB/s snapshot, benchmarks/results/kv_transfer_h100.json), and
the GPU attention kernel reads one contiguous ``[block_size, kv_heads, head_dim]`` tile at a time in
either; but the CPU attention path (gather + SDPA) runs 2x faster on layer_major (2.0 vs 3.9 ms per
layer, SmolLM2 shapes, batch 32, context 190).

On CUDA the storage lives, by default, in a ``VmmRange`` (``vmm_pool.py``): addresses reserved for the
pool's ``capacity`` blocks, physical memory mapped only for the first ``num_blocks`` of them (in
layer_major, the first blocks of every layer's K and V), more mapped by ``grow`` and all of it unmapped by
``release``. The tensors keep their addresses and shapes throughout, so CUDA graphs stay valid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from thaw_rl.engine.vmm_pool import VmmRange, vmm_unavailable_reason
from thaw_rl_kernels.kv_write import FP8_DTYPE

logger = logging.getLogger(__name__)

LAYOUTS = ("block_major", "layer_major")
# What the cache stores (``ThawEngine(kv_cache_dtype=...)``, vLLM's names): "auto" is the model's compute dtype;
# "fp8" (alias "fp8_e4m3") is float8_e4m3fn, unscaled and saturated to +-448 (vLLM's fp8 KV with its default
# scale of 1.0): twice the tokens in the same memory, at the price of rounding every cached key and value to 3
# mantissa bits: logprobs move (H200, SmolLM2 in bf16: 40% of sampled tokens off the training forward by > 0.1
# nats against 12% with the bf16 cache, sequence importance ratios' median 0.35 against 0.90) and greedy text may.
# Not faster: the kernels widen the tiles before their dots (README, "FP8 KV cache").
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
_vmm_fallback_logged = False


@dataclass(frozen=True)
class KVCacheSpec:
    """What a cache holds; two caches can exchange blocks only when their specs are equal."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * elem

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_block // self.block_size


def resolve_kv_cache_dtype(name: str, compute_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype a cache named ``name`` stores for a model computing in ``compute_dtype``."""
    if name == "auto":
        return compute_dtype
    if name in KV_CACHE_DTYPES[1:]:  # "fp8" and its alias
        return FP8_DTYPE
    raise ValueError(f"kv_cache_dtype={name!r} must be one of {KV_CACHE_DTYPES}: 'auto' (the model's dtype) or "
                     f"'fp8' (float8_e4m3fn, half the memory and attention reads; rounds the cached K/V).")


def use_vmm(requested: bool | None, device: torch.device | str) -> bool:
    """Whether a KV pool on ``device`` lives in a ``VmmRange``: None = where the driver can (CUDA with VMM
    support; a CUDA driver without it falls back to ``release``/``reallocate`` through PyTorch, logged once)."""
    global _vmm_fallback_logged
    device = torch.device(device)
    if requested is False:
        return False
    reason = vmm_unavailable_reason(device)
    if reason is None:
        return True
    if requested:
        raise ValueError(f"kv_cache_vmm=True but the KV pool on {device} cannot be mapped on demand: {reason}. "
                         f"Leave kv_cache_vmm=None (on where the CUDA driver supports it) or set it False.")
    if device.type == "cuda" and not _vmm_fallback_logged:
        _vmm_fallback_logged = True
        logger.warning("thaw-rl: the KV pool is allocated through PyTorch, not mapped on demand (%s): each wake_up "
                       "allocates it again and recaptures CUDA graphs if it moved.", reason)
    return False


def block_byte_ranges(spec: KVCacheSpec, layout: str, capacity: int, num_blocks: int) -> list[tuple[int, int]]:
    """Byte ranges ``[start, end)`` of the storage of a ``capacity``-block cache that blocks ``[0, num_blocks)``
    occupy: one range in block_major, one per layer and K/V (``2 * num_layers``) in layer_major."""
    if layout == "block_major":
        return [(0, num_blocks * spec.bytes_per_block)]
    per_block = spec.bytes_per_block // (2 * spec.num_layers)  # one layer's K (or V) of one block
    slab = capacity * per_block
    return [(i * slab, i * slab + num_blocks * per_block) for i in range(2 * spec.num_layers)]


class PagedKVCache:
    """Owns the KV storage; hands out the 6-D view and per-layer key/value views.

    ``vmm=True``: the storage spans ``num_blocks`` blocks of reserved addresses (``capacity``) of which only
    the first ``initial_blocks`` are mapped (``self.num_blocks``, the blocks that may be used); see the module
    docstring. Otherwise all ``num_blocks`` are allocated through PyTorch.
    """

    def __init__(
        self,
        spec: KVCacheSpec,
        num_blocks: int,
        device: torch.device | str,
        layout: str = "layer_major",
        vmm: bool = False,
        initial_blocks: int | None = None,
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"Unknown KV layout {layout!r}; choose one of {LAYOUTS}.")
        if num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks} is too small: the cache needs at least 2 blocks.")
        self.spec = spec
        self.capacity = num_blocks
        self.layout = layout
        self.closed = False
        self.vmm: VmmRange | None = None
        if not vmm:
            self.num_blocks = num_blocks
            self.storage = self._zeros(num_blocks, device)
        else:
            self._initial_blocks = min(num_blocks, max(2, initial_blocks or num_blocks))
            self.vmm = VmmRange(num_blocks * spec.bytes_per_block, torch.device(device))
            fresh = self.vmm.map(self._byte_ranges(self._initial_blocks))
            self._bytes = self.vmm.tensor()  # (reserved bytes,) uint8, zero-copy over the whole range
            self._zero(fresh)
            self.num_blocks, self._released = self._initial_blocks, False
            flat = self._bytes[: num_blocks * spec.bytes_per_block].view(spec.dtype)
            self.storage = flat.view(self._shape(num_blocks))
        self.kv = self._view(self.storage)

    def _shape(self, num_blocks: int) -> tuple[int, ...]:
        s = self.spec
        if self.layout == "block_major":
            return num_blocks, s.num_layers, 2, s.block_size, s.num_kv_heads, s.head_dim  # (NB, L, 2, BS, KVH, D)
        return s.num_layers, 2, num_blocks, s.block_size, s.num_kv_heads, s.head_dim  # (L, 2, NB, BS, KVH, D)

    def _zeros(self, num_blocks: int, device) -> torch.Tensor:
        return torch.zeros(self._shape(num_blocks), dtype=self.spec.dtype, device=device)

    def _byte_ranges(self, num_blocks: int) -> list[tuple[int, int]]:
        return block_byte_ranges(self.spec, self.layout, self.capacity, num_blocks)

    def _zero(self, byte_ranges: list[tuple[int, int]]) -> None:
        """Newly mapped memory holds whatever it held: zero it, as a PyTorch-allocated pool is."""
        for start, end in byte_ranges:
            self._bytes[start:end].zero_()

    def _view(self, storage: torch.Tensor) -> torch.Tensor:
        return storage.permute(1, 2, 0, 3, 4, 5) if self.layout == "block_major" else storage  # (L, 2, NB, BS, KVH, D)

    def grow(self, num_blocks: int) -> None:
        """Make ``num_blocks`` blocks usable, keeping every block's contents and id.

        VMM: map (and zero) the memory of the new blocks; nothing moves. Otherwise the storage is
        reallocated and the tensors move, so whatever captured the old storage (CUDA graphs) is stale: the
        engine grows only such pools without graphs.
        """
        if num_blocks < self.num_blocks:
            raise RuntimeError(f"grow({num_blocks}) would shrink a cache of {self.num_blocks} blocks")
        if self.vmm is not None:
            if num_blocks > self.capacity:
                raise RuntimeError(f"grow({num_blocks}) past the {self.capacity} blocks reserved")
            try:
                self._zero(self.vmm.map(self._byte_ranges(num_blocks)))
            except torch.OutOfMemoryError as e:
                gib = num_blocks * self.spec.bytes_per_block / 2**30
                raise torch.OutOfMemoryError(
                    f"the engine's KV pool could not map {num_blocks} blocks ({gib:.1f} GiB) next to what training "
                    f"holds: lower kv_cache_memory or the generation's size. ({e})") from e
            self.num_blocks = num_blocks
            return
        storage = self._zeros(num_blocks, self.device)
        kv = self._view(storage)
        kv[:, :, : self.num_blocks].copy_(self.kv)
        self.storage, self.kv, self.num_blocks, self.capacity = storage, kv, num_blocks, num_blocks

    def release(self) -> None:
        """Drop the storage and, on CUDA, hand its memory back to the device; ``reallocate`` brings a zeroed one back.

        Why empty the cache: left in PyTorch's caching allocator, the pool's one large segment is split by
        training's allocations, and the next ``reallocate`` of the whole pool then finds no contiguous room
        (seen on an H200: a 68 GiB pool failed with 62 GiB "reserved but unallocated").

        VMM: unmap every block's memory (after the device finished with it); the tensors stay, unusable
        until ``reallocate``.
        """
        if self.vmm is not None:
            self.vmm.unmap_all()
            self.num_blocks, self._released = 0, True
            return
        self._device, self._released_ptr = self.storage.device, self.storage.data_ptr()
        self.storage, self.kv = None, None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def reallocate(self) -> bool:
        """After ``release``: zeroed storage of the same size; True when it landed at the same address.

        VMM: the first blocks mapped again (zeroed) at the same address, always True; ``grow`` maps more.
        """
        if self.closed:
            raise ValueError("this KV cache was closed (ThawEngine.close): build a new engine.")
        if self.vmm is not None:
            self._released = False
            self.grow(self._initial_blocks)
            return True
        try:
            storage = self._zeros(self.num_blocks, self._device)
        except torch.OutOfMemoryError:
            if self._device.type != "cuda":
                raise
            torch.cuda.empty_cache()  # what training cached since, then once more
            try:
                storage = self._zeros(self.num_blocks, self._device)
            except torch.OutOfMemoryError as e:
                raise torch.OutOfMemoryError(
                    f"the engine's KV pool ({self.nbytes / 2**30:.1f} GiB) no longer fits after training: lower "
                    f"kv_cache_memory, or keep the pool allocated with release_kv_cache=False. ({e})") from e
        same = storage.data_ptr() == self._released_ptr
        self.storage, self.kv = storage, self._view(storage)
        return same

    def close(self) -> None:
        """Free the storage for good (VMM: unmap it and give the addresses back); ``reallocate`` refuses after."""
        if self.vmm is not None:
            self.storage = self.kv = self._bytes = None
            self.vmm.close()
            self.num_blocks, self._released = 0, True
        elif self.storage is not None:
            self.release()
        self.closed = True

    @property
    def released(self) -> bool:
        return self._released if self.vmm is not None else self.storage is None

    @property
    def mapped_bytes(self) -> int:
        """Device memory the storage holds now (VMM: what is mapped, whole granules; 0 when released)."""
        if self.vmm is not None:
            return self.vmm.mapped_bytes
        return 0 if self.storage is None else self.storage.nbytes

    @property
    def device(self) -> torch.device:
        if self.vmm is not None:
            return self.vmm.device
        return self._device if self.storage is None else self.storage.device

    def key_cache(self, layer: int) -> torch.Tensor:
        return self.kv[layer, 0]  # (NB, BS, KVH, D)

    def value_cache(self, layer: int) -> torch.Tensor:
        return self.kv[layer, 1]  # (NB, BS, KVH, D)

    @property
    def nbytes(self) -> int:
        return self.spec.bytes_per_block * self.num_blocks
