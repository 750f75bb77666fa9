"""Reward functions by name: the built-in ones, or any ``module:function`` (``module.function``) path.

``resolve_rewards(names, config)`` turns a recipe's ``reward_funcs`` list into the callables TRL takes.
A built-in entry is a factory of the training config, so a reward that needs a config value (the
length penalty's ``max_completion_length``) gets it. An unknown name raises ``ValueError`` listing the
built-in names and the import-path form.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from thaw_rl.rewards.builtin_rewards import (
    RewardFunc,
    answer_format,
    make_length_penalty,
    number_only,
    numeric_answer,
)

BUILTIN_REWARDS: dict[str, Callable[[Any], RewardFunc]] = {
    "numeric_answer": lambda config: numeric_answer,
    "number_only": lambda config: number_only,
    "answer_format": lambda config: answer_format,
    "length_penalty": lambda config: make_length_penalty(int(getattr(config, "max_completion_length", 0) or 0)),
}
# Other names users reach for first.
ALIASES = {"exact_match": "numeric_answer", "accuracy": "numeric_answer", "format": "answer_format"}


def reward_choices() -> str:
    names = ", ".join(sorted(BUILTIN_REWARDS))
    aliases = ", ".join(f"{a} (= {n})" for a, n in sorted(ALIASES.items()))
    return f"{names}; aliases {aliases}; or an import path 'package.module:function'"


def resolve_reward(name: str, config: Any = None) -> RewardFunc:
    """One reward function: a built-in name, an alias, or an import path."""
    key = ALIASES.get(name, name)
    if key in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[key](config)
    if ":" in name or "." in name:
        return import_reward(name)
    raise ValueError(f"unknown reward {name!r} in reward_funcs: use one of {reward_choices()}.")


def resolve_rewards(names: list[str] | str | None, config: Any = None) -> list[RewardFunc]:
    """The reward functions of a recipe's ``reward_funcs`` (a list, or one name)."""
    if not names:
        raise ValueError(f"reward_funcs is empty: name at least one reward ({reward_choices()}).")
    if isinstance(names, str):
        names = [names]
    return [resolve_reward(n, config) for n in names]


def import_reward(path: str) -> RewardFunc:
    """``package.module:function`` or ``package.module.function``; the working directory is importable."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"reward {path!r} is not an import path: write 'package.module:function'.")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # so a rewards.py next to the recipe's launch directory works
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward {path!r}: cannot import module {module_name!r} ({err}). Built-in rewards: "
                         f"{reward_choices()}.") from None
    func = getattr(module, attr, None)
    if not callable(func):
        raise ValueError(f"reward {path!r}: module {module_name!r} has no function {attr!r}.")
    return func
