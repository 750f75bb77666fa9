"""Write one forward's new K and V into a layer's paged cache in one kernel launch.

Every attention layer of every engine step stores its new tokens' keys and values at their slots
(token t goes to block ``slot_blocks[t]``, offset ``slot_offsets[t]``) before attending. Two
advanced-indexing assignments do it in torch, each an ATen ``index_put`` launch (plus a cast copy when
the dtypes differ): 2 x 28 launches of ~4 us per decode step on an H200 for a 28-layer model. The
Triton kernel here writes K and V together, one launch per layer (vLLM calls this
``reshape_and_cache_flash``).

Shapes: ``key``/``value`` are (T, KVH, D), any strides (the hook passes ``key[0].transpose(0, 1)`` of
HF's (1, KVH, T, D), a non-contiguous view, and no copy is made); the caches are the per-layer views
(NB, BS, KVH, D) of ``PagedKVCache``, whose strides differ between the layer_major and block_major
layouts (see ``thaw_rl.engine.kv_cache``); the kernel reads all strides, so neither needs a copy. Values
are cast to the cache's dtype (round-to-nearest-even, as ``Tensor.to``). An FP8 cache
(``torch.float8_e4m3fn``, the engine's ``kv_cache_dtype="fp8"``) stores each value saturated to the
format's finite range (+-448) and rounded to nearest even, unscaled: vLLM's ``kv_cache_dtype="fp8"``
with its default scale of 1.0.

- ``write_kv_reference``: torch, any device (the CPU engine's path), the semantics both follow.
- ``write_kv_triton``: one launch, grid (T, head groups); no host sync and nothing read from device
  memory on the host, so it is CUDA-graph safe; T = 0 launches nothing.
- ``write_kv``: Triton on CUDA, the reference elsewhere.

Slots are not range-checked on the device (that would need a sync): the engine hands out only slots
of blocks it owns, and CUDA-graph padding rows all write the null block 0, offset 0.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships for Linux only; elsewhere the torch reference still works.
    triton = None

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # of the new keys and values
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
CACHE_DTYPES = SUPPORTED_DTYPES + (FP8_DTYPE,)  # of the cache
MAX_TILE = 4096  # elements of K (and as many of V) one program moves: one token's heads of a group


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _to_bf16_rtne(x):
        """float32 -> bfloat16 rounded to nearest even, as torch rounds. Done by hand because the Triton
        interpreter (the CPU tests) truncates in ``.to(tl.bfloat16)``; on GPUs it is the same cvt.rn."""
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN stays a (quiet) NaN, never rounds up into inf
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _to_fp8e4m3_rtne(x):
        """float32 -> float8_e4m3fn saturated to +-448 and rounded to nearest even, as ``write_kv_reference``
        (clamp, then torch's cast). By hand with integer ops: the Triton interpreter's fp8 casts flush
        subnormals and garble bfloat16 inputs, and one routine gives the GPU and the CPU tests the same bits."""
        bits = x.to(tl.uint32, bitcast=True)
        sign = (bits >> 24) & 0x80
        mag = bits & 0x7FFFFFFF
        is_nan = mag > 0x7F800000
        mag = tl.minimum(mag, 0x43E00000)  # 448.0; for non-negative floats the bit order is the value order
        exp = mag >> 23
        # normal (>= 2^-6, biased exponent >= 121): keep 3 mantissa bits, the 20 dropped ones rounded to even
        normal = ((mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20) - (120 << 3)
        # subnormal (and 2^-6 reached by rounding): 1.m * 2^(exp-127) in units of 2^-9 = m24 >> (141 - exp)
        shift = tl.minimum(141 - exp, 25)
        m24 = (mag & 0x7FFFFF) | 0x800000
        q = m24 >> shift
        rem = m24 & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        q += ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.uint32)
        code = tl.where(exp >= 121, normal, tl.where(exp == 0, 0, q))
        code = tl.where(is_nan, 0x7F, code) | sign
        return code.to(tl.uint8).to(tl.float8e4nv, bitcast=True)

    @triton.jit
    def _cast(x, dtype: tl.constexpr):
        if dtype == tl.bfloat16 and x.dtype != tl.bfloat16:
            return _to_bf16_rtne(x.to(tl.float32))  # float16 -> float32 is exact, as torch goes
        if dtype == tl.float8e4nv:
            return _to_fp8e4m3_rtne(x.to(tl.float32))
        return x.to(dtype)

    @triton.jit
    def _kv_write_kernel(
        key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, blocks_ptr, offsets_ptr,
        stride_blocks, stride_offsets,
        k_stride_t, k_stride_h, k_stride_d,
        v_stride_t, v_stride_h, v_stride_d,
        kc_stride_b, kc_stride_s, kc_stride_h, kc_stride_d,
        vc_stride_b, vc_stride_s, vc_stride_h, vc_stride_d,
        num_kv_heads, head_dim,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Program (t, g) copies heads [g * BLOCK_H, (g + 1) * BLOCK_H) of token t's K and V to its slot."""
        t = tl.program_id(0).to(tl.int64)
        heads = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)[:, None]  # (BLOCK_H, 1)
        dims = tl.arange(0, BLOCK_D).to(tl.int64)[None, :]  # (1, BLOCK_D)
        mask = (heads < num_kv_heads) & (dims < head_dim)
        block = tl.load(blocks_ptr + t * stride_blocks).to(tl.int64)
        offset = tl.load(offsets_ptr + t * stride_offsets).to(tl.int64)
        # int64 throughout: a block_major cache's block stride times a block id passes 2**31 elements.
        k = tl.load(key_ptr + t * k_stride_t + heads * k_stride_h + dims * k_stride_d, mask=mask)
        v = tl.load(value_ptr + t * v_stride_t + heads * v_stride_h + dims * v_stride_d, mask=mask)
        k_dst = k_cache_ptr + block * kc_stride_b + offset * kc_stride_s + heads * kc_stride_h + dims * kc_stride_d
        v_dst = v_cache_ptr + block * vc_stride_b + offset * vc_stride_s + heads * vc_stride_h + dims * vc_stride_d
        tl.store(k_dst, _cast(k, k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_dst, _cast(v, v_cache_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Validation (shared by the Triton and reference paths)
# ----------------------------------------------------------------------------------------------


_FLOAT_DTYPES = frozenset(SUPPORTED_DTYPES)
_CACHE_DTYPES = frozenset(CACHE_DTYPES)
_SLOT_DTYPES = frozenset((torch.int32, torch.int64))


def _check(key, value, k_cache, v_cache, slot_blocks, slot_offsets) -> None:
    """Shapes, dtypes and devices only (all host metadata): no sync, safe inside CUDA-graph capture.

    Runs once per layer per eager step, so the passing case is one expression (~4 us of host time, not 14);
    ``_diagnose`` names the problem only when it fails.
    """
    try:
        ks, cs = key.shape, k_cache.shape
        ok = (len(ks) == 3 and len(cs) == 4 and value.shape == ks and v_cache.shape == cs and cs[2:] == ks[1:]
              and slot_blocks.shape == ks[:1] and slot_offsets.shape == ks[:1]
              and {key.dtype, value.dtype} <= _FLOAT_DTYPES and {k_cache.dtype, v_cache.dtype} <= _CACHE_DTYPES
              and {slot_blocks.dtype, slot_offsets.dtype} <= _SLOT_DTYPES
              and len({key.device, value.device, k_cache.device, v_cache.device, slot_blocks.device,
                       slot_offsets.device}) == 1)
    except AttributeError:  # not a tensor
        ok = False
    if not ok:
        _diagnose(key, value, k_cache, v_cache, slot_blocks, slot_offsets)


def _diagnose(key, value, k_cache, v_cache, slot_blocks, slot_offsets) -> None:
    """Raise the error that names what is wrong with the arguments ``_check`` refused."""
    named = (("key", key), ("value", value), ("k_cache", k_cache), ("v_cache", v_cache),
             ("slot_blocks", slot_blocks), ("slot_offsets", slot_offsets))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if key.dim() != 3 or value.shape != key.shape:
        raise ValueError(f"key and value must both be (T, kv_heads, head_dim), got {tuple(key.shape)} and "
                         f"{tuple(value.shape)}; pass key[0].transpose(0, 1) of HF's (1, kv_heads, T, head_dim).")
    T, kvh, d = key.shape
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[2:] != (kvh, d):
        raise ValueError(f"k_cache and v_cache must both be (num_blocks, block_size, {kvh}, {d}) to hold key "
                         f"{tuple(key.shape)}, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}; pass "
                         f"PagedKVCache.key_cache(layer) / value_cache(layer).")
    for name, t in (("slot_blocks", slot_blocks), ("slot_offsets", slot_offsets)):
        if t.shape != (T,) or t.dtype not in _SLOT_DTYPES:
            raise ValueError(f"{name} must be ({T},) int32 or int64, one slot per new token, got "
                             f"{tuple(t.shape)} {t.dtype}.")
    for name, t in named[:2]:
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; supported dtypes are {SUPPORTED_DTYPES}.")
    for name, t in named[2:4]:
        if t.dtype not in CACHE_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; supported cache dtypes are {CACHE_DTYPES}.")
    for name, t in named[1:]:
        if t.device != key.device:
            raise ValueError(f"{name} is on {t.device} but key is on {key.device}; move them to one device.")
    raise RuntimeError("kv_write's fast argument check and its diagnosis disagree; this is a bug in kv_write.py.")


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def write_kv_reference(
    key: torch.Tensor,  # (T, KVH, D)
    value: torch.Tensor,  # (T, KVH, D)
    k_cache: torch.Tensor,  # (NB, BS, KVH, D), written in place
    v_cache: torch.Tensor,  # (NB, BS, KVH, D), written in place
    slot_blocks: torch.Tensor,  # (T,) int: block of each new token
    slot_offsets: torch.Tensor,  # (T,) int: offset inside that block
) -> None:
    """k_cache[slot_blocks[t], slot_offsets[t]] = key[t] (cast; saturated to +-448 into FP8), and the same for
    value."""
    _check(key, value, k_cache, v_cache, slot_blocks, slot_offsets)
    k_cache[slot_blocks, slot_offsets] = to_cache_dtype(key, k_cache.dtype)
    v_cache[slot_blocks, slot_offsets] = to_cache_dtype(value, v_cache.dtype)


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as the cache stores it: ``x.to(dtype)``, except that FP8 saturates to +-448 first (out of range,
    a plain cast may give NaN); NaN stays NaN."""
    if dtype == FP8_DTYPE:
        return x.float().clamp(-FP8_MAX, FP8_MAX).to(dtype)
    return x.to(dtype)


def write_kv_triton(key, value, k_cache, v_cache, slot_blocks, slot_offsets) -> None:
    """``write_kv_reference`` in one Triton launch (grid: tokens x head groups)."""
    if triton is None:
        raise RuntimeError("write_kv_triton needs Triton, which is not installed; use write_kv_reference.")
    _check(key, value, k_cache, v_cache, slot_blocks, slot_offsets)
    T, kvh, d = key.shape
    if T == 0 or kvh == 0 or d == 0:
        return
    block_d = triton.next_power_of_2(d)
    block_h = min(triton.next_power_of_2(kvh), max(1, MAX_TILE // block_d))
    grid = (T, triton.cdiv(kvh, block_h))
    num_warps = max(1, min(4, block_h * block_d // 256))  # ~8 elements a thread: 16-byte bf16 vectors
    _kv_write_kernel[grid](
        key, value, k_cache, v_cache, slot_blocks, slot_offsets,
        slot_blocks.stride(0), slot_offsets.stride(0),
        *key.stride(), *value.stride(), *k_cache.stride(), *v_cache.stride(),
        kvh, d,
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=num_warps,
    )


def write_kv(key, value, k_cache, v_cache, slot_blocks, slot_offsets) -> None:
    """Triton on CUDA tensors, the torch reference elsewhere."""
    if getattr(k_cache, "is_cuda", False):  # not a tensor: the reference raises the TypeError
        return write_kv_triton(key, value, k_cache, v_cache, slot_blocks, slot_offsets)
    return write_kv_reference(key, value, k_cache, v_cache, slot_blocks, slot_offsets)
