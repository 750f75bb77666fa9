"""The end-of-run summary: a table in the terminal, ``summary.json`` and a PNG of reward, completion length and
rollout savings per step (plus, when the run took them, greedy answers to the same prompts before and after).

Everything is read back from ``trainer.state.log_history``, the same numbers W&B shows: TRL's ``reward``
and ``rewards/<func>/mean`` per logged step, and thaw-rl's ``thaw/...`` rollout metrics (see
``thaw_rl.trainers.rollout_metrics``). Token and generation-time totals come from the trainer's exact
``rollout_totals`` (summed over all ranks at each generation) when the trainer is at hand; from a log
alone they are estimated: TRL averages a metric over the generations inside one logging window, so each
logged value is multiplied by the generations it stands for (``generations_per_step`` x the steps in the
window), which is exact for GRPO with one generation per logged window and not for PPO, which logs a
rollout's metrics once and then takes several optimizer steps on it.

- rollout tokens: computed = ``prompt_tokens_prefilled + decode_tokens``; a flat sampler (every sample
  prefilled and decoded on its own, as ``model.generate(num_return_sequences=G)``) would have computed
  that plus ``prefill_tokens_saved + decode_tokens_saved``.
- time: generation is ``thaw/rollout_seconds`` (the slowest rank's); training is the rest of TRL's
  ``train_runtime`` (forward/backward, optimizer, rewards, logging).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

PLOT_FILE = "thaw_rl_summary.png"
SUMMARY_FILE = "summary.json"
HISTORY_FILE = "log_history.json"


@dataclass
class RunSummary:
    """What a run did, from its log history."""

    num_steps: int = 0
    num_logged_steps: int = 0
    window: int = 0  # logged steps averaged at each end for reward_first / reward_last (a fifth of them)
    reward_first: float | None = None
    reward_last: float | None = None
    rewards: dict[str, tuple[float, float]] = field(default_factory=dict)  # per reward function, first -> last
    tokens_computed: float = 0.0
    tokens_flat: float = 0.0
    train_tokens: float = 0.0  # tokens through the training forward (shared-prefix packing)
    train_tokens_flat: float = 0.0  # what TRL's padded rows would have run
    generation_seconds: float = 0.0
    total_seconds: float | None = None
    num_processes: int = 1
    # greedy answers to the same prompts before and after training (thaw_rl.completion_samples), as dicts
    samples: list[dict] = field(default_factory=list)

    @property
    def savings(self) -> float | None:
        return 1.0 - self.tokens_computed / self.tokens_flat if self.tokens_flat else None

    @property
    def training_seconds(self) -> float | None:
        return None if self.total_seconds is None else max(self.total_seconds - self.generation_seconds, 0.0)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(savings=self.savings, training_seconds=self.training_seconds)
        return out


def train_steps(log_history: list[dict]) -> list[dict]:
    """The per-step training entries (not eval, not the final train_runtime entry)."""
    return [h for h in log_history if "step" in h and ("reward" in h or any(k.startswith("thaw/") for k in h))
            and not any(k.startswith("eval_") for k in h)]


def summarize(log_history: list[dict], generations_per_step: float = 1.0, num_processes: int = 1,
              rollout_totals: dict[str, float] | None = None) -> RunSummary:
    """What a run did. Token and generation-time totals come from ``rollout_totals`` (the trainer's exact
    sums, ``ThawGRPOTrainer.rollout_totals``) when given, else are estimated from the logged averages."""
    steps = train_steps(log_history)
    out = RunSummary(num_processes=num_processes, num_logged_steps=len(steps))
    out.num_steps = max([int(h["step"]) for h in log_history if "step" in h], default=0)
    final = [h for h in log_history if "train_runtime" in h]
    out.total_seconds = float(final[-1]["train_runtime"]) if final else None
    rewarded = [h for h in steps if _finite(h.get("reward"))]
    if rewarded:
        out.window = max(1, len(rewarded) // 5)
        out.reward_first = _mean(h["reward"] for h in rewarded[: out.window])
        out.reward_last = _mean(h["reward"] for h in rewarded[-out.window:])
        for key in sorted({k for h in rewarded for k in h if k.startswith("rewards/") and k.endswith("/mean")}):
            values = [h[key] for h in rewarded if _finite(h.get(key))]
            if values:
                w = max(1, len(values) // 5)
                out.rewards[key[len("rewards/"):-len("/mean")]] = (_mean(values[:w]), _mean(values[-w:]))
    previous = 0
    for h in steps:
        span = max(int(h["step"]) - previous, 1)  # optimizer steps since the previous log
        gens = span * generations_per_step
        previous = int(h["step"])
        computed = h.get("thaw/prompt_tokens_prefilled", 0.0) + h.get("thaw/decode_tokens", 0.0)
        saved = h.get("thaw/prefill_tokens_saved", 0.0) + h.get("thaw/decode_tokens_saved", 0.0)
        out.tokens_computed += gens * computed
        out.tokens_flat += gens * (computed + saved)
        out.generation_seconds += gens * h.get("thaw/rollout_seconds", 0.0)
        # training tokens are logged per optimizer step (averaged over the steps since the last log)
        out.train_tokens += span * h.get("thaw/train_tokens", 0.0)
        out.train_tokens_flat += span * h.get("thaw/train_tokens_flat", 0.0)
    if rollout_totals:
        t = lambda key: rollout_totals.get(f"thaw/{key}", 0.0)  # noqa: E731
        out.tokens_computed = t("prompt_tokens_prefilled") + t("decode_tokens")
        out.tokens_flat = out.tokens_computed + t("prefill_tokens_saved") + t("decode_tokens_saved")
        out.generation_seconds = t("rollout_seconds")
        out.train_tokens, out.train_tokens_flat = t("train_tokens"), t("train_tokens_flat")
    return out


def print_summary(summary: RunSummary, console=None, title: str = "thaw-rl run summary") -> None:
    """A rich table of ``summary``."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("optimizer steps", f"{summary.num_steps}" + (f" on {summary.num_processes} processes"
                                                               if summary.num_processes > 1 else ""))
    if summary.reward_first is not None:
        span = f"first {summary.window} -> last {summary.window} steps" if summary.window > 1 else "first -> last step"
        table.add_row(f"reward ({span})", f"{summary.reward_first:.3f} -> {summary.reward_last:.3f}")
        for name, (first, last) in summary.rewards.items():
            table.add_row(f"  {name}", f"{first:.3f} -> {last:.3f}")
    if summary.tokens_flat:
        table.add_row("rollout tokens computed", f"{summary.tokens_computed:,.0f}")
        table.add_row("  a flat sampler would compute", f"{summary.tokens_flat:,.0f}")
        table.add_row("  saved", f"{summary.savings:.1%} ({summary.tokens_flat / summary.tokens_computed:.2f}x fewer)")
    if summary.train_tokens_flat:
        table.add_row("training tokens (forward + backward)", f"{summary.train_tokens:,.0f}")
        table.add_row("  TRL's padded rows would run", f"{summary.train_tokens_flat:,.0f}")
        if summary.train_tokens < summary.train_tokens_flat:
            table.add_row("  saved", f"{1 - summary.train_tokens / summary.train_tokens_flat:.1%} "
                                     f"({summary.train_tokens_flat / summary.train_tokens:.2f}x fewer)")
    if summary.total_seconds is not None:
        total = summary.total_seconds
        table.add_row("wall time (train)", _duration(total))
        if summary.generation_seconds:
            gen, rest = summary.generation_seconds, summary.training_seconds
            table.add_row("  generation", f"{_duration(gen)} ({gen / total:.0%})")
            table.add_row("  training, rewards, logging", f"{_duration(rest)} ({rest / total:.0%})")
    console.print(table)
    print_samples(summary.samples, console)


def print_samples(samples: list[dict], console) -> None:
    """Each prompt once, then its greedy answer at each step sampled (first and last), with the reward."""
    from rich.markup import escape

    if not samples:
        return
    steps = sorted({s["step"] for s in samples})
    console.print(f"[bold]Sample completions[/bold] (greedy, the same prompts at step {' and step '.join(map(str, steps))}):")
    by_prompt: dict[str, list[dict]] = {}
    for s in samples:
        by_prompt.setdefault(s["prompt"], []).append(s)
    width = len(str(steps[-1]))
    limit = max(40, min(160, console.width) - 28 - width)  # one line each, the reward included
    for prompt, rows in by_prompt.items():
        console.print(f"  [dim]prompt:[/dim] {escape(_one_line(prompt, limit))}")
        for s in sorted(rows, key=lambda r: r["step"]):
            reward = "" if s.get("reward") is None else f"  [dim](reward {s['reward']:.2f})[/dim]"
            answer = escape(_one_line(s["completion"], limit)) or "[dim](empty)[/dim]"
            console.print(f"    step {s['step']:>{width}}: {answer}{reward}")


def _one_line(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Distinct colours: the weighted reward in black, the reward functions from a palette without green, length in
# red, savings in green (nothing else is green).
REWARD_COLOURS = ("tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
LENGTH_COLOUR, SAVINGS_COLOUR, TRAIN_SAVINGS_COLOUR = "tab:red", "tab:green", "tab:olive"


def make_figure(log_history: list[dict]):
    """Reward (and each reward function), completion length and rollout savings per step: three panels,
    integer step ticks, markers, distinct colours, legends beside the axes (never over the lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = train_steps(log_history)
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    _plot(top, steps, "reward", "reward (weighted sum)", "black", linewidth=2)
    funcs = sorted({k for h in steps for k in h if k.startswith("rewards/") and k.endswith("/mean")})
    for i, key in enumerate(funcs):
        _plot(top, steps, key, key[len("rewards/"):-len("/mean")], REWARD_COLOURS[i % len(REWARD_COLOURS)])
    top.set_ylabel("mean reward")
    _plot(middle, steps, "completions/mean_length", "mean completion length", LENGTH_COLOUR)
    lows = [(h["step"], h["completions/min_length"], h["completions/max_length"]) for h in steps
            if _finite(h.get("completions/min_length")) and _finite(h.get("completions/max_length"))]
    if lows:
        middle.fill_between([x for x, _, _ in lows], [lo for _, lo, _ in lows], [hi for _, _, hi in lows],
                            color=LENGTH_COLOUR, alpha=0.15, label="min to max")
    middle.set_ylabel("tokens")
    middle.set_ylim(bottom=0)
    _plot(bottom, steps, "thaw/savings", "rollout tokens saved vs a flat sampler", SAVINGS_COLOUR, scale=100)
    trained = [{"step": h["step"], "saved": 1.0 - h["thaw/train_tokens"] / h["thaw/train_tokens_flat"]}
               for h in steps if _finite(h.get("thaw/train_tokens")) and h.get("thaw/train_tokens_flat")]
    _plot(bottom, trained, "saved", "training tokens saved vs TRL's padded rows", TRAIN_SAVINGS_COLOUR,
          scale=100)
    bottom.set_ylabel("saved (%)")
    bottom.set_ylim(0, 100)
    bottom.set_xlabel("optimizer step")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (top, middle, bottom):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    fig.suptitle("thaw-rl: reward, completion length and rollout savings per step")
    fig.tight_layout()
    return fig


def _plot(ax, steps: list[dict], key: str, label: str, colour: str, scale: float = 1.0, linewidth: float = 1.5):
    pts = [(h["step"], scale * h[key]) for h in steps if _finite(h.get(key))]
    if pts:
        ax.plot([x for x, _ in pts], [y for _, y in pts], label=label, color=colour, marker="o", markersize=3,
                linewidth=linewidth)


def write_plot(log_history: list[dict], path: str | Path) -> Path | None:
    """``make_figure`` as a PNG; None without matplotlib."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig = make_figure(log_history)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(log_history: list[dict], summary: RunSummary, output_dir: str | Path) -> dict[str, Path | None]:
    """``summary.json``, ``log_history.json`` and the plot in ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY_FILE).write_text(json.dumps(summary.to_dict(), indent=2))
    (out / HISTORY_FILE).write_text(json.dumps(log_history, indent=1, default=float))
    plot = write_plot(log_history, out / PLOT_FILE)
    return {"summary": out / SUMMARY_FILE, "history": out / HISTORY_FILE, "plot": plot}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    whole = round(seconds)  # rounded once, so 599.6 s reads 10 min 00 s, not 9 min 60 s
    return f"{whole // 60} min {whole % 60:02d} s"
