"""Tree rollout vs flat sampling: tokens computed and wall time for the same number of leaves.

One run, one engine, the same seeds for both samplers:

- tree: ``TreeSampler(TreeSpec.segments(branching, segment_tokens))``: every prompt prefilled once,
  forked at the prompt, then every ``segment_tokens`` tokens (TreePO); the shared segments are decoded
  once. Leaves per prompt = prod(branching).
- flat: what a plain sampler does for the same leaves (GRPO-style n independent samples): each sample's
  prompt is submitted on its own (prefix cache reset first, all of them in one ``prefill`` call) and each
  completion is decoded on its own. The scheduler computes a full block that several sessions need in one
  step only once and the others match it, so a prompt's samples share most of its blocks, as they would in
  an engine with prefix caching (64 x 16 samples of 512-token prompts: 62,528 prompt tokens computed, not
  524,288). Receipts before session 12 predate that: their flat runs computed every sample's prompt.

Both are measured from the engine's own counters (tokens that went through the model), so the
ratio is what the tree saves on this engine, not an estimate. Completions run to max_tokens
(``ignore_eos``) unless ``--eos``, so both samplers produce leaves of the same length.

    python benchmarks/tree_savings.py --config qwen2.5-1.5b --out benchmarks/results/tree_savings_h100.json
    python benchmarks/tree_savings.py --prompts 2 --prompt-len 64 --branching 2,2 --segment-tokens 8 \\
        --max-tokens 24 --threads 2           # SmolLM2 on CPU, under a minute

On CPU, benchmark with nothing else running: beside another process, 2 torch threads on 2 cores can be
10-100x slower (OpenMP spinning), which swamps any difference; ``--repeats`` alternates the two runs.

Models: ``smollm2`` (the real SmolLM2-135M-Instruct, offline, fp32 on CPU / bf16 on CUDA) or
``--config qwen2.5-1.5b`` (random weights with Qwen2.5-1.5B's real shapes, bf16, meant for CUDA).
The table comes last; ``--out`` writes a JSON receipt (device, versions, git commit, command, numbers).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from thaw_rl import NativeBackend, SamplingParams, TreeSampler, TreeSpec  # noqa: E402
from thaw_rl.engine.sampling import derive_seed  # noqa: E402
from receipt_utils import git_commit  # noqa: E402

CONFIGS = {  # random-weight models of real shapes
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960, vocab_size=151936, max_position_embeddings=32768,
                         tie_word_embeddings=True, rms_norm_eps=1e-6, use_sliding_window=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                         bos_token_id=151643, eos_token_id=151645),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", choices=["smollm2"], help="real model, loaded offline")
    p.add_argument("--config", default=None, choices=list(CONFIGS), help="random-weight model of these shapes")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--prompts", type=int, default=8, help="number of prompts")
    p.add_argument("--prompt-len", type=int, default=None, help="tokens per prompt (random ids); default: 512 on cuda, "
                   "64 on cpu (the flat sampler's 8 x 16 rows of 512 tokens outgrow the CPU engine's default pool)")
    p.add_argument("--branching", default="4,2,2", help="children per fork, level by level")
    p.add_argument("--segment-tokens", type=int, default=None, help="default: 128 on cuda, 16 on cpu")
    p.add_argument("--max-tokens", type=int, default=None, help="completion length; default: 512 on cuda, 48 on cpu")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--eos", action="store_true", help="stop at eos (default: ignore it, all leaves max_tokens long)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-cache-memory", type=float, default=None,
                   help="bytes, or a fraction (0, 1) of free GPU memory; default: the engine's")
    p.add_argument("--repeats", type=int, default=1, help="tree and flat run alternately this many times; median wall")
    p.add_argument("--no-warmup", action="store_true", help="skip the small warm-up rollout (CUDA graphs, kernels)")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU")
    p.add_argument("--compile-layers", action="store_true",
                   help="regional torch.compile of the decoder layers (the engine option a GPU user turns on)")
    p.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                   help="auto: the model's dtype; fp8: float8_e4m3fn KV cache (half the bytes; rounds K/V)")
    p.add_argument("--cascade", choices=("auto", "on", "off"), default="auto",
                   help="the engine's cascade (shared-prefix) decode attention (auto: its default)")
    p.add_argument("--out", type=Path, default=None, help="where to write the JSON receipt")
    args = p.parse_args()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bf16" if on_cuda else "fp32")
    args.prompt_len = args.prompt_len or (512 if on_cuda else 64)
    args.segment_tokens = args.segment_tokens or (128 if on_cuda else 16)
    args.max_tokens = args.max_tokens or (512 if on_cuda else 48)
    args.branching = [int(b) for b in args.branching.split(",")]
    return args


def load_model(args):
    dtype = DTYPES[args.dtype]
    if args.config is None:
        from thaw_rl.offline_models import load_smollm2

        model, tokenizer = load_smollm2(dtype, device=args.device)
        return model, tokenizer, "SmolLM2-135M-Instruct"
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**CONFIGS[args.config])
    with torch.device(args.device), torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval(), None, f"{args.config} (random weights)"


def random_prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(num)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_tree(backend: NativeBackend, spec: TreeSpec, prompts, params, device: str) -> dict:
    backend.reset_prefix_cache()
    sync(device)
    start = time.perf_counter()
    batch = TreeSampler(backend, spec).rollout(prompts, params)
    sync(device)
    wall = time.perf_counter() - start
    st = batch.stats
    return {
        "sampler": "tree", "leaves": st.num_leaves, "prefill_tokens": st.prefill_tokens,
        "decode_tokens": st.decode_tokens, "computed_tokens": st.computed_tokens, "reused_tokens": st.reused_tokens,
        "completion_tokens": st.completion_tokens, "wall_seconds": wall,
        "tokens_per_second": st.completion_tokens / wall,
        "forks": st.num_forks, "fork_seconds": st.fork_seconds, "kv_bytes_shared": st.kv_bytes_shared,
        "cascade_steps": st.cascade_steps,
        "predicted_flat_prefill_tokens": st.flat_prefill_tokens, "predicted_flat_decode_tokens": st.flat_decode_tokens,
        "summary": st.summary(),
    }


def run_flat(backend: NativeBackend, prompts, n: int, params, device: str) -> dict:
    """n independent samples per prompt, each prefilled and decoded on its own."""
    backend.reset_prefix_cache()
    before = backend.counters()
    sync(device)
    start = time.perf_counter()
    rows = [p for p in prompts for _ in range(n)]
    handles = backend.prefill(rows)  # all admitted before any is computed: no prefix sharing among them
    seeds = [None if params.seed is None else derive_seed(params.seed, i) for i in range(len(rows))]
    outs = backend.generate(handles, [dataclasses.replace(params, seed=s) for s in seeds])
    for h in handles:
        backend.free(h)
    sync(device)
    wall = time.perf_counter() - start
    after = backend.counters()
    d = {k: int(after[k] - before[k]) for k in ("prefill_tokens", "decode_tokens", "reused_tokens")}
    completion = sum(len(o.token_ids) for o in outs)
    return {
        "sampler": "flat", "leaves": len(rows), **d, "computed_tokens": d["prefill_tokens"] + d["decode_tokens"],
        "completion_tokens": completion, "wall_seconds": wall, "tokens_per_second": completion / wall,
    }


def median_wall(runs: list[dict]) -> dict:
    """The first run's counts (every repeat computes the same tokens) with the median wall time."""
    keys = ("prefill_tokens", "decode_tokens", "completion_tokens")
    if any(tuple(r[k] for k in keys) != tuple(runs[0][k] for k in keys) for r in runs):
        raise RuntimeError("repeats computed different token counts; the runs are not comparable")
    out = dict(runs[0], wall_seconds_all=[r["wall_seconds"] for r in runs])
    out["wall_seconds"] = statistics.median(out["wall_seconds_all"])
    out["tokens_per_second"] = out["completion_tokens"] / out["wall_seconds"]
    return out


def table(rows: list[dict]) -> str:
    cols = [("sampler", "sampler", "{}"), ("leaves", "leaves", "{}"), ("prefill tok", "prefill_tokens", "{:,}"),
            ("decode tok", "decode_tokens", "{:,}"), ("computed tok", "computed_tokens", "{:,}"),
            ("wall s", "wall_seconds", "{:.2f}"), ("leaf tok/s", "tokens_per_second", "{:,.0f}")]
    lines = [[c[0] for c in cols]] + [[fmt.format(r[key]) for _, key, fmt in cols] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    text = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines]
    tree, flat = rows
    ratio = (f"flat/tree: computed tokens {flat['computed_tokens'] / tree['computed_tokens']:.2f}x, "
             f"wall {flat['wall_seconds'] / tree['wall_seconds']:.2f}x")
    return "\n".join(text[:1] + ["-" * len(text[0])] + text[1:] + [ratio])


def receipt(args, model_name: str, backend: NativeBackend, rows: list[dict]) -> dict:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    on_cuda = args.device.startswith("cuda")
    tree, flat = rows
    return {
        "benchmark": "tree_savings",
        "device": torch.cuda.get_device_name() if on_cuda else (platform.processor() or platform.machine()),
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "triton": triton_version, "torch_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "command": " ".join([sys.executable, *sys.argv]),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model_name, "kv_bytes_per_token": backend.kv_bytes_per_token,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": rows,
        "computed_ratio_flat_over_tree": flat["computed_tokens"] / tree["computed_tokens"],
        "wall_ratio_flat_over_tree": flat["wall_seconds"] / tree["wall_seconds"],
    }


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, model_name = load_model(args)
    kv = args.kv_cache_memory
    kv = None if kv is None else (kv if kv < 1 else int(kv))
    backend = NativeBackend(model, tokenizer, kv_cache_memory=kv, compile_layers=args.compile_layers,
                            kv_cache_dtype=args.kv_cache_dtype, cascade_attention=args.cascade)
    spec = TreeSpec.segments(args.branching, segment_tokens=args.segment_tokens)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, ignore_eos=not args.eos,
                            seed=args.seed)
    spec.check_params(params)
    prompts = random_prompts(args.prompts, args.prompt_len, model.config.vocab_size, args.seed)
    n = math.prod(args.branching)
    print(f"{model_name} on {args.device} ({args.dtype}): {args.prompts} prompts x {args.prompt_len} tokens, "
          f"{spec}, max_tokens={args.max_tokens}, {n} leaves per prompt", flush=True)
    if not args.no_warmup:  # first calls compile kernels and capture a CUDA graph per batch size: keep them out
        # of the timing. Both samplers, all prompts, short segments: the same decode batch sizes as the timed runs.
        # Segments congruent to the timed ones modulo the block size: each fork then copies a partial last block
        # holding as many tokens as in the timed run, and the block-copy kernel, which is compiled per copy size,
        # is compiled here (with 2-token segments the first timed rollout paid ~60 ms for it on an H200).
        block_size = backend.engine.block_size
        warm_tokens = args.segment_tokens % block_size or block_size
        short = TreeSpec.segments(args.branching, segment_tokens=warm_tokens)
        warm = SamplingParams(temperature=args.temperature, max_tokens=warm_tokens * (len(args.branching) + 1),
                              ignore_eos=True, seed=1)
        TreeSampler(backend, short).rollout(prompts, warm)
        run_flat(backend, prompts, n, warm, args.device)
    trees, flats = [], []
    for _ in range(args.repeats):  # alternate, so a slow spell of a shared machine hits both
        trees.append(run_tree(backend, spec, prompts, params, args.device))
        flats.append(run_flat(backend, prompts, n, params, args.device))
    tree, flat = median_wall(trees), median_wall(flats)
    print("tree:", tree["summary"], flush=True)
    if flat["reused_tokens"]:
        print(f"warning: the flat run reused {flat['reused_tokens']} cached prompt tokens", flush=True)
    rows = [tree, flat]
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(receipt(args, model_name, backend, rows), indent=2) + "\n")
        print(f"wrote {args.out}")
    print(table(rows))


if __name__ == "__main__":
    main()
