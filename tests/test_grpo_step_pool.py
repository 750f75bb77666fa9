"""benchmarks/grpo_step.py's ``thaw-pool`` and ``thaw-pool-async`` trainers (issue #15's async-step receipt).

The story: the pool trainers refuse ``--warmup 0`` (their first step starts the worker) and put the worker
on the CPU when fewer than two GPUs are visible; the summary divides the async step by the larger half of
the sync step, exactly; and a tiny CPU run of both trainers through ``run()`` (one worker process each,
gradient accumulation over 2 micro-batches as in the GPU command) reports every new field: the sync
trainer samples with the trainer's own weights (the push before the first rollout), the async one samples
one version behind and never more than ``max_staleness``, every timed step pushes weights, and the losses
are finite. About 90 s on a quiet 2-core machine (two worker starts), hence ``slow``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import grpo_step  # noqa: E402

PROMPTS, GENERATIONS, NEW_TOKENS = 2, 2, 8


def parse(monkeypatch, *argv: str):
    monkeypatch.setattr(sys, "argv", ["grpo_step.py", *argv])
    return grpo_step.parse_args()


def test_pool_trainers_need_a_warmup_step_and_default_to_a_second_gpu_or_the_cpu(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        parse(monkeypatch, "--trainers", "thaw-pool", "--warmup", "0")
    assert "--warmup 1" in capsys.readouterr().err
    args = parse(monkeypatch, "--trainers", "thaw-pool,thaw-pool-async")
    assert args.pool_device == ("cuda:1" if torch.cuda.device_count() >= 2 else "cpu")
    assert parse(monkeypatch, "--trainers", "thaw", "--warmup", "0").warmup == 0  # only pool trainers need it


def test_pool_summary_divides_the_async_step_by_the_larger_half_of_the_sync_step():
    sync_row = {"trainer": "thaw-pool", "step_seconds": 3.0, "generation_seconds": 1.0,
                "per_step": {"step_seconds": [3.0, 3.5, 2.5], "generation_seconds": [1.0, 1.25, 0.75]}}
    async_row = {"trainer": "thaw-pool-async", "step_seconds": 2.2}
    summary = grpo_step.pool_summary([sync_row, async_row])
    assert summary["sync_training_seconds"] == 2.0  # median of 2.0, 2.25, 1.75 (weight push included)
    assert summary["ratio"] == pytest.approx(2.2 / 2.0)
    assert grpo_step.pool_summary([sync_row]) is None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pool_trainers_report_waits_weight_sync_and_staleness(monkeypatch, tmp_path):
    args = parse(monkeypatch, "--model", "tiny", "--trainers", "thaw-pool,thaw-pool-async", "--steps", "2",
                 "--warmup", "1", "--prompts", str(PROMPTS), "--num-generations", str(GENERATIONS),
                 "--max-completion-length", str(NEW_TOKENS), "--micro-batch", str(PROMPTS * GENERATIONS // 2),
                 "--ignore-eos", "--pool-device", "cpu")
    rows = [grpo_step.run(kind, args, str(tmp_path)) for kind in args.trainers]
    sync_row, async_row = rows

    for row in rows:
        assert row["per_step"]["generated_tokens"] == [PROMPTS * GENERATIONS * NEW_TOKENS] * 2
        assert len(row["loss"]) == 2 and all(math.isfinite(loss) for loss in row["loss"])
        assert all(s > 0 for s in row["per_step"]["weight_sync_seconds"])  # a push after every timed step
        assert all(s > 0 for s in row["per_step"]["rollout_seconds"])
        assert row["pool"]["logged_per_step"]["thaw/weight_version"] == [1.0, 2.0]  # the trained step's weights
        assert row["pool"]["rollouts_dropped"] == 0
        assert row["step_seconds"] >= row["training_seconds"] > 0
        assert row["pool"]["device"] == "cpu"
    # sync: every rollout sampled with the weights being trained, which are the trainer's (pushed, not the
    # worker's own random init): the sampling logprobs equal the trainer's to float rounding
    assert sync_row["pool"]["staleness"] == [0, 0, 0]
    assert sync_row["thaw"]["thaw/sampling_logp_diff/max"] < 1e-4
    assert sync_row["rollout_wait_seconds"] < 0.01  # nothing runs in the background to wait for
    assert sync_row["waited_for_rollouts_seconds"] == pytest.approx(sync_row["generation_seconds"], abs=0.01)
    # async: step 0 samples with version 0, every later step with the version before it, never older
    assert async_row["pool"]["staleness"] == [0, 1, 1]
    assert async_row["pool"]["max_staleness"] <= async_row["pool"]["max_staleness_allowed"] == 1
    assert async_row["pool"]["logged_per_step"]["thaw/rollout_staleness"] == [1.0, 1.0]
    # one rollout per step, and async one more: the extra step of prompts keeps a rollout running behind the
    # last timed step too, as behind every other
    assert (sync_row["pool"]["rollouts_generated"], async_row["pool"]["rollouts_generated"]) == (3, 4)
    summary = grpo_step.pool_summary(rows)
    assert summary["ratio"] == pytest.approx(async_row["step_seconds"] / max(
        sync_row["generation_seconds"], summary["sync_training_seconds"]))
    assert "thaw-pool-async step" in grpo_step.table(rows).splitlines()[-1]
