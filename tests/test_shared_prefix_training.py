"""Shared-prefix training: each shared prefix computed once in the training forward, same numbers as flat.

The story: the packed layout's mask is exactly each row's own ancestry (never a sibling's token); packed
logprobs, entropies and gradients equal TRL's flat scoring pass on tiny Llama/Qwen2/Qwen3 models with
unequal lengths, early EOS, shared completion prefixes and duplicate rows; each trainer's loss and
gradients (GRPO under every loss type with old and reference logprobs, segment trees, best-of-N, PPO with
its values) equal the flat path's; gradient checkpointing still gives the flat gradients; training logs
``thaw/train_tokens`` below ``thaw/train_tokens_flat`` and generation batches are shuffled by group.
"""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from trl.trainer.utils import add_fused_lm_head

from thaw_rl.summary import summarize
from thaw_rl.testing import tiny_model, tiny_model_and_tokenizer, trl_flat_logps, trl_rows
from thaw_rl.trainers import ThawBestOfNConfig, ThawBestOfNTrainer, ThawGRPOConfig, ThawGRPOTrainer
from thaw_rl.trainers.ppo_config import ThawPPOConfig
from thaw_rl.trainers.ppo_trainer import ThawPPOTrainer
from thaw_rl.trainers import shared_prefix
from thaw_rl.trainers.prefix_packing import pack_rows
from thaw_rl.trainers.shared_prefix import packed_logps, shuffle_groups
from thaw_rl.trainers.tree_attention import tree_attention_mask, tree_attention_mode
from tiny_training import PROMPTS, reward_chars, tiny_training_fields


def tree_batch(vocab_size: int, seed: int = 0):
    """Two prompts of different lengths; a group of 4 whose completions share prefixes (a segment tree), of
    unequal lengths (early EOS); a plain group of 3; and one row repeated exactly."""
    g = torch.Generator().manual_seed(seed)

    def tokens(n):
        return torch.randint(3, vocab_size, (n,), generator=g).tolist()

    p1, p2 = tokens(6), tokens(3)
    trunk = tokens(3)
    tree = [trunk + tokens(4), trunk + tokens(2), trunk[:1] + tokens(5), tokens(1)]
    plain = [tokens(7), tokens(4), tokens(6)]
    prompts = [p1] * 4 + [p2] * 3 + [p1]
    completions = tree + plain + [tree[0]]
    return trl_rows(prompts, completions, completion_width=7), prompts, completions


# -- the layout -----------------------------------------------------------------------------------------------
def test_each_token_sees_exactly_its_own_ancestors():
    (ids, mask), prompts, completions = tree_batch(vocab_size=50)
    batch = pack_rows(ids, mask, 7)
    (chunk,) = batch.chunks
    rows = [p + c for p, c in zip(prompts, completions)]
    # prompt 1 (6) + trunk (3) + tails 4, 2, 5, 1 + prompt 2 (3) + plain 7, 4, 6, plus one re-appended
    # divergence token for every row after the first of its prompt (3 + 2) and for the duplicate (1)
    assert chunk.num_tokens == 6 + 3 + 4 + 2 + 5 + 1 + 3 + 7 + 4 + 6 + 3 + 2 + 1 == 47
    assert chunk.num_flat_tokens == 8 * ids.size(1)
    visible = tree_attention_mask(chunk.subtree_end, "dense")[0, 0]  # (N, N)
    # rebuild each row's path from the gather (its predictors) and check it against the mask row by row
    order = chunk.rows.tolist()
    paths = {}
    for r, row in enumerate(order):
        tokens, p_len = rows[row], len(prompts[row])
        preds = chunk.gather[r, :len(completions[row])].tolist()
        last = preds[-1]
        path = visible[last].nonzero().flatten().tolist()  # what the last predictor may see
        assert chunk.input_ids[path].tolist() == tokens[:len(path)]  # ... is exactly its own prefix, in order
        assert chunk.position_ids[path].tolist() == list(range(len(path)))
        assert len(path) == len(tokens) - 1 and path[-1] == last
        assert preds == path[p_len - 1:]
        paths[row] = set(path)
    # a sibling's own tokens are never visible: rows 0 and 1 share the prompt and trunk, not their tails
    for a, b in [(0, 1), (0, 2), (1, 2), (4, 5)]:
        for q in paths[a] - paths[b]:
            assert not visible[q, list(paths[b] - paths[a])].any()
    # labels: each predictor carries the token its rows score next
    for r, row in enumerate(order):
        c = completions[row]
        assert chunk.shift_labels[chunk.gather[r, :len(c)]].tolist() == c


def test_chunks_respect_row_and_token_budgets():
    (ids, mask), _, _ = tree_batch(vocab_size=50)
    by_rows = pack_rows(ids, mask, 7, max_rows=3)
    assert [c.rows.numel() for c in by_rows.chunks] == [3, 3, 2]
    by_tokens = pack_rows(ids, mask, 7, max_tokens=20)
    assert all(c.num_tokens <= 20 for c in by_tokens.chunks)
    assert sorted(torch.cat([c.rows for c in by_tokens.chunks]).tolist()) == list(range(8))
    one = pack_rows(ids, mask, 7, max_tokens=1)  # rows are never cut: one row per chunk
    assert len(one.chunks) == 8


def test_a_mask_with_holes_is_not_packed():
    (ids, mask), _, _ = tree_batch(vocab_size=50)
    holed = mask.clone()
    holed[0, -7 + 1] = 0  # a hole inside row 0's completion
    assert pack_rows(ids, holed, 7) is None


# -- the numbers ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_packed_logprobs_entropies_and_gradients_equal_flat(family):
    model = tiny_model(family)
    add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    (ids, mask), _, _ = tree_batch(model.config.vocab_size)
    valid = mask[:, -7:].bool()
    flat_logps, flat_entropy = trl_flat_logps(model, ids, mask, 7)
    scores = packed_logps(model, model, ids, mask, 7, max_rows=None, max_tokens=None, mask_kind="dense",
                          compute_entropy=True)
    assert scores.batch.num_tokens < scores.batch.num_flat_tokens / 2
    torch.testing.assert_close(scores.logps[valid], flat_logps[valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.entropies[valid], flat_entropy[valid], atol=1e-5, rtol=0)
    assert torch.all(scores.logps[~valid] == 0)  # padding columns read 0, as TRL's masked labels give
    weights = torch.randn(valid.shape, generator=torch.Generator().manual_seed(1)) * valid

    def grads(logps):
        model.zero_grad()
        (logps * weights).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    expected = grads(trl_flat_logps(model, ids, mask, 7)[0])
    got = grads(packed_logps(model, model, ids, mask, 7, max_rows=None, max_tokens=None, mask_kind="dense",
                             compute_entropy=False).logps)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_budgeted_chunks_give_the_same_logprobs():
    model = tiny_model("qwen2")
    add_fused_lm_head(model)
    (ids, mask), _, _ = tree_batch(model.config.vocab_size)
    whole = packed_logps(model, model, ids, mask, 7, max_rows=None, max_tokens=None, mask_kind="dense",
                         compute_entropy=False).logps
    split = packed_logps(model, model, ids, mask, 7, max_rows=None, max_tokens=16, mask_kind="dense",
                         compute_entropy=False)
    assert len(split.batch.chunks) > 1
    torch.testing.assert_close(split.logps, whole, atol=1e-5, rtol=0)


def test_gradient_checkpointing_recomputes_with_the_tree_mask():
    """Checkpointed layers rerun in backward, after the packed call returned: the attention must still be the tree's."""
    model = tiny_model("llama")
    add_fused_lm_head(model)
    (ids, mask), _, _ = tree_batch(model.config.vocab_size)
    valid = mask[:, -7:].bool().float()
    model.zero_grad()
    (trl_flat_logps(model, ids, mask, 7)[0] * valid).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model.zero_grad()
    with tree_attention_mode(model):  # what ThawGRPOTrainer.train() holds for the whole run
        logps = packed_logps(model, model, ids, mask, 7, max_rows=None, max_tokens=None, mask_kind="dense",
                             compute_entropy=False).logps
        (logps * valid).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], atol=1e-5, rtol=1e-4, msg=name)
    assert model.config._attn_implementation != "thaw_tree"  # restored


@pytest.mark.slow  # compiles FlexAttention for the CPU (~1 min on 2 cores)
def test_flex_block_mask_forward_equals_dense():
    model = tiny_model("qwen2")
    add_fused_lm_head(model)
    (ids, mask), _, _ = tree_batch(model.config.vocab_size)
    with torch.no_grad():
        dense = packed_logps(model, model, ids, mask, 7, max_rows=None, max_tokens=None, mask_kind="dense",
                             compute_entropy=False).logps
        try:
            flex = packed_logps(model, model, ids, mask, 7, max_rows=None, max_tokens=None, mask_kind="flex",
                                compute_entropy=False).logps
        except Exception as err:  # FlexAttention needs a working torch.compile backend for the host
            pytest.skip(f"FlexAttention does not run here: {type(err).__name__}: {str(err)[:200]}")
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=0)


# -- the trainers ---------------------------------------------------------------------------------------------
def trainer_for(tmp_path, cls=ThawGRPOTrainer, config_cls=ThawGRPOConfig, model=None, **overrides):
    tiny, tokenizer = tiny_model_and_tokenizer("qwen2")
    fields = tiny_training_fields(tmp_path / "out", **{"max_steps": 2, "kv_cache_memory": 8 * 2**20, **overrides})
    trainer = cls(model=model if model is not None else tiny, reward_funcs=reward_chars, args=config_cls(**fields),
                  train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop; these tests call the loss directly
    return trainer


def loss_and_grads(trainer, inputs, packed: bool):
    trainer.args.shared_prefix_training = packed
    model = trainer.model
    model.zero_grad()
    with tree_attention_mode(model):
        loss = trainer._compute_loss(model, inputs)
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_grads(trainer, inputs):
    flat_loss, flat_grads = loss_and_grads(trainer, inputs, packed=False)
    packed_loss, packed_grads = loss_and_grads(trainer, inputs, packed=True)
    assert flat_loss.abs() > 0 and any(g.abs().sum() > 0 for g in flat_grads.values())
    torch.testing.assert_close(packed_loss, flat_loss, atol=1e-5, rtol=1e-5)
    assert packed_grads.keys() == flat_grads.keys()
    for name in flat_grads:
        torch.testing.assert_close(packed_grads[name], flat_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def generation_batch(trainer, prompts=PROMPTS[:2]):
    trainer.model.train()
    return trainer._generate_and_score_completions(
        [{"prompt": p} for p in prompts for _ in range(trainer.num_generations)])


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_grpo_loss_and_gradients_equal_flat(tmp_path, loss_type):
    # steps_per_generation 2: TRL computes old-policy logprobs (packed too); top_entropy_quantile: entropy filter
    # seed 1: a rollout where some completions stop early (checked below); the seeds are used as given (#13)
    trainer = trainer_for(tmp_path, loss_type=loss_type, steps_per_generation=2, top_entropy_quantile=0.5,
                          max_completion_length=10, seed=1)
    inputs = generation_batch(trainer)
    assert inputs["completion_mask"].sum(dim=1).unique().numel() > 1 or loss_type != "grpo"  # unequal lengths
    assert "old_per_token_logps" in inputs
    assert_same_loss_and_grads(trainer, inputs)


def test_old_and_reference_logprobs_equal_flat(tmp_path):
    tiny, tokenizer = tiny_model_and_tokenizer("qwen2")
    tiny.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    trainer = trainer_for(tmp_path, model=str(tmp_path / "policy"), beta=0.1, steps_per_generation=2)
    trainer.args.shared_prefix_training = True
    packed = generation_batch(trainer)
    assert trainer.last_packed_batch is not None  # the reference pass ran packed
    ids = torch.cat([packed["prompt_ids"], packed["completion_ids"]], dim=1)
    mask = torch.cat([packed["prompt_mask"], packed["completion_mask"]], dim=1)
    valid = packed["completion_mask"].bool()
    trainer.args.shared_prefix_training = False
    with torch.no_grad():
        for key, model in (("old_per_token_logps", trainer.model), ("ref_per_token_logps", trainer.ref_model)):
            flat, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, valid.size(1))
            torch.testing.assert_close(packed[key][valid], flat[valid], atol=1e-5, rtol=0, msg=key)
    assert_same_loss_and_grads(trainer, packed)


def test_segment_tree_loss_equals_flat_and_packs_shared_segments(tmp_path):
    trainer = trainer_for(tmp_path, tree_spec="segments", tree_branching=[2, 2], tree_segment_tokens=3)
    inputs = generation_batch(trainer)
    assert_same_loss_and_grads(trainer, inputs)
    batch = trainer.last_packed_batch
    rollout = trainer.last_rollout
    tree_tokens = sum(len(trainer.processing_class(p)["input_ids"]) for p in PROMPTS[:2]) + sum(
        n.num_tokens for n in rollout.nodes.values())
    # each prompt and tree node once, plus at most one re-appended token per row
    assert batch.num_tokens <= tree_tokens + len(rollout.leaves)


def test_best_of_n_loss_equals_flat(tmp_path):
    trainer = trainer_for(tmp_path, ThawBestOfNTrainer, ThawBestOfNConfig, best_of_n_keep=2)
    inputs = generation_batch(trainer)
    assert_same_loss_and_grads(trainer, inputs)


def random_value_head(trainer) -> None:
    """A trained-looking critic: the zero-initialised one values every state 0, which any layout reproduces."""
    with torch.no_grad():
        trainer.value_head.summary.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
        trainer.value_head.summary.bias.fill_(0.25)


def test_ppo_policy_and_value_losses_equal_flat(tmp_path):
    trainer = trainer_for(tmp_path, ThawPPOTrainer, ThawPPOConfig, kl_coef=0.0)
    random_value_head(trainer)
    inputs = generation_batch(trainer)
    assert_same_loss_and_grads(trainer, inputs)
    values_packed = trainer._captured_values.detach().clone()
    trainer.args.shared_prefix_training = False
    trainer._compute_loss(trainer.model, inputs)
    valid = inputs["completion_mask"].bool()
    assert values_packed[valid].abs().min() > 0
    torch.testing.assert_close(values_packed[valid], trainer._captured_values.detach()[valid], atol=1e-5, rtol=0)


def test_ppo_values_of_a_padded_pack_are_read_only_at_real_tokens(tmp_path, monkeypatch):
    """On CUDA a pack runs padded to 128 tokens (``pad_multiple``); the padding's values must not reach the
    padding columns of rows that stopped early (they read index N, the zero). The padding is forced here."""
    trainer = trainer_for(tmp_path, ThawPPOTrainer, ThawPPOConfig, kl_coef=0.0, stop_token="eos", seed=1,
                          max_completion_length=10)
    random_value_head(trainer)
    inputs = generation_batch(trainer)
    valid = inputs["completion_mask"].bool()
    assert not valid.all()  # some rows stopped early
    trainer._compute_loss(trainer.model, inputs)
    unpadded = trainer._captured_values.detach().clone()
    monkeypatch.setattr(shared_prefix, "pad_multiple", lambda kind, device: 128)
    trainer._compute_loss(trainer.model, inputs)
    padded = trainer._captured_values.detach()
    assert trainer.last_packed_batch.num_tokens % 128  # the packs really were padded
    torch.testing.assert_close(padded[valid], unpadded[valid], atol=1e-5, rtol=0)
    assert padded[~valid].eq(0).all() and unpadded[~valid].eq(0).all()


def test_training_logs_fewer_packed_tokens_and_changes_every_parameter(tmp_path):
    trainer = trainer_for(tmp_path, gradient_checkpointing=True)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    attention = trainer.model.config._attn_implementation
    trainer.train()
    assert trainer.model.config._attn_implementation == attention  # restored after train()
    assert trainer._pack_ahead.num_used == 2  # each step's loss forward ran on a pack made ahead of it
    steps = [h for h in trainer.state.log_history if "thaw/train_tokens" in h]
    assert len(steps) == 2
    for h in steps:
        assert 0 < h["thaw/train_tokens"] < h["thaw/train_tokens_flat"]
    for name, p in trainer.model.named_parameters():
        assert not torch.equal(before[name], p.detach()), name
    assert trainer.rollout_totals["thaw/train_tokens"] == sum(h["thaw/train_tokens"] for h in steps)
    summary = summarize(trainer.state.log_history, rollout_totals=trainer.rollout_totals)
    assert summary.train_tokens == trainer.rollout_totals["thaw/train_tokens"] < summary.train_tokens_flat


def test_flat_path_logs_equal_token_counts(tmp_path):
    trainer = trainer_for(tmp_path, shared_prefix_training=False, max_steps=1)
    trainer.train()
    (h,) = [h for h in trainer.state.log_history if "thaw/train_tokens" in h]
    assert h["thaw/train_tokens"] == h["thaw/train_tokens_flat"] > 0


def test_loss_forwards_use_packs_made_ahead_with_the_same_loss_and_gradients(tmp_path):
    """TRL buffers both micro-batches of a generation batch; each one's loss forward gets its pack from the
    pack-ahead (built on the host before the forward), with the loss and gradients of packing on the spot."""
    trainer = trainer_for(tmp_path, steps_per_generation=2, seed=1, max_completion_length=10)
    trainer.model.train()
    rows = [{"prompt": p} for p in PROMPTS[:2] for _ in range(trainer.num_generations)]
    first = trainer._prepare_inputs(rows)  # generates, shuffles by group, buffers 2 micro-batches of 4 rows
    buffered = trainer._buffered_inputs
    assert len(buffered) == 2 and first is buffered[0] and trainer._pack_ahead.source is buffered
    trainer._pack_ahead.prepare_next()  # what training_step does after queueing a backward: packs micro-batch 0
    assert trainer._pack_ahead._entries[id(buffered[0])].prepared is not None
    assert trainer._pack_ahead.take({"prompt_ids": buffered[0]["prompt_ids"]}) is None  # another dict: no pack
    for inputs in buffered:
        prepared = trainer._pack_ahead.take(inputs)
        assert prepared is not None and prepared.batch.num_rows == 4
        model = trainer.model
        ahead_loss, ahead_grads = None, None
        for use_ahead in (True, False):
            model.zero_grad()
            with tree_attention_mode(model):
                loss = trainer.compute_loss(model, inputs) if use_ahead else trainer._compute_loss(model, inputs)
                if use_ahead:
                    assert trainer.last_packed_batch is prepared.batch  # the forward used the pack made ahead
                else:
                    assert trainer.last_packed_batch is not prepared.batch
                loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            if use_ahead:
                ahead_loss, ahead_grads = loss.detach(), grads
        assert loss.abs() > 0
        torch.testing.assert_close(ahead_loss, loss.detach(), atol=0, rtol=0)
        for name, grad in grads.items():
            torch.testing.assert_close(ahead_grads[name], grad, atol=0, rtol=0, msg=name)


def test_prompts_shared_by_a_group_are_tokenized_once_with_trl_ids(tmp_path, monkeypatch):
    from trl import GRPOTrainer

    trainer = trainer_for(tmp_path)
    prompts = [p for p in PROMPTS[:3] for _ in range(4)]
    calls = []
    original = GRPOTrainer._tokenize_prompts
    monkeypatch.setattr(GRPOTrainer, "_tokenize_prompts", lambda self, ps: calls.append(len(ps)) or original(self, ps))
    ids, images, fields = trainer._tokenize_prompts(prompts)
    assert calls == [3]  # once per distinct prompt
    expected, _, _ = original(trainer, prompts)
    assert ids == expected and images is None and not fields
    assert len({id(row) for row in ids}) == len(ids)  # each row its own list


def test_generation_batches_are_shuffled_by_whole_groups():
    rows = torch.arange(12)
    shuffled = shuffle_groups({"x": rows, "names": [str(i) for i in range(12)], "n": torch.tensor(3)}, 4)
    groups = shuffled["x"].view(3, 4)
    assert sorted(groups[:, 0].tolist()) == [0, 4, 8]
    assert torch.equal(groups - groups[:, :1], torch.arange(4).expand(3, 4))  # each group intact and in order
    assert shuffled["names"] == [str(i) for i in shuffled["x"].tolist()] and shuffled["n"].item() == 3
    odd = shuffle_groups({"x": torch.arange(10)}, 4)["x"]  # not whole groups: TRL's row shuffle
    assert sorted(odd.tolist()) == list(range(10))


def test_config_rejects_bad_shared_prefix_fields(tmp_path):
    with pytest.raises(ValueError, match="shared_prefix_attention='sparse'"):
        ThawGRPOConfig(**tiny_training_fields(tmp_path, shared_prefix_attention="sparse"))
    with pytest.raises(ValueError, match="shared_prefix_max_tokens=0"):
        ThawGRPOConfig(**tiny_training_fields(tmp_path, shared_prefix_max_tokens=0))


def test_a_copy_of_the_mode_is_reentrant():
    model = tiny_model("qwen2")
    before = model.config._attn_implementation
    with tree_attention_mode(model):
        with tree_attention_mode(copy.copy(model)):
            assert model.config._attn_implementation == "thaw_tree"
        assert model.config._attn_implementation == "thaw_tree"
    assert model.config._attn_implementation == before


def test_block_mask_from_subtree_ends_equals_flex_own_construction():
    """The analytic block mask (no compile) marks the same blocks as flex's create_block_mask, full ones too."""
    from torch.nn.attention.flex_attention import create_block_mask

    from thaw_rl.trainers.shared_prefix import padded_tree
    from thaw_rl.trainers.tree_attention import tree_block_mask

    g = torch.Generator().manual_seed(3)
    prompts, completions = [], []
    for p_len in (300, 40):  # a long prompt (full blocks) and a short one; completions of mixed lengths
        prompt = torch.randint(3, 50, (p_len,), generator=g).tolist()
        trunk = torch.randint(3, 50, (70,), generator=g).tolist()
        for i in range(4):
            tail = torch.randint(3, 50, (int(torch.randint(1, 200, (), generator=g)),), generator=g).tolist()
            prompts.append(prompt)
            completions.append((trunk if i % 2 else []) + tail)
    ids, mask = trl_rows(prompts, completions, max(len(c) for c in completions))
    (chunk,) = pack_rows(ids, mask, ids.size(1) - max(len(p) for p in prompts)).chunks
    _, _, _, ends = padded_tree(chunk, 128)
    ours = tree_block_mask(ends)

    def rule(b, h, q, k):
        return (k <= q) & (q < ends[k])

    theirs = create_block_mask(rule, B=None, H=None, Q_LEN=ends.numel(), KV_LEN=ends.numel(), device="cpu")
    assert torch.equal(ours.to_dense(), theirs.to_dense())  # which blocks are computed at all
    full = lambda m: torch.zeros(m.full_kv_num_blocks.shape[-1], m.full_kv_num_blocks.shape[-1], dtype=torch.bool) \
        .scatter_(1, m.full_kv_indices[0, 0].long(), torch.arange(m.full_kv_indices.shape[-1])[None, :]
                  < m.full_kv_num_blocks[0, 0, :, None])  # noqa: E731
    assert torch.equal(full(ours), full(theirs))  # and which of them need no per-element mask
    assert full(ours).any() and (ours.to_dense().sum() < ours.to_dense().numel() / 2)  # sparse, with full blocks


@pytest.mark.parametrize("family", ["mistral", "qwen2-sliding"])
def test_sliding_window_models_pack_with_the_window_along_each_path(family):
    """Rows longer than the window: the packed logprobs still equal the flat ones (HF's window masks), and a
    window-free tree mask would not (so the window is what makes them equal)."""
    from transformers import MistralConfig, MistralForCausalLM

    from thaw_rl.testing import _COMMON_CONFIG

    if family == "mistral":
        config = MistralConfig(**dict(_COMMON_CONFIG, head_dim=16), vocab_size=100, pad_token_id=0,
                               sliding_window=4, tie_word_embeddings=False)
        torch.manual_seed(0)
        model = MistralForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    else:  # layer 0 full, the others sliding (max_window_layers=1)
        model = tiny_model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
        assert {"sliding_attention", "full_attention"} <= set(model.config.layer_types)
    add_fused_lm_head(model)
    (ids, mask), _, _ = tree_batch(model.config.vocab_size)
    valid = mask[:, -7:].bool()
    with torch.no_grad():
        flat, _ = trl_flat_logps(model, ids, mask, 7)
        packed = packed_logps(model, model, ids, mask, 7, max_rows=None, max_tokens=None, mask_kind="dense",
                              compute_entropy=False).logps
        torch.testing.assert_close(packed[valid], flat[valid], atol=1e-5, rtol=0)
        model.config.sliding_window = None  # the same tree without a window: now it must differ from flat
        if family != "mistral":
            model.config.layer_types = ["full_attention"] * len(model.config.layer_types)
        unwindowed = packed_logps(model, model, ids, mask, 7, max_rows=None, max_tokens=None, mask_kind="dense",
                                  compute_entropy=False).logps
    assert (unwindowed[valid] - flat[valid]).abs().max() > 1e-3


def test_windowed_block_mask_covers_every_visible_pair_and_marks_nothing_full():
    """With a sliding window the block mask must still list every block holding a visible (q, k) pair."""
    from thaw_rl.trainers.shared_prefix import padded_tree
    from thaw_rl.trainers.tree_attention import tree_block_mask

    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(3, 50, (200,), generator=g).tolist()
    completions = [torch.randint(3, 50, (n,), generator=g).tolist() for n in (150, 90, 180)]
    ids, mask = trl_rows([prompt] * 3, completions, 180)
    (chunk,) = pack_rows(ids, mask, 180).chunks
    _, positions, _, ends = padded_tree(chunk, 128)
    window = 40
    ours = tree_block_mask(ends, positions=positions, window=window)
    dense = tree_attention_mask(ends, "dense", positions, window)[0, 0]  # (N, N)
    nb = ends.numel() // 128
    needed = dense.view(nb, 128, nb, 128).any(dim=3).any(dim=1)  # (nb, nb): blocks with a visible pair
    listed = ours.to_dense()[0, 0].bool()
    assert torch.all(listed[needed]) and ours.full_kv_num_blocks.sum() == 0
    assert dense.sum() < tree_attention_mask(ends, "dense")[0, 0].sum()  # the window removed pairs
