"""ForkPool with real worker processes on CPU: the same leaves as one engine with trunks moved between
workers by snapshot/restore, placement, a killed and a hung worker replaced mid-round, a worker that
fails again after the retry, weight updates with version checks, and clean shutdown.

One 2-worker pool serves the module (a spawn start costs ~5-10 s per worker); tests that break workers
leave it healthy, and the weight test puts the original weights back.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time

import pytest
import torch

from thaw_rl import NativeBackend, SamplingParams, ThawEngine, TreeSampler, TreeSpec
from thaw_rl.backends import COUNTER_KEYS, RolloutBackend
from thaw_rl.pool import ForkPool, WeightVersionError
from thaw_rl.pool.worker import Fault
from thaw_rl.testing import tiny_model_and_tokenizer

# picklable by reference (an installed module), so spawned workers can call it
FACTORY = functools.partial(tiny_model_and_tokenizer, "qwen2", initializer_range=0.2)
ENGINE_KWARGS = dict(kv_cache_memory=8 << 20)
SEGMENTS = TreeSpec.segments([2, 3], segment_tokens=4)
ENTROPY = TreeSpec.entropy(max_leaves=6, threshold=3.7, initial=2, branch=2, segment_tokens=5)  # forks at ``at``


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def pool():
    with ForkPool(FACTORY, num_workers=2, engine_kwargs=ENGINE_KWARGS, placement="spread", timeout_s=60) as p:
        yield p


def random_prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 100, (n,), generator=g).tolist() for n in lengths]


PROMPTS = random_prompts([21, 37])  # 37 = 2 full blocks + a partial one
PARAMS = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, seed=5)


def native_rollout(spec, prompts=PROMPTS, params=PARAMS):
    return TreeSampler(NativeBackend(*FACTORY(), **ENGINE_KWARGS), spec).rollout(prompts, params)


def assert_same_leaves(got, ref) -> None:
    """Tokens and tree paths exactly; logprobs and entropies to float noise (the workers pack other
    batches into each forward than the single engine does, so the sums run in another order)."""
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert (a.prompt_index, a.node_ids, a.completion_ids, a.finish_reason) == \
               (b.prompt_index, b.node_ids, b.completion_ids, b.finish_reason)
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(a.entropies), torch.tensor(b.entropies), atol=1e-5, rtol=0)


def worker_delta(before: dict, after: dict, key: str) -> list:
    return [a[key] - b[key] for a, b in zip(after["workers"], before["workers"])]


# -- the same leaves as one engine -----------------------------------------------------------------
@pytest.mark.parametrize("spec", [TreeSpec.grpo(4), SEGMENTS, ENTROPY], ids=["grpo", "segments", "entropy"])
def test_pool_returns_the_leaves_of_one_engine_with_children_on_both_workers(pool, spec):
    assert isinstance(pool, RolloutBackend) and set(pool.counters()) == set(COUNTER_KEYS)
    ref = native_rollout(spec)
    before = pool.stats()
    batch = TreeSampler(pool, spec).rollout(PROMPTS, PARAMS)
    after = pool.stats()

    assert_same_leaves(batch, ref)
    if spec.kind == "entropy":  # it branched inside segments too, not only at the prompts
        assert batch.stats.num_forks > len(PROMPTS)
    assert all(d > 0 for d in worker_delta(before, after, "tokens_computed"))  # both workers decoded
    assert sum(worker_delta(before, after, "num_snapshots")) >= 1
    assert sum(worker_delta(before, after, "num_restores")) >= 1
    # the pool computed what the single engine computed (prompts seen before come from the workers'
    # prefix caches), and freed everything, restored copies too
    for key in ("decode_tokens", "sampled_tokens", "num_forks"):
        assert getattr(batch.stats, key) == getattr(ref.stats, key)
    assert batch.stats.prefill_tokens + batch.stats.reused_tokens == ref.stats.prefill_tokens == 21 + 37
    assert batch.stats.restore_seconds > 0 and batch.stats.snapshot_seconds > 0
    assert [w["num_used_blocks"] for w in after["workers"]] == [0, 0]
    assert [w["num_sessions"] for w in after["workers"]] == [0, 0]
    assert after["num_live_handles"] == 0 and after["num_cached_snapshots"] == 0


def test_local_first_fills_the_trunks_worker_then_snapshots_once_per_trunk(pool):
    """The trunk's worker takes children while its free blocks cover child_reserve_tokens each; the rest
    go to the other worker, which restores the trunk once and forks later children from its kept copy."""
    (h,) = pool.prefill(PROMPTS[1:], worker=0)
    free = pool.stats()["workers"][0]["num_free_blocks"]
    per_child = (free - 10) // 2  # room for 2 children (+ 10 blocks of slack for their partial blocks)
    saved = pool.placement, pool.child_reserve_tokens
    pool.placement, pool.child_reserve_tokens = "local_first", (per_child - 1) * pool.block_size
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    try:
        before = pool.stats()
        kids = pool.fork(h, 5)  # 2 fit at home; worker 1 fits 2 more; the 5th goes where most room is left
        outs = pool.generate(kids, greedy)
        more = pool.fork(h, 4)  # the kids' growth is known now: 2 at home again, 2 from worker 1's copy
        after = pool.stats()
    finally:
        pool.placement, pool.child_reserve_tokens = saved
    assert [k.worker for k in kids] == [0, 0, 1, 1, 1] and [k.worker for k in more] == [0, 0, 1, 1]
    assert worker_delta(before, after, "num_snapshots") == [1, 0]  # one snapshot of the trunk
    assert worker_delta(before, after, "num_restores") == [0, 1]  # one restore on the worker that took kids
    assert worker_delta(before, after, "num_forks") == [2, 2]
    assert all(k.token_ids == PROMPTS[1] for k in more)
    assert len({tuple(o.token_ids) for o in outs}) == 1  # a restored trunk continues exactly as the original
    for k in [h, *kids, *more]:
        pool.free(k)
    assert [w["num_used_blocks"] for w in pool.stats()["workers"]] == [0, 0]


# -- trunks between workers --------------------------------------------------------------------------
def shm_mapped_bytes(pid: int) -> int:
    """Bytes of torch shared-memory segments mapped by process ``pid`` (unlinked ones included)."""
    total = 0
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if "/dev/shm/torch_" in line:
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                total += hi - lo
    return total


def test_a_trunk_forked_across_workers_continues_exactly_like_one_forked_in_place_and_leaves_no_memory(pool):
    """Cold forks of a fresh trunk over the "host" transport: the trunk's worker gathers it straight into shared
    memory (no export copy), the other worker restores it, and its child samples the very tokens and
    logprobs of the child forked in place. Freeing the trunk releases the buffer: the parent and the
    destination map no more shared memory than before, and the source keeps one idle buffer that it reuses
    (it maps no more after three trunks than after one)."""
    assert pool.trunk_transport == "auto" and pool.stats()["trunk_transport"] == "auto"  # CPU: auto is host
    pids = [os.getpid()] + [w["pid"] for w in pool.stats()["workers"]]
    baseline = [shm_mapped_bytes(p) for p in pids]
    same_seed = [SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, seed=11)] * 2
    source_bytes = []
    for i, at in enumerate([None, 30, None]):  # at=30: children share 1 full block + 14 tokens of the trunk
        (trunk,) = pool.prefill(random_prompts([37], seed=20 + i), worker=0)
        before = pool.stats()
        kids = pool.fork(trunk, 2, at=at)  # spread: one child on each worker
        assert [k.worker for k in kids] == [0, 1]
        home, away = pool.generate(kids, same_seed)
        after = pool.stats()

        assert away.token_ids == home.token_ids and away.logprobs == home.logprobs
        assert away.entropies == home.entropies
        assert worker_delta(before, after, "num_snapshots") == [1, 0]
        assert worker_delta(before, after, "num_trunks_host") == [0, 1]
        assert worker_delta(before, after, "num_trunks_device") == [0, 0]
        moved = worker_delta(before, after, "trunk_bytes_host")[1]
        assert moved == 3 * pool.block_size * pool.kv_bytes_per_token + 4 * 100  # 3 blocks of KV, fp32 logits
        assert worker_delta(before, after, "snapshot_bytes") == [moved, 0]
        assert after["transfer"]["host"]["bytes"] - before["transfer"]["host"]["bytes"] == moved
        assert after["transfer_bytes"] - before["transfer_bytes"] == moved
        assert pool.transfer_totals()["transfer_bytes"] == after["transfer_bytes"]  # no round trip, same totals
        assert "export_seconds" not in after["workers"][0] and "export_seconds" not in after["retired"]
        assert after["workers"][0]["num_trunk_exports"] == 1  # kept while the parent may send it elsewhere
        for h in (trunk, *kids):
            pool.free(h)
        st = pool.stats()  # the release went before this request down the same pipe
        assert [w["num_trunk_exports"] for w in st["workers"]] == [0, 0]
        assert [w["num_used_blocks"] for w in st["workers"]] == [0, 0] and st["num_cached_snapshots"] == 0
        assert [shm_mapped_bytes(p) for p in pids[:1] + pids[2:]] == baseline[:1] + baseline[2:]
        source_bytes.append(shm_mapped_bytes(pids[1]) - baseline[1])
    assert st["workers"][0]["num_idle_trunk_buffers"] == 1
    # one idle buffer (1 MiB, the pool's granularity), reused for each trunk (it may be an earlier test's)
    assert source_bytes == [source_bytes[0]] * 3 and source_bytes[0] in (0, 1 << 20)


def test_the_device_transport_protocol_runs_between_cpu_workers_and_continues_exactly(pool):
    """Forced "device" on CPU workers: the source keeps its buffer and hands each destination a pickled handle
    (shared host memory standing in for CUDA IPC; the GPU run is ``benchmarks/fork_pool.py --check``)."""
    (trunk,) = pool.prefill(random_prompts([45], seed=30), worker=0)
    pool.trunk_transport = "device"
    try:
        before = pool.stats()
        kids = pool.fork(trunk, 2)
        home, away = pool.generate(kids, [SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, seed=4)] * 2)
        after = pool.stats()
    finally:
        pool.trunk_transport = "auto"
    assert [k.worker for k in kids] == [0, 1]
    assert away.token_ids == home.token_ids and away.logprobs == home.logprobs
    assert worker_delta(before, after, "num_trunks_device") == [0, 1]
    assert worker_delta(before, after, "num_trunks_host") == [0, 0]
    assert after["transfer"]["device"]["bytes"] - before["transfer"]["device"]["bytes"] == \
        3 * pool.block_size * pool.kv_bytes_per_token + 4 * 100
    assert after["workers"][0]["num_trunk_exports"] == 1
    for h in (trunk, *kids):
        pool.free(h)
    st = pool.stats()
    assert [w["num_trunk_exports"] for w in st["workers"]] == [0, 0]
    assert [w["num_used_blocks"] for w in st["workers"]] == [0, 0]


def test_device_trunks_reuse_the_sources_buffers_each_opened_once_and_a_replaced_source_is_forgotten(pool):
    """Forced "device" on CPU workers, cold forks of fresh trunks: the source keeps its export buffers and the
    destination keeps them open, so after the first round no buffer is allocated and no handle sent; two
    trunks held at once take two buffers (neither overwrites the other) and both are reused afterwards. When
    the source dies, its replacement has new buffers (a new owner) and the destination closes the dead one's."""
    same_seed = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, seed=9)

    def cold_forks(seeds):
        trunks = pool.prefill(random_prompts([40] * len(seeds), seed=seeds[0]), worker=0)
        kids = [pool.fork(t, 4) for t in trunks]  # spread: children on both workers; every export held
        for ks in kids:
            assert {k.worker for k in ks} == {0, 1}
            outs = pool.generate(ks, [same_seed] * 4)  # one seed: in place or restored, the same samples
            assert all(o.token_ids == outs[0].token_ids for o in outs)  # (logprobs: to the batch's float noise)
            torch.testing.assert_close(torch.tensor([o.logprobs for o in outs]),
                                       torch.tensor([outs[0].logprobs] * 4), atol=1e-5, rtol=0)
        for h in [*trunks, *(k for ks in kids for k in ks)]:
            pool.free(h)

    keys = ("num_export_allocs", "num_export_handles", "num_import_opens", "num_import_reuses", "num_trunks_device")
    pool.trunk_transport = "device"
    try:
        cold_forks([40])
        cold_forks([41, 42])  # two exports held at once: two buffers
        before = pool.stats()
        for seed in (43, 45):
            cold_forks([seed, seed + 1])
        after = pool.stats()
        owner = pool.stats()["workers"][0]  # the source's buffers, as the destination has them open
        opened = pool._workers[1].status["trunk_buffers_open"]
        old_owner = pool._workers[0].info["trunk_owner"]
        assert owner["num_export_buffers"] == 2 and sorted(b for o, b in opened if o == old_owner) == [1, 2]

        pool._set_faults(0, [Fault("snapshot", "kill")])  # the source dies taking the next export
        (trunk,) = pool.prefill(random_prompts([40], seed=50), worker=0)
        kids = pool.fork(trunk, 2)  # retried: trunk prefilled again on the replacement, exported from there
        home, away = pool.generate(kids, [same_seed] * 2)
        for h in (trunk, *kids):
            pool.free(h)
        st = pool.stats()
    finally:
        pool.trunk_transport = "auto"
    for key in keys:  # two rounds of two trunks: four cross-worker forks from the two kept buffers
        want = {"num_trunks_device": [0, 4], "num_import_reuses": [0, 4]}.get(key, [0, 0])
        assert worker_delta(before, after, key) == want, key
    assert away.token_ids == home.token_ids and away.logprobs == home.logprobs
    new_owner = pool._workers[0].info["trunk_owner"]
    assert new_owner != old_owner and "during snapshot" in st["failures"][-1]
    assert pool._workers[1].status["trunk_buffers_open"] == [(new_owner, 1)]  # the dead source's buffers closed
    assert [w["num_trunk_exports"] for w in st["workers"]] == [0, 0]
    assert [w["num_used_blocks"] for w in st["workers"]] == [0, 0]


def test_trunk_transport_is_checked_before_any_worker_starts():
    with pytest.raises(ValueError, match=r"trunk_transport='ipc': use one of \('auto', 'host', 'device'\)"):
        ForkPool(FACTORY, num_workers=2, trunk_transport="ipc")
    with pytest.raises(ValueError, match=r"'device' needs every worker on one kind of device, but they are on "
                                         r"\['cpu', 'cuda'\]; use 'auto'"):
        ForkPool(FACTORY, num_workers=2, devices=["cpu", "cuda:0"], trunk_transport="device")


def test_auto_picks_the_device_transport_only_between_cuda_workers():
    from thaw_rl.pool.trunk_export import pick_transport

    assert pick_transport("auto", "cuda:0", ["cuda:0"]) == "device"  # two workers on one GPU: CUDA IPC
    assert pick_transport("auto", "cuda:0", ["cuda:1", "cuda:0"]) == "device"  # peer copy to the other GPU
    assert pick_transport("auto", "cuda:0", ["cuda:1", "cpu"]) == "host"
    assert pick_transport("auto", "cpu", ["cpu"]) == "host"
    assert pick_transport("host", "cuda:0", ["cuda:1"]) == "host"


# -- failures ----------------------------------------------------------------------------------------
def test_a_worker_killed_mid_round_is_replaced_and_the_round_completes(pool, caplog):
    ref = native_rollout(SEGMENTS)
    victim = pool.stats()["workers"][1]["pid"]
    pool._set_faults(1, [Fault("generate", "sleep", 120)])  # hold it inside the round's first generate
    killer = threading.Timer(1.0, os.kill, (victim, signal.SIGKILL))
    killer.start()
    start = time.perf_counter()
    batch = TreeSampler(pool, SEGMENTS).rollout(PROMPTS, PARAMS)
    elapsed = time.perf_counter() - start
    killer.join()

    assert_same_leaves(batch, ref)  # its sequences were prefilled again on the replacement and retried
    assert elapsed < pool.timeout_s  # seen through the process sentinel, not the timeout
    st = pool.stats()
    assert st["workers"][1]["pid"] != victim
    assert f"ForkPool worker 1 (pid {victim}, cpu) was killed by signal SIGKILL" in st["failures"][-1]
    assert "replacing it with a fresh worker" in caplog.text
    assert_same_leaves(TreeSampler(pool, SEGMENTS).rollout(PROMPTS, PARAMS), ref)  # and it keeps working


@pytest.mark.parametrize("transport", ["auto", pytest.param("device", marks=pytest.mark.slow)])
def test_a_worker_that_dies_taking_a_restored_trunk_is_replaced_and_the_fork_retried(pool, transport):
    """Worker 1 dies on the round's first fork (a restore of prompt 0's trunk): the replacement restores the
    export the parent still holds ("device": with a handle the source hands out on request, as the dead
    worker's went with it), and prompt 1's root, which lived in the dead worker, is prefilled again."""
    ref = native_rollout(SEGMENTS)
    before = pool.counters()
    pool._set_faults(1, [Fault("fork", "kill")])
    pool.trunk_transport = transport
    try:
        batch = TreeSampler(pool, SEGMENTS).rollout(PROMPTS, PARAMS)
    finally:
        pool.trunk_transport = "auto"

    assert_same_leaves(batch, ref)
    st = pool.stats()
    assert "was killed by signal SIGKILL" in st["failures"][-1] and "during fork" in st["failures"][-1]
    assert st["workers"][1]["num_restores"] >= 1  # the replacement restored the trunk
    used = "device" if transport == "device" else "host"
    assert st["workers"][1][f"num_trunks_{used}"] == st["workers"][1]["num_restores"]
    assert [w["num_trunk_exports"] for w in st["workers"]] == [0, 0]  # every export released
    after = pool.counters()
    assert all(after[k] >= before[k] for k in after)  # the dead worker's counts are kept
    assert [w["num_used_blocks"] for w in st["workers"]] == [0, 0]


def test_a_hung_worker_is_detected_by_the_timeout_and_replaced(pool):
    ref = native_rollout(TreeSpec.grpo(4))
    victim = pool.stats()["workers"][0]["pid"]
    pool._set_faults(0, [Fault("generate", "sleep", 120)])
    pool.timeout_s = 3.0
    try:
        start = time.perf_counter()
        batch = TreeSampler(pool, TreeSpec.grpo(4)).rollout(PROMPTS, PARAMS)
        elapsed = time.perf_counter() - start
    finally:
        pool.timeout_s = 60.0
    assert_same_leaves(batch, ref)
    assert 3.0 <= elapsed < 60.0  # waited the timeout, then a fresh worker (a spawn start) did the work
    failure = pool.stats()["failures"][-1]
    assert f"worker 0 (pid {victim}, cpu) sent no reply within timeout_s=3 (hung); killed it during generate" in failure
    assert not os.path.exists(f"/proc/{victim}")  # killed and reaped, no zombie


def test_a_worker_that_fails_again_after_the_retry_raises_a_clear_error_and_the_pool_recovers(pool):
    pool._set_faults(1, [Fault("generate", "exit", 3)], persist=True)  # every replacement dies too
    with pytest.raises(RuntimeError, match=r"ForkPool generate failed twice: ForkPool worker 1 \(pid \d+, cpu\) "
                                           r"exited with code 3 during generate \(first attempt: .*exited with code 3"):
        TreeSampler(pool, TreeSpec.grpo(2)).rollout(PROMPTS, PARAMS)
    pool._set_faults(1, [])  # disarm the current replacement (and future ones)
    st = pool.stats()
    assert st["num_live_handles"] == 0 and [w["num_sessions"] for w in st["workers"]] == [0, 0]
    assert_same_leaves(TreeSampler(pool, TreeSpec.grpo(2)).rollout(PROMPTS, PARAMS), native_rollout(TreeSpec.grpo(2)))


# -- weights -------------------------------------------------------------------------------------------
def test_weight_update_reaches_every_worker_and_stale_versions_are_refused(pool):
    prompt = random_prompts([40], seed=3)[0]  # 2 full blocks: a stale prefix cache would be reused
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    def greedy_on(worker: int) -> list[int]:
        (h,) = pool.prefill([prompt], worker=worker)
        (out,) = pool.generate([h], greedy)
        pool.free(h)
        return out.token_ids

    before = [greedy_on(0), greedy_on(1)]
    assert before[0] == before[1]
    new_model, tok = tiny_model_and_tokenizer("qwen2", seed=1, initializer_range=0.2)
    engine = ThawEngine(new_model, tok, **ENGINE_KWARGS)
    (expected,) = engine.generate([engine.prefill(prompt)], greedy)
    v = pool.version
    pool.update_weights(new_model.state_dict())

    assert pool.version == v + 1
    after = [greedy_on(0), greedy_on(1)]
    assert after == [expected.token_ids] * 2 and after[0] != before[0]
    assert [w["version"] for w in pool.stats()["workers"]] == [v + 1] * 2
    for w in range(2):  # a request that expects the old weights is refused, not served
        with pytest.raises(WeightVersionError, match=f"expected weights version {v} .* holds version {v + 1}"):
            pool._workers[w].call("prefill", ([prompt],), version=v, timeout_s=30)
    with pytest.raises(ValueError, match="pass the new weights"):
        pool.update_weights()
    with pytest.raises(ValueError, match="not in the workers' model"):
        pool.update_weights({"not.a.weight": torch.zeros(1)})

    victim = pool.stats()["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)  # a replacement starts with the current weights
    assert greedy_on(0) == expected.token_ids
    assert pool.stats()["workers"][0]["version"] == v + 1

    pool.update_weights(FACTORY()[0].state_dict())  # the original weights back for the other tests
    assert [greedy_on(0), greedy_on(1)] == before and pool.version == v + 2


# -- lifetime --------------------------------------------------------------------------------------------
def test_a_factory_that_raises_is_reported_and_close_reaps_every_worker():
    with pytest.raises(RuntimeError, match=r"could not start 1 worker\(s\): worker 0 on cpu: tiny_model family"):
        ForkPool(functools.partial(tiny_model_and_tokenizer, "gpt2"), num_workers=1, start_timeout_s=120)

    pool = ForkPool(FACTORY, num_workers=1, engine_kwargs=ENGINE_KWARGS)
    (h,) = pool.prefill(PROMPTS[:1])
    process = pool._workers[0].process
    pool.close()
    assert process.exitcode == 0 and not os.path.exists(f"/proc/{process.pid}")  # exited cleanly, reaped
    pool.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        pool.generate([h], PARAMS)


def test_cascade_attention_runs_in_the_workers_and_is_counted():
    """engine_kwargs reach the workers' engines: with cascade_attention="on" (the torch reference on CPU) a GRPO
    rollout's decode steps read each group's shared prompt blocks once, the pool's counters say how many steps
    did, and the leaves are the in-process engine's with the same setting."""
    kwargs = dict(ENGINE_KWARGS, cascade_attention="on")
    spec = TreeSpec.grpo(3)
    ref = TreeSampler(NativeBackend(*FACTORY(), **kwargs), spec).rollout(PROMPTS, PARAMS)
    assert ref.stats.cascade_steps > 0
    with ForkPool(FACTORY, num_workers=1, engine_kwargs=kwargs, timeout_s=60) as pool:
        batch = TreeSampler(pool, spec).rollout(PROMPTS, PARAMS)
        assert pool.counters()["cascade_steps"] == batch.stats.cascade_steps > 0
    assert_same_leaves(batch, ref)


def test_an_fp8_trunk_moves_between_workers_and_continues_exactly():
    """kv_cache_dtype="fp8" in the workers' engines: a trunk's FP8 blocks go to the other worker through shared
    memory (half the bytes of the fp32 pool's) and its child there samples the tokens and logprobs of the child
    forked in place."""
    kwargs = dict(ENGINE_KWARGS, kv_cache_dtype="fp8")
    with ForkPool(FACTORY, num_workers=2, engine_kwargs=kwargs, placement="spread", timeout_s=60) as pool:
        assert pool.kv_bytes_per_token * 4 == NativeBackend(*FACTORY(), **ENGINE_KWARGS).kv_bytes_per_token
        (trunk,) = pool.prefill(random_prompts([37], seed=40), worker=0)
        before = pool.stats()
        kids = pool.fork(trunk, 2)
        assert [k.worker for k in kids] == [0, 1]
        home, away = pool.generate(kids, [SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, seed=3)] * 2)
        after = pool.stats()
        assert away.token_ids == home.token_ids and away.logprobs == home.logprobs
        assert worker_delta(before, after, "trunk_bytes_host")[1] == 3 * pool.block_size * pool.kv_bytes_per_token + 400
