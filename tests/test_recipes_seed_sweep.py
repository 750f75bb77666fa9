"""Measures the false-failure odds of test_recipes.py's shortened quickstart (defines no tests).

    python tests/test_recipes_seed_sweep.py [NUM_SEEDS]

Runs ``short_quickstart(seed)`` (recipes/quickstart_cpu.yaml on tiny-qwen2, see test_recipes.py) for
seeds 0..NUM_SEEDS-1 and prints, per seed, the mean reward of the first and last steps; the test uses
seed 0, and the docstring of ``test_shortened_quickstart_learns`` quotes the pass rate printed here.
"""

from __future__ import annotations

import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(num_seeds: int) -> None:
    import torch

    torch.set_num_threads(1)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [os.path.dirname(here), here]  # this checkout's thaw_rl, and test_recipes
    from test_recipes import reward_ends, short_quickstart

    passed = 0
    for seed in range(num_seeds):
        with tempfile.TemporaryDirectory() as tmp:
            history = short_quickstart(tmp, seed)
        first, last = reward_ends(history)
        passed += last > first
        print(f"seed {seed}: first {first:.3f} last {last:.3f} {'ok' if last > first else 'FAIL'}", flush=True)
    print(f"{passed}/{num_seeds} seeds pass")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
