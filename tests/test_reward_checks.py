"""Bad rewards and non-finite training, on tiny CPU trainers (issue 14 items 1 and 10).

The story: a reward function's output is checked where it returns (one finite float or None per completion,
else an error naming the function, the completion and its prompt); None keeps TRL 1.16's meaning (scored by
the other functions; a completion none scores teaches nothing, in GRPO, PPO and best-of-N); a batch nobody
scored is refused; a NaN gradient stops training before the optimizer applies it; a NaN weight is never
saved.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from datasets import Dataset

from thaw_rl.rewards.reward_checks import CheckedReward, check_reward_output
from thaw_rl.testing import tiny_model_and_tokenizer
from thaw_rl.trainers import ThawBestOfNConfig, ThawBestOfNTrainer, ThawGRPOConfig, ThawGRPOTrainer
from thaw_rl.trainers.finite_checks import NonFiniteError
from thaw_rl.trainers.ppo_config import ThawPPOConfig
from thaw_rl.trainers.ppo_trainer import ThawPPOTrainer
from tiny_training import PROMPTS, reward_chars, tiny_training_fields

CONTRACT = r"it must return a list with one float \(or None where the reward does not apply\) per completion"


def make_trainer(tmp_path, reward_funcs, cls=ThawGRPOTrainer, config_cls=ThawGRPOConfig, **overrides):
    model, tokenizer = tiny_model_and_tokenizer("qwen2")
    fields = tiny_training_fields(tmp_path / "out", **{"max_steps": 2, "kv_cache_memory": 8 << 20, **overrides})
    return cls(model=model, reward_funcs=reward_funcs, args=config_cls(**fields), processing_class=tokenizer,
               train_dataset=Dataset.from_dict({"prompt": PROMPTS}))


def batch(prompts=PROMPTS[:2], group=4):
    return [{"prompt": p} for p in prompts for _ in range(group)]


# -- the output contract ---------------------------------------------------------------------------------------
def test_good_outputs_pass_as_floats_and_none():
    out = check_reward_output([1, 0.5, None, True, np.float32(2.0), torch.tensor(3.0), np.array(4.0)], "r")
    assert out == [1.0, 0.5, None, 1.0, 2.0, 3.0, 4.0]
    assert check_reward_output(torch.tensor([1.0, 2.0]), "r", completions=["a", "b"]) == [1.0, 2.0]


@pytest.mark.parametrize("output, error, words", [
    ("1.0", TypeError, ["reward function 'r' returned '1.0' (str)"]),
    (0.5, TypeError, ["reward function 'r' returned 0.5 (float)"]),
    ({"a": 1.0}, TypeError, ["(dict)"]),
    (["1.0", "0.0"], TypeError, ["returned '1.0' (str) for completion 0 (prompt 'p0', completion 'c0')"]),
    ([1.0], ValueError, ["returned 1 rewards for 2 completions"]),
    ([1.0, float("nan")], ValueError, ["reward function 'r' returned nan for completion 1 of 2 (prompt 'p1', "
                                       "completion 'c1')", "return None for a completion the reward does not apply"]),
    ([float("-inf"), 1.0], ValueError, ["returned -inf for completion 0 of 2"]),
])
def test_bad_outputs_name_the_function_the_completion_and_the_contract(output, error, words):
    with pytest.raises(error) as err:
        check_reward_output(output, "r", prompts=["p0", "p1"], completions=["c0", "c1"])
    for word in words:
        assert word in str(err.value), str(err.value)
    if error is TypeError or "rewards for" in words[0]:
        assert "it must return a list with one float" in str(err.value)


def test_an_error_inside_a_reward_function_keeps_its_traceback_and_names_it():
    def parse_score(completions, **kwargs):
        return [float(c) for c in completions]

    with pytest.raises(ValueError, match="could not convert string to float") as err:
        CheckedReward(parse_score, "parse_score")(prompts=["p"], completions=["not a number"])
    assert err.value.__notes__ == ["(raised by reward function 'parse_score')"]
    assert "parse_score" in [entry.name for entry in err.traceback]  # the user's frame is still there


# -- in the trainers -------------------------------------------------------------------------------------------
def inf_on_third(completions, **kwargs):
    return [math.inf if i == 2 else 1.0 for i in range(len(completions))]


@pytest.mark.parametrize("cls, config_cls", [(ThawGRPOTrainer, ThawGRPOConfig), (ThawPPOTrainer, ThawPPOConfig)])
def test_a_non_finite_reward_stops_the_trainer_naming_the_function_and_completion(tmp_path, cls, config_cls):
    trainer = make_trainer(tmp_path, [reward_chars, inf_on_third], cls, config_cls)
    with pytest.raises(ValueError, match=r"reward function 'inf_on_third' returned inf for completion 2 of 4 "
                                         r"\(prompt 'abc'"):
        trainer.train()
    assert not any((tmp_path / "out").glob("checkpoint-*"))


def returns_a_string(completions, **kwargs):
    return [str(len(c)) for c in completions]


def returns_a_scalar(completions, **kwargs):
    return 1.0


@pytest.mark.parametrize("func, shown", [(returns_a_string, "(str) for completion 0"), (returns_a_scalar, "1.0 (float)")])
def test_a_reward_of_the_wrong_type_is_a_type_error_naming_it(tmp_path, func, shown):
    trainer = make_trainer(tmp_path, [func])
    trainer.model.train()
    with pytest.raises(TypeError, match=CONTRACT) as err:
        trainer._generate_and_score_completions(batch())
    assert f"reward function {func.__name__!r} returned" in str(err.value) and shown in str(err.value)


def none_for_abc(prompts, completions, **kwargs):
    return [None if "abc" in str(p) else 1.0 for p in prompts]


def test_none_keeps_trls_meaning_scored_by_the_others_and_unscorable_rows_teach_nothing(tmp_path):
    trainer = make_trainer(tmp_path, [none_for_abc])
    trainer.model.train()
    output = trainer._generate_and_score_completions(batch())  # rows 0-3: 'abc' (None), rows 4-7 scored 1.0
    assert output["advantages"][:4].eq(0).all()
    rewards = trainer._rewards_per_func[:, 0]
    assert rewards[:4].isnan().all() and rewards[4:].eq(1.0).all()


def test_a_batch_no_reward_scored_is_refused(tmp_path):
    trainer = make_trainer(tmp_path, [lambda completions, **kw: [None] * len(completions)])
    trainer.model.train()
    with pytest.raises(ValueError, match="no reward function scored any of the 8 completions of this batch"):
        trainer._generate_and_score_completions(batch())


def test_ppo_gives_unscorable_completions_no_advantage(tmp_path):
    trainer = make_trainer(tmp_path, [none_for_abc], ThawPPOTrainer, ThawPPOConfig, num_mini_batches=1)
    trainer.model.train()
    output = trainer._generate_and_score_completions(batch())
    assert output["advantages"][:4].eq(0).all() and output["advantages"][4:].ne(0).any()


def test_best_of_n_never_trains_on_an_unscorable_completion(tmp_path):
    trainer = make_trainer(tmp_path, [none_for_abc], ThawBestOfNTrainer, ThawBestOfNConfig, best_of_n_keep=1)
    trainer.model.train()
    output = trainer._generate_and_score_completions(batch())
    assert output["keep_weights"].tolist() == [0.0, 1.0]  # 'abc' kept a row (the least bad) with weight 0


# -- non-finite gradients and weights ---------------------------------------------------------------------------
def test_a_nan_gradient_stops_training_before_the_optimizer_applies_it(tmp_path):
    trainer = make_trainer(tmp_path, [reward_chars], save_strategy="steps", save_steps=1, max_steps=3)
    weight = trainer.model.model.layers[1].mlp.down_proj.weight
    calls = []

    def overflow_on_second_backward(grad):  # what a diverged loss or an fp overflow does to one gradient
        calls.append(1)
        return grad * math.nan if len(calls) == 2 else grad

    weight.register_hook(overflow_on_second_backward)
    with pytest.raises(NonFiniteError, match=r"optimizer step 2: the gradient of '.*' holds NaN or inf .*; the step "
                                             r"was not applied"):
        trainer.train()
    assert all(p.isfinite().all() for p in trainer.model.parameters())
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-1"]


def test_a_nan_weight_is_never_saved(tmp_path):
    trainer = make_trainer(tmp_path, [reward_chars])
    with torch.no_grad():
        trainer.model.model.layers[0].self_attn.q_proj.weight[0, 0] = math.nan
    with pytest.raises(NonFiniteError, match=r"refusing to save .*weight 'model.layers.0.self_attn.q_proj.weight' "
                                             r"holds NaN or inf"):
        trainer.save_model(str(tmp_path / "final"))
    assert not list((tmp_path / "final").glob("*.safetensors"))


def test_ppo_never_saves_a_nan_value_head(tmp_path):
    trainer = make_trainer(tmp_path, [reward_chars], ThawPPOTrainer, ThawPPOConfig)
    with torch.no_grad():
        next(trainer.value_head.parameters()).fill_(math.nan)
    with pytest.raises(NonFiniteError, match="weight 'value_head.summary.weight'"):
        trainer.save_model(str(tmp_path / "final"))
    assert not list((tmp_path / "final").glob("*.safetensors"))
