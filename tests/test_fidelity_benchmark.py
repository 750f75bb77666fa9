"""benchmarks/fidelity.py's measurement core on a tiny model in fp32 on CPU (no vLLM): every line it reports
for the engine is rounding-level, and the checks that must match exactly do."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import fidelity  # noqa: E402


@pytest.fixture(scope="module")
def results(make_tiny_model, tiny_tokenizer):
    torch.manual_seed(0)
    model = make_tiny_model("llama", seed=3)
    prompts = [{"kind": "arithmetic", "ids": fidelity.chat_ids(tiny_tokenizer, [{"role": "user", "content": q}])}
               for q in ("What is 2 + 3?", "What is 7 x 8?")]
    text = "A long system document about paged KV caches and forked rollouts. " * 2
    prompts.append({"kind": "long", "ids": fidelity.chat_ids(
        tiny_tokenizer, [{"role": "system", "content": text}, {"role": "user", "content": "Summarize it."}])})
    return fidelity.measure(model, tiny_tokenizer, prompts, group=4, max_tokens=12, temperature=1.0, seed=5,
                            greedy_prompts=3, greedy_tokens=16, packed_masks=["dense"],
                            engine_kwargs={"block_size": 16}, greedy_variants=True, log=lambda m: None)


def line(results, name, prompts="all"):
    return next(r for r in results["lines"] if r["line"] == name and r["prompts"] == prompts)


def test_engine_logprobs_equal_the_training_forward_in_fp32(results):
    assert results["training_forward"] == "trl fused lm head"
    engine = line(results, "engine - train")
    assert engine["tokens"] > 3 * 4
    assert engine["max"] < 2e-5 and engine["share_gt_0.01"] == 0.0
    for kind in ("arithmetic", "long"):
        assert line(results, "engine - train", kind)["max"] < 2e-5
    ratio = results["is_ratio"]["engine"]
    assert ratio["sequences"] == 12 and abs(ratio["min"] - 1) < 1e-4 and abs(ratio["max"] - 1) < 1e-4


def test_floors_and_packed_training_are_rounding_level(results):
    assert line(results, "floor: train rows alone - train group")["max"] < 2e-5
    assert line(results, "floor: plain logits - fused head")["max"] < 2e-5
    assert line(results, "packed (dense) - flat train")["max"] < 2e-5


def test_greedy_agrees_with_generate_and_forks_match_scratch_and_snapshots(results):
    """In fp32 every sampler, the engine's variants (one prompt per call, HF's SDPA over the paged K/V) and
    model.generate batched with left padding give model.generate's tokens; no divergence, so no verdict."""
    greedy = results["greedy"]
    assert set(greedy["vs_generate"]) == {"generate batched", "engine", "engine, one prompt per call",
                                          "engine, HF SDPA attention", "engine, HF SDPA, one prompt per call"}
    for name, agree in greedy["vs_generate"].items():
        assert agree["sequences"] == 3 and agree["identical_share"] == 1.0, name
        assert agree["mean_first_divergence"] is None and agree["mean_tokens_matched"] == 16, name
        assert greedy["vs_fp32"][name]["identical_share"] == 1.0, name
        assert greedy["verdicts"][name]["divergences"] == 0, name
    assert greedy["vs_fp32"]["generate"]["identical_share"] == 1.0
    for check in ("fork_vs_scratch", "snapshot_vs_original"):
        stats = results["fork_snapshot"][check]
        assert stats["sequences"] == 4 and stats["tokens_identical_share"] == 1.0
        assert stats["max_abs_logprob_diff"] < 1e-5


def test_statistics_helpers_on_known_values():
    stats = fidelity.diff_stats([[0.0, 0.0, 0.5]], [[0.0, 0.05, 0.0]])
    assert stats["tokens"] == 3 and stats["max"] == pytest.approx(0.5)
    assert stats["share_gt_0.01"] == pytest.approx(2 / 3) and stats["share_gt_0.1"] == pytest.approx(1 / 3)
    ratio = fidelity.is_ratio_stats([[-1.0, -1.0], [-2.0]], [[-1.0, -1.0 + 2.0], [-2.0]])
    assert ratio["max"] == pytest.approx(torch.e ** 2) and ratio["min"] == pytest.approx(1.0)
    assert ratio["share_gt_3"] == pytest.approx(0.5)
    assert fidelity.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert fidelity.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert fidelity.first_divergence([1, 2], [1, 2, 3]) == 2
    agree = fidelity.agreement([[1, 2], [1, 2]], [[1, 2], [1, 3]])
    assert agree["identical_share"] == 0.5 and agree["mean_first_divergence"] == 1.0
    assert agree["mean_tokens_matched"] == (2 + 1) / 2


def test_divergence_verdicts_side_with_the_truths_argmax(make_tiny_model):
    """A sampler that leaves model.generate's greedy path for the truth's second-best token is ruled against
    (positive gap), one whose token the truth prefers is ruled for; a sampler that never diverges gets no verdict."""
    from fidelity_greedy import divergence_verdicts, hf_greedy

    model = make_tiny_model("llama", seed=3)
    prompt = [5, 9, 14, 3, 7]
    reference = hf_greedy(model, prompt, 8)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + reference[:3]])).logits[0, -1]
    second = int(logits.topk(2).indices[1])
    worse = reference[:3] + [second] + reference[4:]
    # a "reference" that took the second-best token at 3: the real argmax diverging from it is the truth's pick
    verdicts = divergence_verdicts(model, [prompt], [worse], {"sampler": [reference], "same": [worse]})
    assert verdicts["same"]["divergences"] == 0 and verdicts["same"]["median_abs_gap"] is None
    v = verdicts["sampler"]
    assert v["divergences"] == 1 and v["truth_prefers_sampler"] == 1 and v["truth_prefers_generate"] == 0
    assert v["gaps"][0] == pytest.approx(float(logits[second] - logits[reference[3]]), abs=1e-4)
    back = divergence_verdicts(model, [prompt], [reference], {"sampler": [worse]})["sampler"]
    assert back["truth_prefers_generate"] == 1 and back["gaps"][0] == pytest.approx(-v["gaps"][0], abs=1e-4)


def test_bootstrap_tells_a_closer_sampler_from_noise():
    g = torch.Generator().manual_seed(0)
    train = [torch.randn(20, generator=g).tolist() for _ in range(60)]
    noisy = lambda scale: [(torch.tensor(t) + scale * torch.randn(20, generator=g)).tolist() for t in train]  # noqa: E731
    closer = fidelity.bootstrap_comparison({"engine": noisy(0.01), "vllm": noisy(0.05)},
                                           {"engine": train, "vllm": train}, resamples=50)
    for stat in ("median", "p99", "max", "is_abs_log_p50"):
        row = closer["stats"][stat]
        assert row["engine"] < row["vllm"] and row["p_engine_at_least_as_close"] > 0.95, stat
        assert row["engine_ci95"][0] <= row["engine"] <= row["engine_ci95"][1]
    same = fidelity.bootstrap_comparison({"engine": noisy(0.03), "vllm": noisy(0.03)},
                                         {"engine": train, "vllm": train}, resamples=50)
    assert 0.02 < same["stats"]["median"]["p_engine_at_least_as_close"] < 0.98  # equal noise: no verdict
    exact = fidelity.sequence_stats([torch.tensor([0.0, 0.05, 0.5])], torch.tensor([0.0, 2.0]))
    assert exact["max"] == 0.5 and exact["share_gt_0.1"] == pytest.approx(1 / 3) and exact["is_share_clipped"] == 0.5


def test_greedy_paired_counts_prompt_by_prompt_and_tests_the_sign():
    """Identical sequences count as the full length; the sign test is over the prompts where the two differ."""
    g = fidelity.greedy_paired([None, 3, 10, 7, 0], [5, None, 10, 2, 0], num_tokens=16)
    assert (g["engine_longer"], g["vllm_longer"], g["equal"]) == (2, 1, 2)
    assert g["sign_test_p"] == 1.0  # 2 vs 1 of 3: two-sided p = 2 * P(X <= 1) = 2 * 4/8, capped at 1
    assert g["engine_mean_matched"] == (16 + 3 + 10 + 7 + 0) / 5 and g["vllm_mean_matched"] == (5 + 16 + 10 + 2) / 5
    lopsided = fidelity.greedy_paired([None] * 8, [0] * 8, num_tokens=16)
    assert lopsided["engine_longer"] == 8 and abs(lopsided["sign_test_p"] - 2 / 2 ** 8) < 1e-12


def test_engine_is_bit_exact_with_generate_given_its_attention_call_and_shapes_in_bf16(make_tiny_model):
    """bf16, where rounding shows: with HF's SDPA call over the paged K/V and one prompt per call (model.generate's
    GEMM shapes) the engine's greedy tokens equal model.generate's and every logprob equals log_softmax of
    generate's scores exactly: the packed forward, K/V writes, positions, LM head and sampler add no rounding of
    their own (on the H200: 24/24 SmolLM2 prompts identical over 256 tokens). The engine's own attention path
    differs by ~4e-3 here, so the check can fail."""
    from fidelity_greedy import hf_sdpa_attention

    from thaw_rl import SamplingParams, ThawEngine

    model = make_tiny_model("qwen2", seed=6, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in (4, 19, 33)]
    engine = ThawEngine(model, None, kv_cache_memory=8 << 20, use_cuda_graphs=False)
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for p in prompts:
        engine.reset_prefix_cache()
        with hf_sdpa_attention():
            session = engine.prefill(p)
            got = engine.generate([session], greedy)[0]
        engine.free(session)
        ids = torch.tensor([p])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        tokens = ref.sequences[0, len(p):].tolist()
        assert got.token_ids == tokens
        assert got.logprobs == [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(ref.scores, tokens)]
