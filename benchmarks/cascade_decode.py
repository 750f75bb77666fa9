"""GRPO decode steps through the whole engine: plain paged attention vs cascade attention, in CUDA graphs and eager.

``paged_attention.py --cascade`` and ``grpo_decode_attention.py`` time the attention kernels alone; this asks
whether cascade pays in a real decode step. For each batch (``--batches`` rows = rows/G prompts of
``--prompt-len`` tokens, each prefilled once and forked into a group of ``--group``), one engine per variant
decodes ``--steps`` tokens per row (temperature 1, a fixed seed, ignore_eos):

- ``graphs``: CUDA graphs, plain paged attention (``cascade_attention="off"``);
- ``graphs+cascade``: CUDA graphs, cascade in every step with a group (``"on"``: the plan in the graphs'
  static buffers, one capture per rounded plan shape);
- ``graphs+auto``: the default engine (``"auto"``: cascade where ``engine/cascade.py``'s rule says it pays);
- ``eager``: CUDA graphs off, plain attention; ``eager+cascade``: CUDA graphs off, ``"on"``.

Reported: ms per decode step (generate wall time / forward steps, after a warm-up call), and the share of
sampled tokens equal to the ``graphs`` variant's (bf16: a different reduction order may flip a rare token).

    python benchmarks/cascade_decode.py --model qwen2.5-1.5b --batches 256,1024 --prompt-len 2048 --steps 64 \\
        --compile-layers --variants graphs,graphs+auto --out benchmarks/results/cascade_decode_h200.json
    python benchmarks/cascade_decode.py --model tiny-qwen2 --batches 8 --group 4 --prompt-len 48 --steps 4   # CPU
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from engine_throughput import load_model, sync  # noqa: E402
from receipt_utils import receipt, write_receipt  # noqa: E402

from thaw_rl import SamplingParams, ThawEngine  # noqa: E402

VARIANTS = {"graphs": dict(cascade_attention="off"), "graphs+cascade": dict(cascade_attention="on"),
            "graphs+auto": dict(), "eager": dict(use_cuda_graphs=False, cascade_attention="off"),
            "eager+cascade": dict(use_cuda_graphs=False, cascade_attention="on")}


def decode_call(engine, prompts, group, params, device):
    """Prefill each prompt once, fork it into its group, generate; (seconds, forward steps, tokens)."""
    trunks = engine.prefill_many(prompts)
    kids = [k for t in trunks for k in engine.fork(t, group)]
    sync(device)
    steps0 = engine.stats.num_forward_steps
    t0 = time.perf_counter()
    out = engine.generate(kids, params)
    sync(device)
    seconds = time.perf_counter() - t0
    steps = max(engine.stats.num_forward_steps - steps0, 1)
    for s in kids + trunks:
        engine.free(s)
    return seconds, steps, [c.token_ids for c in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-1.5b")
    ap.add_argument("--batches", default="128,1024", help="decode rows per step, comma-separated")
    ap.add_argument("--group", type=int, default=16, help="rows per prompt (GRPO group size)")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64, help="tokens per row")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--compile-layers", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tok = load_model(args.model, dtype, str(device))
    batches = [int(x) for x in args.batches.split(",")]
    variants = args.variants.split(",")
    params = SamplingParams(temperature=1.0, max_tokens=args.steps, ignore_eos=True, seed=0)
    rows, reference = [], {}
    for name in variants:
        kv = 0.4 if device.type == "cuda" else 1 << 28
        engine = ThawEngine(model, tok, kv_cache_memory=kv, compile_layers=args.compile_layers,
                            max_num_seqs=max(256, *batches), **VARIANTS[name])
        for b in batches:
            g = torch.Generator().manual_seed(b)
            prompts = [torch.randint(10, model.config.vocab_size, (args.prompt_len,), generator=g).tolist()
                       for _ in range(max(b // args.group, 1))]
            decode_call(engine, prompts, args.group, params, device)  # warm-up: capture, compile, autotune
            seconds, steps, tokens = decode_call(engine, prompts, args.group, params, device)
            flat = [t for row in tokens for t in row]
            ref = reference.setdefault(b, flat)
            agree = sum(x == y for x, y in zip(flat, ref)) / max(len(ref), 1)
            cascade_steps = engine.stats.num_cascade_steps  # warm-up call included
            rows.append(dict(variant=name, batch=b, step_ms=seconds / steps * 1e3, steps=steps,
                             token_agreement_vs_first=agree, cascade_steps=cascade_steps))
            print(rows[-1], flush=True)
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_receipt(args.out, receipt("cascade_decode", args, rows))
    print(f"{'batch':>6} {'variant':>14} {'ms/step':>9} {'vs graphs':>10} {'tokens = first':>15}")
    for r in rows:
        base = next((x["step_ms"] for x in rows if x["batch"] == r["batch"] and x["variant"] == "graphs"), None)
        ratio = f"{base / r['step_ms']:.2f}x" if base else "-"
        print(f"{r['batch']:>6} {r['variant']:>14} {r['step_ms']:>9.2f} {ratio:>10} {r['token_agreement_vs_first']:>15.3f}")


if __name__ == "__main__":
    main()
