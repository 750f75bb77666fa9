"""Move KV blocks of every layer in one kernel launch: gather, scatter and block-to-block copy.

The engine snapshots a trunk (gather its blocks into one contiguous host buffer), restores it in
another worker (scatter that buffer into free blocks) and forks it (copy the partial last block).
Each of these touches the same blocks in all layers. A Python loop over layers and blocks would
launch L*2*n tiny copies; here one launch covers them all, reading the three outer strides of the
6-D view ``kv[L, 2, NB, BS, KVH, D]`` (see ``thaw_rl.engine.kv_cache``), so both physical layouts
(block_major and layer_major) work without a copy.

Every kernel moves contiguous chunks of ``num_tokens * KVH * D`` elements: inside one block the
last three dimensions are contiguous in both layouts. The snapshot format is
``out[n, L, 2, BS, KVH, D]``, contiguous, so one block of all layers is one contiguous piece.

Host memory: on CUDA, ``gather_blocks`` can write a pinned host ``out`` directly from the kernel
(``host_path="direct"``: the pinned pages are mapped into the GPU address space, UVA) or gather
into a device staging buffer and issue one DMA (``host_path="stage"``); ``scatter_blocks`` reads a
pinned host ``src`` the same two ways. Host transfers are asynchronous like ``copy_(...,
non_blocking=True)``: synchronize the stream (or use ``KVTransfer``) before reading the result.

Each Triton function has a torch reference with the same signature; ``gather_blocks`` /
``scatter_blocks`` / ``copy_blocks`` dispatch to Triton for CUDA caches and to the reference
elsewhere. Both paths share the same validation, so errors do not depend on the device.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships for Linux only; elsewhere the torch references still work.
    triton = None

from thaw_rl_kernels.kv_write import FP8_DTYPE

# The kernels move elements without arithmetic: an FP8 cache (kv_cache_dtype="fp8") copies bit for bit.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, FP8_DTYPE)
HOST_PATHS = ("stage", "direct")
# Which way host transfers go when the caller does not say; benchmarks/kv_transfer.py measures both.
DEFAULT_HOST_PATH = "stage"
MAX_BLOCK = 4096  # elements one program moves: 8 KiB of bf16, 16-byte vectors across 4 warps


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _block_copy_kernel(
        src_ptr,
        dst_ptr,
        src_ids_ptr,
        dst_ids_ptr,
        src_stride_layer,
        src_stride_kv,
        src_stride_block,
        dst_stride_layer,
        dst_stride_kv,
        dst_stride_block,
        num_elements,  # elements per (block, layer, K/V) chunk: num_tokens * KVH * D, contiguous
        SRC_INDEXED: tl.constexpr,  # source block = src_ids[i] (else i: a contiguous snapshot)
        DST_INDEXED: tl.constexpr,  # destination block = dst_ids[i] (else i)
        BLOCK: tl.constexpr,
    ):
        """Program (i, layer * 2 + k_or_v, piece) copies BLOCK elements of one chunk."""
        i = tl.program_id(0).to(tl.int64)
        layer_kv = tl.program_id(1)
        layer = (layer_kv // 2).to(tl.int64)
        k_or_v = (layer_kv % 2).to(tl.int64)
        if SRC_INDEXED:
            src_block = tl.load(src_ids_ptr + i).to(tl.int64)
        else:
            src_block = i
        if DST_INDEXED:
            dst_block = tl.load(dst_ids_ptr + i).to(tl.int64)
        else:
            dst_block = i
        # Scalar int64 bases (caches exceed 2**31 elements); the in-chunk offsets fit in int32.
        src_base = layer * src_stride_layer + k_or_v * src_stride_kv + src_block * src_stride_block
        dst_base = layer * dst_stride_layer + k_or_v * dst_stride_kv + dst_block * dst_stride_block
        offsets = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < num_elements
        x = tl.load(src_ptr + src_base + offsets, mask=mask)
        tl.store(dst_ptr + dst_base + offsets, x, mask=mask)


class _HostPointer:
    """A pinned host tensor presented to Triton as a bare pointer.

    Triton takes any object with ``data_ptr()`` and ``dtype`` as a pointer argument. Its launcher
    asks the driver for the device address of ``data_ptr()``; for pinned (page-locked) memory under
    unified virtual addressing that succeeds and the kernel loads/stores over PCIe/NVLink-C2C. For
    pageable memory the driver says no and Triton raises "cannot be accessed from Triton".
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor  # keeps the memory alive for the launch
        self.dtype = tensor.dtype

    def data_ptr(self) -> int:
        return self.tensor.data_ptr()


def _launch(src, dst, src_ids, dst_ids, src_strides, dst_strides, num_layers, num_elements, device) -> None:
    """Owns the grid: one program per (listed block, layer * 2 + K/V, BLOCK-sized piece of the chunk).

    src_strides / dst_strides are the (layer, K/V, block) element strides; a side without ids is a
    contiguous snapshot buffer whose "block" index is the position i in the id list.
    """
    ids = src_ids if src_ids is not None else dst_ids
    if ids.numel() == 0 or num_elements == 0:
        return
    block = min(MAX_BLOCK, triton.next_power_of_2(num_elements))
    grid = (ids.numel(), num_layers * 2, triton.cdiv(num_elements, block))
    assert grid[1] <= 65535 and grid[2] <= 65535, f"grid {grid} exceeds CUDA's y/z limits"
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        _block_copy_kernel[grid](
            src,
            dst,
            ids if src_ids is None else src_ids,  # a side without ids never reads its pointer
            ids if dst_ids is None else dst_ids,
            *src_strides,
            *dst_strides,
            num_elements,
            SRC_INDEXED=src_ids is not None,
            DST_INDEXED=dst_ids is not None,
            BLOCK=block,
            num_warps=4,
        )


# ----------------------------------------------------------------------------------------------
# Validation (shared by the Triton and reference paths)
# ----------------------------------------------------------------------------------------------


def _check_cache(kv: torch.Tensor, name: str) -> None:
    if not isinstance(kv, torch.Tensor) or kv.dim() != 6 or kv.shape[1] != 2:
        shape = tuple(kv.shape) if isinstance(kv, torch.Tensor) else type(kv).__name__
        raise ValueError(
            f"{name} must be the 6-D KV view [num_layers, 2, num_blocks, block_size, kv_heads, head_dim] "
            f"(PagedKVCache.kv); got {shape}."
        )
    if kv.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} has dtype {kv.dtype}; supported KV dtypes are {SUPPORTED_DTYPES}.")
    if not _is_dense(kv, first_dim=3):
        raise ValueError(
            f"{name}'s last three dimensions [block_size, kv_heads, head_dim] must be contiguous "
            f"(strides {_dense_strides(kv.shape[3:])}); got strides {kv.stride()[3:]}. "
            "Build the cache with PagedKVCache, or permute only the outer three dimensions."
        )


def _is_dense(t: torch.Tensor, first_dim: int = 0) -> bool:
    """Whether dims first_dim.. are laid out row-major without gaps (size-1 dims may have any stride)."""
    expected = 1
    for size, stride in zip(reversed(t.shape[first_dim:]), reversed(t.stride()[first_dim:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _dense_strides(shape) -> tuple[int, ...]:
    strides, expected = [], 1
    for size in reversed(shape):
        strides.append(expected)
        expected *= size
    return tuple(reversed(strides))


def _check_ids(ids: torch.Tensor, kv: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise ValueError(
            f"{name} must be a tensor of block ids, got {type(ids).__name__}; "
            f"use torch.tensor(ids, dtype=torch.int64, device={str(kv.device)!r})."
        )
    if ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{name} must be a 1-D int32 or int64 tensor; got shape {tuple(ids.shape)}, dtype {ids.dtype}."
        )
    if ids.device != kv.device:
        raise ValueError(
            f"{name} is on {ids.device} but the cache is on {kv.device}; move it with .to({str(kv.device)!r})."
        )
    return ids.contiguous()


def _check_id_values(checks: list[tuple[str, torch.Tensor, int, bool]], overlap=None) -> None:
    """Range, duplicate and overlap checks on device ids, with one host sync for all of them.

    checks: (name, ids, num_blocks, must_be_unique). overlap: (src_ids, dst_ids) of a copy inside
    one cache, which must be disjoint (programs run in any order; a block both read and written races).
    """
    stats = []
    for _, ids, _, unique in checks:
        stats += [ids.min().long(), ids.max().long()]
        if unique:
            ordered = ids.sort().values
            stats.append((ordered[1:] == ordered[:-1]).any().long())
        else:
            stats.append(torch.zeros((), dtype=torch.long, device=ids.device))
    if overlap is not None:
        stats.append(torch.isin(overlap[0], overlap[1]).any().long())
    values = torch.stack(stats).tolist()
    for k, (name, _, num_blocks, _) in enumerate(checks):
        lo, hi, duplicated = values[3 * k : 3 * k + 3]
        if lo < 0 or hi >= num_blocks:
            raise ValueError(
                f"{name} must lie in [0, {num_blocks}) (the cache's num_blocks); got ids from {lo} to {hi}."
            )
        if duplicated:
            raise ValueError(f"{name} lists a destination block twice; each block may be written once per call.")
    if overlap is not None and values[-1]:
        raise ValueError(
            "src_ids and dst_ids share blocks within one cache; a copy inside one cache needs disjoint "
            "source and destination blocks (copy in two calls, or through gather_blocks/scatter_blocks)."
        )


def _check_host_path(host_path: str | None) -> str:
    host_path = DEFAULT_HOST_PATH if host_path is None else host_path
    if host_path not in HOST_PATHS:
        raise ValueError(f"host_path={host_path!r} is not one of {HOST_PATHS}.")
    return host_path


def _check_snapshot(snap: torch.Tensor, kv: torch.Tensor, num_ids: int, name: str) -> None:
    """snap is the contiguous [n, L, 2, BS, KVH, D] buffer of gather's out / scatter's src."""
    expected = (num_ids, *kv.shape[:2], *kv.shape[3:])
    if not isinstance(snap, torch.Tensor) or tuple(snap.shape) != expected:
        shape = tuple(snap.shape) if isinstance(snap, torch.Tensor) else type(snap).__name__
        raise ValueError(
            f"{name} must have shape [n, L, 2, BS, KVH, D] = {expected} for {num_ids} block ids; got {shape}."
        )
    if snap.dtype != kv.dtype:
        raise ValueError(
            f"{name} has dtype {snap.dtype} but the cache has {kv.dtype}; they must match (this is a copy)."
        )
    if not snap.is_contiguous():
        raise ValueError(f"{name} must be contiguous; allocate it with torch.empty({expected}, ...).")
    same_device = snap.device == kv.device
    host_of_cuda = snap.device.type == "cpu" and kv.device.type == "cuda"
    if not (same_device or host_of_cuda):
        raise ValueError(
            f"{name} is on {snap.device} and the cache on {kv.device}; use the cache's device or host memory."
        )


def _validate_gather(kv, block_ids, out, check_ids):
    _check_cache(kv, "kv")
    block_ids = _check_ids(block_ids, kv, "block_ids")
    _check_snapshot(out, kv, block_ids.numel(), "out")
    if check_ids and block_ids.numel():
        _check_id_values([("block_ids", block_ids, kv.shape[2], False)])
    return block_ids


def _validate_scatter(src, kv, block_ids, check_ids):
    _check_cache(kv, "kv")
    block_ids = _check_ids(block_ids, kv, "block_ids")
    _check_snapshot(src, kv, block_ids.numel(), "src")
    if check_ids and block_ids.numel():
        _check_id_values([("block_ids", block_ids, kv.shape[2], True)])
    return block_ids


def _validate_copy(src_kv, dst_kv, src_ids, dst_ids, num_tokens, check_ids):
    _check_cache(src_kv, "src_kv")
    _check_cache(dst_kv, "dst_kv")
    src_spec = (src_kv.shape[0], *src_kv.shape[3:], src_kv.dtype, src_kv.device)
    dst_spec = (dst_kv.shape[0], *dst_kv.shape[3:], dst_kv.dtype, dst_kv.device)
    if src_spec != dst_spec:
        raise ValueError(
            f"src_kv and dst_kv must agree on (num_layers, block_size, kv_heads, head_dim, dtype, device); "
            f"got {src_spec} and {dst_spec}."
        )
    src_ids = _check_ids(src_ids, src_kv, "src_ids")
    dst_ids = _check_ids(dst_ids, dst_kv, "dst_ids")
    if src_ids.numel() != dst_ids.numel():
        raise ValueError(
            f"src_ids has {src_ids.numel()} ids but dst_ids has {dst_ids.numel()}; pass one destination per source."
        )
    block_size = src_kv.shape[3]
    num_tokens = block_size if num_tokens is None else num_tokens
    if not isinstance(num_tokens, int) or not 0 <= num_tokens <= block_size:
        raise ValueError(
            f"num_tokens must be an int in [0, block_size={block_size}] (or None for whole blocks); got {num_tokens!r}."
        )
    if check_ids and src_ids.numel():
        same_storage = src_kv.untyped_storage().data_ptr() == dst_kv.untyped_storage().data_ptr()
        _check_id_values(
            [("src_ids", src_ids, src_kv.shape[2], False), ("dst_ids", dst_ids, dst_kv.shape[2], True)],
            overlap=(src_ids, dst_ids) if same_storage else None,
        )
    return src_ids, dst_ids, num_tokens


def _snapshot_strides(kv: torch.Tensor) -> tuple[int, int, int]:
    """(layer, K/V, block) strides of the contiguous [n, L, 2, BS, KVH, D] buffer for cache kv."""
    chunk = kv.shape[3] * kv.shape[4] * kv.shape[5]
    return (2 * chunk, chunk, kv.shape[0] * 2 * chunk)


def _cache_strides(kv: torch.Tensor) -> tuple[int, int, int]:
    return (kv.stride(0), kv.stride(1), kv.stride(2))


# ----------------------------------------------------------------------------------------------
# gather: paged -> contiguous
# ----------------------------------------------------------------------------------------------


def gather_blocks_triton(
    kv: torch.Tensor,
    block_ids: torch.Tensor,
    out: torch.Tensor,
    *,
    host_path: str | None = None,
    check_ids: bool = True,
) -> torch.Tensor:
    """out[i, l, t] = kv[l, t, block_ids[i]] in one launch; returns out.

    out may be a host tensor when kv is on CUDA: host_path "direct" writes it from the kernel
    (it must be pinned), "stage" gathers on the device and issues one non_blocking DMA. check_ids
    validates id ranges on the device at the cost of one host sync; pass False in hot paths.
    """
    _require_triton()
    block_ids = _validate_gather(kv, block_ids, out, check_ids)
    host_path = _check_host_path(host_path)
    if out.device == kv.device:
        target = out
    elif host_path == "direct":
        _require_pinned(out, "out")
        target = _HostPointer(out)
    else:
        target = torch.empty(out.shape, dtype=out.dtype, device=kv.device)  # (n, L, 2, BS, KVH, D)
    _assert_launchable(kv)
    chunk = kv.shape[3] * kv.shape[4] * kv.shape[5]
    _launch(kv, target, block_ids, None, _cache_strides(kv), _snapshot_strides(kv), kv.shape[0], chunk, kv.device)
    if isinstance(target, torch.Tensor) and target is not out:
        out.copy_(target, non_blocking=True)
    return out


def gather_blocks_reference(
    kv: torch.Tensor,
    block_ids: torch.Tensor,
    out: torch.Tensor,
    *,
    host_path: str | None = None,
    check_ids: bool = True,
) -> torch.Tensor:
    """Torch reference of gather_blocks_triton (host_path is accepted and ignored)."""
    block_ids = _validate_gather(kv, block_ids, out, check_ids)
    _check_host_path(host_path)
    picked = _bits(kv).index_select(2, block_ids.long())  # (L, 2, n, BS, KVH, D)
    _bits(out).copy_(picked.permute(2, 0, 1, 3, 4, 5))
    return out


def gather_blocks(kv, block_ids, out, *, host_path=None, check_ids=True) -> torch.Tensor:
    """gather_blocks_triton for CUDA caches, gather_blocks_reference elsewhere."""
    impl = gather_blocks_triton if _use_triton(kv) else gather_blocks_reference
    return impl(kv, block_ids, out, host_path=host_path, check_ids=check_ids)


# ----------------------------------------------------------------------------------------------
# scatter: contiguous -> paged
# ----------------------------------------------------------------------------------------------


def scatter_blocks_triton(
    src: torch.Tensor,
    kv: torch.Tensor,
    block_ids: torch.Tensor,
    *,
    host_path: str | None = None,
    check_ids: bool = True,
) -> torch.Tensor:
    """kv[l, t, block_ids[i]] = src[i, l, t] in one launch; returns kv.

    src may be a host tensor when kv is on CUDA: host_path "direct" reads it from the kernel (it
    must be pinned), "stage" copies it to the device with one non_blocking DMA first. Block ids
    must be distinct (checked when check_ids, at the cost of one host sync).
    """
    _require_triton()
    block_ids = _validate_scatter(src, kv, block_ids, check_ids)
    host_path = _check_host_path(host_path)
    if src.device == kv.device:
        source = src
    elif host_path == "direct":
        _require_pinned(src, "src")
        source = _HostPointer(src)
    else:
        source = src.to(kv.device, non_blocking=True)  # (n, L, 2, BS, KVH, D)
    _assert_launchable(kv)
    chunk = kv.shape[3] * kv.shape[4] * kv.shape[5]
    _launch(source, kv, None, block_ids, _snapshot_strides(kv), _cache_strides(kv), kv.shape[0], chunk, kv.device)
    return kv


def scatter_blocks_reference(
    src: torch.Tensor,
    kv: torch.Tensor,
    block_ids: torch.Tensor,
    *,
    host_path: str | None = None,
    check_ids: bool = True,
) -> torch.Tensor:
    """Torch reference of scatter_blocks_triton (host_path is accepted and ignored)."""
    block_ids = _validate_scatter(src, kv, block_ids, check_ids)
    _check_host_path(host_path)
    _bits(kv).index_copy_(2, block_ids.long(), _bits(src).to(kv.device).permute(1, 2, 0, 3, 4, 5))
    return kv


def scatter_blocks(src, kv, block_ids, *, host_path=None, check_ids=True) -> torch.Tensor:
    """scatter_blocks_triton for CUDA caches, scatter_blocks_reference elsewhere."""
    impl = scatter_blocks_triton if _use_triton(kv) else scatter_blocks_reference
    return impl(src, kv, block_ids, host_path=host_path, check_ids=check_ids)


# ----------------------------------------------------------------------------------------------
# copy: block -> block (within one cache or between two caches of one spec)
# ----------------------------------------------------------------------------------------------


def copy_blocks_triton(
    src_kv: torch.Tensor,
    dst_kv: torch.Tensor,
    src_ids: torch.Tensor,
    dst_ids: torch.Tensor,
    num_tokens: int | None = None,
    *,
    check_ids: bool = True,
) -> torch.Tensor:
    """dst_kv[l, t, dst_ids[i], :num_tokens] = src_kv[l, t, src_ids[i], :num_tokens]; returns dst_kv.

    num_tokens=None copies whole blocks; a fork's copy-on-write of a partial last block passes the
    number of filled token rows. Within one cache the source and destination blocks must be disjoint.
    """
    _require_triton()
    src_ids, dst_ids, num_tokens = _validate_copy(src_kv, dst_kv, src_ids, dst_ids, num_tokens, check_ids)
    _assert_launchable(src_kv)
    _assert_launchable(dst_kv)
    chunk = num_tokens * src_kv.shape[4] * src_kv.shape[5]
    strides = (_cache_strides(src_kv), _cache_strides(dst_kv))
    _launch(src_kv, dst_kv, src_ids, dst_ids, *strides, src_kv.shape[0], chunk, src_kv.device)
    return dst_kv


def copy_blocks_reference(
    src_kv: torch.Tensor,
    dst_kv: torch.Tensor,
    src_ids: torch.Tensor,
    dst_ids: torch.Tensor,
    num_tokens: int | None = None,
    *,
    check_ids: bool = True,
) -> torch.Tensor:
    """Torch reference of copy_blocks_triton."""
    src_ids, dst_ids, num_tokens = _validate_copy(src_kv, dst_kv, src_ids, dst_ids, num_tokens, check_ids)
    rows = _bits(src_kv)[:, :, :, :num_tokens].index_select(2, src_ids.long())  # (L, 2, n, num_tokens, KVH, D)
    _bits(dst_kv)[:, :, :, :num_tokens].index_copy_(2, dst_ids.long(), rows)
    return dst_kv


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s memory as a dtype torch's index ops implement: an FP8 cache as uint8 (no float8 index_copy_
    kernel on CPU); the references move bits, so this changes nothing they write."""
    return t.view(torch.uint8) if t.dtype == FP8_DTYPE else t


def copy_blocks(src_kv, dst_kv, src_ids, dst_ids, num_tokens=None, *, check_ids=True) -> torch.Tensor:
    """copy_blocks_triton for CUDA caches, copy_blocks_reference elsewhere."""
    impl = copy_blocks_triton if _use_triton(src_kv) else copy_blocks_reference
    return impl(src_kv, dst_kv, src_ids, dst_ids, num_tokens, check_ids=check_ids)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _use_triton(kv: torch.Tensor) -> bool:
    return triton is not None and isinstance(kv, torch.Tensor) and kv.is_cuda


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("Triton is not installed; use gather_blocks/scatter_blocks/copy_blocks (torch fallback).")


def _require_pinned(t: torch.Tensor, name: str) -> None:
    if not t.is_pinned():
        raise ValueError(
            f'host_path="direct" needs {name} in pinned host memory (the GPU reads/writes it over the bus); '
            'allocate it with pin_memory=True (see PinnedBufferPool) or use host_path="stage".'
        )


def _assert_launchable(kv: torch.Tensor) -> None:
    """Invariants the kernel relies on beyond _check_cache (internal: callers validated already)."""
    assert _is_dense(kv, first_dim=3), "per-block [BS, KVH, D] must be contiguous"
    assert all(s >= 0 for s in kv.stride()[:3]), f"negative outer strides {kv.stride()[:3]}"
    assert kv.shape[3] * kv.shape[4] * kv.shape[5] < 2**31, "one block's chunk must fit int32 offsets"
