"""ThawEngine(kv_cache_dtype="fp8"): the engine decodes exactly as the model would with its keys and values
rounded to float8_e4m3fn, forks and snapshots stay exact within such an engine, and bad input is named.

The reference is the plain HF forward with one change: attention sees every key and value rounded to FP8 the
way the cache stores them (``to_cache_dtype``, saturated to +-448) and widened back, through an attention
function registered with transformers for these tests. So "logprobs match a plain forward" still holds, for
the model the FP8 cache actually computes.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from thaw_rl import KVSnapshot, SamplingParams, ThawEngine
from thaw_rl.snapshot import SnapshotMismatchError
from thaw_rl.testing import random_prompts, tiny_model_and_tokenizer
from thaw_rl_kernels.kv_write import FP8_DTYPE, to_cache_dtype

GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
FP8_SDPA = "sdpa_fp8_kv_reference"


def _sdpa_over_fp8_kv(module, query, key, value, attention_mask, **kwargs):
    """SDPA over keys and values rounded as an FP8 cache stores them."""
    key = to_cache_dtype(key, FP8_DTYPE).to(key.dtype)
    value = to_cache_dtype(value, FP8_DTYPE).to(value.dtype)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(FP8_SDPA, _sdpa_over_fp8_kv)


@contextlib.contextmanager
def fp8_attention(model):
    """The model's attention reads FP8-rounded K/V (``_sdpa_over_fp8_kv``) inside the block, its own after."""
    previous = model.config._attn_implementation
    model.config._attn_implementation = FP8_SDPA
    try:
        with torch.no_grad():
            yield
    finally:
        model.config._attn_implementation = previous


def fp8_reference_logits(model, tokens: list[int]) -> torch.Tensor:
    """(L, V) float32 logits on the CPU of one forward over ``tokens`` whose attention reads FP8-rounded K/V."""
    with fp8_attention(model):
        return model(torch.tensor([tokens], device=model.device)).logits[0].float().cpu()


def fp8_reference_logprobs(model, tokens: list[int], start: int, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / T) of tokens[start:] from one forward whose attention reads FP8-rounded K/V."""
    lp = torch.log_softmax(fp8_reference_logits(model, tokens) / temperature, dim=-1)[start - 1:-1]
    return lp.gather(-1, torch.tensor(tokens[start:])[:, None])[:, 0]


def fp8_reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    with fp8_attention(model):
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens], device=model.device)).logits[0, -1].argmax()))
    return tokens[len(prompt):]


@pytest.fixture(params=["llama", "qwen2", "qwen3"])
def tiny(request):
    return tiny_model_and_tokenizer(request.param)


def test_fp8_engine_decodes_as_the_model_over_fp8_rounded_kv(tiny):
    """Greedy tokens and sampled logprobs equal the FP8-KV reference forward; the cache really holds FP8."""
    model, tok = tiny
    engine = ThawEngine(model, tok, kv_cache_memory=8 << 20, kv_cache_dtype="fp8")
    assert engine.kv_cache.kv.dtype == torch.float8_e4m3fn and engine.fingerprint["dtype"] == "float8_e4m3fn"
    prompts = random_prompts([3, 17, 40], model.config.vocab_size, seed=5)
    outs = engine.generate(engine.prefill_many(prompts), GREEDY)
    for p, o in zip(prompts, outs):
        assert o.token_ids == fp8_reference_greedy(model, p, GREEDY.max_tokens)
        torch.testing.assert_close(torch.tensor(o.logprobs), fp8_reference_logprobs(model, p + o.token_ids, len(p)),
                                   atol=1e-4, rtol=0)
    params = SamplingParams(temperature=0.7, top_k=20, max_tokens=16, ignore_eos=True, seed=3)
    outs = engine.generate(engine.prefill_many(prompts), params)
    for p, o in zip(prompts, outs):
        ref = fp8_reference_logprobs(model, p + o.token_ids, len(p), temperature=0.7)
        torch.testing.assert_close(torch.tensor(o.logprobs), ref, atol=1e-4, rtol=0)


def test_fp8_rounding_moves_logprobs_a_little_from_the_exact_cache(tiny):
    """The FP8 cache is a different computation (else the reference test above could not tell them apart),
    and a close one: the same teacher-forced tokens score within a few hundredths of a nat."""
    model, tok = tiny
    prompt = random_prompts([40], model.config.vocab_size, seed=6)[0]
    exact = ThawEngine(model, tok, kv_cache_memory=8 << 20)
    (o,) = exact.generate([exact.prefill(prompt)], GREEDY)
    tokens = prompt + o.token_ids
    fp8 = fp8_reference_logprobs(model, tokens, len(prompt))
    assert not torch.allclose(fp8, torch.tensor(o.logprobs), atol=1e-5, rtol=0)
    assert (fp8 - torch.tensor(o.logprobs)).abs().max() < 0.1


def test_fp8_fork_children_continue_exactly_as_the_parent_alone(tiny):
    model, tok = tiny
    prompt = random_prompts([37], model.config.vocab_size, seed=2)[0]  # 2 full blocks + 5 tokens
    alone = ThawEngine(model, tok, kv_cache_memory=8 << 20, kv_cache_dtype="fp8")
    (ref,) = alone.generate([alone.prefill(prompt)], GREEDY)
    engine = ThawEngine(model, tok, kv_cache_memory=8 << 20, kv_cache_dtype="fp8")
    for o in engine.generate(engine.fork(engine.prefill(prompt), 3), GREEDY):
        assert o.token_ids == ref.token_ids
        assert o.logprobs == pytest.approx(ref.logprobs, abs=1e-5)


def test_fp8_cache_holds_twice_the_tokens_of_a_bf16_cache_in_the_same_memory():
    model, tok = tiny_model_and_tokenizer("qwen2", dtype=torch.bfloat16)
    bf16 = ThawEngine(model, tok, kv_cache_memory=4 << 20)
    fp8 = ThawEngine(model, tok, kv_cache_memory=4 << 20, kv_cache_dtype="fp8")
    assert bf16.spec.dtype == torch.bfloat16 and fp8.spec.bytes_per_block * 2 == bf16.spec.bytes_per_block
    pool_blocks = lambda e: e.stats.num_blocks + 1  # noqa: E731 (stats leave out the null block)
    assert pool_blocks(fp8) == (4 << 20) // fp8.spec.bytes_per_block >= 2 * pool_blocks(bf16)


def test_fp8_snapshot_restores_into_an_fp8_engine_and_is_refused_by_an_exact_one(tiny, tmp_path):
    model, tok = tiny
    prompt = random_prompts([37], model.config.vocab_size, seed=7)[0]
    source = ThawEngine(model, tok, kv_cache_memory=8 << 20, kv_cache_dtype="fp8")
    trunk = source.prefill(prompt)
    (ref,) = source.generate(source.fork(trunk, 1), GREEDY)
    path = tmp_path / "fp8.kvsnap"
    source.snapshot(trunk).save(path)
    loaded = KVSnapshot.load(path)
    assert loaded.kv.dtype == torch.float8_e4m3fn
    target = ThawEngine(model, tok, kv_cache_memory=8 << 20, kv_cache_dtype="fp8")
    (o,) = target.generate([target.restore(loaded)], GREEDY)
    assert o.token_ids == ref.token_ids and o.logprobs == pytest.approx(ref.logprobs, abs=1e-6)
    exact = ThawEngine(model, tok, kv_cache_memory=8 << 20)
    with pytest.raises(SnapshotMismatchError, match="kv_cache_dtype='fp8'") as err:
        exact.restore(loaded)
    assert err.value.field == "dtype" and err.value.snapshot_value == "float8_e4m3fn"
    with pytest.raises(SnapshotMismatchError, match="kv_cache_dtype='auto'"):
        target.restore(exact.snapshot(exact.prefill(prompt)))


def test_unknown_kv_cache_dtype_is_named_with_the_choices(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match=r"kv_cache_dtype='int8' must be one of \('auto', 'fp8', 'fp8_e4m3'\)"):
        ThawEngine(model, tok, kv_cache_memory=8 << 20, kv_cache_dtype="int8")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cascade", ["off", "on"])
def test_fp8_engine_on_cuda_graphs_decodes_as_the_model_over_fp8_rounded_kv(cascade):
    """fp32 on CUDA with graphs (and cascade): the Triton write, plain and cascade kernels over the FP8 cache give
    the FP8-KV reference forward's greedy tokens and logprobs."""
    model, tok = tiny_model_and_tokenizer("qwen2")
    model = model.cuda()
    engine = ThawEngine(model, tok, kv_cache_memory=64 << 20, kv_cache_dtype="fp8", cascade_attention=cascade)
    prompt = random_prompts([37], model.config.vocab_size, seed=9)[0]
    parent = engine.prefill(prompt)
    outs = engine.generate(engine.fork(parent, 8), GREEDY)  # 8 rows sharing 2 full blocks: a cascade group
    if cascade == "on":
        assert engine.stats.num_cascade_steps > 0
    tokens = prompt + outs[0].token_ids
    ref_tokens = fp8_reference_logits(model, tokens)[len(prompt) - 1:-1].argmax(-1).tolist()
    ref_lp = fp8_reference_logprobs(model, tokens, len(prompt))
    for o in outs:
        assert o.token_ids == ref_tokens == outs[0].token_ids
        torch.testing.assert_close(torch.tensor(o.logprobs), ref_lp, atol=1e-3, rtol=0)
