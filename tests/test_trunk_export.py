"""TrunkExports in one process: the source's snapshot lands in shared memory that a pickled handle maps (no
copy), a restore from it continues exactly like the source, device exports hand out one handle per
destination, and released buffers are reused."""

from __future__ import annotations

import gc
from multiprocessing.reduction import ForkingPickler

import pytest
import torch

from thaw_rl import SamplingParams, ThawEngine
from thaw_rl.pool.shared_memory import SharedPinnedBuffers
from thaw_rl.pool.trunk_export import TrunkExports, TrunkImport

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
    export = exports.export(source, session, "host", num_destinations=1)
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
    again = exports.export(source, session, "host", num_destinations=1)  # the idle buffer, reused
    assert again.kv.data_ptr() == export.kv.data_ptr() and exports.host_buffers.num_idle == 0
    exports.release(again.export_id)


def test_a_device_export_hands_out_one_pickled_handle_per_destination_and_more_on_request(engines):
    """On a CPU engine the "device" buffer is host memory that the pickled handles share (the CUDA IPC
    handles' stand-in): each destination opens its own and restores exactly; a host export has none."""
    source, target = engines
    session = source.prefill(list(range(5, 40)))
    (ref,) = source.generate(source.fork(session, 1), GREEDY)
    exports = TrunkExports(source.device)
    export = exports.export(source, session, "device", num_destinations=1)
    assert export.kv is None and len(export.payloads) == 1
    export.payloads += exports.share(export.export_id, 1)
    mine = [export.for_destination(), export.for_destination()]
    assert [len(m.payloads) for m in mine] == [1, 1] and export.payloads == []
    with pytest.raises(RuntimeError, match="no CUDA IPC handle left"):
        export.for_destination()
    for m in mine:
        trunk = TrunkImport(m, target.device)
        restored = target.restore(trunk.snapshot)
        trunk.close()
        (out,) = target.generate([restored], GREEDY)
        assert out.token_ids == ref.token_ids and out.logprobs == ref.logprobs
        target.free(restored)
    assert exports.host_buffers.num_lent == 0  # a device export takes no shared host buffer
    exports.release(export.export_id)
    assert exports.num_held == 0
    with pytest.raises(RuntimeError, match="holds no trunk export"):
        exports.share(export.export_id, 1)

    host = exports.export(source, session, "host", num_destinations=1)
    with pytest.raises(RuntimeError, match="is a host export"):
        exports.share(host.export_id, 1)
    with pytest.raises(ValueError, match="transport='ipc': use one of"):
        exports.export(source, session, "ipc", num_destinations=1)
    exports.release(host.export_id)
    assert (exports.num_held, exports.host_buffers.num_lent) == (0, 0)
    source.free(session)


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
