"""Where a decode step's time goes, synchronous steps against the async decode loop, in one call.

    python benchmarks/profile_decode.py --model qwen2.5-1.5b --batches 128,1024 --prompt-len 512 --steps 64 \
        --compile-layers --out benchmarks/results/profile_decode_h200.json

For each batch size, after a warm-up of both modes (graph capture, compile):

- ``sync`` (``engine.async_decode = False``, the engine before the async loop): the plain step time, then
  the same call with each phase wrapped in synchronising timers (phases don't overlap there: their sum is a
  bit more than a real step): scheduling, filling the static buffers, graph replay, sampling.
- ``async`` (the default): the plain step time; the host's own time per step from ``DecodeProfile``
  (prepare the next inputs, launch forward + sampler, process the previous step's tokens) and how long it
  waited for the device; the device's time per step from CUDA events around forward + sampler (they do not
  synchronise, so the loop runs as it does unprofiled). A step costs about max(GPU, host): when ``wait`` is
  most of the step, the host work is off the critical path.
- ``fixed ms/call`` and ``marginal ms/step`` (async): the same call timed again at ``--steps // 8`` tokens (at
  least 2); the line through both lengths splits the call's wall time into a per-call part (checks, requests,
  the first token, the rows joining, completions, the final sync) and the cost of one more step. ``step ms``
  spreads the per-call part over the steps, so it is above ``marginal`` by about ``fixed / steps``.
- ``syncs/step``: CUDA synchronisations PyTorch reports in the decode call (``set_sync_debug_mode``), per
  forward step; the async loop's only wait is the event of the late token copy, which is not counted.

Runs on CPU too (``--model tiny-qwen2 --batches 2,8 --prompt-len 32 --steps 8``, or smollm2): there is no
device column, and "launch" is the forward itself (CPU ops run as they are issued), so only totals compare.
Prints a short table last and writes a JSON receipt with ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from engine_throughput import load_model, sync  # noqa: E402
from receipt_utils import receipt, write_receipt  # noqa: E402

from thaw_rl import SamplingParams, ThawEngine  # noqa: E402
from thaw_rl.engine import engine as engine_mod  # noqa: E402
from thaw_rl.engine.engine import DecodeProfile  # noqa: E402


def timed(phases, name, fn, device):
    """Wrap fn so its time, device work included, adds to phases[name] (synchronises before and after)."""

    def wrapper(*a, **k):
        sync(device)
        t0 = time.perf_counter()
        out = fn(*a, **k)
        sync(device)
        phases[name] += time.perf_counter() - t0
        return out

    return wrapper


class GpuTimer:
    """CUDA events around each async step's forward and sampler: device time without synchronising."""

    def __init__(self, engine):
        self.engine, self.pairs = engine, []
        self.runner_fwd, self.sample = engine.runner.forward_decode, engine_mod.sample

    def __enter__(self):
        def forward_decode(*a, **k):
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self.pairs.append([start, None])
            return self.runner_fwd(*a, **k)

        def sample(*a, **k):
            out = self.sample(*a, **k)
            if self.pairs and self.pairs[-1][1] is None:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self.pairs[-1][1] = end
            return out

        self.engine.runner.forward_decode, engine_mod.sample = forward_decode, sample
        return self

    def __exit__(self, *exc):
        self.engine.runner.forward_decode, engine_mod.sample = self.runner_fwd, self.sample

    def seconds(self) -> float:
        torch.cuda.synchronize()
        return sum(a.elapsed_time(b) for a, b in self.pairs if b is not None) / 1e3


def make_sessions(engine, prompts, group: int):
    """One session per row: each prompt prefilled once and forked into ``group`` rows that share its blocks
    (a GRPO group, as the thaw trainers sample it); group 1: every row its own prompt. The parents are freed
    once forked (their children hold the shared blocks), so no call leaves blocks held behind it."""
    if group == 1:
        return engine.prefill_many(prompts)
    parents = engine.prefill_many(prompts)
    kids = [kid for s in parents for kid in engine.fork(s, group)]
    for s in parents:
        engine.free(s)
    return kids


def run_call(engine, prompts, params, device, count_syncs=False, group: int = 1):
    """prefill, generate (timed), free; returns (seconds, forward steps, CUDA syncs reported in generate, tokens).

    The prefix cache is dropped first, so every call prefills the same way: on a cache hit the engine recomputes
    each prompt's last token, whose bf16 K/V and logits differ slightly from the full prefill's (H200: 60 of 128
    forked rows diverged from token 2 on), and sync vs async tokens would compare unlike runs."""
    engine.reset_prefix_cache()
    sessions = make_sessions(engine, prompts, group)
    sync(device)
    steps0 = engine.stats.num_forward_steps
    syncs = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if count_syncs and device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        t0 = time.perf_counter()
        try:
            out = engine.generate(sessions, params)
            sync(device)
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        seconds = time.perf_counter() - t0
        syncs = sum("synchroniz" in str(w.message) for w in caught)
    steps = engine.stats.num_forward_steps - steps0
    for s in sessions:
        engine.free(s)
    return seconds, max(steps, 1), syncs, [c.token_ids for c in out]


KERNEL_KINDS = (  # first match wins; names as CUPTI reports them on Hopper (cuBLAS, Triton, inductor, ATen)
    ("attention", ("paged", "cascade", "flash", "attn")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas", "splitk")),
    ("kv write", ("index_put", "scatter", "kv_write")),
    ("fused elementwise (inductor)", ("triton_",)),
    ("copy", ("memcpy", "copy", "memset", "fill")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def kernel_breakdown(engine, prompts, group: int = 1, steps: int = 8, context: int = 0) -> dict:
    """One torch.profiler pass over ``steps`` decode steps: device time and launches per step, by kind and
    for the top kernels (kernels replayed inside CUDA graphs are traced one by one).

    ``context``: tokens each row decodes first, unprofiled, so the profiled steps attend over tails of that
    length (a rollout's middle rather than its first steps); the wall time per step of ``4 * steps`` more
    tokens is timed then too, without the profiler (``step_ms``)."""
    from torch.autograd import DeviceType

    engine.reset_prefix_cache()
    sessions = make_sessions(engine, prompts, group)
    step_ms = None
    if context:
        engine.generate(sessions, SamplingParams(temperature=1.0, max_tokens=context, ignore_eos=True, seed=1))
        torch.cuda.synchronize()
        steps0, t0 = engine.stats.num_forward_steps, time.perf_counter()
        engine.generate(sessions, SamplingParams(temperature=1.0, max_tokens=4 * steps, ignore_eos=True, seed=2))
        torch.cuda.synchronize()
        step_ms = (time.perf_counter() - t0) * 1e3 / max(engine.stats.num_forward_steps - steps0, 1)
    torch.cuda.synchronize()
    steps0 = engine.stats.num_forward_steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        engine.generate(sessions, SamplingParams(temperature=1.0, max_tokens=steps, ignore_eos=True, seed=0))
        torch.cuda.synchronize()
    n = max(engine.stats.num_forward_steps - steps0, 1)
    for s in sessions:
        engine.free(s)
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    by_kind = collections.defaultdict(lambda: [0.0, 0])
    for e in kernels:
        kind = by_kind[kernel_kind(e.key)]
        kind[0] += e.self_device_time_total / 1e3 / n
        kind[1] += e.count / n
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:20]
    out = dict(steps=n, context=context, step_ms=step_ms, total_ms=sum(v[0] for v in by_kind.values()),
               launches=sum(v[1] for v in by_kind.values()),
               by_kind={k: dict(ms=v[0], launches=v[1]) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1][0])},
               top=[dict(name=e.key[:90], ms=e.self_device_time_total / 1e3 / n, launches=e.count / n) for e in top])
    print(f"  kernels: {out['total_ms']:.2f} ms and {out['launches']:.0f} launches per step ({n} steps profiled"
          + (f" after {context} tokens a row; wall {step_ms:.2f} ms a step there)" if context else ")"))
    for kind, v in out["by_kind"].items():
        print(f"    {kind:30s} {v['ms']:7.3f} ms {v['launches']:6.0f} launches")
    for t in out["top"]:
        print(f"      {t['ms']:7.3f} ms {t['launches']:5.0f}x  {t['name']}")
    return out


def fixed_and_marginal(engine, prompts, max_tokens: int, long_s: float, long_steps: int, device, group: int,
                       repeats: int = 2) -> dict:
    """The same async call at two lengths: ``max_tokens`` (timed already: ``long_s``, ``long_steps`` forward
    steps) and a short one (``max_tokens // 8``, at least 2 tokens), each timed ``repeats`` times, the fastest
    kept. A straight line through the two (time against forward steps) splits a call into ``fixed_ms``, what it
    costs whatever its length (checks, requests, the first token sampled from the prefill's logits, the rows
    joining the first decode step, the completions, the final sync), and ``marginal_step_ms``, what one more
    forward step costs. ``step_ms`` (wall / steps) is their sum with the fixed part spread over the steps."""
    short_tokens = max(2, max_tokens // 8)
    long_times = [long_s] + [run_call(engine, prompts, _params(max_tokens), device, group=group)[0]
                             for _ in range(repeats - 1)]
    short = [run_call(engine, prompts, _params(short_tokens), device, group=group)[:2] for _ in range(repeats)]
    short_s, short_steps = min(t for t, _ in short), short[0][1]
    long_s = min(long_times)
    if long_steps <= short_steps:
        raise SystemExit(f"--steps {max_tokens} is too short to split fixed from per-step cost; give --steps >= 4")
    marginal = (long_s - short_s) / (long_steps - short_steps)
    return dict(fixed_ms=(long_s - marginal * long_steps) * 1e3, marginal_step_ms=marginal * 1e3,
                short_steps=short_steps, long_steps=long_steps, short_ms=short_s * 1e3, long_ms=long_s * 1e3)


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True, seed=0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-1.5b")
    ap.add_argument("--batches", default="128,1024")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64, help="tokens per row (decode steps)")
    ap.add_argument("--compile-layers", action="store_true")
    ap.add_argument("--group", type=int, default=1,
                    help="rows per prompt: each prompt prefilled once and forked (16: a GRPO step's decode batch)")
    ap.add_argument("--kernels", action="store_true", help="also print a torch.profiler table of top CUDA kernels")
    ap.add_argument("--kernel-context", type=int, default=0,
                    help="with --kernels: tokens each row decodes before the profiled steps (their tails' length)")
    ap.add_argument("--fuse-qkv", choices=("auto", "on", "off"), default="auto",
                    help="the engine's fused q/k/v projections (auto: its default, on for CUDA)")
    ap.add_argument("--cascade", choices=("auto", "on", "off"), default="auto",
                    help="the engine's cascade (shared-prefix) attention (auto: its default; it runs in the async "
                         "loop's graph steps only, so bf16 rounding can make the two loops' draws differ)")
    ap.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                    help="auto: the model's dtype; fp8: float8_e4m3fn KV cache (half the bytes; rounds K/V)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tok = load_model(args.model, dtype, str(device))  # tiny-llama/-qwen2/-qwen3: a seconds-long CPU check
    batches = [int(x) for x in args.batches.split(",")]
    kv = 0.4 if device.type == "cuda" else 1 << 30
    engine = ThawEngine(model, tok, kv_cache_memory=kv, compile_layers=args.compile_layers,
                        max_num_seqs=max(256, *batches),
                        fuse_qkv={"auto": None, "on": True, "off": False}[args.fuse_qkv], cascade_attention=args.cascade,
                        kv_cache_dtype=args.kv_cache_dtype)
    fused_layers = engine.runner.fused_qkv.num_layers if engine.runner.fused_qkv is not None else 0
    print(f"fused q/k/v projections in {fused_layers} of {model.config.num_hidden_layers} layers")
    vocab = model.config.vocab_size
    rows = []
    for b in batches:
        g = torch.Generator().manual_seed(b)
        if b % args.group:
            raise SystemExit(f"batch {b} is not a multiple of --group {args.group}")
        prompts = [torch.randint(10, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(b // args.group)]
        params = _params(args.steps)
        tokens, cascade_steps = {}, {}
        for mode in (False, True):  # warm-up: graph capture for every size, compile, autotune
            engine.async_decode = mode
            before = engine.stats.num_cascade_steps
            tokens[mode] = run_call(engine, prompts, params, device, group=args.group)[3]
            cascade_steps[mode] = engine.stats.num_cascade_steps - before
        # no row stops early (ignore_eos), so both modes run the same batches: the same tokens, exactly, unless
        # only one of them ran cascade attention (a different bf16 reduction order can flip a draw)
        same_tokens = tokens[False] == tokens[True]
        pairs = [(a, b) for ra, rb in zip(tokens[False], tokens[True]) for a, b in zip(ra, rb)]
        agreement = sum(a == b for a, b in pairs) / max(1, len(pairs))
        print(f"batch {b}: async tokens == sync tokens: {same_tokens} (agreement {agreement:.3f}; cascade steps "
              f"sync {cascade_steps[False]}, async {cascade_steps[True]}); LM head written into the graphs' "
              f"buffer: {engine.runner.direct_lm_head}")

        # -- sync: plain, then phases under synchronising timers --
        engine.async_decode = False
        plain, steps, syncs, _ = run_call(engine, prompts, params, device, count_syncs=True, group=args.group)
        phases = collections.Counter()
        graphs = engine.runner.graphs
        saved = (engine._sample, engine.scheduler.schedule, engine_mod.sample,
                 graphs and graphs._fill, graphs and graphs.forward)
        engine._sample = timed(phases, "sampling (build + sample + tolist)", engine._sample, device)
        engine_mod.sample = timed(phases, "  of which sample() kernels", engine_mod.sample, device)
        engine.scheduler.schedule = timed(phases, "schedule", engine.scheduler.schedule, device)
        if graphs is not None:
            graphs._fill = timed(phases, "  of which fill static buffers", graphs._fill, device)
            graphs.forward = timed(phases, "graph forward (fill + replay)", graphs.forward, device)
        instrumented, isteps, _, _ = run_call(engine, prompts, params, device, group=args.group)
        engine._sample, engine.scheduler.schedule, engine_mod.sample = saved[:3]
        if graphs is not None:
            graphs._fill, graphs.forward = saved[3:]
        sync_row = dict(batch=b, mode="sync", same_tokens=same_tokens, token_agreement=agreement,
                        cascade_steps_per_call={"sync": cascade_steps[False], "async": cascade_steps[True]},
                        direct_lm_head=engine.runner.direct_lm_head,
                        fused_qkv_layers=fused_layers, step_ms=plain / steps * 1e3, steps=steps, syncs_per_step=syncs / steps,
                        phases_ms={k: v / isteps * 1e3 for k, v in phases.items()},
                        instrumented_step_ms=instrumented / isteps * 1e3)
        print(f"\nbatch {b} sync: step {sync_row['step_ms']:.2f} ms (instrumented {sync_row['instrumented_step_ms']:.2f})")
        for name, ms in sync_row["phases_ms"].items():
            print(f"  {name:38s} {ms:8.3f} ms/step")

        # -- async: plain, then host phases (DecodeProfile) and device time (CUDA events) --
        engine.async_decode = True
        plain, steps, syncs, _ = run_call(engine, prompts, params, device, count_syncs=True, group=args.group)
        engine.decode_profile = prof = DecodeProfile()
        if device.type == "cuda":
            with GpuTimer(engine) as gpu:
                instrumented, _, _, _ = run_call(engine, prompts, params, device, group=args.group)
            gpu_s = gpu.seconds()
        else:
            instrumented, _, _, _ = run_call(engine, prompts, params, device, group=args.group)
            gpu_s = None
        engine.decode_profile = None
        fit = fixed_and_marginal(engine, prompts, args.steps, plain, steps, device, args.group)
        n = max(prof.steps, 1)
        host = {k: getattr(prof, k) / n * 1e3 for k in ("prepare", "launch", "process", "wait")}
        async_row = dict(batch=b, mode="async", same_tokens=same_tokens, fused_qkv_layers=fused_layers, step_ms=plain / steps * 1e3, steps=steps, syncs_per_step=syncs / steps,
                         async_steps=prof.steps, rows_per_step=prof.rows / n, host_ms=host,
                         host_work_ms=host["prepare"] + host["launch"] + host["process"],
                         gpu_ms=gpu_s / n * 1e3 if gpu_s is not None else None,
                         instrumented_step_ms=instrumented / n * 1e3, **fit,
                         # the profiled call's time outside the loop (checks, requests, the first token, the
                         # completions) and the loop's own per-call parts, all host ms per call
                         outside_loop_ms=(instrumented - prof.loop) * 1e3, loop_runs=prof.runs,
                         first_prepare_ms=prof.first_prepare * 1e3, last_process_ms=prof.last_process * 1e3,
                         used_blocks_after=engine.stats.num_used_blocks)  # 0: every call freed what it took
        print(f"batch {b} async: step {async_row['step_ms']:.2f} ms; host work {async_row['host_work_ms']:.2f} ms/step "
              f"(prepare {host['prepare']:.3f}, launch {host['launch']:.3f}, process {host['process']:.3f}), "
              f"waiting on the device {host['wait']:.3f}"
              + (f", device {async_row['gpu_ms']:.2f} ms/step" if gpu_s is not None else ""))
        print(f"batch {b} async: {fit['fixed_ms']:.2f} ms per call + {fit['marginal_step_ms']:.3f} ms per step "
              f"(calls of {fit['short_steps']} and {fit['long_steps']} forward steps: {fit['short_ms']:.2f} and "
              f"{fit['long_ms']:.2f} ms); per call outside the loop {async_row['outside_loop_ms']:.2f} ms, first "
              f"step's prepare {async_row['first_prepare_ms']:.2f}, last step's process "
              f"{async_row['last_process_ms']:.2f}")
        rows += [sync_row, async_row]

        if args.kernels and device.type == "cuda":
            async_row["kernels"] = kernel_breakdown(engine, prompts, args.group, context=args.kernel_context)

    write_receipt(args.out, receipt("profile_decode", args, rows))
    print(f"\ndevice={device} model={args.model} prompt={args.prompt_len} group={args.group} steps={args.steps} "
          f"compile_layers={args.compile_layers}")
    print("| batch | mode | step ms | device ms | host work ms | host waits ms | fixed ms/call | marginal ms/step "
          "| syncs/step | same tokens |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        gpu = f"{r['gpu_ms']:.2f}" if r.get("gpu_ms") is not None else "-"
        work = f"{r['host_work_ms']:.2f}" if "host_work_ms" in r else "(serial)"
        wait = f"{r['host_ms']['wait']:.2f}" if "host_ms" in r else "-"
        fixed = f"{r['fixed_ms']:.1f}" if "fixed_ms" in r else "-"
        marginal = f"{r['marginal_step_ms']:.2f}" if "marginal_step_ms" in r else "-"
        print(f"| {r['batch']} | {r['mode']} | {r['step_ms']:.2f} | {gpu} | {work} | {wait} | {fixed} | {marginal} "
              f"| {r['syncs_per_step']:.2f} | {r['same_tokens']} |")


if __name__ == "__main__":
    main()
