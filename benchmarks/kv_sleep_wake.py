"""Self-check and timing of ThawEngine.sleep / wake_up: the KV pool mapped on demand (VMM) vs allocated through PyTorch.

For each pool size and each path (``vmm``: ``kv_cache_vmm=True``; ``pytorch``: ``kv_cache_vmm=False``, today's
release/reallocate), one engine over the same random-weight model:

1. a GRPO-shaped greedy rollout (``--prompts`` prompts prefilled once, forked ``--group`` ways, ``--max-tokens``
   each, eos ignored) is the reference; then ``--cycles`` times: the same rollout again without sleeping (``kept``),
   then sleep, wake_up and the rollout once more (``after wake``: the on-demand mapping, or the reallocation and
   graph recapture, happen inside it);
2. checks, per cycle: ``torch.cuda.mem_get_info`` gains at least what the pool held (``returned``), the KV
   tensor's address is unchanged (``ptr``), the captured CUDA graphs are the same objects (``graphs``: none was
   recaptured) and greedy tokens equal the reference (``greedy``). On the vmm path every check must hold (exit
   code 1 otherwise); on the pytorch path ptr and graphs are reported (they hold only when the allocator
   happens to give the same address back);
3. times: sleep and wake_up (ms, device synchronised), the rollout kept vs after a wake (median, ms), and on the
   vmm path how long mapping the whole pool takes, and zeroing it (``map all``, ``zero all``: what a wake would
   cost without on-demand mapping).

On CPU (``--device cpu``, a tiny Qwen2) only the pytorch path exists (``kv_cache_vmm=None`` falls back): the
script runs end to end so it is tested before GPU time is spent.

    python benchmarks/kv_sleep_wake.py --out benchmarks/results/kv_sleep_wake_h200.json     # H200: 8 and 60 GB
    python benchmarks/kv_sleep_wake.py --device cpu                                           # seconds

Prints a short table last; ``--out`` writes a JSON receipt (benchmarks/receipt_utils.py).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from engine_throughput import load_model, sync  # noqa: E402
from receipt_utils import receipt, write_receipt  # noqa: E402

from thaw_rl import SamplingParams, ThawEngine  # noqa: E402

GiB = 2**30


def free_memory(device: torch.device) -> int:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0


def rollout(engine: ThawEngine, prompts: list[list[int]], group: int, max_tokens: int) -> tuple[list, float]:
    """Greedy GRPO-shaped rollout; (tokens per leaf, seconds). Every session is freed at the end."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    sync(engine.device)
    start = time.perf_counter()
    parents = engine.prefill_many(prompts)
    leaves = [kid for p in parents for kid in engine.fork(p, group)]
    outs = engine.generate(leaves, params)
    sync(engine.device)
    seconds = time.perf_counter() - start
    for s in parents + leaves:
        engine.free(s)
    return [o.token_ids for o in outs], seconds


def graph_ids(engine: ThawEngine) -> dict[int, int]:
    graphs = engine.runner.graphs
    return {} if graphs is None else {bs: id(g) for bs, (g, _) in graphs.graphs.items()}


def check_path(model, prompts, args, path: str, pool_bytes: int) -> dict:
    device = next(model.parameters()).device
    vmm = {"vmm": True, "pytorch": False, "auto": None}[path]
    engine = ThawEngine(model, None, kv_cache_memory=pool_bytes, kv_cache_vmm=vmm)
    cache = engine.kv_cache
    ref, first_seconds = rollout(engine, prompts, args.group, args.max_tokens)
    ptr, graphs = cache.kv.data_ptr(), graph_ids(engine)
    row = {"path": path, "uses_vmm": cache.vmm is not None, "first_rollout_ms": first_seconds * 1e3,
           "pool_gib": cache.capacity * engine.spec.bytes_per_block / GiB, "num_graphs": len(graphs), "cycles": []}
    for _ in range(args.cycles):
        tokens, kept = rollout(engine, prompts, args.group, args.max_tokens)
        held = cache.mapped_bytes
        before = free_memory(device)
        start = time.perf_counter()
        engine.sleep()
        sync(device)
        sleep_ms = (time.perf_counter() - start) * 1e3
        returned = free_memory(device) - before
        start = time.perf_counter()
        engine.wake_up()
        sync(device)
        wake_ms = (time.perf_counter() - start) * 1e3
        again, after_wake = rollout(engine, prompts, args.group, args.max_tokens)
        row["cycles"].append({
            "held_gib": held / GiB, "returned_gib": returned / GiB, "sleep_ms": sleep_ms, "wake_ms": wake_ms,
            "kept_ms": kept * 1e3, "after_wake_ms": after_wake * 1e3,
            "mapped_gib": cache.mapped_bytes / GiB,
            "memory_returned": device.type != "cuda" or returned >= 0.95 * held,
            "ptr_same": cache.kv.data_ptr() == ptr, "graphs_same": graph_ids(engine) == graphs,
            # the claim: after sleep + wake (prefix cache dropped, fresh prefill) the rollout equals the first
            "greedy_same": again == ref,
            # not a sleep/wake property: the kept rollout hits the prefix cache (its prompts' last token is
            # recomputed alone), which in bf16 may flip a near-tie on random weights; reported, not checked
            "greedy_same_prefix_cache_hit": tokens == ref,
        })
    if cache.vmm is not None:  # what mapping the whole pool costs (what a wake would cost without mapping on demand)
        engine.sleep()
        engine.wake_up()
        sync(device)
        start = time.perf_counter()
        fresh = cache.vmm.map(cache._byte_ranges(cache.capacity))  # what grow(capacity) does, timed in two parts
        sync(device)
        row["map_all_ms"] = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        cache._zero(fresh)
        sync(device)
        row["zero_all_ms"] = (time.perf_counter() - start) * 1e3
        cache.grow(cache.capacity)  # nothing left to map: sets num_blocks
        row["map_all_runs"] = len(cache.vmm._mapped)
        row["granularity_mib"] = cache.vmm.granularity / 2**20
        engine.block_manager.grow(cache.capacity)
        ids, _ = rollout(engine, prompts, args.group, args.max_tokens)
        row["greedy_same_all_mapped"] = ids == ref
    cycles = row["cycles"]
    for key in ("sleep_ms", "wake_ms", "kept_ms", "after_wake_ms", "returned_gib", "held_gib"):
        row[key] = statistics.median(c[key] for c in cycles)
    row["ok"] = (all(c["greedy_same"] and c["memory_returned"] for c in cycles)
                 and row.get("greedy_same_all_mapped", True))
    if row["uses_vmm"]:
        row["ok"] = row["ok"] and all(c["ptr_same"] and c["graphs_same"] for c in cycles)
    engine.close()
    del engine, cache
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default=None, help="qwen2.5-1.5b (CUDA default, random weights) or tiny-qwen2 (CPU)")
    ap.add_argument("--pools", default=None, help="KV pool sizes in bytes, comma-separated (CUDA: 8e9,60e9)")
    ap.add_argument("--paths", default=None, help="vmm,pytorch on CUDA; pytorch on CPU (or auto)")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--group", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    gpu = args.device == "cuda"
    defaults = dict(model="qwen2.5-1.5b", pools="8e9,60e9", paths="vmm,pytorch", prompts=8, group=16, prompt_len=512,
                    max_tokens=256) if gpu else dict(model="tiny-qwen2", pools="2e6,8e6", paths="pytorch", prompts=2,
                                                     group=3, prompt_len=20, max_tokens=12)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    dtype = torch.bfloat16 if gpu and not args.model.startswith("tiny-") else torch.float32
    model = load_model(args.model, dtype, args.device)[0]
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, model.config.vocab_size, (args.prompts, args.prompt_len), generator=g).tolist()
    rows = []
    for pool in args.pools.split(","):
        for path in args.paths.split(","):
            try:
                rows.append(check_path(model, prompts, args, path, int(float(pool))))
            except Exception as err:  # recorded, and the other paths still run
                traceback.print_exc()
                rows.append({"path": path, "pool_bytes": int(float(pool)), "ok": False,
                             "error": f"{type(err).__name__}: {err}"})
                gc.collect()
    write_receipt(args.out, receipt("kv_sleep_wake", args, rows))
    print(f"\n{args.model} on {args.device}, {args.prompts}x{args.group} rollouts of {args.prompt_len}+"
          f"{args.max_tokens} tokens, medians of {args.cycles} cycles")
    print(f"{'path':8} {'pool GiB':>8} {'held GiB':>8} {'back GiB':>8} {'sleep ms':>8} {'wake ms':>8} "
          f"{'kept ms':>8} {'woke ms':>8} {'map all ms':>10} {'zero all ms':>11} {'ptr':>4} {'graphs':>6} "
          f"{'greedy':>6} {'ok':>3}")
    for r in rows:
        if "error" in r:
            print(f"{r['path']:8} {r['pool_bytes'] / GiB:8.1f} failed: {r['error'][:100]}")
            continue
        c = r["cycles"]
        flag = lambda key: "yes" if all(x[key] for x in c) else "NO"  # noqa: E731
        map_all = f"{r['map_all_ms']:.1f}" if "map_all_ms" in r else "-"
        zero_all = f"{r['zero_all_ms']:.1f}" if "zero_all_ms" in r else "-"
        print(f"{r['path']:8} {r['pool_gib']:8.1f} {r['held_gib']:8.2f} {r['returned_gib']:8.2f} {r['sleep_ms']:8.1f} "
              f"{r['wake_ms']:8.1f} {r['kept_ms']:8.0f} {r['after_wake_ms']:8.0f} {map_all:>10} {zero_all:>11} "
              f"{flag('ptr_same'):>4} {flag('graphs_same'):>6} {flag('greedy_same'):>6} {'yes' if r['ok'] else 'NO':>3}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
