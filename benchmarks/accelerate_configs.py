"""Every accelerate config in configs/ runs a recipe end to end on GPUs (and ZeRO-2 runs PPO).

For each (recipe, config, processes) it runs exactly what the README tells a user to run,

    accelerate launch --config_file configs/<cfg>.yaml --num_processes N -m thaw_rl.train --config <recipe> ...

with the recipe's CPU fields overridden for a GPU (``--use_cpu false --bf16 true``) and a tiny random
Qwen2 (``tiny-qwen2``: the GPU machines have no hub), then reads the run's ``summary.json`` and
``log_history.json`` back and checks what the README promises: the run finished, every step logged the
``thaw/`` metrics, the fork counts are summed over all ranks, the loss is finite, and GRPO trained with
shared-prefix packing (``thaw/train_tokens`` below ``thaw/train_tokens_flat``). ``--compare-flat`` runs each
GRPO config again with ``--shared_prefix_training false`` (TRL's flat forward; same seed, so the same
rollouts) and reports the first step's loss and grad norm of both: packing must not change them beyond
bf16 rounding under DDP, ZeRO or FSDP. It is a
does-it-run receipt for the configs, not a speed benchmark (the model is tiny; wall time is mostly
process start, DeepSpeed/FSDP set-up and compilation).

    python benchmarks/accelerate_configs.py --out benchmarks/results/accelerate_configs_h200x2.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from receipt_utils import git_commit  # noqa: E402

RECIPES = {"grpo": ROOT / "tests" / "recipes" / "tiny_grpo.yaml", "ppo": ROOT / "recipes" / "ppo_quickstart_cpu.yaml"}
GPU_OVERRIDES = ["--use_cpu", "false", "--bf16", "true", "--report_to", "none", "--model_name_or_path", "tiny-qwen2",
                 "--dtype", "float32", "--save_final_model", "false"]
# recipe:config:processes
DEFAULT_RUNS = ("grpo:single_gpu:1,grpo:multi_gpu:2,grpo:deepspeed_zero2:2,grpo:deepspeed_zero3:2,grpo:fsdp2:2,"
                "ppo:multi_gpu:2,ppo:deepspeed_zero2:2")
EXTRA = {"grpo": ["--max_steps", "3", "--per_device_train_batch_size", "8"],
         "ppo": ["--max_steps", "4", "--per_device_train_batch_size", "8", "--learning_rate", "1e-3",
                 "--kv_cache_memory", "33554432"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(recipe: str, config: str, processes: int, work: Path, extra: tuple[str, ...] = ()) -> dict:
    out = work / f"{recipe}-{config}-{processes}{'-flat' if extra else ''}"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / f"{config}.yaml"),
           "--num_processes", str(processes), "--main_process_port", str(free_port()), "-m", "thaw_rl.train",
           "--config", str(RECIPES[recipe]), "--output_dir", str(out), *GPU_OVERRIDES, *EXTRA[recipe], *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150, cwd=ROOT)
    row = dict(recipe=recipe, config=config, processes=processes, returncode=proc.returncode,
               wall_seconds=round(time.perf_counter() - t0, 1),
               command=" ".join(["accelerate launch"] + cmd[3:]).replace(str(ROOT) + "/", ""))
    row["engine_warnings"] = sorted({line.split("thaw-rl: ", 1)[1][:300] for line in proc.stderr.splitlines()
                                     if "thaw-rl: CUDA graph" in line})
    if proc.returncode != 0:
        row["error_tail"] = (proc.stdout[-1500:] + "\n" + proc.stderr[-4000:]).strip()
        return row
    summary = json.loads((out / "summary.json").read_text())
    history = json.loads((out / "log_history.json").read_text())
    steps = [h for h in history if any(k.startswith("thaw/") or k.startswith("train/thaw/") for k in h)]
    # rollout logs carry the fork counts; PPO also logs thaw/train_tokens apart, per optimizer step
    forks = [h.get("thaw/num_forks", h.get("train/thaw/num_forks")) for h in steps
             if "thaw/num_forks" in h or "train/thaw/num_forks" in h]
    losses = [h[k] for h in history for k in ("loss", "train/loss", "loss/policy_avg") if k in h]
    grad_norms = [h[k] for h in history for k in ("grad_norm", "train/grad_norm") if k in h]
    row.update(train_tokens=summary.get("train_tokens"), train_tokens_flat=summary.get("train_tokens_flat"),
               first_loss=losses[0] if losses else None, first_grad_norm=grad_norms[0] if grad_norms else None)
    row.update(num_steps=summary["num_steps"], summary_processes=summary["num_processes"],
               savings=summary.get("savings"), steps_with_thaw_metrics=len(steps), num_forks_per_log=forks,
               losses_finite=bool(losses) and all(math.isfinite(x) for x in losses),
               reward_first=summary.get("reward_first"), reward_last=summary.get("reward_last"))
    # each rank forks its own prompts: per_device_train_batch_size / num_generations per rank, summed
    row["ok"] = (summary["num_processes"] == processes and len(forks) > 0 and row["losses_finite"]
                 and all(f is not None and f >= processes for f in forks))
    if recipe == "grpo":  # packed unless told otherwise: fewer training tokens than the flat rows
        packed = bool(row["train_tokens"]) and row["train_tokens"] < row["train_tokens_flat"]
        row["ok"] = row["ok"] and packed == (not extra)
    return row


def with_flat_twin(row: dict, flat: dict) -> dict:
    """``row`` plus the flat run's first-step numbers and their relative differences."""
    row["flat"] = {k: flat.get(k) for k in ("returncode", "ok", "first_loss", "first_grad_norm", "train_tokens",
                                            "train_tokens_flat", "wall_seconds")}
    for key in ("first_loss", "first_grad_norm"):
        a, b = row.get(key), flat.get(key)
        if a is not None and b is not None:
            row[f"{key}_abs_diff_vs_flat"] = abs(a - b)
            row[f"{key}_rel_diff_vs_flat"] = abs(a - b) / max(abs(b), 1e-12)
    return row


def table(rows: list[dict]) -> str:
    lines = [f"{'recipe':6} {'config':16} {'procs':>5} {'rc':>3} {'ok':>5} {'steps':>5} {'forks/log':>12} "
             f"{'savings':>8} {'train tok':>10} {'flat tok':>9} {'gnorm rel diff':>14} {'wall s':>7}"]
    for r in rows:
        forks = ",".join(str(int(f)) for f in r.get("num_forks_per_log", [])[:4])
        savings = f"{r['savings']:.3f}" if r.get("savings") is not None else "-"
        tok = f"{r['train_tokens']:,.0f}" if r.get("train_tokens") else "-"
        flat_tok = f"{r['train_tokens_flat']:,.0f}" if r.get("train_tokens_flat") else "-"
        gdiff = r.get("first_grad_norm_rel_diff_vs_flat")
        gdiff = f"{gdiff:.2e}" if gdiff is not None else "-"
        lines.append(f"{r['recipe']:6} {r['config']:16} {r['processes']:>5} {r['returncode']:>3} "
                     f"{str(r.get('ok', False)):>5} {r.get('num_steps', '-'):>5} {forks:>12} {savings:>8} "
                     f"{tok:>10} {flat_tok:>9} {gdiff:>14} {r['wall_seconds']:>7}")
    return "\n".join(lines)


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "trl", "accelerate", "deepspeed", "triton"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=DEFAULT_RUNS, help="comma-separated recipe:config:processes")
    p.add_argument("--out", type=Path, default=None, help="where to write the JSON receipt")
    p.add_argument("--compare-flat", action="store_true",
                   help="run each GRPO config again with shared_prefix_training off and compare step 1")
    args = p.parse_args()
    import torch

    gpus = torch.cuda.device_count()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.runs.split(","):
            recipe, config, processes = spec.split(":")
            if int(processes) > gpus:
                print(f"skip {spec}: {gpus} GPU(s) here", flush=True)
                continue
            row = run_one(recipe, config, int(processes), Path(tmp))
            if args.compare_flat and recipe == "grpo" and row["returncode"] == 0:
                flat = run_one(recipe, config, int(processes), Path(tmp), ("--shared_prefix_training", "false"))
                row = with_flat_twin(row, flat)
                row["ok"] = row["ok"] and bool(flat.get("ok"))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "error_tail"}), flush=True)
            if "error_tail" in row:
                print(row["error_tail"], flush=True)
    receipt = dict(benchmark="accelerate_configs",
                   device=f"{gpus} x {torch.cuda.get_device_name(0)}" if gpus else "cpu",
                   versions=versions(), git_commit=git_commit(), command=" ".join([sys.executable] + sys.argv),
                   timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"), model="tiny-qwen2 (random, thaw_rl.testing)",
                   runs=rows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(receipt, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
