"""What a new user's mistakes look like from ``thaw-rl train`` (issue 14 items 9 and 10).

The story: a recipe mistake is one line and exit 2, found before training (a value of the wrong type, a
dataset without the column a reward reads, an empty or broken JSON-lines file, num_generations 0); an
error raised by the user's own code while training is not a recipe error: it keeps its traceback and
says which reward function raised it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from thaw_rl import cli
from thaw_rl.train import RecipeError, build_trainer, parse_recipe
from thaw_rl.trainers import ThawGRPOConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "recipes" / "tiny_grpo.yaml"


def write_recipe(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load(TINY.read_text())
    data.update(changes)
    data["output_dir"] = str(tmp_path / "out")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def cli_error(tmp_path, capsys, *overrides, **changes) -> str:
    """Run ``thaw-rl train`` on the tiny recipe with changes; it must fail with exit 2 and one line."""
    code = cli.main(["train", str(write_recipe(tmp_path, **changes)), *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# -- recipe mistakes: one line, exit 2 -----------------------------------------------------------------------
@pytest.mark.parametrize("where", ["recipe", "override"])
def test_a_value_of_the_wrong_type_is_one_line_not_the_usage_text(tmp_path, capsys, where):
    if where == "recipe":
        err = cli_error(tmp_path, capsys, learning_rate="abc")
    else:
        err = cli_error(tmp_path, capsys, "--learning_rate", "abc")
    assert "argument --learning_rate/--learning-rate: invalid float value: 'abc'" in err
    assert "usage:" not in err and "--help` lists the fields" in err


def test_num_generations_zero_names_the_field_and_the_fix(tmp_path, capsys):
    err = cli_error(tmp_path, capsys, num_generations=0)
    assert "num_generations=0: each prompt needs at least 2 samples" in err and "Set num_generations >= 2" in err
    with pytest.raises(ValueError, match="num_generations=0"):
        ThawGRPOConfig(output_dir=str(tmp_path), num_generations=0, use_cpu=True, bf16=False)


def test_a_dataset_without_the_answer_column_fails_at_load_time_naming_its_columns(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "What is 1 + 1?", "solution": "2"}) + "\n")
    with pytest.raises(RecipeError) as err:
        build_trainer(parse_recipe(["--config", str(write_recipe(tmp_path, dataset_name=str(path)))]))
    message = str(err.value)
    assert "reward 'numeric_answer' reads the column 'answer'" in message
    assert "its columns are ['prompt', 'solution']" in message and "Set dataset_answer_column" in message
    with pytest.raises(RecipeError, match=r"no column 'gold' \(dataset_answer_column\): its columns are "
                                          r"\['prompt', 'solution'\]"):
        build_trainer(parse_recipe(["--config", str(write_recipe(tmp_path, dataset_name=str(path),
                                                                 dataset_answer_column="gold"))]))
    # a reward that needs no answer column trains on it
    build_trainer(parse_recipe(["--config", str(write_recipe(tmp_path, dataset_name=str(path),
                                                             reward_funcs=["length_penalty"]))]))


@pytest.mark.parametrize("content, words", [
    ("", ["rows.jsonl is empty: it holds no rows"]),
    ("\n\n", ["rows.jsonl is empty"]),
    ('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": 2\n',
     ["rows.jsonl, line 2: not valid JSON (Expecting ',' delimiter at column 28)", "Each line must be one JSON object"]),
    ('{"prompt": "a", "answer": "1"}\n["b", "2"]\n', ["rows.jsonl, line 2: a JSON list, not an object"]),
])
def test_an_empty_or_malformed_jsonl_names_the_file_and_the_line(tmp_path, capsys, content, words):
    path = tmp_path / "rows.jsonl"
    path.write_text(content)
    err = cli_error(tmp_path, capsys, dataset_name=str(path))
    for word in words:
        assert word in err, err


# -- errors from the user's code keep their traceback --------------------------------------------------------
REWARDS_MODULE = '''
def parse_score(completions, **kwargs):
    return [float(c[0]["content"]) for c in completions]  # raises on the first one that is not a number
'''


def test_an_error_in_a_reward_function_keeps_its_traceback_and_names_the_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(REWARDS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = write_recipe(tmp_path, reward_funcs=["my_rewards:parse_score"])
    with pytest.raises(ValueError, match="could not convert string to float") as err:
        cli.main(["train", str(recipe)])  # not caught and printed as "thaw-rl: error: ..." with exit 2
    assert not isinstance(err.value, RecipeError)
    assert err.value.__notes__ == ["(raised by reward function 'parse_score')"]
    assert "parse_score" in [entry.name for entry in err.traceback]
