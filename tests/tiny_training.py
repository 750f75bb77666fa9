"""What the trainer tests and their torchrun workers share: prompts, a reward with spread, and the fields
of a tiny CPU training run (a few steps of a random tiny model, so nothing here depends on learning)."""

from __future__ import annotations

PROMPTS = ["abc", "hello there", "xyz 12", "the cat sat on"]
# the torchrun workers: 6 prompts, so 2 ranks x 1 prompt per step never run out within their steps
WORKER_PROMPTS = ["abc", "hello there", "xyz 12", "the cat sat", "one two", "q"]


def reward_chars(completions, **kwargs):
    """A deterministic reward with spread across samples (so group advantages are not all zero)."""
    return [float(sum(map(ord, c)) % 7) for c in completions]


def tiny_training_fields(output_dir, **overrides) -> dict:
    """Training-config fields of a tiny CPU run: 4 rows of 4 samples, 8 new tokens, no saving or logging out."""
    fields = dict(output_dir=str(output_dir), use_cpu=True, bf16=False, report_to="none",
                  per_device_train_batch_size=4, num_generations=4, max_completion_length=8, logging_steps=1,
                  save_strategy="no", gradient_checkpointing=False, learning_rate=1e-2, seed=0)
    fields.update(overrides)
    return fields
