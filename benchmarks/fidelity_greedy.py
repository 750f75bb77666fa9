"""Greedy agreement for benchmarks/fidelity.py: who tracks ``model.generate``, and who is right where they part.

Bit-identical greedy decoding in bf16 needs identical reduction orders: the same kernels on the same shapes.
``model.generate`` runs one prompt at a time through SDPA; a batched sampler (our engine, vLLM) runs its GEMMs on
other shapes and its own attention kernels, so near-tie argmaxes flip and the sequences part. A count of identical
sequences alone cannot tell that rounding noise from an error, so next to it this module measures:

- the floor: ``model.generate`` itself on the same prompts in one left-padded batch, against batch 1;
- the verdict: at each first divergence from ``model.generate``, which of the two tokens the same model in fp32
  prefers (teacher-forced on ``model.generate``'s sequence: one fp32 forward per prompt), and by how much;
- agreement with fp32 greedy decoding (``model.generate`` on the fp32 model, batched), the closest thing to
  exact arithmetic there is.

Engine variants (``engine_variants``) split the engine's own divergence into its two causes: batch shape (one
prompt per ``generate`` call gives the GEMMs ``model.generate``'s shapes) and attention kernel
(``hf_sdpa_attention``: the engine's hook calls HF's own SDPA function per sequence over that sequence's
gathered paged K/V, the call ``model.generate`` makes). With both, every op should be ``model.generate``'s.
"""

from __future__ import annotations

import contextlib
import math

TRUTH = "fp32"  # the name of the exact-arithmetic reference in the receipt


# -- references ------------------------------------------------------------------------------------------


def hf_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    """model.generate, greedy, batch 1, eos ignored (generate refills a None eos from generation_config)."""
    return hf_greedy_batched(model, [prompt], num_tokens)[0]


def hf_greedy_batched(model, prompts: list[list[int]], num_tokens: int) -> list[list[int]]:
    """model.generate, greedy, eos ignored, all ``prompts`` in one batch (left-padded; one prompt: no padding)."""
    import torch

    from thaw_rl.testing import trl_rows

    ids, mask = trl_rows(prompts, [[] for _ in prompts], 0, device=model.device)  # left-padded with 0
    width = ids.shape[1]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=num_tokens, do_sample=False,
                                 min_new_tokens=0, pad_token_id=0)
    finally:
        model.generation_config.eos_token_id = saved
    return out[:, width:].tolist()


def engine_greedy(engine, prompts: list[list[int]], num_tokens: int, one_per_call: bool = False) -> list[list[int]]:
    """The engine's greedy tokens: all prompts in one ``generate`` (how samplers run), or one prompt per call
    (the GEMM shapes of ``model.generate`` at batch 1). The prefix cache is dropped first and, one per call,
    between prompts, so every prompt is prefilled in full as ``model.generate`` prefills it."""
    from thaw_rl import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True)
    out = []
    for group in ([p] for p in prompts) if one_per_call else [prompts]:
        engine.reset_prefix_cache()
        sessions = engine.prefill_many(group)
        out += [c.token_ids for c in engine.generate(sessions, params)]
        for s in sessions:
            engine.free(s)
    return out


@contextlib.contextmanager
def hf_sdpa_attention():
    """Inside: the engine's attention hook (``thaw_paged``) writes K/V to the paged cache as usual, then runs HF's
    own ``sdpa`` attention function once per sequence over its gathered K/V. Eager engines only (a host sync per
    layer: not CUDA-graph safe); a diagnostic, not a fast path."""
    from transformers import AttentionInterface

    from thaw_rl.engine import attention

    AttentionInterface.register(attention.ATTENTION_NAME, _hf_sdpa_paged)
    try:
        yield
    finally:
        AttentionInterface.register(attention.ATTENTION_NAME, attention.thaw_paged_attention)


def _hf_sdpa_paged(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``thaw_paged`` with HF's SDPA call: per sequence, query (1, H, q_len, D) over contiguous (1, KVH, n, D)
    K/V, no mask when the sequence's whole context is new (prefill) or it has one query (decode), as
    ``model.generate`` calls it; an explicit causal mask for a chunk after cached context (HF never runs that)."""
    import torch
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from thaw_rl.engine.attention import METADATA_KWARG, thaw_paged_attention
    from thaw_rl_kernels.kv_write import write_kv
    from thaw_rl_kernels.paged_attention import _gather_context

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    meta = kwargs.get(METADATA_KWARG)
    if meta is None or kwargs.get("sliding_window"):
        return thaw_paged_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                    **kwargs)
    k_cache = meta.kv_cache.key_cache(module.layer_idx)  # (NB, BS, KVH, D)
    v_cache = meta.kv_cache.value_cache(module.layer_idx)
    write_kv(key[0].transpose(0, 1), value[0].transpose(0, 1), k_cache, v_cache, meta.slot_blocks, meta.slot_offsets)
    bs = k_cache.shape[1]
    cu, lens = meta.cu_seqlens_q.tolist(), meta.seq_lens.tolist()
    outs = []
    for s, n in enumerate(lens):
        q_len = cu[s + 1] - cu[s]
        if q_len == 0:
            continue
        def gather(cache):  # (1, KVH, n, D) contiguous, as HF's DynamicCache holds it
            return _gather_context(cache, meta.block_tables[s], -(-n // bs))[:n].transpose(0, 1).contiguous()[None]

        mask = None
        if 1 < q_len < n:
            pos = torch.arange(n - q_len, n, device=query.device)
            mask = (torch.arange(n, device=query.device)[None, :] <= pos[:, None])[None, None]  # (1, 1, q, n)
        o, _ = sdpa(module, query[:, :, cu[s]:cu[s + 1]], gather(k_cache), gather(v_cache), mask,
                    dropout=0.0, scaling=scaling)  # (1, q_len, H, D)
        outs.append(o)
    return torch.cat(outs, dim=1), None


# -- comparisons -----------------------------------------------------------------------------------------


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict:
    firsts = [first_divergence(r, o) for r, o in zip(reference, other)]
    diverged = [f for f in firsts if f is not None]
    num_tokens = max((len(r) for r in reference), default=0)
    return {"sequences": len(firsts), "identical_share": 1 - len(diverged) / max(1, len(firsts)),
            "mean_first_divergence": sum(diverged) / len(diverged) if diverged else None,
            "mean_tokens_matched": sum(num_tokens if f is None else f for f in firsts) / max(1, len(firsts)),
            "first_divergences": firsts}


def greedy_paired(engine_firsts: list, vllm_firsts: list, num_tokens: int) -> dict:
    """Engine and vLLM on the same greedy prompts, prompt by prompt: which matches ``model.generate`` longer.

    A prompt's matched length is its first divergence (``num_tokens`` when identical). Identical shares and mean
    divergences compare two small counts; the paired count (engine longer / vLLM longer / equal) with a two-sided
    sign test over the unequal prompts says whether one is really closer (p near 1: no sign of a difference)."""
    eng = [num_tokens if f is None else f for f in engine_firsts]
    vll = [num_tokens if f is None else f for f in vllm_firsts]
    longer = sum(e > v for e, v in zip(eng, vll))
    shorter = sum(e < v for e, v in zip(eng, vll))
    return {"prompts": len(eng), "engine_longer": longer, "vllm_longer": shorter, "equal": len(eng) - longer - shorter,
            "sign_test_p": sign_test_p(longer, shorter), "engine_mean_matched": sum(eng) / max(1, len(eng)),
            "vllm_mean_matched": sum(vll) / max(1, len(vll))}


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided sign test: the chance of a split at least this lopsided if both sides were equally likely."""
    n = wins + losses
    if not n:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def divergence_verdicts(truth, prompts: list[list[int]], reference: list[list[int]], others: dict) -> dict:
    """At each sampler's first divergence from ``reference`` (model.generate's tokens), the ``truth`` model's
    (fp32) logit of the reference's token minus that of the sampler's token, given the shared prefix.

    Negative: exact arithmetic prefers the sampler's token (model.generate's bf16 rounding flipped the tie); positive:
    it prefers model.generate's. One teacher-forced forward per prompt over prompt + reference gives every position.
    Per sampler: divergences, how many the truth sides with each, median and max |gap|, and the gaps."""
    import torch

    gaps: dict[str, list[float]] = {name: [] for name in others}
    for i, (prompt, ref) in enumerate(zip(prompts, reference)):
        firsts = {name: first_divergence(ref, seqs[i]) for name, seqs in others.items()}
        firsts = {name: f for name, f in firsts.items() if f is not None and f < min(len(ref), len(others[name][i]))}
        if not firsts:
            continue
        with torch.no_grad():
            ids = torch.tensor([prompt + ref], device=truth.device)
            logits = truth(input_ids=ids).logits[0, len(prompt) - 1:].float()  # (len(ref)+1, V): next-token rows
        for name, f in firsts.items():
            row = logits[f]
            gaps[name].append(float(row[ref[f]] - row[others[name][i][f]]))
    out = {}
    for name, g in gaps.items():
        a = sorted(abs(x) for x in g)
        out[name] = {"divergences": len(g), "truth_prefers_sampler": sum(x < 0 for x in g),
                     "truth_prefers_generate": sum(x > 0 for x in g), "ties": sum(x == 0 for x in g),
                     "median_abs_gap": a[len(a) // 2] if a else None, "max_abs_gap": a[-1] if a else None,
                     "gaps": g}
    return out


def greedy_study(model, truth, engine, make_eager_engine, prompts: list[list[int]], num_tokens: int, *,
                 vllm=None, variants: bool = False, log=print) -> dict:
    """Every greedy line: references, samplers against both, engine-vs-vLLM pairing, verdicts at divergences.

    ``truth``: the model in fp32 (or ``model`` itself when it computes in fp32). ``make_eager_engine``: a new
    engine without CUDA graphs (for the HF-SDPA variants). ``vllm``: vLLM's greedy tokens for ``prompts``."""
    import time

    timings, seqs = {}, {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        timings[name] = time.perf_counter() - t0
        log(f"greedy: {name} in {timings[name]:.1f} s")
        return out

    reference = timed("generate", lambda: [hf_greedy(model, p, num_tokens) for p in prompts])
    seqs["generate batched"] = timed("generate batched", lambda: hf_greedy_batched(model, prompts, num_tokens))
    exact = reference if truth is model else timed(TRUTH, lambda: hf_greedy_batched(truth, prompts, num_tokens))
    seqs["engine"] = timed("engine", lambda: engine_greedy(engine, prompts, num_tokens))
    if vllm is not None:
        seqs["vllm"] = vllm
    if variants:
        seqs["engine, one prompt per call"] = timed(
            "engine one per call", lambda: engine_greedy(engine, prompts, num_tokens, one_per_call=True))
        eager = make_eager_engine()
        with hf_sdpa_attention():
            seqs["engine, HF SDPA attention"] = timed(
                "engine hf sdpa", lambda: engine_greedy(eager, prompts, num_tokens))
            seqs["engine, HF SDPA, one prompt per call"] = timed(
                "engine hf sdpa one per call", lambda: engine_greedy(eager, prompts, num_tokens, one_per_call=True))
        eager.close()
    results = {"vs_generate": {name: agreement(reference, s) for name, s in seqs.items()},
               "vs_fp32": {name: agreement(exact, s) for name, s in {"generate": reference, **seqs}.items()},
               "verdicts": timed("verdicts", lambda: divergence_verdicts(truth, prompts, reference, seqs)),
               "timings": timings}
    if vllm is not None:
        for ref_name, ref in (("vs_generate", results["vs_generate"]), ("vs_fp32", results["vs_fp32"])):
            results.setdefault("paired", {})[ref_name] = greedy_paired(
                ref["engine"]["first_divergences"], ref["vllm"]["first_divergences"], num_tokens)
    return results


def greedy_table(greedy: dict, grid) -> list[str]:
    """Printed lines: agreement with generate and with fp32, the verdicts, and the engine-vs-vLLM pairing."""
    head = ["greedy", "identical vs generate", "tokens matched", "identical vs fp32", "tokens matched ",
            "divergences", "fp32 prefers sampler", "median |gap|"]
    rows = []
    for name, g in greedy["vs_fp32"].items():
        v = greedy["vs_generate"].get(name)
        d = greedy["verdicts"].get(name)
        f = lambda x, spec: "-" if x is None else spec.format(x)  # noqa: E731
        rows.append([name, f(v and v["identical_share"], "{:.1%}"), f(v and v["mean_tokens_matched"], "{:.1f}"),
                     f(g["identical_share"], "{:.1%}"), f(g["mean_tokens_matched"], "{:.1f}"),
                     f(d and d["divergences"], "{}"), f(d and d["truth_prefers_sampler"], "{}"),
                     f(d and d["median_abs_gap"], "{:.3g}")])
    out = [grid(head, rows)]
    for ref_name, g in greedy.get("paired", {}).items():
        out.append(f"greedy {ref_name}, prompt by prompt: engine matches longer on {g['engine_longer']}, vLLM on "
                   f"{g['vllm_longer']}, equal on {g['equal']} (sign test p = {g['sign_test_p']:.2f}); mean tokens "
                   f"matched {g['engine_mean_matched']:.1f} vs {g['vllm_mean_matched']:.1f}")
    return out
