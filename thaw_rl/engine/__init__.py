"""Native paged-KV engine over Hugging Face causal LMs (see engine.py for the design)."""

from thaw_rl.engine.engine import (
    SUPPORTED_MODEL_TYPES,
    Completion,
    EngineStats,
    KVCacheExhaustedError,
    ThawEngine,
)
from thaw_rl.engine.sampling import SamplingParams
from thaw_rl.engine.session import Session

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "Completion",
    "EngineStats",
    "KVCacheExhaustedError",
    "SamplingParams",
    "Session",
    "ThawEngine",
]
