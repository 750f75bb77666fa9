"""The built-in reward functions, in TRL's reward-function shape.

TRL calls each one as ``f(prompts=..., completions=..., completion_ids=..., **columns)``, where the
dataset's other columns (here ``answer``) arrive as keyword lists, and logs its mean as
``rewards/<__name__>/mean``. Completions are strings, or lists of messages for chat prompts.

- ``numeric_answer``: 1.0 when the completion's number equals the ``answer`` column's, else 0.0 (None,
  which TRL skips, when the gold answer holds no number). See ``answer_parsing`` for what is read.
- ``number_only``: 1.0 when the completion is one number and nothing else (the format the built-in
  arithmetic task asks for).
- ``answer_format``: 1.0 when the completion has exactly one ``<answer>...</answer>`` holding a
  number (the R1-style format the GSM8K recipes ask for).
- ``length_penalty``: ``-completion_tokens / max_completion_length``, in [-1, 0]; built per run because
  it needs the config's ``max_completion_length``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from thaw_rl.rewards.answer_parsing import (
    completion_text,
    extract_answer,
    is_number_only,
    numbers_equal,
)

RewardFunc = Callable[..., list]

_ONE_ANSWER = re.compile(r"\s*(?:.*?)<answer>\s*-?[\d,.]+\s*</answer>\s*", re.DOTALL)


def numeric_answer(completions, answer=None, **kwargs) -> list[float | None]:
    """Exact match of the numeric answer against the ``answer`` column."""
    if answer is None:
        columns = sorted(k for k in kwargs if k not in _TRAINER_KWARGS)
        raise ValueError(f"reward 'numeric_answer' needs an 'answer' column in the dataset; the rows have {columns}. "
                         f"Set dataset_answer_column to the column that holds the gold answer.")
    out: list[float | None] = []
    for completion, gold in zip(completions, answer):
        expected = extract_answer(str(gold))
        if expected is None:
            out.append(None)
            continue
        out.append(1.0 if numbers_equal(extract_answer(completion_text(completion)), expected) else 0.0)
    return out


numeric_answer.required_columns = ("answer",)  # checked against the dataset when a recipe loads it
# what TRL passes besides the dataset's columns
_TRAINER_KWARGS = ("prompts", "completion_ids", "trainer_state", "log_extra", "log_metric", "environments")


def number_only(completions, **kwargs) -> list[float]:
    """1.0 when the completion is a single number (e.g. "12"), else 0.0."""
    return [1.0 if is_number_only(completion_text(c)) else 0.0 for c in completions]


def answer_format(completions, **kwargs) -> list[float]:
    """1.0 when the completion holds exactly one ``<answer>NUMBER</answer>``, else 0.0."""
    out = []
    for c in completions:
        text = completion_text(c)
        out.append(1.0 if text.count("<answer>") == 1 and _ONE_ANSWER.fullmatch(text) else 0.0)
    return out


def make_length_penalty(max_completion_length: int) -> RewardFunc:
    """``-len(completion_ids) / max_completion_length`` per completion."""
    if max_completion_length < 1:
        raise ValueError(f"length_penalty needs max_completion_length >= 1, got {max_completion_length}.")

    def length_penalty(completions, completion_ids=None, **kwargs) -> list[float]:
        if completion_ids is None:  # called outside a trainer: count characters instead
            lengths = [len(completion_text(c)) for c in completions]
        else:
            lengths = [len(ids) for ids in completion_ids]
        return [-min(n, max_completion_length) / max_completion_length for n in lengths]

    return length_penalty
