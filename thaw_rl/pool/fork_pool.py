"""``ForkPool``: engines in worker processes (one per device), trunks moved between them by snapshot/restore.

Why: one engine fills one device. A pool runs one ``ThawEngine`` per worker process and speaks the same
``RolloutBackend`` protocol as ``NativeBackend``, so ``TreeSampler(ForkPool(...), spec)`` spreads a rollout
tree over several devices unchanged. A trunk (a prompt plus a partial answer) lives in one worker; when its
children do not all fit there, the trunk is snapshotted once into shared memory and each other worker
that takes children restores it once (the restored copy is kept for later forks of the same trunk).

Handles are ``PoolHandle`` objects: the worker that holds the sequence, the worker's session id, and the
sequence's token ids (the parent mirrors them, so a sequence lost with a worker can be rebuilt by
prefilling its tokens again).

Failures: every request has a deadline (``timeout_s``). A worker that dies (exit code, signal) or misses
its deadline (killed as hung) is reported with that cause, replaced by a fresh worker that loads the
current weights, and the part of the call it held is retried once on the replacement (its sequences are
rebuilt from their token ids). A second failure raises ``RuntimeError`` naming both; the pool itself stays
usable. A request never waits past its deadline and a completion is never dropped silently.

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
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from thaw_rl.backends.base import COUNTER_KEYS
from thaw_rl.engine.sampling import SamplingParams, params_per_session
from thaw_rl.pool.worker import Fault, PackedWeights
from thaw_rl.pool.worker_process import Pending, WorkerFailure, WorkerProcess, collect
from thaw_rl.engine.snapshot import KVSnapshot

logger = logging.getLogger(__name__)

PLACEMENTS = ("local_first", "spread")
_SUMMED_STATUS_KEYS = ("prompt_tokens_computed", "prompt_tokens_reused", "tokens_computed", "tokens_generated",
                       "num_forks", "num_snapshots", "snapshot_seconds", "export_seconds", "num_restores",
                       "restore_seconds", "snapshot_bytes", "restore_bytes")


@dataclass(eq=False)
class PoolHandle:
    """One sequence of the pool: which worker holds it, under which session id, and its tokens."""

    handle_id: int
    worker: int
    session_id: int
    incarnation: int  # the worker process it lives in; a replaced worker's sessions are gone
    token_ids: list[int]
    num_prompt_tokens: int
    pool_id: int
    freed: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        state = "freed" if self.freed else f"{self.num_tokens} tokens"
        return f"PoolHandle(id={self.handle_id}, worker={self.worker}, {state})"


@dataclass
class PoolCompletion:
    """What ``generate`` produced for one handle (the handle keeps the tokens too)."""

    token_ids: list[int]
    logprobs: list[float]
    entropies: list[float]
    finish_reason: str
    handle: PoolHandle


class ForkPool:
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
            call of one worker's share included: size it to the longest rollout level).
        start_timeout_s: the longest a worker may take to build its model and engine.
        start_method: multiprocessing start method; "spawn" is the one that is safe with CUDA.
        placement: "local_first" keeps children in the trunk's worker while it has room (fewest transfers);
            "spread" balances live sequences over the workers (most parallel decoding).
        child_reserve_tokens: KV a child is expected to grow by before its next generate returns; a worker
            has room for a child while its free blocks cover this for every child forked there since.
        num_threads: torch threads per worker (default on CPU: the cores divided among the workers).
        seed: draws the seeds of requests whose ``SamplingParams.seed`` is None.

    Use it as a context manager or call ``close()``. One caller at a time (not thread-safe). Snapshots and
    weights travel through ``/dev/shm``, which must hold a trunk's KV (and, after ``update_weights``, one
    copy of the weights, kept for replacement workers).
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
    ) -> None:
        import torch.multiprocessing as torch_mp  # registers the shared-memory tensor reductions

        if placement not in PLACEMENTS:
            raise ValueError(f"placement={placement!r}: use one of {PLACEMENTS}.")
        if timeout_s <= 0 or start_timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s} and start_timeout_s={start_timeout_s} must be > 0 seconds.")
        if child_reserve_tokens < 0:
            raise ValueError(f"child_reserve_tokens={child_reserve_tokens} must be >= 0.")
        if devices is None:
            n_gpu = torch.cuda.device_count()
            devices = [f"cuda:{i}" for i in range(n_gpu)] if n_gpu else ["cpu"]
        devices = [str(torch.device(d)) for d in devices]
        if not devices:
            raise ValueError("devices=[]: give at least one device, or None for every visible GPU (else the CPU).")
        num_workers = len(devices) if num_workers is None else num_workers
        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers} must be >= 1.")
        if num_threads is None and all(d == "cpu" for d in devices):
            num_threads = max(1, (os.cpu_count() or 1) // num_workers)  # CPU workers share the cores
        self.timeout_s = float(timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        self.placement = placement
        self.child_reserve_tokens = child_reserve_tokens
        self._ctx = torch_mp.get_context(start_method)
        self._spawn = dict(model_factory=model_factory, engine_kwargs=dict(engine_kwargs or {}),
                           num_threads=num_threads)
        self._devices = [devices[i % len(devices)] for i in range(num_workers)]
        self._workers: list[WorkerProcess | None] = [None] * num_workers
        self._incarnations = itertools.count()
        self._faults: dict[int, list[Fault]] = {}  # test hooks kept for replacements
        self._closed = False
        self._finalizer = weakref.finalize(self, _close_all, self._workers)
        self._version = 0
        self._weights: PackedWeights | None = None  # the latest update, for replacements
        self._handle_ids = itertools.count()
        self._live: dict[int, PoolHandle] = {}
        self._growing: list[set[int]] = [set() for _ in range(num_workers)]  # forked, not yet generated
        self._snapshots: dict[int, KVSnapshot] = {}  # handle id -> its snapshot (for its current tokens)
        self._copies: dict[int, dict[int, tuple[int, int]]] = {}  # handle id -> worker -> (incarnation, sid)
        self._rng = random.Random(seed)
        self._retired: Counter = Counter()  # counters of replaced workers
        self._failures: list[str] = []
        self._fork_seconds = 0.0
        self._num_forks = 0
        try:
            self._start(list(range(num_workers)))
        except BaseException:
            self.close()
            raise
        info = self._workers[0].info
        self.block_size: int = info["block_size"]
        self.kv_bytes_per_token: int = info["kv_bytes_per_token"]
        self._weight_shapes: dict[str, tuple] = info["weights"]

    # -- RolloutBackend ------------------------------------------------------------------------------
    @property
    def num_workers(self) -> int:
        return len(self._workers)

    @property
    def version(self) -> int:
        """The weight version every worker holds (0 = the factory's weights; +1 per ``update_weights``)."""
        return self._version

    def prefill(self, prompts: Sequence[Sequence[int]], worker: int | None = None) -> list[PoolHandle]:
        """One handle per prompt; prompts are spread over the workers by token count (or all on ``worker``)."""
        self._check_open()
        prompts = [[int(t) for t in p] for p in prompts]
        if any(not p for p in prompts):
            raise ValueError("empty prompt: give at least one token id (e.g. the BOS token or a chat template).")
        if worker is not None and not 0 <= worker < self.num_workers:
            raise ValueError(f"worker={worker}: this pool has workers 0..{self.num_workers - 1}.")
        owners = [worker] * len(prompts) if worker is not None else self._spread(prompts)
        handles: list[PoolHandle | None] = [None] * len(prompts)
        todo = list(range(len(prompts)))
        first: dict[int, WorkerFailure] = {}
        for attempt in range(2):
            shares = _group(todo, owners)
            calls = {w: ("prefill", ([prompts[i] for i in idx],)) for w, idx in shares.items()}
            values, errors, failures = self._call_all(calls)
            for w, sids in values.items():
                for i, sid in zip(shares[w], sids):
                    handles[i] = self._new_handle(w, sid, prompts[i], len(prompts[i]))
            self._settle(errors, failures, first, attempt, "prefill", [h for h in handles if h is not None])
            todo = [i for i in todo if handles[i] is None]
            if not todo:
                break
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
        shares = Counter(self._place(handle, n))
        done: dict[int, list[PoolHandle]] = {}
        first: dict[int, WorkerFailure] = {}
        for attempt in range(2):
            todo = {w: k for w, k in shares.items() if w not in done}
            errors, failures = self._fork_shares(handle, todo, at, done)
            kids = [h for w in shares if w in done for h in done[w]]
            self._settle(errors, failures, first, attempt, "fork", kids)
            if len(done) == len(shares):
                break
        self._num_forks += 1
        self._fork_seconds += time.perf_counter() - start
        return kids

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
        first: dict[int, WorkerFailure] = {}
        for attempt in range(2):
            todo = [i for i in range(len(handles)) if results[i] is None]
            errors, failures = self._rebuild([handles[i] for i in todo])
            if not failures and not errors:
                shares = _group(todo, [h.worker for h in handles])
                calls = {w: ("generate", ([handles[i].session_id for i in idx], [plist[i] for i in idx],
                                          [seeds[i] for i in idx])) for w, idx in shares.items()}
                values, errors, failures = self._call_all(calls)
                for w, outs in values.items():
                    for i, (ids, lps, ents, reason) in zip(shares[w], outs):
                        h = handles[i]
                        self._changed(h)
                        h.token_ids.extend(ids)
                        results[i] = PoolCompletion(ids, lps, ents, reason, h)
            self._settle(errors, failures, first, attempt, "generate", [])
            if all(r is not None for r in results):
                break
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
        total = Counter(self._retired)
        for w in self._workers:
            if w is not None:
                total.update({k: w.status.get(k, 0) for k in _SUMMED_STATUS_KEYS})
        out = {
            "prefill_tokens": total["prompt_tokens_computed"],
            "decode_tokens": total["tokens_computed"] - total["prompt_tokens_computed"],
            "reused_tokens": total["prompt_tokens_reused"],
            "sampled_tokens": total["tokens_generated"],
            "num_forks": self._num_forks,
            "fork_seconds": self._fork_seconds,  # the caller's wall time in fork, snapshot and restore included
            "snapshot_seconds": total["snapshot_seconds"] + total["export_seconds"],
            "restore_seconds": total["restore_seconds"],
        }
        assert set(out) == set(COUNTER_KEYS)
        return out

    def update_weights(self, state_dict: dict | None = None) -> None:
        """Load ``state_dict`` into every worker and drop their prefix caches; the weight version goes up by one.

        When this returns, every worker holds the new version (a worker that failed to load was replaced
        by one started with the new weights), and every later request carries that version: a worker
        with other weights refuses it. The latest weights stay in shared memory for replacements.
        """
        self._check_open()
        if state_dict is None:
            raise ValueError(
                "ForkPool workers hold their own copies of the model: pass the new weights, e.g. "
                "pool.update_weights(model.state_dict()).")
        self._check_weights(state_dict)
        self._weights = PackedWeights.pack(state_dict, self._version + 1)
        self._version += 1
        self._drop_all_snapshots()  # they hold KV computed with the old weights
        calls = {w: ("load_weights", (self._weights,)) for w in range(self.num_workers)}
        for w in calls:
            self._workers[w].bytes_sent += self._weights.nbytes
        _, errors, failures = self._call_all(calls)
        for w, exc in errors.items():  # a load that raised may have left the worker half updated
            failures[w] = WorkerFailure(self._workers[w], "load_weights", f"raised {type(exc).__name__}: {exc}")
        self._settle({}, failures, {}, 0, "update_weights", [])  # the replacements start with the new weights

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
        workers = []
        for w in self._workers:
            s = w.status
            workers.append({
                "index": w.index, "pid": w.pid, "device": w.device, "incarnation": w.incarnation,
                "version": s.get("version"), "num_blocks": s.get("num_blocks"),
                "num_used_blocks": s.get("num_used_blocks"), "num_free_blocks": s.get("num_free_blocks"),
                "num_cached_blocks": s.get("num_cached_blocks"), "num_sessions": s.get("num_sessions"),
                "tokens_computed": s.get("tokens_computed"), "prompt_tokens_computed": s.get("prompt_tokens_computed"),
                "tokens_generated": s.get("tokens_generated"), "num_forks": s.get("num_forks"),
                "num_snapshots": s.get("num_snapshots"), "snapshot_bytes": s.get("snapshot_bytes"),
                "snapshot_seconds": s.get("snapshot_seconds"), "export_seconds": s.get("export_seconds"),
                "num_restores": s.get("num_restores"), "restore_bytes": s.get("restore_bytes"),
                "restore_seconds": s.get("restore_seconds"), "busy_seconds": s.get("busy_seconds"),
                "num_weight_loads": s.get("num_weight_loads"), "bytes_sent": w.bytes_sent, "num_calls": w.num_calls,
                "call_seconds": w.call_seconds, "uptime_seconds": time.perf_counter() - w.started,
            })
        return {"version": self._version, "placement": self.placement, "workers": workers,
                "num_replacements": len(self._failures), "failures": list(self._failures),
                "num_live_handles": len(self._live), "num_cached_snapshots": len(self._snapshots),
                "retired": dict(self._retired), **self.counters()}

    def close(self) -> None:
        """Ask every worker to exit, kill those that do not, reap them all. Idempotent."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> ForkPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ForkPool({self.num_workers} worker(s) on {sorted(set(self._devices))}, version={self._version}, "
                f"placement={self.placement!r}{', closed' if self._closed else ''})")

    # -- placement -----------------------------------------------------------------------------------
    def _blocks_per_child(self) -> int:
        return -(-self.child_reserve_tokens // self.block_size) + 1  # its own tokens + the copied partial block

    def _room(self, w: int) -> int:
        """Free KV blocks of worker w minus what its forked, not yet generated children will take."""
        free = self._workers[w].status.get("num_free_blocks", 0)
        return free - self._blocks_per_child() * len(self._growing[w])

    def _place(self, handle: PoolHandle, n: int) -> list[int]:
        per_child, home = self._blocks_per_child(), handle.worker
        room = [self._room(w) for w in range(self.num_workers)]
        load = Counter(h.worker for h in self._live.values())
        plan = []
        for _ in range(n):
            if self.placement == "local_first" and room[home] >= per_child:
                w = home
            elif self.placement == "local_first":
                w = max(range(self.num_workers), key=lambda v: (room[v], v == home, -v))
            else:
                fits = [v for v in range(self.num_workers) if room[v] >= per_child] or range(self.num_workers)
                w = min(fits, key=lambda v: (load[v], v != home, v))
            plan.append(w)
            room[w] -= per_child
            load[w] += 1
        return sorted(plan, key=lambda v: (v != home, v))

    def _spread(self, prompts: list[list[int]]) -> list[int]:
        """Each prompt to the worker with the fewest prompt tokens so far in this call (ties: most room)."""
        tokens = [0] * self.num_workers
        owners = []
        for p in prompts:
            w = min(range(self.num_workers), key=lambda v: (tokens[v], -self._room(v), v))
            owners.append(w)
            tokens[w] += len(p)
        return owners

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
        snapshot = None
        if stale:
            snapshot, errors, failures = self._snapshot(handle)
            if snapshot is None:
                return errors, failures
        calls = {}
        for w, k in shares.items():
            if w == home:
                source = handle.session_id
            elif w in stale:
                source = snapshot
                self._workers[w].bytes_sent += snapshot.nbytes
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

    def _snapshot(self, handle: PoolHandle) -> tuple[KVSnapshot | None, dict, dict]:
        """The handle's snapshot in shared memory, taken once per token state."""
        snap = self._snapshots.get(handle.handle_id)
        if snap is not None and snap.num_tokens == handle.num_tokens:
            return snap, {}, {}
        values, errors, failures = self._call_all({handle.worker: ("snapshot", (handle.session_id,))})
        snap = values.get(handle.worker)
        if snap is not None:
            self._snapshots[handle.handle_id] = snap
        return snap, errors, failures

    def _changed(self, handle: PoolHandle) -> None:
        """The handle's tokens change or it is freed: its snapshot and restored copies no longer match."""
        self._snapshots.pop(handle.handle_id, None)
        self._growing[handle.worker].discard(handle.handle_id)
        for w, (incarnation, sid) in self._copies.pop(handle.handle_id, {}).items():
            if self._workers[w].incarnation == incarnation:
                self._workers[w].send_no_reply("free", ([sid],))

    def _drop_all_snapshots(self) -> None:
        self._snapshots.clear()
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

    def _check_weights(self, state_dict: dict) -> None:
        unknown = [k for k in state_dict if k not in self._weight_shapes]
        if unknown:
            raise ValueError(f"update_weights: {len(unknown)} names are not in the workers' model, e.g. {unknown[:3]}; "
                             f"pass model.state_dict() of the same architecture.")
        for name, t in state_dict.items():
            shape = self._weight_shapes[name][0]
            if tuple(t.shape) != shape:
                raise ValueError(f"update_weights: {name} has shape {tuple(t.shape)}, the workers' model has {shape}.")

    # -- calls, failures, replacement --------------------------------------------------------------------
    def _call_all(self, calls: dict[int, tuple[str, tuple]], version: int | None = None) -> tuple[dict, dict, dict]:
        """Send each worker its request, wait for all; (values, the workers' exceptions, WorkerFailures)."""
        version = self._version if version is None else version
        pending = [self._workers[w].send(op, args, version, self.timeout_s) for w, (op, args) in calls.items()]
        values, errors, failures = {}, {}, {}
        for w, outcome in collect(pending).items():
            if isinstance(outcome, WorkerFailure):
                failures[w] = outcome
            elif isinstance(outcome, BaseException):
                errors[w] = outcome
            else:
                values[w] = outcome
        return values, errors, failures

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
        old.kill()
        self._retired.update({k: old.status.get(k, 0) for k in _SUMMED_STATUS_KEYS})
        self._failures.append(str(failure))
        logger.warning("%s; replacing it with a fresh worker", failure)
        self._growing[index].clear()
        for copies in self._copies.values():
            copies.pop(index, None)
        self._start([index])

    def _start(self, indices: list[int]) -> None:
        """Start workers, wait until each has built its engine, then load the current weights."""
        for i in indices:
            self._workers[i] = WorkerProcess(self._ctx, i, self._devices[i], faults=self._faults.get(i, []),
                                             parent_pid=os.getpid(), **self._spawn)
            self._workers[i].incarnation = next(self._incarnations)
        ready = collect([Pending(self._workers[i], 0, "start", time.perf_counter(), self.start_timeout_s)
                         for i in indices])
        problems = [f"worker {i} on {self._devices[i]}: {r}" for i, r in ready.items() if isinstance(r, BaseException)]
        if problems:
            for i in indices:
                self._workers[i].kill()
            raise RuntimeError(f"ForkPool could not start {len(problems)} worker(s): {'; '.join(problems)}")
        for i, info in ready.items():
            self._workers[i].info = info
            self._workers[i].call_seconds = 0.0  # count requests, not the start
        if self._weights is not None:
            for i in indices:
                self._workers[i].bytes_sent += self._weights.nbytes
            _, errors, failures = self._call_all({i: ("load_weights", (self._weights,)) for i in indices})
            if errors or failures:
                for i in indices:
                    self._workers[i].kill()
                raise RuntimeError(f"ForkPool's new worker(s) could not load weights version {self._version}: "
                                   f"{list(errors.values()) + list(failures.values())}")

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


def _close_all(workers: list[WorkerProcess | None], timeout_s: float = 10.0) -> None:
    """Ask all to exit at once, then reap each (killing what is still alive at the deadline)."""
    live = [w for w in workers if w is not None]
    for w in live:
        w.request_close()
    deadline = time.perf_counter() + timeout_s
    for w in live:
        w.close(max(0.0, deadline - time.perf_counter()))
