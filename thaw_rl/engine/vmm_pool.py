"""A CUDA address range whose physical memory is mapped and unmapped on demand (the driver's VMM API).

Why: the engine gives its KV pool's memory back to training after each generation (``ThawEngine.sleep``).
Freed and allocated again through PyTorch, the pool lands at another address, so every captured CUDA
graph is stale and is recaptured. Here the pool's virtual addresses are reserved once
(``cuMemAddressReserve``) for the engine's life; physical memory is created and mapped into them as a
generation needs it (``cuMemCreate`` + ``cuMemMap`` + ``cuMemSetAccess``) and unmapped and released on
sleep (``cuMemUnmap`` + ``cuMemRelease``). The tensors over the range, and the graphs that read them,
keep their addresses: nothing is recaptured, and a wake maps only what the next generation uses.

vLLM's sleep mode (``vllm/device_allocator/cumem.py`` with its C allocator) and PyTorch's expandable
segments do the same through C++; this module calls ``libcuda.so`` through ctypes: the library the
process already loaded (``/proc/self/maps``), in the primary context that PyTorch made current.

Bookkeeping is in granules (the driver's allocation granularity, 2 MiB on Hopper): a byte range asked
for is rounded out to whole granules, and each run of granules not yet mapped gets one physical
allocation. The pure parts (``granule_runs``, ``subtract_runs``) are tested on CPU.
"""

from __future__ import annotations

import ctypes
import logging

import torch

logger = logging.getLogger(__name__)

_OOM = 2  # CUDA_ERROR_OUT_OF_MEMORY
_PINNED, _ON_DEVICE, _READ_WRITE = 1, 1, 3  # CU_MEM_ALLOCATION_TYPE_PINNED, CU_MEM_LOCATION_TYPE_DEVICE, PROT_READWRITE
_VMM_SUPPORTED_ATTRIBUTE = 102  # CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED


class _Location(ctypes.Structure):  # CUmemLocation
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class _AllocationProp(ctypes.Structure):  # CUmemAllocationProp
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", _Location),
                ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", _AllocFlags)]


class _AccessDesc(ctypes.Structure):  # CUmemAccessDesc
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


def granule_runs(byte_ranges: list[tuple[int, int]], granularity: int) -> list[tuple[int, int]]:
    """Byte ranges ``[start, end)`` as sorted, merged runs ``[first, last)`` of whole granules covering them."""
    runs = sorted((start // granularity, -(-end // granularity)) for start, end in byte_ranges if end > start)
    merged: list[tuple[int, int]] = []
    for first, last in runs:
        if merged and first <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def subtract_runs(wanted: list[tuple[int, int]], have: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of sorted, disjoint runs ``wanted`` that no run of ``have`` covers (sorted)."""
    out = []
    for first, last in wanted:
        for h_first, h_last in sorted(have):
            if h_last <= first or h_first >= last:
                continue
            if h_first > first:
                out.append((first, h_first))
            first = max(first, h_last)
        if first < last:
            out.append((first, last))
    return out


class _Driver:
    """The few libcuda entry points used here, with every result checked."""

    NAMES = ("cuInit", "cuDeviceGet", "cuDeviceGetAttribute", "cuCtxGetCurrent", "cuCtxSetCurrent",
             "cuDevicePrimaryCtxRetain", "cuGetErrorString", "cuMemGetAllocationGranularity", "cuMemAddressReserve",
             "cuMemAddressFree", "cuMemCreate", "cuMemRelease", "cuMemMap", "cuMemUnmap", "cuMemSetAccess")

    def __init__(self) -> None:
        with open("/proc/self/maps") as maps:  # the driver PyTorch loaded (a compat libcuda, say), not another one
            path = next((word for line in maps for word in line.split() if "/libcuda.so" in word), "libcuda.so.1")
        lib = ctypes.CDLL(path)  # raises OSError when there is no driver library
        missing = [name for name in self.NAMES if not hasattr(lib, name)]
        if missing:
            raise OSError(f"{path} lacks {', '.join(missing)} (a CUDA driver older than 10.2)")
        for name in self.NAMES:
            getattr(lib, name).restype = ctypes.c_int
        u64, size = ctypes.c_uint64, ctypes.c_size_t
        lib.cuMemAddressReserve.argtypes = [ctypes.POINTER(u64), size, size, u64, u64]
        lib.cuMemAddressFree.argtypes = [u64, size]
        lib.cuMemCreate.argtypes = [ctypes.POINTER(u64), size, ctypes.POINTER(_AllocationProp), u64]
        lib.cuMemRelease.argtypes = [u64]
        lib.cuMemMap.argtypes = [u64, size, size, u64, u64]
        lib.cuMemUnmap.argtypes = [u64, size]
        lib.cuMemSetAccess.argtypes = [u64, size, ctypes.POINTER(_AccessDesc), size]
        lib.cuMemGetAllocationGranularity.argtypes = [ctypes.POINTER(size), ctypes.POINTER(_AllocationProp),
                                                      ctypes.c_int]
        self.lib, self.path = lib, path

    def __call__(self, name: str, *args) -> None:
        result = getattr(self.lib, name)(*args)
        if result != 0:
            text = ctypes.c_char_p()
            self.lib.cuGetErrorString(result, ctypes.byref(text))
            message = f"{name} failed: CUDA driver error {result} ({(text.value or b'unknown').decode()})"
            raise torch.OutOfMemoryError(message) if result == _OOM else RuntimeError(message)

    def use_device(self, ordinal: int) -> int:
        """Make sure a context is current on this thread (else the device's primary one, PyTorch's); returns
        the device's CUdevice."""
        self("cuInit", 0)  # a no-op once PyTorch initialized the driver
        device, context = ctypes.c_int(), ctypes.c_void_p()
        self("cuDeviceGet", ctypes.byref(device), ordinal)
        self("cuCtxGetCurrent", ctypes.byref(context))
        if not context.value:
            self("cuDevicePrimaryCtxRetain", ctypes.byref(context), device)
            self("cuCtxSetCurrent", context)
        return device.value


_DRIVER: _Driver | None = None


def vmm_unavailable_reason(device: torch.device) -> str | None:
    """Why ``VmmRange`` cannot serve ``device`` (None: it can): no CUDA device, no driver, no VMM support."""
    global _DRIVER
    if device.type != "cuda":
        return f"the device is {device.type}, not CUDA"
    try:
        torch.cuda.init()
        _DRIVER = _DRIVER or _Driver()
        supported = ctypes.c_int()
        _DRIVER("cuDeviceGetAttribute", ctypes.byref(supported), _VMM_SUPPORTED_ATTRIBUTE,
                _DRIVER.use_device(_ordinal(device)))
    except (OSError, RuntimeError, AssertionError) as err:  # AssertionError: torch built without CUDA
        return f"{type(err).__name__}: {err}"
    return None if supported.value else "the device reports no virtual memory management support"


def _ordinal(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


class _Interface:
    """What ``torch.as_tensor`` reads (``__cuda_array_interface__``); holds the range alive while a tensor does."""

    def __init__(self, owner: VmmRange) -> None:
        self.owner = owner
        self.__cuda_array_interface__ = {"shape": (owner.nbytes,), "typestr": "|u1", "data": (owner.ptr, False),
                                         "strides": None, "version": 3}


class VmmRange:
    """``nbytes`` (rounded up to whole granules) of reserved device addresses; physical memory mapped on demand.

    The bookkeeping (``map``, ``unmap_all``, ``close``) is written over five driver steps (``_open``,
    ``_reserve``, ``_map_run``, ``_unmap_run``, ``_free``), so a test can run it over host memory.
    """

    def __init__(self, nbytes: int, device: torch.device) -> None:
        self.ptr, self._mapped = None, []  # _mapped: (first granule, last granule, allocation handle)
        self._open(device)  # sets device, granularity
        self.nbytes = -(-nbytes // self.granularity) * self.granularity
        self.ptr = self._reserve(self.nbytes)

    @property
    def mapped_bytes(self) -> int:
        return sum(last - first for first, last, _ in self._mapped) * self.granularity

    def map(self, byte_ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Back every granule touching ``byte_ranges`` with physical memory, one allocation per run of granules
        not mapped yet; returns the byte ranges newly mapped (their contents are undefined)."""
        if self.ptr is None:
            raise RuntimeError("VmmRange.map after close()")
        g = self.granularity
        new = subtract_runs(granule_runs(byte_ranges, g), [(a, b) for a, b, _ in self._mapped])
        if new and new[-1][1] * g > self.nbytes:
            raise RuntimeError(f"map up to byte {new[-1][1] * g} of a VmmRange of {self.nbytes} bytes")
        for first, last in new:
            self._mapped.append((first, last, self._map_run(first * g, (last - first) * g)))
        return [(first * g, last * g) for first, last in new]

    def unmap_all(self) -> None:
        """Wait for the device, then unmap and release every physical allocation (the addresses stay reserved)."""
        if self._mapped:
            self._synchronize()  # unmapping does not wait for kernels still reading the range
        while self._mapped:
            first, last, handle = self._mapped.pop()
            self._unmap_run(first * self.granularity, (last - first) * self.granularity, handle)

    def close(self) -> None:
        """Unmap everything and give the addresses back; every tensor over the range is dangling afterwards."""
        if self.ptr is None:
            return
        self.unmap_all()
        self._free()
        self.ptr = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception as err:  # interpreter shutdown, a dead context: nothing left to free it
            logger.debug("VmmRange.__del__: %s", err)

    def tensor(self) -> torch.Tensor:
        """All ``nbytes`` as one uint8 tensor, zero-copy (map some memory first: PyTorch asks the driver which
        device the first byte is on). It keeps this range alive; touching an unmapped byte is a device fault."""
        return torch.as_tensor(_Interface(self), device=self.device)

    # -- the driver steps ----------------------------------------------------------------------------------
    def _open(self, device: torch.device) -> None:
        reason = vmm_unavailable_reason(device)
        if reason is not None:
            raise ValueError(f"VmmRange on {device}: {reason}")
        self.driver, self.ordinal = _DRIVER, _ordinal(device)
        self.device = torch.device("cuda", self.ordinal)
        self._prop = _AllocationProp(type=_PINNED, location=_Location(_ON_DEVICE, self.ordinal))
        self._access = _AccessDesc(location=_Location(_ON_DEVICE, self.ordinal), flags=_READ_WRITE)
        granularity = ctypes.c_size_t()
        self._call("cuMemGetAllocationGranularity", ctypes.byref(granularity), ctypes.byref(self._prop), 0)
        self.granularity = granularity.value

    def _call(self, name: str, *args) -> None:
        with torch.cuda.device(self.ordinal):  # its primary context current on this thread
            self.driver.use_device(self.ordinal)
            self.driver(name, *args)

    def _reserve(self, nbytes: int) -> int:
        ptr = ctypes.c_uint64()
        self._call("cuMemAddressReserve", ctypes.byref(ptr), nbytes, self.granularity, 0, 0)  # granule-aligned
        return ptr.value

    def _map_run(self, offset: int, size: int) -> int:
        """Physical memory for ``[offset, offset + size)``, mapped read-write; returns its handle. On
        out-of-memory, PyTorch's cached blocks are freed and the allocation tried once more."""
        handle, at = ctypes.c_uint64(), self.ptr + offset
        try:
            self._call("cuMemCreate", ctypes.byref(handle), size, ctypes.byref(self._prop), 0)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            self._call("cuMemCreate", ctypes.byref(handle), size, ctypes.byref(self._prop), 0)
        try:
            self._call("cuMemMap", at, size, 0, handle, 0)
        except RuntimeError:
            self._call("cuMemRelease", handle)
            raise
        try:
            self._call("cuMemSetAccess", at, size, ctypes.byref(self._access), 1)
        except RuntimeError:
            self._unmap_run(offset, size, handle.value)
            raise
        return handle.value

    def _unmap_run(self, offset: int, size: int, handle: int) -> None:
        self._call("cuMemUnmap", self.ptr + offset, size)
        self._call("cuMemRelease", handle)

    def _synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def _free(self) -> None:
        self._call("cuMemAddressFree", self.ptr, self.nbytes)
