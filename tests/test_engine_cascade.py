"""The engine with cascade (shared-prefix) decode attention on and off: the same greedy tokens.

On CPU ``cascade_attention="on"`` runs the torch reference of cascade attention (shared pass + tail pass +
LSE merge) in every eager pure-decode step whose rows share blocks; "off" runs the plain paged reference.
Forked GRPO-style groups (block size 4, so prompts span several shared full blocks, one ending mid-block)
decode greedily both ways; tokens must be identical and logprobs equal to float32 noise.
"""

from __future__ import annotations

import pytest
import torch

from thaw_rl import SamplingParams, ThawEngine
from thaw_rl.testing import tiny_model_and_tokenizer
from thaw_rl_kernels.cascade_plan import CascadePlan


def _prompts(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]


def _generate(model, tok, cascade: str, async_decode: bool = True, **engine_kwargs):
    engine = ThawEngine(model, tok, block_size=4, cascade_attention=cascade, **engine_kwargs)
    engine.async_decode = async_decode
    prompts = engine.prefill_many(_prompts([13, 9, 6], model.config.vocab_size))
    # groups of 4 and 3 over 3 and 2 full shared blocks (prompt 13 ends mid-block) beside a lone row
    rows = engine.fork(prompts[0], 4) + engine.fork(prompts[1], 3) + [prompts[2]]
    # rows finish at different steps: the carried plan is narrowed as they leave
    params = [SamplingParams(temperature=0.0, max_tokens=7 + i % 4, ignore_eos=True) for i in range(len(rows))]
    out = engine.generate(rows, params)
    return [(c.token_ids, c.logprobs) for c in out], engine.runner.cascade.num_cascade_steps


@pytest.mark.parametrize(("family", "async_decode", "max_num_seqs"), [
    ("qwen2", True, None),
    ("llama", False, None),  # the synchronous step loop: a fresh plan each step
    ("qwen2", True, 5),  # rows wait and join as others finish: plans rebuilt on joins, narrowed on leaves
])
def test_greedy_tokens_equal_with_cascade_on_and_off(family, async_decode, max_num_seqs, one_torch_thread,
                                                      monkeypatch):
    model, tok = tiny_model_and_tokenizer(family)
    kwargs = dict(async_decode=async_decode, max_num_seqs=max_num_seqs)
    off, off_steps = _generate(model, tok, "off", **kwargs)
    selects = []
    real_select = CascadePlan.select
    monkeypatch.setattr(CascadePlan, "select", lambda self, *a, **k: selects.append(1) or real_select(self, *a, **k))
    on, on_steps = _generate(model, tok, "on", **kwargs)
    assert off_steps == 0 and on_steps >= 8  # cascade really ran in (nearly) every decode step
    assert bool(selects) == async_decode  # the async loop carries its plan and narrows it as rows leave
    for (tokens_off, lp_off), (tokens_on, lp_on) in zip(off, on):
        assert tokens_on == tokens_off
        torch.testing.assert_close(torch.tensor(lp_on), torch.tensor(lp_off), rtol=0, atol=1e-5)


def test_auto_is_off_on_cpu_and_bad_modes_raise(one_torch_thread):
    model, tok = tiny_model_and_tokenizer("qwen2")
    _, steps = _generate(model, tok, "auto")
    assert steps == 0
    with pytest.raises(ValueError, match="cascade_attention='yes'"):
        ThawEngine(model, tok, cascade_attention="yes")


def test_sliding_window_layers_keep_the_plain_kernel(one_torch_thread):
    """Mistral with a window of 8: every layer slides, so cascade (which ignores windows) must stay out of every
    layer; the forked rows still decode exactly model.generate's windowed greedy tokens with cascade on."""
    from test_engine_reliability import hf_greedy, tiny_mistral

    model, tok = tiny_mistral(sliding_window=8)
    prompt = [40 + i for i in range(13)]
    engine = ThawEngine(model, tok, block_size=4, kv_cache_memory=4 << 20, cascade_attention="on")
    rows = engine.fork(engine.prefill(prompt), 3)
    out = engine.generate(rows, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    assert engine.runner.cascade.num_cascade_steps > 0  # planned: the rows share 3 blocks
    assert all(o.token_ids == hf_greedy(model, prompt, 24) for o in out)
