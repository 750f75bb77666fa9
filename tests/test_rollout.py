"""TreeSampler on the native backend: trees against from-scratch generation, exact token accounting
against the engine's counters and a real flat sampler, seeds, early stops, entropy branching, bad specs."""

from __future__ import annotations

import math

import pytest
import torch

from thaw_rl import NativeBackend, SamplingParams, ThawEngine, TreeSampler, TreeSpec
from thaw_rl.backends import COUNTER_KEYS, RolloutBackend
from thaw_rl.testing import hf_greedy, random_prompts, tiny_model_and_tokenizer


def forward_logprobs_and_entropies(model, prompt: list[int], completion: list[int], temperature: float = 1.0):
    """log_softmax(logits / T) of each completion token, and the entropy there, from one plain forward."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].float()  # (L, V)
    lp = torch.log_softmax(logits / temperature, dim=-1)[len(prompt) - 1:-1]  # (C, V)
    entropy = -(lp.exp() * lp).sum(-1)  # (C,)
    return lp.gather(-1, torch.tensor(completion)[:, None])[:, 0], entropy


def assert_shared_segments_identical(batch) -> None:
    """Every leaf below a node holds the very same tokens, logprobs and entropies in the node's span."""
    for node in batch.nodes.values():
        below = [batch.leaves[i] for i in batch.leaves_under(node.node_id)]
        s, e = node.start, node.end
        for leaf in below[1:]:
            assert leaf.completion_ids[s:e] == below[0].completion_ids[s:e]
            assert leaf.logprobs[s:e] == below[0].logprobs[s:e]  # exact: sampled once, shared
            assert leaf.entropies[s:e] == below[0].entropies[s:e]


def assert_spans_tile_the_completion(batch) -> None:
    for leaf in batch.leaves:
        assert leaf.spans[0] == (0, 0)
        assert all(a[1] == b[0] for a, b in zip(leaf.spans, leaf.spans[1:]))
        assert leaf.spans[-1][1] == len(leaf.completion_ids)
        assert [batch.span(n) for n in leaf.node_ids] == leaf.spans


class CountingBackend:
    """Wraps a backend, counts calls, and can fail the n-th generate (to test cleanup)."""

    def __init__(self, inner, fail_on_generate: int | None = None):
        self.inner, self.fail_on_generate = inner, fail_on_generate
        self.calls = {"prefill": 0, "fork": 0, "generate": 0, "free": 0}
        self.kv_bytes_per_token = inner.kv_bytes_per_token

    def prefill(self, prompts):
        self.calls["prefill"] += 1
        return self.inner.prefill(prompts)

    def fork(self, handle, n, at=None):
        self.calls["fork"] += 1
        return self.inner.fork(handle, n, at=at)

    def generate(self, handles, params):
        self.calls["generate"] += 1
        if self.calls["generate"] == self.fail_on_generate:
            raise RuntimeError("injected failure")
        return self.inner.generate(handles, params)

    def free(self, handle):
        self.calls["free"] += 1
        self.inner.free(handle)

    def counters(self):
        return self.inner.counters()

    def update_weights(self, state_dict=None):
        self.inner.update_weights(state_dict)

    def reset_prefix_cache(self):
        self.inner.reset_prefix_cache()


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def qwen2():
    """Tiny Qwen2 with initializer_range 0.2: greedy paths that do not repeat one token (the default
    0.02 init gives near-uniform logits whose argmax loops), entropies around 3.5 nats."""
    return tiny_model_and_tokenizer("qwen2", initializer_range=0.2)


def backend_for(model_tok) -> NativeBackend:
    model, tok = model_tok
    return NativeBackend(model, tok, kv_cache_memory=8 << 20)


# -- the tree is the same text as generating each path from scratch --------------------------------
def test_greedy_segments_tree_equals_generate_from_scratch_and_shares_segments(qwen2):
    model, _ = qwen2
    backend = backend_for(qwen2)
    prompts = random_prompts([21, 37], model.config.vocab_size)  # 37 = 2 full blocks + a partial one
    params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    batch = TreeSampler(backend, TreeSpec.segments([2, 2], segment_tokens=5)).rollout(prompts, params)

    assert batch.num_leaves_per_prompt == [4, 4]
    assert [leaf.prompt_index for leaf in batch.leaves] == [0, 0, 0, 0, 1, 1, 1, 1]
    for leaf in batch.leaves:
        assert leaf.prompt_ids == prompts[leaf.prompt_index]
        assert leaf.completion_ids == hf_greedy(model, leaf.prompt_ids, 14)
        assert leaf.finish_reason == "length"
        assert leaf.spans == [(0, 0), (0, 5), (5, 14)]
        assert leaf.segment_starts == [0, 5]
        ref, _ = forward_logprobs_and_entropies(model, leaf.prompt_ids, leaf.completion_ids)
        torch.testing.assert_close(torch.tensor(leaf.logprobs), ref, atol=1e-4, rtol=0)
    # the tree: 2 roots, 2 x 2 level-1 nodes, 2 x 4 leaves; ids unique; leaves in depth-first order
    assert len(batch.nodes) == 2 + 4 + 8 and batch.stats.num_nodes == 12
    assert all(batch.parent(root) is None for root in batch.roots)
    level1 = [leaf.node_ids[1] for leaf in batch.leaves]
    assert level1[0] == level1[1] != level1[2] == level1[3] != level1[4] == level1[5] != level1[6] == level1[7]
    assert [leaf.node_ids[0] for leaf in batch.leaves] == [batch.roots[0]] * 4 + [batch.roots[1]] * 4
    assert len({leaf.node_id for leaf in batch.leaves}) == 8
    assert_shared_segments_identical(batch)
    assert_spans_tile_the_completion(batch)
    assert backend.engine.stats.num_used_blocks == 0  # every session freed


def test_smollm2_greedy_tree_equals_generate_with_eos(smollm2):
    model, tok = smollm2
    backend = NativeBackend(model, tok, kv_cache_memory=32 << 20)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                     tokenize=True)
    prompt = prompt if isinstance(prompt, list) else prompt["input_ids"]
    params = SamplingParams(temperature=0.0, max_tokens=16)
    batch = TreeSampler(backend, TreeSpec.segments([2, 2], segment_tokens=4)).rollout([prompt], params)
    ref = hf_greedy(model, prompt, 16, eos=tok.eos_token_id)
    assert 4 < len(ref) < 16 and ref[-1] == tok.eos_token_id  # the answer ends inside the last level
    assert len(batch) == 4
    for leaf in batch:
        assert leaf.completion_ids == ref and leaf.finish_reason == "stop"
        lp, _ = forward_logprobs_and_entropies(model, prompt, leaf.completion_ids)
        torch.testing.assert_close(torch.tensor(leaf.logprobs), lp, atol=1e-4, rtol=0)
    assert backend.engine.stats.num_used_blocks == 0


# -- seeds -------------------------------------------------------------------------------------------
def test_sampled_tree_siblings_differ_and_a_rerun_reproduces_exactly(qwen2):
    model, _ = qwen2
    prompts = random_prompts([9, 30], model.config.vocab_size, seed=1)
    spec = TreeSpec.segments([2, 3], segment_tokens=4)
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, seed=7)
    a = TreeSampler(backend_for(qwen2), spec).rollout(prompts, params)
    b = TreeSampler(backend_for(qwen2), spec).rollout(prompts, params)
    c = TreeSampler(backend_for(qwen2), spec).rollout(prompts, SamplingParams(
        temperature=1.0, max_tokens=12, ignore_eos=True, seed=8))
    key = lambda batch: [(leaf.node_ids, leaf.completion_ids, leaf.logprobs) for leaf in batch]  # noqa: E731
    assert key(a) == key(b)
    assert [leaf.completion_ids for leaf in c] != [leaf.completion_ids for leaf in a]
    # siblings differ in their own segment (odds of a collision ~ 60^-4 per pair on a near-uniform model)
    for p in range(2):
        leaves = [leaf for leaf in a if leaf.prompt_index == p]
        trunks = {tuple(leaf.completion_ids[:4]) for leaf in leaves}
        tails = {tuple(leaf.completion_ids[4:]) for leaf in leaves}
        assert len(trunks) == 2 and len(tails) == 6
    assert_shared_segments_identical(a)


def test_grpo_is_a_one_level_tree_and_best_of_n_returns_all_n(qwen2):
    model, _ = qwen2
    prompts = random_prompts([11, 5], model.config.vocab_size, seed=2)
    params = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, seed=3)
    grpo = TreeSampler(backend_for(qwen2), TreeSpec.grpo(3)).rollout(prompts, params)
    flat = TreeSampler(backend_for(qwen2), TreeSpec.segments([3])).rollout(prompts, params)
    best = TreeSampler(backend_for(qwen2), TreeSpec.best_of_n(3, keep=1)).rollout(prompts, params)
    assert [leaf.completion_ids for leaf in grpo] == [leaf.completion_ids for leaf in flat]
    assert [leaf.completion_ids for leaf in best] == [leaf.completion_ids for leaf in grpo]
    assert grpo.num_leaves_per_prompt == [3, 3] and TreeSpec.best_of_n(3, keep=1).keep == 1
    assert all(len(leaf.node_ids) == 2 for leaf in grpo)


def test_a_bare_engine_is_wrapped_and_the_samples_equal_the_wrapped_ones(qwen2):
    """The README's engine section gives a ThawEngine; TreeSampler(engine, spec) wraps it in NativeBackend."""
    model, tok = qwen2
    prompts = random_prompts([7, 9], model.config.vocab_size, seed=4)
    params = SamplingParams(temperature=1.0, max_tokens=5, ignore_eos=True, seed=1)
    engine = ThawEngine(model, tok, kv_cache_memory=8 << 20)
    sampler = TreeSampler(engine, TreeSpec.grpo(2))
    assert isinstance(sampler.backend, NativeBackend) and sampler.backend.engine is engine
    bare = sampler.rollout(prompts, params)
    wrapped = TreeSampler(backend_for(qwen2), TreeSpec.grpo(2)).rollout(prompts, params)
    assert [leaf.completion_ids for leaf in bare] == [leaf.completion_ids for leaf in wrapped]
    assert bare.stats.prefill_tokens == 16 and engine.stats.num_used_blocks == 0  # every session freed


def test_something_that_is_no_backend_is_a_type_error_naming_what_to_pass(qwen2):
    model, _ = qwen2
    with pytest.raises(TypeError, match=r"NativeBackend\(engine=...\).*got Qwen2ForCausalLM, which has no prefill"):
        TreeSampler(model, TreeSpec.grpo(2))


# -- batching and cleanup ----------------------------------------------------------------------------
def test_one_prefill_and_one_generate_per_level_for_all_prompts(qwen2):
    model, _ = qwen2
    backend = CountingBackend(backend_for(qwen2))
    assert isinstance(backend.inner, RolloutBackend)
    prompts = random_prompts([7, 19, 33], model.config.vocab_size, seed=3)
    TreeSampler(backend, TreeSpec.segments([2, 2, 2], segment_tokens=2)).rollout(
        prompts, SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True))
    assert backend.calls["prefill"] == 1 and backend.calls["generate"] == 3
    assert backend.calls["fork"] == 3 * (1 + 2 + 4)  # one fork per prompt root and per inner node
    # freed: 3 roots + 3 x 2 + 3 x 4 inner sessions + 3 x 8 leaves
    assert backend.calls["free"] == 3 + 6 + 12 + 24


def test_a_failing_generate_frees_every_session(qwen2):
    model, _ = qwen2
    inner = backend_for(qwen2)
    backend = CountingBackend(inner, fail_on_generate=2)
    with pytest.raises(RuntimeError, match="injected failure"):
        TreeSampler(backend, TreeSpec.segments([3, 2], segment_tokens=3)).rollout(
            random_prompts([10, 20], model.config.vocab_size), SamplingParams(max_tokens=8, seed=0))
    assert inner.engine.stats.num_used_blocks == 0


def test_update_weights_drops_the_prefix_cache(qwen2):
    model, _ = qwen2
    backend = backend_for(qwen2)
    TreeSampler(backend, TreeSpec.grpo(2)).rollout(random_prompts([40], model.config.vocab_size),
                                                   SamplingParams(max_tokens=4, seed=0))
    assert backend.engine.stats.num_cached_blocks > 0
    backend.update_weights()
    assert backend.engine.stats.num_cached_blocks == 0
    assert set(backend.counters()) == set(COUNTER_KEYS)


# -- token accounting ----------------------------------------------------------------------------------
def analytic_decode_tokens(branching: list[int], segment_tokens: int, max_tokens: int) -> int:
    """Decode tokens the engine computes for one prompt's tree (no early stops).

    A node that samples s tokens feeds s - 1 of them back (the last sampled token is never computed
    unless something decodes after it). A first-level node starts from the prompt's logits, which the
    prefill computed and the fork shares. A deeper node's parent ended on such an uncomputed token:
    each child computes it again (a fork copies KV, not the logits of a token that has no KV yet),
    so it computes 1 + (s - 1) = s tokens.
    """
    d = len(branching)
    lengths = [segment_tokens] * (d - 1) + [max_tokens - segment_tokens * (d - 1)]
    total, nodes = 0, 1
    for level, (b, s) in enumerate(zip(branching, lengths)):
        nodes *= b
        total += nodes * (s - 1 if level == 0 else s)
    return total


def flat_baseline_counters(model, tok, batch) -> dict[str, int]:
    """Really run a flat sampler: each leaf prefilled on its own (prefix cache defeated), then decoded."""
    engine = ThawEngine(model, tok, kv_cache_memory=8 << 20)
    for leaf in batch.leaves:
        engine.reset_prefix_cache()
        (out,) = engine.generate([engine.prefill(leaf.prompt_ids)], SamplingParams(
            temperature=0.0, max_tokens=len(leaf.completion_ids), ignore_eos=True))
        assert len(out.token_ids) == len(leaf.completion_ids)
        engine.free(out.session)
    st = engine.stats
    assert st.prompt_tokens_reused == 0
    return {"prefill": st.prompt_tokens_computed, "decode": st.tokens_computed - st.prompt_tokens_computed}


@pytest.mark.parametrize("branching, segment_tokens", [([4], None), ([4, 2, 2], 3), ([2, 3], 4)])
def test_computed_tokens_equal_the_analytic_count_and_flat_equals_a_real_flat_run(qwen2, branching, segment_tokens):
    model, tok = qwen2
    backend = backend_for(qwen2)
    prompts = random_prompts([21, 37], model.config.vocab_size, seed=4)
    spec = TreeSpec.grpo(4) if segment_tokens is None else TreeSpec.segments(branching, segment_tokens)
    params = SamplingParams(temperature=1.0, max_tokens=11, ignore_eos=True, seed=5)
    st = TreeSampler(backend, spec).rollout(prompts, params).stats
    num_leaves = math.prod(branching)

    assert st.num_leaves == 2 * num_leaves and st.num_missing_leaves == 0
    assert st.prefill_tokens == 21 + 37  # each prompt once
    assert st.reused_tokens == 0
    assert st.decode_tokens == 2 * analytic_decode_tokens(branching, segment_tokens or 0, 11)
    assert st.sampled_tokens == 2 * sum(math.prod(branching[:i + 1]) * s
                                        for i, s in enumerate(spec.segment_lengths(11)))
    assert st.flat_prefill_tokens == num_leaves * (21 + 37)
    assert st.flat_decode_tokens == 2 * num_leaves * (11 - 1)
    assert st.completion_tokens == 2 * num_leaves * 11
    # KV the leaves would hold apart, minus what the tree holds once
    distinct = 21 + 37 + st.sampled_tokens
    assert st.shared_kv_tokens == num_leaves * (21 + 37 + 2 * 11) - distinct
    assert st.kv_bytes_shared == st.shared_kv_tokens * backend.kv_bytes_per_token
    assert st.savings == pytest.approx(1 - st.computed_tokens / st.flat_tokens)
    assert st.num_forks == 2 * (1 + sum(math.prod(branching[:i + 1]) for i in range(len(branching) - 1)))

    flat = flat_baseline_counters(model, tok, TreeSampler(backend, spec).rollout(prompts, params))
    assert (flat["prefill"], flat["decode"]) == (st.flat_prefill_tokens, st.flat_decode_tokens)
    assert "saved" in st.summary() and st.as_dict()["flat_tokens"] == st.flat_tokens
    assert backend.engine.stats.num_used_blocks == 0


# -- early stops ---------------------------------------------------------------------------------------
def test_greedy_stop_in_the_first_segment_ends_every_branch(qwen2):
    model, _ = qwen2
    prompt = random_prompts([15], model.config.vocab_size, seed=6)[0]
    ref = hf_greedy(model, prompt, 14)
    j = max(i for i in range(5) if ref[i] not in ref[:i])  # stop at the last new token of the first segment
    assert j > 0
    params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True, stop_token_ids=[ref[j]])
    for fill in (False, True):  # fill cannot help: nothing is left to fork
        backend = backend_for(qwen2)
        batch = TreeSampler(backend, TreeSpec.segments([2, 2], segment_tokens=5, fill=fill)).rollout([prompt], params)
        assert len(batch) == 2 and batch.stats.num_missing_leaves == 2
        assert all(leaf.completion_ids == ref[:j + 1] and leaf.finish_reason == "stop" for leaf in batch)
        assert backend.engine.stats.num_used_blocks == 0


def test_a_branch_that_stops_early_becomes_a_leaf_and_fill_makes_up_the_count(qwen2):
    model, _ = qwen2
    prompt = random_prompts([15], model.config.vocab_size, seed=7)[0]
    spec = TreeSpec.segments([2, 2], segment_tokens=5)
    params = SamplingParams(temperature=1.0, max_tokens=14, ignore_eos=True, seed=11)
    free_run = TreeSampler(backend_for(qwen2), spec).rollout([prompt], params)
    x, y = free_run.leaves[0].completion_ids[:5], free_run.leaves[2].completion_ids[:5]  # the two trunks
    stop = next(t for t in x if t not in y)
    stopped = x[: x.index(stop) + 1]
    stop_params = SamplingParams(temperature=1.0, max_tokens=14, ignore_eos=True, seed=11, stop_token_ids=[stop])

    batch = TreeSampler(backend_for(qwen2), spec).rollout([prompt], stop_params)
    assert len(batch) == 3 and batch.stats.num_missing_leaves == 1
    first = batch.leaves[0]
    assert first.completion_ids == stopped and first.finish_reason == "stop" and len(first.node_ids) == 2
    assert all(leaf.completion_ids[:5] == y and len(leaf.node_ids) == 3 for leaf in batch.leaves[1:])

    filled = TreeSampler(backend_for(qwen2), TreeSpec.segments([2, 2], segment_tokens=5, fill=True)).rollout(
        [prompt], stop_params)
    assert len(filled) == 4 and filled.stats.num_missing_leaves == 0
    assert filled.leaves[0].completion_ids == stopped
    assert len({leaf.node_ids[1] for leaf in filled.leaves[1:]}) == 1  # the surviving trunk got 3 children
    assert_shared_segments_identical(filled)


# -- entropy-triggered branching ------------------------------------------------------------------------
class ScriptedBackend:
    """A backend whose sampling entropy at completion offset q is ``entropies[q]`` on every path.

    Handles are token lists (what a vLLM backend would keep); tokens are arbitrary but distinct per
    path. It shows the protocol needs nothing engine-specific and lets a test predict every fork.
    """

    kv_bytes_per_token = 1

    def __init__(self, entropies: list[float]):
        self.entropies = entropies
        self.forks = []  # (completion offset forked at, children)
        self.handles = []

    def _new(self, ids, prompt_len):
        self.handles.append({"ids": list(ids), "prompt_len": prompt_len, "freed": False})
        return self.handles[-1]

    def prefill(self, prompts):
        return [self._new(p, len(p)) for p in prompts]

    def fork(self, handle, n, at=None):
        at = len(handle["ids"]) if at is None else at
        self.forks.append((at - handle["prompt_len"], n))
        return [self._new(handle["ids"][:at], handle["prompt_len"]) for _ in range(n)]

    def generate(self, handles, params):
        outs = []
        for h, p in zip(handles, params):
            ids, lps, ents = [], [], []
            for _ in range(p.max_tokens):
                q = len(h["ids"]) - h["prompt_len"]
                h["ids"].append(3 + (p.seed + q) % 90)
                ids.append(h["ids"][-1]), lps.append(-1.0), ents.append(self.entropies[q])
            outs.append(type("Completion", (), dict(token_ids=ids, logprobs=lps, entropies=ents,
                                                    finish_reason="length"))())
        return outs

    def free(self, handle):
        handle["freed"] = True

    def counters(self):
        return dict.fromkeys(COUNTER_KEYS, 0)

    def update_weights(self, state_dict=None):
        pass

    def reset_prefix_cache(self):
        pass


def test_entropy_forks_highest_first_until_the_budget_is_spent():
    """One chain of 8 tokens, threshold 1: candidates are offsets 4 (4.0), 2 (3.0), 6 (2.5); offset 0
    (5.0) starts the chain's node and is never one. Budget 4 leaves: fork at 4 into 2 children, then
    at 2 into the 1 child the budget has left; the children's tokens at 6 come too late."""
    backend = ScriptedBackend([5.0, 0.1, 3.0, 0.2, 4.0, 0.3, 2.5, 0.1])
    assert isinstance(backend, RolloutBackend)
    spec = TreeSpec.entropy(max_leaves=4, threshold=1.0, initial=1, branch=2)
    batch = TreeSampler(backend, spec).rollout([[7, 7, 7]], SamplingParams(max_tokens=8, seed=1))
    assert backend.forks == [(0, 1), (4, 2), (2, 1)]  # (fork offset, children): the initial chain, then by entropy
    assert [leaf.segment_starts for leaf in batch] == [[0, 2, 4], [0, 2, 4], [0, 2, 4], [0, 2]]
    chain = batch.leaves[0]
    assert [len(leaf.completion_ids) for leaf in batch] == [8] * 4
    assert all(leaf.completion_ids[:4] == chain.completion_ids[:4] for leaf in batch.leaves[1:3])
    assert batch.leaves[3].completion_ids[:2] == chain.completion_ids[:2]
    assert batch.stats.num_leaves == 4 and batch.stats.num_missing_leaves == 0
    # a larger budget goes on into the children's round: they resampled 4 and 2, so 6 (and 4) are new tokens
    backend = ScriptedBackend([5.0, 0.1, 3.0, 0.2, 4.0, 0.3, 2.5, 0.1])
    spec = TreeSpec.entropy(max_leaves=10, threshold=1.0, initial=1, branch=2)
    batch = TreeSampler(backend, spec).rollout([[7, 7, 7]], SamplingParams(max_tokens=8, seed=1))
    # round 1: 4, 2, 6 (7 leaves); round 2 candidates: 4 on both children of 2 (4.0), then 6 (2.5)
    assert backend.forks == [(0, 1), (4, 2), (2, 2), (6, 2), (4, 2), (4, 1)]
    assert len(batch) == 10 and all(h["freed"] for h in backend.handles)


@pytest.mark.parametrize("max_leaves, threshold", [(6, 1.8), (40, 2.2)])  # budget-bound, threshold-bound
def test_entropy_tree_forks_only_above_the_threshold_and_paths_are_consistent(
        make_tiny_model, tiny_tokenizer, max_leaves, threshold):
    model = make_tiny_model("qwen2", initializer_range=0.5)  # peaked logits: entropies spread over 0.1-2.5 nats
    backend = NativeBackend(model, tiny_tokenizer, kv_cache_memory=8 << 20)
    prompts = random_prompts([12, 20], model.config.vocab_size, seed=8)
    spec = TreeSpec.entropy(max_leaves=max_leaves, threshold=threshold, initial=2, branch=2, segment_tokens=5)
    params = SamplingParams(temperature=0.8, max_tokens=16, ignore_eos=True, seed=9)
    batch = TreeSampler(backend, spec).rollout(prompts, params)

    assert all(2 <= n <= max_leaves for n in batch.num_leaves_per_prompt)
    assert_shared_segments_identical(batch)
    assert_spans_tile_the_completion(batch)
    forks = 0
    for node in batch.nodes.values():
        if node.parent_id is None or not node.children:
            continue  # roots branch into the initial chains, not by entropy
        forks += 1
        q = node.end  # every child starts where its parent ends
        assert len(node.children) >= 2 and all(batch.nodes[c].start == q for c in node.children)
        original, *new = [batch.leaves[batch.leaves_under(c)[0]] for c in node.children]
        assert original.entropies[q] > threshold  # the fork happened at a high-entropy token
        for leaf in new:  # the new children resampled that token from the same distribution
            assert leaf.entropies[q] == pytest.approx(original.entropies[q], abs=1e-4)
    assert forks > 0
    for p, n in enumerate(batch.num_leaves_per_prompt):
        if n < max_leaves:  # budget left over: every token above the threshold was forked at
            for leaf in (leaf for leaf in batch if leaf.prompt_index == p):
                high = [q for q, h in enumerate(leaf.entropies) if h > threshold]
                assert set(high) <= set(leaf.segment_starts)
    if max_leaves == 40:
        assert any(n < max_leaves for n in batch.num_leaves_per_prompt)  # the check above ran
    for leaf in batch:  # logprobs and entropies are those of a plain forward of the whole path
        lp, ent = forward_logprobs_and_entropies(model, leaf.prompt_ids, leaf.completion_ids, temperature=0.8)
        torch.testing.assert_close(torch.tensor(leaf.logprobs), lp, atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(leaf.entropies), ent, atol=1e-4, rtol=0)
    assert backend.engine.stats.num_used_blocks == 0


# -- bad specs -------------------------------------------------------------------------------------------
def test_bad_specs_raise_value_errors_that_name_the_fix(qwen2):
    with pytest.raises(ValueError, match="give at least one level"):
        TreeSpec.segments([], segment_tokens=4)
    with pytest.raises(ValueError, match="integer >= 1 child per fork"):
        TreeSpec.segments([2, 0], segment_tokens=4)
    with pytest.raises(ValueError, match="integer >= 1 child per fork"):
        TreeSpec.segments([-2, 2], segment_tokens=4)
    with pytest.raises(ValueError, match="needs segment_tokens >= 1"):
        TreeSpec.segments([2, 2])
    with pytest.raises(ValueError, match="integer >= 1"):
        TreeSpec.grpo(0)
    with pytest.raises(ValueError, match="keep must be in"):
        TreeSpec.best_of_n(4, keep=5)
    with pytest.raises(ValueError, match="leaf budget"):
        TreeSpec.entropy(max_leaves=0, threshold=1.0)
    with pytest.raises(ValueError, match="initial"):
        TreeSpec.entropy(max_leaves=2, threshold=1.0, initial=3)
    with pytest.raises(ValueError, match="threshold"):
        TreeSpec.entropy(max_leaves=4, threshold=-1.0)
    with pytest.raises(ValueError, match="num_generations=16 or choose branching whose product is 8"):
        TreeSpec.segments([4, 2, 2], segment_tokens=8).check_leaves(8)
    TreeSpec.segments([4, 2], segment_tokens=8).check_leaves(8)

    spec = TreeSpec.segments([2, 2, 2], segment_tokens=8)
    backend = backend_for(qwen2)
    with pytest.raises(ValueError, match=r"segment_tokens \* \(len\(branching\)-1\) must be < max_tokens.*"
                                         r"Lower segment_tokens to at most 7"):
        TreeSampler(backend, spec).rollout([[5, 6, 7]], SamplingParams(max_tokens=16))
    with pytest.raises(ValueError, match="empty prompt"):
        TreeSampler(backend, TreeSpec.grpo(2)).rollout([[5, 6], []], SamplingParams(max_tokens=4))
    assert backend.engine.stats.num_used_blocks == 0
    assert len(TreeSampler(backend, TreeSpec.grpo(2)).rollout([], SamplingParams(max_tokens=4))) == 0
