"""thaw-rl: forked-KV rollouts for RL post-training.

Compute each shared prefix once, fork its KV cache copy-on-write, and hand the rollouts (with their
sampling logprobs and tree structure) to TRL trainers.

The public names below are imported on first use (PEP 562), so ``import thaw_rl`` is cheap: the
``thaw-rl`` command answers ``--help`` and ``list`` without importing torch, and the trainers (which
import TRL, absent on the GPU benchmark machines) load only when asked for.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "Completion": "thaw_rl.engine",
    "EngineStats": "thaw_rl.engine",
    "KVCacheExhaustedError": "thaw_rl.engine",
    "SamplingParams": "thaw_rl.engine",
    "Session": "thaw_rl.engine",
    "ThawEngine": "thaw_rl.engine",
    "KVSnapshot": "thaw_rl.engine",
    "NativeBackend": "thaw_rl.backends",
    "RolloutBatch": "thaw_rl.rollout",
    "RolloutStats": "thaw_rl.rollout",
    "TreeSampler": "thaw_rl.rollout",
    "TreeSpec": "thaw_rl.rollout",
    "ForkPool": "thaw_rl.pool",
    "ThawGRPOTrainer": "thaw_rl.trainers",
    "ThawGRPOConfig": "thaw_rl.trainers",
    "ThawBestOfNTrainer": "thaw_rl.trainers",
    "ThawBestOfNConfig": "thaw_rl.trainers",
    "ThawPPOTrainer": "thaw_rl.trainers",
    "ThawPPOConfig": "thaw_rl.trainers",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'thaw_rl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
