"""Shared test setup: offline, CPU-friendly environment and model fixtures.

The environment lines run before anything imports triton: without a GPU, Triton kernels run in
the interpreter (TRITON_INTERPRET=1), which reads the variable when triton is first imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from thaw_rl.offline_models import load_smollm2  # noqa: E402
from thaw_rl.testing import tiny_model  # noqa: E402
from thaw_rl.testing import tiny_tokenizer as build_tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer): SmolLM2-135M-Instruct, fp32, eval, CPU, shared by the whole session.

    Do not change its weights or settings; a test that trains loads its own copy with
    `load_smollm2()` (~1 s once the cache exists).
    """
    return load_smollm2(torch.float32)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The character-level ChatML tokenizer of thaw_rl.testing, shared by the session (don't mutate)."""
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def make_tiny_model():
    """Factory: make_tiny_model("qwen3", seed=0, dtype=torch.float32, **config_overrides)."""
    return tiny_model


@pytest.fixture
def fresh_wandb():
    """W&B's process-wide settings start fresh, and are dropped after the test.

    wandb freezes its settings (WANDB_DIR, WANDB_MODE, ...) at its first run in a process; without a
    teardown a later test's run would go to an earlier test's directory.
    """
    import wandb

    wandb.teardown()
    yield
    wandb.finish()
    wandb.teardown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: tiny models gain nothing from threads, on a busy 2-core machine OpenMP
    spinning makes each matmul far slower, and the in-process reference engine then runs as each pool worker
    does. The previous setting is restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
