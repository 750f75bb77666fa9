"""ThawPPOTrainer on tiny CPU models.

The story: the TRL seams PPO builds on are where we expect them; GAE (per row and per tree node) and the
clipped losses equal hand computations; bad configs fail with the fix in the message; a few steps train
the policy and the value head and log TRL PPO's metrics next to the ``thaw/...`` ones; a tree rollout
gives shared tokens one value and one advantage; on a fixed batch the value loss goes down; values and
gradients are the same with gradient checkpointing; the user's model stays a plain causal LM (the head
lives beside it, in the trainer, and is saved beside it); a checkpoint restores policy and value head;
two ranks train in lockstep.
"""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from trl import GRPOTrainer

from thaw_rl.rollout import Leaf, Node, RolloutBatch, RolloutStats
from thaw_rl.testing import tiny_model_and_tokenizer, torchrun_ranks
from tiny_training import PROMPTS, reward_chars, tiny_training_fields
from thaw_rl.trainers import ThawGRPOConfig, ThawPPOConfig, ThawPPOTrainer
from thaw_rl.trainers.ppo_objective import (
    explained_variance,
    masked_whiten,
    per_token_kl,
    policy_loss,
    token_gae,
    token_rewards,
    tree_gae,
    value_loss,
)
from thaw_rl.trainers.value_head import VALUE_HEAD_FILE, load_value_head

PPO_KEYS = ("loss/policy_avg", "loss/value_avg", "policy/approxkl_avg", "policy/clipfrac_avg", "val/clipfrac_avg",
            "policy/entropy_avg", "val/ratio")
ROLLOUT_KEYS = ("objective/kl", "objective/scores", "objective/rlhf_reward", "val/explained_variance", "reward",
                "thaw/savings", "thaw/prefill_tokens_saved")


def make_config(tmp_path, **overrides) -> ThawPPOConfig:
    return ThawPPOConfig(**tiny_training_fields(tmp_path / "out", **{
        "max_steps": 4, "kv_cache_memory": 8 * 2**20, "num_mini_batches": 2, "num_ppo_epochs": 2, **overrides}))


def make_trainer(tmp_path, model=None, **overrides) -> ThawPPOTrainer:
    tiny, tokenizer = tiny_model_and_tokenizer("qwen2")
    return ThawPPOTrainer(model=model if model is not None else tiny, reward_funcs=reward_chars,
                          args=make_config(tmp_path, **overrides), processing_class=tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": PROMPTS}))


def batch_inputs(prompts=PROMPTS[:2], group=4):
    return [{"prompt": p} for p in prompts for _ in range(group)]


# -- the seams ----------------------------------------------------------------------------------------------
def test_trl_seams_are_where_we_expect():
    params = list(inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters)
    assert params[:5] == ["self", "model", "input_ids", "attention_mask", "logits_to_keep"]
    source = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    for key in ('output["old_per_token_logps"]', 'output["ref_per_token_logps"]', "if self.beta != 0.0:"):
        assert key in source, key
    # the value head hooks the backbone that TRL's fused LM head runs
    from trl.trainer.utils import add_fused_lm_head

    assert "backbone_attr = \"base_model\"" in inspect.getsource(add_fused_lm_head)


# -- GAE and the losses, by hand ------------------------------------------------------------------------------
def test_token_rewards_and_gae_match_hand_computation():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    kl = torch.tensor([[-0.2, 0.4, 0.0], [0.0, 0.0, 7.0]])  # 7.0 sits on padding and must vanish
    rewards = token_rewards(torch.tensor([1.0, 2.0]), kl * mask, mask, kl_coef=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[0.1, -0.2, 1.0], [0.0, 2.0, 0.0]]))
    values = torch.tensor([[0.5, 0.4, 0.8], [1.0, 1.5, 9.0]])
    advantages, returns = token_gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 0: t=2 d = 1.0 - 0.8 = 0.2, A = 0.2;  t=1 d = -0.2 + 0.9*0.8 - 0.4 = 0.12, A = 0.12 + 0.45*0.2 = 0.21
    #        t=0 d = 0.1 + 0.9*0.4 - 0.5 = -0.04, A = -0.04 + 0.45*0.21 = 0.0545
    # row 1: t=1 d = 2.0 - 1.5 = 0.5, A = 0.5;  t=0 d = 0.9*1.5 - 1.0 = 0.35, A = 0.35 + 0.45*0.5 = 0.575
    torch.testing.assert_close(advantages, torch.tensor([[0.0545, 0.21, 0.2], [0.575, 0.5, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.5545, 0.61, 1.0], [1.575, 2.0, 0.0]]))
    # KL estimators: k1 = d, k3 = e^-d - 1 + d
    d = torch.tensor([0.5, -0.5])
    torch.testing.assert_close(per_token_kl(d, torch.zeros(2), "k1"), d)
    torch.testing.assert_close(per_token_kl(d, torch.zeros(2), "k3"), torch.exp(-d) - 1 + d)


def hand_tree() -> RolloutBatch:
    """root 0 -> node 1 [0, 2) -> leaf 2 [2, 3) and leaf 3 [2, 4)."""
    nodes = {0: Node(0, None, 0, 0, 0, [1]), 1: Node(1, 0, 0, 0, 2, [2, 3]), 2: Node(2, 1, 0, 2, 3),
             3: Node(3, 1, 0, 2, 4)}
    leaves = [Leaf(0, [9], [5, 6, 7], [0.0] * 3, [0.0] * 3, [0, 1, 2], [(0, 0), (0, 2), (2, 3)], "stop"),
              Leaf(0, [9], [5, 6, 8, 9], [0.0] * 4, [0.0] * 4, [0, 1, 3], [(0, 0), (0, 2), (2, 4)], "length")]
    return RolloutBatch(leaves, nodes, [0], RolloutStats())


def test_tree_gae_runs_once_per_node_and_averages_children_at_the_branch():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 3.0]])
    # leaf 1's row disagrees on the shared tokens (numerics): node 1 is read from leaf 0, its first leaf
    values = torch.tensor([[0.5, 1.0, 0.4, 0.0], [0.6, 1.1, 0.4, 2.5]])
    advantages, returns, shared = tree_gae(hand_tree(), rewards, values, mask, gamma=1.0, lam=0.5)
    # node 2: d = 1.0 - 0.4 = 0.6                 -> A = 0.6
    # node 3: t=3 d = 3.0 - 2.5 = 0.5             -> A = 0.5;  t=2 d = 2.5 - 0.4 = 2.1 -> A = 2.1 + 0.5*0.5 = 2.35
    # node 1 bootstraps from the children's mean: A' = (0.6 + 2.35) / 2 = 1.475, V' = 0.4
    #         t=1 d = 0.4 - 1.0 = -0.6 -> A = -0.6 + 0.5*1.475 = 0.1375;  t=0 d = 1.0 - 0.5 = 0.5 -> A = 0.56875
    expected = torch.tensor([[0.56875, 0.1375, 0.6, 0.0], [0.56875, 0.1375, 2.35, 0.5]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(shared, torch.tensor([[0.5, 1.0, 0.4, 0.0], [0.5, 1.0, 0.4, 2.5]]))
    torch.testing.assert_close(returns, expected + shared)


def test_tree_gae_of_a_flat_group_is_token_gae():
    """A GRPO-shaped tree (every leaf a child of the prompt) shares no completion token."""
    nodes = {0: Node(0, None, 0, 0, 0, [1, 2, 3])}
    lengths = [3, 5, 1]
    leaves = []
    for i, n in enumerate(lengths, start=1):
        nodes[i] = Node(i, 0, 0, 0, n)
        leaves.append(Leaf(0, [9], [4] * n, [0.0] * n, [0.0] * n, [0, i], [(0, 0), (0, n)], "stop"))
    batch = RolloutBatch(leaves, nodes, [0], RolloutStats())
    mask = (torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]).float()  # (3, 5)
    gen = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 5, generator=gen) * mask, torch.randn(3, 5, generator=gen)
    flat_adv, flat_ret = token_gae(rewards, values, mask, 0.95, 0.9)
    tree_adv, tree_ret, _ = tree_gae(batch, rewards, values, mask, 0.95, 0.9)
    torch.testing.assert_close(tree_adv, flat_adv)
    torch.testing.assert_close(tree_ret, flat_ret)


def test_clipped_losses_match_hand_computation():
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    ratio = torch.tensor([1.5, 0.5, 1.1, 50.0])  # the masked 4th token would dominate everything
    advantages = torch.tensor([1.0, 1.0, -2.0, 100.0])
    loss, stats = policy_loss(torch.log(ratio), torch.zeros(4), advantages, mask, cliprange=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped);  token 1: max(-0.5, -0.8) = -0.5;  token 2: max(2.2, 2.2) = 2.2
    torch.testing.assert_close(loss, torch.tensor(0.5 / 3))
    torch.testing.assert_close(stats.clipfrac, torch.tensor(1 / 3))
    torch.testing.assert_close(stats.ratio, torch.tensor(3.1 / 3))
    logs = torch.log(ratio[:3])
    torch.testing.assert_close(stats.approx_kl, 0.5 * (logs**2).mean())

    values, old_values = torch.tensor([1.0, 0.0, 2.0, 9.0]), torch.tensor([0.5, 0.0, 2.0, 0.0])
    returns = torch.tensor([2.0, 1.0, 1.0, 0.0])
    vf, clipfrac = value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    # token 0: max((1 - 2)^2, (0.7 - 2)^2) = 1.69 (clipped);  token 1: 1;  token 2: 1
    torch.testing.assert_close(vf, torch.tensor(0.5 * 3.69 / 3))
    torch.testing.assert_close(clipfrac, torch.tensor(1 / 3))
    unclipped, _ = value_loss(values, old_values, returns, mask, cliprange_value=None)
    torch.testing.assert_close(unclipped, torch.tensor(0.5 * 3.0 / 3))
    # explained variance: a perfect critic explains everything, a constant one nothing
    r = torch.tensor([1.0, 2.0, 4.0, 0.0])
    assert float(explained_variance(r, r, mask)) == pytest.approx(1.0, abs=1e-6)
    assert float(explained_variance(torch.full((4,), 7.0), r, mask)) == pytest.approx(0.0, abs=1e-6)
    white = masked_whiten(torch.tensor([1.0, 2.0, 3.0, 100.0]), mask)
    torch.testing.assert_close(white, torch.tensor([-1.0, 0.0, 1.0, 0.0]), atol=1e-6, rtol=0)


# -- config errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, words", [
    (dict(num_mini_batches=0), ["num_mini_batches=0", "num_mini_batches >= 1"]),
    (dict(rollout_batch_size=10, num_mini_batches=3), ["rollout_batch_size=10", "not divisible by num_mini_batches=3",
                                                      "multiple of 3"]),
    (dict(rollout_batch_size=12, num_mini_batches=2), ["12 / num_mini_batches=2 = 6", "per_device_train_batch_size=4",
                                                      "divisor of 6"]),
    (dict(per_device_train_batch_size=2, num_mini_batches=1), ["rollout batch of 2 rows", "num_generations=4"]),
    (dict(beta=0.1), ["beta=0.1", "kl_coef=0.1"]),
    (dict(steps_per_generation=2), ["steps_per_generation=2", "num_mini_batches"]),
    (dict(kl_estimator="k2"), ["kl_estimator='k2'"]),
    (dict(tree_credit=True), ["tree_credit=True", "tree_gae"]),
])
def test_bad_config_names_fields_and_fix(tmp_path, overrides, words):
    with pytest.raises(ValueError) as err:
        make_config(tmp_path, **overrides)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_batch_layout_maps_onto_grpo_buffer(tmp_path):
    args = make_config(tmp_path, per_device_train_batch_size=2, rollout_batch_size=8, num_mini_batches=2,
                       num_ppo_epochs=3)
    assert (args.gradient_accumulation_steps, args.steps_per_generation, args.num_iterations) == (2, 4, 3)
    assert args.rollout_batch_size == 8 and args.generation_batch_size == 8
    assert make_config(tmp_path, response_length=5).max_completion_length == 5


@pytest.mark.parametrize("reward_funcs", [None, []])
def test_missing_reward_is_rejected(tmp_path, reward_funcs):
    model, tokenizer = tiny_model_and_tokenizer("qwen2")
    with pytest.raises(ValueError, match="reward_funcs is missing"):
        ThawPPOTrainer(model=model, reward_funcs=reward_funcs, args=make_config(tmp_path), processing_class=tokenizer,
                       train_dataset=Dataset.from_dict({"prompt": PROMPTS}))


def test_trainer_needs_a_ppo_config(tmp_path):
    model, tokenizer = tiny_model_and_tokenizer("qwen2")
    args = ThawGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", num_generations=4,
                          per_device_train_batch_size=4)
    with pytest.raises(ValueError, match="needs a ThawPPOConfig"):
        ThawPPOTrainer(model=model, reward_funcs=reward_chars, args=args, processing_class=tokenizer,
                       train_dataset=Dataset.from_dict({"prompt": PROMPTS}))


# -- training ------------------------------------------------------------------------------------------------
def test_training_moves_policy_and_value_head_and_logs_ppo_metrics(tmp_path):
    """2 rollouts x (2 epochs x 2 mini-batches) = 8 optimizer steps."""
    trainer = make_trainer(tmp_path, max_steps=8, value_learning_rate=5e-2)
    assert trainer.ref_model is not None and not any(p.requires_grad for p in trainer.ref_model.parameters())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    head_names = [n for n in before if not n.startswith("policy.")]
    assert head_names == ["value_head.summary.weight", "value_head.summary.bias"]
    trainer.train()
    for name, p in before.items():
        assert not torch.equal(p, trainer.model.get_parameter(name)), f"{name} did not change"
    history = trainer.state.log_history
    steps = [h for h in history if "loss/value_avg" in h]
    assert len(steps) == 8
    for h in steps:
        for key in PPO_KEYS:
            assert math.isfinite(h[key]), (key, h)
    rollouts = [h for h in history if "objective/kl" in h]
    assert len(rollouts) == 2
    for h in rollouts:
        for key in ROLLOUT_KEYS:
            assert math.isfinite(h[key]), (key, h)
    assert rollouts[0]["objective/kl"] == 0.0  # the first rollout is sampled by the reference policy itself
    assert rollouts[1]["objective/kl"] != 0.0
    # the first mini-batch of a rollout is on-policy: ratio 1, nothing clipped
    assert steps[0]["val/ratio"] == pytest.approx(1.0) and steps[0]["policy/clipfrac_avg"] == 0.0
    assert any(h["policy/clipfrac_avg"] > 0 for h in steps)
    assert history[-1]["train_loss"] is not None
    # the value head trains in its own param group at value_learning_rate
    head_group = trainer.optimizer.param_groups[-1]
    assert head_group["initial_lr"] == 5e-2 and len(head_group["params"]) == 2
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(before)


def test_tree_rollout_shares_values_and_advantages_at_shared_tokens(tmp_path):
    trainer = make_trainer(tmp_path, tree_spec="segments", tree_branching=[2, 2], tree_segment_tokens=3)
    assert trainer.args.tree_gae_enabled
    trainer.model.train()
    output = trainer._generate_and_score_completions(batch_inputs())
    leaves = trainer.last_rollout.leaves
    assert leaves[0].spans[1] == leaves[1].spans[1] == (0, 3)  # a trunk shared by the first two leaves
    for key in ("advantages", "old_values", "returns"):
        assert output[key].shape == output["completion_ids"].shape
        assert torch.equal(output[key][0, :3], output[key][1, :3]), key
    assert not torch.equal(output["advantages"][0, 3:], output["advantages"][1, 3:])  # their own branches differ


def test_fixed_batch_optimisation_lowers_the_value_loss(tmp_path):
    """Deterministic (fixed seeds, one thread): no false-failure probability."""
    trainer = make_trainer(tmp_path, cliprange_value=None)
    trainer.model.train()
    batch = trainer._generate_and_score_completions(batch_inputs())
    optimizer = torch.optim.Adam(trainer.model.parameters(), lr=3e-3)
    value_losses = []
    for _ in range(25):
        optimizer.zero_grad()
        trainer._compute_loss(trainer.model, batch).backward()
        optimizer.step()
        value_losses.append(trainer._metrics["train"]["loss/value_avg"][-1])
    assert value_losses[-1] < 0.25 * value_losses[0], value_losses


@pytest.mark.parametrize("packed", [True, False])
def test_values_and_gradients_are_the_same_under_gradient_checkpointing(tmp_path, packed):
    """The value capture hooks the backbone's output, outside the recomputed layers: nothing changes."""
    trainer = make_trainer(tmp_path, shared_prefix_training=packed)
    with torch.no_grad():  # a critic that values states differently (the zero-initialised one says 0 everywhere)
        trainer.value_head.summary.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    trainer.model.train()
    batch = trainer._generate_and_score_completions(batch_inputs())

    def values_and_grads():
        trainer.model.zero_grad()
        trainer._compute_loss(trainer.model, batch).backward()
        assert (trainer.last_packed_batch is not None) == packed
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
        return trainer._captured_values.detach().clone(), grads

    values, grads = values_and_grads()
    assert values.abs().min() > 0 and grads["value_head.summary.weight"].abs().sum() > 0
    trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # TRL's default
    assert trainer.policy_and_value.policy.is_gradient_checkpointing
    checkpointed_values, checkpointed_grads = values_and_grads()
    torch.testing.assert_close(checkpointed_values, values, rtol=0, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_the_users_model_stays_a_plain_causal_lm_and_the_head_is_saved_beside_it(tmp_path):
    """The head lives beside the policy: the user's model gains no parameter, state-dict key, attribute or hook."""
    model, _ = tiny_model_and_tokenizer("qwen2")
    names, keys = [n for n, _ in model.named_parameters()], list(model.state_dict())
    hooks = (len(model._forward_hooks), len(model.base_model._forward_hooks))
    model.save_pretrained(str(tmp_path / "plain"))
    trainer = make_trainer(tmp_path, model=model, max_steps=2, num_ppo_epochs=1)
    assert trainer.model.policy is model and trainer.model.value_head is trainer.value_head
    assert (len(model._forward_hooks), len(model.base_model._forward_hooks)) == hooks
    head_before = trainer.value_head.summary.weight.detach().clone()
    trainer.train()
    assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == keys
    assert not hasattr(model, "v_head") and not hasattr(model, "value_head")
    assert not torch.equal(trainer.value_head.summary.weight, head_before)  # the head trained
    ids = torch.tensor([[5, 17, 3, 42, 8]])
    with torch.no_grad(), trainer.policy_and_value.capture() as captured:
        model(input_ids=ids)  # the user's model itself, even with a capture open, never runs the head
    assert captured == []

    trainer.save_model(str(tmp_path / "final"))
    saved = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert saved.keys() == load_file(str(tmp_path / "plain" / "model.safetensors")).keys()  # the model's own keys
    # what value_head.py's docstring tells a user to do gives the trainer's values
    trainer.model.eval()
    with torch.no_grad(), trainer.policy_and_value.capture() as captured:
        trainer.model(input_ids=ids)
    policy = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    head = load_value_head(str(tmp_path / "final"))
    with torch.no_grad():
        values = head(policy.base_model(ids).last_hidden_state)  # (1, 5)
    assert values.shape == (1, 5) and values.abs().sum() > 0
    torch.testing.assert_close(values, captured[0], rtol=1e-5, atol=1e-6)
    assert load_value_head(str(tmp_path / "plain")) is None


# -- checkpoints ----------------------------------------------------------------------------------------------
def test_checkpoint_restores_policy_and_value_head(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=4)
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-4"
    assert not [k for k in load_file(str(checkpoint / "model.safetensors")) if k.startswith("v_head")]  # plain LM
    assert (checkpoint / VALUE_HEAD_FILE).is_file()
    trained = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    # a new trainer from the checkpoint directory: policy and head come back
    reloaded = make_trainer(tmp_path, model=str(checkpoint))
    assert {n: p for n, p in reloaded.model.named_parameters()}.keys() == trained.keys()
    for name, p in reloaded.model.named_parameters():
        assert torch.equal(p, trained[name]), name
    # resuming into a fresh (untrained) trainer restores policy and head
    fresh = make_trainer(tmp_path)
    assert not torch.equal(fresh.value_head.summary.weight, trained["value_head.summary.weight"])
    fresh._load_from_checkpoint(str(checkpoint))
    for name, p in fresh.model.named_parameters():
        assert torch.equal(p, trained[name]), name
    with pytest.raises(ValueError, match=VALUE_HEAD_FILE):
        os.remove(checkpoint / VALUE_HEAD_FILE)
        fresh._load_from_checkpoint(str(checkpoint))


# -- two ranks -------------------------------------------------------------------------------------------------
def test_two_ranks_train_in_lockstep(tmp_path):
    """torchrun, 2 CPU ranks (gloo), 2 rollouts: DDP keeps policy and value head identical on both ranks."""
    ranks = torchrun_ranks(Path(__file__).with_name("test_ppo_distributed_worker.py"), tmp_path)
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["prompts"] != ranks[1]["prompts"]  # each rank rolled out its own prompts
    assert ranks[0]["checksums"] == ranks[1]["checksums"]  # ... and the gradients were averaged
    assert ranks[0]["checksums"]["value_head"] != ranks[0]["initial_checksums"]["value_head"]
    assert all(r["user_model_names_unchanged"] and r["optimizer_has_value_head"] for r in ranks)
    steps = [h for h in ranks[0]["log_history"] if "loss/value_avg" in h]
    assert len(steps) == 4 and all(math.isfinite(h["loss/policy_avg"]) for h in steps)
    rollouts = [h for h in ranks[0]["log_history"] if "thaw/num_forks" in h]
    assert [h["thaw/num_forks"] for h in rollouts] == [2.0, 2.0]  # one group per rank, summed over ranks


@pytest.mark.slow  # two torchrun ranks (~1 min on 2 cores, mostly imports)
def test_fsdp2_reduces_the_value_heads_gradient_over_ranks_like_the_policys(tmp_path):
    """FSDP2 sharding as accelerate does it (layers, then the root wrapper holding the head), 2 CPU ranks, one row each:
    every rank's full gradient equals an unsharded copy's over both rows, for the head as for the policy."""
    ranks = torchrun_ranks(Path(__file__).with_name("policy_and_value_fsdp2_worker.py"), tmp_path)
    for rank in ranks:
        assert rank["names_are_the_wrappers"]
        for name, grad in rank["grads"].items():
            assert any(abs(g) > 0 for g in grad), name
            assert grad == pytest.approx(rank["reference_grads"][name], rel=1e-4, abs=1e-7), name
