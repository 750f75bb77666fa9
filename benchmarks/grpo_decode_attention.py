"""Decode attention on GRPO batches: our Triton kernels (plain, cascade, tilings) vs FlashInfer's (#13, item 3).

#13 asks to decide by measurement between extending our Triton kernel and depending on ``flashinfer-python`` for
cascade attention (a group's shared prompt read once for all its rows). The batches are a GRPO decode step's:
Qwen2.5-1.5B heads (12 q, 2 KV, D=128), ``--rows`` rows in groups of 16 sharing a ``--prompts``-token prompt
(the same physical blocks, as forks leave them), each row with 64-512 own tokens, blocks shuffled, one layer of
the engine's block_major cache (28 layers). Contenders:

- thaw plain:      ``paged_attention_triton``, every row's whole context (what the engine's CUDA graphs run).
- thaw cascade:    ``cascade_attention_triton`` (prompt once per group, then each row's tail, fused merge).
- thaw <tiling>:   the plain kernel under one of ``TILINGS`` (``--tilings``), to A/B its default tiling.
- thaw cascade <tiling>: cascade with its shared pass under one of ``SHARED_TILINGS`` (``--shared-tilings``).
- thaw plain fp8 / thaw cascade fp8 (``--fp8``): the same kernels over an FP8 copy of the cache
                   (``kv_cache_dtype="fp8"``: float8_e4m3fn, half the bytes), checked against the reference over
                   that FP8 cache (the rounding is the format's, not the kernel's).
- fi decode:       FlashInfer ``BatchDecodeWithPagedKVCacheWrapper`` (CUDA-core decode kernel), whole context.
- fi decode tc:    the same with ``use_tensor_cores=True`` (its prefill kernel; GQA groups of 6 heads as rows).
- fi cascade:      two levels by hand: a ``BatchPrefillWithPagedKVCacheWrapper`` (fa2) whose queries are a
                   group's rows over the group's prompt pages, a tensor-core decode over each row's own pages,
                   ``merge_state_in_place``; what ``MultiLevelCascadeAttentionWrapper`` does, with the backend named.
- fi multilevel:   ``MultiLevelCascadeAttentionWrapper`` itself (backend "auto": FA3 on Hopper; its JIT build
                   is the slow one, so only when ``--fi-variants`` names it).

Every contender is checked against ``paged_attention_reference`` before it is timed; timing rounds interleave
the contenders (``--repeats``) and report the median. FlashInfer reads our cache in place (its kernels take the
page stride of our strided block/layer/K-V views). ``plan_host_ms`` is the host time of a plan, which an engine
pays per batch composition (ours) or per step (FlashInfer's ``plan()``, before a graph replay);
``first_call_s`` includes FlashInfer's JIT build on first use (nvcc), once per machine and shape family.

Usage (CUDA; FlashInfer optional, JIT-compiled with nvcc, so it needs the CUDA toolkit):
    python benchmarks/grpo_decode_attention.py --tilings --out benchmarks/results/grpo_decode_attention_h200.json
    python benchmarks/grpo_decode_attention.py --fi-variants "fi decode tc,fi cascade,fi multilevel" --rows 1024
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from paged_attention import QWEN25_1_5B, Case, build_cascade_batch, sweep_tilings, time_ms  # noqa: E402


def page_lists(block_tables: torch.Tensor, first_block: torch.Tensor, token_counts: torch.Tensor, block_size: int):
    """FlashInfer's CSR page lists: row r's pages are ``block_tables[r, first_block[r]:]`` holding ``token_counts[r]``
    tokens. Returns (indptr, indices, last_page_len) as int32 on the tables' device."""
    tables, first, counts = block_tables.cpu(), first_block.cpu().long(), token_counts.cpu().long()
    num_pages = (counts + block_size - 1) // block_size
    indices = torch.cat([tables[r, int(first[r]) : int(first[r] + num_pages[r])] for r in range(len(counts))])
    indptr = torch.zeros(len(counts) + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(num_pages, 0)
    last = (counts - (num_pages - 1) * block_size).to(torch.int32)
    dev = block_tables.device
    return indptr.to(dev), indices.to(torch.int32).to(dev), last.to(dev)


def flashinfer_contenders(batch: dict, shape: dict, group_size: int, prompt_len: int, workspace: torch.Tensor,
                          variants: list[str]) -> tuple[dict, dict]:
    """Planned FlashInfer callables ``fn((k_cache, v_cache)) -> out`` for one batch, and each one's plan() host ms.
    A plan holds for every layer (same pages), as in an engine's step."""
    import flashinfer

    bs, h, kvh, d = shape["block_size"], shape["num_heads"], shape["num_kv_heads"], shape["head_dim"]
    q = batch["query"]
    tables, seq_lens, scale = batch["block_tables"], batch["seq_lens"], batch["scale"]
    rows, dev, dtype = q.shape[0], q.device, q.dtype
    common = dict(num_qo_heads=h, num_kv_heads=kvh, page_size=bs)
    zeros = torch.zeros(rows, dtype=torch.int64, device=dev)
    whole = page_lists(tables, zeros, seq_lens, bs)
    shared_blocks = prompt_len // bs  # the batch builder copies a partial prompt block into each row's own blocks
    groups = rows // group_size
    group_rows = torch.arange(groups, device=dev) * group_size
    prompt = page_lists(tables[group_rows], torch.zeros(groups, device=dev), torch.full((groups,), shared_blocks * bs),
                        bs)
    own = page_lists(tables, torch.full((rows,), shared_blocks, device=dev), seq_lens.long() - shared_blocks * bs, bs)
    qo_groups = (torch.arange(groups + 1, dtype=torch.int32) * group_size).to(dev)

    fns, plan_ms = {}, {}

    def timed_plan(name, plan):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        plan()
        torch.cuda.synchronize()
        plan_ms[name] = (time.perf_counter() - t0) * 1e3

    for tc in (True, False):
        name = "fi decode tc" if tc else "fi decode"
        if name not in variants:
            continue
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=tc)
        timed_plan(name, lambda w=wrapper: w.plan(*whole, head_dim=d, q_data_type=dtype, kv_data_type=dtype,
                                                  sm_scale=scale, **common))
        fns[name] = lambda kv, w=wrapper: w.run(q, kv)

    if "fi cascade" not in variants:
        return fns, plan_ms
    shared_pass = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend="fa2")
    own_pass = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=True)

    def plan_cascade():
        shared_pass.plan(qo_groups, *prompt, head_dim_qk=d, causal=False, sm_scale=scale, q_data_type=dtype,
                         kv_data_type=dtype, **common)
        own_pass.plan(*own, head_dim=d, q_data_type=dtype, kv_data_type=dtype, sm_scale=scale, **common)

    def run_cascade(kv):
        out, lse = own_pass.run(q, kv, return_lse=True)
        out_shared, lse_shared = shared_pass.run(q, kv, return_lse=True)
        flashinfer.merge_state_in_place(out, lse, out_shared, lse_shared)
        return out

    timed_plan("fi cascade", plan_cascade)
    fns["fi cascade"] = run_cascade

    if "fi multilevel" in variants:
        multi = flashinfer.MultiLevelCascadeAttentionWrapper(2, workspace, "NHD")
        qo_rows = torch.arange(rows + 1, dtype=torch.int32, device=dev)
        timed_plan("fi multilevel", lambda: multi.plan(
            [qo_groups, qo_rows], [prompt[0], own[0]], [prompt[1], own[1]], [prompt[2], own[2]],
            h, kvh, d, bs, causal=False, sm_scale=scale, q_data_type=dtype, kv_data_type=dtype))
        fns["fi multilevel"] = lambda kv: multi.run(q, kv)
    return fns, plan_ms


TILINGS = {  # named decode tilings of the plain kernel, A/B'd against its default (choose_config)
    "tile128": dict(tile_n=128, num_warps=4, num_stages=3),
    "tile128 w8": dict(tile_n=128, num_warps=8, num_stages=3),
    "tile64 w2": dict(tile_n=64, num_warps=2, num_stages=3),
    "tile32": dict(tile_n=32, num_warps=4, num_stages=3),
}


SHARED_TILINGS = {  # named tilings of the cascade's shared pass, A/B'd against its default (choose_shared_config)
    "s2 w4": dict(num_warps=4, num_stages=2),
    "s3 w8": dict(num_warps=8, num_stages=3),
    "s4 w8": dict(num_warps=8, num_stages=4),
    "t32 s3 w8": dict(tile_n=32, num_warps=8, num_stages=3),
    "t128 s2 w8": dict(tile_n=128, num_warps=8, num_stages=2),
    "t128 s3 w8": dict(tile_n=128, num_warps=8, num_stages=3),
    "sp1": dict(num_splits=1),  # KV splits of the shared pass, against the split rule's choice (_shared_splits)
    "sp2": dict(num_splits=2),
    "sp4": dict(num_splits=4),
    "sp8": dict(num_splits=8),
}


def shared_tiling_contenders(batch: dict, plan, out: torch.Tensor, shape: dict) -> dict:
    """Cascade with its shared pass under each of ``SHARED_TILINGS`` (``fn((k_cache, v_cache))``): the default
    shared tiling (``choose_shared_config``, its split count included) with that tile, warps and stages."""
    from thaw_rl_kernels.triton_cascade_attention import cascade_attention_triton, choose_shared_config

    q, tables, lens = batch["query"], batch["block_tables"], batch["seq_lens"]
    default = choose_shared_config(plan.group_rows.shape[0], plan.num_groups, plan.max_group_rows,
                                   plan.max_shared_blocks, shape["num_kv_heads"], shape["num_heads"] // shape["num_kv_heads"],
                                   shape["block_size"], q.dtype, q.device)  # fmt: skip
    fns = {}
    for name, cfg in SHARED_TILINGS.items():
        full = {**default, **cfg}
        fns[f"thaw cascade {name}"] = lambda kv, c=full: cascade_attention_triton(
            q, *kv, tables, lens, plan, batch["scale"], out=out, shared_config=c)
    return fns


def tiling_contenders(batch: dict, cu: torch.Tensor, out: torch.Tensor, shape: dict) -> dict:
    """The plain kernel under each of ``TILINGS`` (``fn((k_cache, v_cache))``): the default decode tiling
    (``choose_config``) with that tile, warps and stages, its KV split count chosen by the default rule for
    that tile."""
    import triton

    from thaw_rl_kernels.triton_paged_attention import _decode_splits, choose_config, launch_paged_attention

    q, tables, lens = batch["query"], batch["block_tables"], batch["seq_lens"]
    rows, max_context = q.shape[0], tables.shape[1] * shape["block_size"]
    default = choose_config(num_tokens=rows, num_seqs=rows, num_kv_heads=shape["num_kv_heads"],
                            group=shape["num_heads"] // shape["num_kv_heads"], max_seqlen_q=1, max_context=max_context,
                            dtype=q.dtype, device=q.device)
    fns = {}
    for name, cfg in TILINGS.items():
        splits = _decode_splits(rows * shape["num_kv_heads"], triton.cdiv(max_context, cfg["tile_n"]), q.device)
        full = {**default, **cfg, "num_splits": splits}
        fns[f"thaw {name}"] = lambda kv, c=full: launch_paged_attention(q, *kv, tables, lens, cu, batch["scale"], out,
                                                                        **c)
    return fns


def time_all_layers(fn, layers: list[tuple[torch.Tensor, torch.Tensor]], rep_ms: int = 60) -> tuple[float, str]:
    """Per-layer ms of ``fn`` run over every layer's cache in turn, as a decode step does: replayed from a CUDA
    graph (the engine's decode steps are; eager timing would count Triton's Python launch cost, ~20 us a launch,
    which the graphs do not pay), and reading each layer's K/V from DRAM (28 layers' cache far exceed L2,
    so only what a step shares within a layer, a group's prompt, can hit). Falls back to eager do_bench where a
    contender cannot be captured, and says so."""
    import triton.testing

    def step():
        for kv in layers:
            fn(kv)

    try:
        return triton.testing.do_bench_cudagraph(step, rep=rep_ms, return_mode="median") / len(layers), "cuda graph"
    except Exception:  # noqa: BLE001 - not capturable: eager, with launch cost (marked in the receipt)
        torch.cuda.synchronize()
        return time_ms(step, True, rep_ms) / len(layers), "eager"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--rows", default="32,128,256,1024", help="decode rows (groups of 16), comma-separated")
    parser.add_argument("--prompts", default="256,512,2048", help="shared prompt lengths, comma-separated")
    parser.add_argument("--fi-variants", default="fi decode tc,fi cascade",
                        help="FlashInfer contenders ('fi decode', 'fi decode tc', 'fi cascade', 'fi multilevel' "
                             "(FA3 JIT build)); skipped when flashinfer is not installed; '' for none")
    parser.add_argument("--tilings", action="store_true", help="also the plain kernel under each of TILINGS")
    parser.add_argument("--shared-tilings", action="store_true",
                        help="also cascade with its shared pass under each of SHARED_TILINGS")
    parser.add_argument("--sweep", action="store_true", help="also a grid of the plain kernel's decode tilings")
    parser.add_argument("--fp8", action="store_true", help="also thaw plain and cascade over an FP8 copy of the cache")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timing rounds, contenders interleaved in each (GPU clocks and neighbours drift)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("grpo_decode_attention.py times CUDA kernels; paged_attention.py --cascade --smoke checks ours on CPU.")
        return 2
    from receipt_utils import receipt, write_receipt

    from paged_attention import CascadeCase
    from thaw_rl_kernels.cascade_plan import plan_cascade
    from thaw_rl_kernels.kv_write import FP8_DTYPE, to_cache_dtype
    from thaw_rl_kernels.paged_attention import paged_attention_reference
    from thaw_rl_kernels.triton_cascade_attention import cascade_attention_triton
    from thaw_rl_kernels.triton_paged_attention import paged_attention_triton

    try:
        import flashinfer
    except ImportError:
        flashinfer = None
    fi_variants = [v for v in args.fi_variants.split(",") if v] if flashinfer else []
    shape, dtype, tol = QWEN25_1_5B, torch.bfloat16, 2e-2
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    cases = [CascadeCase(int(r), 16, int(p), (64, 512)) for r in args.rows.split(",") for p in args.prompts.split(",")]
    rows_out, ok, first_call = [], True, {}
    for case in cases:
        batch = build_cascade_batch(case, shape, dtype, "cuda", "block_major")
        kv = (batch["query"], batch["key_cache"], batch["value_cache"], batch["block_tables"], batch["seq_lens"])
        scale, out = batch["scale"], torch.empty_like(batch["query"])
        t0 = time.perf_counter()
        plan = plan_cascade(batch["block_tables"].cpu(), batch["seq_lens"].cpu(), shape["block_size"])
        plan_ms = {"thaw cascade": (time.perf_counter() - t0) * 1e3}
        plan = plan.to("cuda")
        cu = torch.arange(case.num_rows + 1, dtype=torch.int32, device="cuda")
        q, tables, lens = batch["query"], batch["block_tables"], batch["seq_lens"]
        fns = {"thaw plain": lambda kv: paged_attention_triton(q, *kv, tables, lens, cu, 1, scale, out=out),
               "thaw cascade": lambda kv: cascade_attention_triton(q, *kv, tables, lens, plan, scale, out=out)}
        fp8_of = {}  # id of a layer's bf16 K cache -> that layer's (K, V) in FP8
        if args.fp8:
            for k, v in batch["layer_caches"]:
                fp8_of[id(k)] = (to_cache_dtype(k, FP8_DTYPE), to_cache_dtype(v, FP8_DTYPE))
            fns["thaw plain fp8"] = lambda kv: paged_attention_triton(q, *fp8_of[id(kv[0])], tables, lens, cu, 1,
                                                                      scale, out=out)  # fmt: skip
            fns["thaw cascade fp8"] = lambda kv: cascade_attention_triton(q, *fp8_of[id(kv[0])], tables, lens, plan,
                                                                          scale, out=out)  # fmt: skip
        if args.tilings:
            fns.update(tiling_contenders(batch, cu, out, shape))
        if args.shared_tilings:
            fns.update(shared_tiling_contenders(batch, plan, out, shape))
        if fi_variants:
            fi_fns, fi_plan_ms = flashinfer_contenders(batch, shape, case.group_size, case.prompt_len, workspace,
                                                      fi_variants)
            fns.update(fi_fns)
            plan_ms.update(fi_plan_ms)
        expected = paged_attention_reference(*kv, cu, 1, scale).float()
        if fp8_of:
            first = fp8_of[id(batch["layer_caches"][0][0])]
            expected_fp8 = paged_attention_reference(q, *first, tables, lens, cu, 1, scale).float()
        row = dict(case=case.name, num_rows=case.num_rows, group_size=case.group_size, prompt_len=case.prompt_len,
                   tail_range=list(case.tail_range), plan_host_ms=plan_ms, results={})
        runnable = {}
        for name, fn in fns.items():
            t0 = time.perf_counter()
            try:
                got = fn(batch["layer_caches"][0])
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - a FlashInfer build or shape failure: record it, go on
                row["results"][name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
                print(f"{case.name} {name}: {row['results'][name]['error']}", flush=True)
                continue
            first_call.setdefault(name, time.perf_counter() - t0)
            want = expected_fp8 if name.endswith(" fp8") else expected
            err = (got.float() - want).abs().max().item()
            correct = err <= tol * max(1.0, want.abs().max().item())
            ok &= correct
            row["results"][name] = dict(max_abs_err=err, correct=correct, ms_rounds=[])
            runnable[name] = fn
        layers = batch["layer_caches"]
        for _ in range(args.repeats):  # interleaved: every contender once per round
            for name, fn in runnable.items():
                ms, how = time_all_layers(fn, layers)
                row["results"][name]["ms_rounds"].append(ms)
                row["results"][name]["timed_as"] = how
        for name in runnable:
            res = row["results"][name]
            res["ms"] = statistics.median(res["ms_rounds"])
        if args.sweep:
            sweep = sweep_tilings(Case(case.name, [1] * case.num_rows, []), dict(batch, cu_seqlens_q=cu),
                                  shape["num_heads"] // shape["num_kv_heads"])
            row["plain_sweep"] = [r for r in sweep if "ms" in r][:8]
            print(f"  best plain tiling {row['plain_sweep'][0]['ms']:.4f} ms {row['plain_sweep'][0]['config']}",
                  flush=True)
        rows_out.append(row)
        print_row(row, flush=True)
        batch = kv = fns = runnable = expected = out = plan = fp8_of = expected_fp8 = None
        torch.cuda.empty_cache()
    data = receipt("grpo_decode_attention", args, rows_out)
    data.update(shape=shape, dtype=str(dtype), all_correct=ok, first_call_s=first_call,
                flashinfer=getattr(flashinfer, "__version__", None),
                flashinfer_cuda_arch_list=os.environ.get("FLASHINFER_CUDA_ARCH_LIST"))
    write_receipt(args.out, data)
    print(f"\nms per layer (a {shape['num_layers']}-layer pass replayed in a CUDA graph; median of {args.repeats} "
          "interleaved rounds), speedup vs thaw plain; plan = host ms")
    for row in rows_out:
        print_row(row)
    return 0 if ok else 1


def print_row(row: dict, flush: bool = False) -> None:
    base = row["results"].get("thaw plain", {}).get("ms")
    cells = []
    for name, res in row["results"].items():
        if "ms" not in res:
            cells.append(f"{name} ERROR")
            continue
        bad = "" if res["correct"] else " WRONG"
        speed = f" {base / res['ms']:.2f}x" if base else ""
        plan = row["plan_host_ms"].get(name)
        cells.append(f"{name} {res['ms']:.4f}{speed}{f' plan {plan:.2f}' if plan is not None else ''}{bad}")
    print(f"{row['case']:40s} | " + " | ".join(cells), flush=flush)


if __name__ == "__main__":
    raise SystemExit(main())
