"""``builtin:arithmetic``: a verifiable task generated in code, so recipes run with no dataset hub.

Each row is a chat prompt asking for one small sum, difference or product, and its ``answer`` as a
string. The system prompt asks for the number only, so two rewards apply: ``numeric_answer`` (is it
right) and ``number_only`` (is it just the number). SmolLM2-135M-Instruct gets many of these right
but wraps them in sentences; GRPO teaches it to answer tersely within a few minutes on a CPU.

Presets (``dataset_config``): ``add`` (a + b with single digits; the default, and the quickstart's),
``add_sub`` (+ and -, operands 0-20), ``mixed`` (+ and - with operands 0-50, x with operands 0-12).
Rows are a pure function of (preset, num_examples, seed).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SYSTEM_PROMPT = "You are a calculator. Reply with the number only."


@dataclass(frozen=True)
class ArithmeticPreset:
    operations: tuple[str, ...]
    max_operand: int
    max_factor: int = 12


PRESETS = {
    "add": ArithmeticPreset(("+",), 9),
    "add_sub": ArithmeticPreset(("+", "-"), 20),
    "mixed": ArithmeticPreset(("+", "-", "*"), 50, 12),
}
DEFAULT_PRESET = "add"


def arithmetic_rows(num_examples: int, seed: int = 0, preset: str | None = None,
                    system_prompt: str | None = SYSTEM_PROMPT) -> dict[str, list]:
    """Columns ``prompt`` (chat messages), ``answer`` (str) and ``question`` (str), ``num_examples`` long."""
    name = preset or DEFAULT_PRESET
    if name not in PRESETS:
        raise ValueError(f"builtin:arithmetic has no preset {name!r} (dataset_config): use one of {sorted(PRESETS)}.")
    if num_examples < 1:
        raise ValueError(f"builtin:arithmetic needs num_examples >= 1, got {num_examples}.")
    p = PRESETS[name]
    rng = random.Random(f"arithmetic/{name}/{seed}")
    prompts, answers, questions = [], [], []
    for _ in range(num_examples):
        op = rng.choice(p.operations)
        top = p.max_factor if op == "*" else p.max_operand
        a, b = rng.randint(0, top), rng.randint(0, top)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        symbol = "x" if op == "*" else op
        question = f"What is {a} {symbol} {b}?"
        messages = [{"role": "user", "content": question}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        prompts.append(messages)
        answers.append(str(value))
        questions.append(question)
    return {"prompt": prompts, "answer": answers, "question": questions}
