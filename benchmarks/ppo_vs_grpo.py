"""Mean reward over training steps: ThawPPOTrainer next to ThawGRPOTrainer, same wall-time budget (CPU).

The quickstart task (recipes/quickstart_cpu.yaml: ``builtin:arithmetic`` sums, SmolLM2-135M-Instruct
offline, rewards ``numeric_answer`` + ``number_only`` + 0.5 ``length_penalty``, temperature 0.7, learning
rate 3e-5, 2 prompts x 8 samples of up to 32 tokens per rollout), the same model weights, data order, seeds, sampling shape (``--prompts`` prompts x
``--num-generations`` samples forked from one prefill per rollout) and learning rate for both. Only
the update differs:

- ``grpo``: ThawGRPOTrainer, one optimizer step per rollout (TRL's defaults: group-normalised
  advantages, no KL).
- ``ppo``: ThawPPOTrainer, ``--ppo-epochs`` x ``--mini-batches`` optimizer steps per rollout, value head
  (``--value-lr``), GAE, KL penalty ``--kl-coef`` against the initial policy.

Each trainer runs until ``--budget`` seconds have passed (checked at optimizer-step ends; the step in
flight finishes), rollouts included: wall seconds, or with ``--clock cpu`` this process's CPU seconds
(``time.process_time``), which other processes on a shared machine do not inflate (with
``--threads 1`` one CPU second is about one wall second on a quiet machine). The receipt records, per rollout, the wall
time and the mean reward (TRL's ``reward`` metric: weighted sum of the reward functions), plus the
mean over the first and last ``--window`` rollouts.

    python benchmarks/ppo_vs_grpo.py --threads 2 --budget 300 --out benchmarks/results/ppo_vs_grpo_cpu.json
    python benchmarks/ppo_vs_grpo.py --model tiny --budget 20          # seconds, a smoke test

On CPU run it with nothing else on the machine. Table last; ``--out`` writes a JSON receipt.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from receipt_utils import receipt, write_receipt  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    p.add_argument("--trainers", default="grpo,ppo", help="comma list of grpo, ppo (run in this order)")
    p.add_argument("--budget", type=float, default=300.0, help="seconds per trainer (see --clock)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="what the budget counts")
    p.add_argument("--prompts", type=int, default=2, help="prompts per rollout")
    p.add_argument("--num-generations", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-completion-length", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--learning-rate", type=float, default=3e-5)
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--mini-batches", type=int, default=2)
    p.add_argument("--value-lr", type=float, default=1e-4)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--preset", default="add", help="builtin:arithmetic preset (add, add_sub, mixed)")
    p.add_argument("--window", type=int, default=5, help="rollouts averaged at the start and the end")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU")
    p.add_argument("--out", type=Path, default=None, help="where to write the JSON receipt")
    args = p.parse_args()
    args.trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    return args


def load(args):
    if args.model == "tiny":
        from thaw_rl.testing import tiny_model_and_tokenizer

        return (*tiny_model_and_tokenizer("qwen2", seed=args.seed), "tiny qwen2 (random)")
    from thaw_rl.offline_models import load_smollm2

    return (*load_smollm2(torch.float32), "SmolLM2-135M-Instruct")


def dataset(args, rows: int):
    from datasets import Dataset

    from thaw_rl.data.builtin_tasks import builtin_rows

    return Dataset.from_dict(builtin_rows("builtin:arithmetic", rows, seed=args.seed, preset=args.preset,
                                          system_prompt=None))


def make_budget_callback(budget: float, clock: dict):
    from transformers import TrainerCallback

    class Budget(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock["start"], clock["cpu_start"] = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            if elapsed(clock) >= budget:
                control.should_training_stop = True

    return Budget()


def elapsed(clock: dict) -> float:
    """Seconds since training began, on the budget's clock."""
    if clock["kind"] == "cpu":
        return time.process_time() - clock["cpu_start"]
    return time.perf_counter() - clock["start"]


class RolloutClock:
    """Mixin: the budget-clock time at which each rollout's rewards were known."""

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.model.training:
            self.rollout_times.append(elapsed(self.clock))
        return output


def run(kind: str, args, out_dir: str) -> dict:
    from thaw_rl.rewards import make_length_penalty, number_only, numeric_answer
    from thaw_rl.trainers import ThawGRPOConfig, ThawGRPOTrainer, ThawPPOConfig, ThawPPOTrainer

    model, tokenizer, model_name = load(args)
    rollout_rows = args.prompts * args.num_generations
    fields = dict(
        output_dir=f"{out_dir}/{kind}", use_cpu=not torch.cuda.is_available(), bf16=False, report_to="none",
        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
        max_steps=100_000, logging_steps=1, save_strategy="no", gradient_checkpointing=False,
        learning_rate=args.learning_rate, lr_scheduler_type="constant", seed=args.seed, shuffle_dataset=False,
        kv_cache_memory=256 * 2**20, temperature=args.temperature, reward_weights=[1.0, 1.0, 0.5],
    )
    if kind == "ppo":
        config = ThawPPOConfig(**fields, per_device_train_batch_size=rollout_rows // args.mini_batches,
                               num_mini_batches=args.mini_batches, num_ppo_epochs=args.ppo_epochs,
                               value_learning_rate=args.value_lr, kl_coef=args.kl_coef)
        trainer_cls = ThawPPOTrainer
    else:
        config = ThawGRPOConfig(**fields, per_device_train_batch_size=rollout_rows)
        trainer_cls = ThawGRPOTrainer
    timed_cls = type(f"Timed{trainer_cls.__name__}", (RolloutClock, trainer_cls), {})
    rewards = [numeric_answer, number_only, make_length_penalty(args.max_completion_length)]
    trainer = timed_cls(model=model, reward_funcs=rewards, args=config, train_dataset=dataset(args, 1000),
                        processing_class=tokenizer)
    trainer.clock, trainer.rollout_times = {"kind": args.clock}, []
    trainer.add_callback(make_budget_callback(args.budget, trainer.clock))
    trainer.train()
    wall = time.perf_counter() - trainer.clock["start"]
    cpu = time.process_time() - trainer.clock["cpu_start"]
    rollouts = [h for h in trainer.state.log_history if "reward" in h]
    rewards = [h["reward"] for h in rollouts]
    w = min(args.window, max(len(rewards) // 2, 1))
    row = {
        "trainer": kind, "model": model_name, "wall_seconds": wall, "cpu_seconds": cpu, "num_rollouts": len(rewards),
        "optimizer_steps": trainer.state.global_step, "window": w,
        "reward_first": statistics.mean(rewards[:w]), "reward_last": statistics.mean(rewards[-w:]),
        "reward_mean": statistics.mean(rewards),
        "accuracy_last": statistics.mean(h["rewards/numeric_answer/mean"] for h in rollouts[-w:]),
        "terse_last": statistics.mean(h["rewards/number_only/mean"] for h in rollouts[-w:]),
        "per_rollout": {"budget_seconds": trainer.rollout_times[:len(rewards)], "reward": rewards,
                        "numeric_answer": [h["rewards/numeric_answer/mean"] for h in rollouts],
                        "number_only": [h["rewards/number_only/mean"] for h in rollouts],
                        "mean_length": [h["completions/mean_length"] for h in rollouts]},
    }
    if kind == "ppo":
        ppo = [h for h in trainer.state.log_history if "loss/value_avg" in h]
        k = min(4 * w, max(len(ppo) // 2, 1))  # optimizer steps averaged at each end
        row["ppo"] = {"objective_kl_last": statistics.mean(h["objective/kl"] for h in rollouts[-w:]),
                      "explained_variance_last": statistics.mean(h["val/explained_variance"] for h in rollouts[-w:]),
                      "value_loss_first": statistics.mean(h["loss/value_avg"] for h in ppo[:k]),
                      "value_loss_last": statistics.mean(h["loss/value_avg"] for h in ppo[-k:])}
    return row


def table(rows: list[dict]) -> str:
    """reward first/last: mean over the first/last ``window`` rollouts (``--window``, at most half the run)."""
    cols = [("trainer", "trainer", "{}"), ("wall s", "wall_seconds", "{:.0f}"), ("cpu s", "cpu_seconds", "{:.0f}"), ("rollouts", "num_rollouts", "{}"),
            ("opt steps", "optimizer_steps", "{}"), ("window", "window", "{}"),
            ("reward first", "reward_first", "{:.3f}"), ("reward last", "reward_last", "{:.3f}"), ("reward mean", "reward_mean", "{:.3f}"),
            ("correct last", "accuracy_last", "{:.3f}"), ("terse last", "terse_last", "{:.3f}")]
    lines = [[c[0] for c in cols]] + [[fmt.format(r[key]) for _, key, fmt in cols] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    text = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines]
    return "\n".join(text[:1] + ["-" * len(text[0])] + text[1:])


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as out_dir:
        for kind in args.trainers:
            print(f"== {kind}: {args.prompts} prompts x {args.num_generations} samples, "
                  f"{args.max_completion_length} new tokens, {args.budget:.0f} {args.clock} s", flush=True)
            rows.append(run(kind, args, out_dir))
    write_receipt(args.out, receipt("ppo_vs_grpo", args, rows))
    print(table(rows))


if __name__ == "__main__":
    main()
