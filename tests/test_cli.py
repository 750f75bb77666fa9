"""The ``thaw-rl`` command and the accelerate configs, on CPU.

The story: ``thaw-rl train`` runs a tiny recipe in-process and leaves the summary, the log history and
the plot in output_dir; ``--accelerate-config`` builds the ``accelerate launch`` line and names the
configs that exist when asked for one that does not; every config in configs/ is one accelerate can
load; and the README's ``accelerate launch --config_file configs/cpu.yaml --num_processes 2`` really
starts two ranks whose ``thaw/`` metrics are summed into the log.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from thaw_rl import cli
from thaw_rl.testing import free_port

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "recipes" / "tiny_grpo.yaml"
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_train_runs_a_recipe_in_process(tmp_path, capsys, monkeypatch, fresh_wandb):
    """With report_to wandb and no API key anywhere, the run logs offline and says where."""
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from `wandb login`
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    out = tmp_path / "out"
    assert cli.main(["train", str(TINY), "--output_dir", str(out), "--report_to", "wandb"]) == 0
    printed = capsys.readouterr().out
    for words in ("optimizer steps", "reward (first -> last step)", "rollout tokens computed",
                  "a flat sampler would compute", "generation", "logging to W&B offline",
                  "Sample completions (greedy, the same prompts at step 0 and step 2):"):
        assert words in printed, printed
    assert "step 1/2 | reward " in printed and "step 2/2 | reward " in printed  # the short line, not the dict
    assert "'learning_rate':" not in printed
    (run_dir,) = [line.rsplit(": ", 1)[1] for line in printed.splitlines() if "W&B run directory" in line]
    assert Path(run_dir).parent == tmp_path / "wandb" and Path(run_dir).name.startswith("offline-run-")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_steps"] == 2 and summary["num_processes"] == 1
    assert [s["step"] for s in summary["samples"]] == [0, 0, 0, 2, 2, 2]  # 3 prompts, answered before and after
    assert [s["prompt"] for s in summary["samples"][:3]] == [s["prompt"] for s in summary["samples"][3:]]
    assert set(summary["samples"][0]["rewards"]) == {"numeric_answer", "length_penalty"}
    assert summary["tokens_flat"] > summary["tokens_computed"] > 0  # each prompt prefilled once, not 4 times
    history = json.loads((out / "log_history.json").read_text())
    steps = [h for h in history if "thaw/savings" in h]
    assert len(steps) == 2 and all(h["thaw/num_forks"] == 1 for h in steps)  # one prompt per step
    assert (out / "thaw_rl_summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (table,) = (Path(run_dir) / "files" / "media" / "table").glob("completion_samples_*.table.json")
    table = json.loads(table.read_text())  # TRL's log_completions layout, under its own key
    assert table["columns"] == ["step", "prompt", "completion", "length_penalty", "numeric_answer", "reward"]
    assert [row[0] for row in table["data"]] == [0, 0, 0, 2, 2, 2]


def test_train_reports_a_bad_recipe_without_a_traceback(tmp_path, capsys):
    code = cli.main(["train", str(TINY), "--output_dir", str(tmp_path), "--learnin_rate", "0.1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown override 'learnin_rate' (did you mean 'learning_rate'?)" in err
    assert "Traceback" not in err


def test_the_console_script_is_installed():
    script = shutil.which("thaw-rl")
    if script is None:
        pytest.skip("thaw-rl is not on PATH (pip install -e . installs it)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # this checkout, wherever the editable install points
    result = subprocess.run([script, "list"], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    assert "quickstart_cpu" in result.stdout and "deepspeed_zero3" in result.stdout


def test_recipe_names_and_accelerate_config_names_resolve():
    assert cli.resolve_file("quickstart_cpu", "recipes") == ROOT / "recipes" / "quickstart_cpu.yaml"
    cmd = cli.launch_command(TINY, {"accelerate_config": "cpu", "num_processes": "2"}, ["--max_steps", "1"])
    config = str(ROOT / "configs" / "cpu.yaml")
    assert cmd == [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "2",
                   "-m", "thaw_rl.train", "--config", str(TINY), "--max_steps", "1"]
    options, overrides = cli.split_args(["--accelerate-config=cpu", "--max_steps", "3", "--num-processes", "2"])
    assert options == {"accelerate_config": "cpu", "num_processes": "2"} and overrides == ["--max_steps", "3"]


def test_unknown_accelerate_config_lists_the_ones_that_exist(capsys):
    assert cli.main(["train", str(TINY), "--accelerate-config", "tpu_pod"]) == 2
    err = capsys.readouterr().err
    assert "accelerate config 'tpu_pod' not found" in err
    for name in ("cpu", "deepspeed_zero2", "deepspeed_zero3", "fsdp2", "multi_gpu", "single_gpu"):
        assert f"'{name}'" in err, err


def test_unknown_recipe_lists_the_recipes(capsys):
    assert cli.main(["train", "quickstart_gpu"]) == 2
    err = capsys.readouterr().err
    assert "recipe 'quickstart_gpu' not found" in err and "'quickstart_cpu'" in err


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_accelerate_configs_load(config):
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"single_gpu": "NO", "multi_gpu": "MULTI_GPU", "deepspeed_zero2": "DEEPSPEED",
                "deepspeed_zero3": "DEEPSPEED", "fsdp2": "FSDP", "cpu": "MULTI_GPU",
                "pool_1_trainer_n_rollout": "NO"}
    assert config.read_text().startswith("#"), "each config starts with a comment saying when to use it"
    loaded = load_config_from_file(str(config))
    assert str(loaded.distributed_type).split(".")[-1] == expected[config.stem]
    if config.stem == "cpu":
        assert loaded.use_cpu and loaded.mixed_precision == "no"
    if config.stem.startswith("deepspeed"):
        assert loaded.deepspeed_config["zero_stage"] == int(config.stem[-1])
    if config.stem == "fsdp2":
        assert loaded.fsdp_config["fsdp_version"] == 2



def test_accelerate_launch_on_two_cpu_processes(tmp_path):
    """The README's command with configs/cpu.yaml: two gloo ranks, one prompt each per step, metrics summed.

    output_dir already holds a run, so both ranks must agree on the new directory (rank 0 decides)."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "summary.json").write_text("{}")
    out = tmp_path / "out-2"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "cpu.yaml"),
           "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "thaw_rl.train",
           "--config", str(TINY), "--output_dir", str(tmp_path / "out")]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT))
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["num_steps"] == 2
    steps = [h for h in json.loads((out / "log_history.json").read_text()) if "thaw/savings" in h]
    assert len(steps) == 2
    for h in steps:
        assert h["thaw/num_forks"] == 2  # each rank forked its own prompt: the sum over both ranks
        assert h["thaw/prefill_tokens_saved"] > 0 and 0 < h["thaw/savings"] < 1
    assert result.stdout.count("rollout tokens computed") == 1  # the summary comes from rank 0 only
    assert result.stdout.count("already holds a run; writing this one to") == 1
    assert (tmp_path / "out" / "summary.json").read_text() == "{}"  # the first run's files are untouched
    assert [s["step"] for s in summary["samples"]] == [0, 0, 0, 2, 2, 2]  # rank 0 answered them alone


# -- help and list answer at once --------------------------------------------------------------------------
def test_help_and_list_import_neither_torch_nor_transformers():
    """`thaw-rl --help` and `thaw-rl list` took 8.5 s importing torch, transformers and dynamo; now nothing heavy."""
    script = ("import sys; from thaw_rl import cli; assert cli.main(['--help']) == 0; assert cli.main(['list']) == 0; "
              "print(sorted(m for m in ('torch', 'transformers', 'trl', 'accelerate', 'yaml') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]", result.stdout
    assert "thaw-rl train RECIPE" in result.stdout and "recipes: " in result.stdout and "``" not in result.stdout


def test_train_help_shows_the_recipes_fields_first_and_trl_behind_help_all(capsys):
    assert cli.main(["train", "quickstart_cpu", "--help"]) == 0
    text = capsys.readouterr().out
    titles = [line for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert [t.split(" ")[0] for t in titles] == ["recipe:", "model", "thaw-rl:", "training:", "launch"]
    assert "--model_name_or_path (default None; recipe: 'smollm2-offline')" in text
    assert "--tree_spec (default 'grpo')" in text and "--max_steps (default -1; recipe: 20)" in text
    assert "--adam_beta2" not in text and "thaw-rl train quickstart_cpu --help-all" in text
    assert "``" not in text and len(text.splitlines()) < 250
    assert cli.main(["train", "--help"]) == 0  # no recipe: the default trainer's fields, exit 0
    assert "Recipes: best_of_n" in capsys.readouterr().out


def test_train_help_all_lists_every_trl_field_without_rst_markup(capsys):
    assert cli.main(["train", "quickstart_cpu", "--help-all"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: thaw-rl train ") and "quickstart_cpu.yaml" in text.splitlines()[0]
    assert "--adam_beta2" in text and "--tree_spec" in text and "--lora_r" in text
    assert "``" not in text


# -- a second run never replaces the first one's files ---------------------------------------------------
def test_a_second_run_into_the_same_output_dir_goes_to_a_new_directory_and_says_so(tmp_path, capsys):
    from thaw_rl import train as train_module

    out = tmp_path / "run"
    args = ["--config", str(TINY), "--output_dir", str(out)]
    recipe = train_module.parse_recipe(args)
    train_module.choose_output_dir(recipe, is_main=True)
    assert recipe.config.output_dir == str(out)  # nothing there yet
    out.mkdir()
    train_module.choose_output_dir(recipe, is_main=True)
    assert recipe.config.output_dir == str(out)  # an empty directory holds no run
    (out / "summary.json").write_text("{}")  # the first run finished
    train_module.choose_output_dir(recipe, is_main=True)
    assert recipe.config.output_dir == f"{out}-2"
    assert f"{out} already holds a run; writing this one to {out}-2" in capsys.readouterr().out
    (tmp_path / "run-2" / "checkpoint-5").mkdir(parents=True)  # the second one was interrupted after a checkpoint
    assert train_module.fresh_output_dir(str(out)) == f"{out}-3"
    replace = train_module.parse_recipe(args + ["--overwrite_output_dir", "true"])
    train_module.choose_output_dir(replace, is_main=True)
    assert replace.config.output_dir == str(out)
    resume = train_module.parse_recipe(args + ["--resume_from_checkpoint", str(out)])
    train_module.choose_output_dir(resume, is_main=True)
    assert resume.config.output_dir == str(out)  # resuming continues where the run is


def test_console_logs_and_summary_samples_are_checked_before_anything_loads():
    from thaw_rl import train as train_module

    with pytest.raises(train_module.RecipeError, match=r"console_logs='loud': use one of \('short', 'full'\)"):
        train_module.parse_recipe(["--config", str(TINY), "--console_logs", "loud"])
    with pytest.raises(train_module.RecipeError, match=r"summary_samples=-1 must be >= 0"):
        train_module.parse_recipe(["--config", str(TINY), "--summary_samples", "-1"])
