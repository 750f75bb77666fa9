"""The fused Gumbel-max sampling kernel equals its torch reference, and the draws follow softmax(logits/T)."""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from thaw_rl_kernels.gumbel_sampling import (  # noqa: E402
    _div_by,
    _mix32,
    _row_base,
    gumbel_noise,
    gumbel_of_bits_reference,
    gumbel_of_bits_triton,
    gumbel_sample_reference,
    gumbel_sample_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("vocab", [7, 4096, 9001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_reference(vocab, dtype):
    g = torch.Generator().manual_seed(vocab)
    rows = 6
    logits = (torch.randn(rows, vocab, generator=g) * 4).to(dtype).to(DEVICE)
    temperature = torch.tensor([1.0, 0.0, 0.7, 1.3, 0.0, 2.0], device=DEVICE)
    seeds = torch.tensor([1, 2, 3, (1 << 40) + 5, 7, (1 << 62) + 11], dtype=torch.int64, device=DEVICE)
    positions = torch.tensor([10, 20, 30, 40, 5, 123456], dtype=torch.int64, device=DEVICE)
    ref = gumbel_sample_reference(logits, temperature, seeds, positions)
    out = gumbel_sample_triton(logits, temperature, seeds, positions)
    assert out[0].tolist() == ref[0].tolist()
    torch.testing.assert_close(out[1], ref[1], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out[2], ref[2], atol=2e-5, rtol=1e-5)
    assert out[0][1] == logits[1].float().argmax() and out[0][4] == logits[4].float().argmax()  # greedy rows


@pytest.mark.parametrize("num_chunks", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocabulary_chunks_merge_to_the_reference(num_chunks, dtype):
    """Rows split into vocabulary chunks (a second kernel merges them) give the reference's tokens, logprobs and
    entropies; asked for 8 chunks of 1,024-entry blocks, 5,000 entries fill 5, and the merge must ignore the rest. A tie planted across
    two chunks goes to the lower token id, as torch's argmax does."""
    g = torch.Generator().manual_seed(num_chunks)
    vocab = 5000
    logits = (torch.randn(4, vocab, generator=g) * 3).to(dtype).to(DEVICE)
    logits[3, 100] = logits[3, 4900] = 50.0  # greedy row 3: equal maxima in the first and the last chunk
    temperature = torch.tensor([1.0, 0.5, 1.0, 0.0], device=DEVICE)
    seeds = torch.tensor([9, 8, (1 << 50) + 3, 4], dtype=torch.int64, device=DEVICE)
    positions = torch.tensor([0, 77, 4095, 12], dtype=torch.int64, device=DEVICE)
    ref = gumbel_sample_reference(logits, temperature, seeds, positions)
    out = gumbel_sample_triton(logits, temperature, seeds, positions, num_chunks=num_chunks, block_v=1024)
    assert out[0].tolist() == ref[0].tolist()
    assert out[0][3].item() == 100
    torch.testing.assert_close(out[1], ref[1], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out[2], ref[2], atol=2e-5, rtol=1e-5)


def _rows(num_rows, vocab, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_rows, vocab, generator=g) * scale
    temperature = torch.tensor([1.0, 0.0, 0.6, 1.7] * num_rows)[:num_rows]  # T = 1, greedy, two others
    seeds = torch.arange(num_rows, dtype=torch.int64) * 1_000_003 + (1 << 41)
    positions = torch.arange(num_rows, dtype=torch.int64) * 17 + 3
    return logits, temperature, seeds, positions


def _assert_matches_reference(logits, temperature, seeds, positions, **kwargs):
    args = [t.to(DEVICE) for t in (logits, temperature, seeds, positions)]
    ref = gumbel_sample_reference(*args)
    out = gumbel_sample_triton(*args, **kwargs)
    assert out[0].tolist() == ref[0].tolist()
    torch.testing.assert_close(out[1], ref[1], atol=2e-5, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(out[2], ref[2], atol=2e-5, rtol=1e-5, equal_nan=True)
    return out


@pytest.mark.parametrize("vocab", [256, 768, 767, 769, 5])
@pytest.mark.parametrize("num_chunks", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_multiples_of_the_block_and_ragged_tails(vocab, num_chunks, dtype):
    """Full blocks run unmasked and a chunk's ragged rest as one masked block: a vocabulary of exactly 1 or 3
    blocks (no masked block), one entry short of or past 3 blocks, and less than one group of VEC entries."""
    logits, temperature, seeds, positions = _rows(4, vocab, seed=vocab)
    logits[1, -1] = 40.0  # the greedy row's maximum in the very last entry (the ragged block's last, if any)
    out = _assert_matches_reference(logits.to(dtype), temperature, seeds, positions, num_chunks=num_chunks, block_v=256)
    assert out[0][1].item() == vocab - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_minus_inf_logits(dtype):
    """-inf logits (a logit bias can make them) get probability 0 and add 0 to the entropy: scattered ones, a
    whole group of 8 contiguous entries, a whole 256-entry block, and the whole first of two chunks. The
    sampled token is never one of them; a row of nothing but -inf gives token 0 and nan, as the reference."""
    vocab = 1000
    logits, temperature, seeds, positions = _rows(8, vocab, seed=5)
    minus_inf = float("-inf")
    logits[0, ::7] = minus_inf
    logits[1, 8:16] = minus_inf  # greedy row: one group of VEC = 8 (bf16) entries, two of 4 (fp32)
    logits[1, 0] = 30.0
    logits[2, 256:512] = minus_inf  # the second block
    logits[3, :512] = minus_inf  # the first of two chunks at num_chunks=2
    logits[4, :] = minus_inf
    logits[4 + 1, :999] = minus_inf  # greedy row with a single finite entry, the last
    logits[6, 1:] = minus_inf  # one finite entry, the first
    logits[7, ::2] = minus_inf
    logits = logits.to(dtype)
    for num_chunks in (1, 2):
        out = _assert_matches_reference(logits, temperature, seeds, positions, num_chunks=num_chunks, block_v=256)
        tokens = out[0].cpu()
        assert tokens[4].item() == 0 and out[1][4].isnan() and out[2][4].isnan()
        assert tokens[5].item() == 999 and tokens[6].item() == 0
        assert out[1][5].item() == 0.0 and out[2][5].item() == 0.0  # one possible token: logprob 0, entropy 0
        finite = torch.cat([tokens[:4], tokens[5:]])
        rows = torch.tensor([0, 1, 2, 3, 5, 6, 7])
        assert (logits[rows, finite].float() > minus_inf).all()


def test_noise_is_finite_where_u_would_round_to_one():
    """Seed 4806 at position 7 hashes entry 293 to bits >> 8 = 2^24 - 1, where ((2^24 - 1) + 0.5) / 2^24 rounds
    to 1.0 in fp32 and -log(-log(u)) would be +inf: entry 293 would be drawn even at logit -30 against logits
    of 0. Clamped, its noise is the largest finite one, 16.6, and a logit of -30 cannot win."""
    seeds = torch.tensor([4806], dtype=torch.int64)
    positions = torch.tensor([7], dtype=torch.int64)
    base = _row_base(seeds, positions)
    assert (_mix32((base + 293 * 0x9E3779B1) & 0xFFFFFFFF) >> 8).item() == (1 << 24) - 1
    noise = gumbel_noise(seeds, positions, 1000)
    assert torch.isfinite(noise).all()
    assert noise[0, 293].item() == pytest.approx(-math.log(-math.log1p(-(2.0**-24))), rel=1e-6)
    logits = torch.zeros(1, 1000)
    logits[0, 293] = -30.0
    for dtype in (torch.float32, torch.bfloat16):
        out = _assert_matches_reference(logits.to(dtype), torch.ones(1), seeds, positions, block_v=256)
        assert out[0].item() != 293


def test_kernel_noise_equals_the_reference_noise():
    """The kernel's noise (libdevice's logf without its guards, on the 2^24 values u can take) against
    ``gumbel_noise``'s torch.log: on CUDA bit for bit over all 2^24 values (both are libdevice's logf); on the
    CPU, where torch's log is another implementation, within 1e-6 (both are within ~1 ulp per log) on a
    sample. Both are finite everywhere, the clamped u = 1 included."""
    step = 1 if DEVICE == "cuda" else 256
    bits = (torch.arange(0, 1 << 24, step, dtype=torch.int64) << 8 | 0x5A).to(torch.int32).to(DEVICE)
    bits[-1] = -1  # 0xFFFFFFFF: bits >> 8 = 2^24 - 1, the clamped entry
    kernel = gumbel_of_bits_triton(bits)
    ref = gumbel_of_bits_reference(bits)
    assert torch.isfinite(kernel).all() and torch.isfinite(ref).all()
    if DEVICE == "cuda":
        assert torch.equal(kernel, ref), (kernel != ref).sum()
    else:
        torch.testing.assert_close(kernel, ref, atol=1e-6, rtol=0)
    assert kernel[-1].item() == pytest.approx(16.6355, abs=1e-4)


@triton.jit
def _divide_kernel(x_ptr, t_ptr, out_ptr, n, BLOCK: tl.constexpr):
    t = tl.load(t_ptr + tl.program_id(1))
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + tl.program_id(1) * n + offs, _div_by(x, t, tl.math.div_rn(1.0, t)), mask=offs < n)


def test_division_by_temperature_rounds_as_torch_divides():
    """The sampler's x / T equals torch's division bit for bit on every bf16 value x with 1e-30 <= |x| (and 0,
    +-inf, and quotients that overflow to +-inf), at temperatures including ones whose significand is all ones
    (1.9999999) or just below 1: the scaled logits, hence the noisy scores and tokens, are the reference's."""
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()  # all bf16
    x = x[((x.abs() >= 1e-30) & ~x.isnan()) | (x == 0)].contiguous()
    t = torch.tensor([0.7, 0.6, 0.9, 1.3, 1 / 3, 0.1, 1e-3, 2.0 - 2.0**-23, 1.0 - 2.0**-24, 1.7, 3.0, 0.55555])
    out = torch.empty(len(t), x.numel(), device=DEVICE)
    x, t = x.to(DEVICE), t.to(DEVICE)
    _divide_kernel[(triton.cdiv(x.numel(), 4096), len(t))](x, t, out, x.numel(), BLOCK=4096)
    ref = x[None, :] / t[:, None]
    assert torch.equal(out, ref), (out != ref).sum()
    assert ref.isinf().sum() > 100  # bf16's largest values overflow at T < 1


def test_kernel_rejects_bad_shapes():
    logits = torch.randn(3, 10, device=DEVICE)
    t = torch.ones(3, device=DEVICE)
    ids = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="temperature must be"):
        gumbel_sample_triton(logits, t[:2], ids, ids)
    with pytest.raises(ValueError, match="contiguous last dim"):
        gumbel_sample_triton(logits.t(), torch.ones(10, device=DEVICE), ids.repeat(4)[:10], ids.repeat(4)[:10])


def test_draws_follow_softmax_of_scaled_logits():
    """20,000 draws over 4 tokens at T=0.8: every frequency within 5 sigma of softmax(logits/T).

    False-failure probability: < 4 x 6e-7 (two-sided 5-sigma normal tail per token).
    """
    n = 20_000
    logits = torch.tensor([[1.0, 0.2, -0.5, 2.0]]).repeat(n, 1)
    temperature = torch.full((n,), 0.8)
    seeds = torch.arange(n, dtype=torch.int64) * 7919 + 3
    positions = torch.full((n,), 17, dtype=torch.int64)
    tokens, _, _ = gumbel_sample_reference(logits, temperature, seeds, positions)
    p = torch.softmax(logits[0] / 0.8, dim=-1)
    freq = torch.bincount(tokens, minlength=4).float() / n
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() < 5 * sigma).all(), (freq, p)
    # and the entropy reported is the distribution's
    _, _, ent = gumbel_sample_reference(logits[:1], temperature[:1], seeds[:1], positions[:1])
    assert math.isclose(ent.item(), float(-(p * p.log()).sum()), rel_tol=1e-5)


def test_filtered_sampling_path_reports_a_finite_entropy_with_minus_inf_logits():
    """The engine's torch path (top-k here) counts a -inf logit as 0 * log 0 = 0, as the fused sampler does."""
    from thaw_rl.engine.sampling import SamplingBatch, SamplingParams, sample

    logits = torch.tensor([[1.0, -math.inf, 0.5, 2.0]])
    batch = SamplingBatch.build([SamplingParams(temperature=1.0, top_k=3, seed=1)], [1], [5], [[]], 4,
                                torch.device("cpu"))
    _, logprob, entropy = sample(logits, batch)
    p = torch.softmax(logits[0, [0, 2, 3]], dim=-1)
    assert torch.isfinite(logprob).all()
    assert math.isclose(entropy.item(), float(-(p * p.log()).sum()), rel_tol=1e-5)
