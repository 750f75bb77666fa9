"""Where a decode step's time goes: host scheduling, graph replay, sampling (GPU, CUDA events + wall).

    python benchmarks/profile_decode.py --model qwen2.5-1.5b --batches 1,128 --prompt-len 512 --steps 64

Wraps the engine's step phases with synchronising timers (so phases don't overlap: the sum is a bit
more than a real step) and prints ms per step for each phase, then a torch.profiler table of the
top CUDA kernels of a few steps.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

sys.path.insert(0, os.path.dirname(__file__))
from engine_throughput import load_model  # noqa: E402
from thaw_rl import SamplingParams, ThawEngine  # noqa: E402
from thaw_rl.engine import engine as engine_mod  # noqa: E402


def timed(phases, name, fn):
    def wrapper(*a, **k):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(*a, **k)
        torch.cuda.synchronize()
        phases[name] += time.perf_counter() - t0
        return out

    return wrapper


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-1.5b")
    ap.add_argument("--batches", default="1,128")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--compile-layers", action="store_true")
    args = ap.parse_args()
    model, tok = load_model(args.model, torch.bfloat16, "cuda")
    engine = ThawEngine(model, tok, kv_cache_memory=0.4, compile_layers=args.compile_layers)
    vocab = model.config.vocab_size
    for b in [int(x) for x in args.batches.split(",")]:
        g = torch.Generator().manual_seed(b)
        prompts = [torch.randint(10, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(b)]
        params = SamplingParams(temperature=1.0, max_tokens=args.steps, ignore_eos=True, seed=0)
        for _ in range(2):  # warm-up (graph capture) then timed plain run
            sessions = engine.prefill_many(prompts)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.generate(sessions, params)
            torch.cuda.synchronize()
            plain = time.perf_counter() - t0
            for s in sessions:
                engine.free(s)
        phases = collections.Counter()
        runner, graphs = engine.runner, engine.runner.graphs
        originals = (graphs._fill, graphs.forward, engine._sample, engine.scheduler.schedule, engine_mod.sample)
        graphs._fill = timed(phases, "fill static buffers", graphs._fill)
        orig_replay_forward = graphs.forward
        graphs.forward = timed(phases, "graph forward (fill+replay)", orig_replay_forward)
        engine._sample = timed(phases, "_sample (build+sample+tolist)", engine._sample)
        engine_mod.sample = timed(phases, "sample() kernels", engine_mod.sample)
        engine.scheduler.schedule = timed(phases, "schedule", engine.scheduler.schedule)
        sessions = engine.prefill_many(prompts)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.generate(sessions, params)
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
        graphs._fill, graphs.forward, engine._sample, engine.scheduler.schedule, engine_mod.sample = originals
        for s in sessions:
            engine.free(s)
        print(f"\nbatch {b}: plain step {plain / args.steps * 1e3:.2f} ms, instrumented {total / args.steps * 1e3:.2f} ms")
        for name, sec in phases.most_common():
            print(f"  {name:34s} {sec / args.steps * 1e3:7.3f} ms/step")
        sessions = engine.prefill_many(prompts)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            engine.generate(sessions, SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=0))
            torch.cuda.synchronize()
        for s in sessions:
            engine.free(s)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main()
