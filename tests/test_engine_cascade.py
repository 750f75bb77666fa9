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
    return [(c.token_ids, c.logprobs) for c in out], engine.stats.num_cascade_steps


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
    assert engine.stats.num_cascade_steps > 0  # planned: the rows share 3 blocks
    assert all(o.token_ids == hf_greedy(model, prompt, 24) for o in out)


def test_a_plan_copied_into_static_graph_buffers_is_the_padded_plan():
    """CUDA-graph steps read the plan from static buffers sized for the largest step: ``pad_plan_into`` must lay
    it out as ``CascadePlan.padded`` does (extra rows in no group, extra groups empty) whatever stale values the
    buffers held, and a narrower plan after rows left must overwrite the wider one's entries."""
    from thaw_rl.engine.cuda_graphs import cascade_graph_key, pad_plan_into
    from thaw_rl_kernels.cascade_plan import plan_cascade

    tables = [[1, 2, 3, 10], [1, 2, 3, 11], [1, 2, 3, 12], [5, 6, 20], [5, 6, 21], [8, 30]]
    plan = plan_cascade(tables, [60, 60, 60, 40, 40, 20], block_size=16)  # 3 rows x 3 blocks, 2 rows x 2 blocks
    key = cascade_graph_key(plan, bs=8, width=8)
    assert key == (8, 2, 4, 4)  # bounds rounded up to powers of two: 2 groups, 3 -> 4 rows, 3 -> 4 blocks
    assert cascade_graph_key(plan, bs=8, width=3)[3] == 3  # never more shared blocks than table columns
    stale = lambda n: torch.full((n,), -7, dtype=torch.int32)  # noqa: E731
    buffers = CascadePlan(stale(16), stale(10), stale(9), stale(16), max_group_rows=0, max_shared_blocks=0)
    for current in (plan, plan.select([0, 1, 3, 4, 5], block_size=16)):  # then row 2 left: two groups of 2
        key = cascade_graph_key(current, bs=8, width=8)
        view = pad_plan_into(buffers, current, key)
        ref = current.padded(8, key[1])
        grouped = current.group_rows.shape[0]
        assert torch.equal(view.group_rows[:grouped], ref.group_rows[:grouped])
        for name in ("cu_group_rows", "group_num_blocks", "tail_start"):
            assert torch.equal(getattr(view, name), getattr(ref, name)), name
        assert (view.max_group_rows, view.max_shared_blocks) == key[2:]
    assert key == (8, 2, 2, 4)
    with pytest.raises(ValueError, match="does not fit"):
        pad_plan_into(buffers, plan, (4, 1, 4, 4))


def test_auto_rule_wants_many_rows_sharing_long_prefixes():
    """``"auto"`` cascades a graph step only with >= AUTO_MIN_ROWS rows whose shared tokens, summed over the rows,
    reach AUTO_MIN_SHARED_READS (the H200 receipt's break-even), and never an eager step."""
    from thaw_rl.engine.cascade import AUTO_MIN_ROWS, AUTO_MIN_SHARED_READS, CascadePlanner, worth_cascade
    from thaw_rl_kernels.cascade_plan import plan_cascade

    def grpo_plan(rows, prompt_blocks, group=16):
        tables = [[g * 1000 + b for b in range(prompt_blocks)] + [10**6 + r] for r in range(rows)
                  for g in [r // group]]
        return plan_cascade(tables, [prompt_blocks * 16 + 1] * rows, block_size=16)

    assert AUTO_MIN_SHARED_READS == 1024 * 128 and AUTO_MIN_ROWS == 64
    assert worth_cascade(grpo_plan(1024, 256 // 16))  # 1,024 rows x 256-token prompts: the receipt's 1.07x
    assert worth_cascade(grpo_plan(128, 1024 // 16))  # 128 x 1,024: 1.30x
    assert worth_cascade(grpo_plan(64, 2048 // 16))  # 64 x 2,048: 1.42x
    assert not worth_cascade(grpo_plan(256, 256 // 16))  # 256 x 256: 0.88x
    assert not worth_cascade(grpo_plan(128, 1024 // 16 - 1))  # just under the reads
    assert not worth_cascade(grpo_plan(AUTO_MIN_ROWS - 16, 4096 // 16))  # too few rows, however long the prompt
    planner = CascadePlanner("auto", torch.device("cuda"), block_size=16)  # CUDA's rule; nothing copied here
    assert not planner.wanted(graph_step=False) and planner.wanted(graph_step=True)
    short = grpo_plan(256, 4)  # 16 groups of 16 rows sharing 64 tokens: planned, not worth it
    tables = [[g * 1000 + b for b in range(4)] + [10**6 + r] for r in range(256) for g in [r // 16]]
    assert planner.advance([], 0, tables, [65] * 256, graph_step=True) is None
    assert planner.num_cascade_steps == 0 and short.num_groups == 16
    assert planner.advance([], 0, tables, [65] * 256, graph_step=False) is None  # eager: not even planned
    assert CascadePlanner("auto", torch.device("cpu"), 16).enabled is False


def _graph_generate(model, tok, cascade: str, prompt_lens, group: int, max_tokens: int, block_size: int):
    engine = ThawEngine(model, tok, block_size=block_size, kv_cache_memory=256 << 20, cascade_attention=cascade)
    assert engine.runner.graphs is not None
    prompts = engine.prefill_many(_prompts(prompt_lens, model.config.vocab_size, seed=3))
    rows = [kid for p in prompts for kid in engine.fork(p, group)]
    params = [SamplingParams(temperature=0.0, max_tokens=max_tokens - i % 3, ignore_eos=True) for i in range(len(rows))]
    out = engine.generate(rows, params)
    cascade_graphs = [k for k in engine.runner.graphs.graphs if isinstance(k, tuple)]
    return [(c.token_ids, c.logprobs) for c in out], engine.stats.num_cascade_steps, cascade_graphs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("mode", "prompt_lens", "group", "block_size"), [
    ("on", [13, 9, 30], 4, 4),  # every graph step with a group; rows leave at different steps (plans narrow)
    # 128 rows over ~1,580-token prompts: ~200k shared reads, above the rule's 2^17 until a third of the rows left
    ("auto", [1560, 1600, 1540, 1580, 1550, 1620, 1570, 1590], 16, 16),
])
def test_cuda_graph_steps_with_cascade_equal_plain_graph_steps(mode, prompt_lens, group, block_size):
    """fp32 on CUDA: decode steps replayed from cascade captures (plan in static buffers) give the plain graphs'
    greedy tokens and their logprobs to fp32 noise, and really ran (cascade steps, captures keyed by plan)."""
    model, tok = tiny_model_and_tokenizer("qwen2", max_position_embeddings=2048)
    model = model.cuda()
    off, off_steps, off_graphs = _graph_generate(model, tok, "off", prompt_lens, group, 9, block_size)
    on, on_steps, on_graphs = _graph_generate(model, tok, mode, prompt_lens, group, 9, block_size)
    assert off_steps == 0 and not off_graphs
    assert on_steps >= 6 and on_graphs
    for (tokens_off, lp_off), (tokens_on, lp_on) in zip(off, on):
        assert tokens_on == tokens_off
        torch.testing.assert_close(torch.tensor(lp_on), torch.tensor(lp_off), rtol=0, atol=1e-4)
