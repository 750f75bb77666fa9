"""thaw-rl: forked-KV rollouts for RL post-training.

Compute each shared prefix once, fork its KV cache copy-on-write, and hand the rollouts (with their
sampling logprobs and tree structure) to TRL trainers.
"""

from thaw_rl.engine import (
    Completion,
    EngineStats,
    KVCacheExhaustedError,
    KVSnapshot,
    SamplingParams,
    Session,
    ThawEngine,
)
from thaw_rl.backends import NativeBackend
from thaw_rl.rollout import RolloutBatch, RolloutStats, TreeSampler, TreeSpec
from thaw_rl.pool import ForkPool

__version__ = "0.1.0"

__all__ = [
    "Completion",
    "EngineStats",
    "ForkPool",
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

# The trainers import TRL, which is slow and absent on the GPU benchmark machines: load them on first use.
_TRAINER_NAMES = ("ThawGRPOTrainer", "ThawGRPOConfig", "ThawBestOfNTrainer", "ThawBestOfNConfig", "ThawPPOTrainer",
                  "ThawPPOConfig")


def __getattr__(name: str):
    if name in _TRAINER_NAMES:
        from thaw_rl import trainers

        return getattr(trainers, name)
    raise AttributeError(f"module 'thaw_rl' has no attribute {name!r}")
