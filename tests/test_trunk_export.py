"""TrunkExports in one process: the source's snapshot lands in shared memory that a pickled handle maps (no
copy), a restore from it continues exactly like the source, device exports reuse their buffers and carry a
handle only for a destination that has not opened the buffer, and released buffers are reused."""

from __future__ import annotations

import gc
from multiprocessing.reduction import ForkingPickler

import pytest
import torch

from thaw_rl import SamplingParams, ThawEngine
from thaw_rl.pool.shared_memory import SharedPinnedBuffers
from thaw_rl.pool.trunk_export import ExportBuffers, OpenedBuffers, TrunkExports, TrunkImport

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def engines(make_tiny_model, tiny_tokenizer):
    model = make_tiny_model("qwen3")
    return [ThawEngine(model, tiny_tokenizer, block_size=16, kv_cache_memory=4 << 20) for _ in range(2)]


def test_a_host_export_is_the_shared_buffer_the_destination_maps_and_restores_exactly(engines):
    source, target = engines
    prompt = torch.randint(4, 100, (37,), generator=torch.Generator().manual_seed(3)).tolist()
    session = source.prefill(prompt)
    exports = TrunkExports(source.device)
    export = exports.export(source, session, "host")
    assert export.kv.is_shared() and tuple(export.kv.shape) == source.snapshot_shape(session)
    assert export.nbytes == export.kv.nbytes + 4 * source.model.config.vocab_size  # KV + fp32 next-token logits

    received = ForkingPickler.loads(ForkingPickler.dumps(export))  # what a pipe does: a handle, not the bytes
    assert torch.equal(received.kv, export.kv)
    export.kv.view(-1)[0] += 1  # the two map one buffer: a write on one side shows on the other
    assert torch.equal(received.kv, export.kv)
    export.kv.view(-1)[0] -= 1

    (ref,) = source.generate(source.fork(session, 1), GREEDY)
    trunk = TrunkImport(received, target.device)
    restored = target.restore(trunk.snapshot)
    trunk.close()
    (out,) = target.generate([restored], GREEDY)
    assert out.token_ids == ref.token_ids and out.logprobs == ref.logprobs
    target.free(restored)

    assert (exports.num_held, exports.host_buffers.num_lent) == (1, 1)  # kept until the pool releases it
    exports.release(export.export_id)
    exports.release(export.export_id)  # twice (a late duplicate) is harmless
    assert (exports.num_held, exports.host_buffers.num_lent, exports.host_buffers.num_idle) == (0, 0, 1)
    again = exports.export(source, session, "host")  # the idle buffer, reused
    assert again.kv.data_ptr() == export.kv.data_ptr() and exports.host_buffers.num_idle == 0
    exports.release(again.export_id)


def test_device_exports_reuse_one_buffer_that_each_destination_opens_once(engines):
    """On a CPU engine the "device" buffers are shared host memory and the pickled handles stand in for CUDA
    IPC handles. The first export carries a handle for the destination that lacks its buffer; once released,
    the buffer takes the next trunk and the destination reads it from the buffer it opened before (no handle,
    no allocation); each restore continues exactly like the source."""
    source, target = engines
    exports, opened = TrunkExports(source.device), OpenedBuffers()
    sessions = [source.prefill(list(range(5, 40))), source.prefill(list(range(50, 90)))]
    refs = [source.generate(source.fork(s, 1), GREEDY)[0] for s in sessions]

    def restore(export, destination=1):
        trunk = TrunkImport(export.for_destination(destination), target.device, opened)
        restored = target.restore(trunk.snapshot)
        trunk.close()
        (out,) = target.generate([restored], GREEDY)
        target.free(restored)
        return trunk.opened_now, out

    first = exports.export(source, sessions[0], "device", opened_by={1: []})
    assert (first.kv, first.buffer_id, first.owner) == (None, 1, exports.owner)
    assert list(first.payloads) == [1] and first.timings["num_allocs"] == 1 and first.timings["num_handles"] == 1
    assert first.fields["next_logits"] is None and first.logits_offset is not None  # the logits lie in the buffer
    assert first.nbytes == 3 * 16 * source.spec.bytes_per_token + 4 * source.model.config.vocab_size
    opened_now, out = restore(first)
    assert opened_now and out.token_ids == refs[0].token_ids and out.logprobs == refs[0].logprobs
    assert opened.keys() == [(exports.owner, 1)] and first.payloads == {}
    with pytest.raises(RuntimeError, match="has not opened, and it came without a handle"):
        TrunkImport(first.for_destination(2), target.device, OpenedBuffers())  # a destination without the buffer

    exports.release(first.export_id)
    second = exports.export(source, sessions[1], "device", opened_by={1: [1]})  # the destination has buffer 1
    assert (second.buffer_id, second.payloads, second.timings["num_allocs"]) == (1, {}, 0)
    opened_now, out = restore(second)  # the buffer now holds the second trunk
    assert not opened_now and out.token_ids == refs[1].token_ids and out.logprobs == refs[1].logprobs
    assert (opened.num_opens, opened.num_reuses) == (1, 1)

    third = exports.export(source, sessions[0], "device", opened_by={1: [1], 2: []})  # buffer 1 is still lent
    assert third.buffer_id == 2 and sorted(third.payloads) == [1, 2]
    assert exports.share(third.export_id, [3]).keys() == {3}
    opened_now, out = restore(third)
    assert opened_now and out.token_ids == refs[0].token_ids
    assert sorted(opened.keys()) == [(exports.owner, 1), (exports.owner, 2)]
    opened.drop(exports.owner, [2])
    assert opened.keys() == [(exports.owner, 1)]
    opened.drop(exports.owner)  # the source's process is gone: all of its buffers
    assert opened.keys() == []

    for e in (second, third):
        exports.release(e.export_id)
    assert (exports.num_held, exports.device_buffers.num_buffers, exports.device_buffers.num_idle) == (0, 2, 2)
    assert exports.host_buffers.num_lent == 0  # a device export takes no shared host buffer
    with pytest.raises(RuntimeError, match="holds no trunk export"):
        exports.share(third.export_id, [1])
    host = exports.export(source, sessions[0], "host")
    with pytest.raises(RuntimeError, match="is a host export"):
        exports.share(host.export_id, [1])
    with pytest.raises(ValueError, match="transport='ipc': use one of"):
        exports.export(source, sessions[0], "ipc")
    exports.release(host.export_id)
    for s in sessions:
        source.free(s)


def test_export_buffers_are_reused_by_size_and_the_ones_dropped_are_reported_once():
    buffers = ExportBuffers(torch.device("cpu"), granularity=1 << 10, max_idle=2)
    (a, ba), (b, bb), (c, bc) = buffers.acquire(1000), buffers.acquire(3000), buffers.acquire(100)
    assert (a, b, c) == (1, 2, 3) and [x.numel() for x in (ba, bb, bc)] == [1024, 3072, 1024] and ba.is_shared()
    for x in (a, b, c):
        buffers.release(x)
    assert (buffers.num_buffers, buffers.num_idle) == (2, 2)
    assert buffers.take_retired() == [a] and buffers.take_retired() == []  # the oldest idle one, reported once
    assert buffers.acquire(2000) == (b, bb)  # fits 2000 <= 3072 <= 2 * 2048: the same buffer, the same id
    assert buffers.acquire(5000)[0] == 4  # none fits: a new buffer, a new id (ids are never reused)
    with pytest.raises(RuntimeError, match="export buffer 3 is not lent"):
        buffers.release(c)
    payload = buffers.share(b)
    assert torch.equal(ForkingPickler.loads(payload), bb)  # the handle maps the same memory


def test_shared_buffers_are_reused_by_size_and_at_most_max_idle_are_kept():
    buffers = SharedPinnedBuffers(pin=False, granularity=1 << 10, max_idle=2)
    a, b, c = buffers.acquire(1000), buffers.acquire(3000), buffers.acquire(100)
    assert [x.numel() for x in (a, b, c)] == [1024, 3072, 1024] and a.is_shared()
    for x in (a, b, c):
        buffers.release(x)
    assert (buffers.num_lent, buffers.num_idle) == (0, 2)  # the oldest idle one was dropped
    ptrs = {b.data_ptr(), c.data_ptr()}
    assert buffers.acquire(2000).data_ptr() == b.data_ptr()  # fits 2000 <= 3072 <= 2 * 2048
    assert buffers.acquire(5000).data_ptr() not in ptrs  # none of the idle ones is large enough
    with pytest.raises(RuntimeError, match="without a matching acquire"):
        SharedPinnedBuffers(pin=False).release(a)
    del a, b, c
    gc.collect()
