"""Worker for test_trainers.py's 2-process run (not a test module: it defines no tests).

    python -m torch.distributed.run --nproc_per_node 2 tests/test_trainers_distributed_worker.py OUT_DIR

Each rank trains ThawGRPOTrainer for 2 steps on CPU (gloo) and writes ``OUT_DIR/rank{r}.json`` with its
own rollouts' numbers (prompts, prompt tokens prefilled) and the trainer's log history, so the test can
check that the logged ``thaw/...`` metrics are sums over both ranks.
"""

from __future__ import annotations

import json
import os
import sys


class _Recorder:
    """Mixin: keep this rank's rollout numbers per generation."""

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        stats = self.last_rollout.stats
        self.local_rollouts.append({
            "prompts": [leaf.prompt_ids for leaf in self.last_rollout.leaves[:: self.num_generations]],
            "prefill_tokens": stats.prefill_tokens,
            "flat_prefill_tokens": stats.flat_prefill_tokens,
            "completion_tokens": stats.completion_tokens,
        })
        return output


def main(out_dir: str):
    import torch
    from datasets import Dataset

    from thaw_rl.testing import tiny_model_and_tokenizer
    from tiny_training import WORKER_PROMPTS, reward_chars, tiny_training_fields
    from thaw_rl.trainers import ThawGRPOConfig, ThawGRPOTrainer

    class RecordingTrainer(_Recorder, ThawGRPOTrainer):
        local_rollouts: list

    torch.set_num_threads(1)
    model, tokenizer = tiny_model_and_tokenizer("qwen2")
    dataset = Dataset.from_dict({"prompt": WORKER_PROMPTS})

    args = ThawGRPOConfig(**tiny_training_fields(os.path.join(out_dir, "trainer"), max_steps=2,
                                                 kv_cache_memory=8 * 2**20, seed=3))
    trainer = RecordingTrainer(model=model, reward_funcs=reward_chars, args=args, train_dataset=dataset,
                               processing_class=tokenizer)
    trainer.local_rollouts = []
    trainer.train()
    rank = trainer.accelerator.process_index
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world_size": trainer.accelerator.num_processes,
                   "rollouts": trainer.local_rollouts, "log_history": trainer.state.log_history}, f)
    return trainer  # kept alive by the caller until os._exit


if __name__ == "__main__":
    _trainer = main(sys.argv[1])
    # leave without destructors: freeing the DDP model's gloo process group can deadlock (see thaw_rl.train._exit)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
