"""``ForkPool``: engines in worker processes (one per device), trunks moved between them by snapshot/restore.

Why: one engine fills one device. A pool runs one ``ThawEngine`` per worker process and speaks the same
``RolloutBackend`` protocol as ``NativeBackend``, so ``TreeSampler(ForkPool(...), spec)`` spreads a rollout
tree over several devices unchanged. A trunk (a prompt plus a partial answer) lives in one worker; when its
children do not all fit there, the trunk is exported once and each other worker that takes children
restores it once (the restored copy is kept for later forks of the same trunk). The export goes straight
into memory the destination reads (``trunk_export.py``): between CUDA workers one of the source's kept
device buffers, whose CUDA IPC handle each destination opens once (it reads later trunks from the buffer it
has open), else shared memory registered with CUDA as pinned; ``trunk_transport`` forces one.
Where children go is ``placement.py``'s pure functions; the numbers reported are ``pool_stats.py``'s.

Handles are ``PoolHandle`` objects: the worker that holds the sequence, the worker's session id, and the
sequence's token ids (the parent mirrors them, so a sequence lost with a worker can be rebuilt by
prefilling its tokens again).

Weights: ``update_weights`` gives every worker new weights and a new version. ``weight_sync="shared_memory"``
packs them into one shared-memory buffer (kept for replacement workers); ``"distributed"`` broadcasts
them in packed buckets over a gloo (CPU) or NCCL (GPU) group of the parent and the workers
(``weight_sync.py``), and a replacement worker gets the current weights from a worker that holds them (or
from ``weights_source``). A worker refuses any request that expects another version.

Failures: every request has a deadline (``timeout_s``). A worker that dies (exit code, signal) or misses
its deadline (killed as hung) is reported with that cause, replaced by a fresh worker that loads the
current weights, and the part of the call it held is retried once on the replacement (its sequences are
rebuilt from their token ids). A second failure raises ``RuntimeError`` naming both; the pool itself stays
usable, also when a replacement could not start (the next call starts that slot again). A request never
waits past its deadline and a completion is never dropped silently. What a hang costs: the call waits the
full ``timeout_s`` (default 300 s) before the worker is killed, then a replacement starts (a spawn plus
the model build, up to ``start_timeout_s``) and redoes that worker's share; lower ``timeout_s`` to the
longest generate call you expect.

Seeds: as in ``ThawEngine.generate`` (``sampling.params_per_session``): a list of params is used as given,
one ``SamplingParams`` with a seed gives request i ``derive_seed(seed, i)``, i counted over the whole call;
each worker's engine uses the seed it is handed. So a pool reproduces a single engine's samples whatever
the placement (sampling noise is a function of seed and position only).
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import time
import weakref
from collections import Counter
from typing import Any, Callable, Mapping, Sequence

import torch

from thaw_rl.engine.sampling import SamplingParams, params_per_session
from thaw_rl.pool.handles import PoolCompletion, PoolHandle
from thaw_rl.pool.placement import PLACEMENTS, blocks_per_child, place_children, spread_prompts
from thaw_rl.pool.pool_stats import backend_counters, summed, transfer_stats, worker_row
from thaw_rl.pool.pool_weights import Attempt, PoolWeights
from thaw_rl.pool.trunk_export import TRUNK_TRANSPORTS, TrunkExport, check_trunk_transport, pick_transport
from thaw_rl.pool.weight_sync import DEFAULT_BUCKET_BYTES, TransferGroup
from thaw_rl.pool.worker import Fault, PackedWeights
from thaw_rl.pool.worker_process import Pending, WorkerFailure, WorkerProcess, collect

logger = logging.getLogger(__name__)

WEIGHT_SYNCS = ("shared_memory", "distributed")

__all__ = ["PLACEMENTS", "TRUNK_TRANSPORTS", "WEIGHT_SYNCS", "ForkPool", "PoolCompletion", "PoolHandle"]


class ForkPool(PoolWeights):
    """A ``RolloutBackend`` over ``num_workers`` worker processes, each holding a ``ThawEngine``.

    Args:
        model_factory: picklable (a module-level function or a ``functools.partial`` of one); returns
            ``(model, tokenizer)``. Each worker calls it after ``torch.cuda.set_device(its device)`` and
            moves the model there.
        num_workers: default one per device.
        devices: default every visible GPU, else ``["cpu"]``; workers are dealt to devices round-robin, so
            ``num_workers=2`` on one GPU puts two engines on it (give ``kv_cache_memory`` in bytes then: the
            engine's default takes half of the memory free when it starts).
        engine_kwargs: ``ThawEngine`` keyword arguments (block_size, kv_cache_memory, ...).
        timeout_s: the longest any request may take before its worker counts as hung (a whole generate
            call of one worker's share included: size it to the longest rollout level). A hung worker
            costs this much waiting, then a replacement's start.
        start_timeout_s: the longest a worker may take to build its model and engine.
        start_method: multiprocessing start method; "spawn" is the one that is safe with CUDA.
        placement: "local_first" keeps children in the trunk's worker while it has room (fewest transfers);
            "spread" balances live sequences over the workers (most parallel decoding).
        child_reserve_tokens: KV a child is expected to grow by before its next generate returns; a worker
            has room for a child while its free blocks cover this for every child forked there since.
        num_threads: torch threads per worker (default on CPU: the cores divided among the workers).
        seed: draws the seeds of requests whose ``SamplingParams.seed`` is None.
        weight_sync: how ``update_weights`` moves weights: "shared_memory" (one packed copy in /dev/shm,
            kept for replacements) or "distributed" (packed buckets broadcast over gloo/NCCL; nothing kept).
        weight_bucket_bytes: "distributed": bytes per broadcast (several parameters packed into each).
        weight_ipc: "distributed" when every worker is on the device of the trainer's tensors: hand the
            workers CUDA IPC handles of packed buckets the pool keeps (one more copy of the parameters on
            that GPU) instead of gloo through host memory. None (default): exactly then, on CUDA; True:
            always (every worker must be on the weights' device; on the CPU the handles are shared memory,
            the IPC protocol for tests); False: never. Any worker elsewhere: NCCL/gloo for all.
        weights_source: "distributed": ``() -> (version, {name: tensor})``, asked for the current weights
            when a replacement worker starts and no other worker holds them (e.g. a pool of one worker).
        trunk_transport: how a trunk's KV moves between workers: "auto" ("device" when both workers are on
            CUDA, else "host"), "host" (the snapshot writes into shared memory registered with CUDA as pinned,
            the destination's restore reads it) or "device" (one of the source's kept device buffers, whose
            CUDA IPC handle each destination opens once; copied peer-to-peer when the GPUs differ; every
            worker must be on CUDA, or every one on the CPU where the "device" buffers are shared host memory:
            the device path's protocol, for tests).

    Use it as a context manager or call ``close()``. One caller at a time (not thread-safe). "host" trunks (and,
    with "shared_memory", weights) travel through ``/dev/shm``, which must hold a trunk's KV.
    """

    def __init__(
        self,
        model_factory: Callable[[], tuple[Any, Any]],
        num_workers: int | None = None,
        devices: Sequence[str | torch.device] | None = None,
        engine_kwargs: dict | None = None,
        timeout_s: float = 300.0,
        start_timeout_s: float = 600.0,
        start_method: str = "spawn",
        placement: str = "local_first",
        child_reserve_tokens: int = 256,
        num_threads: int | None = None,
        seed: int | None = None,
        weight_sync: str = "shared_memory",
        weight_bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        weights_source: Callable[[], tuple[int, Mapping[str, torch.Tensor]]] | None = None,
        trunk_transport: str = "auto",
        weight_ipc: bool | None = None,
    ) -> None:
        import torch.multiprocessing as torch_mp  # registers the shared-memory tensor reductions

        if placement not in PLACEMENTS:
            raise ValueError(f"placement={placement!r}: use one of {PLACEMENTS}.")
        if weight_sync not in WEIGHT_SYNCS:
            raise ValueError(f"weight_sync={weight_sync!r}: use one of {WEIGHT_SYNCS}.")
        if timeout_s <= 0 or start_timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s} and start_timeout_s={start_timeout_s} must be > 0 seconds.")
        if child_reserve_tokens < 0:
            raise ValueError(f"child_reserve_tokens={child_reserve_tokens} must be >= 0.")
        if weight_ipc is not None and not isinstance(weight_ipc, bool):
            raise TypeError(f"weight_ipc={weight_ipc!r}: use None (automatic), True or False.")
        if weight_ipc and weight_sync != "distributed":
            raise ValueError(f"weight_ipc=True is a way of weight_sync='distributed', not of {weight_sync!r}; "
                             f"pass weight_sync='distributed' too.")
        if weight_bucket_bytes < 1:
            raise ValueError(f"weight_bucket_bytes={weight_bucket_bytes} must be >= 1.")
        if devices is None:
            n_gpu = torch.cuda.device_count()
            devices = [f"cuda:{i}" for i in range(n_gpu)] if n_gpu else ["cpu"]
        devices = [str(torch.device(d)) for d in devices]
        if not devices:
            raise ValueError("devices=[]: give at least one device, or None for every visible GPU (else the CPU).")
        num_workers = len(devices) if num_workers is None else num_workers
        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers} must be >= 1.")
        check_trunk_transport(trunk_transport, devices)
        if num_threads is None and all(d == "cpu" for d in devices):
            num_threads = max(1, (os.cpu_count() or 1) // num_workers)  # CPU workers share the cores
        self.timeout_s = float(timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        self.placement = placement
        self.child_reserve_tokens = child_reserve_tokens
        self.weight_sync = weight_sync
        self.weight_bucket_bytes = int(weight_bucket_bytes)
        self.weights_source = weights_source
        self.weight_ipc = weight_ipc
        self.trunk_transport = trunk_transport
        self._ctx = torch_mp.get_context(start_method)
        self._spawn = dict(model_factory=model_factory, engine_kwargs=dict(engine_kwargs or {}),
                           num_threads=num_threads)
        self._devices = [devices[i % len(devices)] for i in range(num_workers)]
        self._workers: list[WorkerProcess | None] = [None] * num_workers
        self._incarnations = itertools.count()
        self._faults: dict[int, list[Fault]] = {}  # test hooks kept for replacements
        self._closed = False
        self._parent_groups: list[TransferGroup] = []  # every group end this process made (closed with the pool)
        self._finalizer = weakref.finalize(self, _close_all, self._workers, self._parent_groups)
        self._version = 0
        self._weights: PackedWeights | None = None  # shared_memory: the latest update, for replacements
        self._group: TransferGroup | None = None  # distributed: the parent's end of the parent+workers group
        self._group_ids = itertools.count()
        self._ipc_buffers: tuple | None = None  # weight_ipc: (layout, packed device buffers) kept for the next push
        self._stores: list = []  # stores and groups of one-off transfers (kept: workers hold clients of them)
        self._pushing = False  # inside update_weights: a replacement gets the new weights from its retry
        self._weights_given = False  # distributed: update_weights ran, so replacements need its weights
        self._handle_ids = itertools.count()
        self._live: dict[int, PoolHandle] = {}
        self._growing: list[set[int]] = [set() for _ in range(num_workers)]  # forked, not yet generated
        self._exports: dict[int, tuple[TrunkExport, int, int]] = {}  # handle id -> (export, worker, incarnation)
        self._copies: dict[int, dict[int, tuple[int, int]]] = {}  # handle id -> worker -> (incarnation, sid)
        self._rng = random.Random(seed)
        self._retired: Counter = Counter()  # counters of replaced workers
        self._failures: list[str] = []
        self._fork_seconds = 0.0
        self._num_forks = 0
        self.weight_sync_seconds = 0.0  # cumulative wall time of update_weights
        self.last_weight_sync_seconds = 0.0
        self.last_weight_transport = ""  # distributed: "ipc", "nccl" or "gloo", how the last weights went
        self.weight_sync_bytes = 0  # bytes handed to workers by update_weights (per worker, summed)
        try:
            self._start(list(range(num_workers)))
        except BaseException:
            self.close()
            raise
        info = self._workers[0].info
        self.block_size: int = info["block_size"]
        self.kv_bytes_per_token: int = info["kv_bytes_per_token"]
        self._weight_shapes: dict[str, tuple] = info["weights"]
        self._parameter_shapes: dict[str, tuple] = info["parameters"]

    # -- RolloutBackend ------------------------------------------------------------------------------
    @property
    def num_workers(self) -> int:
        return len(self._workers)

    @property
    def version(self) -> int:
        """The weight version every worker holds (0 = the factory's weights; +1 per ``update_weights``)."""
        return self._version

    @property
    def parameter_names(self) -> list[str]:
        """The workers' model's parameter names: what ``update_weights`` needs with ``weight_sync="distributed"``."""
        return list(self._parameter_shapes)

    def prefill(self, prompts: Sequence[Sequence[int]], worker: int | None = None) -> list[PoolHandle]:
        """One handle per prompt; prompts are spread over the workers by token count (or all on ``worker``)."""
        self._check_open()
        prompts = [[int(t) for t in p] for p in prompts]
        if any(not p for p in prompts):
            raise ValueError("empty prompt: give at least one token id (e.g. the BOS token or a chat template).")
        if worker is not None and not 0 <= worker < self.num_workers:
            raise ValueError(f"worker={worker}: this pool has workers 0..{self.num_workers - 1}.")
        room = [self._room(w) for w in range(self.num_workers)]
        owners = [worker] * len(prompts) if worker is not None else spread_prompts([len(p) for p in prompts], room)
        handles: list[PoolHandle | None] = [None] * len(prompts)

        def attempt() -> Attempt:
            shares = _group([i for i in range(len(prompts)) if handles[i] is None], owners)
            values, errors, failures = self._call_all(
                {w: ("prefill", ([prompts[i] for i in idx],)) for w, idx in shares.items()})
            for w, sids in values.items():
                for i, sid in zip(shares[w], sids):
                    handles[i] = self._new_handle(w, sid, prompts[i], len(prompts[i]))
            return errors, failures, [h for h in handles if h is not None]

        self._retrying("prefill", attempt)
        return handles

    def fork(self, handle: PoolHandle, n: int, at: int | None = None) -> list[PoolHandle]:
        """n children sharing the handle's first ``at`` tokens (all when None), placed where there is KV room.

        The handle's own worker takes children first (``placement="local_first"``, until its free blocks
        minus ``child_reserve_tokens`` per pending child run out) or the children are balanced over the
        workers (``"spread"``). Other workers fork from a restored copy of the handle's snapshot.
        """
        self._check(handle)
        if n < 1:
            raise ValueError(f"fork(n={n}): n must be >= 1.")
        if at is not None and not 1 <= at <= handle.num_tokens:
            raise ValueError(f"fork(at={at}) must be in [1, {handle.num_tokens}] (the handle's token count).")
        start = time.perf_counter()
        load = Counter(h.worker for h in self._live.values())
        shares = Counter(place_children([self._room(w) for w in range(self.num_workers)],
                                        [load[w] for w in range(self.num_workers)], handle.worker, n,
                                        self._blocks_per_child(), self.placement))
        done: dict[int, list[PoolHandle]] = {}

        def attempt() -> Attempt:
            errors, failures = self._fork_shares(handle, {w: k for w, k in shares.items() if w not in done}, at, done)
            return errors, failures, [h for w in shares if w in done for h in done[w]]

        self._retrying("fork", attempt)
        self._num_forks += 1
        self._fork_seconds += time.perf_counter() - start
        return [h for w in shares for h in done[w]]

    def generate(self, handles: Sequence[PoolHandle],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[PoolCompletion]:
        """Continue every handle; each worker runs its share concurrently; completions in the order asked."""
        handles = list(handles)
        for h in handles:
            self._check(h)
        if len({id(h) for h in handles}) != len(handles):
            raise ValueError("generate() got the same handle twice; fork it to get independent children.")
        plist = params_per_session(params, len(handles))
        seeds = [p.seed if p.seed is not None else self._rng.getrandbits(63) for p in plist]
        results: list[PoolCompletion | None] = [None] * len(handles)

        def attempt() -> Attempt:
            todo = [i for i in range(len(handles)) if results[i] is None]
            errors, failures = self._rebuild([handles[i] for i in todo])
            if errors or failures:
                return errors, failures, []
            shares = _group(todo, [h.worker for h in handles])
            values, errors, failures = self._call_all(
                {w: ("generate", ([handles[i].session_id for i in idx], [plist[i] for i in idx],
                                  [seeds[i] for i in idx])) for w, idx in shares.items()})
            for w, outs in values.items():
                for i, (ids, lps, ents, reason) in zip(shares[w], outs):
                    h = handles[i]
                    self._changed(h)
                    h.token_ids.extend(ids)
                    results[i] = PoolCompletion(ids, lps, ents, reason, h)
            return errors, failures, []

        self._retrying("generate", attempt)
        return results

    def free(self, handle: PoolHandle) -> None:
        """Release the handle's KV (and any restored copies of it); using it afterwards raises ValueError."""
        self._check(handle)
        handle.freed = True
        self._live.pop(handle.handle_id, None)
        self._changed(handle)
        if self._alive(handle):
            self._workers[handle.worker].send_no_reply("free", ([handle.session_id],))

    def counters(self) -> dict[str, float]:
        """Cumulative counters over every worker, replaced ones included (from the latest replies; no round trip)."""
        return backend_counters(self._summed(), self._num_forks, self._fork_seconds)

    def transfer_totals(self) -> dict:
        """Trunks moved between workers so far, replaced workers included (from the latest replies; no round trip):
        ``transfer_bytes``, ``transfer_seconds`` and the same per transport (``stats()`` has them too)."""
        return transfer_stats(self._summed())

    def _summed(self) -> Counter:
        return summed([w.status for w in self._workers if w is not None]) + self._retired

    def reset_prefix_cache(self) -> None:
        """Every worker forgets its cached prefixes (a replaced worker starts with none)."""
        self._check_open()
        _, errors, failures = self._call_all({w: ("reset_prefix_cache", ()) for w in range(self.num_workers)})
        self._settle(errors, failures, {}, 0, "reset_prefix_cache", [])

    # -- progress and lifetime ---------------------------------------------------------------------
    def stats(self) -> dict:
        """Per worker: blocks used/free, tokens computed, snapshots/restores, bytes moved, seconds (asked now)."""
        self._check_open()
        _, errors, failures = self._call_all({w: ("status", ()) for w in range(self.num_workers)})
        self._settle(errors, failures, {}, 0, "stats", [])
        return {"version": self._version, "placement": self.placement, "weight_sync": self.weight_sync,
                "workers": [worker_row(w) for w in self._workers],
                "num_replacements": len(self._failures), "failures": list(self._failures),
                "num_live_handles": len(self._live), "num_cached_snapshots": len(self._exports),
                "retired": dict(self._retired), "weight_sync_seconds": self.weight_sync_seconds,
                "weight_sync_bytes": self.weight_sync_bytes, "trunk_transport": self.trunk_transport,
                **transfer_stats(self._summed()), **self.counters()}

    def close(self) -> None:
        """Ask every worker to exit, kill those that do not, reap them all. Idempotent."""
        self._closed = True
        self._finalizer()
        self._ipc_buffers = None

    def __enter__(self) -> ForkPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ForkPool({self.num_workers} worker(s) on {sorted(set(self._devices))}, version={self._version}, "
                f"placement={self.placement!r}{', closed' if self._closed else ''})")

    # -- placement inputs --------------------------------------------------------------------------------
    def _blocks_per_child(self) -> int:
        return blocks_per_child(self.child_reserve_tokens, self.block_size)

    def _room(self, w: int) -> int:
        """Free KV blocks of worker w minus what its forked, not yet generated children will take."""
        free = self._workers[w].status.get("num_free_blocks", 0)
        return free - self._blocks_per_child() * len(self._growing[w])

    # -- fork internals --------------------------------------------------------------------------------
    def _fork_shares(self, handle: PoolHandle, shares: dict[int, int], at: int | None,
                     done: dict[int, list[PoolHandle]]) -> tuple[dict, dict]:
        """Fork ``shares[w]`` children on each worker w; fills ``done``; returns (errors, failures)."""
        errors, failures = self._rebuild([handle])
        if errors or failures:
            return errors, failures
        home = handle.worker
        copies = self._copies.setdefault(handle.handle_id, {})
        stale = [w for w in shares if w != home and copies.get(w, (None,))[0] != self._workers[w].incarnation]
        export = None
        if stale:
            export, errors, failures = self._export(handle, stale)
            if export is None:
                return errors, failures
        calls = {}
        for w, k in shares.items():
            if w == home:
                source = handle.session_id
            elif w in stale:
                source = export.for_destination(w)
                self._workers[w].bytes_sent += export.nbytes
            else:
                source = copies[w][1]
            calls[w] = ("fork", (source, k, at))
        values, errors, failures = self._call_all(calls)
        ids = handle.token_ids if at is None else handle.token_ids[:at]
        for w, (source_sid, sids) in values.items():
            if w != home:
                copies[w] = (self._workers[w].incarnation, source_sid)
            done[w] = [self._new_handle(w, sid, list(ids), min(handle.num_prompt_tokens, len(ids))) for sid in sids]
            self._growing[w].update(h.handle_id for h in done[w])
        return errors, failures

    def _export(self, handle: PoolHandle, destinations: list[int]) -> tuple[TrunkExport | None, dict, dict]:
        """The handle's trunk exported for ``destinations``: taken once per token state and transport. A device
        export carries a handle of its buffer for each destination that has not opened that buffer (as its
        last reply said); a cached one asks the source worker for handles for destinations new to it."""
        w = handle.worker
        transport = pick_transport(self.trunk_transport, self._devices[w], [self._devices[d] for d in destinations])
        cached = self._exports.get(handle.handle_id)
        if cached is not None:
            export, source, incarnation = cached
            if (export.num_tokens, export.transport, source, incarnation) == \
                    (handle.num_tokens, transport, w, self._workers[w].incarnation):
                lacking = [d for d in destinations if d not in export.payloads and
                           export.buffer_id not in self._opened_buffers(d, w)] if transport == "device" else []
                if not lacking:
                    return export, {}, {}
                values, errors, failures = self._call_all({w: ("share_trunk", (export.export_id, lacking))})
                if w in values:
                    export.payloads.update(values[w])
                    return export, {}, {}
                return None, errors, failures
            self._release_export(handle.handle_id)
        opened_by = {d: sorted(self._opened_buffers(d, w)) for d in destinations} if transport == "device" else None
        values, errors, failures = self._call_all({w: ("snapshot", (handle.session_id, transport, opened_by))})
        export = values.get(w)
        if export is not None:
            self._exports[handle.handle_id] = (export, w, self._workers[w].incarnation)
            if export.retired:
                self._drop_trunk_buffers(export.owner, export.retired, skip=w)
        return export, errors, failures

    def _opened_buffers(self, destination: int, source: int) -> set[int]:
        """The ids of worker ``source``'s export buffers that worker ``destination`` had open at its last reply."""
        owner = self._workers[source].info.get("trunk_owner")
        return {b for o, b in self._workers[destination].status.get("trunk_buffers_open", ()) if o == owner}

    def _drop_trunk_buffers(self, owner: str, buffer_ids: list[int] | None, skip: int) -> None:
        """Tell every worker but ``skip`` to close ``owner``'s export buffers ``buffer_ids`` (None: all of them)."""
        for d, worker in enumerate(self._workers):
            if d != skip and worker is not None and not worker.closed:
                worker.send_no_reply("drop_trunk_buffers", (owner, buffer_ids))

    def _release_export(self, handle_id: int) -> None:
        """Forget a handle's export and tell its worker (if it is still the process that took it) to free it."""
        cached = self._exports.pop(handle_id, None)
        if cached is not None:
            export, w, incarnation = cached
            if self._workers[w].incarnation == incarnation:
                self._workers[w].send_no_reply("release_trunk", ([export.export_id],))

    def _changed(self, handle: PoolHandle) -> None:
        """The handle's tokens change or it is freed: its export and restored copies no longer match."""
        self._release_export(handle.handle_id)
        self._growing[handle.worker].discard(handle.handle_id)
        for w, (incarnation, sid) in self._copies.pop(handle.handle_id, {}).items():
            if self._workers[w].incarnation == incarnation:
                self._workers[w].send_no_reply("free", ([sid],))

    def _drop_all_snapshots(self) -> None:
        for hid in list(self._exports):
            self._release_export(hid)
        for hid in list(self._copies):
            for w, (incarnation, sid) in self._copies.pop(hid).items():
                if self._workers[w].incarnation == incarnation:
                    self._workers[w].send_no_reply("free", ([sid],))

    # -- handles ---------------------------------------------------------------------------------------
    def _new_handle(self, w: int, sid: int, token_ids: list[int], num_prompt_tokens: int) -> PoolHandle:
        h = PoolHandle(next(self._handle_ids), w, sid, self._workers[w].incarnation, list(token_ids),
                       num_prompt_tokens, id(self))
        self._live[h.handle_id] = h
        return h

    def _alive(self, handle: PoolHandle) -> bool:
        return handle.incarnation == self._workers[handle.worker].incarnation

    def _rebuild(self, handles: list[PoolHandle]) -> tuple[dict, dict]:
        """Prefill again, on their worker's replacement, the handles whose worker was replaced."""
        lost = [h for h in handles if not self._alive(h)]
        if not lost:
            return {}, {}
        shares = _group(range(len(lost)), [h.worker for h in lost])
        values, errors, failures = self._call_all(
            {w: ("prefill", ([lost[i].token_ids for i in idx],)) for w, idx in shares.items()})
        for w, sids in values.items():
            for i, sid in zip(shares[w], sids):
                lost[i].session_id, lost[i].incarnation = sid, self._workers[w].incarnation
        return errors, failures

    def _check(self, handle: PoolHandle) -> None:
        self._check_open()
        if not isinstance(handle, PoolHandle) or handle.pool_id != id(self):
            raise ValueError(f"expected a PoolHandle from this ForkPool's prefill or fork, got {handle!r}.")
        if handle.freed:
            raise ValueError(f"{handle!r} was freed; fork it before freeing if you need it again.")

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this ForkPool is closed; make a new one.")

    # -- calls, failures, replacement --------------------------------------------------------------------
    def _send_all(self, calls: dict[int, tuple[str, tuple]], version: int | None = None) -> list[Pending]:
        version = self._version if version is None else version
        return [self._workers[w].send(op, args, version, self.timeout_s) for w, (op, args) in calls.items()]

    @staticmethod
    def _collect(pending: list[Pending]) -> tuple[dict, dict, dict]:
        """Wait for every pending request: (values, the workers' exceptions, WorkerFailures), by worker."""
        values, errors, failures = {}, {}, {}
        for w, outcome in collect(pending).items():
            if isinstance(outcome, WorkerFailure):
                failures[w] = outcome
            elif isinstance(outcome, BaseException):
                errors[w] = outcome
            else:
                values[w] = outcome
        return values, errors, failures

    def _call_all(self, calls: dict[int, tuple[str, tuple]], version: int | None = None) -> tuple[dict, dict, dict]:
        """Send each worker its request, wait for all; (values, the workers' exceptions, WorkerFailures)."""
        return self._collect(self._send_all(calls, version))

    def _retrying(self, op: str, attempt: Callable[[], Attempt]) -> None:
        """Run ``attempt`` (one try at the part not done yet); after worker failures replace them and try once more."""
        first: dict[int, WorkerFailure] = {}
        for n in range(2):
            errors, failures, made = attempt()
            self._settle(errors, failures, first, n, op, made)
            if not failures:
                return

    def _settle(self, errors: dict, failures: dict, first: dict, attempt: int, op: str,
                made: list[PoolHandle]) -> None:
        """Replace failed workers; then raise a worker's exception, or give up after the retry."""
        for w, failure in failures.items():
            self._replace(w, failure)
        if errors or (failures and attempt == 1):
            for h in made:  # a call that raises must not leave sequences behind
                if not h.freed:
                    self.free(h)
        if errors:
            raise next(iter(errors.values()))
        if failures and attempt == 1:
            lines = [f"{f} (first attempt: {first[w]})" if w in first else str(f) for w, f in failures.items()]
            raise RuntimeError(
                f"ForkPool {op} failed twice: {'; '.join(lines)}. The workers were replaced and the pool is usable; "
                f"the {op} call produced nothing.")
        first.update(failures)

    def _replace(self, index: int, failure: WorkerFailure) -> None:
        """Kill and reap worker ``index``, keep its counters, start a fresh one with the current weights."""
        old = self._workers[index]
        old.kill(str(failure))
        if old.info.get("trunk_owner"):  # the others close the dead process's export buffers
            self._drop_trunk_buffers(old.info["trunk_owner"], None, skip=index)
        self._retired.update(summed([old.status]))
        old.status = {}  # counted once, also when this slot's start fails and it is replaced again
        self._failures.append(str(failure))
        logger.warning("%s; replacing it with a fresh worker", failure)
        self._growing[index].clear()
        for copies in self._copies.values():
            copies.pop(index, None)
        self._group = None  # the group's member is gone
        self._start([index])

    def _start(self, indices: list[int]) -> None:
        """Start workers, wait until each has built its engine, then give them the current weights.

        On any failure the new workers are killed and RuntimeError raised; their slots stay closed, and the
        next call that needs one replaces it again (so a cause that went away heals the pool).
        """
        for i in indices:
            self._workers[i] = WorkerProcess(self._ctx, i, self._devices[i], faults=self._faults.get(i, []),
                                             parent_pid=os.getpid(), **self._spawn)
            self._workers[i].incarnation = next(self._incarnations)
        ready = collect([Pending(self._workers[i], 0, "start", time.perf_counter(), self.start_timeout_s)
                         for i in indices])
        problems = [f"worker {i} on {self._devices[i]}: {r}" for i, r in ready.items() if isinstance(r, BaseException)]
        if problems:
            self._kill(indices, "its start failed")
            raise RuntimeError(f"ForkPool could not start {len(problems)} worker(s): {'; '.join(problems)}")
        for i, info in ready.items():
            self._workers[i].info = info
            self._workers[i].call_seconds = 0.0  # count requests, not the start
        try:
            self._load_current_weights(indices)
        except BaseException:
            self._kill(indices, "it could not get the current weights")
            raise

    def _kill(self, indices: list[int], cause: str) -> None:
        for i in indices:
            self._workers[i].kill(cause)

    # -- test hooks --------------------------------------------------------------------------------------
    def _set_faults(self, worker: int, faults: list[Fault], persist: bool = False) -> None:
        """Tests: arm ``faults`` in a worker (and, with persist, in every replacement of it)."""
        self._workers[worker].call("faults", (list(faults),), timeout_s=self.timeout_s)
        if persist:
            self._faults[worker] = list(faults)
        else:
            self._faults.pop(worker, None)


def _group(indices, owners: Sequence[int]) -> dict[int, list[int]]:
    """Worker -> the indices it owns, workers in first-seen order."""
    out: dict[int, list[int]] = {}
    for i in indices:
        out.setdefault(owners[i], []).append(i)
    return out


def _close_all(workers: list[WorkerProcess | None], groups: list[TransferGroup], timeout_s: float = 10.0) -> None:
    """Ask all to exit at once, then reap each (killing what is still alive at the deadline); then close
    this process's ends of the weight-sync groups."""
    live = [w for w in workers if w is not None]
    for w in live:
        w.request_close()
    deadline = time.perf_counter() + timeout_s
    for w in live:
        w.close(max(0.0, deadline - time.perf_counter()))
    for group in groups:
        group.close()
    groups.clear()
