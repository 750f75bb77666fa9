"""ForkPool rounds: fork a long trunk into branches, decode them, free them, with trunks moved between workers.

The seed project's receipt shape: 5 rounds x 4 branches x 64 tokens from a 4,000-token trunk on a
random-weight Llama-3-8B (bf16). Each pool size in ``--workers`` gets its own pool (placement "spread",
so with 2 workers half the branches run in the worker that does not hold the trunk; on one GPU both
workers share it, which exercises snapshot/restore across processes):

- warm rounds: one trunk, forked every round. The first round snapshots it and the other worker restores
  it; later rounds fork from the copy that worker kept (no transfer).
- cold rounds: a fresh trunk every round (prefilled on worker 0 with the prefix caches reset, outside the
  round's time), so every round pays snapshot + transfer + restore.

Each trunk transport in ``--transport`` gets its own 2-worker pool (``ForkPool(trunk_transport=...)``):
"host" (the snapshot gathers into shared memory registered with CUDA, the other worker's restore reads
it) and "device" (a device buffer handed over as a CUDA IPC handle, copied peer-to-peer when the workers
are on different GPUs); "auto" is "device" between CUDA workers.

Parts of a round: fork (the caller's wall time in ``fork``: the "total" of a cold fork), of which
snapshot (the gather into the export buffer, in the trunk's worker), restore (the scatter into the other
worker's blocks) and transfer (the rest: pipes, opening the shared memory or the CUDA IPC handle, the
peer copy); GB/s is the trunk's bytes over the whole fork; decode (the ``generate`` call). Beside them:
re-prefill, the time to prefill the trunk from scratch, which is what a pool without snapshot transport
would pay in each other worker. A breakdown table before it splits the fork further (the workers' counters):
alloc (taking an export buffer; a new one is a cudaMalloc), gather, share (pickling IPC handles), open
(opening a handle, or mapping shared memory), peer copy, restore, other (pipes and the parent), with the
number of buffers allocated, handles sent, buffers opened and opened buffers reused.

    python benchmarks/fork_pool.py --devices cuda:0,cuda:0 --out benchmarks/results/fork_pool_1gpu.json
    python benchmarks/fork_pool.py --devices cuda:0,cuda:1 --workers 2 --out benchmarks/results/fork_pool_2gpu.json
    python benchmarks/fork_pool.py --smoke                                                # tiny, CPU, < 1 min
    python benchmarks/fork_pool.py --check --devices cuda:0,cuda:1   # a device-path fork continues exactly like
                                                                     # a same-worker fork (exit code 1 if not)

The table comes last; the JSON receipt (device, versions, git commit, command, all numbers) goes to --out.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from thaw_rl import SamplingParams  # noqa: E402
from thaw_rl.pool import ForkPool  # noqa: E402
from thaw_rl.pool.trunk_export import pick_transport  # noqa: E402
from receipt_utils import receipt, write_receipt  # noqa: E402

LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
                 rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False,
                 bos_token_id=128000, eos_token_id=128001)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BREAKDOWN = ("export_alloc_seconds", "export_gather_seconds", "export_share_seconds", "import_open_seconds",
             "import_copy_seconds", "num_export_allocs", "num_export_handles", "num_import_opens", "num_import_reuses")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny Llama on CPU, short trunk, a few tokens")
    p.add_argument("--out", type=Path, default=None, help="where to write the JSON receipt")
    p.add_argument("--workers", default="1,2", help="pool sizes to run, comma-separated (one pool each)")
    p.add_argument("--devices", default=None, help="comma-separated devices, dealt to the workers round-robin "
                   "(cuda:0,cuda:0: two workers on one GPU; cuda:0,cuda:1: across GPUs; default: every GPU, else cpu)")
    p.add_argument("--transport", default="auto", help="trunk transports to run, comma-separated, each its own "
                   "pool: auto, host, device (device needs CUDA workers)")
    p.add_argument("--check", action="store_true", help="only check that a cross-worker fork over each "
                   "--transport continues exactly like a same-worker fork (exit code 1 if not)")
    p.add_argument("--trunk-tokens", type=int, default=4000)
    p.add_argument("--branches", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64, help="tokens each branch decodes per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--kv-gib", type=float, default=8.0, help="KV cache per worker (GiB); two 8B workers share a GPU")
    p.add_argument("--timeout", type=float, default=600.0, help="ForkPool timeout_s per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile-layers", action="store_true", help="workers' engines compile their decoder layers")
    args = p.parse_args()
    args.workers = [int(w) for w in args.workers.split(",")]
    args.transport = args.transport.split(",")
    if args.smoke or not torch.cuda.is_available():
        args.smoke = True
        args.devices = args.devices or "cpu"
        args.trunk_tokens, args.tokens, args.dtype = min(args.trunk_tokens, 200), min(args.tokens, 8), "fp32"
        args.kv_gib = 16 / 1024
    args.devices = args.devices.split(",") if args.devices else None
    return args


def build_llama3_8b(dtype_name: str, seed: int):
    """Random-weight Llama-3-8B built straight on the worker's GPU (``set_device`` was called before)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    with device, torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA3_8B), dtype=DTYPES[dtype_name],
                                                 attn_implementation="sdpa")
    return model.eval(), None


def build_tiny(seed: int):
    from thaw_rl.testing import tiny_model_and_tokenizer

    return tiny_model_and_tokenizer("llama", seed=seed, max_position_embeddings=1024)


def random_tokens(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


# ----------------------------------------------------------------------------------------------
# one round
# ----------------------------------------------------------------------------------------------
def _sum(stats: dict, key: str) -> float:
    return sum(w[key] or 0 for w in stats["workers"])


def run_round(pool: ForkPool, trunk, branches: int, params: SamplingParams) -> dict:
    before = pool.stats()
    start = time.perf_counter()
    kids = pool.fork(trunk, branches)
    forked = time.perf_counter()
    outs = pool.generate(kids, params)
    decoded = time.perf_counter()
    for k in kids:
        pool.free(k)
    after = pool.stats()
    d = {k: _sum(after, k) - _sum(before, k) for k in
         ("snapshot_seconds", "restore_seconds", "snapshot_bytes", "num_snapshots", "num_restores", *BREAKDOWN)}
    moved = {t: {k: after["transfer"][t][k] - before["transfer"][t][k] for k in ("num", "bytes", "seconds")}
             for t in after["transfer"]}
    fork_s = forked - start
    return {
        "round_s": decoded - start, "fork_s": fork_s, "decode_s": decoded - forked,
        "snapshot_s": d["snapshot_seconds"], "restore_s": d["restore_seconds"],
        "transfer_s": max(0.0, fork_s - d["snapshot_seconds"] - d["restore_seconds"]),
        "import_s": sum(m["seconds"] for m in moved.values()),  # the destination's map/IPC open + peer copy
        "bytes_moved": int(d["snapshot_bytes"]), "gbps": d["snapshot_bytes"] / fork_s / 1e9,
        "transports": sorted(t for t, m in moved.items() if m["num"]), "snapshots": int(d["num_snapshots"]),
        "restores": int(d["num_restores"]), "kid_workers": [k.worker for k in kids],
        "tokens": sum(len(o.token_ids) for o in outs),
        # where the fork's time goes: the source's export (alloc + gather + share = snapshot), the
        # destination's import (open + peer copy) and restore (the scatter and its bookkeeping), the rest
        # (pipes, the parent, placement)
        "alloc_s": d["export_alloc_seconds"], "gather_s": d["export_gather_seconds"],
        "share_s": d["export_share_seconds"], "open_s": d["import_open_seconds"], "copy_s": d["import_copy_seconds"],
        "other_s": max(0.0, fork_s - d["snapshot_seconds"] - d["restore_seconds"] - d["import_open_seconds"]
                       - d["import_copy_seconds"]),
        "allocs": int(d["num_export_allocs"]), "handles": int(d["num_export_handles"]),
        "opens": int(d["num_import_opens"]), "reuses": int(d["num_import_reuses"]),
    }


def prefill_trunk(pool: ForkPool, tokens: list[int]):
    pool.reset_prefix_cache()
    start = time.perf_counter()
    (trunk,) = pool.prefill([tokens], worker=0)
    return trunk, time.perf_counter() - start


def medians(rounds: list[dict]) -> dict:
    keys = ("round_s", "fork_s", "decode_s", "snapshot_s", "restore_s", "transfer_s", "import_s", "bytes_moved", "gbps",
            "alloc_s", "gather_s", "share_s", "open_s", "copy_s", "other_s")
    counts = ("allocs", "handles", "opens", "reuses")
    return {**{k: statistics.median(r[k] for r in rounds) for k in keys},
            **{k: sum(r[k] for r in rounds) for k in counts}}


def make_pool(args, num_workers: int, factory, transport: str) -> ForkPool:
    return ForkPool(factory, num_workers=num_workers, devices=args.devices,
                    engine_kwargs=dict(kv_cache_memory=int(args.kv_gib * 2**30), compile_layers=args.compile_layers),
                    placement="spread",
                    timeout_s=args.timeout, start_timeout_s=max(args.timeout, 900), trunk_transport=transport,
                    num_threads=1 if args.smoke else None)  # tiny CPU models: threads only contend


def run_pool(args, num_workers: int, factory, vocab: int, transport: str) -> list[dict]:
    started = time.perf_counter()
    with make_pool(args, num_workers, factory, transport) as pool:
        start_s = time.perf_counter() - started
        print(f"{pool}: started in {start_s:.1f} s", flush=True)
        params = SamplingParams(temperature=1.0, max_tokens=args.tokens, ignore_eos=True, seed=args.seed)
        warm_trunk, _ = prefill_trunk(pool, random_tokens(min(256, args.trunk_tokens), vocab, args.seed + 99))
        run_round(pool, warm_trunk, args.branches, SamplingParams(max_tokens=4, ignore_eos=True, seed=1))  # warm-up
        pool.free(warm_trunk)

        trunk, prefill_s = prefill_trunk(pool, random_tokens(args.trunk_tokens, vocab, args.seed))
        warm = [run_round(pool, trunk, args.branches, params) for _ in range(args.rounds)]
        pool.free(trunk)
        cold, prefills = [], [prefill_s]
        for r in range(args.rounds):
            trunk, prefill_s = prefill_trunk(pool, random_tokens(args.trunk_tokens, vocab, args.seed + 1 + r))
            prefills.append(prefill_s)
            cold.append(run_round(pool, trunk, args.branches, params))
            pool.free(trunk)
        final = pool.stats()
    rows = []
    for mode, rounds in (("warm", warm), ("cold", cold)):
        used = sorted({t for r in rounds for t in r["transports"]})
        rows.append({"workers": num_workers, "transport": f"{transport}:{'+'.join(used) or '-'}", "mode": mode,
                     **medians(rounds), "first_round_s": rounds[0]["round_s"],
                     "reprefill_s": statistics.median(prefills), "start_s": start_s, "rounds": rounds})
    rows[0]["final_stats"] = final
    return rows


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def table(rows: list[dict], cols=None, note: str | None = None) -> str:
    ms = "{:.1f}"
    cols = cols or [("workers", "workers", "{}"), ("transport:used", "transport", "{}"), ("rounds", "mode", "{}"),
            ("round ms", "round_s", ms), ("1st round ms", "first_round_s", ms), ("fork (total) ms", "fork_s", ms),
            ("snapshot ms", "snapshot_s", ms), ("transfer ms", "transfer_s", ms), ("restore ms", "restore_s", ms),
            ("GB/s", "gbps", "{:.2f}"), ("decode ms", "decode_s", ms), ("MB moved", "bytes_moved", "{:.1f}"),
            ("re-prefill ms", "reprefill_s", ms)]
    scale = {"bytes_moved": 1e-6, "gbps": 1.0}
    lines = [[c[0] for c in cols]]
    for r in rows:
        lines.append([fmt.format(r[k] * scale.get(k, 1e3) if isinstance(r[k], float) or k in scale else r[k])
                      for _, k, fmt in cols])
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    text = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines]
    return "\n".join(text[:1] + ["-" * len(text[0])] + text[1:] + [note or
        "(medians over rounds; transport:used = the pool's trunk_transport and what the trunks took; a cold "
        "round's fork is the cross-worker fork: snapshot + transfer + restore)"])


def breakdown_table(rows: list[dict]) -> str:
    """Where a fork's time goes (medians over rounds; the counts are summed over the rounds)."""
    ms, n = "{:.2f}", "{}"
    cols = [("workers", "workers", n), ("transport:used", "transport", n), ("rounds", "mode", n),
            ("fork ms", "fork_s", ms), ("alloc ms", "alloc_s", ms), ("gather ms", "gather_s", ms),
            ("share ms", "share_s", ms), ("open ms", "open_s", ms), ("peer copy ms", "copy_s", ms),
            ("restore ms", "restore_s", ms), ("other ms", "other_s", ms), ("allocs", "allocs", n),
            ("handles", "handles", n), ("opens", "opens", n), ("reuses", "reuses", n)]
    return table(rows, cols, "(source: alloc = taking an export buffer, a new one costs a cudaMalloc; gather = the "
                 "snapshot into it; share = pickling IPC handles. destination: open = opening a handle / mapping "
                 "shared memory; peer copy = from the other GPU; restore = scatter + bookkeeping. other = pipes and "
                 "the parent. allocs/handles/opens/reuses: buffers allocated, handles sent, opened, opened ones "
                 "reused)")


# ----------------------------------------------------------------------------------------------
# --check: a cross-worker fork continues exactly like a same-worker fork
# ----------------------------------------------------------------------------------------------
def check_transport(args, factory, vocab: int, transport: str) -> list[dict]:
    """Fork a fresh trunk into one child per worker (``spread``), decode both with one seed, compare. Three
    trunks one after the other: the later ones reuse the first one's export buffer ("device": already open in
    the destination, so they must come without a handle and still continue exactly)."""
    rows = []
    with make_pool(args, 2, factory, transport) as pool:
        devices = [w["device"] for w in pool.stats()["workers"]]
        expected = pick_transport(transport, devices[0], devices[1:])
        inside = args.trunk_tokens - pool.block_size // 2  # at: inside a block
        for i, at in enumerate([None, inside, None]):
            (trunk,) = pool.prefill([random_tokens(args.trunk_tokens, vocab, args.seed + 50 + i)], worker=0)
            before = pool.stats()
            start = time.perf_counter()
            kids = pool.fork(trunk, 2, at=at)
            fork_s = time.perf_counter() - start
            same_seed = [SamplingParams(temperature=1.0, max_tokens=args.tokens, ignore_eos=True, seed=args.seed)] * 2
            outs = dict(zip([k.worker for k in kids], pool.generate(kids, same_seed)))
            after = pool.stats()
            for h in (trunk, *kids):
                pool.free(h)
            left = [w["num_trunk_exports"] for w in pool.stats()["workers"]]
            used = [t for t in after["transfer"] if after["transfer"][t]["num"] > before["transfer"][t]["num"]]
            opens = sum(a["num_import_opens"] - b["num_import_opens"]
                        for a, b in zip(after["workers"], before["workers"]))
            home, away = outs.get(0), outs.get(1)
            diff = max((abs(a - b) for a, b in zip(home.logprobs, away.logprobs)), default=0.0) if away else None
            same = away is not None and home.token_ids == away.token_ids
            reused = not (expected == "device" and i > 0 and opens)  # later trunks: the buffer opened before
            ok = same and diff <= 1e-3 and used == [expected] and left == [0, 0] and reused
            rows.append({"transport": transport, "devices": "+".join(devices), "at": at, "expected": expected,
                         "used": "+".join(used) or "-", "kid_workers": sorted(outs), "same_tokens": same,
                         "max_logprob_diff": diff, "fork_s": fork_s, "exports_left": left, "buffer_opens": opens,
                         "ok": ok})
    return rows


def check_table(rows: list[dict]) -> str:
    head = ["transport", "devices", "fork at", "used", "same tokens", "max |dlogprob|", "fork ms", "exports left",
            "opens", "result"]
    lines = [head] + [[r["transport"], r["devices"], "end" if r["at"] is None else str(r["at"]),
                       f"{r['used']} (want {r['expected']})", str(r["same_tokens"]),
                       "-" if r["max_logprob_diff"] is None else f"{r['max_logprob_diff']:.2e}",
                       f"{r['fork_s'] * 1e3:.1f}", str(r["exports_left"]), str(r["buffer_opens"]),
                       "PASS" if r["ok"] else "FAIL"]
                      for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(text[:1] + ["-" * len(text[0])] + text[1:] + [
        "(a child forked on the other worker from the exported trunk vs one forked in place, same seed; PASS: "
        "same tokens, logprobs within 1e-3, the expected transport, no export left after free, and for device "
        "trunks after the first no buffer opened again: opens = IPC handles the destination opened)"])


def main() -> None:
    args = parse_args()
    if args.smoke:
        factory, vocab, model_name = functools.partial(build_tiny, args.seed), 100, "tiny llama (random, fp32)"
    else:
        factory = functools.partial(build_llama3_8b, args.dtype, args.seed)
        vocab, model_name = LLAMA3_8B["vocab_size"], f"Llama-3-8B shapes (random, {args.dtype})"
    if args.check:
        print(f"{model_name}: check a cross-worker fork of a {args.trunk_tokens}-token trunk over {args.transport} "
              f"on {args.devices or 'every GPU'}", flush=True)
        rows = [r for t in args.transport for r in check_transport(args, factory, vocab, t)]
        write_receipt(args.out, {**receipt("fork_pool_check", args, rows), "model": model_name})
        print(check_table(rows))
        sys.exit(0 if all(r["ok"] for r in rows) else 1)
    print(f"{model_name}: {args.rounds} rounds x {args.branches} branches x {args.tokens} tokens from a "
          f"{args.trunk_tokens}-token trunk; pools of {args.workers} workers on {args.devices or 'every GPU'}, "
          f"trunk transports {args.transport}", flush=True)
    shm_free = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else None
    trunk_bytes = 0 if args.smoke else args.trunk_tokens * 2 * 32 * 8 * 128 * DTYPES[args.dtype].itemsize  # K+V
    if shm_free is not None and shm_free < 4 * trunk_bytes:  # host trunks live in /dev/shm until released
        print(f"warning: /dev/shm has {shm_free / 2**30:.1f} GiB free; a host-transport trunk takes "
              f"{trunk_bytes / 2**30:.2f} GiB there (docker: --shm-size)", flush=True)
    rows = []
    for n in args.workers:
        for transport in args.transport[:1] if n == 1 else args.transport:  # one worker moves no trunk
            rows += run_pool(args, n, factory, vocab, transport)
    write_receipt(args.out, {**receipt("fork_pool", args, rows), "model": model_name, "cuda": torch.version.cuda,
                             "cpu_count": os.cpu_count(), "dev_shm_free_bytes": shm_free})
    print(breakdown_table(rows))
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
