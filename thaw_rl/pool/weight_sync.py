"""Weights to ForkPool workers through torch.distributed: packed buckets over a group of our own.

Why a collective and not shared memory: a trainer on a GPU and workers on other GPUs move weights at link
rate with NCCL (gloo on CPU) and without a host copy of the whole model per step. Why our own group: the
trainer may already be one rank of accelerate's default group; a ``ProcessGroupGloo``/``ProcessGroupNCCL``
built straight on a ``TCPStore`` (127.0.0.1, a free port the parent binds) needs no ``init_process_group``
and leaves the default group alone (as TRL's vLLM client does with its stateless group).

Why buckets: one collective per tensor costs a launch and a rendezvous per tensor (hundreds per model);
``plan_buckets`` packs consecutive parameters into byte buffers of about ``bucket_bytes`` each, every
tensor at a 64-byte aligned offset so any dtype can view it, and one broadcast moves one bucket.

Every member of a group holds the same ``WeightLayout`` (the parent sends it with the request); the root
packs from its tensors, the others unpack into their parameters after the last bucket arrived, so a
failure mid-transfer never leaves half-loaded weights behind.

Why CUDA IPC when every worker shares the trainer's GPU: NCCL needs one GPU per rank, and gloo moves the
weights through host memory twice. ``pack_buckets`` packs the same layout into device buffers the trainer
keeps (and reuses for the next update of the same layout); ``share_buckets`` pickles one CUDA IPC handle
of them per worker (``ForkingPickler``: torch counts one consumer per pickle, as trunk exports do); the
worker opens every bucket, copies them into its parameters and lets go before it replies, so the trainer
may repack once every worker answered. CPU tensors take the same path through shared host memory (the
tests run the protocol that way).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Callable, Mapping

import torch
import torch.multiprocessing  # noqa: F401 (registers the CUDA IPC and shared-memory tensor reductions)

DEFAULT_BUCKET_BYTES = 256 << 20


@dataclass(frozen=True)
class WeightEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # bytes into its bucket

    @property
    def nbytes(self) -> int:
        numel = 1
        for n in self.shape:
            numel *= n
        return numel * self.dtype.itemsize


@dataclass(frozen=True)
class WeightLayout:
    """Which parameter lives where in which bucket (the same on every member of a transfer)."""

    buckets: tuple[tuple[WeightEntry, ...], ...]
    bucket_nbytes: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return sum(self.bucket_nbytes)

    @property
    def names(self) -> list[str]:
        return [e.name for bucket in self.buckets for e in bucket]


def plan_buckets(shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> WeightLayout:
    """Pack ``name -> (shape, dtype)`` in order into buckets of at most ``bucket_bytes`` (a bigger tensor alone)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes={bucket_bytes} must be >= 1.")
    buckets, sizes, current, offset = [], [], [], 0
    for name, (shape, dtype) in shapes.items():
        entry = WeightEntry(name, dtype, tuple(int(n) for n in shape), 0)
        size = -(-entry.nbytes // 64) * 64
        if current and offset + size > bucket_bytes:
            buckets.append(tuple(current))
            sizes.append(offset)
            current, offset = [], 0
        current.append(WeightEntry(entry.name, entry.dtype, entry.shape, offset))
        offset += size
    if current:
        buckets.append(tuple(current))
        sizes.append(offset)
    return WeightLayout(tuple(buckets), tuple(sizes))


def _view(buffer: torch.Tensor, entry: WeightEntry) -> torch.Tensor:
    return buffer[entry.offset:entry.offset + entry.nbytes].view(entry.dtype).view(entry.shape)


@dataclass(frozen=True)
class GroupSpec:
    """How a member joins a transfer group: the parent's store, its rank, the group's size and backend."""

    group_id: int
    host: str
    port: int
    rank: int
    world_size: int
    backend: str  # "gloo" or "nccl"
    timeout_s: float

    def for_rank(self, rank: int) -> GroupSpec:
        return GroupSpec(self.group_id, self.host, self.port, rank, self.world_size, self.backend, self.timeout_s)


def new_store(timeout_s: float):
    """A TCPStore the parent hosts on 127.0.0.1 at a free port (the OS picks it)."""
    from torch.distributed import TCPStore

    return TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                    timeout=datetime.timedelta(seconds=timeout_s))


class TransferGroup:
    """One member's end of a group: a gloo or NCCL process group on its own store (no default group)."""

    def __init__(self, spec: GroupSpec, device: torch.device, store=None) -> None:
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=spec.timeout_s)
        if store is None:
            store = dist.TCPStore(spec.host, spec.port, is_master=False, timeout=timeout)
        self.spec, self.store = spec, store
        prefixed = dist.PrefixStore(f"thaw-weights-{spec.group_id}", store)
        if spec.backend == "nccl":
            self.device = device
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(prefixed, spec.rank, spec.world_size, options)
        elif spec.backend == "gloo":
            self.device = torch.device("cpu")
            self.pg = dist.ProcessGroupGloo(prefixed, spec.rank, spec.world_size, timeout)
        else:
            raise ValueError(f"backend={spec.backend!r}: use 'gloo' or 'nccl'.")

    def close(self) -> None:
        """Tear this end down. An NCCL group left alive makes the process hang at exit (seen on two H200s:
        the pool's parent never exited after its last push), so the pool closes its ends on close."""
        pg, self.pg = self.pg, None
        if pg is None or self.spec.backend != "nccl":
            return
        for name in ("shutdown", "abort"):
            fn = getattr(pg, name, None)
            if fn is None:
                continue
            try:
                fn()
                return
            except Exception:  # noqa: BLE001 (teardown: try the harder way, then give up quietly)
                continue

    def broadcast(self, buffer: torch.Tensor, root: int):
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = root
        return self.pg.broadcast([buffer], opts)


def _pack_bucket(buffer: torch.Tensor, bucket, tensors: Mapping[str, torch.Tensor], non_blocking: bool) -> None:
    """Copy one bucket's tensors into its byte buffer at their layout offsets."""
    with torch.no_grad():
        for entry in bucket:
            _view(buffer, entry).copy_(tensors[entry.name].detach(), non_blocking=non_blocking)


def _assign_all(layout: WeightLayout, buffers: list[torch.Tensor], assign: Callable[[str, torch.Tensor], None]) -> None:
    """``assign(name, tensor)`` every parameter, read from the buckets' byte buffers."""
    with torch.no_grad():
        for bucket, buffer in zip(layout.buckets, buffers):
            for entry in bucket:
                assign(entry.name, _view(buffer, entry))


def send_weights(group: TransferGroup, layout: WeightLayout, tensors: Mapping[str, torch.Tensor]) -> int:
    """Root: pack each bucket and broadcast it (the next bucket is packed while one is in flight); bytes sent."""
    in_flight = None
    for bucket, nbytes in zip(layout.buckets, layout.bucket_nbytes):
        buffer = torch.empty(nbytes, dtype=torch.uint8, device=group.device)  # (nbytes,)
        on_cuda = group.device.type == "cuda"
        _pack_bucket(buffer, bucket, tensors, non_blocking=on_cuda)
        if on_cuda:  # NCCL runs on its own stream: the packing copies must be done first
            torch.cuda.current_stream(group.device).synchronize()
        work = group.broadcast(buffer, group.spec.rank)
        if in_flight is not None:
            in_flight.wait()
        in_flight = work
    if in_flight is not None:
        in_flight.wait()
    return layout.nbytes


def receive_weights(group: TransferGroup, layout: WeightLayout, root: int,
                    assign: Callable[[str, torch.Tensor], None]) -> int:
    """Non-root: receive every bucket, then ``assign(name, tensor)`` each parameter; bytes received."""
    buffers = []
    for nbytes in layout.bucket_nbytes:
        buffer = torch.empty(nbytes, dtype=torch.uint8, device=group.device)  # (nbytes,)
        group.broadcast(buffer, root).wait()
        buffers.append(buffer)
    _assign_all(layout, buffers, assign)
    if group.device.type == "cuda":  # NCCL's wait only orders streams: return when the weights are in place, so
        torch.cuda.synchronize(group.device)  # the reply (and update_weights' wall time) means they arrived
    return layout.nbytes


def pack_buckets(layout: WeightLayout, tensors: Mapping[str, torch.Tensor], device: torch.device,
                 buffers: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Pack ``tensors`` into one byte buffer per bucket on ``device`` (``buffers`` reused when they fit).

    Returns when the copies are done (CUDA: synchronized), so a handle of the buffers reads the new weights.
    """
    device = torch.device(device)
    if buffers is None or [b.numel() for b in buffers] != list(layout.bucket_nbytes) or \
            any(b.device != device for b in buffers):
        buffers = [torch.empty(n, dtype=torch.uint8, device=device) for n in layout.bucket_nbytes]  # (nbytes,)
    on_cuda = device.type == "cuda"
    for bucket, buffer in zip(layout.buckets, buffers):
        _pack_bucket(buffer, bucket, tensors, non_blocking=on_cuda)
    if on_cuda:  # pragma: no cover - CUDA only (the consumer reads on its own stream)
        torch.cuda.current_stream(device).synchronize()
    return buffers


def share_buckets(buffers: list[torch.Tensor], n: int) -> list[bytes]:
    """``n`` pickled handles of ``buffers`` (CUDA IPC, or shared memory on CPU), one per consumer, each opened once."""
    return [bytes(ForkingPickler.dumps(list(buffers))) for _ in range(n)]


def open_buckets(payload: bytes, layout: WeightLayout, assign: Callable[[str, torch.Tensor], None]) -> int:
    """Consumer: open every bucket of ``payload``, then ``assign(name, tensor)`` each parameter; bytes read.

    Nothing is assigned unless every bucket opened and has its layout's size. Returns after the copies are
    done (CUDA: synchronized) with the handles closed, so the producer may overwrite or free its buffers.
    """
    buffers = ForkingPickler.loads(payload)  # opens the handles (the producer's GPU: this worker's)
    try:
        sizes = [b.numel() for b in buffers]
        if sizes != list(layout.bucket_nbytes):
            raise RuntimeError(f"shared weight buckets have {sizes} bytes, the layout says "
                               f"{list(layout.bucket_nbytes)}")
        _assign_all(layout, buffers, assign)
        if buffers and buffers[0].device.type == "cuda":  # pragma: no cover - CUDA only
            torch.cuda.synchronize(buffers[0].device)
    finally:
        del buffers
    return layout.nbytes
