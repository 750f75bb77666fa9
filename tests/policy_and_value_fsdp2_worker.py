"""Worker for test_ppo.py's FSDP2 check (not a test module: it defines no tests).

    python -m torch.distributed.run --nproc_per_node 2 tests/policy_and_value_fsdp2_worker.py OUT_DIR

Each CPU rank (gloo) shards a ``PolicyAndValueHead`` with FSDP2 the way accelerate's ``fsdp2_prepare_model``
does (each decoder layer, then the root wrapper, which holds the value head), runs the PPO forward (TRL's
fused LM head inside a value capture) on its own row, and backpropagates a loss of logprobs and values. It
writes ``OUT_DIR/rank{r}.json``: the full gradients of the value head and of a few policy weights, and those
of an unsharded copy over both ranks' rows, so the test can check that FSDP2 reduced the head's gradient
over ranks like the policy's. (accelerate runs FSDP only on accelerators; this is the same sharding by hand.)
"""

from __future__ import annotations

import copy
import json
import os
import sys


def main(out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from trl.trainer.utils import add_fused_lm_head

    from thaw_rl.testing import tiny_model_and_tokenizer
    from thaw_rl.trainers.policy_and_value import PolicyAndValueHead
    from thaw_rl.trainers.value_head import value_head_for

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    policy, _ = tiny_model_and_tokenizer("qwen2", seed=0)
    add_fused_lm_head(policy)
    reference = PolicyAndValueHead(copy.deepcopy(policy), value_head_for(policy))
    wrapper = PolicyAndValueHead(policy, value_head_for(policy))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in policy.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(wrapper, mesh=mesh)  # the root unit: embeddings, norm, lm_head and the value head

    rows = [torch.tensor([[3, 5, 7, 9, 11, 13]]), torch.tensor([[4, 6, 8, 10, 12, 14]])]  # (1, 6) each

    def loss_of(module, ids):
        with module.capture() as captured:
            out = module(input_ids=ids, labels=ids, fused_lm_head=True)
        return -out.log_probs.mean() + ((captured[0] - 1.0) ** 2).mean()

    loss_of(wrapper, rows[rank]).backward()
    (sum(loss_of(reference, ids) for ids in rows) / len(rows)).backward()  # what the mean over ranks must equal

    watched = ["value_head.summary.weight", "value_head.summary.bias", "policy.model.layers.0.mlp.up_proj.weight"]
    sharded = dict(wrapper.named_parameters())
    unsharded = dict(reference.named_parameters())

    def full(t):
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().double()

    result = {"rank": rank, "names_are_the_wrappers": sorted(sharded) == sorted(unsharded),
              "grads": {n: full(sharded[n].grad).flatten()[:16].tolist() for n in watched},
              "reference_grads": {n: full(unsharded[n].grad).flatten()[:16].tolist() for n in watched}}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
