"""ThawGRPOTrainer, ThawBestOfNTrainer and tree credit on tiny CPU models.

The story: the one TRL seam we override is where we expect it; bad configs fail with the fix in the
message; tree advantages match a hand computation; the default spec produces what GRPOTrainer's own
transformers path produces while computing each prompt once; training moves every parameter for the
default spec, a segments tree and best-of-N; the ``thaw/...`` metrics reach ``log_history``, an
offline W&B run, and are summed over two ranks.
"""

from __future__ import annotations

import glob
import inspect
import json
import math
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from thaw_rl.rollout import Leaf, Node, RolloutBatch, RolloutStats
from thaw_rl.testing import tiny_model_and_tokenizer, torchrun_ranks
from tiny_training import PROMPTS, reward_chars, tiny_training_fields
from thaw_rl.trainers import (
    ThawBestOfNConfig,
    ThawBestOfNTrainer,
    ThawGRPOConfig,
    ThawGRPOTrainer,
    node_values,
    tree_advantages,
)
from thaw_rl.trainers.best_of_n_trainer import select_best

THAW_KEYS = ("thaw/prompt_tokens_prefilled", "thaw/prefill_tokens_saved", "thaw/decode_tokens", "thaw/savings",
             "thaw/kv_bytes_shared", "thaw/fork_ms", "thaw/rollout_tokens_per_s")


def make_config(tmp_path, cls=ThawGRPOConfig, **overrides):
    engine = dict(kv_cache_memory=8 * 2**20) if issubclass(cls, ThawGRPOConfig) else {}
    return cls(**tiny_training_fields(tmp_path / "out", **{"max_steps": 3, **engine, **overrides}))


def make_trainer(tmp_path, cls=ThawGRPOTrainer, config_cls=ThawGRPOConfig, model_seed=0, model_overrides=None,
                 **overrides):
    model, tokenizer = tiny_model_and_tokenizer("qwen2", seed=model_seed, **(model_overrides or {}))
    return cls(model=model, reward_funcs=reward_chars, args=make_config(tmp_path, config_cls, **overrides),
               train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)


def rows(trainer, prompts=PROMPTS):
    """Prompt token ids as TRL hands them to the seam: each prompt num_generations times in a row."""
    prompt_ids, _, _ = trainer._tokenize_prompts([p for p in prompts for _ in range(trainer.num_generations)])
    return prompt_ids


# -- the seam ----------------------------------------------------------------------------------------------
def test_trl_seam_is_where_we_expect():
    """A TRL upgrade that moves or reshapes what we build on must fail here, not silently mid-training."""
    sig = inspect.signature(GRPOTrainer._generate_single_turn)
    assert list(sig.parameters) == ["self", "prompt_ids", "images", "multimodal_fields", "num_generations",
                                    "has_tool_images"]
    assert list(inspect.signature(GRPOTrainer._calculate_rewards).parameters) == [
        "self", "inputs", "prompts", "completions", "completion_ids_list"]
    assert list(inspect.signature(GRPOTrainer._compute_loss).parameters) == ["self", "model", "inputs"]
    # importance sampling is gated on exactly this condition, in exactly these two methods ...
    gate = "self.use_vllm and self.vllm_importance_sampling_correction"
    assert inspect.getsource(GRPOTrainer._generate_and_score_completions).count(gate) == 4
    assert inspect.getsource(GRPOTrainer._compute_loss).count(gate) == 1
    # ... and every other read of use_vllm is one that our switch cannot reach (see grpo_trainer.py)
    reads = {name: inspect.getsource(fn).count("self.use_vllm")
             for name, fn in inspect.getmembers(GRPOTrainer, inspect.isfunction)}
    assert {k: v for k, v in reads.items() if v} == {
        "__init__": 3, "_generate_single_turn": 1, "_tool_call_loop": 1, "_generate": 1,
        "_generate_and_score_completions": 4, "_compute_loss": 1}
    assert 'self.use_vllm and self.vllm_mode == "colocate"' in inspect.getsource(GRPOTrainer._tool_call_loop)
    assert "if self.rollout_func is not None:" in inspect.getsource(GRPOTrainer._generate)


def test_thaw_rl_imports_trainers_lazily():
    code = ("import sys, thaw_rl; assert 'trl' not in sys.modules; "
            "from thaw_rl import ThawGRPOTrainer, ThawBestOfNConfig; assert 'trl' in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# -- config errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, words", [
    (dict(rollout_backend="sglang"), ["rollout_backend='sglang'", "'native'", "'vllm'"]),
    (dict(tree_spec="segments", tree_branching=[2, 3], tree_segment_tokens=2),
     ["tree_branching=[2, 3]", "6 leaves", "num_generations=4", "product is 4"]),
    (dict(tree_spec="segments", tree_branching=[2, 2], tree_segment_tokens=8),
     ["tree_segment_tokens=8", "max_completion_length=8", "Lower segment_tokens"]),
    (dict(tree_spec="segments"), ["tree_branching", "num_generations=4"]),
    (dict(tree_spec="entropy"), ["entropy_threshold"]),
    (dict(tree_spec="bushy"), ["tree_spec='bushy'"]),
    (dict(kv_block_size=12), ["kv_block_size=12", "power of two"]),
])
def test_bad_config_names_fields_and_fix(tmp_path, overrides, words):
    with pytest.raises(ValueError) as err:
        make_config(tmp_path, **overrides)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_groups_split_across_ranks_are_rejected(tmp_path, monkeypatch):
    """2 ranks x 2 rows: TRL's global check passes (4 % 4 == 0) but each rank would hold half a group."""
    monkeypatch.setattr(ThawGRPOConfig, "world_size", property(lambda self: 2))
    with pytest.raises(ValueError) as err:
        make_config(tmp_path, per_device_train_batch_size=2)
    msg = str(err.value)
    for word in ("per_device_train_batch_size * steps_per_generation = 2 * 1", "num_generations=4",
                 "Set per_device_train_batch_size=4"):
        assert word in msg, msg


def test_best_of_n_config_rejects_partial_groups_per_micro_batch(tmp_path):
    with pytest.raises(ValueError, match=r"per_device_train_batch_size \* best_of_n_keep = 2 \* 1"):
        make_config(tmp_path, ThawBestOfNConfig, per_device_train_batch_size=2, gradient_accumulation_steps=2)


def test_trainer_needs_a_thaw_config(tmp_path):
    model, tokenizer = tiny_model_and_tokenizer("qwen2")
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", num_generations=4,
                      per_device_train_batch_size=4)
    with pytest.raises(ValueError, match="needs a ThawGRPOConfig"):
        ThawGRPOTrainer(model=model, reward_funcs=reward_chars, args=args, processing_class=tokenizer,
                        train_dataset=Dataset.from_dict({"prompt": PROMPTS}))


# -- tree credit --------------------------------------------------------------------------------------------
def hand_tree() -> RolloutBatch:
    """Prompt 0:  root 0 -> node 1 [0,2) -> leaves 3 [2,4) and 4 [2,5);  root 0 -> leaf 2 [0,3).
    Prompt 1:  root 5 -> leaves 6 [0,2) and 7 [0,1)  (a flat GRPO group)."""
    nodes = {0: Node(0, None, 0, 0, 0, [1, 2]), 1: Node(1, 0, 0, 0, 2, [3, 4]), 2: Node(2, 0, 0, 0, 3),
             3: Node(3, 1, 0, 2, 4), 4: Node(4, 1, 0, 2, 5),
             5: Node(5, None, 1, 0, 0, [6, 7]), 6: Node(6, 5, 1, 0, 2), 7: Node(7, 5, 1, 0, 1)}

    def leaf(prompt, path, length):
        spans = [(nodes[n].start, nodes[n].end) for n in path]
        return Leaf(prompt, [9], list(range(length)), [0.0] * length, [0.0] * length, path, spans, "length")

    leaves = [leaf(0, [0, 1, 3], 4), leaf(0, [0, 1, 4], 5), leaf(0, [0, 2], 3), leaf(1, [5, 6], 2),
              leaf(1, [5, 7], 1)]
    return RolloutBatch(leaves, nodes, [0, 5], RolloutStats())


def test_tree_advantages_match_hand_computation():
    batch, rewards = hand_tree(), [1.0, 0.0, 0.0, 2.0, 4.0]
    # V(0) = 1/3, V(1) = 1/2, V(2) = 0, V(3) = 1, V(4) = 0;  V(5) = 3, V(6) = 2, V(7) = 4
    values = node_values(batch, rewards)
    assert values == {0: 1 / 3, 1: 0.5, 2: 0.0, 3: 1.0, 4: 0.0, 5: 3.0, 6: 2.0, 7: 4.0}
    a1 = (0.5 - 1 / 3) + (0.5 - 1 / 3)  # 1/3
    a2 = (0 - 1 / 3) + (0 - 1 / 3)  # -2/3
    a3 = (1 - 1 / 3) + (1 - 0.5)  # 7/6
    a4 = (0 - 1 / 3) + (0 - 0.5)  # -5/6
    expected = torch.tensor([
        [a1, a1, a3, a3, 0.0],
        [a1, a1, a4, a4, a4],
        [a2, a2, a2, 0.0, 0.0],
        [-2.0, -2.0, 0.0, 0.0, 0.0],  # flat group: 2 * (r - mean) = 2 * (2 - 3)
        [2.0, 0.0, 0.0, 0.0, 0.0],
    ])
    torch.testing.assert_close(tree_advantages(batch, rewards), expected)
    # TreeRL's reweighting: node 1 has 2 leaves below it, every other node 1
    scaled = expected.clone()
    scaled[:2, :2] /= math.sqrt(2)
    torch.testing.assert_close(tree_advantages(batch, rewards, leaf_scaling=True), scaled)
    # an unscorable leaf is left out of every mean: node 1's value is then leaf 3's reward alone
    nan_rewards = [1.0, float("nan"), 0.0, 2.0, 4.0]
    adv = tree_advantages(batch, nan_rewards, num_columns=3)  # (5, 3)
    assert adv.shape == (5, 3)
    torch.testing.assert_close(adv[0], torch.tensor([1.0, 1.0, 0.5]))  # V(0) = 1/2, V(1) = V(3) = 1
    torch.testing.assert_close(adv[1], torch.tensor([1.0, 1.0, 0.0]))  # node 4: no scorable leaf -> 0


# -- the default spec is a drop-in replacement ----------------------------------------------------------------
def test_default_spec_matches_grpo_trainers_own_generation(tmp_path):
    """Greedy on both sides: same completions as GRPOTrainer's transformers path, each prompt computed once."""
    # a wider init than the default makes greedy continuations varied instead of one repeated token
    wide = dict(initializer_range=0.3)
    thaw = make_trainer(tmp_path, model_overrides=wide, generation_kwargs={"do_sample": False},
                        max_completion_length=12)
    model, tokenizer = tiny_model_and_tokenizer("qwen2", **wide)
    ref = GRPOTrainer(model=model, reward_funcs=reward_chars, processing_class=tokenizer,
                      args=make_config(tmp_path, GRPOConfig, generation_kwargs={"do_sample": False},
                                       max_completion_length=12),
                      train_dataset=Dataset.from_dict({"prompt": PROMPTS}))
    prompt_ids = rows(ref)
    expected, _ = ref._generate_single_turn(prompt_ids, None, {}, 4)
    completions, logprobs = thaw._generate_single_turn(prompt_ids, None, {}, 4)
    assert completions == expected
    assert len({tuple(c) for c in completions}) == 4  # four different prompts, varied continuations
    assert any(c[-1] == tokenizer.eos_token_id for c in completions) and any(len(c) == 12 for c in completions)
    assert [len(lp) for lp in logprobs] == [len(c) for c in completions]
    stats = thaw.last_rollout.stats
    prompt_tokens = sum(len(p) for p in prompt_ids[::4])
    assert stats.prefill_tokens + stats.reused_tokens == prompt_tokens  # each prompt once ...
    assert stats.flat_prefill_tokens == 4 * prompt_tokens  # ... where a flat sampler computes it 4 times
    assert stats.num_forks == 4


def test_rollouts_are_reproducible_from_the_seed(tmp_path):
    a, b = make_trainer(tmp_path), make_trainer(tmp_path)
    first, _ = a._generate_single_turn(rows(a), None, {}, 4)
    assert b._generate_single_turn(rows(b), None, {}, 4)[0] == first
    again, _ = a._generate_single_turn(rows(a), None, {}, 4)
    assert again != first  # the next call in the step draws new noise
    groups = [first[i:i + 4] for i in range(0, 16, 4)]
    assert all(len({tuple(c) for c in g}) > 1 for g in groups)  # siblings differ


def test_fused_qkv_setting_reaches_the_engine_and_keeps_the_rollouts(tmp_path):
    """engine_fuse_qkv=True gives the trainer's engine fused q/k/v projections (off by default on CPU), and the
    same seed draws the same completions as without them."""
    fused, plain = make_trainer(tmp_path, engine_fuse_qkv=True), make_trainer(tmp_path)
    got, _ = fused._generate_single_turn(rows(fused), None, {}, 4)
    assert fused._backend.engine.runner.fused_qkv is not None
    assert plain._generate_single_turn(rows(plain), None, {}, 4)[0] == got
    assert plain._backend.engine.runner.fused_qkv is None


def test_cascade_setting_reaches_the_engine_and_keeps_the_rollouts(tmp_path):
    """engine_cascade_attention="on" reaches the trainer's engine (its decode steps cascade over each group's
    prompt, the torch reference on CPU) and the same seed draws the same completions as "off"; a bad mode is
    refused when the config is built."""
    small = dict(kv_block_size=4)  # the test prompts fill a few whole blocks of 4, which a group's rows share
    on = make_trainer(tmp_path, engine_cascade_attention="on", **small)
    off = make_trainer(tmp_path, engine_cascade_attention="off", **small)
    got, _ = on._generate_single_turn(rows(on), None, {}, 4)
    assert on.last_rollout.stats.cascade_steps > 0  # what thaw/cascade_steps reports
    assert off._generate_single_turn(rows(off), None, {}, 4)[0] == got
    assert off.last_rollout.stats.cascade_steps == 0
    with pytest.raises(ValueError, match="engine_cascade_attention='always'"):
        make_trainer(tmp_path, engine_cascade_attention="always")


def test_fp8_kv_cache_setting_reaches_the_engine(tmp_path):
    """kv_cache_dtype="fp8" reaches the trainer's engine (its pool holds float8_e4m3fn) and a generation runs on it;
    the default keeps the model's dtype; a bad name is refused when the config is built."""
    fp8 = make_trainer(tmp_path, kv_cache_dtype="fp8")
    completions, _ = fp8._generate_single_turn(rows(fp8), None, {}, 4)
    assert fp8._backend.engine.spec.dtype == torch.float8_e4m3fn and len(completions) == 16
    exact = make_trainer(tmp_path)
    exact._generate_single_turn(rows(exact), None, {}, 4)
    assert exact._backend.engine.spec.dtype == torch.float32
    with pytest.raises(ValueError, match="kv_cache_dtype='int8'"):
        make_trainer(tmp_path, kv_cache_dtype="int8")


def test_entropy_tree_groups_are_completed(tmp_path):
    """No token is uncertain enough to fork at, so each prompt has 1 leaf; 3 more are sampled from the prompt."""
    trainer = make_trainer(tmp_path, tree_spec="entropy", entropy_threshold=1e9)
    completions, _ = trainer._generate_single_turn(rows(trainer), None, {}, 4)
    assert len(completions) == 16
    assert trainer.last_rollout.num_leaves_per_prompt == [4, 4, 4, 4]
    assert trainer.last_rollout.stats.num_missing_leaves == 12
    assert trainer._pending_stats[-1][1] == 12
    for leaf in trainer.last_rollout.leaves:
        assert leaf.spans[-1][1] == len(leaf.completion_ids)


# -- training ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["grpo", "segments", "best_of_n"])
def test_training_changes_every_parameter(tmp_path, kind):
    if kind == "best_of_n":
        trainer = make_trainer(tmp_path, ThawBestOfNTrainer, ThawBestOfNConfig, best_of_n_keep=1)
    elif kind == "segments":
        trainer = make_trainer(tmp_path, tree_spec="segments", tree_branching=[2, 2], tree_segment_tokens=3)
    else:
        trainer = make_trainer(tmp_path)
    previous = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    history = trainer.state.log_history
    assert history[-1]["train_loss"] is not None
    for name, before in previous.items():
        assert not torch.equal(before, trainer.model.get_parameter(name)), f"{name} did not change"
    steps = [h for h in history if "thaw/savings" in h]
    assert len(steps) == 3
    for h in steps:
        for key in THAW_KEYS:
            assert key in h, key
        assert h["thaw/prefill_tokens_saved"] > 0 and 0 < h["thaw/savings"] < 1
    if kind == "segments":
        assert all(h["thaw/decode_tokens_saved"] > 0 for h in steps)  # shared segments decoded once
    if kind == "best_of_n":
        assert all(h["best_of_n/kept_reward"] >= h["best_of_n/reward"] for h in steps)


def test_segments_tree_credit_reaches_the_loss_inputs(tmp_path):
    trainer = make_trainer(tmp_path, tree_spec="segments", tree_branching=[2, 2], tree_segment_tokens=3)
    trainer.model.train()
    output = trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS[:2] for _ in range(4)])
    completion_ids = output["completion_ids"]  # (8, T)
    assert output["advantages"].shape == completion_ids.shape
    texts = trainer.processing_class.batch_decode(completion_ids.masked_fill(output["completion_mask"] == 0, 0),
                                                  skip_special_tokens=True)
    rewards = torch.tensor(reward_chars(texts))
    std = rewards.view(2, 4).std(dim=1).repeat_interleave(4)[:, None]  # TRL's scale_rewards="group"
    expected = tree_advantages(trainer.last_rollout, rewards, num_columns=completion_ids.size(1)) / (std + 1e-4)
    torch.testing.assert_close(output["advantages"], expected)
    # tokens shared by two leaves get the same advantage in both
    leaves = trainer.last_rollout.leaves
    assert leaves[0].spans[1] == leaves[1].spans[1] == (0, 3)
    torch.testing.assert_close(output["advantages"][0, :3], output["advantages"][1, :3])


def test_best_of_n_keeps_the_best_sample_of_each_group(tmp_path):
    assert select_best(torch.tensor([0.1, 0.9, 0.5, 0.0, float("nan"), 0.0]), 3, 1).tolist() == [1, 3]
    assert select_best(torch.tensor([1.0, 3.0, 2.0, 0.0]), 4, 2).tolist() == [1, 2]
    trainer = make_trainer(tmp_path, ThawBestOfNTrainer, ThawBestOfNConfig, best_of_n_keep=1)
    trainer.model.train()
    output = trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS[:2] for _ in range(4)])
    leaves = trainer.last_rollout.leaves
    rewards = reward_chars(trainer.processing_class.batch_decode([leaf.completion_ids for leaf in leaves],
                                                                 skip_special_tokens=True))
    best = [max(range(g, g + 4), key=lambda i: (rewards[i], -i)) for g in (0, 4)]
    kept = [row[mask.bool()].tolist() for row, mask in zip(output["completion_ids"], output["completion_mask"])]
    assert kept == [leaves[i].completion_ids for i in best]


def test_native_importance_sampling_uses_engine_logprobs(tmp_path):
    trainer = make_trainer(tmp_path, native_importance_sampling_correction=True, max_steps=2)
    trainer.train()
    assert trainer.use_vllm is False  # raised only inside the two wrapped calls
    steps = [h for h in trainer.state.log_history if "thaw/savings" in h]
    for h in steps:
        assert h["sampling/importance_sampling_ratio/mean"] == pytest.approx(1.0, abs=1e-3)
        assert h["thaw/sampling_logp_diff/mean"] < 1e-4  # same weights, same dtype: the engine matches training
        assert h["thaw/sampling_logp_diff/mean"] == pytest.approx(h["sampling/sampling_logp_difference/mean"])


# -- metrics through W&B and across ranks -------------------------------------------------------------------
def read_wandb_records(path: str) -> list:
    """Records of a ``run-*.wandb`` file: W&B's LevelDB-style log of ``wandb_internal_pb2.Record`` protobufs.

    Layout: a 7-byte header (":W&B", magic 0xBEE1, version), then 32 KiB blocks of chunks, each with a
    7-byte header (crc32 over type byte + data, length, type: 1 full, 2 first, 3 middle, 4 last); a block
    tail shorter than a chunk header is zero padding.
    """
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), (ident, magic)
    pos, block, records, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            break
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, f"bad checksum at {pos}"
        if kind in (1, 2):
            pending = chunk
        else:
            pending += chunk
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pending))
    return records


def test_thaw_metrics_reach_an_offline_wandb_run(tmp_path, monkeypatch, fresh_wandb):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "thaw-rl-test")
    trainer = make_trainer(tmp_path, report_to="wandb", max_steps=2)
    try:
        trainer.train()
    finally:
        wandb.finish()
    (path,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    expected = [h for h in trainer.state.log_history if "thaw/savings" in h]
    # wandb's service process writes the log: after finish() its last records can still be on their way
    deadline = time.monotonic() + 60
    while True:
        rows_ = []
        try:
            records = read_wandb_records(path)
        except AssertionError:  # a chunk caught while the service writes it (bad checksum): read it again
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
            continue
        for record in records:
            if record.WhichOneof("record_type") == "history":
                rows_.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
        logged = [r for r in rows_ if "train/thaw/prompt_tokens_prefilled" in r]
        if len(logged) >= len(expected) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(logged) == len(expected) == 2
    for row, h in zip(logged, expected):
        for key in THAW_KEYS:
            assert row["train/" + key] == pytest.approx(h[key]), key


def test_two_ranks_train_and_sum_their_thaw_metrics(tmp_path):
    """torchrun, 2 CPU ranks (gloo), 2 steps; each rank rolls out its own prompt, the logs hold the sums."""
    ranks = torchrun_ranks(Path(__file__).with_name("test_trainers_distributed_worker.py"), tmp_path)
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["log_history"][-1]["train_loss"] is not None
    logged = [h for h in ranks[0]["log_history"] if "thaw/savings" in h]
    assert len(logged) == 2
    for step, h in enumerate(logged):
        mine = [r["rollouts"][step] for r in ranks]
        assert mine[0]["prompts"] != mine[1]["prompts"]  # each rank rolled out its own group
        assert h["thaw/prompt_tokens_prefilled"] == sum(m["prefill_tokens"] for m in mine)
        assert h["thaw/prefill_tokens_saved"] == sum(m["flat_prefill_tokens"] - m["prefill_tokens"] for m in mine)
        assert h["thaw/num_forks"] == 2


def test_deepspeed_forward_hooks_are_paused_during_generation_and_restored():
    """Stand-in for DeepSpeedEngine's hook API (DeepSpeed needs CUDA); the H100 receipt checks the real one."""
    from thaw_rl.trainers.deepspeed_hooks import paused_deepspeed_forward_hooks

    calls = []

    class FakeDeepSpeedEngine:  # the four attributes DeepSpeedEngine has (0.14 - 0.19)
        def __init__(self, module):
            self.module = module
            self.module_forward_pre_hook = self._create_module_forward_pre_hook()
            self.module_forward_post_hook = self._create_module_forward_post_hook()

        def _create_module_forward_pre_hook(self):
            return self.module.register_forward_pre_hook(lambda m, a, k: calls.append("pre"), with_kwargs=True)

        def _create_module_forward_post_hook(self):
            return self.module.register_forward_hook(lambda m, a, o: calls.append("post"))

    module = torch.nn.Linear(2, 2)
    ds = FakeDeepSpeedEngine(module)
    x = torch.ones(1, 2)
    with paused_deepspeed_forward_hooks(ds, zero_stage=2) as paused:
        module(x)
    assert paused and calls == []
    module(x)
    assert calls == ["pre", "post"]  # restored, once each
    with paused_deepspeed_forward_hooks(ds, zero_stage=3) as paused:
        module(x)
    assert not paused and calls == ["pre", "post"] * 2  # ZeRO-3 keeps them
