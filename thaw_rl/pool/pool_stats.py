"""A ForkPool's numbers, computed in one place from the statuses its workers sent with their last replies.

Why one place: ``counters()`` (the rollout-backend protocol's cumulative counters), ``stats()`` (per worker)
and the retired counts of replaced workers must agree, so each reads the same status keys through the
functions here instead of each naming its own.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Iterable

from thaw_rl.backends.base import COUNTER_KEYS

# counters that add up over workers (and over the replaced processes of a slot)
# trunks a worker imported, by transport (worker.WorkerCounters)
TRUNK_STATUS_KEYS = tuple(f"{k}_{t}" for t in ("host", "device")
                          for k in ("num_trunks", "trunk_bytes", "trunk_seconds"))
# where a cross-worker fork's time goes (worker.WorkerCounters): the source's export, the destination's import
FORK_BREAKDOWN_KEYS = ("export_alloc_seconds", "export_gather_seconds", "export_share_seconds", "num_export_allocs",
                       "num_export_handles", "import_open_seconds", "import_copy_seconds", "num_import_opens",
                       "num_import_reuses")
SUMMED_STATUS_KEYS = ("prompt_tokens_computed", "prompt_tokens_reused", "tokens_computed", "tokens_generated",
                      "num_forks", "num_cascade_steps", "num_snapshots", "snapshot_seconds", "num_restores",
                      "restore_seconds", "snapshot_bytes", "restore_bytes", "num_weight_loads", "weight_load_seconds", *TRUNK_STATUS_KEYS,
                      *FORK_BREAKDOWN_KEYS)
# what ``stats()`` shows per worker, straight from its status
WORKER_STATUS_KEYS = ("version", "num_blocks", "num_used_blocks", "num_free_blocks", "num_cached_blocks",
                      "num_sessions", "tokens_computed", "prompt_tokens_computed", "tokens_generated", "num_forks",
                      "num_snapshots", "snapshot_bytes", "snapshot_seconds", "num_restores", "restore_bytes",
                      "restore_seconds", "busy_seconds", "num_weight_loads", "weight_load_seconds", *TRUNK_STATUS_KEYS,
                      *FORK_BREAKDOWN_KEYS, "num_trunk_exports", "num_idle_trunk_buffers", "num_export_buffers")


def summed(statuses: Iterable[dict]) -> Counter:
    """The summed counters of the given worker statuses."""
    total: Counter = Counter()
    for s in statuses:
        total.update({k: s.get(k, 0) for k in SUMMED_STATUS_KEYS})
    return total


def backend_counters(total: Counter, num_forks: int, fork_seconds: float) -> dict[str, float]:
    """The ``RolloutBackend.counters()`` of a pool whose workers' summed counters are ``total``."""
    out = {
        "prefill_tokens": total["prompt_tokens_computed"],
        "decode_tokens": total["tokens_computed"] - total["prompt_tokens_computed"],
        "reused_tokens": total["prompt_tokens_reused"],
        "sampled_tokens": total["tokens_generated"],
        "num_forks": num_forks,
        "fork_seconds": fork_seconds,  # the caller's wall time in fork, snapshot and restore included
        "snapshot_seconds": total["snapshot_seconds"],
        "restore_seconds": total["restore_seconds"],
        "cascade_steps": total["num_cascade_steps"],
    }
    assert set(out) == set(COUNTER_KEYS)
    return out


def transfer_stats(total: Counter) -> dict:
    """Trunks moved between workers, by transport: how many, their bytes, and the destinations' seconds to make
    them readable (mapping/registering shared memory, or opening a CUDA IPC handle and the peer copy); the
    gather into the export buffer is ``snapshot_seconds``, the scatter into blocks ``restore_seconds``."""
    out = {t: {"num": int(total[f"num_trunks_{t}"]), "bytes": int(total[f"trunk_bytes_{t}"]),
               "seconds": float(total[f"trunk_seconds_{t}"])} for t in ("host", "device")}
    return {"transfer_bytes": sum(v["bytes"] for v in out.values()),
            "transfer_seconds": sum(v["seconds"] for v in out.values()), "transfer": out,
            "fork_breakdown": {k: total[k] for k in FORK_BREAKDOWN_KEYS}}


def worker_row(worker) -> dict:
    """One ``WorkerProcess``'s line of ``ForkPool.stats()``."""
    row = {"index": worker.index, "pid": worker.pid, "device": worker.device, "incarnation": worker.incarnation}
    row.update({k: worker.status.get(k) for k in WORKER_STATUS_KEYS})
    row.update(bytes_sent=worker.bytes_sent, num_calls=worker.num_calls, call_seconds=worker.call_seconds,
               uptime_seconds=time.perf_counter() - worker.started)
    return row
