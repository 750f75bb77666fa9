"""``ValueHead``: PPO's critic as one linear layer on the policy's last hidden state.

TRL 1.16 removed ``AutoModelForCausalLMWithValueHead``. Here the head is attached to the policy itself,
as the submodule ``v_head``, so the Trainer's optimizer, DDP / ZeRO-2 wrapping, gradient clipping and
device placement cover it with no extra code, and policy and critic share one backbone forward.

Why a forward hook: GRPOTrainer scores tokens through TRL's fused LM head
(``model(..., labels=..., fused_lm_head=True)``), which runs the backbone and returns per-token
logprobs but no hidden states, and calling the backbone ourselves would bypass DDP's forward. So the
head hooks the backbone (``model.base_model``): while a ``capture()`` is open, every backbone call
inside the model's own forward also computes ``v_head(last_hidden_state)`` and appends it to the
capture. Outside a capture (the engine's rollouts, the reference model) the hook does nothing. A second
hook on the model itself ties the values into the output's ``loss`` with a zero weight
(``loss + 0 * values.sum()``; GRPO reads ``log_probs``, never ``loss``): DDP's unused-parameter search
(on by default in Trainer without gradient checkpointing) walks the graph from the forward's outputs,
and would otherwise mark the head ready before backward and fail when its gradient arrives.

Checkpoints: the policy is saved without the head, so ``from_pretrained`` and vLLM load it as a plain
causal LM; the head goes to ``value_head.safetensors`` beside it (``save_value_head`` / ``load_value_head``).
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

VALUE_HEAD_FILE = "value_head.safetensors"
ATTRIBUTE = "v_head"
PREFIX = ATTRIBUTE + "."


class ValueHead(nn.Module):
    """``V(s_t) = w . h_t + b`` per position, in fp32 whatever the policy's dtype.

    Zero-initialised: the first values are 0, so early advantages are plain discounted returns and the
    critic's gradient into the shared backbone starts at zero instead of as noise.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1, dtype=torch.float32)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)
        self._captured: list[torch.Tensor] | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, L, H) hidden states -> (B, L) values."""
        return self.summary(hidden_states.to(self.summary.weight.dtype)).squeeze(-1)  # (B, L)

    @contextlib.contextmanager
    def capture(self):
        """Collect the values of every backbone call inside the block: a list of (B_chunk, L) tensors."""
        if self._captured is not None:
            raise RuntimeError("value capture is already open (nested captures would mix their values)")
        self._captured = []
        try:
            yield self._captured
        finally:
            self._captured = None

    def _on_backbone_output(self, module: nn.Module, args, output) -> None:
        if self._captured is None:
            return
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        self._captured.append(self(hidden))

    def _on_model_output(self, module: nn.Module, args, output) -> None:
        loss = output.get("loss") if isinstance(output, dict) else None
        if self._captured and isinstance(loss, torch.Tensor):
            output["loss"] = loss + 0.0 * self._captured[-1].sum()  # the head, reachable from the output (DDP)


def attach_value_head(model: nn.Module) -> ValueHead:
    """Give ``model`` a ``v_head`` (once) and hook it to the backbone; returns the head."""
    head = getattr(model, ATTRIBUTE, None)
    if isinstance(head, ValueHead):
        return head
    backbone = getattr(model, "base_model", model)
    if backbone is model:
        raise ValueError(f"{type(model).__name__} has no backbone (base_model) to take hidden states from; the value "
                         f"head needs a causal LM with the Llama/Qwen layout (model.model + lm_head).")
    hidden_size = model.config.get_text_config().hidden_size
    device = model.get_output_embeddings().weight.device
    head = ValueHead(hidden_size).to(device)
    setattr(model, ATTRIBUTE, head)
    backbone.register_forward_hook(head._on_backbone_output)
    model.register_forward_hook(head._on_model_output)
    return head


def remove_value_head(model: nn.Module) -> None:
    """Drop ``v_head`` and its hooks (e.g. from a copy of the policy used as reference model)."""
    for module in (getattr(model, "base_model", model), model):
        for key, hook in list(module._forward_hooks.items()):
            if isinstance(getattr(hook, "__self__", None), ValueHead):
                del module._forward_hooks[key]
    if isinstance(getattr(model, ATTRIBUTE, None), ValueHead):
        delattr(model, ATTRIBUTE)


def split_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(policy entries, value-head entries without the ``v_head.`` prefix) of a policy-with-head state dict."""
    policy = {k: v for k, v in state_dict.items() if not k.startswith(PREFIX)}
    head = {k[len(PREFIX):]: v for k, v in state_dict.items() if k.startswith(PREFIX)}
    return policy, head


def save_value_head(head: ValueHead | dict[str, torch.Tensor], directory: str) -> str:
    """Write the head's weights to ``directory/value_head.safetensors``; returns the path."""
    from safetensors.torch import save_file

    state = head.state_dict() if isinstance(head, nn.Module) else head
    path = os.path.join(directory, VALUE_HEAD_FILE)
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, path, metadata={"format": "pt"})
    return path


def load_value_head(model: nn.Module, directory: str) -> bool:
    """Attach a head to ``model`` and load ``directory/value_head.safetensors`` into it; False if there is none."""
    from safetensors.torch import load_file

    path = os.path.join(directory, VALUE_HEAD_FILE)
    if not os.path.isfile(path):
        return False
    head = attach_value_head(model)
    head.load_state_dict(load_file(path, device=str(head.summary.weight.device)))
    return True
