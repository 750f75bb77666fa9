"""Where a ForkPool puts new sequences: pure functions of the workers' room and load, no processes.

Why pure: placement decides how many snapshots move between devices (the expensive part of a cross-worker
fork) and how evenly the workers decode. As functions of plain numbers they are tested exactly, without
starting a worker, and the pool only feeds them the latest free-block counts its workers reported.
"""

from __future__ import annotations

from typing import Sequence

PLACEMENTS = ("local_first", "spread")


def blocks_per_child(child_reserve_tokens: int, block_size: int) -> int:
    """KV blocks one forked child is expected to take: its growth plus the copied partial last block."""
    return -(-child_reserve_tokens // block_size) + 1


def place_children(room: Sequence[int], load: Sequence[int], home: int, n: int, per_child: int,
                   placement: str) -> list[int]:
    """The worker of each of ``n`` children of a sequence held by worker ``home``, home's children first.

    ``room[w]``: free blocks of worker w minus what its pending children will take; ``load[w]``: live
    sequences on w. "local_first" keeps children at home while it has ``per_child`` blocks of room (no
    transfer), then takes the worker with the most room (ties: home, then the lowest index). "spread"
    gives each child to the least loaded worker that has room (ties: home, then the lowest index); when
    none has room, to the least loaded of all.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r}: use one of {PLACEMENTS}.")
    room, load = list(room), list(load)
    workers = range(len(room))
    plan = []
    for _ in range(n):
        if placement == "local_first" and room[home] >= per_child:
            w = home
        elif placement == "local_first":
            w = max(workers, key=lambda v: (room[v], v == home, -v))
        else:
            fits = [v for v in workers if room[v] >= per_child] or workers
            w = min(fits, key=lambda v: (load[v], v != home, v))
        plan.append(w)
        room[w] -= per_child
        load[w] += 1
    return sorted(plan, key=lambda v: (v != home, v))


def spread_prompts(lengths: Sequence[int], room: Sequence[int]) -> list[int]:
    """The worker of each prompt: the one with the fewest prompt tokens so far (ties: most room, lowest index)."""
    tokens = [0] * len(room)
    owners = []
    for n in lengths:
        w = min(range(len(room)), key=lambda v: (tokens[v], -room[v], v))
        owners.append(w)
        tokens[w] += n
    return owners
