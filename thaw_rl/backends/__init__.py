"""Generation backends behind one protocol (``RolloutBackend``): the native engine, later vLLM."""

from thaw_rl.backends.base import COUNTER_KEYS, CompletionLike, Handle, RolloutBackend
from thaw_rl.backends.native import NativeBackend

__all__ = ["COUNTER_KEYS", "CompletionLike", "Handle", "NativeBackend", "RolloutBackend"]
