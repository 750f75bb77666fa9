"""ForkPool weights by CUDA IPC when every worker shares the trainer's device (issue #15), on the CPU.

The story: ``weight_ipc=True`` runs the IPC protocol with shared host memory (what CUDA IPC does on one
GPU): the pool packs the trainer's parameters into buckets it keeps, each worker opens its own handle and
copies, and afterwards every worker holds exactly the trainer's bytes and the new version. A second
update reuses the same buffers and still matches; a worker killed before it opened its handle is
replaced and the retry gives it the current weights. Misuse is named. Only the CUDA lines (stream sync,
opening a handle on the GPU) are not run here: ``benchmarks/pool_weight_sync.py --devices cuda:0
--trainer-device cuda:0`` runs them.
"""

from __future__ import annotations

import functools

import pytest

from thaw_rl.pool import ForkPool
from thaw_rl.pool.worker import Fault, _digest
from thaw_rl.testing import tiny_model_and_tokenizer

FACTORY = functools.partial(tiny_model_and_tokenizer, "qwen2", initializer_range=0.2)
ENGINE_KWARGS = dict(kv_cache_memory=8 << 20)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def digests(model) -> dict[str, str]:
    return {name: _digest(t) for name, t in model.named_parameters()}


def assert_workers_hold(pool: ForkPool, model, version: int) -> None:
    expected = digests(model)
    for w in range(pool.num_workers):
        assert pool._workers[w].call("weights_digest", timeout_s=60) == expected, f"worker {w} differs"
    assert [s["version"] for s in pool.stats()["workers"]] == [version] * pool.num_workers


def test_ipc_weights_match_exactly_reuse_their_buffers_and_reach_a_replacement():
    first, _ = tiny_model_and_tokenizer("qwen2", seed=1, initializer_range=0.2)
    second, _ = tiny_model_and_tokenizer("qwen2", seed=2, initializer_range=0.2)
    assert digests(first) != digests(second)
    with ForkPool(FACTORY, num_workers=2, engine_kwargs=ENGINE_KWARGS, weight_sync="distributed", weight_ipc=True,
                  weight_bucket_bytes=64 << 10, timeout_s=60) as pool:
        pool.update_weights(dict(first.named_parameters()), version=3)
        assert pool.last_weight_transport == "ipc"
        layout, buffers = pool._ipc_buffers
        assert len(buffers) > 1  # several buckets
        assert_workers_hold(pool, first, 3)

        pool.update_weights(dict(second.named_parameters()))  # the same layout: the same buffers, repacked
        assert pool._ipc_buffers[0] == layout and [b.data_ptr() for b in pool._ipc_buffers[1]] == \
            [b.data_ptr() for b in buffers]
        assert_workers_hold(pool, second, 4)

        pool._set_faults(1, [Fault("open_weights", "kill")])  # dies before it opens its handle
        pool.update_weights(dict(first.named_parameters()))
        assert "killed by signal SIGKILL" in pool.stats()["failures"][-1]
        assert pool.last_weight_transport == "ipc"
        assert_workers_hold(pool, first, 5)  # the replacement got version 5 from the retry


def test_weight_ipc_misuse_is_named():
    with pytest.raises(ValueError, match="weight_ipc=True is a way of weight_sync='distributed'"):
        ForkPool(FACTORY, num_workers=1, weight_ipc=True)
    with pytest.raises(TypeError, match="weight_ipc='yes'"):
        ForkPool(FACTORY, num_workers=1, weight_sync="distributed", weight_ipc="yes")
