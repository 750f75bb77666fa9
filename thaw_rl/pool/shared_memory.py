"""Shared host memory for ForkPool: tensors other processes map, registered with CUDA as pinned memory.

Why register: the copy engines move only page-locked memory asynchronously and at full rate. A trunk's
KV in shared memory that CUDA also knows as pinned is written by the source worker's device-to-host
DMA and read by the destination's host-to-device DMA in place: no staging copy on either side.

Why a pool: allocating shared memory faults in every page on first touch, and ``cudaHostRegister``
locks every page; for a 500 MB trunk each costs tens of milliseconds. ``SharedPinnedBuffers`` keeps
released buffers (registered) and hands them out again, so a worker pays that once per buffer size.
"""

from __future__ import annotations

import logging
import threading

import torch

from thaw_rl_kernels.host_transfer import take_fitting

logger = logging.getLogger(__name__)


def shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor allocated straight in shared memory (``share_memory_()`` would copy)."""
    numel = 1
    for n in shape:
        numel *= int(n)
    storage = torch.UntypedStorage._new_shared(max(numel * dtype.itemsize, 1))
    return torch.empty(0, dtype=dtype).set_(storage, 0, tuple(shape))


def register_pinned(tensor: torch.Tensor) -> bool:
    """Page-lock a host tensor's memory for CUDA (asynchronous DMA); undo with ``unregister_pinned``.

    False (and a warning) when CUDA refuses: the memory stays pageable, copies still work, only slower.
    """
    return _cuda_call("cudaHostRegister", tensor.data_ptr(), _nbytes(tensor), 0)


def unregister_pinned(tensor: torch.Tensor) -> None:
    """Undo ``register_pinned`` (before the memory is unmapped)."""
    _cuda_call("cudaHostUnregister", tensor.data_ptr())


class SharedPinnedBuffers:
    """Reusable shared-memory byte buffers, registered with CUDA when ``pin`` (the worker's engine is on CUDA).

    ``acquire(num_bytes)`` returns a free buffer that holds ``num_bytes`` and is at most twice as large,
    or allocates one (rounded up to ``granularity``); ``release`` takes it back, keeping at most
    ``max_idle`` idle buffers (the others are unregistered and dropped: their memory goes when the last
    process that maps them lets go). ``clear`` drops every idle buffer.
    """

    def __init__(self, pin: bool, granularity: int = 1 << 20, max_idle: int = 2) -> None:
        self.pin = pin
        self.granularity = granularity
        self.max_idle = max_idle
        self._idle: list[torch.Tensor] = []  # (size,) uint8, shared
        self._registered: set[int] = set()  # data_ptr of the buffers CUDA accepted
        self._num_lent = 0
        self._lock = threading.Lock()

    def acquire(self, num_bytes: int) -> torch.Tensor:
        """A (size,) uint8 shared buffer with size >= num_bytes; give it back with ``release``."""
        with self._lock:
            size, buffer = take_fitting(self._idle, num_bytes, self.granularity)
            self._num_lent += 1
        if buffer is None:
            buffer = shared_empty((size,), torch.uint8)  # (size,)
            if self.pin and register_pinned(buffer):  # pragma: no cover - CUDA only
                self._registered.add(buffer.data_ptr())
        return buffer

    def release(self, buffer: torch.Tensor) -> None:
        """Take back a buffer from ``acquire`` (every copy into or out of it must be done)."""
        with self._lock:
            if self._num_lent < 1:
                raise RuntimeError("SharedPinnedBuffers.release without a matching acquire")
            self._num_lent -= 1
            self._idle.append(buffer)
            dropped = self._idle[:-self.max_idle] if len(self._idle) > self.max_idle else []
            del self._idle[:len(dropped)]
        for b in dropped:
            self._drop(b)

    def clear(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for b in idle:
            self._drop(b)

    @property
    def num_idle(self) -> int:
        return len(self._idle)

    @property
    def num_lent(self) -> int:
        return self._num_lent

    def _drop(self, buffer: torch.Tensor) -> None:
        if buffer.data_ptr() in self._registered:  # pragma: no cover - CUDA only
            self._registered.discard(buffer.data_ptr())
            unregister_pinned(buffer)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _cuda_call(name: str, *args) -> bool:  # pragma: no cover - CUDA only
    """Call a CUDA runtime function through torch's bindings; False and a warning when it fails."""
    cudart = torch.cuda.cudart()
    result = getattr(cudart, name)(*args)  # a cudaError enum
    code = int(getattr(result, "value", result))
    if code == 0:
        return True
    if hasattr(cudart, "cudaGetLastError"):
        cudart.cudaGetLastError()  # clear it, so a later check does not blame another call
    logger.warning("%s failed with CUDA error %d; the trunk buffer stays pageable (slower copies)", name, code)
    return False
