"""TrunkExport: a trunk's snapshot on its way from the worker that holds it to the workers that restore it.

Why: a cross-worker fork used to copy the trunk's KV three times (device -> pinned host, pinned host ->
shared memory, shared memory -> device). Two transports now move it once each way:

- ``"host"``: the source worker allocates the shared-memory buffer first (registered with CUDA as pinned
  memory when its engine is on CUDA) and its snapshot gather/DMA writes straight into it; the pipes carry
  a handle to it (a file descriptor); the destination maps it, registers it when it is on CUDA, and its
  restore reads it with one DMA.
- ``"device"``: both workers are on CUDA. The source gathers the blocks (and copies the fp32 next-token
  logits) into one of its export buffers (``ExportBuffers``): device buffers it keeps and reuses, so each
  costs one ``cudaMalloc`` and each destination opens each buffer's CUDA IPC handle once
  (``OpenedBuffers``: ``cudaIpcOpenMemHandle`` takes milliseconds and maps memory; a fresh buffer per fork
  also cannot return to torch's caching allocator while it is shared). The pipe message says which buffer
  (the source process's ``owner`` token and a buffer id) and where in it the KV lies; it carries a pickled
  handle (``ForkingPickler``: torch counts one consumer per pickle) only for a destination that has not
  opened that buffer yet. On the same GPU the restore scatters straight from the opened buffer; across GPUs
  the destination copies it peer-to-peer (NVLink) first. The parent never unpickles the handles, so it
  never touches CUDA.

Lifetime: an export holds its buffer until the pool says ``release_trunk`` (the parent drops the export when
the trunk's tokens change, the trunk is freed or the weights change, always after every destination's
restore has replied), so a buffer is never overwritten while a destination may still read it; only then
does it go back to the idle buffers for the next export. A destination synchronizes its device before it
replies, so no read of the source's buffer is still queued when the source may reuse it. A buffer the source
drops (one idle buffer too many) is reported as ``retired`` with its next export, and the parent tells the
destinations to close it; when a source worker is replaced, the parent tells the others to close every
buffer of its ``owner``. A handle pickled for a destination that died before opening it leaves torch's count
of that consumer open: that buffer, once dropped, stays allocated (in torch's IPC limbo) until the source
exits.

``"auto"`` picks ``"device"`` when the source and every destination are CUDA devices, else ``"host"``. A pool
of CPU workers may force ``"device"``: its export buffers are shared host memory, which the same pickled
handles share; that runs the device path's protocol (buffers reused, each opened once per destination,
closed when retired or when their owner is replaced) where there is no GPU, e.g. in the tests.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import secrets
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing  # noqa: F401 (registers the CUDA IPC and shared-memory tensor reductions)

from thaw_rl.engine.snapshot import KVSnapshot
from thaw_rl.pool.shared_memory import SharedPinnedBuffers, register_pinned, shared_empty, unregister_pinned
from thaw_rl_kernels.host_transfer import take_fitting

TRUNK_TRANSPORTS = ("auto", "host", "device")
TRANSPORTS = ("host", "device")  # what "auto" resolves to
DEVICE_BUFFER_GRANULARITY = 2 << 20  # CUDA's caching allocator rounds large blocks to 2 MiB
_ALIGN = 256  # byte alignment of the logits after the KV in an export buffer (any dtype can view it)


def check_trunk_transport(setting: str, devices: list[str]) -> None:
    """ValueError unless ``setting`` is a transport the pool's devices can use."""
    if setting not in TRUNK_TRANSPORTS:
        raise ValueError(f"trunk_transport={setting!r}: use one of {TRUNK_TRANSPORTS}.")
    kinds = sorted({torch.device(d).type for d in devices})
    if setting == "device" and len(kinds) > 1:
        raise ValueError(f"trunk_transport='device' needs every worker on one kind of device, but they are on "
                         f"{kinds}; use 'auto' (device between CUDA workers, shared memory otherwise) or 'host'.")


def pick_transport(setting: str, source_device: str, destination_devices: list[str]) -> str:
    """The transport for moving a trunk from ``source_device`` to each of ``destination_devices``."""
    if setting != "auto":
        return setting
    on_cuda = all(torch.device(d).type == "cuda" for d in [source_device, *destination_devices])
    return "device" if on_cuda else "host"


@dataclass
class TrunkExport:
    """What the pipes carry for one exported trunk (the KV itself stays in shared or device memory).

    ``fields`` are the ``KVSnapshot``'s fields but ``kv`` ("device": and ``next_logits``, which lie in the
    buffer too). ``kv`` is the shared-memory tensor ("host"). "device": the KV lies in the source's buffer
    ``(owner, buffer_id)`` at byte ``kv_offset``; ``payloads`` hold pickled IPC handles of that buffer for
    the destinations (worker index -> handle) that have not opened it yet. ``timings``: the source's seconds
    (alloc, gather, share) and counts (allocs, handles) of this export.
    """

    export_id: int
    transport: str
    fields: dict
    nbytes: int
    kv: torch.Tensor | None = None  # (n_blocks, L, 2, BS, KVH, D) host, shared memory
    owner: str = ""  # the source process's export-buffer namespace: a new one in every worker process
    buffer_id: int = 0
    kv_offset: int = 0
    kv_shape: tuple[int, ...] = ()
    kv_dtype: torch.dtype | None = None
    logits_offset: int | None = None  # byte offset of next_logits (V,) float32 in the buffer; None: no logits
    payloads: dict[int, bytes] = field(default_factory=dict)
    retired: list[int] = field(default_factory=list)  # the owner's buffer ids dropped since its last export
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.fields["token_ids"])

    @property
    def buffer_key(self) -> tuple[str, int]:
        return self.owner, self.buffer_id

    def for_destination(self, destination: int) -> TrunkExport:
        """The parent's copy for one destination: "device" carries the buffer's handle made for it, if any
        (a destination that has the buffer open already gets none; each handle is used once)."""
        if self.transport == "host":
            return self
        payload = self.payloads.pop(destination, None)
        return dataclasses.replace(self, payloads={} if payload is None else {destination: payload}, retired=[])


class ExportBuffers:
    """A worker's buffers for "device" exports, kept and reused so a destination opens each one once.

    ``acquire(num_bytes)`` lends an idle buffer that holds ``num_bytes`` and is at most twice as large (the
    pools' rule, ``take_fitting``), or allocates one (rounded up to ``granularity``); ``release`` takes it
    back. At most ``max_idle`` idle buffers are kept: the oldest others are dropped and listed by
    ``take_retired`` (the destinations must close them). Buffers are device memory on CUDA, shared host
    memory elsewhere; the rest go when the worker process exits. ``owner`` names this process's buffers;
    buffer ids are never reused.
    """

    def __init__(self, device: torch.device, granularity: int = DEVICE_BUFFER_GRANULARITY, max_idle: int = 2) -> None:
        self.device = device
        self.granularity = granularity
        self.max_idle = max_idle
        self.owner = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.num_allocs = 0
        self._buffers: dict[int, torch.Tensor] = {}  # buffer id -> (size,) uint8, lent or idle
        self._ids_by_ptr: dict[int, int] = {}  # data_ptr -> buffer id
        self._idle: list[torch.Tensor] = []  # oldest first
        self._retired: list[int] = []
        self._ids = itertools.count(1)

    def acquire(self, num_bytes: int) -> tuple[int, torch.Tensor]:
        """(buffer id, a (size,) uint8 buffer with size >= num_bytes); give it back with ``release``."""
        size, buffer = take_fitting(self._idle, num_bytes, self.granularity)
        if buffer is not None:
            return self._ids_by_ptr[buffer.data_ptr()], buffer
        if self.device.type == "cuda":  # pragma: no cover - CUDA only
            buffer = torch.empty(size, dtype=torch.uint8, device=self.device)  # (size,)
        else:
            buffer = shared_empty((size,), torch.uint8)  # (size,) shared from the start: its address never moves
        buffer_id = next(self._ids)
        self._buffers[buffer_id] = buffer
        self._ids_by_ptr[buffer.data_ptr()] = buffer_id
        self.num_allocs += 1
        return buffer_id, buffer

    def release(self, buffer_id: int) -> None:
        """Take a lent buffer back (every destination is done reading it); drop the oldest idle ones past max_idle."""
        buffer = self._buffers.get(buffer_id)
        if buffer is None or any(b is buffer for b in self._idle):
            raise RuntimeError(f"export buffer {buffer_id} is not lent (released twice, or never acquired)")
        self._idle.append(buffer)
        while len(self._idle) > self.max_idle:
            self._drop(self._idle.pop(0))

    def share(self, buffer_id: int) -> bytes:
        """A pickled handle of the buffer for one destination (CUDA IPC on CUDA, a shared-memory fd on the CPU)."""
        return bytes(ForkingPickler.dumps(self._buffers[buffer_id]))

    def take_retired(self) -> list[int]:
        """The ids of buffers dropped since the last call (their destinations should close them)."""
        retired, self._retired = self._retired, []
        return retired

    def clear(self) -> None:
        """Drop every idle buffer (lent ones stay until released)."""
        while self._idle:
            self._drop(self._idle.pop(0))

    @property
    def num_buffers(self) -> int:
        return len(self._buffers)

    @property
    def num_idle(self) -> int:
        return len(self._idle)

    def _drop(self, buffer: torch.Tensor) -> None:
        buffer_id = self._ids_by_ptr.pop(buffer.data_ptr())
        del self._buffers[buffer_id]
        self._retired.append(buffer_id)


class OpenedBuffers:
    """A destination's open handles of other workers' export buffers, by ``(owner, buffer id)``: each is opened
    once (from the first handle that comes with an export) and kept until the pool says ``drop``."""

    def __init__(self) -> None:
        self._opened: dict[tuple[str, int], torch.Tensor] = {}  # (size,) uint8, the source's memory
        self.num_opens = 0
        self.num_reuses = 0

    def buffer(self, export: TrunkExport) -> tuple[torch.Tensor, bool]:
        """(the export's buffer, whether it was opened now). A handle that comes along is always unpickled (torch's
        consumer count of it must be consumed; for a buffer open already, torch returns the open one)."""
        key = export.buffer_key
        if export.payloads:
            (payload,) = export.payloads.values()
            self._opened[key] = ForkingPickler.loads(payload)  # opens the IPC handle (on the source's GPU)
            self.num_opens += 1
            return self._opened[key], True
        opened = self._opened.get(key)
        if opened is None:
            raise RuntimeError(f"trunk export {export.export_id} is in buffer {key} of its source, which this worker "
                               f"(pid {os.getpid()}) has not opened, and it came without a handle")
        self.num_reuses += 1
        return opened, False

    def drop(self, owner: str, buffer_ids: Iterable[int] | None = None) -> None:
        """Close ``owner``'s buffers ``buffer_ids`` (None: all): retired by the source, or its process is gone."""
        keys = [k for k in self._opened if k[0] == owner] if buffer_ids is None else [(owner, b) for b in buffer_ids]
        for key in keys:
            self._opened.pop(key, None)  # the last reference: torch closes the IPC handle

    def keys(self) -> list[tuple[str, int]]:
        return list(self._opened)


class TrunkImport:
    """A destination's view of a ``TrunkExport``: the ``KVSnapshot`` to restore, readable from its device.

    ``seconds`` is what making it readable took: ``open_seconds`` (mapping and registering the shared memory,
    or opening the IPC handle when the buffer is not open yet) plus ``copy_seconds`` (the peer copy when the
    source's GPU is another). Call ``close()`` once the restore has finished.
    """

    def __init__(self, export: TrunkExport, device: torch.device, opened: OpenedBuffers | None = None) -> None:
        start = time.perf_counter()
        self._registered: torch.Tensor | None = None
        self._device = device
        self._reads_source_device = False  # a restore reads the source's device buffer in place: sync in close()
        self.opened_now = False
        self.copy_seconds = 0.0
        kv, fields = export.kv, export.fields
        if export.transport == "host" and device.type == "cuda":  # pragma: no cover - CUDA only
            self._registered = kv if register_pinned(kv) else None
        elif export.transport == "device":
            if opened is None:
                raise ValueError("a device trunk export needs the destination's OpenedBuffers (opened=...).")
            buffer, self.opened_now = opened.buffer(export)
            kv = _view(buffer, export.kv_offset, export.kv_dtype, export.kv_shape)  # (n_blocks, L, 2, BS, KVH, D)
            logits = None
            if export.logits_offset is not None:
                vocab = int(fields["fingerprint"]["vocab_size"])
                logits = _view(buffer, export.logits_offset, torch.float32, (vocab,))  # (V,)
            opened_at = time.perf_counter()
            if buffer.device != device:  # pragma: no cover - two GPUs only
                kv = kv.to(device, non_blocking=True)  # peer-to-peer (NVLink)
                logits = None if logits is None else logits.to(device, non_blocking=True)
                torch.cuda.synchronize(device)  # so ``copy_seconds`` holds the peer copy (the restore waits for it)
            else:
                self._reads_source_device = buffer.device.type == "cuda"
            self.copy_seconds = time.perf_counter() - opened_at
            fields = {**fields, "next_logits": logits}
        try:
            self.snapshot = KVSnapshot(**fields, kv=kv)
        except BaseException:
            self.close()
            raise
        self.nbytes = export.nbytes
        self.seconds = time.perf_counter() - start
        self.open_seconds = self.seconds - self.copy_seconds

    def close(self) -> None:
        """After the restore has finished (``ThawEngine.restore`` waits for its copies): let go of the memory, and
        wait for any read of the source's buffer still queued here (the logits' copy) before the source may reuse it."""
        if self._registered is not None:  # pragma: no cover - CUDA only
            unregister_pinned(self._registered)
            self._registered = None
        if self._reads_source_device:  # pragma: no cover - CUDA only
            torch.cuda.synchronize(self._device)
            self._reads_source_device = False
        self.snapshot = None


class TrunkExports:
    """The trunks one worker exported, each kept (its shared or device buffer) until ``release``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.host_buffers = SharedPinnedBuffers(pin=device.type == "cuda")
        self.device_buffers = ExportBuffers(device)
        self._held: dict[int, tuple[str, object]] = {}  # export id -> (transport, host buffer or device buffer id)
        self._ids = itertools.count(1)

    @property
    def owner(self) -> str:
        return self.device_buffers.owner

    def export(self, engine, session, transport: str,
               opened_by: dict[int, Collection[int]] | None = None) -> TrunkExport:
        """Snapshot ``session`` straight into a buffer the destinations can read; keep it until ``release``.

        ``opened_by`` ("device"): destination -> the ids of this worker's buffers it has open; the export
        carries a handle of its buffer for each destination that lacks it.
        """
        if transport not in TRANSPORTS:
            raise ValueError(f"transport={transport!r}: use one of {TRANSPORTS}.")
        if transport == "device":
            return self._export_device(engine, session, opened_by or {})
        start = time.perf_counter()
        shape, dtype = engine.snapshot_shape(session), engine.kv_cache.kv.dtype
        num_bytes = _numel(shape) * dtype.itemsize
        num_idle = self.host_buffers.num_idle
        buffer = self.host_buffers.acquire(num_bytes)  # (size,) uint8
        out = buffer[:num_bytes].view(dtype).view(shape)  # (n_blocks, L, 2, BS, KVH, D)
        allocated = time.perf_counter()
        try:
            snap = engine.snapshot(session, out=out)
        except BaseException:
            self.host_buffers.release(buffer)
            raise
        export = TrunkExport(next(self._ids), "host", _fields(snap), snap.nbytes, kv=out)
        self._held[export.export_id] = ("host", buffer)
        export.timings = _timings(start, allocated, time.perf_counter(), time.perf_counter(),
                                  num_allocs=int(self.host_buffers.num_idle == num_idle), num_handles=0)
        return export

    def _export_device(self, engine, session, opened_by: dict[int, Collection[int]]) -> TrunkExport:
        start = time.perf_counter()
        shape, dtype = engine.snapshot_shape(session), engine.kv_cache.kv.dtype
        kv_bytes = _numel(shape) * dtype.itemsize
        logits_offset = -(-kv_bytes // _ALIGN) * _ALIGN
        vocab = int(engine.fingerprint["vocab_size"])
        num_allocs = self.device_buffers.num_allocs
        buffer_id, buffer = self.device_buffers.acquire(logits_offset + 4 * vocab)  # room for fp32 logits too
        allocated = time.perf_counter()
        try:
            snap = engine.snapshot(session, out=_view(buffer, 0, dtype, shape))  # waits for the gather
            if snap.next_logits is None:
                logits_offset = None
            else:
                _view(buffer, logits_offset, torch.float32, (vocab,)).copy_(snap.next_logits)  # synchronous
            gathered = time.perf_counter()
            payloads = {d: self.device_buffers.share(buffer_id) for d, ids in opened_by.items() if buffer_id not in ids}
        except BaseException:
            self.device_buffers.release(buffer_id)
            raise
        export = TrunkExport(next(self._ids), "device", {**_fields(snap), "next_logits": None}, snap.nbytes,
                             owner=self.owner, buffer_id=buffer_id, kv_shape=tuple(shape), kv_dtype=dtype,
                             logits_offset=logits_offset, payloads=payloads,
                             retired=self.device_buffers.take_retired())
        self._held[export.export_id] = ("device", buffer_id)
        export.timings = _timings(start, allocated, gathered, time.perf_counter(),
                                  num_allocs=self.device_buffers.num_allocs - num_allocs, num_handles=len(payloads))
        return export

    def share(self, export_id: int, destinations: Iterable[int]) -> dict[int, bytes]:
        """A pickled handle of a "device" export's buffer for each destination (each is opened once)."""
        transport, buffer_id = self._get(export_id)
        if transport != "device":
            raise RuntimeError(f"trunk export {export_id} is a {transport} export; only device exports share handles")
        return {d: self.device_buffers.share(buffer_id) for d in destinations}

    def release(self, export_id: int) -> None:
        """The pool is done with this export (unknown ids: already released, or from a previous process)."""
        held = self._held.pop(export_id, None)
        if held is None:
            return
        transport, buffer = held
        if transport == "host":
            self.host_buffers.release(buffer)
        else:
            self.device_buffers.release(buffer)

    @property
    def num_held(self) -> int:
        return len(self._held)

    def _get(self, export_id: int) -> tuple[str, object]:
        held = self._held.get(export_id)
        if held is None:
            raise RuntimeError(f"this worker holds no trunk export {export_id} (released already)")
        return held


def _fields(snap: KVSnapshot) -> dict:
    """The snapshot's init fields but ``kv`` (what the pipes carry beside the buffer)."""
    return {f.name: getattr(snap, f.name) for f in dataclasses.fields(KVSnapshot)
            if f.init and f.name != "kv" and not f.name.startswith("_")}


def _timings(start: float, allocated: float, gathered: float, shared: float, **counts: int) -> dict[str, float]:
    return {"alloc_seconds": allocated - start, "gather_seconds": gathered - allocated,
            "share_seconds": shared - gathered, **counts}


def _view(buffer: torch.Tensor, offset: int, dtype: torch.dtype, shape) -> torch.Tensor:
    """The contiguous ``dtype`` tensor of ``shape`` at byte ``offset`` of a (size,) uint8 buffer."""
    return buffer[offset:offset + _numel(shape) * dtype.itemsize].view(dtype).view(tuple(shape))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
