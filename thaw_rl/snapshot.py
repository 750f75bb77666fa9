"""Moved to ``thaw_rl.engine.snapshot``; this name stays so existing imports keep working."""

from thaw_rl.engine.snapshot import (  # noqa: F401
    FORMAT_VERSION,
    MAGIC,
    KVSnapshot,
    NotASnapshotFileError,
    SnapshotCorruptedError,
    SnapshotFileError,
    SnapshotMismatchError,
    SnapshotTruncatedError,
    check_fingerprint,
)
from thaw_rl.engine.snapshot_handle import SnapshotHandle  # noqa: F401
