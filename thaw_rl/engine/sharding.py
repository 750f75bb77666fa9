"""What the engine must know about a model sharded by FSDP2 (``fully_shard``), which it runs as is.

Under FSDP2 each forward unshards the parameters through hooks and casts them to the mixed-precision
policy's ``param_dtype``; the engine does not unwrap that, it only (1) runs under ``no_grad`` instead of
``inference_mode`` (the unshard hook reads version counters, which inference tensors lack) and (2) sizes
its KV cache in the dtype the layers compute in, not the dtype the sharded parameters are stored in.
"""

from __future__ import annotations

import torch


def fsdp2_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``model`` that FSDP2's ``fully_shard`` wrapped (none without torch.distributed)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the model's layers compute in: FSDP2's ``MixedPrecisionPolicy.param_dtype`` if one is set,
    else the parameters' own dtype."""
    for module in fsdp2_modules(model):
        state = module._get_fsdp_state()  # FSDP2 keeps the policy on its state; there is no public getter
        policy = getattr(state, "_mp_policy", None)
        if policy is not None and policy.param_dtype is not None:
            return policy.param_dtype
    return next(model.parameters()).dtype
