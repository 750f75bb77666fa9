"""The engine under misuse found by trying it as a new user would: threads sharing a model, sliding windows."""

from __future__ import annotations

import sys
import threading

import torch

from thaw_rl import SamplingParams, ThawEngine
from thaw_rl.testing import tiny_model_and_tokenizer

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def padded_logits(model) -> torch.Tensor:
    """An ordinary left-padded batch forward, as training runs it: (2, 6, V)."""
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


# -- two engines on one model, two threads --------------------------------------------------------------
def test_two_engines_on_one_model_in_two_threads_are_serialized_and_restore_the_model():
    model, tok = tiny_model_and_tokenizer("qwen2")
    reference = padded_logits(model)
    prompts = [[5 + i, 6, 7, 8 + i] for i in range(3)]
    alone = ThawEngine(model, tok, kv_cache_memory=4 << 20)
    expected = [o.token_ids for o in alone.generate(alone.prefill_many(prompts), GREEDY)]
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            engine = ThawEngine(model, tok, kv_cache_memory=4 << 20)
            runs = []
            for _ in range(6):
                sessions = engine.prefill_many(prompts)
                runs.append([o.token_ids for o in engine.generate(sessions, GREEDY)])
                for s in sessions:
                    engine.free(s)
            results[index] = runs
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: without the lock the config swaps interleave every run
    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    assert all(run == expected for runs in results.values() for run in runs)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(padded_logits(model), reference)
