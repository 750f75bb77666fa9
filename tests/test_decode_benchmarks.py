"""The decode benchmarks run on CPU as they would on the H200 and their receipts say what the lead reads from them.

Each runs as a script (its own process, as on the GPU machine) on tiny shapes: profile_decode over GRPO-shaped
batches (each prompt prefilled once and forked), and the sampler kernel's check against its torch reference.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(args: list[str], tmp_path: Path) -> dict:
    out = tmp_path / "receipt.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, *args, "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(out.read_text())


def test_profile_decode_on_forked_groups_compares_like_runs(tmp_path):
    """--group 4: 2 prompts forked into 8 rows; sync and async steps give the same tokens (the prefix cache is
    dropped before each call, so both prefill alike) and the LM head writes into a buffer only with the same bits."""
    receipt = run_script(["benchmarks/profile_decode.py", "--model", "tiny-qwen2", "--batches", "8",
                          "--prompt-len", "24", "--steps", "6", "--group", "4"], tmp_path)
    rows = receipt["results"]
    assert [(r["batch"], r["mode"]) for r in rows] == [(8, "sync"), (8, "async")]
    assert all(r["same_tokens"] for r in rows)
    assert rows[0]["token_agreement"] == 1.0 and rows[0]["cascade_steps_per_call"] == {"sync": 0, "async": 0}
    assert rows[0]["direct_lm_head"] is True
    assert rows[1]["rows_per_step"] == 8.0 and rows[1]["async_steps"] >= 5
    assert rows[1]["used_blocks_after"] == 0  # the forked prompts' parents are freed too
    assert_fixed_and_marginal_fit(rows[1], steps=5, short_steps=1)


def assert_fixed_and_marginal_fit(row: dict, steps: int, short_steps: int) -> None:
    """The async row splits a call into a per-call part and a per-step part: a line through two call lengths
    (``steps`` and ``short_steps`` forward steps) that passes through the long call's time and predicts the
    plain call's total within a loose bound (CPU timings of a tiny model jitter by tens of percent)."""
    assert (row["long_steps"], row["short_steps"]) == (steps, short_steps)
    fixed, marginal = row["fixed_ms"], row["marginal_step_ms"]
    assert math.isfinite(fixed) and math.isfinite(marginal) and marginal > 0
    assert fixed + marginal * steps == pytest.approx(row["long_ms"], rel=1e-6)
    assert fixed + marginal * short_steps == pytest.approx(row["short_ms"], rel=1e-6)
    total = row["step_ms"] * row["steps"]  # the plain call's wall time
    assert row["loop_runs"] == 1 and 0 < row["outside_loop_ms"] < row["instrumented_step_ms"] * row["steps"]
    assert 0 < row["first_prepare_ms"] and 0 < row["last_process_ms"]
    assert 0.5 * total <= fixed + marginal * row["steps"] <= 1.05 * total


def test_profile_decode_splits_fixed_from_per_step_cost_per_batch(tmp_path):
    """Own prompts (group 1) at two batch sizes, the CPU check of the H200 command: every async row has the fit."""
    receipt = run_script(["benchmarks/profile_decode.py", "--model", "tiny-qwen2", "--batches", "2,8",
                          "--prompt-len", "32", "--steps", "8"], tmp_path)
    rows = receipt["results"]
    assert [(r["batch"], r["mode"]) for r in rows] == [(2, "sync"), (2, "async"), (8, "sync"), (8, "async")]
    assert all("fixed_ms" not in r for r in rows if r["mode"] == "sync")
    for r in rows[1::2]:
        assert_fixed_and_marginal_fit(r, steps=7, short_steps=1)


def test_gumbel_sampling_benchmark_checks_tokens_against_the_reference(tmp_path):
    receipt = run_script(["benchmarks/gumbel_sampling.py", "--smoke"], tmp_path)
    rows = receipt["results"]
    assert [r["batch"] for r in rows] == [2, 5]
    assert all(all(r["correct"].values()) for r in rows)
    assert set(rows[0]["kernel_ms"]) == {"default", "1", "2", "4"}
    assert rows[0]["temperature"] == 1.0 and rows[0]["noise_mismatches"] is None  # bitwise noise check: CUDA only


def test_cascade_decode_benchmark_runs_cascade_and_keeps_the_tokens(tmp_path):
    """The CPU check of the H200 command: the cascade variant really cascades (torch reference on CPU) and samples
    exactly the plain variant's tokens (fp32, same seed); "auto" stays plain on CPU."""
    receipt = run_script(["benchmarks/cascade_decode.py", "--model", "tiny-qwen2", "--batches", "8", "--group", "4",
                          "--prompt-len", "40", "--steps", "4", "--variants", "graphs,graphs+cascade,graphs+auto"],
                         tmp_path)
    rows = {r["variant"]: r for r in receipt["results"]}
    assert rows["graphs"]["cascade_steps"] == 0 and rows["graphs+auto"]["cascade_steps"] == 0
    assert rows["graphs+cascade"]["cascade_steps"] >= 6  # two calls (warm-up + timed) of >= 3 decode steps
    assert all(r["token_agreement_vs_first"] == 1.0 for r in rows.values())
