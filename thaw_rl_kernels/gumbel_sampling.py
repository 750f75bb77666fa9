"""Counter-based Gumbel-max sampling: one token per row, with its logprob and the row's entropy.

The noise for vocabulary entry v of a row with seed s, sampling position p, is a 32-bit integer hash
of (s, p, v) turned into a Gumbel variate. Because it is a pure function, a request's tokens do not
depend on the batch it shares, the same seed reproduces on any device, and CUDA-graph replay is safe.

- ``gumbel_noise`` / ``gumbel_sample_reference``: torch, any device (the CPU engine's path).
- ``gumbel_sample_triton``: streams the logits once (in their own dtype, bf16 included), computing the
  noisy argmax, the log-sum-exp and the entropy online. The torch version materialises (S, V) int64
  temporaries in ~15 kernels (3 ms a step at 128 x 152k on an H100); this reads the logits once. Each row's
  vocabulary is split into chunks when rows alone would leave SMs idle (a second tiny kernel merges them),
  and the per-entry hash runs in uint32 lanes (int64 products cost several instructions each on the GPU).
- ``gumbel_sample``: Triton on CUDA, the reference elsewhere.

Temperature 0 rows are greedy (argmax, no noise); their logprob and entropy are reported at T = 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash on int64 tensors holding 32-bit values (wrapping products masked)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _row_base(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return _mix32(_mix32(seeds & _M32) ^ ((seeds >> 32) & _M32) ^ ((_mix32(positions & _M32) * 3) & _M32))  # (S,)


def gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Standard Gumbel noise (S, V) float32, a pure function of (seed, position, token id)."""
    base = _row_base(seeds, positions)  # (S,)
    vocab = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)  # (V,)
    bits = _mix32((base[:, None] + vocab[None, :] * _GOLDEN) & _M32)  # (S, V)
    u = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # (S, V) in (0, 1)
    return -torch.log(-torch.log(u))


def gumbel_sample_reference(
    logits: torch.Tensor,  # (S, V)
    temperature: torch.Tensor,  # (S,) float32, 0 = greedy
    seeds: torch.Tensor,  # (S,) int64
    positions: torch.Tensor,  # (S,) int64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens (S,) int64, their logprobs (S,) and entropies (S,) under softmax(logits / T)."""
    greedy = temperature == 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature)
    scaled = logits.float() / t[:, None]  # (S, V)
    logprobs_all = torch.log_softmax(scaled, dim=-1)
    noise = gumbel_noise(seeds, positions, logits.shape[-1])
    scores = torch.where(greedy[:, None], scaled, scaled + noise)
    tokens = scores.argmax(dim=-1)
    logprobs = logprobs_all.gather(-1, tokens[:, None])[:, 0]
    entropies = -(logprobs_all.exp() * logprobs_all).sum(dim=-1)
    return tokens, logprobs, entropies


@triton.jit
def _mix32_tl(x):
    """Same arithmetic as ``_mix32``: int64 holding 32-bit values, products masked back to 32 bits."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _mix32_u32(x):
    """``_mix32`` on uint32 lanes: the products wrap mod 2^32 as the masks do, in native 32-bit arithmetic
    (int64 products are emulated on the GPU: several instructions each, for every vocabulary entry)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _gumbel_chunk_kernel(
    logits_ptr, stride_row, temp_ptr, seed_ptr, pos_ptr,
    tok_ptr, lp_ptr, ent_ptr,  # final outputs (NUM_CHUNKS == 1)
    part_f_ptr, part_i_ptr,  # (S, PART_STRIDE, 5) float32 (m, s, w, x at best, best score), (S, PART_STRIDE) best id
    V, CHUNK,
    FINAL: tl.constexpr, PART_STRIDE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program per (row, vocabulary chunk). Every lane keeps its own running max, sum of exp, sum of
    exp * x (one exp per entry) and noisy best; the lanes are combined once at the end, not per block."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    temp = tl.load(temp_ptr + row)
    greedy = temp == 0.0
    t = tl.where(greedy, 1.0, temp)
    seed = tl.load(seed_ptr + row)
    pos = tl.load(pos_ptr + row)
    base = _mix32_tl(_mix32_tl(seed & 0xFFFFFFFF) ^ ((seed >> 32) & 0xFFFFFFFF)
                     ^ ((_mix32_tl(pos & 0xFFFFFFFF) * 3) & 0xFFFFFFFF)).to(tl.uint32)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)  # per lane: max of scaled logits
    s = tl.zeros([BLOCK_V], tl.float32)  # sum exp(x - m)
    w = tl.zeros([BLOCK_V], tl.float32)  # sum exp(x - m) * x
    best = tl.full([BLOCK_V], float("-inf"), tl.float32)  # noisy score (x for greedy rows)
    best_id = tl.zeros([BLOCK_V], tl.int32)
    best_x = tl.zeros([BLOCK_V], tl.float32)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    lo = chunk * CHUNK
    hi = tl.minimum(lo + CHUNK, V)
    for v0 in range(lo, hi, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < hi
        x = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32) / t
        live = x > float("-inf")
        bigger = x > m
        d = tl.exp(-tl.abs(x - m))  # exp(m - x) where x is the new max, exp(x - m) otherwise
        d = tl.where(live, d, 0.0)  # (-inf) - (-inf) would be nan
        s = tl.where(live, tl.where(bigger, s * d + 1.0, s + d), s)
        w = tl.where(live, tl.where(bigger, w * d + x, w + d * x), w)
        m = tl.maximum(m, x)
        bits = _mix32_u32(base + offs.to(tl.uint32) * 0x9E3779B1)
        u = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        score = tl.where(greedy, x, x - tl.log(-tl.log(u)))
        take = mask & (score > best)  # strict: a lane keeps its first (lowest) id on ties
        best = tl.where(take, score, best)
        best_id = tl.where(take, offs, best_id)
        best_x = tl.where(take, x, best_x)
    m_all = tl.max(m, axis=0)
    scale = tl.exp(m - tl.where(m_all == float("-inf"), 0.0, m_all))  # 0 for lanes that saw nothing
    s_all = tl.sum(s * scale, axis=0)
    w_all = tl.sum(w * scale, axis=0)
    best_all = tl.max(best, axis=0)
    id_all = tl.min(tl.where(best == best_all, best_id, 2147483647), axis=0)  # lowest id among ties (argmax)
    x_all = tl.max(tl.where(best_id == id_all, best_x, float("-inf")), axis=0)
    if FINAL:
        lse = m_all + tl.log(s_all)
        tl.store(tok_ptr + row, id_all.to(tl.int64))
        tl.store(lp_ptr + row, x_all - lse)
        tl.store(ent_ptr + row, lse - w_all / s_all)
    else:
        part = row * PART_STRIDE + chunk
        tl.store(part_f_ptr + part * 5 + 0, m_all)
        tl.store(part_f_ptr + part * 5 + 1, s_all)
        tl.store(part_f_ptr + part * 5 + 2, w_all)
        tl.store(part_f_ptr + part * 5 + 3, x_all)
        tl.store(part_f_ptr + part * 5 + 4, best_all)
        tl.store(part_i_ptr + part, id_all.to(tl.int64))


@triton.jit
def _gumbel_merge_kernel(part_f_ptr, part_i_ptr, tok_ptr, lp_ptr, ent_ptr, num_used, NUM_CHUNKS: tl.constexpr):
    """Combine a row's chunks: log-sum-exp and entropy sums rescaled to one max; the best score wins, the
    lowest token id among equal scores (the chunks hold increasing ids)."""
    row = tl.program_id(0)
    c = tl.arange(0, NUM_CHUNKS)
    used = c < num_used
    part = row * NUM_CHUNKS + c
    m = tl.load(part_f_ptr + part * 5 + 0, mask=used, other=float("-inf"))
    s = tl.load(part_f_ptr + part * 5 + 1, mask=used, other=0.0)
    w = tl.load(part_f_ptr + part * 5 + 2, mask=used, other=0.0)
    x = tl.load(part_f_ptr + part * 5 + 3, mask=used, other=0.0)
    score = tl.load(part_f_ptr + part * 5 + 4, mask=used, other=float("-inf"))
    ids = tl.load(part_i_ptr + part, mask=used, other=9223372036854775807)
    m_all = tl.max(m, axis=0)
    scale = tl.exp(m - m_all)
    s_all = tl.sum(s * scale, axis=0)
    w_all = tl.sum(w * scale, axis=0)
    best = tl.max(score, axis=0)
    best_id = tl.min(tl.where(score == best, ids, 9223372036854775807), axis=0)
    best_x = tl.max(tl.where(ids == best_id, x, float("-inf")), axis=0)
    lse = m_all + tl.log(s_all)
    tl.store(tok_ptr + row, best_id)
    tl.store(lp_ptr + row, best_x - lse)
    tl.store(ent_ptr + row, lse - w_all / s_all)


def _num_chunks(num_rows: int, vocab_size: int, block_v: int, device: torch.device) -> int:
    """Vocabulary chunks per row: enough programs for ~4 per SM (one row per program left 100 of 132 SMs
    idle at 32 rows), a power of two, each chunk at least one block."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 132  # the interpreter: the H200's count, so CPU tests take the GPU's path
    want = triton.next_power_of_2(max(1, triton.cdiv(4 * sms, max(num_rows, 1))))
    return max(1, min(want, 32, triton.next_power_of_2(triton.cdiv(vocab_size, block_v))))


def gumbel_sample_triton(logits, temperature, seeds, positions, num_chunks: int | None = None,
                         block_v: int = 2048, num_warps: int = 8):
    """Logits of any float dtype (bf16 read as is, upcast in registers: the same values as ``.float()``)."""
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError(f"logits must be (S, V) with a contiguous last dim, got {tuple(logits.shape)} "
                         f"strides {logits.stride()}; call .contiguous() first.")
    S, V = logits.shape
    for name, t in (("temperature", temperature), ("seeds", seeds), ("positions", positions)):
        if t.shape != (S,) or t.device != logits.device:
            raise ValueError(f"{name} must be ({S},) on {logits.device}, got {tuple(t.shape)} on {t.device}.")
    if num_chunks is None:
        num_chunks = _num_chunks(S, V, block_v, logits.device)
    if num_chunks < 1 or num_chunks & (num_chunks - 1):
        raise ValueError(f"num_chunks={num_chunks} must be a power of two >= 1.")
    dev = logits.device
    tokens = torch.empty(S, dtype=torch.int64, device=dev)
    logprobs = torch.empty(S, dtype=torch.float32, device=dev)
    entropies = torch.empty(S, dtype=torch.float32, device=dev)
    if not S:
        return tokens, logprobs, entropies
    chunk = triton.cdiv(triton.cdiv(V, num_chunks), block_v) * block_v  # whole blocks
    used = triton.cdiv(V, chunk)  # chunks holding entries (<= num_chunks)
    stride = num_chunks if used > 1 else 1
    part_f = torch.empty(S * stride * 5 if used > 1 else 1, dtype=torch.float32, device=dev)
    part_i = torch.empty(S * stride if used > 1 else 1, dtype=torch.int64, device=dev)
    args = (temperature.float().contiguous(), seeds.contiguous(), positions.contiguous())
    _gumbel_chunk_kernel[(S, used)](
        logits, logits.stride(0), *args, tokens, logprobs, entropies, part_f, part_i, V, chunk,
        FINAL=used == 1, PART_STRIDE=stride, BLOCK_V=block_v, num_warps=num_warps,
    )
    if used > 1:
        _gumbel_merge_kernel[(S,)](part_f, part_i, tokens, logprobs, entropies, used, NUM_CHUNKS=stride,
                                   num_warps=1)
    return tokens, logprobs, entropies


def gumbel_sample(logits, temperature, seeds, positions):
    """Triton on CUDA, the torch reference elsewhere."""
    if logits.is_cuda:
        return gumbel_sample_triton(logits, temperature, seeds, positions)
    return gumbel_sample_reference(logits, temperature, seeds, positions)
