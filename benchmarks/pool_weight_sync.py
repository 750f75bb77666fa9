"""ForkPool weight sync: the time ``update_weights`` takes to give every worker a trainer's parameters.

What ``rollout_backend="pool"`` pays after every optimizer step. Random-weight models of real shapes (built
from their configs in the parent and in each worker), ``--pushes`` updates each, median reported:

- distributed: packed buckets broadcast over a gloo (CPU) or NCCL (GPU) group of the parent and the
  workers (``weight_sync="distributed"``, what the trainers use), for each ``--bucket-mb``;
- shared_memory: the whole state dict packed into one /dev/shm buffer the workers map and copy from.

``--weight-ipc`` (comma-separated, each run per bucket size): "auto" takes CUDA IPC when every worker is on
the trainer's GPU (``--devices cuda:0 --trainer-device cuda:0``), "off" forces today's gloo/NCCL there (the
comparison), "on" forces the IPC protocol (on the CPU: through shared memory). The ``via`` column says
which path the pushes took.

    python benchmarks/pool_weight_sync.py --model smollm2-135m --devices cpu --workers 2 --dtype bf16 \\
        --out benchmarks/results/pool_weight_sync_cpu_smollm2.json
    python benchmarks/pool_weight_sync.py --model qwen2.5-1.5b --devices cuda:1 --trainer-device cuda:0  # GPUs
    python benchmarks/pool_weight_sync.py --model qwen2.5-1.5b --devices cuda:0 --trainer-device cuda:0 \\
        --weight-ipc auto,off  # one GPU: CUDA IPC, then gloo for comparison

GB/s counts the model's bytes once per worker (what each worker receives) over the call's wall time.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from thaw_rl.pool import ForkPool  # noqa: E402
from thaw_rl.trainers.pool_rollouts import model_from_config  # noqa: E402
from receipt_utils import receipt  # noqa: E402

SHAPES = {
    "smollm2-135m": ("llama", dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                   intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)),
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                                   num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                                   tie_word_embeddings=True)),
    "llama3-8b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False)),
}
IPC_MODES = {"auto": None, "on": True, "off": False}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(SHAPES), default="smollm2-135m")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--devices", default="cpu", help="comma-separated worker devices")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--trainer-device", default="cpu")
    p.add_argument("--bucket-mb", default="16,256", help="bucket sizes to run, comma-separated")
    p.add_argument("--pushes", type=int, default=5)
    p.add_argument("--weight-ipc", default="auto", help="distributed runs: comma-separated auto/on/off (see above)")
    p.add_argument("--out", type=Path, default=None, help="where to write the JSON receipt")
    return p.parse_args()


def build_config(name: str):

    family, fields = SHAPES[name]
    return AutoConfig.for_model(family, max_position_embeddings=4096, **fields)


def measure(pool: ForkPool, params: dict, pushes: int) -> float:
    seconds = []
    for _ in range(pushes):
        start = time.perf_counter()
        pool.update_weights(params)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    args = parse_args()
    dtype = DTYPES[args.dtype]
    config = build_config(args.model)
    torch.manual_seed(0)
    with torch.device(args.trainer_device):  # a random init, on the trainer's device (fast on a GPU)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    params = dict(model.named_parameters())
    nbytes = sum(p.numel() * p.element_size() for p in params.values())
    factory = functools.partial(model_from_config, config, dtype)
    devices = args.devices.split(",")
    ipc_modes = args.weight_ipc.split(",")
    unknown = [m for m in ipc_modes if m not in IPC_MODES]
    if unknown:
        raise SystemExit(f"--weight-ipc {unknown}: use auto, on or off")
    runs = [("distributed", int(float(mb) * 2**20), mode) for mb in args.bucket_mb.split(",") for mode in ipc_modes]
    runs.append(("shared_memory", 0, None))
    rows = []
    for sync, bucket, mode in runs:
        kwargs = dict(weight_bucket_bytes=bucket, weight_ipc=IPC_MODES[mode]) if bucket else {}
        with ForkPool(factory, num_workers=args.workers, devices=devices, weight_sync=sync,
                      engine_kwargs=dict(kv_cache_memory=64 << 20), **kwargs) as pool:
            state = params if sync == "distributed" else model.state_dict()
            pool.update_weights(state)  # the first one forms the group (and warms up)
            median = measure(pool, state, args.pushes)
            via = pool.last_weight_transport or "shm"
        rows.append(dict(weight_sync=sync, weight_ipc=mode, via=via, bucket_mb=bucket / 2**20 if bucket else None,
                         seconds=median, model_bytes=nbytes, gb_per_s=nbytes * args.workers / median / 1e9))
        print(f"{sync:14s} via {via:5s} bucket {rows[-1]['bucket_mb'] or '-':>6} MB  {median * 1000:8.1f} ms  "
              f"{rows[-1]['gb_per_s']:6.2f} GB/s  ({nbytes / 1e6:.0f} MB x {args.workers} workers)", flush=True)
    if args.out:
        args.out.write_text(json.dumps(receipt("pool_weight_sync", args, rows), indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
