"""What reward functions return, checked where they return it.

TRL 1.16's contract: a reward function returns one value per completion, a float, or None where the
reward does not apply to that completion (a math reward on a code sample). TRL turns None into NaN and
sums the weighted rewards with ``nansum``, so a completion is scored by the functions that apply to it;
a completion that no function scores is "unscorable": its advantage is 0 (it teaches nothing).

TRL does not tell a None from a NaN the function returned, and lets +-inf through, so one bad value
becomes a silent 0 (partly-NaN rewards) or a NaN gradient and a NaN checkpoint (inf). Strings or a
scalar fail deep inside ``torch.tensor`` ("too many dimensions 'str'"). So the trainers wrap each
callable reward function (``checked_reward_funcs``): its output must be a sequence of one real number
or None per completion, every number finite; anything else raises, naming the function, the completion
index and its prompt. An exception raised inside a reward function keeps its traceback and gets a note
naming the function. Reward *models* (``nn.Module``) never return None: any non-finite score they give is
refused after the call (``check_reward_matrix``), as is a batch in which no completion was scored.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from thaw_rl.rewards.answer_parsing import completion_text

CONTRACT = "a list with one float (or None where the reward does not apply) per completion"


class CheckedReward:
    """A reward function whose every output is checked (see the module docstring); TRL sees its name."""

    def __init__(self, func, name: str) -> None:
        self.func = func
        self.__name__ = name  # TRL names the reward's metrics after it

    def __call__(self, *args, **kwargs):
        try:
            output = self.func(*args, **kwargs)
        except Exception as err:
            err.add_note(f"(raised by reward function {self.__name__!r})")
            raise
        return check_reward_output(output, self.__name__, kwargs.get("prompts"), kwargs.get("completions"))

    def __repr__(self) -> str:
        return f"CheckedReward({self.func!r})"


class CheckedAsyncReward(CheckedReward):
    """``CheckedReward`` for an async reward function (TRL awaits these concurrently)."""

    async def __call__(self, *args, **kwargs):
        try:
            output = await self.func(*args, **kwargs)
        except Exception as err:
            err.add_note(f"(raised by reward function {self.__name__!r})")
            raise
        return check_reward_output(output, self.__name__, kwargs.get("prompts"), kwargs.get("completions"))


def checked_reward_funcs(reward_funcs: list, names: list[str]) -> list:
    """Each callable reward function wrapped in a check; reward models and already-checked ones unchanged."""
    from trl.trainer.utils import is_async_callable

    out = []
    for func, name in zip(reward_funcs, names, strict=True):
        if isinstance(func, (torch.nn.Module, CheckedReward)):
            out.append(func)
        else:
            out.append((CheckedAsyncReward if is_async_callable(func) else CheckedReward)(func, name))
    return out


def check_reward_output(output: Any, name: str, prompts: Sequence | None = None,
                        completions: Sequence | None = None) -> list[float | None]:
    """``output`` as a list of finite floats and Nones, or a ``TypeError`` / ``ValueError`` saying what is wrong."""
    if isinstance(output, (str, bytes, Mapping)) or not isinstance(output, (Sequence, torch.Tensor)) and not (
            hasattr(output, "__len__") and hasattr(output, "__iter__")):
        raise TypeError(f"reward function {name!r} returned {_show(output)} ({type(output).__name__}); it must return "
                        f"{CONTRACT}.")
    values = list(output)
    if completions is not None and len(values) != len(completions):
        raise ValueError(f"reward function {name!r} returned {len(values)} rewards for {len(completions)} "
                         f"completions; it must return {CONTRACT}.")
    checked: list[float | None] = []
    for i, value in enumerate(values):
        if value is None:
            checked.append(None)
            continue
        number = _as_float(value)
        if number is None:
            raise TypeError(f"reward function {name!r} returned {_show(value)} ({type(value).__name__}) for "
                            f"completion {i}{_where(i, prompts, completions)}; it must return {CONTRACT}.")
        if not math.isfinite(number):
            raise ValueError(
                f"reward function {name!r} returned {number} for completion {i} of {len(values)}"
                f"{_where(i, prompts, completions)}. Rewards must be finite: return None for a completion the "
                f"reward does not apply to (TRL then scores it with the other reward functions).")
        checked.append(number)
    return checked


def check_reward_matrix(rewards_per_func: torch.Tensor, reward_funcs: list, names: list[str]) -> None:
    """After TRL's ``_calculate_rewards``: (N, F) rewards, NaN where a function returned None.

    Refuses non-finite scores of reward models (their NaN is not a None) and a batch in which no completion
    was scored by any function (nothing to learn from; TRL would train on zero advantages).
    """
    for j, (func, name) in enumerate(zip(reward_funcs, names, strict=True)):
        column = rewards_per_func[:, j]  # (N,)
        bad = ~torch.isfinite(column) if isinstance(func, torch.nn.Module) else torch.isinf(column)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"reward model {name!r} gave {float(column[i])} for completion {i} of {column.numel()} "
                             f"(over all ranks): rewards must be finite. Check the reward model's weights and inputs.")
    if rewards_per_func.numel() and bool(torch.isnan(rewards_per_func).all()):
        raise ValueError(
            f"no reward function scored any of the {rewards_per_func.size(0)} completions of this batch (all of "
            f"{names} returned None for every one): there is nothing to learn from. None means the reward does not "
            f"apply to a completion; at least one reward function must apply to each (check the dataset columns "
            f"the rewards read).")


def without_unscorable(per_row: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """``per_row`` (B, ...) with the rows of NaN ``rewards`` (B,) zeroed: completions no reward function scored.

    TRL 1.16's meaning of None: such a completion is unscorable and carries no learning signal (GRPO forces
    its advantage to 0); PPO's advantages and best-of-N's target weights follow it.
    """
    unscorable = torch.isnan(rewards).to(per_row.device)  # (B,)
    return per_row.masked_fill(unscorable.view(-1, *[1] * (per_row.dim() - 1)), 0.0)


def _as_float(value: Any) -> float | None:
    if isinstance(value, numbers.Real):  # bool, int, float, numpy scalars
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value)
    if hasattr(value, "dtype") and getattr(value, "shape", None) == () and hasattr(value, "item"):  # 0-d ndarray
        item = value.item()
        return float(item) if isinstance(item, numbers.Real) else None
    return None


def _where(i: int, prompts: Sequence | None, completions: Sequence | None) -> str:
    parts = []
    if prompts is not None and i < len(prompts):
        prompt = prompts[i]
        if isinstance(prompt, list) and prompt:  # chat messages: the last one holds the question
            prompt = prompt[-1]
        parts.append(f"prompt {_show(completion_text(prompt))}")
    if completions is not None and i < len(completions):
        parts.append(f"completion {_show(completion_text(completions[i]))}")
    return f" ({', '.join(parts)})" if parts else ""


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
