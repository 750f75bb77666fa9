"""The fused Gumbel-max sampler on a decode step's logits: tokens against the torch reference, time per chunking.

For each batch size (rows x the vocabulary of Qwen2.5, 151,936), bf16 logits as the decode graph leaves them:
- check: the Triton kernel's tokens equal ``gumbel_sample_reference``'s (same hash, same noise), logprobs and
  entropies within 1e-4; and once, its noise equals ``gumbel_noise``'s bit for bit on all 2^24 values u can
  take (the kernel runs libdevice's logf without its guards; torch's CUDA log is libdevice's logf);
- time (``triton.testing.do_bench``, median) the kernel with the default vocabulary chunking and with 1, 2, 4,
  8, 16 and 32 chunks per row, and the torch reference (the CPU engine's path) for scale.

    python benchmarks/gumbel_sampling.py --out benchmarks/results/gumbel_sampling_h200.json
    python benchmarks/gumbel_sampling.py --temperature 0.7 --out ...   # the loop that divides by T
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

from thaw_rl_kernels.gumbel_sampling import (  # noqa: E402
    _num_chunks,
    gumbel_of_bits_reference,
    gumbel_of_bits_triton,
    gumbel_sample_reference,
    gumbel_sample_triton,
)


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
    ap.add_argument("--temperature", type=float, default=1.0, help="of the sampled rows (every 7th is greedy)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    batches = [2, 5] if args.smoke else [int(b) for b in args.batches.split(",")]
    vocab = 3000 if args.smoke else args.vocab
    chunkings = [None, 1, 2, 4] if args.smoke else [None, 1, 2, 4, 8, 16, 32]
    rows, all_ok = [], True
    step = 1 if cuda else 4096  # every value of bits >> 8 on the GPU; a sample under the interpreter
    bits = (torch.arange(0, 1 << 24, step, device=device, dtype=torch.int64) << 8).to(torch.int32)
    noise, noise_ref = gumbel_of_bits_triton(bits), gumbel_of_bits_reference(bits)
    noise_mismatches = int((noise != noise_ref).sum()) if cuda else None  # CPU torch.log is not libdevice's
    all_ok &= not noise_mismatches and bool(torch.isfinite(noise).all())
    del bits, noise, noise_ref
    for b in batches:
        g = torch.Generator(device=device).manual_seed(b)
        logits = (torch.randn(b, vocab, generator=g, device=device) * 3).to(torch.bfloat16)
        temperature = torch.full((b,), args.temperature, device=device)
        temperature[::7] = 0.0  # some greedy rows
        seeds = torch.arange(b, device=device, dtype=torch.int64) * 7919 + (1 << 40)
        positions = torch.full((b,), 513, device=device, dtype=torch.int64)
        ref = gumbel_sample_reference(logits, temperature, seeds, positions)
        row = dict(batch=b, vocab=vocab, temperature=args.temperature, noise_mismatches=noise_mismatches,
                   default_chunks=_num_chunks(b, vocab, 2048, logits.device), kernel_ms={})
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
    print(f"\ngumbel sampling on {device}, vocab {vocab}, bf16 logits, T = {args.temperature} (every 7th row greedy); "
          f"ms (median); noise != reference on {noise_mismatches} of 2^24 values (None: not checked off CUDA); "
          f"all correct: {all_ok}")
    print("| rows | chunks (default) | " + " | ".join(f"kernel {n}" for n in names) + " | torch reference |")
    print("|---:|---:|" + "---:|" * (len(names) + 1))
    for r in rows:
        print(f"| {r['batch']} | {r['default_chunks']} | " + " | ".join(f"{r['kernel_ms'][n]:.3f}" for n in names)
              + f" | {r['reference_ms']:.3f} |")
    if not all_ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
