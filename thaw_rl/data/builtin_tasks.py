"""Built-in offline tasks, named ``builtin:<task>`` in a recipe's ``dataset_name``.

Each task is a function ``(num_examples, seed, preset, system_prompt) -> columns`` generating rows in
code, so the quickstart and the tests need no dataset hub. Every task yields a chat-formatted
``prompt`` column and a string ``answer`` column that the built-in rewards check.
"""

from __future__ import annotations

from collections.abc import Callable

from thaw_rl.data import arithmetic

PREFIX = "builtin:"
DEFAULT_NUM_EXAMPLES = 2000
DEFAULT_NUM_EVAL_EXAMPLES = 64
_EVAL_SEED_OFFSET = 1_000_003  # eval rows come from another stream than train rows

BUILTIN_TASKS: dict[str, Callable[..., dict[str, list]]] = {
    "arithmetic": arithmetic.arithmetic_rows,
}
DEFAULT_SYSTEM_PROMPTS = {"arithmetic": arithmetic.SYSTEM_PROMPT}


def is_builtin(name: str) -> bool:
    return name.startswith(PREFIX)


def builtin_choices() -> str:
    return ", ".join(PREFIX + t for t in sorted(BUILTIN_TASKS))


def builtin_rows(name: str, num_examples: int | None, seed: int, preset: str | None, system_prompt: str | None,
                 eval_split: bool = False) -> dict[str, list]:
    """Columns of the built-in task ``name`` (with its ``builtin:`` prefix)."""
    task = name[len(PREFIX):]
    if task not in BUILTIN_TASKS:
        raise ValueError(f"dataset_name={name!r}: there is no built-in task {task!r}; use one of {builtin_choices()}.")
    if eval_split:
        n = min(num_examples or DEFAULT_NUM_EVAL_EXAMPLES, DEFAULT_NUM_EVAL_EXAMPLES)
        seed = seed + _EVAL_SEED_OFFSET
    else:
        n = num_examples or DEFAULT_NUM_EXAMPLES
    prompt = system_prompt if system_prompt is not None else DEFAULT_SYSTEM_PROMPTS.get(task)
    return BUILTIN_TASKS[task](n, seed=seed, preset=preset, system_prompt=prompt)
