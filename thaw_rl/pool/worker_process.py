"""``WorkerProcess``: the parent's end of one worker: start it, send requests, wait with a deadline, kill it.

Why deadlines everywhere: a worker can die (OOM killer, a CUDA fault, a signal) or hang (a deadlocked
collective, a stuck kernel). The parent never blocks on a pipe without a deadline: ``collect`` waits on
the reply pipes *and* the process sentinels together, so a death is seen at once and a hang when its
deadline passes. Either becomes a ``WorkerFailure`` that says which worker and why (exit code, signal,
or timeout); the pool decides whether to replace the worker and retry.
"""

from __future__ import annotations

import itertools
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_any
from typing import Any

from thaw_rl.pool.worker import Fault, Reply, Request, run_worker

_POLL_SECONDS = 1.0  # upper bound on one wait, so deadlines are checked even when nothing happens


class WorkerFailure(Exception):
    """A worker died or did not answer in time (internal: the pool turns it into a retry or a RuntimeError)."""

    def __init__(self, worker: WorkerProcess, op: str, cause: str) -> None:
        super().__init__(f"ForkPool worker {worker.index} (pid {worker.pid}, {worker.device}) {cause} during {op}")
        self.worker_index = worker.index
        self.pid = worker.pid
        self.op = op
        self.cause = cause


@dataclass
class Pending:
    """A request sent to a worker and not yet answered (``cause`` set: it could not even be sent)."""

    worker: WorkerProcess
    req_id: int
    op: str
    sent: float
    timeout_s: float
    cause: str | None = None

    @property
    def deadline(self) -> float:
        return self.sent + self.timeout_s


class WorkerProcess:
    """One worker process (``worker.run_worker``) and the pipe to it."""

    _req_ids = itertools.count(1)

    def __init__(self, ctx, index: int, device: str, model_factory, engine_kwargs: dict, num_threads: int | None,
                 faults: list[Fault], parent_pid: int) -> None:
        self.index, self.device = index, device
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(
            target=run_worker, name=f"thaw-forkpool-{index}", daemon=True,
            args=(child_conn, parent_pid, model_factory, device, engine_kwargs, num_threads, list(faults)),
        )
        self.process.start()
        child_conn.close()  # only the child holds its end: its death reads as EOF here
        self.info: dict = {}
        self.status: dict = {}
        self.num_calls = 0
        self.call_seconds = 0.0
        self.bytes_sent = 0  # snapshot and weight bytes handed to this worker
        self.started = time.perf_counter()
        self.incarnation = -1  # set by the pool: which process this slot holds
        self.closed = False
        self.stop_cause = ""  # why the parent killed it

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def stopped_cause(self) -> str | None:
        """Why this worker cannot take a request (killed by the pool, or its process exited), None if it can."""
        if self.closed:
            return f"is not running (stopped earlier: {self.stop_cause})"
        return None if self.process.is_alive() else self.exit_cause()

    # -- requests ----------------------------------------------------------------------------------
    def send(self, op: str, args: tuple, version: int, timeout_s: float) -> Pending:
        req_id = next(self._req_ids)
        pending = Pending(self, req_id, op, time.perf_counter(), timeout_s)
        self.num_calls += 1
        if self.closed:  # killed earlier (e.g. its start failed): the pool replaces it on this failure
            pending.cause = self.stopped_cause()
            return pending
        try:
            self.conn.send(Request(req_id, op, version, args))
        except (OSError, ValueError) as e:  # a broken pipe: dead or wedged
            alive = self.process.is_alive()
            self.kill(f"could not be sent a request ({type(e).__name__}: {e})")
            pending.cause = f"could not be sent a request ({type(e).__name__}: {e}); killed it" if alive \
                else self.exit_cause()
        return pending

    def send_no_reply(self, op: str, args: tuple) -> None:
        """Fire and forget (``free``); a dead worker is noticed by the next call that waits."""
        try:
            self.conn.send(Request(next(self._req_ids), op, 0, args))
        except (OSError, ValueError):
            pass

    def call(self, op: str, args: tuple = (), version: int = 0, timeout_s: float = 60.0) -> Any:
        """Send one request and wait for its value; raises WorkerFailure or the worker's exception."""
        (outcome,) = collect([self.send(op, args, version, timeout_s)]).values()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    # -- lifetime ------------------------------------------------------------------------------------
    def exit_cause(self) -> str:
        code = self.process.exitcode
        if code is None:
            return "is running"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = str(-code)
            hint = " (the kernel's OOM killer also sends SIGKILL)" if -code == signal.SIGKILL else ""
            return f"was killed by signal {name}{hint}"
        return f"exited with code {code}"

    def kill(self, cause: str = "killed by the pool") -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10.0)
        self.conn.close()
        if not self.closed:
            self.stop_cause = cause
        self.closed = True

    def request_close(self) -> None:
        """Ask the worker to exit after its current request (no wait)."""
        if not self.closed and self.process.is_alive():
            try:
                self.conn.send(Request(0, "close", 0, ()))
            except (OSError, ValueError):
                pass

    def close(self, timeout_s: float = 10.0) -> None:
        """Ask the worker to exit, kill it if it has not within timeout_s; reaps it either way."""
        if self.closed:
            return
        self.request_close()
        self.process.join(timeout_s)
        self.kill()


def collect(pending: list[Pending]) -> dict[int, Any]:
    """Wait for every pending request; worker index -> value, the worker's exception, or a WorkerFailure.

    Never blocks past the latest deadline. A worker that died is reported with its exit code or signal;
    one that missed its deadline is killed and reported as hung. Replies of other requests are dropped.
    """
    out: dict[int, Any] = {}
    waiting = {p.worker.index: p for p in pending}
    for p in pending:
        if p.cause is not None:
            out[p.worker.index] = WorkerFailure(p.worker, p.op, p.cause)
            del waiting[p.worker.index]
    while waiting:
        now = time.perf_counter()
        timeout = max(0.0, min(min(p.deadline for p in waiting.values()) - now, _POLL_SECONDS))
        objects = [o for p in waiting.values() for o in (p.worker.conn, p.worker.process.sentinel)]
        wait_any(objects, timeout=timeout)
        for index, p in list(waiting.items()):
            outcome = _poll(p)
            if outcome is not _NOTHING:
                out[index] = outcome
                del waiting[index]
    return out


_NOTHING = object()


def _poll(p: Pending) -> Any:
    """The outcome of ``p`` if it is known now, else ``_NOTHING``."""
    w = p.worker
    try:
        while w.conn.poll(0):
            reply: Reply = w.conn.recv()
            if reply.req_id != p.req_id:
                continue  # an answer to a request that was given up on
            if reply.status is not None:
                w.status = reply.status
            w.call_seconds += time.perf_counter() - p.sent
            if reply.ok:
                return reply.value
            exc, text = reply.value
            exc.add_note(f"(raised in ForkPool worker {w.index}, pid {w.pid}, during {p.op})\n{text}")
            return exc
    except (EOFError, OSError):
        w.process.join(5.0)
        if w.process.is_alive():
            w.kill()
            return WorkerFailure(w, p.op, "closed its pipe but did not exit within 5 s; killed it")
        return WorkerFailure(w, p.op, w.exit_cause())
    if not w.process.is_alive():
        w.process.join(5.0)
        return WorkerFailure(w, p.op, w.exit_cause())
    if time.perf_counter() >= p.deadline:
        w.kill()
        return WorkerFailure(w, p.op, f"sent no reply within timeout_s={p.timeout_s:g} (hung); killed it")
    return _NOTHING
