"""ThawEngine against the model's own generate and forward: greedy tokens, logprobs, fork, prefix cache."""

from __future__ import annotations

import pytest
import torch

from thaw_rl import KVCacheExhaustedError, SamplingParams, ThawEngine
from thaw_rl.testing import hf_greedy, random_prompts, tiny_model_and_tokenizer

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def forward_logprobs(model, tokens: list[int], start: int, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / T) of tokens[start:] from one plain forward of the whole sequence."""
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(torch.tensor([tokens], device=device)).logits[0].float().cpu()  # (L, V)
    lp = torch.log_softmax(logits / temperature, dim=-1)[start - 1:-1]
    return lp.gather(-1, torch.tensor(tokens[start:])[:, None])[:, 0]


@pytest.fixture(params=["llama", "qwen2", "qwen3"])
def tiny(request):
    model, tok = tiny_model_and_tokenizer(request.param)
    return model, tok


def test_greedy_matches_generate_on_tiny_families(tiny):
    model, tok = tiny
    engine = ThawEngine(model, tok, block_size=16, kv_cache_memory=8 << 20)
    prompts = random_prompts([3, 16, 17, 40], model.config.vocab_size)
    outs = engine.generate(engine.prefill_many(prompts), GREEDY)
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(model, p, GREEDY.max_tokens)
        assert o.finish_reason == "length"


def test_smollm2_greedy_matches_generate_on_chat_prompts(smollm2):
    """4 chat prompts of different lengths, 48 new tokens, generated together in one batch."""
    model, tok = smollm2
    questions = ["What is 2+2?", "Write a haiku about the sea.", "Hi",
                 "Explain step by step how a language model predicts the next token and why attention helps."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
               for q in questions]
    prompts = [p["input_ids"] if not isinstance(p, list) else p for p in prompts]
    assert len({len(p) for p in prompts}) == 4
    engine = ThawEngine(model, tok, kv_cache_memory=32 << 20)
    params = SamplingParams(temperature=0.0, max_tokens=48)
    outs = engine.generate(engine.prefill_many(prompts), params)
    for p, o in zip(prompts, outs):
        ref = hf_greedy(model, p, 48, eos=tok.eos_token_id)
        assert o.token_ids == ref[: len(o.token_ids)] and len(o.token_ids) == len(ref)
        assert o.finish_reason == ("stop" if ref[-1] == tok.eos_token_id else "length")
    assert any(o.finish_reason == "stop" for o in outs)  # eos handling was exercised


def test_sampled_logprobs_equal_plain_forward(tiny):
    model, tok = tiny
    engine = ThawEngine(model, tok, kv_cache_memory=8 << 20)
    prompts = random_prompts([5, 21], model.config.vocab_size, seed=1)
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_tokens=20, ignore_eos=True, seed=3)
    outs = engine.generate(engine.prefill_many(prompts), params)
    for p, o in zip(prompts, outs):
        ref = forward_logprobs(model, p + o.token_ids, len(p), temperature=0.7)
        torch.testing.assert_close(torch.tensor(o.logprobs), ref, atol=1e-4, rtol=0)


def test_greedy_logprobs_equal_plain_forward_on_smollm2(smollm2):
    model, tok = smollm2
    engine = ThawEngine(model, tok, kv_cache_memory=16 << 20)
    prompt = tok("The capital of France is", add_special_tokens=False)["input_ids"]
    (o,) = engine.generate([engine.prefill(prompt)], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    ref = forward_logprobs(model, prompt + o.token_ids, len(prompt))
    torch.testing.assert_close(torch.tensor(o.logprobs), ref, atol=1e-4, rtol=0)


def test_fork_children_continue_exactly_as_parent_alone(tiny):
    model, tok = tiny
    prompt = random_prompts([37], model.config.vocab_size, seed=2)[0]  # 2 full blocks + 5 tokens
    alone = ThawEngine(model, tok, kv_cache_memory=8 << 20)
    (ref,) = alone.generate([alone.prefill(prompt)], GREEDY)

    engine = ThawEngine(model, tok, kv_cache_memory=8 << 20)
    parent = engine.prefill(prompt)
    kids = engine.fork(parent, 3)
    for o in engine.generate(kids, GREEDY):
        assert o.token_ids == ref.token_ids
        assert o.logprobs == pytest.approx(ref.logprobs, abs=1e-5)


def test_fork_mid_generation_continues_the_parent(tiny):
    """A child forked after a segment of decoding continues as the unforked parent would."""
    model, tok = tiny
    prompt = random_prompts([20], model.config.vocab_size, seed=4)[0]
    engine = ThawEngine(model, tok, kv_cache_memory=8 << 20)
    seg = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    parent = engine.prefill(prompt)
    (first,) = engine.generate([parent], seg)
    kids = engine.fork(parent, 2)
    second = engine.generate(kids, seg)
    whole = hf_greedy(model, prompt, 18)
    for o in second:
        assert first.token_ids + o.token_ids == whole


def test_sampling_seeds_children_differ_and_reproduce(tiny):
    model, tok = tiny
    engine = ThawEngine(model, tok, kv_cache_memory=8 << 20)
    parent = engine.prefill(random_prompts([12], model.config.vocab_size, seed=5)[0])
    params = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=1234)
    a = [o.token_ids for o in engine.generate(engine.fork(parent, 4), params)]
    b = [o.token_ids for o in engine.generate(engine.fork(parent, 4), params)]
    assert a == b  # same seed, same tokens
    assert len({tuple(x) for x in a}) == 4  # children differ (collision odds ~ V^-16, vocab ~60)
    c = [o.token_ids for o in engine.generate(engine.fork(parent, 4), SamplingParams(
        temperature=1.0, max_tokens=16, ignore_eos=True, seed=99))]
    assert c != a


def test_refcounts_and_free_blocks_are_exact_through_fork_generate_free(tiny):
    model, tok = tiny
    engine = ThawEngine(model, tok, block_size=16, kv_cache_memory=8 << 20)
    total = engine.stats.num_blocks
    parent = engine.prefill(random_prompts([37], model.config.vocab_size, seed=6)[0])  # 2 full + 1 partial
    full, partial = parent.block_table[:2], parent.block_table[2]
    assert engine.stats.num_used_blocks == 3
    kids = engine.fork(parent, 4)
    assert [engine.block_manager.ref_count(b) for b in full] == [5, 5]
    assert engine.block_manager.ref_count(partial) == 1
    assert all(k.block_table[:2] == full and k.block_table[2] != partial for k in kids)
    assert engine.stats.num_used_blocks == 3 + 4  # one copied partial block per child
    # 37 prompt tokens + 11 generated, of which 10 computed: 47 tokens -> 3 blocks per child
    engine.generate(kids, SamplingParams(temperature=0, max_tokens=11, ignore_eos=True))
    assert all(len(k.block_table) == 3 for k in kids)
    assert engine.stats.num_used_blocks == 7
    for k in kids:
        engine.free(k)
    assert [engine.block_manager.ref_count(b) for b in full] == [1, 1]
    assert engine.stats.num_used_blocks == 3
    engine.free(parent)
    assert engine.stats.num_used_blocks == 0 and engine.stats.num_free_blocks == total


def test_same_prompt_twice_is_computed_once(tiny):
    model, tok = tiny
    engine = ThawEngine(model, tok, block_size=16, kv_cache_memory=8 << 20)
    prompt = random_prompts([40], model.config.vocab_size, seed=7)[0]
    a = engine.prefill(prompt)
    assert engine.stats.prompt_tokens_computed == 40 and engine.stats.prompt_tokens_reused == 0
    b = engine.prefill(prompt)  # its 2 full blocks come from the prefix cache; the 8-token tail is computed
    assert engine.stats.prompt_tokens_reused == 32
    assert engine.stats.prompt_tokens_computed == 40 + 8
    assert b.block_table[:2] == a.block_table[:2]
    (oa,), (ob,) = engine.generate([a], GREEDY), engine.generate([b], GREEDY)
    assert oa.token_ids == ob.token_ids
    # freed blocks stay findable until evicted
    engine.free(a)
    engine.free(b)
    engine.prefill(prompt)
    assert engine.stats.prompt_tokens_reused == 64


def test_chunked_prefill_and_mixed_steps_match_generate(tiny):
    """A tiny token budget forces prompts into chunks that share steps with other sessions' decodes."""
    model, tok = tiny
    engine = ThawEngine(model, tok, kv_cache_memory=8 << 20, max_num_batched_tokens=12)
    prompts = random_prompts([30, 7, 45], model.config.vocab_size, seed=8)
    outs = engine.generate(engine.prefill_many(prompts), GREEDY)
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(model, p, GREEDY.max_tokens)


def test_full_pool_preempts_and_recomputes_without_changing_outputs(tiny):
    model, tok = tiny
    prompts = random_prompts([30, 31, 29, 33], model.config.vocab_size, seed=9)
    params = SamplingParams(temperature=0.9, max_tokens=40, ignore_eos=True, seed=11)
    roomy = ThawEngine(model, tok, kv_cache_memory=8 << 20)
    expected = [o.token_ids for o in roomy.generate(roomy.prefill_many(prompts), params)]
    spec = roomy.spec
    tight = ThawEngine(model, tok, kv_cache_memory=13 * spec.bytes_per_block)  # 12 usable blocks < 4 x 5 needed
    outs = tight.generate(tight.prefill_many(prompts), params)
    assert [o.token_ids for o in outs] == expected
    assert tight.stats.num_preemptions > 0


def test_session_too_large_for_pool_raises_clear_error(tiny):
    model, tok = tiny
    spec = ThawEngine(model, tok, kv_cache_memory=1 << 20).spec
    engine = ThawEngine(model, tok, kv_cache_memory=3 * spec.bytes_per_block)  # 2 usable blocks = 32 tokens
    with pytest.raises(KVCacheExhaustedError, match="raise kv_cache_memory"):
        engine.prefill(random_prompts([40], model.config.vocab_size)[0])


def test_sampling_filters_agree_with_greedy_when_they_leave_one_token(tiny):
    model, tok = tiny
    engine = ThawEngine(model, tok, kv_cache_memory=8 << 20)
    prompt = random_prompts([9], model.config.vocab_size, seed=10)[0]
    ref = hf_greedy(model, prompt, 12)
    for params in (SamplingParams(temperature=1.5, top_k=1, max_tokens=12, ignore_eos=True, seed=1),
                   SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=12, ignore_eos=True, seed=2),
                   SamplingParams(temperature=1.0, min_p=0.999999, max_tokens=12, ignore_eos=True, seed=3)):
        (o,) = engine.generate([engine.prefill(prompt)], params)
        assert o.token_ids == ref


def test_repetition_penalty_matches_hf(tiny):
    model, tok = tiny
    engine = ThawEngine(model, tok, kv_cache_memory=8 << 20)
    prompt = random_prompts([9], model.config.vocab_size, seed=12)[0]
    (o,) = engine.generate([engine.prefill(prompt)],
                           SamplingParams(temperature=0, repetition_penalty=1.8, max_tokens=16, ignore_eos=True))
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, repetition_penalty=1.8,
                         eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert o.token_ids == ref


def test_stop_token_ids_end_generation_with_stop(tiny):
    model, tok = tiny
    engine = ThawEngine(model, tok, kv_cache_memory=8 << 20)
    prompt = random_prompts([9], model.config.vocab_size, seed=13)[0]
    ref = hf_greedy(model, prompt, 12)
    stop = ref[4]
    (o,) = engine.generate([engine.prefill(prompt)],
                           SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop]))
    assert o.finish_reason == "stop" and o.token_ids == ref[: ref.index(stop) + 1]


def test_model_keeps_its_own_attention_outside_the_engine(tiny):
    model, tok = tiny
    before = model.config._attn_implementation
    engine = ThawEngine(model, tok, kv_cache_memory=8 << 20)
    engine.generate([engine.prefill([5, 6, 7])], GREEDY)
    assert model.config._attn_implementation == before
    x = torch.tensor([[5, 6, 7, 8]])
    model.train()
    loss = model(x, labels=x).loss
    loss.backward()  # trains through its normal attention
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# -- bad input ------------------------------------------------------------------------------------------
def test_bad_inputs_raise_value_errors_that_name_the_fix(tiny):
    model, tok = tiny
    engine = ThawEngine(model, tok, kv_cache_memory=8 << 20)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.prefill([])
    ctx = model.config.max_position_embeddings
    with pytest.raises(ValueError, match="does not fit the model's context"):
        engine.prefill([5] * ctx)
    s = engine.prefill([5] * (ctx - 10))
    with pytest.raises(ValueError, match="Lower max_tokens to 10"):
        engine.generate([s], SamplingParams(max_tokens=11))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.prefill([model.config.vocab_size + 5])
    engine.free(s)
    with pytest.raises(ValueError, match="was freed"):
        engine.generate([s], GREEDY)
    with pytest.raises(ValueError, match="was freed"):
        engine.fork(s, 2)
    other = ThawEngine(model, tok, kv_cache_memory=8 << 20)
    with pytest.raises(ValueError, match="belongs to another engine"):
        other.generate([engine.prefill([5, 6])], GREEDY)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_unsupported_model_family_names_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="llama, qwen2, qwen3"):
        ThawEngine(model, kv_cache_memory=1 << 20)


def test_fork_at_an_earlier_position_branches_there(tiny):
    """fork(at=p) keeps token_ids[:p]; a greedy child then re-derives the parent's own continuation."""
    model, tok = tiny
    prompt = random_prompts([13], model.config.vocab_size, seed=14)[0]
    engine = ThawEngine(model, tok, kv_cache_memory=8 << 20)
    parent = engine.prefill(prompt)
    (full,) = engine.generate([parent], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    used = engine.stats.num_used_blocks
    for at in (13 + 3, 32, 33, 13 + 19):  # inside a block, at a block boundary, just past one
        (child,) = engine.fork(parent, 1, at=at)
        assert child.token_ids == parent.token_ids[:at]
        (o,) = engine.generate([child], SamplingParams(temperature=0, max_tokens=13 + 30 - at, ignore_eos=True))
        assert child.token_ids == parent.token_ids  # greedy: same path as the parent
        engine.free(child)
    assert engine.stats.num_used_blocks == used  # children returned every block they took
    with pytest.raises(ValueError, match="fork\\(at=0\\)"):
        engine.fork(parent, 1, at=0)


def test_preempted_finished_sessions_keep_tokens_and_continue(tiny):
    model, tok = tiny
    prompts = random_prompts([30, 31, 29, 33], model.config.vocab_size, seed=15)
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    spec = ThawEngine(model, tok, kv_cache_memory=1 << 20).spec
    tight = ThawEngine(model, tok, kv_cache_memory=10 * spec.bytes_per_block)  # 9 usable < 4 x 4 needed
    sessions = tight.prefill_many(prompts)
    tight.generate(sessions, greedy)
    assert tight.stats.num_preemptions > 0
    assert any(s.num_computed == 0 for s in sessions)  # some finished sessions lost their KV...
    more = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    tight.generate(sessions, more)  # ...and still continue exactly (recomputed on demand)
    for s, p in zip(sessions, prompts):
        assert s.token_ids[len(p):] == hf_greedy(model, p, 35)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_cuda_graphs_and_triton_attention_match_generate(family):
    """On CUDA: Triton paged attention + CUDA-graph decode (3 sessions padded to 4) equal HF greedy."""
    model, tok = tiny_model_and_tokenizer(family)
    model = model.cuda()
    engine = ThawEngine(model, tok, kv_cache_memory=64 << 20)
    assert engine.runner.graphs is not None
    prompts = random_prompts([5, 17, 40], model.config.vocab_size, seed=21)
    trunk = engine.prefill(prompts[2])
    kids = engine.fork(trunk, 2)
    outs = engine.generate(engine.prefill_many(prompts[:2]) + kids, GREEDY)
    for p, o in zip(prompts[:2] + [prompts[2]] * 2, outs):
        ids = torch.tensor([p], device="cuda")
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY.max_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert o.token_ids == ref
        lp = forward_logprobs(model, p + o.token_ids, len(p))
        torch.testing.assert_close(torch.tensor(o.logprobs), lp, atol=1e-4, rtol=0)
    assert len(engine.runner.graphs.graphs) >= 1  # decode steps really replayed a graph


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_survive_a_mixed_precision_wrapper_on_forward():
    """TRL trainers with bf16=True run ``model.forward`` through accelerate's autocast + convert_outputs_to_fp32,
    so the forward's logits are fp32 while the LM head computes bf16. The decode graphs must copy those logits
    (not write the head's GEMM into an fp32 buffer, which failed every capture and left GRPO training decoding
    eagerly, ~5x slower), and give the greedy tokens of the same wrapped model decoded eagerly."""
    from accelerate.utils import convert_outputs_to_fp32

    model, tok = tiny_model_and_tokenizer("qwen2", dtype=torch.bfloat16)
    model = model.cuda()
    prompts = random_prompts([5, 17, 30], model.config.vocab_size, seed=4)
    assert ThawEngine(model, tok, kv_cache_memory=64 << 20).runner.direct_lm_head  # unwrapped: the direct head
    model.forward = convert_outputs_to_fp32(torch.autocast("cuda", dtype=torch.bfloat16)(model.forward))
    eager = ThawEngine(model, tok, kv_cache_memory=64 << 20, use_cuda_graphs=False)
    want = [o.token_ids for o in eager.generate(eager.prefill_many(prompts), GREEDY)]
    engine = ThawEngine(model, tok, kv_cache_memory=64 << 20)
    got = [o.token_ids for o in engine.generate(engine.prefill_many(prompts), GREEDY)]
    assert engine.runner.graphs is not None and engine.runner.graphs_failed is None
    assert len(engine.runner.graphs.graphs) >= 1 and not engine.runner.direct_lm_head
    assert got == want


def _decode_step(model, tok, lengths: list[int]):
    """(runner, packed batch) of one decode step of sessions of these prompt lengths, its blocks allocated: after
    a generate call every session has a last token whose KV is not computed yet."""
    from thaw_rl.engine.model_runner import pack
    from thaw_rl.engine.scheduler import Chunk

    engine = ThawEngine(model, tok, kv_cache_memory=8 << 20)
    sessions = engine.prefill_many(random_prompts(lengths, model.config.vocab_size, seed=4))
    engine.generate(sessions, GREEDY)
    assert engine.scheduler.allocate_decode(sessions, [s.num_computed for s in sessions]) is not None
    return engine.runner, pack([Chunk(s, 1) for s in sessions], engine.block_size)


def test_lm_head_written_into_a_buffer_gives_the_forwards_exact_logits(tiny):
    """``run_model_into`` (decoder, then the head's GEMM into the graphs' shared buffer) equals ``run_model``
    bit for bit on a decode step; a head with a hook is not run on its own (its hook would be skipped)."""
    from thaw_rl.engine.model_runner import plain_lm_head

    model, tok = tiny
    runner, batch = _decode_step(model, tok, [5, 17, 40])
    assert runner.direct_lm_head and runner.lm_head is model.lm_head
    with runner.grad_off():
        expected = runner.run_model(batch.input_ids, batch.positions, runner.metadata(batch), 0)
        out = torch.full_like(expected, float("nan"))
        runner.run_model_into(batch.input_ids, batch.positions, runner.metadata(batch), out)
    assert torch.equal(out, expected)
    handle = model.lm_head.register_forward_hook(lambda *a: None)
    try:
        assert plain_lm_head(model) is None
    finally:
        handle.remove()


def test_the_direct_lm_head_is_kept_only_with_the_forwards_dtype_and_bits(tiny):
    """Before the first capture the graphs ask ``settle_direct_lm_head``: a plain model keeps the direct head;
    one whose forward is wrapped in autocast + convert_outputs_to_fp32 (TRL's bf16=True through accelerate) returns
    fp32 logits where its head computes bf16, so the head is not run into the fp32 buffer (that failed every
    capture on the GPU and left training decoding eagerly) and the buffer is left to the forward's copy."""
    from accelerate.utils import convert_outputs_to_fp32

    def settle(model, tok):
        runner, batch = _decode_step(model, tok, [5, 17])
        with runner.grad_off():
            meta = runner.metadata(batch)
            forward = runner.run_model(batch.input_ids, batch.positions, meta, 0)
            out = torch.full_like(forward, float("nan"))  # the graphs' buffer takes the forward's dtype
            runner.settle_direct_lm_head(batch.input_ids, batch.positions, meta, forward, out, len(forward))
        return runner.direct_lm_head, forward.dtype, out

    kept, dtype, out = settle(*tiny)
    assert kept and dtype == torch.float32 and not out.isnan().any()  # ran the head into the buffer: same bits
    model, tok = tiny_model_and_tokenizer("qwen2", dtype=torch.bfloat16)
    model.forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16)(model.forward))
    kept, dtype, out = settle(model, tok)
    assert not kept and dtype == torch.float32 and out.isnan().all()  # declined without writing the buffer


class _CaptureFailsGraphs:
    """Stands in for DecodeGraphs whose capture fails (as under DeepSpeed ZeRO-2 on an H100; CPU has no graphs)."""

    capture_error = "AcceleratorError: CUDA error: operation failed due to a previous error during capture"

    def fits(self, num_seqs: int) -> bool:
        return True

    def forward(self, chunks):
        return None

    def forward_decode(self, *tensors, cascade=None):  # the async decode loop's entry (inputs on the device)
        return None


def test_a_failed_graph_capture_falls_back_to_eager_decode_and_says_so(caplog):
    model, tok = tiny_model_and_tokenizer("qwen2")
    engine = ThawEngine(model, tok, kv_cache_memory=16 << 20)
    engine.runner.graphs = _CaptureFailsGraphs()
    prompt = random_prompts([9], model.config.vocab_size, seed=3)[0]
    with caplog.at_level("WARNING"):
        (out,) = engine.generate([engine.prefill(prompt)], GREEDY)
    assert out.token_ids == hf_greedy(model, prompt, GREEDY.max_tokens)
    assert engine.runner.graphs is None and "previous error during capture" in engine.runner.graphs_failed
    assert sum("CUDA graph capture failed" in r.getMessage() for r in caplog.records) == 1


# -- pool size and bookkeeping cost (#20) -------------------------------------------------------------------
def test_an_engine_over_a_million_blocks_builds_in_well_under_a_second(make_tiny_model, tiny_tokenizer):
    """Bookkeeping is O(1) per block touched: no Python object per pool block. The KV tensor itself is
    kept small (1 layer, 1 KV head of head_dim 2, block_size 1: 8 bytes a block in bfloat16)."""
    import time

    model = make_tiny_model("llama", dtype=torch.bfloat16, num_hidden_layers=1, hidden_size=2, num_attention_heads=1,
                            num_key_value_heads=1, intermediate_size=4)
    bytes_per_block = ThawEngine(model, tiny_tokenizer, block_size=1, kv_cache_memory=1 << 10).spec.bytes_per_block
    assert bytes_per_block == 8
    start = time.perf_counter()
    engine = ThawEngine(model, tiny_tokenizer, block_size=1, kv_cache_memory=(10**6 + 1) * bytes_per_block)
    built = time.perf_counter() - start
    assert engine.stats.num_blocks == 10**6
    assert built < 0.5, f"building took {built:.2f} s"  # ~0.03 s unloaded; the old per-block objects took ~6 s
    s = engine.prefill([5, 6, 7])
    engine.generate(engine.fork(s, 3), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    assert engine.stats.num_used_blocks == 3 + 3  # the prompt, shared, plus each child's first sampled token


def test_the_default_cpu_pool_starts_small_and_grows_with_what_a_call_needs(tiny):
    model, tok = tiny
    engine = ThawEngine(model, tok)  # no kv_cache_memory: CPU default
    assert engine.stats.num_blocks == 63  # 64 blocks of which one is the null block, a few hundred KiB
    assert engine.max_num_blocks == (512 << 20) // engine.spec.bytes_per_block - 1
    prompts = random_prompts([30, 31, 29, 33], model.config.vocab_size, seed=9)
    params = SamplingParams(temperature=0.9, max_tokens=200, ignore_eos=True, seed=11)
    sessions = engine.fork(engine.prefill(prompts[0]), 8) + engine.prefill_many(prompts[1:])
    outs = engine.generate(sessions, params)  # needs 11 x 15 blocks: the pool grows before the call
    assert engine.stats.num_blocks >= 8 * 15 and engine.stats.num_preemptions == 0
    roomy = ThawEngine(model, tok, kv_cache_memory=8 << 20)
    again = roomy.generate(roomy.fork(roomy.prefill(prompts[0]), 8) + roomy.prefill_many(prompts[1:]), params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in again]  # growing kept every block's KV


# -- misuse that used to pass silently or fail obscurely (#14 items 6, 8, 10, 11) ------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=float("nan")), "temperature=nan must be a finite number"),
    (dict(temperature=float("inf")), "temperature=inf must be a finite number"),
    (dict(temperature=-0.5), "temperature=-0.5 must be >= 0"),
    (dict(top_p=float("nan")), "top_p=nan must be a finite number"),
    (dict(min_p=float("-inf")), "min_p=-inf must be a finite number"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty=nan"),
    (dict(max_tokens=2.5), "max_tokens=2.5 must be an int"),
    (dict(max_tokens=0), "max_tokens=0 must be >= 1"),
    (dict(top_k=3.0), "top_k=3.0 must be an int"),
    (dict(seed=1.5), "seed=1.5 must be an int"),
    (dict(stop_token_ids=[2.0]), "stop_token_ids holds 2.0"),
])
def test_sampling_params_refuse_non_finite_and_non_integer_values(kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", "\\(")):
        SamplingParams(**kwargs)


def test_token_ids_must_be_a_flat_list_of_ints_and_the_error_says_what_to_pass(tiny):
    model, tok = tiny
    engine = ThawEngine(model, tok, kv_cache_memory=8 << 20)
    fix = 'tokenizer\\(text\\)\\["input_ids"\\]'
    with pytest.raises(ValueError, match=f"holds 1.7 \\(float\\).*{fix}"):
        engine.prefill([1.7, 2.2])
    with pytest.raises(ValueError, match=f"is a string.*{fix}"):
        engine.prefill("hello")
    enc = tok("hello")
    with pytest.raises(ValueError, match=f"is a BatchEncoding.*{fix}"):
        engine.prefill(enc)
    with pytest.raises(ValueError, match="2-D Tensor of shape \\(1, 3\\).*t\\[0\\]"):
        engine.prefill(torch.tensor([[5, 6, 7]]))
    with pytest.raises(ValueError, match="torch.float32 tensor"):
        engine.prefill(torch.tensor([5.0, 6.0]))
    assert engine.stats.num_used_blocks == 0
    s = engine.prefill(torch.tensor(enc["input_ids"]))  # a 1-D tensor of ints is fine
    assert s.token_ids == list(enc["input_ids"])


def test_fork_and_engine_sizes_refuse_bad_numbers_by_name(tiny):
    model, tok = tiny
    engine = ThawEngine(model, tok, kv_cache_memory=8 << 20)
    s = engine.prefill([5, 6, 7])
    for n in (1.5, 0, True, "2"):
        with pytest.raises(ValueError, match="n is the number of children, an int >= 1"):
            engine.fork(s, n)
    with pytest.raises(ValueError, match="max_num_seqs=0 must be an int >= 1"):
        ThawEngine(model, tok, kv_cache_memory=8 << 20, max_num_seqs=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens=-1 must be an int >= 1"):
        ThawEngine(model, tok, kv_cache_memory=8 << 20, max_num_batched_tokens=-1)
    with pytest.raises(ValueError, match="block_size=12 must be a power of two"):
        ThawEngine(model, tok, block_size=12, kv_cache_memory=8 << 20)


def test_a_session_that_cannot_fit_the_pool_fails_before_sampling_and_the_engine_stays_usable(tiny):
    model, tok = tiny
    spec = ThawEngine(model, tok, kv_cache_memory=1 << 20).spec
    engine = ThawEngine(model, tok, kv_cache_memory=5 * spec.bytes_per_block)  # 4 usable blocks = 64 tokens
    prompt = random_prompts([20], model.config.vocab_size, seed=16)[0]
    s = engine.prefill(prompt)
    with pytest.raises(KVCacheExhaustedError, match="needs 5 KV blocks .* holds 4 in all.*Nothing was sampled; "
                                                     "lower max_tokens to 45"):
        engine.generate([s], SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
    assert s.num_tokens == 20 and engine.stats.tokens_generated == 0  # nothing was sampled
    (o,) = engine.generate([s], SamplingParams(temperature=0, max_tokens=45, ignore_eos=True))  # the engine works
    assert o.token_ids == hf_greedy(model, prompt, 45)
    with pytest.raises(KVCacheExhaustedError, match="a prompt of 70 tokens needs 5 KV blocks"):
        engine.prefill(random_prompts([70], model.config.vocab_size)[0])


def test_prompts_that_cannot_fit_together_raise_say_who_holds_the_blocks_and_leave_nothing_held(tiny):
    model, tok = tiny
    spec = ThawEngine(model, tok, kv_cache_memory=1 << 20).spec
    engine = ThawEngine(model, tok, kv_cache_memory=9 * spec.bytes_per_block)  # 8 usable, prompts need 9
    with pytest.raises(KVCacheExhaustedError,
                       match="KV pool exhausted.*6 by other sessions of this call and 0 by sessions outside"):
        engine.prefill_many(random_prompts([30, 31, 29, 33], model.config.vocab_size))
    assert engine.stats.num_used_blocks == 0
    assert len(engine.prefill_many(random_prompts([30, 31], model.config.vocab_size))) == 2


def test_sleep_gives_the_kv_memory_back_and_the_next_call_maps_it_again(tiny):
    model, tok = tiny
    engine = ThawEngine(model, tok, kv_cache_memory=8 << 20)
    prompt = random_prompts([37], model.config.vocab_size, seed=17)[0]
    s = engine.prefill(prompt)
    with pytest.raises(ValueError, match="sleep\\(\\) while sessions hold 3 KV blocks: free every session first"):
        engine.sleep()
    (first,) = engine.generate([s], GREEDY)
    engine.free(s)
    engine.sleep()
    assert engine.is_sleeping and engine.kv_cache.storage is None and engine.stats.num_cached_blocks == 0
    again = engine.prefill(prompt)  # wakes up: a zeroed pool of the same size, nothing stale reused
    assert not engine.is_sleeping and engine.stats.prompt_tokens_reused == 0
    assert engine.generate([again], GREEDY)[0].token_ids == first.token_ids


def test_a_list_of_params_is_used_as_given_and_one_params_derives_per_session_seeds(tiny):
    """The one seed rule (#13): only one SamplingParams for n sessions derives seeds, in params_and_seeds."""
    from thaw_rl.engine.sampling import derive_seed

    model, tok = tiny
    engine = ThawEngine(model, tok, kv_cache_memory=8 << 20)
    parent = engine.prefill(random_prompts([12], model.config.vocab_size, seed=18)[0])
    p = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, seed=7)
    same = [o.token_ids for o in engine.generate(engine.fork(parent, 2), [p, p])]
    assert same[0] == same[1]  # each request's seed as given: not re-derived by its index in the call
    one = [o.token_ids for o in engine.generate(engine.fork(parent, 2), p)]
    assert one[0] != one[1]
    given = [SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, seed=derive_seed(7, i)) for i in (0, 1)]
    assert [o.token_ids for o in engine.generate(engine.fork(parent, 2), given)] == one
    assert derive_seed(7, 1, 2) == derive_seed(derive_seed(7, 1), 2)


def test_per_session_params_equal_what_dataclasses_replace_gives_and_own_their_lists():
    """``params_per_session`` copies without re-validating (``with_seed``): field for field what
    ``dataclasses.replace`` gives, each copy with its own stop list; a bad seed is still refused."""
    import dataclasses

    from thaw_rl.engine.sampling import derive_seed, params_per_session

    p = SamplingParams(temperature=0.7, top_p=0.9, top_k=5, min_p=0.1, repetition_penalty=1.1, max_tokens=9,
                       stop_token_ids=[3, 4], ignore_eos=True, seed=11)
    copies = params_per_session(p, 3)
    assert copies == [dataclasses.replace(p, seed=derive_seed(11, i)) for i in range(3)]
    assert all(type(c) is SamplingParams for c in copies)
    copies[0].stop_token_ids.append(5)
    assert p.stop_token_ids == [3, 4] and copies[1].stop_token_ids == [3, 4]
    with pytest.raises(ValueError, match="seed"):
        p.with_seed(1.5)


def test_derive_seeds_gives_derive_seed_of_every_index():
    """The vectorised derivation (one generate call's 1,024 seeds) equals the per-index rule, for seeds of every
    size and sign: above 32 bits the high bits are kept, above 64 they stay Python ints."""
    from thaw_rl.engine.sampling import derive_seed, derive_seeds

    for seed in (0, 7, 2**32 - 1, 2**32 + 5, 2**63 - 1, 2**70 + 3, -1, -(2**40) - 7):
        assert derive_seeds(seed, 300) == [derive_seed(seed, i) for i in range(300)], seed
    assert derive_seeds(7, 0) == []


def test_one_params_is_shared_by_the_sessions_and_each_gets_its_derived_seed():
    """``params_and_seeds`` (what generate uses) copies nothing: the one params object for every session, and
    the derived seeds beside it; a list keeps each params' own seed; unseeded params leave the seeds to the engine."""
    from thaw_rl.engine.sampling import derive_seed, params_and_seeds, params_per_session

    p = SamplingParams(temperature=0.7, max_tokens=9, seed=11)
    plist, seeds = params_and_seeds(p, 3)
    assert all(q is p for q in plist) and p.seed == 11
    assert seeds == [derive_seed(11, i) for i in range(3)] == [q.seed for q in params_per_session(p, 3)]
    assert params_and_seeds(SamplingParams(), 2)[1] == [None, None]
    given = [SamplingParams(seed=3), SamplingParams()]
    assert params_and_seeds(given, 2) == (given, [3, None])
    with pytest.raises(ValueError, match="got 2 SamplingParams for 3 sessions"):
        params_and_seeds(given, 3)


@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(temperature=0.8), dict(temperature=1, top_k=5),
                                dict(temperature=1.0, top_p=0.9, min_p=0.05), dict(repetition_penalty=1.2)])
def test_a_sampling_batch_of_one_shared_params_equals_one_of_equal_copies(kw):
    """The shared-params fast path (tensors filled, flags looked at once) builds the batch that per-row
    lists build for equal params in distinct objects: same tensors, dtypes and flags; refresh_flags agrees."""
    from thaw_rl.engine.sampling import SamplingBatch, params_per_session

    p = SamplingParams(seed=1, **kw)
    cpu = torch.device("cpu")
    copies = params_per_session(p, 5)
    seeds = [c.seed for c in copies]
    shared = SamplingBatch.build([p] * 5, seeds, [3] * 5, [[1, 2]] * 5, 50, cpu)
    apart = SamplingBatch.build(copies, seeds, [3] * 5, [[1, 2]] * 5, 50, cpu)
    for name in ("temperature", "top_p", "top_k", "min_p", "seeds", "positions"):
        a, b = getattr(shared, name), getattr(apart, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    flags = lambda b: (b.repetition_penalty, b.any_filter, b.all_greedy)
    assert flags(shared) == flags(apart)
    assert flags(apart) == ([p.repetition_penalty] * 5, "top" in str(kw) or "min_p" in kw, p.temperature == 0)
    apart.refresh_flags([p] * 5, 50)
    assert flags(apart) == flags(shared)


def test_flags_of_mixed_params_look_at_every_row():
    """A filter on one non-greedy row turns the filter path on; a filter on a greedy row does not."""
    from thaw_rl.engine.sampling import SamplingBatch

    cpu = torch.device("cpu")
    build = lambda ps: SamplingBatch.build(ps, [0] * len(ps), [1] * len(ps), [[]] * len(ps), 50, cpu)
    plain, greedy_topk = SamplingParams(), SamplingParams(temperature=0.0, top_k=3)
    assert (build([plain, greedy_topk]).any_filter, build([plain, greedy_topk]).all_greedy) == (False, False)
    assert build([plain, SamplingParams(top_p=0.5)]).any_filter
    assert build([greedy_topk, SamplingParams(temperature=0.0)]).all_greedy
    assert not build([plain, SamplingParams(top_k=50)]).any_filter  # top_k >= vocab: off


def test_the_fit_check_names_the_first_session_that_cannot_fit(tiny):
    """generate checks each (length, max_tokens) pair once; the error still names the first session, in call
    order, that could never finish, and nothing is sampled."""
    model, tok = tiny
    spec = ThawEngine(model, tok, kv_cache_memory=1 << 20).spec
    engine = ThawEngine(model, tok, kv_cache_memory=9 * spec.bytes_per_block)  # 8 usable blocks = 128 tokens
    short, long_a, long_b = engine.prefill_many(random_prompts([5, 30, 30], model.config.vocab_size, seed=3))
    with pytest.raises(KVCacheExhaustedError, match=f"session {long_a.session_id} has 30 tokens and max_tokens=100"):
        engine.generate([short, long_a, long_b], SamplingParams(max_tokens=100))
    assert engine.stats.tokens_generated == 0
    with pytest.raises(KVCacheExhaustedError, match=f"session {long_b.session_id} has 30 tokens"):
        engine.generate([short, long_b, long_a], SamplingParams(max_tokens=100))


def test_blocks_held_outside_the_call_count_against_what_a_session_may_use(tiny):
    model, tok = tiny
    spec = ThawEngine(model, tok, kv_cache_memory=1 << 20).spec
    engine = ThawEngine(model, tok, kv_cache_memory=5 * spec.bytes_per_block)  # 4 usable blocks = 64 tokens
    vocab = model.config.vocab_size
    other = engine.prefill(random_prompts([20], vocab, seed=19)[0])  # holds 2 blocks, not part of the call
    s = engine.prefill(random_prompts([10], vocab, seed=20)[0])
    with pytest.raises(KVCacheExhaustedError, match="holds 4 in all of which 2 are held by sessions outside this "
                                                     "call .*lower max_tokens to 23"):
        engine.generate([s], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    assert engine.stats.tokens_generated == 0
    engine.free(other)
    (o,) = engine.generate([s], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    assert len(o.token_ids) == 30
