"""thaw-rl: forked-KV rollouts for RL post-training.

Compute each shared prefix once, fork its KV cache copy-on-write, and hand the rollouts (with their
sampling logprobs and tree structure) to TRL trainers.
"""

from thaw_rl.engine import (
    Completion,
    EngineStats,
    KVCacheExhaustedError,
    SamplingParams,
    Session,
    ThawEngine,
)
from thaw_rl.snapshot import KVSnapshot
from thaw_rl.backends import NativeBackend
from thaw_rl.rollout import RolloutBatch, RolloutStats, TreeSampler, TreeSpec

__version__ = "0.1.0"

__all__ = [
    "Completion",
    "EngineStats",
    "KVCacheExhaustedError",
    "KVSnapshot",
    "NativeBackend",
    "RolloutBatch",
    "RolloutStats",
    "SamplingParams",
    "Session",
    "ThawEngine",
    "TreeSampler",
    "TreeSpec",
]
