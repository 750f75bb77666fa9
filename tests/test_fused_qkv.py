"""Fused q/k/v projections (engine/fused_qkv.py): the engine's own forwards run one GEMM per layer from a copy
of the weights that follows every weight change, and the model keeps its own modules for everything else."""

from __future__ import annotations

import pytest
import torch

from thaw_rl import SamplingParams, ThawEngine
from thaw_rl.engine.fused_qkv import FusedQKV
from thaw_rl.testing import hf_greedy, random_prompts, tiny_model_and_tokenizer

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
SAMPLED = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, seed=7)


def prompts_for(model, lengths=(3, 17, 40), seed=0):
    return random_prompts(lengths, model.config.vocab_size, seed)


def run(engine, prompts, params):
    outs = engine.generate(engine.prefill_many(prompts), params)
    result = [(o.token_ids, o.logprobs) for o in outs]
    for o in outs:
        engine.free(o.session)
    return result


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_fused_engine_matches_generate_and_the_unfused_engine(family):
    """Greedy equals model.generate; sampled tokens and logprobs equal the unfused engine's (fp32, CPU); every
    layer is fused (Qwen2's q/k/v biases and Qwen3's q/k norms included), and the model's modules come back."""
    model, tok = tiny_model_and_tokenizer(family)
    fused = ThawEngine(model, tok, kv_cache_memory=8 << 20, fuse_qkv=True)
    assert fused.runner.fused_qkv.num_layers == model.config.num_hidden_layers
    prompts = prompts_for(model)
    for p, (tokens, _) in zip(prompts, run(fused, prompts, GREEDY)):
        assert tokens == hf_greedy(model, p, GREEDY.max_tokens)
    plain = ThawEngine(model, tok, kv_cache_memory=8 << 20, fuse_qkv=False)
    assert plain.runner.fused_qkv is None
    for (ft, fl), (pt, pl) in zip(run(fused, prompts, SAMPLED), run(plain, prompts, SAMPLED)):
        assert ft == pt
        torch.testing.assert_close(torch.tensor(fl), torch.tensor(pl), atol=1e-5, rtol=0)
    attn = model.model.layers[0].self_attn
    assert all(type(getattr(attn, n)) is torch.nn.Linear for n in ("q_proj", "k_proj", "v_proj"))
    assert not any("shared" in k for k in model.state_dict())


def test_weight_changes_after_construction_reach_the_fused_copy():
    """An optimizer step, a ``.data`` copy (which bumps no version counter) and a replaced Parameter each change
    what the fused engine computes exactly as they change a fresh unfused engine's output: no stale copy."""
    model, tok = tiny_model_and_tokenizer("qwen2", seed=1)
    engine = ThawEngine(model, tok, kv_cache_memory=8 << 20, fuse_qkv=True)
    prompts = prompts_for(model, (9, 23), seed=2)
    before = run(engine, prompts, GREEDY)
    attn = model.model.layers[1].self_attn

    def check():
        engine.reset_prefix_cache()
        fresh = ThawEngine(model, tok, kv_cache_memory=8 << 20, fuse_qkv=False)
        expected = run(fresh, prompts, GREEDY)
        got = run(engine, prompts, GREEDY)
        assert [t for t, _ in got] == [t for t, _ in expected]
        for (_, a), (_, b) in zip(got, expected):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
        return got

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with torch.enable_grad():
        model(torch.tensor([prompts[0]]), labels=torch.tensor([prompts[0]])).loss.backward()
    opt.step()
    after_step = check()
    assert after_step != before  # the step changed the output, so the check above compared something
    with torch.no_grad():
        attn.k_proj.weight.data.copy_(torch.randn_like(attn.k_proj.weight) * 0.5)
        attn.v_proj.bias.data.copy_(torch.randn_like(attn.v_proj.bias))
    assert check() != after_step
    attn.q_proj.weight = torch.nn.Parameter(torch.randn_like(attn.q_proj.weight) * 0.5)
    check()


def test_projections_that_do_not_qualify_are_left_alone():
    """A hooked projection (as PEFT or DeepSpeed would have), a wrapped one, or mismatched biases keep that layer
    on the model's own three GEMMs; the other layers fuse, and the output is unchanged."""
    model, tok = tiny_model_and_tokenizer("llama", seed=2, num_hidden_layers=3)
    calls = []
    model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda m, a, o: calls.append(1))

    class Wrapped(torch.nn.Module):  # e.g. a LoRA layer around the base projection
        def __init__(self, base):
            super().__init__()
            self.base = base

        def forward(self, x):
            return self.base(x)

    attn1 = model.model.layers[1].self_attn
    attn1.v_proj = Wrapped(attn1.v_proj)
    assert FusedQKV(model).num_layers == 1
    engine = ThawEngine(model, tok, kv_cache_memory=8 << 20, fuse_qkv=True)
    prompts = prompts_for(model, (5, 12), seed=3)
    for p, (tokens, _) in zip(prompts, run(engine, prompts, GREEDY)):
        assert tokens == hf_greedy(model, p, GREEDY.max_tokens)
    assert calls  # the hooked projection ran as itself inside the engine
    bare, _ = tiny_model_and_tokenizer("llama", seed=2, num_hidden_layers=3)
    bare.model.layers[0].self_attn.q_proj.bias = torch.nn.Parameter(torch.zeros(bare.config.hidden_size))
    assert FusedQKV(bare).num_layers == 2  # q with a bias, k and v without: not one GEMM


def test_rebuilt_buffers_are_reported_so_graphs_are_dropped():
    """Parameters that change dtype get new buffers, and refresh() says so (the engine then drops CUDA graphs,
    which captured the old buffers' addresses); a plain refresh keeps them."""
    model, _ = tiny_model_and_tokenizer("qwen3")
    fused = FusedQKV(model)
    weight = fused.layers[0][1].weight
    assert fused.refresh() is False and fused.layers[0][1].weight is weight
    assert fused.nbytes == sum(p.numel() * 4 for n, p in model.named_parameters()
                               if any(k in n for k in ("q_proj", "k_proj", "v_proj")))
    model.to(torch.float64)
    assert fused.refresh() is True and fused.layers[0][1].weight.dtype == torch.float64
    x = torch.randn(3, model.config.hidden_size, dtype=torch.float64)
    attn = model.model.layers[0].self_attn
    shared, stand_ins = fused.layers[0][1], fused.layers[0][2]
    got = [stand_ins[i](x) for i in (2, 0, 1)]  # any call order
    torch.testing.assert_close(got[1], attn.q_proj(x))
    torch.testing.assert_close(got[2], attn.k_proj(x))
    torch.testing.assert_close(got[0], attn.v_proj(x))
    assert shared.outputs is None  # all three taken: the next forward computes afresh


@pytest.mark.slow
def test_fused_projections_compile_with_the_layers():
    """compile_layers traces the stand-in projections (their shared GEMM's state is Python attributes) in one
    graph per layer, the attention hook the only break, and greedy output still equals model.generate."""
    import torch._dynamo

    model, tok = tiny_model_and_tokenizer("qwen2", seed=4)
    torch._dynamo.utils.counters.clear()
    engine = ThawEngine(model, tok, kv_cache_memory=8 << 20, fuse_qkv=True, compile_layers=True)
    prompts = prompts_for(model, (5, 3), seed=5)
    for p, (tokens, _) in zip(prompts, run(engine, prompts, GREEDY)):
        assert tokens == hf_greedy(model, p, GREEDY.max_tokens)
    breaks = torch._dynamo.utils.counters["graph_break"]
    assert breaks and all("thaw_paged_attention" in reason for reason in breaks), dict(breaks)
