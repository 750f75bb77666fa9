"""Reading numbers out of completions and gold answers.

A completion's answer is, in this order: the last ``<answer>...</answer>``, the text after the last
``####`` (GSM8K's style), the last ``\\boxed{...}``, or else the whole completion; from that text the
last number is taken. A gold answer is read the same way, so a GSM8K ``answer`` column ("... #### 72")
and a plain "72" both work. Numbers may carry a sign, thousands separators and a decimal part
("1,234.50"); they compare as floats within a small tolerance.
"""

from __future__ import annotations

import math
import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_NUMBER_ONLY = re.compile(r"\s*-?\d[\d,]*(?:\.\d+)?\s*\.?\s*")


def completion_text(completion) -> str:
    """The text of a completion: TRL passes a str, or a list of messages for conversational prompts."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(str(m.get("content") or "") for m in completion if isinstance(m, dict))
    if isinstance(completion, dict):
        return str(completion.get("content") or "")
    return str(completion)


def answer_span(text: str) -> str:
    """The part of ``text`` that holds the answer (see the module docstring)."""
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1]
    if "####" in text:
        return text.rsplit("####", 1)[1]
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1]
    return text


def parse_number(text: str) -> float | None:
    """The last number in ``text`` as a float, or None when there is none."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def extract_answer(text: str) -> float | None:
    """The numeric answer of a completion or of a gold answer string."""
    return parse_number(answer_span(text))


def is_number_only(text: str) -> bool:
    """Whether ``text`` is one number and nothing else (whitespace and a final period allowed)."""
    return _NUMBER_ONLY.fullmatch(text) is not None


def numbers_equal(a: float | None, b: float | None, rel_tol: float = 1e-6) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-9)
