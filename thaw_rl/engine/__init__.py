"""Native paged-KV engine over Hugging Face causal LMs (see engine.py for the design)."""

from thaw_rl.engine.block_manager import BlockManager, KVCacheExhaustedError
from thaw_rl.engine.engine import (
    SUPPORTED_MODEL_TYPES,
    Completion,
    EngineStats,
    ThawEngine,
)
from thaw_rl.engine.sampling import SamplingParams
from thaw_rl.engine.scheduler import Scheduler
from thaw_rl.engine.session import Session
from thaw_rl.engine.snapshot import KVSnapshot
from thaw_rl.engine.snapshot_handle import SnapshotHandle

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "BlockManager",
    "Completion",
    "EngineStats",
    "KVCacheExhaustedError",
    "KVSnapshot",
    "SamplingParams",
    "Scheduler",
    "Session",
    "SnapshotHandle",
    "ThawEngine",
]
