"""ForkPool weights over torch.distributed (gloo on CPU) and its recovery from failed starts.

The story: ``weight_sync="distributed"`` broadcasts several packed buckets to both workers, which then
sample exactly as the new model computes; versions never go back and a partial state dict is refused; a
worker killed mid-generate is replaced, gets the current weights from the other worker, and the call
completes with the new weights; a one-worker pool gets them from ``weights_source``. A replacement whose
start fails leaves the pool usable (#14 item 5: it used to raise ``OSError: handle is closed`` forever),
and a factory that returns None is named (#14 item 11).
"""

from __future__ import annotations

import functools
import os
import time

import pytest
import torch

from thaw_rl import SamplingParams
from thaw_rl.pool import ForkPool
from thaw_rl.pool.worker import Fault
from thaw_rl.testing import tiny_model_and_tokenizer
import pool_factories

FACTORY = functools.partial(tiny_model_and_tokenizer, "qwen2", initializer_range=0.2)
ENGINE_KWARGS = dict(kv_cache_memory=8 << 20)
PROMPT = [1, 11, 22, 33, 44, 55, 66, 77, 88, 9, 10, 12, 13, 14, 15, 16, 17, 18]  # one full block + a partial one
PARAMS = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, seed=3)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def sampled_gap(pool: ForkPool, worker: int, model) -> float:
    """Max |worker's sampling logprob - model's log_softmax| over a sampled continuation of PROMPT."""
    (h,) = pool.prefill([PROMPT], worker=worker)
    (out,) = pool.generate([h], PARAMS)
    pool.free(h)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + out.token_ids])).logits[0, len(PROMPT) - 1:-1]  # (6, V)
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
    return float((expected - torch.tensor(out.logprobs)).abs().max())


def test_distributed_weights_reach_both_workers_and_a_replacement_gets_them_from_a_peer():
    new_model, _ = tiny_model_and_tokenizer("qwen2", seed=1, initializer_range=0.2)
    with ForkPool(FACTORY, num_workers=2, engine_kwargs=ENGINE_KWARGS, weight_sync="distributed", timeout_s=60,
                  weight_bucket_bytes=64 << 10, placement="spread") as pool:
        assert sampled_gap(pool, 0, new_model) > 1e-2  # the factory's weights are not the new model's
        pool.update_weights(dict(new_model.named_parameters()), version=5)
        assert pool.version == 5 and [w["version"] for w in pool.stats()["workers"]] == [5, 5]
        assert max(sampled_gap(pool, w, new_model) for w in (0, 1)) < 1e-5
        nbytes = sum(p.numel() * p.element_size() for p in new_model.parameters())
        assert pool.stats()["weight_sync_bytes"] >= 2 * nbytes  # both workers, in more than one bucket
        with pytest.raises(ValueError, match="versions never go back"):
            pool.update_weights(new_model.state_dict(), version=4)
        with pytest.raises(ValueError, match="are missing, e.g."):
            pool.update_weights({"model.norm.weight": new_model.model.norm.weight})

        pool._set_faults(1, [Fault("generate", "kill")])
        handles = pool.fork(pool.prefill([PROMPT], worker=0)[0], 4)
        assert {h.worker for h in handles} == {0, 1}
        outs = pool.generate(handles, PARAMS)  # worker 1 dies; its share is retried on the replacement
        assert len(outs) == 4 and "killed by signal SIGKILL" in pool.stats()["failures"][-1]
        assert pool.stats()["workers"][1]["version"] == 5 and sampled_gap(pool, 1, new_model) < 1e-5
        pool.update_weights(new_model.state_dict())  # a new group with the replacement in it
        assert pool.version == 6 and sampled_gap(pool, 1, new_model) < 1e-5


@pytest.mark.slow  # four worker starts
def test_a_lone_replacement_gets_the_weights_from_weights_source():
    new_model, _ = tiny_model_and_tokenizer("qwen2", seed=2, initializer_range=0.2)
    source = {"version": 1}
    with ForkPool(FACTORY, num_workers=1, engine_kwargs=ENGINE_KWARGS, weight_sync="distributed", timeout_s=60,
                  weights_source=lambda: (source["version"], dict(new_model.named_parameters()))) as pool:
        pool.update_weights(dict(new_model.named_parameters()))
        pool._set_faults(0, [Fault("generate", "kill")])
        (h,) = pool.prefill([PROMPT])
        pool.generate([h], PARAMS)  # killed, replaced: weights version 1 from weights_source
        assert pool.stats()["workers"][0]["version"] == 1 and sampled_gap(pool, 0, new_model) < 1e-5
        source["version"] = 2  # the source moved on: a replacement must not take its weights as version 1
        pool._set_faults(0, [Fault("generate", "kill")])
        (h,) = pool.prefill([PROMPT])
        with pytest.raises(RuntimeError, match="no worker holds weights version 1 any more and weights_source gave "
                                               "version 2: call update_weights"):
            pool.generate([h], PARAMS)
        start = time.perf_counter()
        pool.update_weights(dict(new_model.named_parameters()), version=2)  # heals it
        # the stopped worker is replaced before the broadcast, which used to wait out timeout_s (60 s) for it
        assert time.perf_counter() - start < 30
        assert sampled_gap(pool, 0, new_model) < 1e-5


def test_a_replacement_that_fails_to_start_leaves_the_pool_usable(tmp_path):
    cause = tmp_path / "broken"
    factory = functools.partial(pool_factories.fails_while_file_exists, str(cause))
    with ForkPool(factory, num_workers=1, engine_kwargs=ENGINE_KWARGS, timeout_s=60) as pool:
        cause.touch()
        os.kill(pool.stats()["workers"][0]["pid"], 9)
        for _ in range(2):  # every call while the cause lasts says why, never "handle is closed"
            with pytest.raises(RuntimeError, match="could not start 1 worker.*failure cause .* is present"):
                pool.prefill([PROMPT])
        cause.unlink()
        (h,) = pool.prefill([PROMPT])  # the slot is started again
        assert len(pool.generate([h], PARAMS)[0].token_ids) == 6


def test_a_factory_that_returns_none_is_named():
    with pytest.raises(RuntimeError, match=r"model_factory .*returns_none.* returned NoneType; it must return "
                                           r"\(model, tokenizer\)"):
        ForkPool(pool_factories.returns_none, num_workers=1, start_timeout_s=120)
