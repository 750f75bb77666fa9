"""The engine under misuse found by trying it as a new user would: threads sharing a model, sliding windows."""

from __future__ import annotations

import sys
import threading

import pytest
import torch

from thaw_rl import SamplingParams, ThawEngine
from thaw_rl.testing import hf_greedy, tiny_model_and_tokenizer

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def padded_logits(model) -> torch.Tensor:
    """An ordinary left-padded batch forward, as training runs it: (2, 6, V)."""
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


# -- two engines on one model, two threads --------------------------------------------------------------
def test_two_engines_on_one_model_in_two_threads_are_serialized_and_restore_the_model():
    model, tok = tiny_model_and_tokenizer("qwen2")
    reference = padded_logits(model)
    prompts = [[5 + i, 6, 7, 8 + i] for i in range(3)]
    alone = ThawEngine(model, tok, kv_cache_memory=4 << 20)
    expected = [o.token_ids for o in alone.generate(alone.prefill_many(prompts), GREEDY)]
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            engine = ThawEngine(model, tok, kv_cache_memory=4 << 20)
            runs = []
            for _ in range(6):
                sessions = engine.prefill_many(prompts)
                runs.append([o.token_ids for o in engine.generate(sessions, GREEDY)])
                for s in sessions:
                    engine.free(s)
            results[index] = runs
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: without the lock the config swaps interleave every run
    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    assert all(run == expected for runs in results.values() for run in runs)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(padded_logits(model), reference)


# -- sliding windows --------------------------------------------------------------------------------------
def tiny_mistral(sliding_window: int | None):
    from transformers import MistralConfig, MistralForCausalLM

    from thaw_rl.testing import _COMMON_CONFIG, tiny_tokenizer

    config = MistralConfig(**dict(_COMMON_CONFIG, head_dim=16), vocab_size=100, bos_token_id=1, eos_token_id=2,
                           pad_token_id=0, sliding_window=sliding_window, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MistralForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    return model, tiny_tokenizer()


def engine_greedy(model, tok, prompts, n: int, block_size: int = 4) -> list[list[int]]:
    engine = ThawEngine(model, tok, block_size=block_size, kv_cache_memory=4 << 20)
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    return [o.token_ids for o in engine.generate(engine.prefill_many(prompts), params)]


def test_mistral_sliding_window_matches_generate_past_the_window():
    """MistralConfig has sliding_window (4096 by default) and no use_sliding_window flag: the engine reads it.

    Window 8, prompts of 6 and 13 tokens, 40 greedy tokens: almost every token is past the window.
    """
    model, tok = tiny_mistral(sliding_window=8)
    prompts = [[5, 9, 14, 20, 31, 7], [40 + i for i in range(13)]]
    windowed = [hf_greedy(model, p, 40) for p in prompts]
    assert engine_greedy(model, tok, prompts, 40) == windowed
    model.config.sliding_window = None  # the same weights with full attention sample otherwise: the test can fail
    assert [hf_greedy(model, p, 40) for p in prompts] != windowed


def forward_logprobs(model, tokens: list[int], start: int) -> torch.Tensor:
    """log_softmax of tokens[start:] from one plain forward (HF applies the window mask itself)."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float()  # (L, V)
    return torch.log_softmax(logits, dim=-1)[start - 1:-1].gather(-1, torch.tensor(tokens[start:])[:, None])[:, 0]


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_sliding_layers_give_the_logprobs_of_a_plain_forward(family):
    """Qwen2/Qwen3's use_sliding_window / max_window_layers: layers >= max_window_layers slide, layer 0 does not.

    Sampled (T=1) so the tokens are not one repeated id; each logprob must equal the plain forward's, which
    a full-attention engine misses by > 1e-2 past the window.
    """
    model, tok = tiny_model_and_tokenizer(family, use_sliding_window=True, sliding_window=6, max_window_layers=1)
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    full, _ = tiny_model_and_tokenizer(family)  # same weights, no window
    prompt = [5, 9, 14, 20, 31, 7, 8, 9, 10]
    engine = ThawEngine(model, tok, block_size=4, kv_cache_memory=4 << 20)
    (out,) = engine.generate([engine.prefill(prompt)], SamplingParams(temperature=1.0, max_tokens=30, seed=3,
                                                                      ignore_eos=True))
    tokens = prompt + out.token_ids
    expected = forward_logprobs(model, tokens, len(prompt))
    torch.testing.assert_close(torch.tensor(out.logprobs), expected, atol=1e-4, rtol=1e-4)
    assert (forward_logprobs(full, tokens, len(prompt)) - expected).abs().max() > 1e-2


def test_a_plain_forward_in_another_thread_waits_for_the_engine_step():
    """Training forwards racing an engine on the same model: the model's forwards take the engine's lock."""
    model, tok = tiny_model_and_tokenizer("qwen2")
    reference = padded_logits(model)
    engine = ThawEngine(model, tok, kv_cache_memory=4 << 20)
    done = threading.Event()

    def generate() -> None:
        while not done.is_set():
            sessions = engine.prefill_many([[5, 6, 7, 8], [9, 10, 11]])
            engine.generate(sessions, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
            for s in sessions:
                engine.free(s)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # without the forward hooks some of these forwards fail or come out wrong
    thread = threading.Thread(target=generate)
    thread.start()
    try:
        for _ in range(40):
            assert torch.equal(padded_logits(model), reference)
    finally:
        done.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert model.config._attn_implementation == "sdpa"


def test_a_forward_that_bypasses_the_lock_is_refused_not_wrong():
    """The last line: a layer called from another thread during an engine forward raises instead of guessing."""
    from thaw_rl.engine.attention import paged_attention_mode

    model, tok = tiny_model_and_tokenizer("qwen2")
    errors: list[BaseException] = []

    def layer_forward() -> None:  # below the model's forward hooks, as a custom training loop might call it
        hidden = torch.randn(1, 3, model.config.hidden_size)
        position = model.model.rotary_emb(hidden, torch.arange(3)[None])
        try:
            model.model.layers[0](hidden, attention_mask=None, position_embeddings=position)
        except RuntimeError as err:
            errors.append(err)

    with paged_attention_mode(model):
        thread = threading.Thread(target=layer_forward)
        thread.start()
        thread.join()
    assert len(errors) == 1 and "while a ThawEngine forward on it was running in another" in str(errors[0])
    layer_forward()  # the same call outside an engine forward is fine
    assert len(errors) == 1
