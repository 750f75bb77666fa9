"""Pause DeepSpeed's forward hooks while the engine generates with the module DeepSpeed wraps.

``DeepSpeedEngine`` hooks every forward of its module (``module_forward_pre_hook`` and
``module_forward_post_hook``, whatever the ZeRO stage) to run its training-step bookkeeping. From the
engine's third step on, the pre-hook's throughput timer calls ``torch.cuda.synchronize()`` on every
forward; inside a CUDA graph capture that invalidates the capture (measured on an H100: every capture
after two training steps failed, under ZeRO-0, -1 and -2, bf16 or fp32, and none without DeepSpeed), and
outside one it is a device sync per decode step. Generation forwards are not training forwards, so the
hooks are removed for the duration and re-created the way DeepSpeed itself does when it toggles them
(``_create_module_forward_pre_hook`` / ``_create_module_forward_post_hook``).

ZeRO-3 keeps its hooks: there the pre-hook also marks partitioned parameters as in a forward, and the
engine runs without CUDA graphs anyway (parameters are gathered anew for each generation).
"""

from __future__ import annotations

import contextlib
from typing import Iterator


def _pausable(ds_engine) -> bool:
    return all(hasattr(ds_engine, name) for name in (
        "module_forward_pre_hook", "module_forward_post_hook", "_create_module_forward_pre_hook",
        "_create_module_forward_post_hook"))


@contextlib.contextmanager
def paused_deepspeed_forward_hooks(ds_engine, zero_stage: int | None) -> Iterator[bool]:
    """Remove ``ds_engine``'s module forward hooks inside the block; yields whether it did."""
    if ds_engine is None or (zero_stage or 0) >= 3 or not _pausable(ds_engine):
        yield False
        return
    pre, post = ds_engine.module_forward_pre_hook, ds_engine.module_forward_post_hook
    if pre is None and post is None:  # already off (DeepSpeed's compiled mode removes them too)
        yield False
        return
    for handle in (pre, post):
        if handle is not None:
            handle.remove()
    ds_engine.module_forward_pre_hook = ds_engine.module_forward_post_hook = None
    try:
        yield True
    finally:
        if pre is not None:
            ds_engine.module_forward_pre_hook = ds_engine._create_module_forward_pre_hook()
        if post is not None:
            ds_engine.module_forward_post_hook = ds_engine._create_module_forward_post_hook()
