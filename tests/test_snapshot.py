"""KVSnapshot: snapshot a trunk, restore it into another engine, save and load it, and refuse bad inputs."""

from __future__ import annotations

import gc
import os
import pickle
import stat

import pytest
import torch

from thaw_rl import KVCacheExhaustedError, KVSnapshot, SamplingParams, ThawEngine
from thaw_rl.snapshot import (
    NotASnapshotFileError,
    SnapshotCorruptedError,
    SnapshotFileError,
    SnapshotMismatchError,
    SnapshotTruncatedError,
)

BS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
SEGMENT = SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)


def random_prompt(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (n,), generator=g).tolist()


def busy_engine(model, tok, num_blocks: int = 64, block_size: int = BS) -> ThawEngine:
    """An engine of num_blocks blocks whose first 4 are taken by two other sessions, so restored block ids differ."""
    bytes_per_block = ThawEngine(model, tok, block_size=block_size, kv_cache_memory=1 << 20).spec.bytes_per_block
    engine = ThawEngine(model, tok, block_size=block_size, kv_cache_memory=(num_blocks + 1) * bytes_per_block)
    vocab = model.config.vocab_size
    engine.prefill_many([random_prompt(40, vocab, 100), random_prompt(9, vocab, 101)])
    return engine


@pytest.fixture(scope="module")
def qwen3(make_tiny_model, tiny_tokenizer):
    return make_tiny_model("qwen3"), tiny_tokenizer


@pytest.fixture(scope="module")
def trunk(qwen3):
    """A 37-token prompt (2 full blocks + 5 tokens) prefilled in a source engine, and its snapshot."""
    model, tok = qwen3
    prompt = random_prompt(37, model.config.vocab_size, 1)
    source = ThawEngine(model, tok, block_size=BS, kv_cache_memory=8 << 20)
    session = source.prefill(prompt)
    return prompt, source, session, source.snapshot(session)


def pool_state(engine: ThawEngine) -> tuple[int, int, int]:
    return engine.block_manager.num_used_blocks, engine.block_manager.num_free_blocks, engine.block_manager.num_cached_blocks


def assert_same_snapshot(a: KVSnapshot, b: KVSnapshot) -> None:
    assert a.fingerprint == b.fingerprint
    assert (a.token_ids, a.num_prompt_tokens, a.num_computed) == (b.token_ids, b.num_prompt_tokens, b.num_computed)
    assert a.block_hashes == b.block_hashes
    assert (a.weight_version, a.weights_digest) == (b.weight_version, b.weights_digest)
    assert a.kv.dtype == b.kv.dtype and a.kv.shape == b.kv.shape
    assert torch.equal(a.kv.view(torch.uint8), b.kv.view(torch.uint8))  # bit-exact, NaN payloads included
    assert (a.next_logits is None) == (b.next_logits is None)
    if a.next_logits is not None:
        assert torch.equal(a.next_logits.view(torch.uint8), b.next_logits.view(torch.uint8))


# -- snapshot ---------------------------------------------------------------------------------------
def test_snapshot_holds_exactly_the_sessions_computed_blocks(trunk):
    prompt, source, session, snap = trunk
    assert snap.token_ids == prompt and snap.num_prompt_tokens == snap.num_computed == 37
    assert snap.kv.shape == (3, 3, 2, BS, 2, 16)  # ceil(37 / 16) blocks, 3 layers, K/V, 2 KV heads of 16
    assert snap.block_hashes == session.block_hashes[:2] and snap.fingerprint == source.fingerprint
    assert torch.equal(snap.next_logits, session.next_logits)
    expected = source.kv_cache.kv[:, :, session.block_table].permute(2, 0, 1, 3, 4, 5)  # (3, L, 2, BS, KVH, D)
    assert torch.equal(snap.kv, expected)
    assert snap.nbytes == snap.kv.numel() * 4 + snap.next_logits.numel() * 4
    assert source.block_manager.ref_count(session.block_table[0]) == 1  # the blocks held during the copy were given back


def test_snapshot_async_holds_the_blocks_until_wait(qwen3):
    """The handle's blocks survive free(session) until wait() (always the case once the copy is synchronous)."""
    model, tok = qwen3
    engine = ThawEngine(model, tok, block_size=BS, kv_cache_memory=8 << 20)
    s = engine.prefill(random_prompt(20, model.config.vocab_size, 2))
    handle = engine.snapshot_async(s)
    engine.free(s)
    snap = handle.wait()
    assert handle.done() and handle.wait() is snap
    assert engine.block_manager.num_used_blocks == 0
    assert snap.num_computed == 20 and snap.kv.shape[0] == 2


def test_pooled_host_buffer_goes_back_when_the_snapshot_dies_or_is_released(qwen3):
    model, tok = qwen3
    engine = ThawEngine(model, tok, block_size=BS, kv_cache_memory=8 << 20)
    s = engine.prefill(random_prompt(20, model.config.vocab_size, 2))
    snap = engine.snapshot(s)
    pool = engine.kv_transfer.pool
    assert pool.num_lent == 1
    kv = snap.kv
    del snap
    gc.collect()
    assert pool.num_lent == 1  # kv is still in use
    del kv
    gc.collect()
    assert (pool.num_lent, pool.num_free) == (0, 1)
    snap = engine.snapshot(s)
    assert (pool.num_lent, pool.num_free) == (1, 0)  # the same buffer, reused
    snap.release()
    assert pool.num_lent == 0
    with pytest.raises(ValueError, match="was released"):
        engine.restore(snap)


def test_snapshot_into_a_given_buffer_writes_there_and_leaves_it_to_the_caller(qwen3, trunk):
    """``out=``: the gather fills the caller's tensor (ForkPool gives shared memory or a device buffer);
    the snapshot equals a pooled one bit for bit and takes no buffer from the engine's pool."""
    _, source, session, snap = trunk
    shape = source.snapshot_shape(session)
    assert shape == tuple(snap.kv.shape) == (3, *snap.kv.shape[1:])
    out = torch.full(shape, float("nan"), dtype=snap.kv.dtype)
    lent, used = source.kv_transfer.pool.num_lent, pool_state(source)[0]
    mine = source.snapshot(session, out=out)
    assert mine.kv is out and source.kv_transfer.pool.num_lent == lent
    assert_same_snapshot(mine, snap)
    del mine
    gc.collect()
    assert source.kv_transfer.pool.num_lent == lent  # nothing goes back to the pool: out stays the caller's
    with pytest.raises(ValueError, match=r"out must have shape \[n, L, 2, BS, KVH, D\]"):
        source.snapshot(session, out=torch.empty(2, *shape[1:], dtype=snap.kv.dtype))
    with pytest.raises(ValueError, match="dtype"):
        source.snapshot(session, out=torch.empty(shape, dtype=torch.float64))
    with pytest.raises(TypeError, match="takes a tensor"):
        source.snapshot(session, out=[0.0])
    assert pool_state(source)[0] == used  # every rejected call gave the held blocks back


# -- restore -------------------------------------------------------------------------------------------
def test_restored_prefill_continues_token_for_token_in_another_engine(qwen3, trunk):
    model, tok = qwen3
    prompt, source, session, snap = trunk
    (ref,) = source.generate(source.fork(session, 1), GREEDY)

    target = busy_engine(model, tok)
    used = target.block_manager.num_used_blocks
    restored, num_shared = target.restore_with_stats(snap)
    assert num_shared == 0
    assert target.block_manager.num_used_blocks == used + 3
    assert not set(restored.block_table) & set(session.block_table)  # other ids: the busy blocks came first
    assert restored.num_computed == 37 and restored.next_logits is not None
    (out,) = target.generate([restored], GREEDY)
    assert out.token_ids == ref.token_ids
    assert out.logprobs == pytest.approx(ref.logprobs, abs=1e-5)

    before = target.stats.prompt_tokens_reused
    again = target.prefill(prompt)  # the restored full blocks are in the target's prefix cache
    assert target.stats.prompt_tokens_reused - before == 32
    assert again.block_table[:2] == restored.block_table[:2]


def test_restored_mid_generation_session_continues_token_for_token(qwen3, trunk):
    """After a segment of decoding the last sampled token is uncomputed; the restored session computes it."""
    model, tok = qwen3
    prompt, source, session, _ = trunk
    (parent,) = source.fork(session, 1)
    (first,) = source.generate([parent], SEGMENT)  # 37 + 7 tokens, 43 computed
    snap = source.snapshot(parent)
    assert (snap.num_tokens, snap.num_computed, snap.next_logits) == (44, 43, None)
    assert len(snap.block_hashes) == 2 and snap.kv.shape[0] == 3
    sampled = SamplingParams(temperature=0.8, max_tokens=10, ignore_eos=True, seed=7)
    (ref,) = source.generate(source.fork(parent, 1), sampled)

    target = busy_engine(model, tok)
    restored = target.restore(snap)
    assert restored.num_uncomputed == 1 and restored.next_logits is None
    (out,) = target.generate([restored], sampled)
    assert out.token_ids == ref.token_ids  # seeded sampling noise is a function of (seed, position)
    assert out.logprobs == pytest.approx(ref.logprobs, abs=1e-5)
    before = target.stats.prompt_tokens_reused
    target.prefill(prompt)
    assert target.stats.prompt_tokens_reused - before == 32


def test_restore_shares_blocks_the_target_already_caches(qwen3, trunk):
    model, tok = qwen3
    prompt, _, session, snap = trunk
    target = busy_engine(model, tok)
    first = target.restore(snap)
    used = target.block_manager.num_used_blocks
    second, num_shared = target.restore_with_stats(snap)
    assert num_shared == 2 and second.block_table[:2] == first.block_table[:2]
    assert [target.block_manager.ref_count(b) for b in first.block_table] == [2, 2, 1]
    assert target.block_manager.num_used_blocks == used + 1  # only the partial block was written
    target.free(first)
    target.free(second)
    third, num_shared = target.restore_with_stats(snap)  # freed cached blocks come back from the free queue
    assert num_shared == 2


def test_restore_of_a_session_with_every_token_computed_and_no_logits_recomputes_the_last(qwen3, trunk):
    """A hand-made snapshot without logits still gives a live session: its last token is left to compute."""
    model, tok = qwen3
    prompt, source, session, snap = trunk
    bare = KVSnapshot(snap.fingerprint, snap.token_ids, 37, 37, snap.block_hashes, snap.kv, next_logits=None)
    target = ThawEngine(model, tok, block_size=BS, kv_cache_memory=8 << 20)
    restored = target.restore(bare)
    assert restored.num_computed == 36 and restored.num_uncomputed == 1
    (ref,) = source.generate(source.fork(session, 1), GREEDY)
    (out,) = target.generate([restored], GREEDY)
    assert out.token_ids == ref.token_ids


def test_restore_into_a_pool_too_small_raises_and_changes_nothing(qwen3, trunk):
    model, tok = qwen3
    _, _, _, snap = trunk
    target = busy_engine(model, tok, num_blocks=6)  # 4 of 6 blocks taken, the snapshot needs 3
    state = pool_state(target)
    with pytest.raises(KVCacheExhaustedError, match="needs 3 free KV blocks .* only 2 are free"):
        target.restore(snap)
    assert pool_state(target) == state


# -- save / load ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_is_exact(make_tiny_model, tiny_tokenizer, tmp_path, dtype):
    model = make_tiny_model("llama", dtype=dtype)
    engine = ThawEngine(model, tiny_tokenizer, block_size=BS, kv_cache_memory=8 << 20)
    s = engine.prefill(random_prompt(21, model.config.vocab_size, 3))
    (first,) = engine.generate(engine.fork(s, 1), SEGMENT)
    for snap in (engine.snapshot(s), engine.snapshot(first.session)):  # with and without next_logits
        snap.save(tmp_path / "trunk.kvsnap")
        loaded = KVSnapshot.load(tmp_path / "trunk.kvsnap")
        assert_same_snapshot(loaded, snap)
        assert loaded.kv.dtype == dtype
    restored = engine.restore(loaded)  # a loaded snapshot restores like the original
    ref = engine.generate(engine.fork(first.session, 1), GREEDY)[0].token_ids
    assert engine.generate([restored], GREEDY)[0].token_ids == ref


def test_pickled_snapshot_is_a_compact_copy(trunk):
    snap = trunk[3]
    copy = pickle.loads(pickle.dumps(snap))
    assert_same_snapshot(copy, snap)
    assert copy._release is None and copy.kv.untyped_storage().nbytes() == snap.kv.numel() * 4


@pytest.fixture
def saved(trunk, tmp_path):
    path = tmp_path / "trunk.kvsnap"
    trunk[3].save(path)
    return path


def flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["json", "payload", "last byte"])
def test_flipped_bytes_are_a_checksum_error(saved, where):
    data = saved.read_bytes()
    offset = {"json": data.index(b"token_ids") + 2, "payload": len(data) - 1000, "last byte": len(data) - 1}[where]
    flip(saved, offset)
    with pytest.raises(SnapshotCorruptedError, match="file is corrupted: checksum"):
        KVSnapshot.load(saved)


def test_flipped_length_field_is_a_header_checksum_error(saved):
    flip(saved, 20)  # the payload length: must not read as truncation
    with pytest.raises(SnapshotCorruptedError, match="checksum of the 28-byte header"):
        KVSnapshot.load(saved)


def test_truncated_file_says_how_much_is_missing(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[:-1])
    with pytest.raises(SnapshotTruncatedError, match=f"truncated: expected {len(data)} bytes, found {len(data) - 1}"):
        KVSnapshot.load(saved)
    saved.write_bytes(data[:30])  # inside the fixed header
    with pytest.raises(SnapshotTruncatedError, match="truncated: expected at least 44 bytes, found 30"):
        KVSnapshot.load(saved)


def test_a_file_that_is_not_a_snapshot(tmp_path, trunk):
    other = tmp_path / "weights.pt"
    torch.save({"kv": trunk[3].kv}, other)
    with pytest.raises(NotASnapshotFileError, match="is not a thaw-rl KV snapshot"):
        KVSnapshot.load(other)
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(NotASnapshotFileError):
        KVSnapshot.load(tmp_path / "empty")


# -- fingerprint ----------------------------------------------------------------------------------------
OTHER_MODEL = "the snapshot comes from another model; restore into an engine built on the same model"


@pytest.mark.parametrize("case, field, message", [
    ("other family", "architecture",
     f"snapshot architecture Qwen3ForCausalLM != engine architecture LlamaForCausalLM: {OTHER_MODEL}"),
    ("other depth", "num_layers", f"snapshot num_layers 3 != engine num_layers 2: {OTHER_MODEL}"),
    ("other dtype", "dtype",
     "snapshot dtype float32 != engine dtype bfloat16: restore into an engine built on the same model in float32"),
    ("other block size", "block_size",
     r"snapshot block_size 16 != engine block_size 8: build the target engine with "
     r"ThawEngine\(\.\.\., block_size=16\)"),
])
def test_restore_refuses_another_engine_fingerprint_and_changes_nothing(
        make_tiny_model, tiny_tokenizer, trunk, saved, case, field, message):
    model, block_size = {
        "other family": (make_tiny_model("llama"), BS),
        "other depth": (make_tiny_model("qwen3", num_hidden_layers=2), BS),
        "other dtype": (make_tiny_model("qwen3", dtype=torch.bfloat16), BS),
        "other block size": (make_tiny_model("qwen3"), 8),
    }[case]
    target = busy_engine(model, tiny_tokenizer, block_size=block_size)
    state = pool_state(target)
    for snap in (trunk[3], KVSnapshot.load(saved)):
        with pytest.raises(SnapshotMismatchError, match=message) as err:
            target.restore(snap)
        assert isinstance(err.value, ValueError) and err.value.field == field
    assert pool_state(target) == state


def test_snapshot_fields_must_agree_with_the_fingerprint(trunk):
    snap = trunk[3]
    with pytest.raises(ValueError, match=r"kv must be \(3, 3, 2, 16, 2, 16\) float32"):
        KVSnapshot(snap.fingerprint, snap.token_ids, 37, 37, snap.block_hashes, snap.kv[:2], snap.next_logits)
    with pytest.raises(ValueError, match="2 block hashes for 1 full blocks"):
        KVSnapshot(snap.fingerprint, snap.token_ids[:20], 20, 20, snap.block_hashes, snap.kv[:2])
    with pytest.raises(ValueError, match="need num_computed == num_tokens"):
        KVSnapshot(snap.fingerprint, snap.token_ids + [5], 37, 37, snap.block_hashes, snap.kv, snap.next_logits)


def test_restore_refuses_hashes_that_do_not_match_the_tokens(qwen3, trunk):
    model, tok = qwen3
    snap = trunk[3]
    tokens = [5] + snap.token_ids[1:]  # another first token: the chained hashes no longer match
    edited = KVSnapshot(snap.fingerprint, tokens, 37, 37, snap.block_hashes, snap.kv, snap.next_logits)
    target = busy_engine(model, tok)
    state = pool_state(target)
    with pytest.raises(ValueError, match="block hashes do not match its token ids"):
        target.restore(edited)
    assert pool_state(target) == state


# -- weight versions (#14 item 2) ---------------------------------------------------------------------------
def test_a_snapshot_from_other_weights_of_the_same_architecture_is_refused(make_tiny_model, tiny_tokenizer, trunk):
    """Issue #14 scenario 1: same config, other weights, both at weight version 0."""
    prompt, _, _, snap = trunk
    other = make_tiny_model("qwen3", seed=1)
    target = busy_engine(other, tiny_tokenizer)
    state = pool_state(target)
    with pytest.raises(ValueError, match="computed with other weights than this engine holds .*weights digest "
                                         f"{snap.weights_digest} != "):
        target.restore(snap)
    assert pool_state(target) == state
    target.prefill(prompt)
    assert target.stats.prompt_tokens_reused == 0  # nothing of the snapshot entered the prefix cache


def test_a_snapshot_taken_before_an_in_place_update_is_refused_after_reset_prefix_cache(make_tiny_model,
                                                                                          tiny_tokenizer):
    """Issue #14 scenario 2: snapshot, update the weights in place, reset_prefix_cache(), restore."""
    model = make_tiny_model("qwen3", seed=2)
    engine = ThawEngine(model, tiny_tokenizer, block_size=BS, kv_cache_memory=8 << 20)
    prompt = random_prompt(37, model.config.vocab_size, 5)
    s = engine.prefill(prompt)
    snap = engine.snapshot(s)
    engine.free(s)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    engine.reset_prefix_cache()
    with pytest.raises(ValueError, match="computed with weight version 0 but this engine runs weight version 1"):
        engine.restore(snap)
    fresh = engine.prefill(prompt)
    assert engine.stats.prompt_tokens_reused == 0
    (out,) = engine.generate([fresh], GREEDY)
    ids = torch.tensor([prompt])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert out.token_ids == ref[0, 37:].tolist()  # computed with the new weights, not the stale cache


def test_an_in_place_update_without_any_call_still_drops_the_prefix_cache(make_tiny_model, tiny_tokenizer):
    model = make_tiny_model("qwen3", seed=3)
    engine = ThawEngine(model, tiny_tokenizer, block_size=BS, kv_cache_memory=8 << 20)
    prompt = random_prompt(37, model.config.vocab_size, 6)
    engine.free(engine.prefill(prompt))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(2.0)
    engine.prefill(prompt)  # the engine sees the weights changed: new version, nothing reused
    assert engine.weight_version == 1 and engine.stats.prompt_tokens_reused == 0


def test_weight_versions_salt_the_prefix_cache_and_must_match_on_restore(qwen3, trunk):
    model, tok = qwen3
    prompt, _, _, snap = trunk
    assert snap.weight_version == 0
    target = busy_engine(model, tok)
    target.set_weight_version(3)
    with pytest.raises(ValueError, match=r"weight version 0 but this engine runs weight version 3.*"
                                         r"engine.set_weight_version\(0\)"):
        target.restore(snap)
    s = target.prefill(prompt)
    later = target.snapshot(s)
    assert later.weight_version == 3
    target.set_weight_version(4)  # e.g. the next optimizer step: the cache is dropped, the snapshot refused
    assert target.stats.num_cached_blocks == 0
    target.prefill(prompt)
    assert target.stats.prompt_tokens_reused == 0
    with pytest.raises(ValueError, match="weight version 3 but this engine runs weight version 4"):
        target.restore(later)
    same = ThawEngine(model, tok, block_size=BS, kv_cache_memory=8 << 20, weight_version=3)
    assert same.restore(later).token_ids == prompt  # same weights, same version: restored


def test_a_format_1_file_names_its_version_and_the_fix(saved):
    import hashlib
    import struct

    data = bytearray(saved.read_bytes())
    fixed = struct.pack("<8sIQQ", *(lambda m, v, j, p: (m, 1, j, p))(*struct.unpack("<8sIQQ", data[:28])))
    data[:44] = fixed + hashlib.blake2b(fixed, digest_size=16).digest()
    saved.write_bytes(bytes(data))
    with pytest.raises(SnapshotFileError, match="format version 1; this thaw-rl reads version 2 .*weight version"):
        KVSnapshot.load(saved)


# -- save onto something that is not a regular file ------------------------------------------------------
def test_save_refuses_a_symlink_and_leaves_it_and_its_target_alone(trunk, tmp_path):
    target = tmp_path / "target.bin"
    target.write_bytes(b"keep me")
    link = tmp_path / "link.kvsnap"
    link.symlink_to(target)
    with pytest.raises(ValueError, match=r"the path is a symbolic link; save writes a regular file"):
        trunk[3].save(link)
    assert link.is_symlink() and target.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.kvsnap", "target.bin"]  # no temporary left


def test_save_refuses_a_fifo_and_a_directory(trunk, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="the path is a FIFO"):
        trunk[3].save(fifo)  # would block on open, or replace the FIFO, without the check
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    with pytest.raises(ValueError, match="the path is a directory"):
        trunk[3].save(tmp_path)


def test_save_refuses_a_device(trunk, tmp_path):
    """On a device node of our own (never a real /dev path: without the check the test would replace it)."""
    device = tmp_path / "null"
    try:
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # the null device's numbers
    except PermissionError:
        pytest.skip("creating a device node needs root")
    with pytest.raises(ValueError, match=r"KVSnapshot.save\('.*/null'\): the path is a device"):
        trunk[3].save(device)
    assert stat.S_ISCHR(os.lstat(device).st_mode)


def test_save_replaces_a_regular_file_and_writes_a_new_path(trunk, tmp_path):
    path = tmp_path / "trunk.kvsnap"
    path.write_bytes(b"old")
    trunk[3].save(path)
    assert_same_snapshot(KVSnapshot.load(path), trunk[3])
    trunk[3].save(tmp_path / "new.kvsnap")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.kvsnap", "trunk.kvsnap"]


def test_the_weights_digest_is_the_per_parameter_sample_and_follows_in_place_updates_and_replacements(make_tiny_model):
    """The planned path (strided views, one cat per dtype run) gives the bytes of the per-parameter sample:
    mixed dtypes, a parameter with fewer than 8 elements, an in-place update, a replaced parameter, and a
    non-contiguous one (which takes the per-parameter path)."""
    import hashlib

    from thaw_rl.engine.weights import weights_digest

    def by_parameter(model):
        samples = []
        for p in model.parameters():
            flat = p.detach().reshape(-1)
            samples.append(flat[::max(1, flat.numel() // 8)][:8].to(torch.float32))
        return hashlib.blake2b(torch.cat(samples).numpy().tobytes(), digest_size=8).hexdigest()

    model = make_tiny_model("qwen3", dtype=torch.bfloat16)
    layer = model.model.layers[0]
    layer.input_layernorm.weight.data = torch.randn(5, dtype=torch.bfloat16)  # fewer than 8 elements
    model.model.norm.weight.data = model.model.norm.weight.data.float()  # a run of another dtype
    first = weights_digest(model)
    assert first == by_parameter(model) == weights_digest(model)
    with torch.no_grad():
        layer.mlp.up_proj.weight.mul_(2)  # in place: the planned views see it
    assert weights_digest(model) == by_parameter(model) != first
    layer.self_attn.q_proj.weight.data = torch.randn_like(layer.self_attn.q_proj.weight)  # replaced: planned again
    assert weights_digest(model) == by_parameter(model)
    layer.mlp.down_proj.weight.data = layer.mlp.down_proj.weight.data.t().contiguous().t()  # non-contiguous
    assert weights_digest(model) == by_parameter(model)
