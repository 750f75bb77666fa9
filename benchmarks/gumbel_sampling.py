"""The fused Gumbel-max sampler on a decode step's logits: tokens against the torch reference, time per chunking.

For each batch size (rows x the vocabulary of Qwen2.5, 151,936), bf16 logits as the decode graph leaves them:
- check: the Triton kernel's tokens equal ``gumbel_sample_reference``'s (same hash, same noise), logprobs and
  entropies within 1e-4;
- time (``triton.testing.do_bench``, median) the kernel with the default vocabulary chunking and with 1, 2, 4,
  8, 16 and 32 chunks per row, and the torch reference (the CPU engine's path) for scale.

    python benchmarks/gumbel_sampling.py --out benchmarks/results/gumbel_sampling_h200.json
    python benchmarks/gumbel_sampling.py --smoke     # CPU, Triton interpreter, tiny shapes
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first import of triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from receipt_utils import receipt, write_receipt  # noqa: E402

from thaw_rl_kernels.gumbel_sampling import _num_chunks, gumbel_sample_reference, gumbel_sample_triton  # noqa: E402


def time_ms(fn, cuda: bool) -> float:
    if not cuda:
        import time

        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="32,128,1024")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    batches = [2, 5] if args.smoke else [int(b) for b in args.batches.split(",")]
    vocab = 3000 if args.smoke else args.vocab
    chunkings = [None, 1, 2, 4] if args.smoke else [None, 1, 2, 4, 8, 16, 32]
    rows, all_ok = [], True
    for b in batches:
        g = torch.Generator(device=device).manual_seed(b)
        logits = (torch.randn(b, vocab, generator=g, device=device) * 3).to(torch.bfloat16)
        temperature = torch.ones(b, device=device)
        temperature[::7] = 0.0  # some greedy rows
        seeds = torch.arange(b, device=device, dtype=torch.int64) * 7919 + (1 << 40)
        positions = torch.full((b,), 513, device=device, dtype=torch.int64)
        ref = gumbel_sample_reference(logits, temperature, seeds, positions)
        row = dict(batch=b, vocab=vocab, default_chunks=_num_chunks(b, vocab, 2048, logits.device), kernel_ms={})
        for chunks in chunkings:
            out = gumbel_sample_triton(logits, temperature, seeds, positions, num_chunks=chunks)
            ok = (out[0] == ref[0]).all().item() and torch.allclose(out[1], ref[1], atol=1e-4) \
                and torch.allclose(out[2], ref[2], atol=1e-4)
            all_ok &= bool(ok)
            name = "default" if chunks is None else str(chunks)
            row["kernel_ms"][name] = time_ms(
                lambda c=chunks: gumbel_sample_triton(logits, temperature, seeds, positions, num_chunks=c), cuda)
            row.setdefault("correct", {})[name] = bool(ok)
        row["reference_ms"] = time_ms(lambda: gumbel_sample_reference(logits, temperature, seeds, positions), cuda)
        rows.append(row)
        del logits
    write_receipt(args.out, receipt("gumbel_sampling", args, rows))
    names = list(rows[0]["kernel_ms"])
    print(f"\ngumbel sampling on {device}, vocab {vocab}, bf16 logits; ms (median); all correct: {all_ok}")
    print("| rows | chunks (default) | " + " | ".join(f"kernel {n}" for n in names) + " | torch reference |")
    print("|---:|---:|" + "---:|" * (len(names) + 1))
    for r in rows:
        print(f"| {r['batch']} | {r['default_chunks']} | " + " | ".join(f"{r['kernel_ms'][n]:.3f}" for n in names)
              + f" | {r['reference_ms']:.3f} |")
    if not all_ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
