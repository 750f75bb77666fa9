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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("block_major", "layer_major")


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


class PagedKVCache:
    """Owns the KV storage; hands out the 6-D view and per-layer key/value views."""

    def __init__(
        self,
        spec: KVCacheSpec,
        num_blocks: int,
        device: torch.device | str,
        layout: str = "layer_major",
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"Unknown KV layout {layout!r}; choose one of {LAYOUTS}.")
        if num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks} is too small: the cache needs at least 2 blocks.")
        self.spec = spec
        self.num_blocks = num_blocks
        self.layout = layout
        self.storage = self._zeros(num_blocks, device)
        self.kv = self._view(self.storage)

    def _zeros(self, num_blocks: int, device) -> torch.Tensor:
        s = self.spec
        if self.layout == "block_major":
            return torch.zeros(  # (NB, L, 2, BS, KVH, D)
                num_blocks, s.num_layers, 2, s.block_size, s.num_kv_heads, s.head_dim, dtype=s.dtype, device=device
            )
        return torch.zeros(  # (L, 2, NB, BS, KVH, D)
            s.num_layers, 2, num_blocks, s.block_size, s.num_kv_heads, s.head_dim, dtype=s.dtype, device=device
        )

    def _view(self, storage: torch.Tensor) -> torch.Tensor:
        return storage.permute(1, 2, 0, 3, 4, 5) if self.layout == "block_major" else storage  # (L, 2, NB, BS, KVH, D)

    def grow(self, num_blocks: int) -> None:
        """Reallocate with ``num_blocks`` blocks, keeping every block's contents and id.

        The tensors move, so whatever captured the old storage (CUDA graphs) is stale: the engine grows
        only pools without graphs.
        """
        if num_blocks < self.num_blocks:
            raise RuntimeError(f"grow({num_blocks}) would shrink a cache of {self.num_blocks} blocks")
        storage = self._zeros(num_blocks, self.device)
        kv = self._view(storage)
        kv[:, :, : self.num_blocks].copy_(self.kv)
        self.storage, self.kv, self.num_blocks = storage, kv, num_blocks

    def release(self) -> None:
        """Drop the storage and, on CUDA, hand its memory back to the device; ``reallocate`` brings a zeroed one back.

        Why empty the cache: left in PyTorch's caching allocator, the pool's one large segment is split by
        training's allocations, and the next ``reallocate`` of the whole pool then finds no contiguous room
        (seen on an H200: a 68 GiB pool failed with 62 GiB "reserved but unallocated").
        """
        self._device, self._released_ptr = self.storage.device, self.storage.data_ptr()
        self.storage, self.kv = None, None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def reallocate(self) -> bool:
        """After ``release``: zeroed storage of the same size; True when it landed at the same address."""
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

    @property
    def released(self) -> bool:
        return self.storage is None

    @property
    def device(self) -> torch.device:
        return self._device if self.storage is None else self.storage.device

    def key_cache(self, layer: int) -> torch.Tensor:
        return self.kv[layer, 0]  # (NB, BS, KVH, D)

    def value_cache(self, layer: int) -> torch.Tensor:
        return self.kv[layer, 1]  # (NB, BS, KVH, D)

    @property
    def nbytes(self) -> int:
        return self.spec.bytes_per_block * self.num_blocks
