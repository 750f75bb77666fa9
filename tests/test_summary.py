"""The end of a run as a user sees it: the plot, the short console line and the sample completions.

All from a hand-written log history shaped like the quickstart's (what TRL and thaw-rl log per step), so
the assertions are exact and nothing trains.
"""

from __future__ import annotations

import pytest
from rich.console import Console

from thaw_rl.console_progress import ShortProgressCallback, format_line
from thaw_rl.summary import RunSummary, make_figure, print_summary

STEP = {"reward": 0.53, "rewards/numeric_answer/mean": 0.62, "rewards/length_penalty/mean": -0.18,
        "completions/mean_length": 12.25, "completions/min_length": 3.0, "completions/max_length": 32.0,
        "thaw/savings": 0.59, "kl": 0.0, "loss": 0.01, "learning_rate": 3e-5, "grad_norm": 1.5}


def history(num_steps: int = 20) -> list[dict]:
    steps = [dict(STEP, step=s, reward=0.2 + 0.025 * s, **{"completions/mean_length": 24.5 - 0.8 * s})
             for s in range(1, num_steps + 1)]
    return steps + [{"step": num_steps, "train_runtime": 175.0}]


def test_the_plot_has_three_panels_integer_steps_markers_distinct_colours_and_legends_beside_the_axes():
    import matplotlib.pyplot as plt

    fig = make_figure(history())
    try:
        top, middle, bottom = fig.axes
        assert [ax.get_ylabel() for ax in fig.axes] == ["mean reward", "tokens", "saved (%)"]
        lines = [line for ax in fig.axes for line in ax.get_lines()]
        assert [line.get_label() for line in lines] == ["reward (weighted sum)", "length_penalty", "numeric_answer",
                                                        "mean completion length",
                                                        "rollout tokens saved vs a flat sampler"]
        assert len({line.get_color() for line in lines}) == len(lines)  # numeric_answer and savings were both green
        assert all(line.get_marker() == "o" for line in lines)
        length = middle.get_lines()[0].get_ydata()
        assert (length[0], length[-1]) == (pytest.approx(23.7), pytest.approx(8.5))  # the length drop is visible
        fig.canvas.draw()
        ticks = [t for t in bottom.get_xticks() if 1 <= t <= 20]
        assert ticks and all(float(t).is_integer() for t in ticks)
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            legend_box = ax.get_legend().get_window_extent(renderer)
            assert legend_box.x0 >= ax.get_window_extent(renderer).x1  # beside the axes, not over the lines
    finally:
        plt.close(fig)


def test_the_short_console_line_says_what_a_run_is_judged_by():
    assert format_line(dict(STEP), step=10, max_steps=20, seconds_per_step=7.94) == (
        "step 10/20 | reward 0.53 (numeric_answer 0.62, length_penalty -0.18) | length 12.2 tok | saved 59% | 7.9 s/step")
    assert format_line({"loss": 2.5, "thaw/savings": 0.25}, step=3, max_steps=0) == "step 3 | loss 2.5 | saved 25%"


@pytest.mark.parametrize("max_steps, expected", [(20, [1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]),
                                                 (7, [1, 2, 3, 4, 5, 6, 7]),
                                                 (25, [1, 3, 6, 9, 12, 15, 18, 21, 24, 25])])
def test_about_ten_lines_per_run_first_and_last_included(max_steps, expected):
    assert [s for s in range(1, max_steps + 1) if ShortProgressCallback._due(s, max_steps)] == expected


def test_the_summary_prints_the_same_prompts_answers_at_the_first_and_last_step():
    samples = [
        {"step": 0, "prompt": "What is 6 + 3?", "completion": "To solve this, we add\n6 and 3 [carefully].",
         "rewards": {"numeric_answer": 0.0}, "reward": -0.41},
        {"step": 0, "prompt": "What is 2 + 5?", "completion": "7", "rewards": {}, "reward": None},
        {"step": 20, "prompt": "What is 6 + 3?", "completion": "9", "rewards": {"numeric_answer": 1.0}, "reward": 0.98},
        {"step": 20, "prompt": "What is 2 + 5?", "completion": "7", "rewards": {}, "reward": None},
    ]
    console = Console(record=True, width=200)
    print_summary(RunSummary(num_steps=20, samples=samples), console=console)
    text = console.export_text()
    assert text[text.index("Sample completions"):].splitlines() == [
        "Sample completions (greedy, the same prompts at step 0 and step 20):",
        "  prompt: What is 6 + 3?",
        "    step  0: To solve this, we add 6 and 3 [carefully].  (reward -0.41)",
        "    step 20: 9  (reward 0.98)",
        "  prompt: What is 2 + 5?",
        "    step  0: 7",
        "    step 20: 7",
    ]


def test_durations_round_once():
    from thaw_rl.summary import _duration

    assert [_duration(s) for s in (59.94, 119.9, 599.6, 175.0)] == ["59.9 s", "119.9 s", "10 min 00 s", "2 min 55 s"]


def test_a_long_answer_is_cut_to_one_console_line():
    long = "To convert 6 to a positive integer, you can simply add 6 to 6. So, 6 + 6 = 12, which is the sum."
    console = Console(record=True, width=80)
    print_summary(RunSummary(samples=[{"step": 0, "prompt": "What is 6 + 6?", "completion": long, "rewards": {},
                                       "reward": 0.5}]), console=console)
    (line,) = [ln for ln in console.export_text().splitlines() if "step 0:" in ln]
    assert len(line) <= 80 and line.endswith("...  (reward 0.50)")
