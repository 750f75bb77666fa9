"""The worker side of ``ForkPool``: one process, one ``ThawEngine``, a loop that answers the parent.

Why a process per device: each engine owns its device's KV pool and runs its own forward loop, so the
workers decode in parallel; the parent only places sequences and moves trunks between them.

Messages are pickled by multiprocessing's ``ForkingPickler``, which ``torch.multiprocessing`` extends:
a CPU tensor travels as a handle to shared memory, never as bytes in the pipe. A weight update
(``PackedWeights``) costs one copy into shared memory on the sending side and is read in place on the
receiving side; a trunk's KV (``snapshot``) is gathered straight into shared memory or a device buffer
that the destinations read (``trunk_export.py``), and stays with this worker until ``release_trunk``; a
destination keeps the source's device buffers it opened until ``drop_trunk_buffers``.

    parent -> worker   Request(req_id, op, version, args)
    worker -> parent   Reply(req_id, ok, value, status)   ok=False: value = (exception, traceback text)

Every op but ``free``, ``release_trunk`` and ``drop_trunk_buffers`` is answered (those are fire-and-forget:
the next reply's status shows what they released). Ops that read or write KV carry the weight version the
parent expects; a worker holding another version refuses them with ``WeightVersionError`` instead of serving
stale weights.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import pickle
import signal
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch

from thaw_rl.engine import SamplingParams, Session, ThawEngine
from thaw_rl.pool.shared_memory import shared_empty
from thaw_rl.pool.trunk_export import OpenedBuffers, TrunkExport, TrunkExports, TrunkImport
from thaw_rl.pool.weight_sync import (GroupSpec, TransferGroup, WeightLayout, open_buckets, receive_weights,
                                      send_weights)

VERSIONED_OPS = frozenset({"prefill", "fork", "generate", "snapshot"})  # read or write KV: weights must match
NO_REPLY_OPS = frozenset({"free", "release_trunk", "drop_trunk_buffers"})  # fire-and-forget


class WeightVersionError(RuntimeError):
    """A request expected other weights than the worker holds; it was refused, nothing was computed."""


class Request(NamedTuple):
    req_id: int
    op: str
    version: int
    args: tuple


class Reply(NamedTuple):
    req_id: int
    ok: bool
    value: Any
    status: dict | None


# -- shared memory ---------------------------------------------------------------------------------
@dataclass
class PackedWeights:
    """A state dict packed into one shared-memory buffer (one handle to pass, not one per tensor)."""

    version: int
    buffer: torch.Tensor  # (nbytes,) uint8, shared memory
    entries: list[tuple[str, torch.dtype, tuple[int, ...], int]]  # name, dtype, shape, byte offset

    @classmethod
    def pack(cls, state_dict: dict[str, torch.Tensor], version: int) -> PackedWeights:
        entries, offset = [], 0
        for name, t in state_dict.items():
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"state_dict[{name!r}] is a {type(t).__name__}, not a tensor.")
            entries.append((name, t.dtype, tuple(t.shape), offset))
            offset += -(-t.numel() * t.element_size() // 64) * 64  # 64-byte aligned: any dtype can view it
        buffer = shared_empty((offset,), torch.uint8)
        for (_, dtype, shape, off), t in zip(entries, state_dict.values()):
            cls._view(buffer, dtype, shape, off).copy_(t.detach())
        return cls(version, buffer, entries)

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: self._view(self.buffer, dtype, shape, off) for name, dtype, shape, off in self.entries}

    @staticmethod
    def _view(buffer: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], offset: int) -> torch.Tensor:
        numel = 1
        for n in shape:
            numel *= n
        return buffer[offset:offset + numel * dtype.itemsize].view(dtype).view(shape)


def _digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (any dtype, any device)."""
    import hashlib

    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


# -- faults (tests) --------------------------------------------------------------------------------
@dataclass
class Fault:
    """Test hook: when ``op`` arrives, ``action`` it: "kill" (SIGKILL itself), "exit" (code), "sleep" (s)."""

    op: str
    action: str
    arg: float = 0.0

    def __post_init__(self) -> None:
        if self.action not in ("kill", "exit", "sleep"):
            raise ValueError(f"Fault action {self.action!r}: use 'kill', 'exit' or 'sleep'.")

    def fire(self) -> None:
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.action == "exit":
            os._exit(int(self.arg))
        time.sleep(self.arg)


# -- the worker ------------------------------------------------------------------------------------
@dataclass
class WorkerCounters:
    """What the pool adds to the engine's own stats (cumulative over this process)."""

    num_snapshots: int = 0
    snapshot_bytes: int = 0
    snapshot_seconds: float = 0.0  # engine.snapshot straight into the export buffer (shared memory or device)
    num_restores: int = 0
    restore_bytes: int = 0
    restore_seconds: float = 0.0  # engine.restore: the imported buffer -> device blocks
    # trunks this worker imported, by transport: bytes, and the seconds to make them readable here (map and
    # register the shared memory; open the CUDA IPC handle and copy peer-to-peer)
    num_trunks_host: int = 0
    trunk_bytes_host: int = 0
    trunk_seconds_host: float = 0.0
    num_trunks_device: int = 0
    trunk_bytes_device: int = 0
    trunk_seconds_device: float = 0.0
    # where a cross-worker fork's time goes. Source (op_snapshot): taking an export buffer (a new one: an
    # allocation), the gather (and logits copy) into it, pickling handles for destinations that lack it.
    # Destination: opening a handle or mapping shared memory, the peer copy from another GPU (restore_seconds
    # is the scatter and its bookkeeping).
    export_alloc_seconds: float = 0.0
    export_gather_seconds: float = 0.0
    export_share_seconds: float = 0.0
    num_export_allocs: int = 0
    num_export_handles: int = 0
    import_open_seconds: float = 0.0
    import_copy_seconds: float = 0.0
    num_import_opens: int = 0  # device trunks whose buffer came with a handle (opened here)
    num_import_reuses: int = 0  # device trunks read from a buffer opened before
    num_weight_loads: int = 0
    weight_load_seconds: float = 0.0
    busy_seconds: float = 0.0  # time spent inside ops


@dataclass
class Worker:
    """One engine and the sessions it holds, keyed by ``Session.session_id``."""

    engine: ThawEngine
    version: int = 0
    sessions: dict[int, Session] = field(default_factory=dict)
    counters: WorkerCounters = field(default_factory=WorkerCounters)
    faults: list[Fault] = field(default_factory=list)
    group: TransferGroup | None = None  # the weight-transfer group this worker last joined
    old_groups: list[TransferGroup] = field(default_factory=list)  # kept, not destroyed: gloo teardown can hang
    exports: TrunkExports | None = None  # trunks snapshotted for other workers, kept until released
    opened: OpenedBuffers = field(default_factory=OpenedBuffers)  # other workers' export buffers open here

    def __post_init__(self) -> None:
        if self.exports is None:
            self.exports = TrunkExports(self.engine.device)

    def info(self) -> dict:
        e = self.engine
        return {
            "pid": os.getpid(), "device": str(e.device), "block_size": e.block_size,
            "kv_bytes_per_token": e.spec.bytes_per_token, "fingerprint": dict(e.fingerprint),
            "weights": {k: (tuple(v.shape), v.dtype) for k, v in e.model.state_dict().items()},
            "parameters": {k: (tuple(v.shape), v.dtype) for k, v in e.model.named_parameters()},
            "trunk_owner": self.exports.owner,
        }

    def status(self) -> dict:
        st = self.engine.stats
        return {"version": self.version, "num_sessions": len(self.sessions), **vars(st), **vars(self.counters),
                "num_trunk_exports": self.exports.num_held,
                "num_idle_trunk_buffers": self.exports.host_buffers.num_idle,
                "num_export_buffers": self.exports.device_buffers.num_buffers,
                "trunk_buffers_open": self.opened.keys()}

    def handle(self, req: Request) -> Any:
        for fault in [f for f in self.faults if f.op == req.op]:
            fault.fire()
        if req.op in VERSIONED_OPS and req.version != self.version:
            raise WeightVersionError(
                f"{req.op} expected weights version {req.version} but this worker (pid {os.getpid()}) holds version "
                f"{self.version}; refused rather than served with other weights."
            )
        start = time.perf_counter()
        try:
            return getattr(self, f"op_{req.op}")(*req.args)
        finally:
            self.counters.busy_seconds += time.perf_counter() - start

    # -- ops ---------------------------------------------------------------------------------------
    def op_prefill(self, prompts: list[list[int]]) -> list[int]:
        """Prefill, and reply once the KV is computed: on a GPU the forward is still running when prefill_many
        returns, and the next call (a snapshot of the trunk, say) would otherwise be charged for it (seen on two
        H200s: an 8B 4,000-token trunk's prefill showed up as 89 ms of "snapshot")."""
        sessions = [self._keep(s) for s in self.engine.prefill_many(prompts)]
        if self.engine.device.type == "cuda":
            torch.cuda.synchronize(self.engine.device)
        return sessions

    def op_fork(self, source: int | TrunkExport, n: int, at: int | None) -> tuple[int, list[int]]:
        """Fork a held session, or restore another worker's trunk first (the restored copy is kept for later forks)."""
        if isinstance(source, TrunkExport):
            source = self._keep(self._restore(source))
        kids = self.engine.fork(self._session(source), n, at=at)
        return source, [self._keep(s) for s in kids]

    def _restore(self, export: TrunkExport) -> Session:
        c = self.counters
        trunk = TrunkImport(export, self.engine.device, self.opened)
        try:
            start = time.perf_counter()
            parent = self.engine.restore(trunk.snapshot)
            c.restore_seconds += time.perf_counter() - start
        finally:
            trunk.close()
        c.num_restores += 1
        c.restore_bytes += trunk.nbytes
        t = export.transport
        setattr(c, f"num_trunks_{t}", getattr(c, f"num_trunks_{t}") + 1)
        setattr(c, f"trunk_bytes_{t}", getattr(c, f"trunk_bytes_{t}") + trunk.nbytes)
        setattr(c, f"trunk_seconds_{t}", getattr(c, f"trunk_seconds_{t}") + trunk.seconds)
        c.import_open_seconds += trunk.open_seconds
        c.import_copy_seconds += trunk.copy_seconds
        if t == "device":
            c.num_import_opens += trunk.opened_now
            c.num_import_reuses += not trunk.opened_now
        return parent

    def op_generate(self, sids: list[int], params: list[SamplingParams], seeds: list[int]) -> list[tuple]:
        local = [dataclasses.replace(p, seed=s) for p, s in zip(params, seeds)]  # each seed used as given
        outs = self.engine.generate([self._session(sid) for sid in sids], local)
        return [(o.token_ids, o.logprobs, o.entropies, o.finish_reason) for o in outs]

    def op_snapshot(self, sid: int, transport: str = "host", opened_by: dict[int, list[int]] | None = None
                    ) -> TrunkExport:
        """The session's KV gathered once into memory the destinations read (kept until ``release_trunk``).

        ``opened_by`` ("device"): destination -> the ids of this worker's export buffers it has open; the
        export carries a handle of its buffer for each destination that lacks it."""
        start = time.perf_counter()
        out = self.exports.export(self.engine, self._session(sid), transport, opened_by)
        c = self.counters
        c.snapshot_seconds += time.perf_counter() - start
        c.num_snapshots += 1
        c.snapshot_bytes += out.nbytes
        c.export_alloc_seconds += out.timings["alloc_seconds"]
        c.export_gather_seconds += out.timings["gather_seconds"]
        c.export_share_seconds += out.timings["share_seconds"]
        c.num_export_allocs += int(out.timings["num_allocs"])
        c.num_export_handles += int(out.timings["num_handles"])
        return out

    def op_share_trunk(self, export_id: int, destinations: list[int]) -> dict[int, bytes]:
        """A handle of a device export's buffer for each of ``destinations`` (that have not opened it)."""
        start = time.perf_counter()
        handles = self.exports.share(export_id, destinations)
        self.counters.export_share_seconds += time.perf_counter() - start
        self.counters.num_export_handles += len(handles)
        return handles

    def op_drop_trunk_buffers(self, owner: str, buffer_ids: list[int] | None) -> None:
        """Close another worker's export buffers: those it retired, or all (None) when that worker is gone."""
        self.opened.drop(owner, buffer_ids)

    def op_release_trunk(self, export_ids: list[int]) -> None:
        for export_id in export_ids:
            self.exports.release(export_id)

    def op_free(self, sids: list[int]) -> None:
        for sid in sids:
            session = self.sessions.pop(sid, None)
            if session is not None:  # unknown: already gone with a failed call; nothing to release
                self.engine.free(session)

    def op_load_weights(self, weights: PackedWeights) -> None:
        start = time.perf_counter()
        tensors = weights.tensors()
        with torch.no_grad():
            self.engine.model.load_state_dict(tensors, strict=False)
        self._now_holds(weights.version, start)

    def op_transfer_weights(self, spec: GroupSpec, layout: WeightLayout, root: int, version: int) -> None:
        """Join the group ``spec`` describes (once per group), then send (rank ``root``) or receive the weights."""
        start = time.perf_counter()
        if self.group is None or self.group.spec != spec:
            if self.group is not None:
                self.old_groups.append(self.group)
            self.group = TransferGroup(spec, self.engine.device)
        if spec.rank == root:
            if version != self.version:
                raise RuntimeError(f"asked to send weights version {version} but this worker holds {self.version}")
            send_weights(self.group, layout, dict(self.engine.model.named_parameters()))
            return
        params = dict(self.engine.model.named_parameters())
        missing = [name for name in layout.names if name not in params]
        if missing:  # checked by the parent before it sends; a mismatch here is a broken invariant
            raise RuntimeError(f"weight layout names {missing[:3]} are not parameters of this worker's model")
        receive_weights(self.group, layout, root, lambda name, t: params[name].copy_(t))
        self._now_holds(version, start)

    def op_open_weights(self, payload: bytes, layout: WeightLayout, version: int) -> None:
        """Open the trainer's shared weight buckets (CUDA IPC on its GPU, or shared memory), copy them in."""
        start = time.perf_counter()
        params = dict(self.engine.model.named_parameters())
        missing = [name for name in layout.names if name not in params]
        if missing:  # checked by the parent before it sends; a mismatch here is a broken invariant
            raise RuntimeError(f"weight layout names {missing[:3]} are not parameters of this worker's model")
        open_buckets(payload, layout, lambda name, t: params[name].copy_(t))
        self._now_holds(version, start)

    def op_weights_digest(self) -> dict[str, str]:
        """Parameter name -> sha256 of its bytes: whether two processes hold exactly the same weights."""
        return {name: _digest(t) for name, t in self.engine.model.named_parameters()}

    def _now_holds(self, version: int, start: float) -> None:
        """New weights are in place: the engine takes their version (which drops its prefix cache, and tags
        what it computes and snapshots from now on)."""
        self.engine.set_weight_version(version)
        self.engine.reset_prefix_cache()  # also when the version number did not change (a replacement's first load)
        self.version = version
        self.counters.num_weight_loads += 1
        self.counters.weight_load_seconds += time.perf_counter() - start

    def op_reset_prefix_cache(self) -> None:
        self.engine.reset_prefix_cache()

    def op_status(self) -> None:
        return None  # the reply carries the status

    def op_faults(self, faults: list[Fault]) -> None:
        self.faults = list(faults)

    # -- helpers -------------------------------------------------------------------------------------
    def _keep(self, session: Session) -> int:
        self.sessions[session.session_id] = session
        return session.session_id

    def _session(self, sid: int) -> Session:
        session = self.sessions.get(sid)
        if session is None:
            raise RuntimeError(f"worker pid {os.getpid()} holds no session {sid} (freed, or lost with a failed call).")
        return session


# -- process entry ---------------------------------------------------------------------------------
def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when the parent dies, so a crashed trainer leaves no orphans."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _error_payload(exc: BaseException) -> tuple[BaseException, str]:
    """The exception itself when it survives a pickle round trip, else a RuntimeError with its text."""
    text = "".join(traceback.format_exception(exc))
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        exc = RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc, text


def _checked(built: Any, model_factory: Callable) -> tuple[Any, Any]:
    """The factory's ``(model, tokenizer)``, or a TypeError that says what it returned instead."""
    if not (isinstance(built, (tuple, list)) and len(built) == 2 and isinstance(built[0], torch.nn.Module)):
        what = type(built).__name__ if not isinstance(built, (tuple, list)) else \
            f"a {len(built)}-item {type(built).__name__} of {[type(x).__name__ for x in built]}"
        raise TypeError(f"model_factory {model_factory!r} returned {what}; it must return (model, tokenizer) "
                        f"with model a torch.nn.Module (the tokenizer may be None).")
    return built[0], built[1]


def run_worker(conn, parent_pid: int, model_factory: Callable, device: str, engine_kwargs: dict,
               num_threads: int | None, faults: list[Fault]) -> None:
    """Build the model and engine, say ready (or why not), then answer requests until close or EOF."""
    _die_with_parent(parent_pid)
    try:
        if num_threads:
            torch.set_num_threads(num_threads)
        dev = torch.device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)  # a factory may build straight on torch.cuda.current_device()
        model, tokenizer = _checked(model_factory(), model_factory)
        worker = Worker(ThawEngine(model.to(dev), tokenizer, **engine_kwargs), faults=list(faults))
        conn.send(Reply(0, True, worker.info(), worker.status()))
    except BaseException as exc:  # noqa: BLE001 (the parent must learn why the start failed)
        conn.send(Reply(0, False, _error_payload(exc), None))
        return
    while True:
        try:
            req = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if req.op == "close":
            conn.send(Reply(req.req_id, True, None, worker.status()))
            return
        try:
            value, ok = worker.handle(req), True
        except Exception as exc:  # noqa: BLE001 (answered to the caller, the worker lives on)
            value, ok = _error_payload(exc), False
        if req.op not in NO_REPLY_OPS:
            conn.send(Reply(req.req_id, ok, value, worker.status()))
