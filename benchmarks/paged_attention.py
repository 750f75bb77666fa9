"""Paged attention: the Triton kernel vs what a naive engine does, on Qwen2.5-1.5B shapes.

Cases (H=12, KVH=2, D=128, block 16, bf16, cache in the engine's block_major layout with 28 layers, so
one layer's K/V view has a large block stride; blocks shuffled as after a long run of forks and frees):
decode batches of 1, 16 and 128 sequences at context 768, a prefill of 8 x 512 tokens from scratch,
and a mixed engine step (64 decodes at 768 + one 512-token chunk after 256 cached tokens).

Contenders, all checked against ``paged_attention_reference`` before they are timed:
- triton:       ``paged_attention_triton`` (one launch, CUDA-graph safe), default tiling.
- gather+sdpa:  gather each sequence's blocks into a padded dense tensor, then masked SDPA.
- sdpa dense:   SDPA on K/V that are already dense and contiguous (no paging cost at all); only for
                uniform batches. A bound, not a contender: an engine cannot have its KV that way.
- flex paged:   ``flex_attention`` over the whole physical cache with a mask that maps each slot to
                its (sequence, position); only with ``--flex`` (compiles, takes minutes).

Usage:
    python benchmarks/paged_attention.py --out benchmarks/results/paged_attention_h100.json [--sweep] [--flex]
    python benchmarks/paged_attention.py --smoke      # tiny shapes on CPU, reference and gather+sdpa only
    python benchmarks/paged_attention.py --cascade --out benchmarks/results/cascade_attention_h200.json
    python benchmarks/paged_attention.py --cascade --smoke   # tiny shapes, Triton in the CPU interpreter

``--cascade`` times plain decode attention (``paged_attention_triton`` over every row's whole context)
against cascade attention (``cascade_attention_triton``: each group's shared prompt read once for its rows,
then each row's own tail; fused merge, and the torch merge for comparison) on GRPO decode batches:
Qwen2.5-1.5B heads, 128 and 1,024 rows in groups of 16 sharing a 256/512/2,048-token prompt, each row with
its own 64-512 decoded tokens. The plan (``plan_cascade``, host work once per batch composition) is
built outside the timed region and its host time reported beside it.

``--sweep`` also times a grid of tilings of the Triton kernel per case and reports the best ones.
Times are medians of ``triton.testing.do_bench`` (CUDA) or of 20 wall-clock runs (CPU); KV GB/s counts
the bytes of K and V each query tile must read (each context token once per KV head).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from receipt_utils import git_commit  # noqa: E402

QWEN25_1_5B = dict(num_heads=12, num_kv_heads=2, head_dim=128, block_size=16, num_layers=28)
SMOKE_SHAPE = dict(num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, num_layers=2)


@dataclass
class Case:
    name: str
    q_lens: list[int]
    ctx_lens: list[int]

    @property
    def uniform(self) -> bool:
        return len(set(self.q_lens)) == 1 and len(set(self.ctx_lens)) == 1 and self.q_lens[0] in (1, self.ctx_lens[0])


def gpu_cases() -> list[Case]:
    decode = [Case(f"decode b{b} ctx768", [1] * b, [768] * b) for b in (1, 16, 128)]
    return decode + [
        Case("prefill 8x512", [512] * 8, [512] * 8),
        Case("mixed 64x768 decode + 512 chunk", [1] * 64 + [512], [768] * 64 + [768]),
    ]


def smoke_cases() -> list[Case]:
    return [Case("decode b3 ctx40", [1] * 3, [40] * 3), Case("prefill 2x24", [24] * 2, [24] * 2),
            Case("mixed", [1, 0, 12, 1], [40, 9, 30, 17])]  # fmt: skip


def build_batch(case: Case, shape: dict, dtype: torch.dtype, device: str, layout: str, seed: int = 0) -> dict:
    """Random K/V in a shuffled paged cache; returns the kwargs of paged_attention_* plus metadata."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    bs, kvh, d, h = shape["block_size"], shape["num_kv_heads"], shape["head_dim"], shape["num_heads"]
    blocks_per_seq = [-(-c // bs) for c in case.ctx_lens]
    num_blocks = sum(blocks_per_seq) + 1
    if layout == "block_major":  # (NB, L, 2, BS, KVH, D); attention reads layer 0's strided view
        storage = torch.randn(num_blocks, shape["num_layers"], 2, bs, kvh, d, device=device, dtype=dtype)
        key_cache, value_cache = storage[:, 0, 0], storage[:, 0, 1]  # (NB, BS, KVH, D)
    else:  # one layer's contiguous cache
        storage = torch.randn(2, num_blocks, bs, kvh, d, device=device, dtype=dtype)
        key_cache, value_cache = storage[0], storage[1]  # (NB, BS, KVH, D)
    perm = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.zeros(len(case.ctx_lens), max(blocks_per_seq), dtype=torch.int32)  # (S, MB)
    start = 0
    for s, n in enumerate(blocks_per_seq):
        block_tables[s, :n] = perm[start : start + n].to(torch.int32)
        start += n
    return dict(
        query=torch.randn(sum(case.q_lens), h, d, device=device, dtype=dtype),  # (T, H, D)
        key_cache=key_cache,
        value_cache=value_cache,
        block_tables=block_tables.to(device),
        seq_lens=torch.tensor(case.ctx_lens, dtype=torch.int32, device=device),
        cu_seqlens_q=torch.tensor([0, *case.q_lens], device=device).cumsum(0).to(torch.int32),
        max_seqlen_q=max(case.q_lens),
        scale=d**-0.5,
    )


def make_gather_sdpa(case: Case, batch: dict):
    """A naive engine's step: gather each sequence's blocks into a padded dense tensor, masked SDPA."""
    dev = batch["query"].device
    bs = batch["key_cache"].shape[1]
    q_lens = torch.tensor(case.q_lens, device=dev)
    ctx = torch.tensor(case.ctx_lens, device=dev)
    max_q, num_blocks = max(case.q_lens), -(-max(case.ctx_lens) // bs)
    j = torch.arange(max_q, device=dev)
    q_valid = j[None, :] < q_lens[:, None]  # (S, maxq)
    q_rows = (batch["cu_seqlens_q"][:-1, None].long() + j[None, :]).clamp(max=max(len(batch["query"]) - 1, 0))
    kv_pos = torch.arange(num_blocks * bs, device=dev)
    q_pos = (ctx - q_lens)[:, None] + j[None, :]  # (S, maxq)
    mask = kv_pos[None, None, :] <= q_pos[:, :, None]  # (S, maxq, L)
    mask = (mask & q_valid[:, :, None]) | (~q_valid[:, :, None] & (kv_pos == 0))  # padding rows see key 0
    mask = mask[:, None]  # (S, 1, maxq, L)
    tables = batch["block_tables"][:, :num_blocks].long()

    def run():
        k = batch["key_cache"][tables].flatten(1, 2).transpose(1, 2)  # (S, KVH, L, D)
        v = batch["value_cache"][tables].flatten(1, 2).transpose(1, 2)
        q = batch["query"][q_rows].transpose(1, 2)  # (S, H, maxq, D)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=batch["scale"], enable_gqa=True)
        return o.transpose(1, 2)[q_valid]  # (T, H, D)

    return run


def make_dense_sdpa(case: Case, batch: dict):
    """SDPA on already dense, contiguous K/V (uniform batches only): the no-paging bound."""
    if not case.uniform:
        return None
    s, q_len, ctx = len(case.q_lens), case.q_lens[0], case.ctx_lens[0]
    bs = batch["key_cache"].shape[1]
    tables = batch["block_tables"][:, : -(-ctx // bs)].long()
    k = batch["key_cache"][tables].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()  # (S, KVH, ctx, D)
    v = batch["value_cache"][tables].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()
    q = batch["query"].view(s, q_len, *batch["query"].shape[1:]).transpose(1, 2).contiguous()  # (S, H, q, D)
    causal = q_len > 1

    def run():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=batch["scale"], enable_gqa=True)
        return o.transpose(1, 2).reshape(-1, *o.shape[1:2], o.shape[-1])  # (T, H, D)

    return run


def make_flex_paged(case: Case, batch: dict):
    """flex_attention over the physical cache: a slot is visible if it is the query's sequence, causally."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dev = batch["query"].device
    nb, bs, kvh, d = batch["key_cache"].shape
    slot_seq = torch.full((nb * bs,), -1, dtype=torch.int32, device=dev)
    slot_pos = torch.full((nb * bs,), -1, dtype=torch.int32, device=dev)
    for s, ctx in enumerate(case.ctx_lens):
        blocks = batch["block_tables"][s, : -(-ctx // bs)].long()
        slots = (blocks[:, None] * bs + torch.arange(bs, device=dev)).flatten()[:ctx]
        slot_seq[slots], slot_pos[slots] = s, torch.arange(ctx, dtype=torch.int32, device=dev)
    q_lens = torch.tensor(case.q_lens, device=dev)
    q_seq = torch.repeat_interleave(torch.arange(len(case.q_lens), device=dev), q_lens).to(torch.int32)
    q_pos = torch.cat([torch.arange(c - q, c, device=dev) for q, c in zip(case.q_lens, case.ctx_lens)]).to(torch.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        return (slot_seq[kv_idx] == q_seq[q_idx]) & (slot_pos[kv_idx] <= q_pos[q_idx])

    t = len(q_seq)
    block_mask = create_block_mask(mask_mod, 1, None, t, nb * bs, device=dev)
    # flex needs (1, KVH, slots, D); the block_major view is not one strided tensor over slots -> copy once.
    k = batch["key_cache"].reshape(nb * bs, kvh, d).transpose(0, 1)[None]
    v = batch["value_cache"].reshape(nb * bs, kvh, d).transpose(0, 1)[None]
    q = batch["query"].transpose(0, 1)[None]  # (1, H, T, D)
    compiled = torch.compile(flex_attention, dynamic=False)

    def run():
        o = compiled(q, k, v, block_mask=block_mask, scale=batch["scale"], enable_gqa=True)
        return o[0].transpose(0, 1)  # (T, H, D)

    return run


def kv_bytes(case: Case, shape: dict, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return sum(case.ctx_lens) * shape["num_kv_heads"] * shape["head_dim"] * 2 * elem


def causal_flops(case: Case, shape: dict) -> int:
    rows = sum(sum(range(c - q + 1, c + 1)) for q, c in zip(case.q_lens, case.ctx_lens))  # keys seen per row
    return 4 * rows * shape["num_heads"] * shape["head_dim"]


def time_ms(fn, cuda: bool, rep_ms: int = 200) -> float:
    if cuda:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
    fn()
    runs = []
    for _ in range(20):
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) * 1e3)
    return sorted(runs)[len(runs) // 2]


def sweep_tilings(case: Case, batch: dict, group: int) -> list[dict]:
    from thaw_rl_kernels.triton_paged_attention import launch_paged_attention

    args = [batch[k] for k in ("query", "key_cache", "value_cache", "block_tables", "seq_lens", "cu_seqlens_q")]
    out = torch.empty_like(batch["query"])
    if max(case.q_lens) <= 1:
        grid = [dict(block_q=1, block_m=max(16, 1 << (group - 1).bit_length()), tile_n=tn, num_splits=sp,
                     num_warps=w, num_stages=st)
                for tn, sp, w, st in itertools.product((32, 64, 128), (1, 2, 4, 8), (2, 4, 8), (2, 3))]  # fmt: skip
    else:
        grid = [dict(block_q=bm // group, block_m=bm, tile_n=tn, num_splits=1, num_warps=w, num_stages=st)
                for bm, tn, w, st in itertools.product((16, 32, 64, 128), (32, 64), (4, 8), (2, 3))
                if bm >= group]  # fmt: skip
    results = []
    for cfg in grid:
        try:
            ms = time_ms(lambda: launch_paged_attention(*args, batch["scale"], out, **cfg), cuda=True, rep_ms=100)
        except Exception as e:  # noqa: BLE001 - out of shared memory etc.: record and go on
            results.append(dict(config=cfg, error=f"{type(e).__name__}: {str(e)[:120]}"))
            continue
        results.append(dict(config=cfg, ms=ms))
    return sorted(results, key=lambda r: r.get("ms", float("inf")))


def environment(cuda: bool) -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
        except Exception:  # noqa: BLE001
            return "unknown"

    env = dict(
        device=torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        torch=torch.__version__,
        cuda=torch.version.cuda,
        python=platform.python_version(),
        commit=git_commit(),
        dirty=bool(git("status", "--porcelain", "--", "thaw_rl_kernels", "benchmarks")),
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


@dataclass
class CascadeCase:
    num_rows: int
    group_size: int
    prompt_len: int
    tail_range: tuple[int, int]  # each row's own tokens, uniform in [lo, hi]

    @property
    def name(self) -> str:
        lo, hi = self.tail_range
        return f"{self.num_rows} rows G{self.group_size} prompt {self.prompt_len} tail {lo}-{hi}"


def cascade_cases(smoke: bool) -> list[CascadeCase]:
    if smoke:
        return [CascadeCase(8, 4, 32, (4, 20)), CascadeCase(12, 4, 48, (8, 24))]
    return [CascadeCase(rows, 16, prompt, (64, 512)) for rows in (128, 1024) for prompt in (256, 512, 2048)]


def build_cascade_batch(case: CascadeCase, shape: dict, dtype: torch.dtype, device: str, layout: str,
                        seed: int = 0) -> dict:
    """A GRPO decode batch: each group's prompt blocks are the same physical blocks in its rows' tables (as a
    fork leaves them), each row's decoded tokens in blocks of its own; all blocks shuffled."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    bs, kvh, d, h = shape["block_size"], shape["num_kv_heads"], shape["head_dim"], shape["num_heads"]
    num_groups = case.num_rows // case.group_size
    prompt_blocks = -(-case.prompt_len // bs)
    lo, hi = case.tail_range
    tails = torch.randint(lo, hi + 1, (case.num_rows,), generator=gen)  # (S,)
    seq_lens = case.prompt_len + tails
    own_blocks = [-(-int(n) // bs) - case.prompt_len // bs for n in seq_lens]  # a partial prompt block is copied
    shared_blocks = case.prompt_len // bs
    num_blocks = num_groups * shared_blocks + sum(own_blocks) + 1
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    width = max(shared_blocks + n for n in own_blocks)
    block_tables = torch.zeros(case.num_rows, width, dtype=torch.int32)  # (S, W)
    start = num_groups * shared_blocks
    for s in range(case.num_rows):
        g = s // case.group_size
        block_tables[s, :shared_blocks] = perm[g * shared_blocks : (g + 1) * shared_blocks]
        block_tables[s, shared_blocks : shared_blocks + own_blocks[s]] = perm[start : start + own_blocks[s]]
        start += own_blocks[s]
    if layout == "block_major":  # (NB, L, 2, BS, KVH, D); attention reads layer 0's strided view
        storage = torch.randn(num_blocks, shape["num_layers"], 2, bs, kvh, d, device=device, dtype=dtype)
        layers = [(storage[:, i, 0], storage[:, i, 1]) for i in range(shape["num_layers"])]  # (NB, BS, KVH, D) each
    else:
        storage = torch.randn(2, num_blocks, bs, kvh, d, device=device, dtype=dtype)
        layers = [(storage[0], storage[1])]
    del prompt_blocks
    return dict(
        query=torch.randn(case.num_rows, h, d, device=device, dtype=dtype),  # (S, H, D)
        key_cache=layers[0][0],
        value_cache=layers[0][1],
        layer_caches=layers,  # every layer's (K, V) views, for a timing that reads from DRAM as a decode step does
        block_tables=block_tables.to(device),
        seq_lens=seq_lens.to(torch.int32).to(device),
        scale=d**-0.5,
    )


def run_cascade(args) -> int:
    """Plain vs cascade decode attention; prints the table last and writes a receipt."""
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda:  # Triton's interpreter; read when triton is first imported
        import os

        os.environ["TRITON_INTERPRET"] = "1"
    from receipt_utils import receipt, write_receipt

    from thaw_rl_kernels.cascade_plan import plan_cascade
    from thaw_rl_kernels.paged_attention import paged_attention_reference
    from thaw_rl_kernels.triton_cascade_attention import cascade_attention_triton
    from thaw_rl_kernels.triton_paged_attention import paged_attention_triton

    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    shape = QWEN25_1_5B if cuda else SMOKE_SHAPE
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    elem = torch.empty((), dtype=dtype).element_size()
    rows, ok = [], True
    for case in cascade_cases(args.smoke):
        batch = build_cascade_batch(case, shape, dtype, device, args.layout)
        t0 = time.perf_counter()
        plan = plan_cascade(batch["block_tables"].cpu(), batch["seq_lens"].cpu(), shape["block_size"])
        plan_ms = (time.perf_counter() - t0) * 1e3
        plan = plan.to(device)
        num_rows = case.num_rows
        cu = torch.arange(num_rows + 1, dtype=torch.int32, device=device)
        kv = (batch["query"], batch["key_cache"], batch["value_cache"], batch["block_tables"], batch["seq_lens"])
        out, scale = torch.empty_like(batch["query"]), batch["scale"]
        contenders = {
            "plain": lambda: paged_attention_triton(*kv, cu, 1, scale, out=out),
            "cascade": lambda: cascade_attention_triton(*kv, plan, scale, out=out),
            "cascade torch merge": lambda: cascade_attention_triton(*kv, plan, scale, out=out, merge="torch"),
        }
        expected = paged_attention_reference(*kv, cu, 1, scale).float()
        token_bytes = 2 * shape["num_kv_heads"] * shape["head_dim"] * elem  # K and V of one token, one layer
        ctx = batch["seq_lens"].long()
        read_plain = int(ctx.sum()) * token_bytes
        read_cascade = (int((ctx - plan.tail_start.long()).sum())
                        + int(plan.group_num_blocks.long().sum()) * shape["block_size"]) * token_bytes
        row = dict(case=case.name, num_rows=num_rows, group_size=case.group_size, prompt_len=case.prompt_len,
                   tail_range=list(case.tail_range), num_groups=plan.num_groups, plan_host_ms=plan_ms,
                   kv_bytes_plain=read_plain, kv_bytes_cascade=read_cascade, results={})  # fmt: skip
        for name, fn in contenders.items():
            err = (fn().float() - expected).abs().max().item()
            correct = err <= tol * max(1.0, expected.abs().max().item())
            ok &= correct
            ms = time_ms(fn, cuda) if cuda else _time_interpreted(fn)
            row["results"][name] = dict(ms=ms, max_abs_err=err, correct=correct)
        if args.sweep and cuda:
            row["shared_sweep"] = sweep_shared_tilings(kv, plan, scale, out, shape, expected, tol)
        rows.append(row)
        batch = kv = contenders = expected = out = None  # free this case's cache before the next is built
        if cuda:
            torch.cuda.empty_cache()
    data = receipt("paged_attention_cascade", args, rows)
    data.update(shape=shape, dtype=str(dtype), all_correct=ok, interpreter=not cuda)
    write_receipt(args.out, data)
    print_cascade_table(rows, data["device"], interpreted=not cuda)
    return 0 if ok else 1


def sweep_shared_tilings(kv: tuple, plan, scale: float, out: torch.Tensor, shape: dict, expected: torch.Tensor,
                         tol: float) -> list[dict]:
    """Time the cascade (fused merge) over a grid of shared-pass tilings; best first."""
    from thaw_rl_kernels.triton_cascade_attention import cascade_attention_triton

    group = shape["num_heads"] // shape["num_kv_heads"]
    results = []
    for block_m, tile_n, splits, warps in itertools.product((32, 64, 128), (32, 64), (1, 2, 4, 8), (4, 8)):
        if block_m < group:
            continue
        cfg = dict(block_r=block_m // group, block_m=block_m, tile_n=tile_n, num_splits=splits, num_warps=warps)
        fn = lambda c=cfg: cascade_attention_triton(*kv, plan, scale, out=out, shared_config=c)  # noqa: E731
        try:
            err = (fn().float() - expected).abs().max().item()
            ms = time_ms(fn, cuda=True, rep_ms=100)
        except Exception as e:  # noqa: BLE001 - out of shared memory etc.: record and go on
            results.append(dict(config=cfg, error=f"{type(e).__name__}: {str(e)[:120]}"))
            continue
        results.append(dict(config=cfg, ms=ms, correct=err <= tol * max(1.0, expected.abs().max().item())))
    return sorted(results, key=lambda r: r.get("ms", float("inf")))


def _time_interpreted(fn, runs: int = 3) -> float:
    """Median wall ms of a few runs: the interpreter is far too slow for do_bench, and its times mean nothing."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def print_cascade_table(rows: list[dict], device: str, interpreted: bool) -> None:
    note = " (Triton INTERPRETER on CPU: these times are not speed claims)" if interpreted else ""
    print(f"\ncascade vs plain decode attention on {device}{note}")
    header = (f"{'case':44s}{'groups':>7s}{'plain ms':>11s}{'cascade ms':>12s}{'speedup':>9s}"
              f"{'torch-merge ms':>16s}{'KV read ratio':>15s}{'plan ms':>9s}")  # fmt: skip
    print(header + "\n" + "-" * len(header))
    for r in rows:
        res = r["results"]
        flag = "" if all(v["correct"] for v in res.values()) else "  WRONG"
        plain, cascade, torch_merge = res["plain"]["ms"], res["cascade"]["ms"], res["cascade torch merge"]["ms"]
        print(f"{r['case']:44s}{r['num_groups']:7d}{plain:11.4f}{cascade:12.4f}{plain / cascade:8.2f}x"
              f"{torch_merge:16.4f}{r['kv_bytes_plain'] / r['kv_bytes_cascade']:14.2f}x{r['plan_host_ms']:9.2f}{flag}")
    sweeps = [r for r in rows if r.get("shared_sweep")]
    if sweeps:
        print("\nbest shared-pass tilings (fused merge; default first):")
        for r in sweeps:
            best = [s for s in r["shared_sweep"] if "ms" in s][:2]
            cells = "; ".join(f"{s['ms']:.4f} ms {s['config']}" for s in best)
            print(f"  {r['case']}: default {r['results']['cascade']['ms']:.4f} ms | {cells}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (reference and gather+sdpa)")
    parser.add_argument("--out", type=Path, help="write a JSON receipt here")
    parser.add_argument("--layout", choices=("block_major", "layer_major"), default="block_major")
    parser.add_argument("--sweep", action="store_true", help="also time a grid of Triton tilings per case")
    parser.add_argument("--flex", action="store_true", help="also time a paged flex_attention (torch.compile)")
    parser.add_argument("--cascade", action="store_true",
                        help="time plain vs cascade (shared-prefix) decode attention on GRPO decode batches")
    parser.add_argument("--decode-batches", default=None,
                        help="e.g. 32,128,1024: only decode cases of these batch sizes at --ctx (a decode step's shapes)")
    parser.add_argument("--ctx", type=int, default=768, help="context length of --decode-batches cases")
    args = parser.parse_args()
    if args.cascade:
        return run_cascade(args)

    cuda = torch.cuda.is_available() and not args.smoke
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    shape = QWEN25_1_5B if cuda else SMOKE_SHAPE
    group = shape["num_heads"] // shape["num_kv_heads"]
    from thaw_rl_kernels.paged_attention import paged_attention_reference

    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    rows, ok = [], True
    cases = gpu_cases() if cuda else smoke_cases()
    if args.decode_batches:
        cases = [Case(f"decode b{b} ctx{args.ctx}", [1] * b, [args.ctx] * b)
                 for b in (int(x) for x in args.decode_batches.split(","))]
    for case in cases:
        batch = build_batch(case, shape, dtype, device, args.layout)
        expected = paged_attention_reference(**batch).float()
        contenders = {"gather+sdpa": make_gather_sdpa(case, batch), "sdpa dense": make_dense_sdpa(case, batch)}
        if cuda:
            from thaw_rl_kernels.triton_paged_attention import paged_attention_triton

            out = torch.empty_like(batch["query"])
            contenders = {"triton": lambda b=batch, o=out: paged_attention_triton(**b, out=o), **contenders}
            if args.flex:
                try:
                    contenders["flex paged"] = make_flex_paged(case, batch)
                except Exception as e:  # noqa: BLE001 - optional contender
                    print(f"flex paged unavailable for {case.name}: {type(e).__name__}: {e}", file=sys.stderr)
        row = dict(case=case.name, num_seqs=len(case.q_lens), num_tokens=sum(case.q_lens),
                   kv_bytes=kv_bytes(case, shape, dtype), flops=causal_flops(case, shape), results={})  # fmt: skip
        for name, fn in contenders.items():
            if fn is None:
                continue
            try:
                err = (fn().float() - expected).abs().max().item()
            except Exception as e:  # noqa: BLE001 - a contender failing must not hide the others
                row["results"][name] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
                ok &= name != "triton"
                continue
            correct = err <= tol * max(1.0, expected.abs().max().item())
            ok &= correct or name != "triton"
            ms = time_ms(fn, cuda)
            row["results"][name] = dict(ms=ms, max_abs_err=err, correct=correct,
                                        kv_gbps=row["kv_bytes"] / ms / 1e6, tflops=row["flops"] / ms / 1e9)  # fmt: skip
        if cuda:
            from thaw_rl_kernels.triton_paged_attention import choose_config

            row["triton_config"] = choose_config(
                len(batch["query"]), len(case.q_lens), shape["num_kv_heads"], group, batch["max_seqlen_q"],
                batch["block_tables"].shape[1] * shape["block_size"], dtype, batch["query"].device,
            )  # fmt: skip
            if args.sweep:
                row["sweep"] = sweep_tilings(case, batch, group)
        rows.append(row)
        del batch, contenders
        if cuda:
            torch.cuda.empty_cache()

    receipt = dict(benchmark="paged_attention", shape=shape, dtype=str(dtype), layout=args.layout,
                   environment=environment(cuda), all_triton_correct=ok, cases=rows)  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(receipt, indent=2) + "\n")
    print_table(rows, receipt["environment"], args.sweep)
    return 0 if ok else 1


def print_table(rows: list[dict], env: dict, sweep: bool) -> None:
    names = list(dict.fromkeys(n for r in rows for n in r["results"]))
    print(f"\npaged attention on {env['device']} (torch {env['torch']}, triton {env['triton']}); ms (KV GB/s)")
    header = f"{'case':34s}" + "".join(f"{n:>22s}" for n in names)
    print(header + "\n" + "-" * len(header))
    for r in rows:
        cells = []
        for n in names:
            res = r["results"].get(n)
            if res is None:
                cells.append(f"{'-':>22s}")
            elif "error" in res:
                cells.append(f"{'error':>22s}")
            else:
                flag = "" if res["correct"] else " WRONG"
                cells.append(f"{res['ms']:9.4f} ({res['kv_gbps']:6.0f}){flag:>6s}")
        print(f"{r['case']:34s}" + "".join(cells))
    if sweep:
        print("\nbest tilings (sweep):")
        for r in rows:
            best = [s for s in r.get("sweep", []) if "ms" in s][:3]
            print(f"  {r['case']}: default {r['triton_config']}")
            for s in best:
                print(f"      {s['ms']:8.4f} ms  {s['config']}")


if __name__ == "__main__":
    sys.exit(main())
