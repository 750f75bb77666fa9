"""Generation backends behind one protocol (``RolloutBackend``): the native engine and vLLM.

``VLLMBackend`` is imported lazily (``thaw_rl.backends.vllm_backend``) so that importing thaw_rl never imports vLLM.
"""

from thaw_rl.backends.base import COUNTER_KEYS, CompletionLike, Handle, RolloutBackend
from thaw_rl.backends.native import NativeBackend

__all__ = ["COUNTER_KEYS", "CompletionLike", "Handle", "NativeBackend", "RolloutBackend", "VLLMBackend"]


def __getattr__(name: str):
    if name == "VLLMBackend":
        from thaw_rl.backends.vllm_backend import VLLMBackend

        return VLLMBackend
    raise AttributeError(f"module 'thaw_rl.backends' has no attribute {name!r}")
