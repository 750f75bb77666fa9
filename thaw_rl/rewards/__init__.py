"""Reward functions for thaw-rl recipes: built-in verifiable rewards and resolution by name or import path.

    from thaw_rl.rewards import resolve_rewards
    funcs = resolve_rewards(["numeric_answer", "number_only", "my_pkg.rewards:brevity"], config)
"""

from thaw_rl.rewards.answer_parsing import (
    completion_text,
    extract_answer,
    is_number_only,
)
from thaw_rl.rewards.builtin_rewards import (
    answer_format,
    make_length_penalty,
    number_only,
    numeric_answer,
)
from thaw_rl.rewards.registry import (
    ALIASES,
    BUILTIN_REWARDS,
    resolve_reward,
    resolve_rewards,
    reward_choices,
)

__all__ = [
    "ALIASES",
    "BUILTIN_REWARDS",
    "answer_format",
    "completion_text",
    "extract_answer",
    "is_number_only",
    "make_length_penalty",
    "number_only",
    "numeric_answer",
    "resolve_reward",
    "resolve_rewards",
    "reward_choices",
]
