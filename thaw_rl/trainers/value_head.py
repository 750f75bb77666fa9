"""``ValueHead``: PPO's critic as one linear layer on the policy's last hidden state, and its file.

TRL 1.16 removed ``AutoModelForCausalLMWithValueHead``. Here the head is a module of its own, owned by
``ThawPPOTrainer`` (``trainer.value_head``); the user's model never gets an attribute, a parameter or a
hook from it. ``policy_and_value.PolicyAndValueHead`` puts the two side by side for training.

The file: ``value_head.safetensors`` (keys ``summary.weight`` (1, H) and ``summary.bias`` (1,), fp32) is
written next to the policy's ``model.safetensors`` in every checkpoint and in the output directory. The
policy there is a plain causal LM (``from_pretrained`` and vLLM load it as usual); to get values back::

    model = AutoModelForCausalLM.from_pretrained("out/checkpoint-8")
    head = load_value_head("out/checkpoint-8")                       # a ValueHead, or None if there is none
    values = head(model.base_model(input_ids).last_hidden_state)      # (B, L): V of the state after each token
"""

from __future__ import annotations

import os

import torch
from torch import nn

VALUE_HEAD_FILE = "value_head.safetensors"


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

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, L, H) hidden states -> (B, L) values."""
        return self.summary(hidden_states.to(self.summary.weight.dtype)).squeeze(-1)  # (B, L)


def value_head_for(model: nn.Module) -> ValueHead:
    """A fresh (zero) head sized for ``model``'s hidden states, on the device of its output embeddings."""
    if getattr(model, "base_model", model) is model:
        raise ValueError(f"{type(model).__name__} has no backbone (base_model) to take hidden states from; the value "
                         f"head needs a causal LM with the Llama/Qwen layout (model.model + lm_head).")
    hidden_size = model.config.get_text_config().hidden_size
    return ValueHead(hidden_size).to(model.get_output_embeddings().weight.device)


def save_value_head(head: ValueHead | dict[str, torch.Tensor], directory: str) -> str:
    """Write the head's weights to ``directory/value_head.safetensors``; returns the path."""
    from safetensors.torch import save_file

    state = head.state_dict() if isinstance(head, nn.Module) else head
    path = os.path.join(directory, VALUE_HEAD_FILE)
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, path, metadata={"format": "pt"})
    return path


def load_value_head(directory: str, device: torch.device | str = "cpu") -> ValueHead | None:
    """The head saved in ``directory/value_head.safetensors``, or None when the directory has none."""
    from safetensors.torch import load_file

    path = os.path.join(directory, VALUE_HEAD_FILE)
    if not os.path.isfile(path):
        return None
    state = load_file(path, device=str(device))
    weight = state.get("summary.weight")
    if weight is None or weight.ndim != 2 or weight.size(0) != 1:
        raise ValueError(f"{path} is not a ValueHead file (keys {sorted(state)}; expected summary.weight (1, H) and "
                         f"summary.bias (1,)). Point at a directory written by ThawPPOTrainer.")
    head = ValueHead(weight.size(1)).to(device)
    head.load_state_dict(state)
    return head
