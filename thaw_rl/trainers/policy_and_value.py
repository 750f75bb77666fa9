"""``PolicyAndValueHead``: the one module ThawPPOTrainer trains, holding the user's policy and the trainer's critic.

Why one wrapper module (TRL's old ``PolicyAndValueWrapper``, trl/trainer/ppo_trainer.py up to TRL 0.2x, did
the same "so we can do a single ``model = accelerator.prepare(model)``"): the Trainer prepares exactly one
model with its optimizer. DDP, DeepSpeed ZeRO and FSDP2 each build one engine over that module: one
optimizer (created from its parameters), one gradient all-reduce or reduce-scatter, one partitioning. A head
prepared as a second model would need a second DeepSpeed engine with its own optimizer (accelerate takes one
DeepSpeed model per plugin) and its own DDP reducer outside the Trainer's ``no_sync`` accumulation. With
the head inside the wrapper, every strategy trains it with no code of ours, and the user's model is left
as it came: no ``v_head`` attribute, no parameter, no hook remains on it (the trainer sets
``trainer.model`` to the wrapper; ``trainer.value_head`` is the head, ``trainer.model.policy`` the policy).

Why the values come from a hook: GRPOTrainer scores tokens through TRL's fused LM head
(``model(..., labels=..., fused_lm_head=True)``), which runs the backbone and returns per-token logprobs
but no hidden states. While a ``capture()`` is open, the wrapper's forward hooks the policy's backbone
(``policy.base_model``) for the duration of that one call and appends ``value_head(last_hidden_state)``
to the capture, so policy and critic share one backbone pass, inside DDP's / DeepSpeed's / FSDP's forward.
The hook sits on the backbone's output, outside the checkpointed decoder layers, so gradient checkpointing
recomputes nothing of it; packed (shared-prefix) forwards capture ``(1, N)`` values per chunk that the
trainer reads back through the ``PackedBatch`` layout. The values are also tied into the output's ``loss``
with a zero weight (``loss + 0 * values.sum()``; GRPO reads ``log_probs``, never ``loss``): DDP's
unused-parameter search walks the graph from the forward's outputs and would otherwise mark the head
unused and fail when its gradient arrives.

Everything else is the policy's: attributes the wrapper does not have (``config``, ``generate``,
``gradient_checkpointing_enable``, ``_no_split_modules`` ...) are looked up on the policy, as PEFT's
wrappers do, so TRL's and the Trainer's code that reads them off ``trainer.model`` keeps working.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from thaw_rl.trainers.value_head import ValueHead

POLICY_PREFIX = "policy."
VALUE_HEAD_PREFIX = "value_head."


class PolicyAndValueHead(nn.Module):
    """``policy`` (the user's causal LM, unchanged) and ``value_head`` side by side; forward is the policy's."""

    def __init__(self, policy: nn.Module, value_head: ValueHead) -> None:
        super().__init__()
        if getattr(policy, "base_model", policy) is policy:
            raise ValueError(f"{type(policy).__name__} has no backbone (base_model) to take hidden states from; the "
                             f"value head needs a causal LM with the Llama/Qwen layout (model.model + lm_head).")
        self.policy = policy
        self.value_head = value_head
        self._captured: list[torch.Tensor] | None = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if modules is None or "policy" not in modules or name.startswith("__"):
                raise
            return getattr(modules["policy"], name)

    @contextlib.contextmanager
    def capture(self):
        """Collect the values of every forward inside the block: a list of (B_chunk, L) tensors, one per call."""
        if self._captured is not None:
            raise RuntimeError("value capture is already open (nested captures would mix their values)")
        self._captured = []
        try:
            yield self._captured
        finally:
            self._captured = None

    def forward(self, *args, **kwargs):
        if self._captured is None:
            return self.policy(*args, **kwargs)
        values: list[torch.Tensor] = []

        def on_backbone_output(module, inputs, output):
            hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            values.append(self.value_head(hidden))  # (B, L)

        hook = self.policy.base_model.register_forward_hook(on_backbone_output)
        try:
            output = self.policy(*args, **kwargs)
        finally:
            hook.remove()
        if len(values) != 1:
            raise RuntimeError(f"the policy forward ran its backbone {len(values)} times, expected once (TRL's fused "
                               f"LM head no longer calls model.base_model?)")
        self._captured.append(values[0])
        loss = output.get("loss") if isinstance(output, dict) else None
        if isinstance(loss, torch.Tensor):
            output["loss"] = loss + 0.0 * values[0].sum()  # the head, reachable from the output (DDP)
        return output


def split_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(policy entries, value-head entries), each without its prefix, of a ``PolicyAndValueHead`` state dict.

    A key with neither prefix raises: the state dict is not the wrapper's, and saving it as the policy
    would write a checkpoint ``from_pretrained`` silently half-loads.
    """
    policy, head = {}, {}
    for key, value in state_dict.items():
        if key.startswith(POLICY_PREFIX):
            policy[key[len(POLICY_PREFIX):]] = value
        elif key.startswith(VALUE_HEAD_PREFIX):
            head[key[len(VALUE_HEAD_PREFIX):]] = value
        else:
            raise RuntimeError(f"state dict key {key!r} is neither {POLICY_PREFIX!r}... nor {VALUE_HEAD_PREFIX!r}...: "
                               f"it is not a PolicyAndValueHead state dict")
    return policy, head
