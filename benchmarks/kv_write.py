"""Writing new K/V into the paged cache: one Triton launch per layer vs the two index_put assignments it replaced.

Shapes: Qwen2.5-1.5B (28 layers, 2 KV heads, head_dim 128, block 16), bf16 cache in both layouts; the
new K/V are the attention hook's views ``key[0].transpose(0, 1)`` of (1, KVH, T, D) bf16 tensors. Cases:
decode steps of 1, 16, 128 and 1,024 rows, and a 4,096-token prefill, slots scattered over shuffled blocks.

Contenders, each checked against ``write_kv_reference`` (bit for bit) before it is timed:
- index_put: ``k_cache[blocks, offsets] = key.to(dtype)`` and the same for V (the hook before issue #13).
- triton:    ``write_kv_triton`` (one launch writes K and V).

Two timings per case (CUDA): one layer's call (median of ``triton.testing.do_bench``, host launch cost
included as in eager decode), and a CUDA graph that writes all 28 layers, replayed (a graph-captured decode
step: device time only). GB/s counts the bytes read and written (K and V, each in and out of the cache).

Usage:
    python benchmarks/kv_write.py --out benchmarks/results/kv_write_h200.json
    python benchmarks/kv_write.py --smoke      # tiny shapes on CPU, Triton in the interpreter
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first import of triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from receipt_utils import receipt, write_receipt  # noqa: E402

from thaw_rl.engine.kv_cache import KVCacheSpec, PagedKVCache  # noqa: E402
from thaw_rl_kernels.kv_write import write_kv_reference, write_kv_triton  # noqa: E402

QWEN25_1_5B = dict(num_layers=28, num_kv_heads=2, head_dim=128, block_size=16)
SMOKE_SHAPE = dict(num_layers=2, num_kv_heads=2, head_dim=16, block_size=4)


def index_put(key, value, k_cache, v_cache, slot_blocks, slot_offsets) -> None:
    """What thaw_paged_attention did before: two advanced-indexing assignments (ATen index_put)."""
    k_cache[slot_blocks, slot_offsets] = key.to(k_cache.dtype)
    v_cache[slot_blocks, slot_offsets] = value.to(v_cache.dtype)


CONTENDERS = {"index_put": index_put, "triton": write_kv_triton}


def build(num_tokens: int, shape: dict, layout: str, device: str, seed: int = 0):
    """A cache with room for every token, the tokens' shuffled slots and their (T, KVH, D) key/value views."""
    g = torch.Generator().manual_seed(seed)
    bs = shape["block_size"]
    num_blocks = -(-num_tokens // bs) + 2
    spec = KVCacheSpec(shape["num_layers"], shape["num_kv_heads"], shape["head_dim"], bs, torch.bfloat16)
    cache = PagedKVCache(spec, num_blocks, device, layout=layout)
    slots = torch.randperm(num_blocks * bs, generator=g)[:num_tokens]  # distinct slots, shuffled
    blocks, offsets = (slots // bs).to(device), (slots % bs).to(device)
    kv = torch.randn(2, 1, shape["num_kv_heads"], num_tokens, shape["head_dim"], generator=g)
    kv = kv.to(torch.bfloat16).to(device)
    return cache, kv[0, 0].transpose(0, 1), kv[1, 0].transpose(0, 1), blocks, offsets  # (T, KVH, D) views


def median_ms(fn, device: str) -> float:
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def graph_ms(fn, cache, key, value, blocks, offsets) -> float:
    """One CUDA graph writing every layer (as in a captured decode step), replayed: device ms per step."""
    layers = range(cache.spec.num_layers)

    def step():
        for i in layers:
            fn(key, value, cache.key_cache(i), cache.value_cache(i), blocks, offsets)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm up (Triton compiles) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return median_ms(graph.replay, "cuda")


def run_case(num_tokens: int, shape: dict, layout: str, device: str) -> list[dict]:
    cache, key, value, blocks, offsets = build(num_tokens, shape, layout, device)
    expected, *_ = build(num_tokens, shape, layout, device)
    write_kv_reference(key, value, expected.key_cache(1), expected.value_cache(1), blocks, offsets)
    moved = 2 * 2 * key.numel() * key.element_size()  # K and V, read once and written once
    rows = []
    for name, fn in CONTENDERS.items():
        cache.storage.zero_()  # as built, so each contender's check sees only its own writes
        fn(key, value, cache.key_cache(1), cache.value_cache(1), blocks, offsets)
        if not torch.equal(cache.storage, expected.storage):
            raise RuntimeError(f"{name} wrote something else than write_kv_reference ({num_tokens} tokens, {layout})")
        ms = median_ms(lambda: fn(key, value, cache.key_cache(1), cache.value_cache(1), blocks, offsets), device)
        row = dict(tokens=num_tokens, layout=layout, contender=name, layer_us=ms * 1e3, gbps=moved / ms / 1e6)
        if device == "cuda":
            row["graph_step_us"] = graph_ms(fn, cache, key, value, blocks, offsets) * 1e3
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (runs on CPU)")
    parser.add_argument("--out", type=Path, default=None, help="JSON receipt path")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = SMOKE_SHAPE if args.smoke else QWEN25_1_5B
    token_counts = [1, 3, 17] if args.smoke else [1, 16, 128, 1024, 4096]
    layouts = ("layer_major", "block_major")
    rows = [r for t in token_counts for layout in layouts for r in run_case(t, shape, layout, device)]
    write_receipt(args.out, receipt("kv_write", args, rows) | {"shape": shape})
    print(f"\nKV write, {device}, shape {shape}, bf16")
    print("(layer_us: one layer's call, median; graph_step_us: every layer's write in one CUDA graph, replayed)")
    print(f"{'tokens':>7} {'layout':>12} {'contender':>10} {'layer_us':>9} {'GB/s':>7} {'graph_step_us':>14}")
    for r in rows:
        graph = f"{r['graph_step_us']:14.1f}" if "graph_step_us" in r else f"{'-':>14}"
        print(f"{r['tokens']:>7} {r['layout']:>12} {r['contender']:>10} {r['layer_us']:9.1f} {r['gbps']:7.2f} {graph}")


if __name__ == "__main__":
    main()
