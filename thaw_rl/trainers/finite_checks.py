"""No non-finite weights, ever: gradients are checked before each optimizer step, weights before each save.

A NaN or inf gradient (a diverged loss, an overflow) applied by the optimizer turns every weight it
touches into NaN; HF's Trainer logs the step (``logging_nan_inf_filter`` even hides the loss) and then
writes the NaN model as a checkpoint. The thaw-rl trainers stop instead, at the first step whose
gradients are not finite, naming the parameter and the step, and ``_save`` refuses a state dict with a
non-finite tensor, so no checkpoint on disk is ever NaN.

Under fp16 with a gradient scaler inf gradients are expected (the scaler skips the step and lowers its
scale), so the gradient check stands aside there; the save check still runs. Gradients sharded by ZeRO
live outside ``p.grad`` and are not checked.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import TrainerCallback


class NonFiniteError(RuntimeError):
    """Training produced a NaN or inf gradient or weight; nothing was applied or saved."""


def first_non_finite(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or inf (one device sync), else None."""
    named = [(n, t) for n, t in named_tensors if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    if not named:
        return None
    finite = torch.stack([t.detach().isfinite().all().to(named[0][1].device) for _, t in named])  # (K,)
    if bool(finite.all()):
        return None
    return named[int((~finite).nonzero()[0, 0])][0]


def check_finite_state_dict(state_dict: dict, output_dir: str | None) -> None:
    """Refuse to save a state dict with a non-finite tensor (raises ``NonFiniteError``)."""
    name = first_non_finite(state_dict.items())
    if name is not None:
        raise NonFiniteError(
            f"refusing to save {output_dir or 'the model'}: weight {name!r} holds NaN or inf, so the model is broken; "
            f"nothing was written. Resume from the last good checkpoint with a lower learning_rate (or max_grad_norm).")


class FiniteGradientGuard(TrainerCallback):
    """Stops training at the first optimizer step whose gradients hold NaN or inf (before they are applied)."""

    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None or getattr(self.accelerator, "scaler", None) is not None:
            return
        name = first_non_finite((n, p.grad) for n, p in model.named_parameters() if p.grad is not None)
        if name is not None:
            raise NonFiniteError(
                f"optimizer step {state.global_step + 1}: the gradient of {name!r} holds NaN or inf (after clipping to "
                f"max_grad_norm one NaN is in every gradient); the step was not applied and training stopped before "
                f"any weight became NaN. Look at the loss and rewards logged "
                f"before this step; lower learning_rate, set max_grad_norm, or use bf16/fp32 instead of fp16.")

