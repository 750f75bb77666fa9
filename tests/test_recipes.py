"""Recipes, built-in data and rewards, and the errors a bad recipe gets, on CPU.

The story: the built-in rewards read numbers the way GSM8K and chat completions write them; the
built-in task is a pure function of its seed; every recipe in recipes/ states what it is for, parses
and builds its trainer (hub models and datasets swapped for offline ones); each kind of mistake in a
recipe stops the run before a model is loaded, naming the valid choices; and a shortened quickstart
learns.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import yaml

from thaw_rl import train
from thaw_rl.data import DatasetSpec, builtin_rows, load_recipe_datasets
from thaw_rl.rewards import (
    answer_format,
    extract_answer,
    make_length_penalty,
    number_only,
    numeric_answer,
    resolve_rewards,
)
from thaw_rl.train import RecipeError, build_trainer, parse_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
TINY = ROOT / "tests" / "recipes" / "tiny_grpo.yaml"
CPU = ["--use_cpu", "true", "--bf16", "false", "--report_to", "none"]


# -- rewards ----------------------------------------------------------------------------------------------------
def test_numeric_answer_reads_tags_gsm8k_boxed_and_the_last_number():
    assert extract_answer("The sum is 12.") == 12.0
    assert extract_answer("3 + 4 = 7, so <answer>7</answer>") == 7.0
    assert extract_answer("Natalia sold 48/2 = 24 clips ... #### 72") == 72.0
    assert extract_answer(r"so \boxed{1,234.5} is it") == 1234.5
    assert extract_answer("no digits here") is None
    completions = ["12", [{"role": "assistant", "content": "It is 7."}], "<answer>-3</answer>", "five", "1"]
    gold = ["12", "7", "-3", "5", "no number"]
    assert numeric_answer(completions, answer=gold) == [1.0, 1.0, 1.0, 0.0, None]
    with pytest.raises(ValueError, match="needs an 'answer' column"):
        numeric_answer(["1"], question=["q"])


def test_format_and_length_rewards():
    assert number_only(["12", " 12.\n", "-7", "12 apples", "The answer is 12", ""]) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    tagged = ["think... <answer>42</answer>", "<answer>4 2</answer>", "<answer>1</answer><answer>2</answer>", "42"]
    assert answer_format(tagged) == [1.0, 0.0, 0.0, 0.0]
    penalty = make_length_penalty(8)
    assert penalty.__name__ == "length_penalty"  # TRL logs it as rewards/length_penalty/mean
    assert penalty(["a", "b", "c"], completion_ids=[[1, 2], [1] * 8, [1] * 12]) == [-0.25, -1.0, -1.0]


def test_rewards_resolve_by_name_alias_and_import_path():
    class Config:
        max_completion_length = 4

    funcs = resolve_rewards(["numeric_answer", "exact_match", "length_penalty", "thaw_rl.rewards:number_only",
                             "thaw_rl.rewards.builtin_rewards.answer_format"], Config())
    assert [f.__name__ for f in funcs] == ["numeric_answer", "numeric_answer", "length_penalty", "number_only",
                                           "answer_format"]
    assert funcs[2](["x"], completion_ids=[[1, 2]]) == [-0.5]


# -- data ---------------------------------------------------------------------------------------------------------
def test_builtin_arithmetic_is_chat_formatted_and_seeded():
    rows = builtin_rows("builtin:arithmetic", 5, seed=3, preset="add", system_prompt=None)
    assert rows == builtin_rows("builtin:arithmetic", 5, seed=3, preset="add", system_prompt=None)
    assert rows != builtin_rows("builtin:arithmetic", 5, seed=4, preset="add", system_prompt=None)
    system, user = rows["prompt"][0]
    assert system == {"role": "system", "content": "You are a calculator. Reply with the number only."}
    a, op, b = user["content"].removeprefix("What is ").removesuffix("?").split()
    assert op == "+" and rows["answer"][0] == str(int(a) + int(b))
    mixed = builtin_rows("builtin:arithmetic", 200, seed=0, preset="mixed", system_prompt="")
    assert {len(p) for p in mixed["prompt"]} == {1}  # an empty system prompt drops the system message
    assert {q.split()[3] for q in mixed["question"]} == {"+", "-", "x"}


def test_local_jsonl_becomes_chat_prompts_with_answers(tmp_path):
    path = tmp_path / "gsm8k_like.jsonl"
    rows = [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
            {"question": "What is 10 - 2?", "answer": "#### 8"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = DatasetSpec(str(path), prompt_column="question", system_prompt="Be brief.", num_examples=1)
    train_ds, test_ds = load_recipe_datasets(spec)
    assert test_ds is None and len(train_ds) == 1
    assert train_ds[0]["prompt"] == [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": rows[0]["question"]}]
    assert numeric_answer(["It is 7"], answer=[train_ds[0]["answer"]]) == [1.0]


def test_local_parquet_with_renamed_columns(tmp_path):
    from datasets import Dataset

    path = tmp_path / "rows.parquet"
    Dataset.from_dict({"problem": ["What is 2 + 2?"], "solution": [4]}).to_parquet(str(path))
    train_ds, _ = load_recipe_datasets(DatasetSpec(str(path), prompt_column="problem", answer_column="solution"))
    assert train_ds[0]["prompt"] == [{"role": "user", "content": "What is 2 + 2?"}]
    assert train_ds[0]["answer"] == "4"


# -- every recipe builds ----------------------------------------------------------------------------------------------
def offline_copy(recipe: Path, tmp_path: Path) -> Path:
    """The recipe with hub models replaced by tiny-qwen2 and hub datasets by a local GSM8K-shaped file."""
    data = yaml.safe_load(recipe.read_text())
    if data.get("model_name_or_path") not in train.OFFLINE_MODELS:
        data["model_name_or_path"] = "tiny-qwen2"
        data.pop("attn_implementation", None)
    name = data.get("dataset_name", "")
    if not name.startswith("builtin:") and not Path(name).exists():
        local = tmp_path / "gsm8k_like.jsonl"
        local.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}) + "\n"
                                 for i in range(8)))
        data["dataset_name"] = str(local)
        data.pop("dataset_config", None)
    data["output_dir"] = str(tmp_path / "out")
    path = tmp_path / recipe.name
    path.write_text(yaml.safe_dump(data))
    return path


def test_there_are_the_recipes_the_readme_names():
    names = {p.stem for p in RECIPES}
    assert {"quickstart_cpu", "gsm8k_grpo_qwen2.5-1.5b", "tree_grpo_math", "best_of_n"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_parses_and_builds_its_trainer(recipe, tmp_path):
    header = "\n".join(itertools.takewhile(lambda line: line.startswith("#"), recipe.read_text().splitlines()))
    for words in ("Trains", "Hardware", "You should see"):  # the comment block every recipe starts with
        assert words in header, f"{recipe.name} does not say {words!r} in its opening comment block"
    trainer_name = yaml.safe_load(recipe.read_text()).get("trainer", "grpo")
    try:
        original = parse_recipe(["--config", str(recipe), "--use_cpu", "true"])  # as written, hub names and all
    except RecipeError as err:
        if "is not available" in str(err) and trainer_name == "ppo":
            pytest.skip(str(err))
        raise
    assert original.script_args.trainer == trainer_name
    parsed = parse_recipe(["--config", str(offline_copy(recipe, tmp_path)), *CPU])
    trainer = build_trainer(parsed)
    assert isinstance(trainer, parsed.trainer_cls)
    assert len(trainer.train_dataset) > 0 and "prompt" in trainer.train_dataset.column_names
    assert len(trainer.reward_funcs) == len(parsed.script_args.reward_funcs)


# -- bad recipes -----------------------------------------------------------------------------------------------------
def write_recipe(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load(TINY.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    data["output_dir"] = str(tmp_path / "out")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def build_error(tmp_path, overrides=(), **changes) -> str:
    with pytest.raises(RecipeError) as err:
        build_trainer(parse_recipe(["--config", str(write_recipe(tmp_path, **changes)), *overrides]))
    return str(err.value)


@pytest.mark.parametrize("changes, overrides, words", [
    (dict(learnin_rate=0.1), (), ["unknown recipe key 'learnin_rate'", "did you mean 'learning_rate'",
                                  "ThawGRPOConfig", "--help"]),
    ({}, ("--num_generation", "4"), ["unknown override 'num_generation'", "'num_generations'"]),
    (dict(trainer="dpo"), (), ["trainer='dpo' is unknown", "['best_of_n', 'grpo', 'ppo']"]),
    (dict(reward_funcs=["numeric_answr"]), (), ["unknown reward 'numeric_answr'", "numeric_answer", "number_only",
                                                "length_penalty", "answer_format", "package.module:function"]),
    (dict(reward_funcs=["no_such_module:reward"]), (), ["cannot import module 'no_such_module'"]),
    (dict(reward_funcs=None), (), ["reward_funcs is empty"]),
    (dict(dataset_name="data/missing.jsonl"), (), ["dataset_name='data/missing.jsonl': no such file",
                                                   "builtin:arithmetic", ".parquet"]),
    (dict(dataset_name="builtin:algebra"), (), ["no built-in task 'algebra'", "builtin:arithmetic"]),
    (dict(dataset_name="nobody/no-such-dataset"), (), ["'nobody/no-such-dataset'", "could not be loaded from the hub",
                                                       "builtin:arithmetic"]),
    (dict(dataset_name=None), (), ["dataset_name is not set", "builtin:arithmetic"]),
    (dict(dataset_config="hard"), (), ["no preset 'hard'", "'add_sub'"]),
    (dict(num_generations=3), (), ["num_generations (3)", "divisible"]),
])
def test_bad_recipes_say_what_is_valid(tmp_path, changes, overrides, words):
    message = build_error(tmp_path, overrides, **changes)
    for word in words:
        assert word in message, (word, message)


def test_missing_split_and_column_name_what_exists(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n")
    message = build_error(tmp_path, dataset_name=str(path), dataset_test_split="test")
    assert "has no split 'test': it has ['train']" in message
    message = build_error(tmp_path, dataset_name=str(path), dataset_prompt_column="problem")
    assert "no column 'problem'" in message and "['question', 'answer']" in message


def test_an_unavailable_trainer_is_reported_with_its_import_error(tmp_path, monkeypatch):
    monkeypatch.setitem(train.TRAINERS, "ppo", ("thaw_rl.trainers.no_such_module:Config", "x:Trainer"))
    message = build_error(tmp_path, trainer="ppo")
    assert "trainer 'ppo' is not available: ModuleNotFoundError" in message and "no_such_module" in message
    parse_recipe(["--config", str(write_recipe(tmp_path))])  # the other trainers are unaffected


def test_the_registry_is_the_contract():
    assert train.TRAINERS == {
        "grpo": ("thaw_rl.trainers:ThawGRPOConfig", "thaw_rl.trainers:ThawGRPOTrainer"),
        "best_of_n": ("thaw_rl.trainers:ThawBestOfNConfig", "thaw_rl.trainers:ThawBestOfNTrainer"),
        "ppo": ("thaw_rl.trainers.ppo_config:ThawPPOConfig", "thaw_rl.trainers.ppo_trainer:ThawPPOTrainer"),
    }


# -- the quickstart learns ------------------------------------------------------------------------------------------
SHORT_STEPS, ENDS = 16, 4


def short_quickstart(output_dir, seed: int = 0) -> list[dict]:
    """recipes/quickstart_cpu.yaml with its real task and rewards, on tiny-qwen2 for SHORT_STEPS steps."""
    recipe = parse_recipe(["--config", str(ROOT / "recipes" / "quickstart_cpu.yaml"), "--output_dir", str(output_dir),
                           "--model_name_or_path", "tiny-qwen2", "--max_steps", str(SHORT_STEPS),
                           "--learning_rate", "1e-2", "--report_to", "none", "--seed", str(seed),
                           "--write_summary", "false"])
    return train.run(recipe).state.log_history


def reward_ends(history: list[dict]) -> tuple[float, float]:
    """Mean reward of the first ENDS and of the last ENDS steps."""
    rewards = [h["reward"] for h in history if "reward" in h]
    assert len(rewards) == SHORT_STEPS
    return sum(rewards[:ENDS]) / ENDS, sum(rewards[-ENDS:]) / ENDS


def test_shortened_quickstart_learns(tmp_path):
    """The quickstart's recipe on a tiny model: its last steps' reward beats its first steps'.

    The random tiny model never writes a right number, so what it learns here is the length penalty
    (stopping early): the mean reward goes from about -0.3 to about -0.03. Deterministic for a given
    seed on one thread; over seeds 0-19 (tests/test_recipes_seed_sweep.py) all 20 pass with margins of
    0.22 or more against the 0.05 asked for, so a false failure would need a change in the code.
    """
    first, last = reward_ends(short_quickstart(tmp_path))
    assert last > first + 0.05, (first, last)


# -- the summary's token totals are exact ------------------------------------------------------------------------
def test_ppo_summary_counts_each_rollout_once(tmp_path):
    """PPO logs a rollout's metrics once and then takes num_ppo_epochs x num_mini_batches = 4 optimizer steps
    on it; the summary's token totals must be that rollout's own counts, not a per-step share of them."""
    recipe = parse_recipe(["--config", str(ROOT / "recipes" / "ppo_quickstart_cpu.yaml"), "--output_dir",
                           str(tmp_path), "--model_name_or_path", "tiny-qwen2", "--max_steps", "4",
                           "--report_to", "none", "--save_final_model", "false", "--kv_cache_memory", "16777216"])
    trainer = train.run(recipe)
    stats = trainer.last_rollout.stats  # one rollout in 4 steps, one rank
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_steps"] == 4
    assert summary["tokens_computed"] == stats.prefill_tokens + stats.decode_tokens > 0
    assert summary["tokens_flat"] == stats.flat_prefill_tokens + stats.flat_decode_tokens > summary["tokens_computed"]
    assert [s["step"] for s in summary["samples"]] == [0, 0, 0, 4, 4, 4]  # PPO's trainer answers the samples too
