"""Model factories for ForkPool tests that spawned workers import by module name (tests/ is on sys.path)."""

from __future__ import annotations

import os

from thaw_rl.testing import tiny_model_and_tokenizer


def fails_while_file_exists(path: str):
    """A tiny qwen2 model, or RuntimeError while ``path`` exists (a cause that goes away)."""
    if os.path.exists(path):
        raise RuntimeError(f"the test's failure cause {path} is present")
    return tiny_model_and_tokenizer("qwen2", initializer_range=0.2)


def returns_none():
    return None
