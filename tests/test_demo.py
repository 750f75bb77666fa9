"""``python -m thaw_rl.demo``'s counts, and the engine's progress bar reaching its end.

The story: SmolLM2's pad id equals its eos id, so ``generate``'s padding after a finished row looked like
tokens ("flat completion tokens 2,048" for 1,382 real ones); the demo now counts each row up to and
including its first stop. The engine's bar counted sampled tokens against a total of every request's
max_tokens, so rows that stopped early left it at 67%; a finished row now counts its whole budget.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from thaw_rl import SamplingParams, ThawEngine
from thaw_rl.demo import completion_lengths
from thaw_rl.engine import engine as engine_module
from thaw_rl.testing import tiny_model_and_tokenizer

EOS = 2  # also the pad id here, as in SmolLM2


def test_rows_are_counted_up_to_their_first_stop_when_pad_equals_eos():
    new = torch.tensor([
        [5, 6, 7, 8],  # never stopped: all 4
        [5, EOS, EOS, EOS],  # stopped at the 2nd token, then padding that looks like eos
        [EOS, EOS, EOS, EOS],  # stopped at once
        [5, 6, 9, EOS],  # stopped at the last position
    ])
    assert completion_lengths(new, {EOS}) == [4, 2, 1, 4]
    assert completion_lengths(new, {EOS, 9}) == [4, 2, 1, 3]  # any stop id ends a row
    # the old count, (new != pad) | (new == eos), saw 16 tokens here
    assert int(((new != EOS) | (new == EOS)).sum()) == 16 and sum(completion_lengths(new, {EOS})) == 11


def test_completion_lengths_match_what_generate_really_produced():
    """A real generate with pad == eos: the count equals the tokens before generate's own padding."""
    model, tok = tiny_model_and_tokenizer("qwen2", initializer_range=0.2)
    model.generation_config.pad_token_id = model.generation_config.eos_token_id
    prompt = torch.tensor([[1, 5, 9, 12, 7]])
    torch.manual_seed(0)
    out = model.generate(prompt, do_sample=True, top_k=0, max_new_tokens=12, num_return_sequences=6,
                         attention_mask=torch.ones_like(prompt))
    lengths = completion_lengths(out[:, prompt.shape[1]:], {model.generation_config.eos_token_id})
    for row, n in zip(out[:, prompt.shape[1]:].tolist(), lengths):
        assert EOS not in row[: n - 1] and (n == 12 or row[n - 1] == EOS)


class RecordingBar(tqdm):
    """The engine's real tqdm bar, remembering where it stood when closed."""

    closed_at: list[tuple[int, int]] = []

    def close(self):
        RecordingBar.closed_at.append((self.n, self.total))
        super().close()


def test_the_generate_bar_reaches_its_total_when_rows_stop_early(monkeypatch):
    model, tok = tiny_model_and_tokenizer("qwen2", initializer_range=0.2)
    engine = ThawEngine(model, tok, kv_cache_memory=4 << 20)
    kids = engine.fork(engine.prefill([1, 5, 9, 12]), 8)
    monkeypatch.setattr(engine_module, "tqdm", RecordingBar)
    RecordingBar.closed_at.clear()
    outs = engine.generate(kids, SamplingParams(max_tokens=20, stop_token_ids=[5, 6, 7, 8, 9], seed=0), progress=True)
    assert any(o.finish_reason == "stop" and len(o.token_ids) < 20 for o in outs)  # some rows stopped early
    assert RecordingBar.closed_at and set(RecordingBar.closed_at) == {(8 * 20, 8 * 20)}  # tqdm may close twice
