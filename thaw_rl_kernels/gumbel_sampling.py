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
  At S = 1,024 the logits are ~0.07 ms of HBM time and the kernel is bound by instructions per entry, so the
  loop is kept lean: full blocks without masks, a per-thread log-sum-exp with one exp2 per entry, the noise's
  two logs as libdevice's without its (here dead) guards, greedy and T = 1 rows in loops without the noise or
  the division, x / T rounded as torch rounds it: ~61 SASS instructions per entry at T = 1 on sm_90 (95 before).
- ``gumbel_sample``: Triton on CUDA, the reference elsewhere.

Temperature 0 rows are greedy (argmax, no noise); their logprob and entropy are reported at T = 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from thaw_rl_kernels.triton_paged_attention import num_sms

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1
_U_MAX = 1.0 - 2.0**-24  # the largest float32 below 1


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash on int64 tensors holding 32-bit values (wrapping products masked)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _row_base(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return _mix32(_mix32(seeds & _M32) ^ ((seeds >> 32) & _M32) ^ ((_mix32(positions & _M32) * 3) & _M32))  # (S,)


def _noise_of_hash(bits: torch.Tensor) -> torch.Tensor:
    """Hash values (int64 holding 32-bit values) to standard Gumbel noise, float32 of the same shape."""
    u = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    # (2^24 - 1) + 0.5 rounds to 2^24 in fp32 (a tie, to even), so u = 1 and the noise is +inf for one entry in
    # 2^24: that entry would win whatever its logit (~0.9% of rows at a 152k vocabulary). The largest float
    # below 1 instead: the noise of that entry becomes 16.6, the largest any other entry can get.
    u = u.clamp(max=_U_MAX)  # in (0, 1)
    return -torch.log(-torch.log(u))


def gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Standard Gumbel noise (S, V) float32, a pure function of (seed, position, token id)."""
    base = _row_base(seeds, positions)  # (S,)
    vocab = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)  # (V,)
    return _noise_of_hash(_mix32((base[:, None] + vocab[None, :] * _GOLDEN) & _M32))  # (S, V)


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
    # 0 * log 0 = 0: a -inf logit (a logit bias can make one) adds nothing, where exp(-inf) * -inf is nan
    plogp = torch.where(logprobs_all == float("-inf"), 0.0, logprobs_all.exp() * logprobs_all)
    entropies = -plogp.sum(dim=-1)
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
def _logf_bits(ia):
    """libdevice's ``logf`` (``__nv_logf``, what ``tl.log`` and torch's CUDA ``log`` run), the same operations in
    the same order, for the bits ``ia`` (uint32) of a positive normal finite float, without its guards:
    a rescale of subnormal inputs and a select for 0, inf, nan and negatives (~8 of its ~24 instructions).
    The noise's two logs never see such inputs (u in [2^-25, 1 - 2^-24], -log(u) in [6e-8, 17.4]), so their
    results are bit for bit those of the guarded call: the noise, and with it the tokens, stay the torch
    reference's. ``ia`` is taken as bits so that a caller can negate for free (the sign is bit 31)."""
    e = (ia - 0x3F2AAAAB) & 0xFF800000  # the exponent, chosen so the mantissa m lies in [2/3, 4/3)
    f = (ia - e).to(tl.float32, bitcast=True) - 1.0
    r = tl.fma(f, -0.13018856942653656, 0.1408461034297943)
    r = tl.fma(r, f, -0.12148627638816833)
    r = tl.fma(r, f, 0.1398061066865921)
    r = tl.fma(r, f, -0.16684235632419586)
    r = tl.fma(r, f, 0.20012299716472626)
    r = tl.fma(r, f, -0.24999669194221497)
    r = tl.fma(r, f, 0.333331823348999)
    r = tl.fma(r, f, -0.5)
    r = tl.fma(f * r, f, f)
    # i * ln2 + r with i = e / 2^23: libdevice's fma(e * 2^-23, ln2, r) equals fma(e, ln2 * 2^-23, r), both
    # products being exact (scalings by powers of two), which saves the multiply
    return tl.fma(e.to(tl.int32, bitcast=True).to(tl.float32), 8.262958317573066e-08, r)


@triton.jit
def _gumbel_of_bits(bits):
    """-log(-log(u)) for u = ((bits >> 8) + 0.5) / 2^24 clamped below 1, as ``gumbel_noise`` computes it."""
    # ((bits >> 8) + 0.5) / 2^24 as one fma: the product is exact, so both round once to the same value
    u = (bits >> 8).to(tl.float32) * (1.0 / 16777216.0) + (0.5 / 16777216.0)
    u = tl.minimum(u, 0.99999994039535522)  # 1 - 2^-24, as the reference (u = 1 would make the noise +inf)
    log_u = _logf_bits(u.to(tl.uint32, bitcast=True))  # < 0
    return -_logf_bits(log_u.to(tl.uint32, bitcast=True) ^ 0x80000000)  # log(-log u): the sign bit flipped


@triton.jit
def _gumbel_of_bits_kernel(bits_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """The kernel's noise for given hash values: lets a test compare it with ``gumbel_noise`` bit for bit."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    bits = tl.load(bits_ptr + offs, mask=offs < n, other=0).to(tl.uint32, bitcast=True)
    tl.store(out_ptr + offs, _gumbel_of_bits(bits), mask=offs < n)


def gumbel_of_bits_triton(bits: torch.Tensor) -> torch.Tensor:
    """The Triton sampler's noise for hash values ``bits`` (int32 holding uint32 bits): for checks."""
    if bits.dtype != torch.int32:
        raise TypeError(f"bits must be torch.int32 (uint32 bits), got {bits.dtype}.")
    bits = bits.contiguous()
    out = torch.empty(bits.shape, dtype=torch.float32, device=bits.device)
    _gumbel_of_bits_kernel[(triton.cdiv(bits.numel(), 1024),)](bits, out, bits.numel(), BLOCK=1024)
    return out


def gumbel_of_bits_reference(bits: torch.Tensor) -> torch.Tensor:
    """``gumbel_noise``'s transform of hash values to noise, on int32 bits: the kernel's must equal it."""
    return _noise_of_hash(bits.long() & _M32)


@triton.jit
def _div_by(x, t, inv_t):
    """x / t rounded as IEEE division rounds it (torch's ``/``), from inv_t = 1 / t correctly rounded:
    Markstein's correction of x * inv_t with the exact residual x - q t (one fma). Triton's ``/`` is
    div.full (~4 instructions, up to 2 ulp off, so a near-tie could draw another token than the reference);
    div_rn is ~14 with a slow path. Exact for 1e-30 <= |x| (checked on every bf16 value in the tests); below
    that the residual is subnormal and the result can be 1 ulp (~1e-45) off. An overflowing or infinite x
    makes the residual inf - inf: the select keeps x * inv_t, the reference's +-inf."""
    q = x * inv_t
    q2 = tl.fma(tl.fma(-q, t, x), inv_t, q)
    return tl.where(q2 == q2, q2, q)


@triton.jit
def _block_step(row_ptr, v0, hi, t, inv_t, base, m, s, w, best, best_id,
                MASKED: tl.constexpr, NOISE: tl.constexpr, SCALE: tl.constexpr,
                BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    """One block of BLOCK_V entries as (BLOCK_V // VEC, VEC): each group of VEC contiguous entries lies in one
    thread, so its max and sums are in-register reductions, and the group's running (m, s, w) is rescaled once
    per block (one exp per group) instead of per entry.

    The per-entry work is: the load, the optional division by t, d = (x - m) log2(e) clamped at -300 (2^-300
    is 0 in fp32, and 0 * -300 keeps -inf logits out of the entropy sum without a where), one exp2, one add,
    one fma, the hash and the two precise logs of the noise, and one compare with two selects for the argmax.
    Full blocks are loaded without a mask (MASKED only for a chunk's ragged last block, whose masked entries
    read -inf: they add 0 to every sum and never win the strict argmax)."""
    offs = v0 + tl.arange(0, BLOCK_V // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :]  # (G, VEC)
    if MASKED:
        x = tl.load(row_ptr + offs, mask=offs < hi, other=float("-inf")).to(tl.float32)
    else:
        x = tl.load(row_ptr + offs).to(tl.float32)
    if SCALE:
        x = _div_by(x, t, inv_t)
    m_new = tl.maximum(m, tl.max(x, axis=1))  # (G,)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a group that saw only -inf keeps s = w = 0
    # base 2: tl.exp2 is one ex2 instruction, tl.exp five (a scale by log2(e) and a subnormal-safe ex2)
    delta = tl.maximum((m - m_ref) * 1.4426950408889634, -300.0)  # (G,) old max vs new, log2 units; -inf -> -300
    alpha = tl.exp2(delta)
    d = tl.maximum((x - m_ref[:, None]) * 1.4426950408889634, -300.0)  # (G, VEC)
    e = tl.exp2(d)
    # w is sum exp(x - m) * (x - m) / ln 2, relative to the group max: rescaled to the new max it gains s * delta
    w = alpha * (w + s * delta) + tl.sum(e * d, axis=1)
    s = alpha * s + tl.sum(e, axis=1)
    if NOISE:
        score = x + _gumbel_of_bits(_mix32_u32(base + offs.to(tl.uint32) * 0x9E3779B1))
    else:
        score = x
    take = score > best  # strict: a slot keeps its first (lowest) id on ties
    best = tl.where(take, score, best)
    best_id = tl.where(take, offs, best_id)
    return m_new, s, w, best, best_id


@triton.jit
def _scan_chunk(row_ptr, lo, hi, t, inv_t, base, NOISE: tl.constexpr, SCALE: tl.constexpr,
                BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    """The chunk [lo, hi): its full blocks without masks, then the ragged rest as one masked block."""
    m = tl.full([BLOCK_V // VEC], float("-inf"), tl.float32)  # per group of VEC entries: max of scaled logits
    s = tl.zeros([BLOCK_V // VEC], tl.float32)  # sum exp(x - m)
    w = tl.zeros([BLOCK_V // VEC], tl.float32)  # sum exp(x - m) * (x - m) / ln 2
    best = tl.full([BLOCK_V // VEC, VEC], float("-inf"), tl.float32)  # per slot: noisy score (x for greedy rows)
    best_id = tl.zeros([BLOCK_V // VEC, VEC], tl.int32)
    full_hi = lo + (hi - lo) // BLOCK_V * BLOCK_V
    for v0 in range(lo, full_hi, BLOCK_V):
        m, s, w, best, best_id = _block_step(row_ptr, v0, hi, t, inv_t, base, m, s, w, best, best_id,
                                             False, NOISE, SCALE, BLOCK_V, VEC)
    if full_hi < hi:
        m, s, w, best, best_id = _block_step(row_ptr, full_hi, hi, t, inv_t, base, m, s, w, best, best_id,
                                             True, NOISE, SCALE, BLOCK_V, VEC)
    return m, s, w, best, best_id


@triton.jit
def _gumbel_chunk_kernel(
    logits_ptr, stride_row, temp_ptr, seed_ptr, pos_ptr,
    tok_ptr, lp_ptr, ent_ptr,  # final outputs (NUM_CHUNKS == 1)
    part_f_ptr, part_i_ptr,  # (S, PART_STRIDE, 5) float32 (m, s, w, x at best, best score), (S, PART_STRIDE) best id
    V, CHUNK,
    FINAL: tl.constexpr, PART_STRIDE: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr,
):
    """One program per (row, vocabulary chunk). The row's temperature picks one of three loops by a branch
    that is uniform across the program: greedy (no noise, no division), T = 1 (no division: x / 1 == x) and
    any other T, so no entry pays for work its row does not need. The groups are combined once at the end,
    and the sampled entry's scaled logit is re-read there rather than carried per slot through the loop."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    temp = tl.load(temp_ptr + row)
    t = tl.where(temp == 0.0, 1.0, temp)
    inv_t = tl.math.div_rn(1.0, t)  # once per program, for _div_by
    seed = tl.load(seed_ptr + row)
    pos = tl.load(pos_ptr + row)
    base = _mix32_tl(_mix32_tl(seed & 0xFFFFFFFF) ^ ((seed >> 32) & 0xFFFFFFFF)
                     ^ ((_mix32_tl(pos & 0xFFFFFFFF) * 3) & 0xFFFFFFFF)).to(tl.uint32)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    lo = chunk * CHUNK
    hi = tl.minimum(lo + CHUNK, V)
    if temp == 0.0:
        m, s, w, best, best_id = _scan_chunk(row_ptr, lo, hi, t, inv_t, base, False, False, BLOCK_V, VEC)
    elif temp == 1.0:
        m, s, w, best, best_id = _scan_chunk(row_ptr, lo, hi, t, inv_t, base, True, False, BLOCK_V, VEC)
    else:
        m, s, w, best, best_id = _scan_chunk(row_ptr, lo, hi, t, inv_t, base, True, True, BLOCK_V, VEC)
    m_all = tl.max(m, axis=0)
    m_ref = tl.where(m_all == float("-inf"), 0.0, m_all)
    delta = tl.maximum((m - m_ref) * 1.4426950408889634, -300.0)  # groups that saw nothing: s = w = 0, scale 0
    scale = tl.exp2(delta)
    s_all = tl.sum(s * scale, axis=0)
    w_all = tl.sum((w + s * delta) * scale, axis=0) * 0.6931471805599453  # sum exp(x - m_all) * (x - m_all)
    best_all = tl.max(tl.max(best, axis=1), axis=0)
    id_all = tl.min(tl.min(tl.where(best == best_all, best_id, 2147483647), axis=1), axis=0)  # lowest id on ties
    x_all = _div_by(tl.load(row_ptr + id_all).to(tl.float32), t, inv_t)  # as in the loop (t = 1: exact)
    if FINAL:
        log_s = tl.log(s_all)
        tl.store(tok_ptr + row, id_all.to(tl.int64))
        tl.store(lp_ptr + row, x_all - (m_all + log_s))
        tl.store(ent_ptr + row, log_s - w_all / s_all)  # lse - sum p x, with lse = m_all + log s
    else:
        part = row * PART_STRIDE + chunk
        tl.store(part_f_ptr + part * 5 + 0, m_all)
        tl.store(part_f_ptr + part * 5 + 1, s_all)
        tl.store(part_f_ptr + part * 5 + 2, tl.where(s_all > 0.0, w_all + m_ref * s_all, 0.0))  # sum e * x
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
        sms = num_sms(device)
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
        FINAL=used == 1, PART_STRIDE=stride, BLOCK_V=block_v, VEC=min(block_v, max(1, 16 // logits.element_size())),
        num_warps=num_warps,
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
