"""Snapshot KV blocks to pinned host memory and restore them, off the compute stream.

Why: a trunk snapshot is hundreds of MB (2,048 tokens of Llama-3-8B are 256 MiB) and must not stall
decoding. ``KVTransfer`` runs the gather + device-to-host copy on its own CUDA stream, after an
event that marks everything the compute stream has queued so far (so the blocks are complete), and
hands back a ``TransferHandle`` to poll or wait on. Restores run the same way in reverse.

Why a pool: the copy engines only move pinned (page-locked) memory asynchronously, and pinning is
slow (a syscall and page-table work, milliseconds per hundred MB). ``PinnedBufferPool`` pins each
buffer once and hands it out again after ``release``.

Without CUDA the same API runs synchronously over plain host memory, so the engine has one code path.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from thaw_rl_kernels.block_copy import _check_id_values, gather_blocks, scatter_blocks


def take_fitting(idle: list[torch.Tensor], num_bytes: int, granularity: int) -> tuple[int, torch.Tensor | None]:
    """The pools' reuse rule: (the size a new buffer for ``num_bytes`` gets: rounded up to ``granularity``, at
    least one granule; the smallest idle buffer of that size up to twice it, removed from ``idle``, or None).
    The caller holds the pool's lock."""
    size = max(granularity, -(-num_bytes // granularity) * granularity)
    fits = [i for i, b in enumerate(idle) if size <= b.numel() <= 2 * size]
    # by index: list.remove would compare tensors elementwise (== is not identity)
    return size, idle.pop(min(fits, key=lambda i: idle[i].numel())) if fits else None


class PinnedBufferPool:
    """Reusable host byte buffers, pinned when CUDA is available.

    ``acquire(num_bytes)`` returns the smallest free buffer that holds ``num_bytes`` and is at most
    twice as large (so a small request never ties up a huge buffer), or allocates a new one; requests
    are rounded up to ``granularity`` bytes so trunks of similar length share buffers. ``release``
    puts a buffer (or any view of it) back. ``clear`` frees the idle buffers.
    """

    def __init__(self, pin: bool | None = None, granularity: int = 1 << 20) -> None:
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.granularity = granularity
        self._free: list[torch.Tensor] = []  # idle uint8 buffers
        self._lent: dict[int, torch.Tensor] = {}  # storage address -> buffer handed out
        self._lock = threading.Lock()  # ForkPool workers may snapshot from several threads

    def acquire(self, num_bytes: int) -> torch.Tensor:
        """A uint8 tensor of exactly num_bytes (a view of a pooled buffer)."""
        if num_bytes < 0:
            raise ValueError(f"num_bytes must be >= 0; got {num_bytes}.")
        with self._lock:
            size, buffer = take_fitting(self._free, num_bytes, self.granularity)
            if buffer is None:
                buffer = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)  # (size,)
            self._lent[buffer.untyped_storage().data_ptr()] = buffer
        return buffer[:num_bytes]

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous tensor of shape and dtype backed by a pooled buffer."""
        numel = 1
        for size in shape:
            numel *= size
        return self.acquire(numel * dtype.itemsize).view(dtype).view(*shape)

    def release(self, buffer: torch.Tensor) -> None:
        """Return a buffer from acquire/empty (or any view of it) to the pool.

        The caller must be done with it, including any asynchronous copy into it (wait first).
        """
        with self._lock:
            base = self._lent.pop(buffer.untyped_storage().data_ptr(), None)
            if base is None:
                raise ValueError("This buffer was not handed out by this pool, or was released twice.")
            self._free.append(base)

    def clear(self) -> None:
        """Free every idle buffer (lent buffers stay valid)."""
        with self._lock:
            self._free.clear()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_lent(self) -> int:
        return len(self._lent)


class TransferHandle:
    """A transfer in flight: ``done()`` polls, ``wait()`` blocks and returns the result.

    It holds references to every tensor the queued copy touches, so they outlive the copy.
    """

    def __init__(self, result: torch.Tensor | None, event: torch.cuda.Event | None = None, keepalive=()) -> None:
        self.result = result
        self.event = event
        self._keepalive = keepalive

    def done(self) -> bool:
        return self.event is None or self.event.query()

    def wait(self) -> torch.Tensor | None:
        """Block the host until the transfer has finished; the snapshot's host tensor, or None."""
        if self.event is not None:
            self.event.synchronize()
        self._keepalive = ()
        return self.result

    def wait_stream(self, stream: torch.cuda.Stream | None = None) -> None:
        """Make a CUDA stream (default: the current one) wait for the transfer without blocking the host.

        Call it before the compute stream reads restored blocks or overwrites snapshotted ones.
        """
        if self.event is not None:
            (stream or torch.cuda.current_stream()).wait_event(self.event)


class KVTransfer:
    """Asynchronous snapshot (blocks -> pinned host) and restore (host -> blocks) for one device.

    Block ids may be a list of ints or a CPU tensor (validated on the host, no GPU sync: the
    asynchronous path) or a tensor on the cache's device (validated with one GPU sync).
    ``host_path`` picks how the copies cross the bus, "stage" or "direct" (see block_copy.py).
    """

    def __init__(
        self, device: torch.device | str, pool: PinnedBufferPool | None = None, host_path: str | None = None
    ) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        on_cuda = self.device.type == "cuda"
        self.pool = pool if pool is not None else PinnedBufferPool(pin=on_cuda)
        self.host_path = host_path
        self.stream = torch.cuda.Stream(self.device) if on_cuda else None  # the dedicated copy stream

    def snapshot_async(self, kv: torch.Tensor, block_ids, out: torch.Tensor | None = None) -> TransferHandle:
        """Gather kv's blocks into ``out`` or a pooled host tensor [n, L, 2, BS, KVH, D]; wait() returns it.

        ``out`` (optional): where the gather writes, on kv's device or in host memory (pinned or registered
        with CUDA for an asynchronous DMA; e.g. shared memory another process maps). It stays the caller's.
        The blocks must not be overwritten until the handle is done (or ``handle.wait_stream()``).
        Give a pooled host tensor back with ``release`` when it is no longer needed.
        """
        ids, checked = self._host_checked_ids(block_ids, kv, unique=False)
        pooled = out is None
        if pooled:
            out = self.pool.empty((ids.numel(), *kv.shape[:2], *kv.shape[3:]), kv.dtype)  # (n, L, 2, BS, KVH, D)
        try:
            if self.stream is None:
                gather_blocks(kv, ids.to(kv.device), out, check_ids=not checked)
                return TransferHandle(out)

            def work(ids_dev):
                gather_blocks(kv, ids_dev, out, host_path=self.host_path, check_ids=not checked)
                if out.device.type == "cuda":
                    out.record_stream(self.stream)  # device memory the copy writes must outlive it

            event, ids_dev = self._on_copy_stream(kv, ids, work)
        except Exception:
            if pooled:
                self.pool.release(out)  # a rejected request must not leak its buffer
            raise
        return TransferHandle(out, event, keepalive=(kv, ids, ids_dev))

    def restore_async(self, host_buffer: torch.Tensor, kv: torch.Tensor, block_ids) -> TransferHandle:
        """Scatter host_buffer [n, L, 2, BS, KVH, D] into kv's blocks; wait() returns None.

        Call ``handle.wait()`` or ``handle.wait_stream()`` before the compute stream reads the blocks.
        """
        ids, checked = self._host_checked_ids(block_ids, kv, unique=True)
        if self.stream is None:
            scatter_blocks(host_buffer, kv, ids.to(kv.device), check_ids=not checked)
            return TransferHandle(None)
        host_path = self.host_path if host_buffer.is_pinned() else "stage"  # the GPU maps only pinned pages

        def work(ids_dev):
            scatter_blocks(host_buffer, kv, ids_dev, host_path=host_path, check_ids=not checked)

        event, ids_dev = self._on_copy_stream(kv, ids, work)
        return TransferHandle(None, event, keepalive=(host_buffer, kv, ids, ids_dev))

    def release(self, host_buffer: torch.Tensor) -> None:
        """Give a snapshot's host tensor back to the pool (after its handle is done)."""
        self.pool.release(host_buffer)

    def _host_checked_ids(self, block_ids, kv: torch.Tensor, unique: bool) -> tuple[torch.Tensor, bool]:
        """(ids, checked): host ids are validated here, without touching the GPU; device ids are not."""
        if kv.device != self.device:
            raise ValueError(
                f"This KVTransfer serves {self.device} but the cache is on {kv.device}; make one per device."
            )
        if isinstance(block_ids, torch.Tensor) and block_ids.device.type != "cpu":
            return block_ids, False
        ids = torch.as_tensor(block_ids, dtype=torch.int64)  # (n,)
        if ids.dim() != 1:
            raise ValueError(f"block_ids must be a flat list of block ids; got shape {tuple(ids.shape)}.")
        if ids.numel():
            _check_id_values([("block_ids", ids, kv.shape[2], unique)])
        return ids, True

    def _on_copy_stream(self, kv: torch.Tensor, ids: torch.Tensor, work) -> tuple[torch.cuda.Event, torch.Tensor]:
        """Run work(ids_on_device) on the copy stream after the compute stream's queued work."""
        compute_done = torch.cuda.Event()
        compute_done.record(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            if ids.device.type == "cpu":  # pinned so the tiny H2D does not block on the copy stream
                ids = ids.pin_memory()
            ids_dev = ids.to(self.device, non_blocking=True)
            self.stream.wait_event(compute_done)
            work(ids_dev)
            kv.record_stream(self.stream)  # device memory the copy touches must outlive it
            ids_dev.record_stream(self.stream)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done, ids_dev
