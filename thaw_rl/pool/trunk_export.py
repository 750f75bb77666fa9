"""TrunkExport: a trunk's snapshot on its way from the worker that holds it to the workers that restore it.

Why: a cross-worker fork used to copy the trunk's KV three times (device -> pinned host, pinned host ->
shared memory, shared memory -> device). Two transports now move it once each way:

- ``"host"``: the source worker allocates the shared-memory buffer first (registered with CUDA as pinned
  memory when its engine is on CUDA) and its snapshot gather/DMA writes straight into it; the pipes carry
  a handle to it (a file descriptor); the destination maps it, registers it when it is on CUDA, and its
  restore reads it with one DMA.
- ``"device"``: both workers are on CUDA. The source gathers the blocks into a device tensor and keeps it;
  each destination gets its own pickled CUDA IPC handle of it (``ForkingPickler``: torch counts one
  consumer per pickle), opens it, copies it peer-to-peer (NVLink) to its own GPU when the GPUs differ, and
  scatters. The parent never unpickles these handles, so it never touches CUDA.

The source keeps an export's buffer until the pool says ``release_trunk`` (the parent drops the export when
the trunk's tokens change, the trunk is freed or the weights change), so a destination never reads freed
memory. A destination that dies holding an unopened IPC handle leaves torch's count of that handle's
consumer open: the source's buffer then stays allocated (in torch's IPC limbo) until the source exits. ``"auto"`` picks ``"device"`` when the source and every destination are CUDA devices, else
``"host"``. A pool of CPU workers may force ``"device"``: its "device" buffer is host memory, which the
same pickled handles share through shared memory; that runs the device path's protocol (one handle per
destination, more on request, kept until released) where there is no GPU, e.g. in the tests.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing  # noqa: F401 (registers the CUDA IPC and shared-memory tensor reductions)

from thaw_rl.engine.snapshot import KVSnapshot
from thaw_rl.pool.shared_memory import SharedPinnedBuffers, register_pinned, unregister_pinned

TRUNK_TRANSPORTS = ("auto", "host", "device")
TRANSPORTS = ("host", "device")  # what "auto" resolves to


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

    ``fields`` are the ``KVSnapshot``'s fields but ``kv``. ``kv`` is the shared-memory tensor ("host"); for
    "device", ``payloads`` hold pickled CUDA IPC handles, one per destination still to be served.
    """

    export_id: int
    transport: str
    fields: dict
    nbytes: int
    kv: torch.Tensor | None = None  # (n_blocks, L, 2, BS, KVH, D) host, shared memory
    payloads: list[bytes] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.fields["token_ids"])

    def for_destination(self) -> TrunkExport:
        """The parent's copy for one destination: "device" hands over one IPC handle, used once."""
        if self.transport == "host":
            return self
        if not self.payloads:
            raise RuntimeError(f"trunk export {self.export_id} has no CUDA IPC handle left for another destination")
        return dataclasses.replace(self, payloads=[self.payloads.pop()])


class TrunkImport:
    """A destination's view of a ``TrunkExport``: the ``KVSnapshot`` to restore, readable from its device.

    ``seconds`` is what making it readable took (mapping and registering, or opening the IPC handle and the
    peer copy). Call ``close()`` once the restore has finished: it unregisters and lets go of the memory.
    """

    def __init__(self, export: TrunkExport, device: torch.device) -> None:
        start = time.perf_counter()
        self._registered: torch.Tensor | None = None
        self._opened: torch.Tensor | None = None  # the source's device buffer, open until close()
        kv = export.kv
        if export.transport == "host" and device.type == "cuda":  # pragma: no cover - CUDA only
            self._registered = kv if register_pinned(kv) else None
        elif export.transport == "device":
            (payload,) = export.payloads
            kv = self._opened = ForkingPickler.loads(payload)  # opens the IPC handle (on the source's GPU)
            if kv.device != device:  # pragma: no cover - two GPUs only
                kv = kv.to(device, non_blocking=True)  # peer-to-peer (NVLink)
                torch.cuda.synchronize(device)  # so ``seconds`` holds the peer copy (the restore waits for it anyway)
        try:
            self.snapshot = KVSnapshot(**export.fields, kv=kv)
        except BaseException:
            self.close()
            raise
        self.nbytes = export.nbytes
        self.seconds = time.perf_counter() - start

    def close(self) -> None:
        """After the restore has finished (``ThawEngine.restore`` waits for its copies): let go of the memory."""
        if self._registered is not None:  # pragma: no cover - CUDA only
            unregister_pinned(self._registered)
            self._registered = None
        self._opened = None  # closes the IPC handle: the source's counter drops, its buffer can go on release
        self.snapshot = None


class TrunkExports:
    """The trunks one worker exported, each kept (its shared or device buffer) until ``release``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.host_buffers = SharedPinnedBuffers(pin=device.type == "cuda")
        self._held: dict[int, tuple[str, torch.Tensor]] = {}  # export id -> (transport, buffer)
        self._ids = itertools.count(1)

    def export(self, engine, session, transport: str, num_destinations: int) -> TrunkExport:
        """Snapshot ``session`` straight into a buffer the destinations can read; keep it until ``release``."""
        if transport not in TRANSPORTS:
            raise ValueError(f"transport={transport!r}: use one of {TRANSPORTS}.")
        shape, dtype = engine.snapshot_shape(session), engine.kv_cache.kv.dtype
        if transport == "device":
            buffer = out = torch.empty(shape, dtype=dtype, device=self.device)  # (n_blocks, L, 2, BS, KVH, D)
        else:
            buffer = self.host_buffers.acquire(_numel(shape) * dtype.itemsize)  # (size,) uint8
            out = buffer[:_numel(shape) * dtype.itemsize].view(dtype).view(shape)  # (n_blocks, L, 2, BS, KVH, D)
        try:
            snap = engine.snapshot(session, out=out)
        except BaseException:
            if transport == "host":
                self.host_buffers.release(buffer)
            raise
        export_id = next(self._ids)
        self._held[export_id] = (transport, buffer)
        fields = {f.name: getattr(snap, f.name) for f in dataclasses.fields(KVSnapshot)
                  if f.init and f.name != "kv" and not f.name.startswith("_")}
        export = TrunkExport(export_id, transport, fields, snap.nbytes)
        if transport == "host":
            export.kv = out
        else:
            export.payloads = self.share(export_id, num_destinations)
        return export

    def share(self, export_id: int, n: int) -> list[bytes]:
        """n more pickled CUDA IPC handles of a "device" export (one per destination; each is opened once)."""
        transport, buffer = self._get(export_id)
        if transport != "device":
            raise RuntimeError(f"trunk export {export_id} is a {transport} export; only device exports share handles")
        return [bytes(ForkingPickler.dumps(buffer)) for _ in range(n)]

    def release(self, export_id: int) -> None:
        """The pool is done with this export (unknown ids: already released, or from a previous process)."""
        held = self._held.pop(export_id, None)
        if held is not None and held[0] == "host":
            self.host_buffers.release(held[1])

    @property
    def num_held(self) -> int:
        return len(self._held)

    def _get(self, export_id: int) -> tuple[str, torch.Tensor]:
        held = self._held.get(export_id)
        if held is None:
            raise RuntimeError(f"this worker holds no trunk export {export_id} (released already)")
        return held


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
