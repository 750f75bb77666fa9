"""TrunkExports in one process: the source's snapshot lands in shared memory that a pickled handle maps (no
copy), a restore from it continues exactly like the source, and released buffers are reused."""

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


def test_device_exports_need_cuda_and_host_exports_share_no_ipc_handles(engines):
    source, _ = engines
    session = source.prefill([5, 6, 7])
    exports = TrunkExports(source.device)
    with pytest.raises(ValueError, match="transport='device' needs a CUDA worker; this one is on cpu"):
        exports.export(source, session, "device", num_destinations=1)
    with pytest.raises(ValueError, match="transport='ipc': use one of"):
        exports.export(source, session, "ipc", num_destinations=1)
    assert exports.num_held == 0 and exports.host_buffers.num_lent == 0  # nothing taken by the refusals
    export = exports.export(source, session, "host", num_destinations=1)
    with pytest.raises(RuntimeError, match="is a host export"):
        exports.share(export.export_id, 1)
    exports.release(export.export_id)
    with pytest.raises(RuntimeError, match="holds no trunk export"):
        exports.share(export.export_id, 1)
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
