"""ForkPool rounds: fork a long trunk into branches, decode them, free them, with trunks moved between workers.

The seed project's receipt shape: 5 rounds x 4 branches x 64 tokens from a 4,000-token trunk on a
random-weight Llama-3-8B (bf16). Each pool size in ``--workers`` gets its own pool (placement "spread",
so with 2 workers half the branches run in the worker that does not hold the trunk; on one GPU both
workers share it, which exercises snapshot/restore across processes):

- warm rounds: one trunk, forked every round. The first round snapshots it and the other worker restores
  it; later rounds fork from the copy that worker kept (no transfer).
- cold rounds: a fresh trunk every round (prefilled on worker 0 with the prefix caches reset, outside the
  round's time), so every round pays snapshot + transfer + restore.

Parts of a round: fork (the caller's wall time in ``fork``), of which snapshot (device -> pinned host, in
the trunk's worker), export (pinned host -> shared memory), restore (shared memory -> the other
worker's blocks) and transfer (the rest: pipes, pickling, passing the shared-memory handle); decode (the
``generate`` call). Beside them: re-prefill, the time to prefill the trunk from scratch, which is what
a pool without snapshot transport would pay in each other worker.

    python benchmarks/fork_pool.py --out benchmarks/results/fork_pool_h100.json        # one H100
    python benchmarks/fork_pool.py --smoke                                               # tiny, CPU, < 1 min

The table comes last; the JSON receipt (device, versions, git commit, command, all numbers) goes to --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from thaw_rl import SamplingParams  # noqa: E402
from thaw_rl.pool import ForkPool  # noqa: E402
from receipt_utils import git_commit  # noqa: E402

LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
                 rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False,
                 bos_token_id=128000, eos_token_id=128001)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny Llama on CPU, short trunk, a few tokens")
    p.add_argument("--out", type=Path, default=None, help="where to write the JSON receipt")
    p.add_argument("--workers", default="1,2", help="pool sizes to run, comma-separated (one pool each)")
    p.add_argument("--devices", default=None, help="comma-separated devices (default: every visible GPU, else cpu)")
    p.add_argument("--trunk-tokens", type=int, default=4000)
    p.add_argument("--branches", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64, help="tokens each branch decodes per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--kv-gib", type=float, default=8.0, help="KV cache per worker (GiB); two 8B workers share a GPU")
    p.add_argument("--timeout", type=float, default=600.0, help="ForkPool timeout_s per request")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.workers = [int(w) for w in args.workers.split(",")]
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
         ("snapshot_seconds", "export_seconds", "restore_seconds", "snapshot_bytes", "num_snapshots", "num_restores")}
    fork_s = forked - start
    return {
        "round_s": decoded - start, "fork_s": fork_s, "decode_s": decoded - forked,
        "snapshot_s": d["snapshot_seconds"], "export_s": d["export_seconds"], "restore_s": d["restore_seconds"],
        "transfer_s": max(0.0, fork_s - d["snapshot_seconds"] - d["export_seconds"] - d["restore_seconds"]),
        "bytes_moved": int(d["snapshot_bytes"]), "snapshots": int(d["num_snapshots"]),
        "restores": int(d["num_restores"]), "kid_workers": [k.worker for k in kids],
        "tokens": sum(len(o.token_ids) for o in outs),
    }


def prefill_trunk(pool: ForkPool, tokens: list[int]):
    pool.reset_prefix_cache()
    start = time.perf_counter()
    (trunk,) = pool.prefill([tokens], worker=0)
    return trunk, time.perf_counter() - start


def medians(rounds: list[dict]) -> dict:
    keys = ("round_s", "fork_s", "decode_s", "snapshot_s", "export_s", "restore_s", "transfer_s", "bytes_moved")
    return {k: statistics.median(r[k] for r in rounds) for k in keys}


def run_pool(args, num_workers: int, factory, vocab: int) -> list[dict]:
    kv_bytes = int(args.kv_gib * 2**30)
    started = time.perf_counter()
    with ForkPool(factory, num_workers=num_workers, devices=args.devices, engine_kwargs=dict(kv_cache_memory=kv_bytes),
                  placement="spread", timeout_s=args.timeout, start_timeout_s=max(args.timeout, 900),
                  num_threads=1 if args.smoke else None) as pool:  # tiny CPU models: threads only contend
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
        rows.append({"workers": num_workers, "mode": mode, **medians(rounds), "first_round_s": rounds[0]["round_s"],
                     "reprefill_s": statistics.median(prefills), "start_s": start_s, "rounds": rounds})
    rows[0]["final_stats"] = final
    return rows


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    ms = "{:.1f}"
    cols = [("workers", "workers", "{}"), ("rounds", "mode", "{}"), ("round ms", "round_s", ms),
            ("1st round ms", "first_round_s", ms), ("fork ms", "fork_s", ms), ("snapshot ms", "snapshot_s", ms),
            ("export ms", "export_s", ms), ("transfer ms", "transfer_s", ms), ("restore ms", "restore_s", ms),
            ("decode ms", "decode_s", ms), ("MB moved", "bytes_moved", "{:.1f}"), ("re-prefill ms", "reprefill_s", ms)]
    scale = {"bytes_moved": 1e-6}
    lines = [[c[0] for c in cols]]
    for r in rows:
        lines.append([fmt.format(r[k] * scale.get(k, 1e3) if isinstance(r[k], float) or k in scale else r[k])
                      for _, k, fmt in cols])
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    text = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines]
    return "\n".join(text[:1] + ["-" * len(text[0])] + text[1:] + ["(medians over rounds; ms = milliseconds)"])


def receipt(args, model_name: str, rows: list[dict], shm_free: int | None) -> dict:
    import transformers

    on_cuda = torch.cuda.is_available() and not args.smoke
    return {
        "benchmark": "fork_pool",
        "device": torch.cuda.get_device_name() if on_cuda else (platform.processor() or platform.machine()),
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(), "dev_shm_free_bytes": shm_free, "git_commit": git_commit(),
        "command": " ".join([sys.executable, *sys.argv]),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": model_name,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": rows,
    }


def main() -> None:
    args = parse_args()
    if args.smoke:
        factory, vocab, model_name = functools.partial(build_tiny, args.seed), 100, "tiny llama (random, fp32)"
    else:
        factory = functools.partial(build_llama3_8b, args.dtype, args.seed)
        vocab, model_name = LLAMA3_8B["vocab_size"], f"Llama-3-8B shapes (random, {args.dtype})"
    print(f"{model_name}: {args.rounds} rounds x {args.branches} branches x {args.tokens} tokens from a "
          f"{args.trunk_tokens}-token trunk; pools of {args.workers} workers on {args.devices or 'every GPU'}",
          flush=True)
    shm_free = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else None
    trunk_bytes = 0 if args.smoke else args.trunk_tokens * 2 * 32 * 8 * 128 * DTYPES[args.dtype].itemsize  # K+V
    if shm_free is not None and shm_free < 4 * trunk_bytes:  # snapshots live in /dev/shm until the trunk is freed
        print(f"warning: /dev/shm has {shm_free / 2**30:.1f} GiB free; a trunk snapshot takes "
              f"{trunk_bytes / 2**30:.2f} GiB there (docker: --shm-size)", flush=True)
    rows = []
    for n in args.workers:
        rows += run_pool(args, n, factory, vocab)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(receipt(args, model_name, rows, shm_free), indent=2, default=str) + "\n")
        print(f"wrote {args.out}")
    print(table(rows))


if __name__ == "__main__":
    main()
