"""GRPO with rollout_backend="pool" on CPU: 2 worker processes, weights over gloo after every optimizer step.

The story: bad pool fields fail with the fix in the message; GRPO trains 3 steps with rollouts in the
workers, synchronously and one step ahead; after every step each worker's sampling logprobs for a fixed
prompt equal the trainer model's own forward (so the weights arrived); asynchronous rollouts are never
more than max_staleness versions old, and an older one is dropped and generated again; a worker killed
during a queued rollout is replaced, gets the current weights from the other worker, and the rollout is
used. Best-of-N takes async rollouts without importance sampling; PPO refuses them (for now).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from thaw_rl import SamplingParams, TreeSpec
from thaw_rl.pool.worker import Fault
from thaw_rl.testing import tiny_model_and_tokenizer
from thaw_rl.trainers import ThawBestOfNConfig, ThawGRPOConfig, ThawGRPOTrainer, ThawPPOConfig
from thaw_rl.trainers.pool_rollouts import Lookahead, PoolRollouts
from tiny_training import PROMPTS, reward_chars, tiny_training_fields

PROBE = [1, 20, 30, 40, 50, 60, 70]  # a fixed prompt whose sampled logprobs each worker reports
POOL_FIELDS = dict(rollout_backend="pool", pool_num_workers=2, pool_devices=["cpu"], pool_timeout_s=120,
                   kv_cache_memory=8 << 20, pool_weight_bucket_bytes=32 << 10)


def make_trainer(tmp_path, **overrides):
    model, tokenizer = tiny_model_and_tokenizer("qwen2", seed=0)
    args = ThawGRPOConfig(**tiny_training_fields(tmp_path / "out", **{"max_steps": 3, **POOL_FIELDS, **overrides}))
    return ThawGRPOTrainer(model=model, reward_funcs=reward_chars, args=args,
                           train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)


class CheckWorkers(TrainerCallback):
    """After each optimizer step (and its weight push): every worker samples like the trainer's model."""

    def __init__(self, trainer, kill_after_step: int | None = None) -> None:
        self.trainer, self.kill_after_step = trainer, kill_after_step
        self.gaps: list[float] = []
        self.versions: list[tuple[int, int]] = []

    def on_step_end(self, args, state, control, **kwargs):
        pool = self.trainer.rollout_pool
        self.versions.append((pool.version, state.global_step))
        params = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, seed=state.global_step)
        for w in range(pool.num_workers):
            (h,) = pool.prefill([PROBE], worker=w)
            (out,) = pool.generate([h], params)
            pool.free(h)
            with torch.no_grad():
                ids = torch.tensor([PROBE + out.token_ids])  # (1, P + 6)
                logits = self.trainer.model(ids).logits[0, len(PROBE) - 1:-1].float()  # (6, V)
            expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
            self.gaps.append(float((expected - torch.tensor(out.logprobs)).abs().max()))
        if state.global_step == self.kill_after_step:
            pool._set_faults(1, [Fault("generate", "kill")])  # the next queued rollout's first generate


@pytest.mark.parametrize("overrides, words", [
    (dict(rollout_backend="native", pool_num_workers=2), ["pool_num_workers=2", "rollout_backend='pool'"]),
    (dict(rollout_backend="native", async_rollouts=True), ["async_rollouts=True", "rollout_backend='pool'"]),
    (dict(POOL_FIELDS, pool_num_workers=0), ["pool_num_workers=0", ">= 1"]),
    (dict(POOL_FIELDS, pool_devices="cpu"), ["pool_devices='cpu'", "list"]),
    (dict(POOL_FIELDS, async_rollouts=True, native_importance_sampling_correction=True, max_staleness=0),
     ["max_staleness=0", "max_staleness >= 1"]),
    (dict(POOL_FIELDS, async_rollouts=True), ["native_importance_sampling_correction=True"]),
])
def test_bad_pool_fields_name_the_fix(tmp_path, overrides, words):
    with pytest.raises(ValueError) as err:
        ThawGRPOConfig(**tiny_training_fields(tmp_path / "out", **overrides))
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_ppo_and_best_of_n_configs_take_the_pool_fields(tmp_path):
    """Best-of-N trains plain NLL (no policy ratio), so its async rollouts need no importance sampling; PPO
    recomputes its old logprobs in the trainer, so it runs the pool synchronously only (for now)."""
    fields = tiny_training_fields(tmp_path / "out", **POOL_FIELDS, async_rollouts=True)
    best = ThawBestOfNConfig(**fields, beta=0.0)
    assert (best.rollout_backend, best.async_rollouts, best.max_staleness) == ("pool", True, 1)
    with pytest.raises(ValueError, match="async_rollouts=True is not supported by ThawPPOTrainer yet"):
        ThawPPOConfig(**fields)
    assert ThawPPOConfig(**dict(fields, async_rollouts=False)).pool_num_workers == 2


def test_a_rollout_older_than_max_staleness_is_dropped_and_generated_again(tmp_path):
    """PoolRollouts on its own: a rollout queued at version 0 is used at version 1, dropped at version 2."""
    model, _ = tiny_model_and_tokenizer("qwen2", seed=0)
    args = ThawGRPOConfig(**tiny_training_fields(tmp_path / "out", **dict(POOL_FIELDS, pool_num_workers=1)))
    step = {"now": 0}

    @contextlib.contextmanager
    def generation_model():
        yield model

    rollouts = PoolRollouts(args, generation_model, lambda: dict(model.named_parameters()), lambda: step["now"])
    prompts, params = [PROBE], SamplingParams(temperature=1.0, max_tokens=4, seed=0)
    try:
        rollouts.queue(prompts, TreeSpec.grpo(2), 2, params)  # starts the pool: version 0
        step["now"] = 1
        used = rollouts.generate(prompts, TreeSpec.grpo(2), 2, params)
        assert (used.version, rollouts.num_dropped, rollouts.staleness_history) == (0, 0, [1])
        rollouts.queue(prompts, TreeSpec.grpo(2), 2, params)  # still version 0: no push since
        step["now"] = 2
        fresh = rollouts.generate(prompts, TreeSpec.grpo(2), 2, params)
        assert (fresh.version, rollouts.num_dropped, rollouts.staleness_history) == (2, 1, [1, 0])
        assert rollouts.pool.version == 2 and rollouts.metrics()["thaw/rollouts_dropped"] == 1.0
    finally:
        rollouts.close()


def test_lookahead_hands_out_a_step_and_queues_the_next_steps_generation_batches():
    items = iter("abcde")
    ahead = Lookahead(generate_every=1)
    assert ahead.take(items, 1) == (["a"], [(0, "a"), (1, "b")])  # the first step queues itself and the next
    assert ahead.take(items, 1) == (["b"], [(2, "c")])
    # TRL repeats a generation batch steps_per_generation times: only every second item is generated on
    items = iter("aabbccd")
    ahead = Lookahead(generate_every=2)
    assert ahead.take(items, 2) == (["a", "a"], [(0, "a"), (2, "b")])
    assert ahead.take(items, 2) == (["b", "b"], [(4, "c")])
    assert ahead.take(items, 2) == (["c", "c"], [(6, "d")])
    assert ahead.take(items, 2) == (["d"], [])  # the epoch's end: nothing left to read ahead
    # a new epoch's iterator: items count on from those handed out (TRL's step counter does too)
    assert ahead.take(iter("xy"), 1) == (["x"], [(8, "y")])


def run(trainer, check):
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.add_callback(check)
    trainer.train()
    assert trainer.state.global_step == 3
    moved = [k for k, v in trainer.model.named_parameters() if not torch.equal(v, before[k])]
    assert len(moved) == len(before)  # every parameter trained
    assert check.versions == [(1, 1), (2, 2), (3, 3)]  # the pool's version is the trainer's step, after each step
    assert len(check.gaps) == 6 and max(check.gaps) < 1e-4  # both workers hold the trained weights
    logged = {k for row in trainer.state.log_history for k in row}
    assert {"thaw/weight_version", "thaw/weight_sync_ms", "thaw/rollout_staleness", "thaw/pool_transfer_bytes",
            "thaw/pool_transfer_ms"} <= logged
    assert trainer.rollout_pool is None  # the workers were stopped at the end of training


def test_grpo_trains_with_rollouts_in_pool_workers(tmp_path):
    trainer = make_trainer(tmp_path)
    check = CheckWorkers(trainer)
    run(trainer, check)
    assert trainer._pool_rollouts.staleness_history == [0, 0, 0]  # synchronous: the current weights


def test_async_rollouts_run_one_step_ahead_and_survive_a_killed_worker(tmp_path, caplog):
    trainer = make_trainer(tmp_path, async_rollouts=True, max_staleness=1, native_importance_sampling_correction=True)
    check = CheckWorkers(trainer, kill_after_step=1)
    pool_failures = []
    trainer.add_callback(type("Keep", (TrainerCallback,), {
        "on_step_end": lambda self, args, state, control, **kw: pool_failures.extend(
            trainer.rollout_pool.stats()["failures"][len(pool_failures):])})())
    run(trainer, check)
    rollouts = trainer._pool_rollouts
    # step 0 waits for its own rollout (version 0); steps 1 and 2 use rollouts made while the step before trained
    assert rollouts.staleness_history == [0, 1, 1]
    assert max(rollouts.staleness_history) <= trainer.args.max_staleness and rollouts.num_dropped == 0
    # the kill hit the rollout of the third step's data, queued at version 1 while the second step trained;
    # the replacement got version 1 from worker 0, its retried generate was accepted at that version (a
    # worker refuses other versions), the rollout was used, and the next pushes reached the replacement
    assert len(pool_failures) == 1 and "worker 1" in pool_failures[0] and "SIGKILL" in pool_failures[0]
    assert "asynchronous rollout failed" not in caplog.text


def test_a_pool_trainer_process_trains_on_one_gpu_when_it_sees_several(tmp_path, monkeypatch):
    """One process seeing 2 GPUs (configs/pool_1_trainer_n_rollout.yaml): transformers counts both as its own
    (nn.DataParallel, which TRL's GRPOTrainer refuses); with rollout_backend='pool' the second is the workers'.
    The device count is patched: this machine has no GPU, and nothing else reads it while the configs build."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    fields = tiny_training_fields(tmp_path / "out", use_cpu=False)
    assert ThawGRPOConfig(**fields).n_gpu == 2  # what GRPOTrainer refuses: the native engine runs in-process
    pool_args = ThawGRPOConfig(**fields, **POOL_FIELDS)
    assert (pool_args.n_gpu, pool_args.train_batch_size) == (1, fields["per_device_train_batch_size"])
