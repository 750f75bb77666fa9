"""KV block transfer bandwidth: snapshot (device -> pinned host), restore (host -> device), block copy.

For the KV shapes of real models at a 2,048-token trunk (128 blocks of 16, scattered at random in a
larger pool), every path is first checked for exact correctness on the device, then timed (median,
CUDA events via triton.testing.do_bench) beside baselines from the same run:

- snapshot: Triton gather writing pinned host memory directly ("direct") vs gather into a device
  staging buffer + one DMA ("stage"); a per-block ``copy_`` loop; ``index_select`` per layer + one
  DMA; and the contiguous D2H ``copy_`` of the same bytes (the bus ceiling);
- restore: Triton scatter reading pinned memory directly vs one DMA + scatter; a per-block loop;
  the contiguous H2D ``copy_``;
- device-to-device block copy (read + write bytes) vs the contiguous device ``copy_`` ceiling,
  the torch reference and a per-block loop;
- fork: the copy-on-write of one partial block (``copy_blocks(num_tokens=...)``), in microseconds.

    python benchmarks/kv_transfer.py --out benchmarks/results/kv_transfer_h100.json
    python benchmarks/kv_transfer.py --smoke      # tiny shapes on CPU, torch references only

The table comes last; the JSON receipt (device, versions, git commit, command, all numbers) goes to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from thaw_rl.engine.kv_cache import KVCacheSpec, PagedKVCache  # noqa: E402
from thaw_rl_kernels import KVTransfer  # noqa: E402
from thaw_rl_kernels import block_copy as bc  # noqa: E402
from receipt_utils import git_commit  # noqa: E402

MODELS = {  # name: (num_layers, num_kv_heads, head_dim)
    "llama-3-8b": (32, 8, 128),
    "qwen2.5-7b": (28, 4, 128),
    "qwen2.5-1.5b": (28, 2, 128),
}
SMOKE_MODELS = {"tiny": (2, 2, 64)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU with the torch references only")
    p.add_argument("--out", type=Path, default=None, help="where to write the JSON receipt")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {list(MODELS)}")
    p.add_argument("--layouts", default="block_major,layer_major", help="KV layouts to measure")
    p.add_argument("--tokens", type=int, default=2048, help="trunk length to snapshot/restore/copy")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--pool-factor", type=int, default=8, help="cache blocks = pool-factor x trunk blocks")
    p.add_argument("--fork-rows", type=int, default=7, help="filled rows of the partial block a fork copies")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.smoke or not torch.cuda.is_available():
        args.smoke = True
        args.models, args.tokens, args.pool_factor = ",".join(SMOKE_MODELS), 64, 4
    return args


# ----------------------------------------------------------------------------------------------
# timing and checking
# ----------------------------------------------------------------------------------------------


def bench(fn, on_cuda: bool) -> float:
    """Median seconds per call: CUDA events (do_bench) on a GPU, perf_counter on CPU."""
    if on_cuda:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(7):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sync(on_cuda: bool) -> None:
    if on_cuda:
        torch.cuda.synchronize()


def check(name: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    if not torch.equal(got.cpu(), expected.cpu()):
        raise RuntimeError(f"{name} produced wrong data; refusing to time a broken path.")


def random_cache(spec: KVCacheSpec, num_blocks: int, device: str, layout: str, seed: int) -> PagedKVCache:
    cache = PagedKVCache(spec, num_blocks=num_blocks, device=device, layout=layout)
    cache.storage.normal_(generator=torch.Generator(device=device).manual_seed(seed))
    return cache


# ----------------------------------------------------------------------------------------------
# one (model, layout)
# ----------------------------------------------------------------------------------------------


def measure(model: str, dims: tuple[int, int, int], layout: str, args, device: str) -> list[dict]:
    on_cuda = device == "cuda"
    num_layers, kv_heads, head_dim = dims
    spec = KVCacheSpec(num_layers, kv_heads, head_dim, args.block_size, DTYPES[args.dtype])
    n = args.tokens // args.block_size
    pool_blocks = n * args.pool_factor
    src = random_cache(spec, pool_blocks, device, layout, args.seed)
    dst = random_cache(spec, pool_blocks, device, layout, args.seed + 1)
    perm = torch.randperm(pool_blocks, generator=torch.Generator().manual_seed(args.seed))
    ids_host, other_host = perm[:n], perm[n : 2 * n]  # random, unsorted, disjoint
    ids, other = ids_host.to(device), other_host.to(device)
    ids_list, other_list = ids_host.tolist(), other_host.tolist()
    nbytes = n * spec.bytes_per_block
    snap_shape = (n, num_layers, 2, args.block_size, kv_heads, head_dim)
    host = torch.empty(snap_shape, dtype=spec.dtype, pin_memory=on_cuda)  # (n, L, 2, BS, KVH, D)
    stage = torch.empty(snap_shape, dtype=spec.dtype, device=device)
    expected = bc.gather_blocks_reference(src.kv, ids, torch.empty(snap_shape, dtype=spec.dtype, device=device))
    rows: list[dict] = []

    def record(op: str, path: str, fn, moved_bytes: int, verify=None) -> None:
        if verify is not None:
            verify(fn)
        seconds = bench(fn, on_cuda)
        rows.append(dict(model=model, layout=layout, op=op, path=path, bytes=moved_bytes,
                         seconds=seconds, gbps=moved_bytes / seconds / 1e9, us=seconds * 1e6))

    def verify_snapshot(fn):
        host.fill_(float("nan"))
        fn()
        sync(on_cuda)
        check("snapshot", host, expected)

    def verify_restore(fn):
        dst.kv.index_fill_(2, other, float("nan"))
        fn()
        sync(on_cuda)
        check("restore", dst.kv.index_select(2, other), expected.permute(1, 2, 0, 3, 4, 5))

    def verify_copy(fn):
        src.kv.index_fill_(2, other, float("nan"))
        fn()
        sync(on_cuda)
        check("copy", src.kv.index_select(2, other), expected.permute(1, 2, 0, 3, 4, 5))

    # snapshot: device blocks -> pinned host [n, L, 2, BS, KVH, D]
    gather_paths = {"direct": "direct", "stage": "stage"} if on_cuda else {"reference": None}
    for path, host_path in gather_paths.items():
        impl = bc.gather_blocks_triton if on_cuda else bc.gather_blocks_reference
        fn = lambda impl=impl, hp=host_path: impl(src.kv, ids, host, host_path=hp, check_ids=False)  # noqa: E731
        record("snapshot", path, fn, nbytes, verify_snapshot)

    def snapshot_loop():
        for i, block in enumerate(ids_list):
            host[i].copy_(src.kv[:, :, block], non_blocking=True)

    def snapshot_index_select():
        for layer in range(num_layers):
            stage[:, layer] = src.kv[layer].index_select(1, ids).transpose(0, 1)
        host.copy_(stage, non_blocking=True)

    record("snapshot", "torch_block_loop", snapshot_loop, nbytes, verify_snapshot)
    record("snapshot", "torch_index_select", snapshot_index_select, nbytes, verify_snapshot)
    record("snapshot", "contiguous_d2h_copy", lambda: host.copy_(stage, non_blocking=True), nbytes)
    transfer = KVTransfer(device)

    def snapshot_kv_transfer():
        transfer.release(transfer.snapshot_async(src.kv, ids_list).wait())

    def verify_kv_transfer(fn):
        got = transfer.snapshot_async(src.kv, ids_list).wait()
        check("KVTransfer snapshot", got, expected)
        transfer.release(got)

    record("snapshot", "kv_transfer_wait", snapshot_kv_transfer, nbytes, verify_kv_transfer)

    # restore: pinned host -> device blocks
    host.copy_(expected)
    scatter_paths = {"direct": "direct", "stage": "stage"} if on_cuda else {"reference": None}
    for path, host_path in scatter_paths.items():
        impl = bc.scatter_blocks_triton if on_cuda else bc.scatter_blocks_reference
        fn = lambda impl=impl, hp=host_path: impl(host, dst.kv, other, host_path=hp, check_ids=False)  # noqa: E731
        record("restore", path, fn, nbytes, verify_restore)

    def restore_loop():
        for i, block in enumerate(other_list):
            dst.kv[:, :, block].copy_(host[i], non_blocking=True)

    record("restore", "torch_block_loop", restore_loop, nbytes, verify_restore)
    record("restore", "contiguous_h2d_copy", lambda: stage.copy_(host, non_blocking=True), nbytes)

    # device -> device: blocks ids -> other inside one cache (bytes read + written)
    copy_impl = bc.copy_blocks_triton if on_cuda else bc.copy_blocks_reference
    record("d2d_copy", "triton" if on_cuda else "reference",
           lambda: copy_impl(src.kv, src.kv, ids, other, check_ids=False), 2 * nbytes, verify_copy)
    if on_cuda:
        record("d2d_copy", "torch_reference",
               lambda: bc.copy_blocks_reference(src.kv, src.kv, ids, other, check_ids=False), 2 * nbytes, verify_copy)

    def copy_loop():
        for a, b in zip(ids_list, other_list):
            src.kv[:, :, b].copy_(src.kv[:, :, a])

    record("d2d_copy", "torch_block_loop", copy_loop, 2 * nbytes, verify_copy)
    gather_impl = bc.gather_blocks_triton if on_cuda else bc.gather_blocks_reference
    record("d2d_gather", "triton" if on_cuda else "reference",
           lambda: gather_impl(src.kv, ids, stage, check_ids=False), 2 * nbytes)
    flat = torch.empty_like(stage)
    record("d2d_copy", "contiguous_copy_ceiling", lambda: flat.copy_(stage), 2 * nbytes)

    # fork: copy-on-write of one partial block (fork_rows token rows of every layer)
    rows_bytes = spec.bytes_per_token * args.fork_rows
    one_src, one_dst = ids[:1], other[:1]
    record("fork_partial_block", "triton_no_check" if on_cuda else "reference",
           lambda: copy_impl(src.kv, src.kv, one_src, one_dst, args.fork_rows, check_ids=False), 2 * rows_bytes)
    record("fork_partial_block", "checked_ids",
           lambda: bc.copy_blocks(src.kv, src.kv, one_src, one_dst, args.fork_rows), 2 * rows_bytes)
    a, b, k = ids_list[0], other_list[0], args.fork_rows
    record("fork_partial_block", "torch_slice_copy",
           lambda: src.kv[:, :, b, :k].copy_(src.kv[:, :, a, :k]), 2 * rows_bytes)
    del src, dst, host, stage, flat, transfer
    if on_cuda:
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------

COLUMNS = [  # (header, op, path, unit)
    ("snap direct", "snapshot", "direct", "gbps"),
    ("snap stage", "snapshot", "stage", "gbps"),
    ("snap ref", "snapshot", "reference", "gbps"),
    ("snap loop", "snapshot", "torch_block_loop", "gbps"),
    ("snap idxsel", "snapshot", "torch_index_select", "gbps"),
    ("D2H ceil", "snapshot", "contiguous_d2h_copy", "gbps"),
    ("rest direct", "restore", "direct", "gbps"),
    ("rest stage", "restore", "stage", "gbps"),
    ("rest ref", "restore", "reference", "gbps"),
    ("H2D ceil", "restore", "contiguous_h2d_copy", "gbps"),
    ("d2d copy", "d2d_copy", "triton", "gbps"),
    ("d2d ref", "d2d_copy", "reference", "gbps"),
    ("d2d torch", "d2d_copy", "torch_reference", "gbps"),
    ("d2d ceil", "d2d_copy", "contiguous_copy_ceiling", "gbps"),
    ("fork us", "fork_partial_block", "triton_no_check", "us"),
    ("fork ref us", "fork_partial_block", "reference", "us"),
    ("fork chk us", "fork_partial_block", "checked_ids", "us"),
]


def table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys((r["model"], r["layout"]) for r in rows))  # in measurement order
    index = {(r["model"], r["layout"], r["op"], r["path"]): r for r in rows}
    columns = [c for c in COLUMNS if any((m, lay, c[1], c[2]) in index for m, lay in keys)]
    header = ["model", "layout"] + [c[0] for c in columns]
    lines = [header]
    for model, layout in keys:
        cells = [model, layout]
        for _, op, path, unit in columns:
            r = index.get((model, layout, op, path))
            cells.append("-" if r is None else f"{r[unit]:.1f}")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines]
    return "\n".join(text[:1] + ["-" * len(text[0])] + text[1:]) + "\n(GB/s unless 'us'; d2d counts read + write bytes)"


def receipt(rows: list[dict], args, device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return {
        "benchmark": "kv_transfer",
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "default_host_path": bc.DEFAULT_HOST_PATH,
        "git_commit": git_commit(),
        "command": " ".join([sys.executable, *sys.argv]),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
        "results": rows,
    }


def main() -> None:
    args = parse_args()
    device = "cpu" if args.smoke else "cuda"
    models = {**MODELS, **SMOKE_MODELS}
    rows = []
    for model in args.models.split(","):
        for layout in args.layouts.split(","):
            print(f"measuring {model} {layout} on {device} ...", flush=True)
            rows += measure(model, models[model], layout, args, device)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(receipt(rows, args, device), indent=2) + "\n")
        print(f"wrote {args.out}")
    print(table(rows))


if __name__ == "__main__":
    main()
