"""``ShortProgressCallback``: transformers' progress bar with one short line every few steps.

Why: transformers' ``ProgressCallback`` writes every log entry (about 40 keys for GRPO) under the bar at
each ``logging_steps``; the numbers a run is judged by are lost in it. This subclass keeps the bar and
writes, about ten times per run, one line of what matters:

    step 10/20 | reward 0.53 (numeric_answer 0.62, length_penalty -0.18) | length 12.3 tok | saved 59% | 7.9 s/step

Everything still goes to the trackers (W&B) and ``trainer.state.log_history``; ``console_logs: full`` in a
recipe brings back transformers' full dict per log.
"""

from __future__ import annotations

import math
import time

from transformers.trainer_callback import ProgressCallback

LINES_PER_RUN = 10


class ShortProgressCallback(ProgressCallback):
    """The progress bar plus ``format_line(logs)`` at steps 1, every ``max_steps / 10``, and the last."""

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self._start, self._start_step = None, state.global_step

    def on_step_begin(self, args, state, control, **kwargs):
        if self._start is None:  # timed from the first step, not from setup work done at train begin
            self._start = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        if "train_runtime" in logs or any(k.startswith("eval_") for k in logs):
            return  # the end summary reports the totals; evaluation keeps its own bar
        if not self._due(state.global_step, state.max_steps):
            return
        done = state.global_step - self._start_step
        seconds_per_step = (time.perf_counter() - self._start) / done if done > 0 and self._start else None
        self.training_bar.write(format_line(logs, state.global_step, state.max_steps, seconds_per_step))

    @staticmethod
    def _due(step: int, max_steps: int) -> bool:
        every = max(1, math.ceil(max_steps / LINES_PER_RUN)) if max_steps > 0 else 1
        return step == 1 or step % every == 0 or step == max_steps


def format_line(logs: dict, step: int, max_steps: int, seconds_per_step: float | None = None) -> str:
    """One line of a log entry: reward (per function), completion length, rollout savings, loss, speed."""
    parts = [f"step {step}/{max_steps}" if max_steps > 0 else f"step {step}"]
    if _num(logs.get("reward")):
        funcs = [(k[len("rewards/"):-len("/mean")], v) for k, v in logs.items()
                 if k.startswith("rewards/") and k.endswith("/mean") and _num(v)]
        detail = f" ({', '.join(f'{name} {v:.2f}' for name, v in funcs)})" if funcs else ""
        parts.append(f"reward {logs['reward']:.2f}{detail}")
    elif _num(logs.get("loss")):
        parts.append(f"loss {logs['loss']:.4g}")
    if _num(logs.get("completions/mean_length")):
        parts.append(f"length {logs['completions/mean_length']:.1f} tok")
    if _num(logs.get("thaw/savings")):
        parts.append(f"saved {logs['thaw/savings']:.0%}")
    if _num(logs.get("kl")) and logs["kl"] != 0:
        parts.append(f"kl {logs['kl']:.3g}")
    if seconds_per_step is not None:
        parts.append(f"{seconds_per_step:.1f} s/step")
    return " | ".join(parts)


def _num(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
