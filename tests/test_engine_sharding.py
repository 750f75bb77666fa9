"""The engine over a model sharded by FSDP2 (what ThawGRPOTrainer hands it under configs/fsdp2.yaml).

Found on an H100 (benchmarks/results/accelerate_configs_h100.json): FSDP2's unshard hook failed on
inference tensors, then the fp32-stored model computed in bf16 against an fp32 KV cache. Here one gloo
rank on CPU shards a tiny Qwen2 with a bf16 mixed-precision policy and checks the engine's greedy output
against an unsharded bf16 copy, and that the model still trains afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from thaw_rl.testing import free_port

WORKER = Path(__file__).with_name("engine_fsdp2_worker.py")


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp2") / "result.json"
    proc = subprocess.run([sys.executable, str(WORKER), str(free_port()), str(out)], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_kv_cache_takes_the_mixed_precision_compute_dtype(fsdp2_run):
    assert fsdp2_run["fsdp2"]["dtype"] == fsdp2_run["reference"]["dtype"] == "torch.bfloat16"


def test_sharded_greedy_equals_the_unsharded_bf16_model(fsdp2_run):
    ref, sharded = fsdp2_run["reference"], fsdp2_run["fsdp2"]
    assert sharded["tokens"] == ref["tokens"]
    for a, b in zip(sharded["logprobs"], ref["logprobs"]):
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-2  # bf16 logits on both sides


def test_sharded_model_still_trains_after_the_engine(fsdp2_run):
    assert fsdp2_run["trained_loss"] > 0
