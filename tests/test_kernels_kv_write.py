"""The one-launch K/V cache write against its torch reference, on real PagedKVCache layouts.

On a CPU machine the Triton kernel runs under the Triton interpreter; on a GPU it runs for real. The
write is a copy plus a cast (round-to-nearest-even), so every element is compared exactly.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest  # noqa: E402

from thaw_rl.engine.kv_cache import KVCacheSpec, PagedKVCache  # noqa: E402
from thaw_rl_kernels import write_kv, write_kv_reference, write_kv_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE = 3, 6, 4


def make_cache(layout, dtype, kv_heads=3, head_dim=40, seed=0):
    """A real PagedKVCache, filled with random values so that untouched slots are checked too."""
    spec = KVCacheSpec(num_layers=NUM_LAYERS, num_kv_heads=kv_heads, head_dim=head_dim, block_size=BLOCK_SIZE,
                       dtype=dtype)
    cache = PagedKVCache(spec, NUM_BLOCKS, DEVICE, layout=layout)
    g = torch.Generator().manual_seed(seed)
    cache.storage.copy_(torch.randn(cache.storage.shape, generator=g).to(dtype))
    return cache


def new_kv(num_tokens, kv_heads, head_dim, dtype, seed=1):
    """(T, KVH, D) key and value as the attention hook passes them: transposes of (1, KVH, T, D)."""
    g = torch.Generator().manual_seed(seed)
    key = torch.randn(1, kv_heads, num_tokens, head_dim, generator=g).to(dtype).to(DEVICE)
    value = torch.randn(1, kv_heads, num_tokens, head_dim, generator=g).to(dtype).to(DEVICE)
    return key[0].transpose(0, 1), value[0].transpose(0, 1)


def slots(pairs, dtype=torch.int64):
    blocks = torch.tensor([b for b, _ in pairs], dtype=dtype, device=DEVICE)
    offsets = torch.tensor([o for _, o in pairs], dtype=dtype, device=DEVICE)
    return blocks, offsets


# Unsorted slots across blocks, a block's first and last offsets, two tokens of one block.
PAIRS = [(5, 3), (1, 0), (3, 2), (1, 1), (0, 3)]


@pytest.mark.parametrize("layout", ["layer_major", "block_major"])
@pytest.mark.parametrize(
    "cache_dtype,input_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
     (torch.float32, torch.bfloat16)],
    ids=["f32<-f32", "bf16<-f32", "bf16<-bf16", "f32<-bf16"],
)
def test_triton_equals_reference(layout, cache_dtype, input_dtype):
    layer = 1
    ref_cache, tri_cache = make_cache(layout, cache_dtype), make_cache(layout, cache_dtype)
    key, value = new_kv(len(PAIRS), 3, 40, input_dtype)
    assert not key.is_contiguous()
    blocks, offsets = slots(PAIRS)
    write_kv_reference(key, value, ref_cache.key_cache(layer), ref_cache.value_cache(layer), blocks, offsets)
    write_kv_triton(key, value, tri_cache.key_cache(layer), tri_cache.value_cache(layer), blocks, offsets)
    assert torch.equal(tri_cache.storage, ref_cache.storage)  # every layer, every slot, bit for bit
    # and the reference did what it says: token 2 is in block 3 offset 2 of this layer only
    assert torch.equal(tri_cache.key_cache(layer)[3, 2], key[2].to(cache_dtype))
    assert torch.equal(tri_cache.value_cache(layer)[3, 2], value[2].to(cache_dtype))
    untouched = make_cache(layout, cache_dtype)
    assert torch.equal(tri_cache.kv[0], untouched.kv[0]) and torch.equal(tri_cache.kv[2], untouched.kv[2])
    assert torch.equal(tri_cache.kv[1, :, 2], untouched.kv[1, :, 2])  # block 2: no slot in it


FP8 = torch.float8_e4m3fn
FP8_VALUES = torch.arange(256, dtype=torch.uint8).view(FP8).float()  # every e4m3fn code's value (2 NaNs)


def write_one_block(fn, key, value, cache_dtype):
    """(16, 8, D) key and value written by ``fn`` into block 1 of a fresh cache: that block's K and V bytes, flat.
    16 tokens of 8 heads x D: a few programs of MAX_TILE elements, so the interpreter needs seconds, not minutes."""
    spec = KVCacheSpec(num_layers=1, num_kv_heads=8, head_dim=key.shape[2], block_size=16, dtype=cache_dtype)
    cache = PagedKVCache(spec, 3, DEVICE)
    blocks, offsets = slots([(1, t) for t in range(16)])
    fn(key, value, cache.key_cache(0), cache.value_cache(0), blocks, offsets)
    return cache.key_cache(0)[1].reshape(-1).view(torch.uint8), cache.value_cache(0)[1].reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("input_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp8_cache_write_equals_torch_for_every_16_bit_input(input_dtype):
    """kv_cache_dtype="fp8": all 65,536 bf16 (and fp16) bit patterns - subnormals, +-inf, NaNs, values past 448 -
    written by the kernel are the reference's bytes: saturated to +-448, then torch's round-to-nearest-even cast."""
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int16)
    key = bits.view(input_dtype).reshape(16, 8, 512).to(DEVICE)
    value = key.flip(0)
    tri_k, tri_v = write_one_block(write_kv_triton, key, value, FP8)
    ref_k, ref_v = write_one_block(write_kv_reference, key, value, FP8)
    assert torch.equal(tri_k, ref_k) and torch.equal(tri_v, ref_v)
    # the reference itself: NaN stays NaN, everything else saturates and lands on an e4m3fn value
    x = key.reshape(-1).float().cpu()
    stored = ref_k.reshape(-1).cpu().view(FP8).float()
    assert stored[x.isnan()].isnan().all() and (stored[x.abs() >= 464].abs() == 448).all()


def test_fp8_cache_write_rounds_to_the_nearest_e4m3_value():
    """fp32 inputs over 2^-12 .. 2^10: each stored value is the nearest e4m3fn value to the saturated input (ties,
    measure-zero here, aside), so the kernel's hand-written rounding is checked against the format itself."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * torch.logspace(-12, 10, 4096, base=2.0)
    key = x.reshape(16, 8, 32).to(DEVICE)
    tri_k, _ = write_one_block(write_kv_triton, key, key, FP8)
    stored = tri_k.reshape(-1).cpu().view(FP8).float()
    finite = FP8_VALUES[FP8_VALUES.isfinite()]
    nearest = finite[(x.clamp(-448, 448)[:, None] - finite[None, :]).abs().argmin(1)]
    exact_ties = ((x.clamp(-448, 448)[:, None] - finite[None, :]).abs().sort(1).values[:, :2].diff(1) == 0)[:, 0]
    assert torch.equal(stored[~exact_ties], nearest[~exact_ties])


def test_head_groups_int32_slots_and_strided_slot_tensors():
    """A head tile over MAX_TILE splits heads over programs; int32 slots read from a strided tensor."""
    cache_ref, cache_tri = (make_cache("block_major", torch.float32, 3, 2048) for _ in range(2))
    key, value = new_kv(2, 3, 2048, torch.float32)
    blocks = torch.tensor([4, -1, 2, -1], dtype=torch.int32, device=DEVICE)[::2]
    offsets = torch.tensor([1, -1, 3, -1], dtype=torch.int32, device=DEVICE)[::2]
    write_kv_reference(key, value, cache_ref.key_cache(0), cache_ref.value_cache(0), blocks, offsets)
    write_kv_triton(key, value, cache_tri.key_cache(0), cache_tri.value_cache(0), blocks, offsets)
    assert torch.equal(cache_tri.storage, cache_ref.storage)
    assert torch.equal(cache_tri.value_cache(0)[2, 3], value[1])


@pytest.mark.parametrize("fn", [write_kv_triton, write_kv_reference, write_kv])
def test_no_tokens_writes_nothing(fn):
    cache = make_cache("layer_major", torch.bfloat16)
    before = cache.storage.clone()
    key, value = new_kv(0, 3, 40, torch.float32)
    blocks, offsets = slots([])
    fn(key, value, cache.key_cache(0), cache.value_cache(0), blocks, offsets)
    assert torch.equal(cache.storage, before)


def test_bad_arguments_are_rejected():
    cache = make_cache("layer_major", torch.float32)
    k_cache, v_cache = cache.key_cache(0), cache.value_cache(0)
    key, value = new_kv(2, 3, 40, torch.float32)
    blocks, offsets = slots([(1, 0), (1, 1)])
    for fn in (write_kv_triton, write_kv_reference):
        with pytest.raises(ValueError, match="key and value must both be"):
            fn(key, value[:1], k_cache, v_cache, blocks, offsets)
        with pytest.raises(ValueError, match="k_cache and v_cache must both be"):
            fn(key[:, :2], value[:, :2], k_cache, v_cache, blocks, offsets)
        with pytest.raises(ValueError, match="k_cache and v_cache must both be"):
            fn(key, value, k_cache, v_cache[:3], blocks, offsets)
        with pytest.raises(ValueError, match=r"slot_offsets must be \(2,\)"):
            fn(key, value, k_cache, v_cache, blocks, offsets[:1])
        with pytest.raises(ValueError, match="slot_blocks must be .* int32 or int64"):
            fn(key, value, k_cache, v_cache, blocks.float(), offsets)
        with pytest.raises(ValueError, match="supported dtypes"):
            fn(key.double(), value.double(), k_cache, v_cache, blocks, offsets)
        with pytest.raises(TypeError, match="slot_blocks must be a torch.Tensor"):
            fn(key, value, k_cache, v_cache, [1, 1], offsets)
        with pytest.raises(ValueError, match="move them to one device"):
            fn(key, value, k_cache, v_cache, blocks, offsets.to("meta"))


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.float16])
def test_bfloat16_rounding_edge_cases(input_dtype):
    """The cast to a bf16 cache rounds as torch does: ties to even, overflow to inf, subnormals, signed zero, NaN."""
    tie = 1 + 2**-8  # halfway between bf16 1.0 and 1.0078125: rounds down to the even 1.0
    above = 1 + 3 * 2**-8  # halfway between 1.0078125 and 1.015625: rounds up to the even 1.015625
    near_max = torch.tensor(0x7F7FFFFF, dtype=torch.int32).view(torch.float32).item()  # float32 max: bf16 inf
    values = [tie, -tie, above, 1 + 2**-9, 3.0e38, near_max, -near_max, float("inf"), float("-inf"), 1e-40,
              -1e-41, -0.0, 0.0, 65504.0, 6e-8, float("nan")]
    row = torch.tensor(values, dtype=torch.float32).to(input_dtype)  # float16: the huge ones are inf already
    key = row[None, None, :].to(DEVICE)  # (1, 1, 16)
    value = -key
    cache = make_cache("layer_major", torch.bfloat16, kv_heads=1, head_dim=len(values))
    blocks, offsets = slots([(2, 1)])
    write_kv_triton(key, value, cache.key_cache(0), cache.value_cache(0), blocks, offsets)
    for written, source in ((cache.key_cache(0)[2, 1, 0], key[0, 0]), (cache.value_cache(0)[2, 1, 0], value[0, 0])):
        expected = source.to(torch.bfloat16)
        nan = expected.isnan()
        assert torch.equal(written.isnan(), nan)
        assert torch.equal(written[~nan].view(torch.int16), expected[~nan].view(torch.int16))  # bits, so -0.0 != 0.0
    if input_dtype == torch.float32:
        assert cache.key_cache(0)[2, 1, 0, :3].tolist() == [1.0, -1.0, 1.015625]
        assert cache.key_cache(0)[2, 1, 0, 5].item() == float("inf")


def test_engine_with_the_triton_write_equals_the_reference_write(monkeypatch):
    """The attention hook's real K/V views (prefill chunks and decode steps, a fork) through the Triton kernel:
    the same tokens and the same cache contents as through the torch reference."""
    from thaw_rl import SamplingParams, ThawEngine
    from thaw_rl.engine import attention
    from thaw_rl.testing import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer("qwen3")
    model = model.to(DEVICE)  # on a GPU: the engine's CUDA path (graphs capture the write), Triton compiled
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    results = []
    for write in (write_kv_reference, write_kv_triton):
        monkeypatch.setattr(attention, "write_kv", write)
        engine = ThawEngine(model, tok, block_size=4, kv_cache_memory=1 << 20, layout="block_major")
        trunk = engine.prefill([5, 6, 7, 8, 9, 10, 11])
        outs = engine.generate(engine.fork(trunk, 2) + engine.prefill_many([[3, 4], [12, 13, 14, 15, 16]]), greedy)
        cache = engine.kv_cache
        results.append(([o.token_ids for o in outs], cache.kv[:, :, 1 : cache.num_blocks].clone()))
        # (blocks 1.. of those mapped: CUDA-graph padding rows all write the null block 0, in no set order)
    assert results[1][0] == results[0][0]
    assert torch.equal(results[1][1], results[0][1])
