"""SnapshotHandle: a snapshot whose copy to host memory may still be in flight.

``ThawEngine.snapshot_async`` holds the session's blocks (refcount + 1) and starts the gather on the
engine's copy stream; the handle gives the blocks back once the copy has read them, and wraps the
pooled host buffer in a ``KVSnapshot`` that returns the buffer to the pool when it is garbage collected
(``host_pool=None``: the gather wrote into a buffer the caller gave, which stays the caller's).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Callable

import torch

from thaw_rl.engine.snapshot import KVSnapshot

if TYPE_CHECKING:
    from thaw_rl_kernels.host_transfer import TransferHandle


class SnapshotHandle:
    """A snapshot in flight: ``done()`` polls, ``wait()`` blocks and returns the ``KVSnapshot``.

    The session's blocks are held until ``wait()``; always wait (or the blocks stay taken).
    """

    def __init__(self, transfer: TransferHandle, release_blocks: Callable[[], None], host_pool, fields: dict) -> None:
        self._transfer = transfer
        self._release_blocks = release_blocks
        self._host_pool = host_pool
        self._fields = fields
        self._snapshot: KVSnapshot | None = None
        if transfer.done():  # a synchronous copy (no CUDA): nothing to hold
            self._give_back_blocks()

    def done(self) -> bool:
        return self._snapshot is not None or self._transfer.done()

    def wait(self) -> KVSnapshot:
        if self._snapshot is None:
            kv = self._transfer.wait()
            self._give_back_blocks()
            fields = dict(self._fields)
            if fields["next_logits"] is not None:
                fields["next_logits"] = fields["next_logits"].to("cpu", torch.float32, copy=True)  # (V,)
            release = None  # a caller's ``out`` stays the caller's; a pooled buffer goes back when kv dies
            if self._host_pool is not None:
                release = weakref.finalize(kv, self._host_pool.release, kv.view(-1)[:0])  # another view: kv may die
            self._snapshot = KVSnapshot(**fields, kv=kv, _release=release)
        return self._snapshot

    def _give_back_blocks(self) -> None:
        if self._release_blocks is not None:
            self._release_blocks()
            self._release_blocks = None
