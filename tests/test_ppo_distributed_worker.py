"""Worker for test_ppo.py's 2-process run (not a test module: it defines no tests).

    python -m torch.distributed.run --nproc_per_node 2 tests/test_ppo_distributed_worker.py OUT_DIR

Each rank trains ThawPPOTrainer on CPU (gloo) for 2 rollouts x 2 PPO epochs and writes
``OUT_DIR/rank{r}.json``: the prompts it rolled out, checksums of the policy and value head before and
after training, and the trainer's log history, so the test can check that the ranks sampled different
prompts but ended with identical weights.
"""

from __future__ import annotations

import json
import os
import sys


def checksums(trainer) -> dict[str, float]:
    def total(module):
        return sum(float(p.detach().double().sum()) for p in module.parameters())

    return {"policy": total(trainer.policy_and_value.policy), "value_head": total(trainer.value_head)}


def optimizer_has(trainer, module) -> bool:
    """Whether every parameter of ``module`` is in the optimizer (the DDP-prepared one, unwrapped by accelerate)."""
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    return all(id(p) in optimized for p in module.parameters())


def main(out_dir: str):
    import torch
    from datasets import Dataset

    from thaw_rl.testing import tiny_model_and_tokenizer
    from tiny_training import WORKER_PROMPTS, reward_chars, tiny_training_fields
    from thaw_rl.trainers import ThawPPOConfig, ThawPPOTrainer

    torch.set_num_threads(1)
    model, tokenizer = tiny_model_and_tokenizer("qwen2")
    names = [n for n, _ in model.named_parameters()]
    dataset = Dataset.from_dict({"prompt": WORKER_PROMPTS})

    args = ThawPPOConfig(**tiny_training_fields(os.path.join(out_dir, "trainer"), max_steps=4, kv_cache_memory=8 * 2**20,
                                                seed=3, num_mini_batches=1, num_ppo_epochs=2))
    trainer = ThawPPOTrainer(model=model, reward_funcs=reward_chars, args=args, train_dataset=dataset,
                             processing_class=tokenizer)
    prompts = []
    generate = trainer._generate_and_score_completions

    def recording(inputs):
        output = generate(inputs)
        prompts.append([leaf.prompt_ids for leaf in trainer.last_rollout.leaves[:: trainer.num_generations]])
        return output

    trainer._generate_and_score_completions = recording
    initial = checksums(trainer)
    trainer.train()
    rank = trainer.accelerator.process_index
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world_size": trainer.accelerator.num_processes, "prompts": prompts,
                   "initial_checksums": initial, "checksums": checksums(trainer),
                   "log_history": trainer.state.log_history,
                   "user_model_names_unchanged": [n for n, _ in model.named_parameters()] == names,
                   "optimizer_has_value_head": optimizer_has(trainer, trainer.value_head)}, f)
    return trainer  # kept alive by the caller until os._exit


if __name__ == "__main__":
    _trainer = main(sys.argv[1])
    # leave without destructors: freeing the DDP model's gloo process group can deadlock (see thaw_rl.train._exit)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
