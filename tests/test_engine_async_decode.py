"""The async decode loop (inputs made on the device, tokens read one step late) against synchronous steps.

``ThawEngine.async_decode = False`` runs every step synchronously, as the engine did before the loop
existed; each test runs the same calls both ways on CPU and requires the same tokens, logprobs,
entropies, finish reasons, per-session state and engine stats. Block *ids* may differ: a row that
stopped is found one step late, after a block was taken for its next token; that block is released
(the tests check the count of blocks held and their refcounts), but the free order changes which id
a later allocation gets.
"""

from __future__ import annotations

import pytest
import torch

from thaw_rl import SamplingParams, ThawEngine
from thaw_rl.engine.block_manager import BlockManager
from thaw_rl.engine.decode_batch import DecodeBatch, LateTokens
from thaw_rl.engine.engine import DecodeProfile
from thaw_rl.engine.session import Session
from thaw_rl.testing import tiny_model_and_tokenizer


def _prompts(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]


def _run(model, tok, async_decode: bool, params, lengths=(3, 7, 12, 5), n_fork=3, **engine_kwargs):
    """prefill, fork some, generate all; returns everything observable except block ids, and the profile."""
    engine = ThawEngine(model, tok, block_size=4, **engine_kwargs)
    engine.async_decode = async_decode
    engine.decode_profile = DecodeProfile()
    sessions = engine.prefill_many(_prompts(lengths, model.config.vocab_size))
    rows = engine.fork(sessions[1], n_fork) + engine.fork(sessions[2], 2, at=9) + sessions
    out = engine.generate(rows, params)
    bm = engine.block_manager
    seen = {
        "completions": [(c.token_ids, c.logprobs, c.entropies, c.finish_reason) for c in out],
        "sessions": [(s.token_ids, s.num_computed, s.block_hashes, len(s.block_table)) for s in rows],
        "stats": {k: v for k, v in vars(engine.stats).items() if k != "fork_seconds"},
        "refcounts": sorted(bm.ref_count(b) for s in rows for b in s.block_table),
    }
    for s in rows:  # every block comes back: nothing leaked by a dropped speculative token
        assert len(s.block_table) == bm.blocks_for(s.num_computed)
        engine.free(s)
    assert bm.num_used_blocks == 0
    return seen, engine.decode_profile


def _check_same(model, tok, params, later_joins=False, preempts=False, **kwargs):
    """Same tokens, finish reasons, sessions, stats and refcounts both ways; returns the sync run's record.

    ``later_joins``: rows wait for a place in the step (max_num_seqs); a row that stops frees its place one
    step late, so the waiting row behind it starts a step later and the call may take more forwards.
    ``preempts``: the pool runs out. The async loop stops when the free blocks cannot cover a whole step, the
    synchronous steps when no single row fits, so they preempt (in bulk) after different steps and the call's
    forward count may differ either way; tokens, preemptions and the rest are the same.
    """
    sync, sync_prof = _run(model, tok, False, params, **kwargs)
    asyn, prof = _run(model, tok, True, params, **kwargs)
    if later_joins:
        assert asyn["stats"]["num_forward_steps"] >= sync["stats"]["num_forward_steps"]
    if later_joins or preempts:
        asyn["stats"]["num_forward_steps"] = sync["stats"]["num_forward_steps"]
    assert sync_prof.steps == 0 and prof.steps > 0  # the two paths really differ
    for (t, lp, ent, why), (t2, lp2, ent2, why2) in zip(asyn["completions"], sync["completions"]):
        assert t == t2 and why == why2
        # A stopped row rides one extra step, so a step's batch can hold a row more than before, and CPU
        # matmuls are not batch-invariant in the last bits (nor were preemption or graph padding): values
        # agree to float32 noise, tokens exactly.
        torch.testing.assert_close(torch.tensor([lp, ent]), torch.tensor([lp2, ent2]), rtol=0, atol=1e-5)
    assert {k: v for k, v in asyn.items() if k != "completions"} == {k: v for k, v in sync.items() if k != "completions"}
    return sync, prof


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_seeded_sampling_with_early_stops_matches_synchronous_steps(family, one_torch_thread):
    model, tok = tiny_model_and_tokenizer(family)
    # Many stop ids: rows stop at different steps, each found one step late by the async loop.
    params = SamplingParams(temperature=1.0, max_tokens=14, seed=11, stop_token_ids=list(range(10, 18)))
    seen, _ = _check_same(model, tok, params)
    reasons = [c[3] for c in seen["completions"]]
    assert "stop" in reasons and "length" in reasons
    stop_lengths = {len(c[0]) for c in seen["completions"] if c[3] == "stop"}
    assert len(stop_lengths) > 1  # stops at several different steps


def test_without_stops_the_batches_match_and_everything_is_bitwise_equal(one_torch_thread):
    """No row stops early, so every async step holds exactly the rows of the sync step: logprobs and
    entropies are bitwise equal too (the device-made inputs are the host-built ones)."""
    model, tok = tiny_model_and_tokenizer("llama")
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=2, ignore_eos=True)
    sync, _ = _run(model, tok, False, params)
    asyn, prof = _run(model, tok, True, params)
    assert prof.steps > 0 and asyn == sync
    # one run of the loop; its per-call parts are parts of the summed phases, all inside the loop's time
    assert prof.runs == 1 and 0 < prof.first_prepare <= prof.prepare and 0 < prof.last_process <= prof.process
    assert prof.prepare + prof.launch + prof.process + prof.wait <= prof.loop


def test_rows_join_as_others_finish_under_max_num_seqs(one_torch_thread):
    """More rows than one step holds: waiting rows join the device batch when rows leave it."""
    model, tok = tiny_model_and_tokenizer("qwen2")
    params = [SamplingParams(temperature=1.0, max_tokens=3 + 2 * i, seed=i, stop_token_ids=[20, 21]) for i in range(9)]
    _, prof = _check_same(model, tok, params, later_joins=True, max_num_seqs=3)
    assert prof.rows / prof.steps <= 3


def test_greedy_filtered_and_plain_rows_in_one_call(one_torch_thread):
    model, tok = tiny_model_and_tokenizer("llama")
    kinds = [SamplingParams(temperature=0.0, max_tokens=10),
             SamplingParams(temperature=0.8, top_k=5, max_tokens=10, seed=1),
             SamplingParams(temperature=1.2, top_p=0.7, max_tokens=10, seed=2, stop_token_ids=[30, 31, 32]),
             SamplingParams(temperature=1.0, min_p=0.1, max_tokens=10, seed=3)]
    _check_same(model, tok, [kinds[i % 4] for i in range(9)])


def test_a_pool_too_small_for_all_rows_preempts_as_before(one_torch_thread):
    """The async loop stops when free blocks cannot cover a step; the engine preempts, the loop resumes."""
    model, tok = tiny_model_and_tokenizer("qwen3")
    engine = ThawEngine(model, tok, block_size=4)
    params = SamplingParams(temperature=1.0, max_tokens=24, seed=5, ignore_eos=True)
    kv = 26 * engine.spec.bytes_per_block
    seen, _ = _check_same(model, tok, params, preempts=True, lengths=(6, 9, 12), n_fork=4, kv_cache_memory=kv)
    assert seen["stats"]["num_preemptions"] > 0


def test_rows_needing_three_pools_run_in_waves_in_the_async_loop_not_one_preemption_a_step(one_torch_thread):
    """64 GRPO rows (8 prompts of 32 tokens x 8) whose tails need ~3x the pool left beside the prompts: the engine
    preempts in bulk (enough for the rest to reach max_tokens) and holds the victims back until those are done,
    so the call runs in ~3 waves of async steps, and a re-admitted row takes its group's prompt from the cache
    instead of recomputing it. Before (one victim per exhaustion, recomputed at once): 258 forward steps, mostly
    synchronous, and 288 prompt tokens recomputed; here <= 4 x max_tokens, >= 85% async, none. Tokens equal an
    engine with room for every row."""
    model, tok = tiny_model_and_tokenizer("qwen2")
    prompts = _prompts([32] * 8, model.config.vocab_size, seed=3)
    params = SamplingParams(temperature=1.0, max_tokens=40, ignore_eos=True, seed=7)

    def run(usable_blocks):
        bytes_per_block = ThawEngine(model, tok, block_size=4, kv_cache_memory=1 << 20).spec.bytes_per_block
        engine = ThawEngine(model, tok, block_size=4, kv_cache_memory=(usable_blocks + 1) * bytes_per_block)
        engine.decode_profile = DecodeProfile()
        rows = [kid for s in engine.prefill_many(prompts) for kid in engine.fork(s, 8)]
        return [o.token_ids for o in engine.generate(rows, params)], engine

    expected, roomy = run(8 * 8 + 64 * 11)
    assert roomy.stats.num_preemptions == 0 and roomy.stats.prompt_tokens_computed == 8 * 32
    tokens, tight = run(8 * 8 + int(0.35 * 64 * 10))  # the prompts + 35% of the tails' blocks
    assert tokens == expected
    steps, async_steps = tight.stats.num_forward_steps, tight.decode_profile.steps
    assert tight.stats.num_preemptions > 0 and steps <= 4 * params.max_tokens and async_steps >= 0.85 * steps
    assert tight.stats.prompt_tokens_computed == 8 * 32  # the prefill's; no prompt computed again


def test_a_repetition_penalty_keeps_the_synchronous_path(one_torch_thread):
    model, tok = tiny_model_and_tokenizer("qwen2")
    params = SamplingParams(temperature=1.0, max_tokens=6, seed=1, repetition_penalty=1.3)
    _, prof = _run(model, tok, True, params)
    assert prof.steps == 0


def test_greedy_async_equals_model_generate(one_torch_thread):
    model, tok = tiny_model_and_tokenizer("qwen3")
    prompt = _prompts([11], model.config.vocab_size, seed=4)[0]
    engine = ThawEngine(model, tok, block_size=4)
    engine.decode_profile = DecodeProfile()
    (out,) = engine.generate([engine.prefill(prompt)], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, len(prompt):].tolist()
    assert out.token_ids == ref and engine.decode_profile.steps == 19  # the first token comes from prefill logits


# -- the pieces, without a model ---------------------------------------------------------------------------
def test_decode_batch_advances_keeps_joins_and_writes_blocks_on_the_device():
    params = SamplingParams(temperature=1.0)
    batch = DecodeBatch(torch.device("cpu"), block_size=4, vocab_size=50)
    batch.advance(None, [], [(7, 3, [1], params, 10), (8, 8, [2, 3, 4], params, 11), (9, 4, [5], params, 12)],
                  [(2, 1, 6)])  # row 2 (position 4) starts block column 1
    assert batch.input_ids.tolist() == [7, 8, 9] and batch.positions.tolist() == [3, 8, 4]
    assert batch.block_tables.tolist() == [[1, 0, 0], [2, 3, 4], [5, 6, 0]]
    assert batch.sampling_for_step().positions.tolist() == [4, 9, 5]
    assert batch.sampling.seeds.tolist() == [10, 11, 12]
    # rows 0 and 2 stay, computing what they sampled one position on; a fourth row joins
    batch.advance(torch.tensor([17, 18, 19]), [0, 2], [(20, 0, [9], params, 13)], [(0, 1, 7)])
    assert batch.input_ids.tolist() == [17, 19, 20] and batch.positions.tolist() == [4, 5, 0]
    assert batch.block_tables.tolist() == [[1, 7, 0], [5, 6, 0], [9, 0, 0]]
    assert batch.sampling.seeds.tolist() == [10, 12, 13] and batch.num_rows == 3
    # all stay: no gather, positions advance; a write past the capacity widens the tables
    batch.advance(torch.tensor([27, 29, 30]), [0, 1, 2], [], [(1, 3, 8)])
    assert batch.input_ids.tolist() == [27, 29, 30] and batch.positions.tolist() == [5, 6, 1]
    assert batch.block_tables[:, :4].tolist() == [[1, 7, 0, 0], [5, 6, 0, 8], [9, 0, 0, 0]]


def test_late_tokens_round_trip_exactly():
    tokens = torch.tensor([0, 151935, 7])
    logprobs = torch.tensor([-0.1, -12.345678, 0.0])
    entropies = torch.tensor([1.5, 0.25, 3.3])
    t, lp, ent = LateTokens(tokens, logprobs, entropies).wait()
    assert t == tokens.tolist() and lp == logprobs.tolist() and ent == entropies.tolist()


def test_trim_releases_the_blocks_past_the_computed_tokens_tail_first():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = Session(engine_id=0, token_ids=list(range(9)), num_prompt_tokens=9)
    bm.allocate(s, 12)  # blocks 1, 2, 3
    s.num_computed = 8  # two full blocks: block 3 was taken for a token that never came
    bm.trim(s)
    assert s.block_table == [1, 2] and bm.ref_count(3) == 0 and bm.num_free_blocks == 5
    bm.trim(s)  # nothing more to release
    assert s.block_table == [1, 2]
    t = Session(engine_id=0, token_ids=list(range(2)), num_prompt_tokens=2)
    bm.allocate(t, 4)
    assert t.block_table == [4]  # fresh blocks first; block 3 waits in the freed queue


def test_graph_sizes_cover_every_batch_up_to_2048_rows_with_little_padding():
    from thaw_rl.engine.cuda_graphs import _batch_sizes

    sizes = _batch_sizes(2048)
    assert sizes[:4] == [1, 2, 4, 8] and sizes[-1] == 2048 and len(sizes) <= 90
    for n in range(1, 2049):
        padded = next(s for s in sizes if s >= n)
        assert padded - n < max(8, n // 16 + 1), (n, padded)
    assert _batch_sizes(256) == [1, 2, 4] + list(range(8, 257, 8))  # unchanged below 256
    assert _batch_sizes(300)[-1] == 300 and _batch_sizes(3) == [1, 2, 3]


def test_seeded_tokens_are_those_the_engine_drew_before_the_async_loop(one_torch_thread):
    """Recorded from the synchronous engine before this loop existed (main at 61246e0), same call: a seeded
    batch with stop ids (rows stop at different steps), then one greedy and one top-k/top-p row."""
    model, tok = tiny_model_and_tokenizer("qwen2")
    engine = ThawEngine(model, tok, block_size=4)
    g = torch.Generator().manual_seed(1)
    sessions = engine.prefill_many([torch.randint(4, 100, (n,), generator=g).tolist() for n in (3, 9, 14)])
    out = engine.generate(engine.fork(sessions[1], 3) + sessions,
                          SamplingParams(temperature=0.9, max_tokens=16, seed=7, stop_token_ids=list(range(10, 16))))
    out += engine.generate(engine.fork(sessions[0], 2), [
        SamplingParams(temperature=0.0, max_tokens=8),
        SamplingParams(temperature=1.0, top_k=8, top_p=0.9, max_tokens=8, seed=3)])
    assert [(c.token_ids, c.finish_reason) for c in out] == [
        ([35, 99, 93, 34, 0, 48, 94, 46, 40, 8, 90, 31, 61, 6, 35, 87], "length"),
        ([44, 35, 55, 68, 45, 69, 90, 70, 81, 19, 22, 48, 90, 26, 79, 29], "length"),
        ([32, 68, 30, 50, 21, 23, 40, 7, 37, 13], "stop"),
        ([1, 69, 47, 71, 70, 69, 14], "stop"),
        ([12], "stop"),
        ([29, 73, 0, 43, 82, 61, 90, 89, 82, 19, 11], "stop"),
        ([14] * 8, "length"),
        ([44, 26, 41, 58, 92, 79, 44, 44], "length"),
    ]
