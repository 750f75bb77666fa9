"""One gloo rank on CPU: the engine over an FSDP2-sharded tiny Qwen2 with a bf16 mixed-precision policy.

Run by tests/test_engine_sharding.py in its own process (it initialises a process group):

    python tests/engine_fsdp2_worker.py PORT OUT.json

Writes the engine's KV dtype and greedy tokens + logprobs for the sharded model and for an unsharded bf16
copy of the same weights (what FSDP2's policy computes with), so the test can compare them.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist


def main(port: str, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from thaw_rl import SamplingParams, ThawEngine
    from thaw_rl.testing import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer("qwen2", seed=0)  # fp32, as a trainer holds it
    reference = copy.deepcopy(model).to(torch.bfloat16)
    mesh = init_device_mesh("cpu", (1,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)

    prompts = [tok(f"What is {i} + {2 * i + 1}? Answer:")["input_ids"] for i in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    result = {}
    for name, m in (("reference", reference), ("fsdp2", model)):
        engine = ThawEngine(m, tok, block_size=16, kv_cache_memory=16 << 20)
        trunks = engine.prefill_many(prompts)
        completions = engine.generate(engine.fork(trunks[0], 2) + trunks[1:], params)
        result[name] = dict(dtype=str(engine.dtype), tokens=[c.token_ids for c in completions],
                            logprobs=[[float(x) for x in c.logprobs] for c in completions])
    # the sharded model still trains after the engine ran it (no inference tensors left in FSDP2's state)
    loss = model(input_ids=torch.tensor([prompts[0]]), labels=torch.tensor([prompts[0]])).loss
    loss.backward()
    result["trained_loss"] = float(loss)
    dist.destroy_process_group()
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
