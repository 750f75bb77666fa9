"""``ThawGRPOConfig``: TRL 1.16's ``GRPOConfig`` plus the rollout engine, the tree shape and tree credit.

Every TRL field keeps its meaning. The fields added here say how ``ThawGRPOTrainer`` generates (its own
paged-KV engine over the live policy, ``thaw_rl.engine``), which tree it samples per prompt
(``thaw_rl.rollout.TreeSpec``), whether tokens get per-node advantages from that tree, and whether the
engine's sampling logprobs feed TRL's importance-sampling correction.

``__post_init__`` rejects what cannot work, naming the fields, their values and the fix: a tree whose
leaves per prompt differ from ``num_generations``, a tree that does not fit ``max_completion_length``,
and a batch layout under which a GRPO group would be split across ranks (the trainer forks each
prompt's group from one prefill, so a group must live on one rank).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from trl import GRPOConfig

from thaw_rl.engine.cascade import CASCADE_MODES
from thaw_rl.engine.kv_cache import KV_CACHE_DTYPES
from thaw_rl.engine.sampling import SamplingParams
from thaw_rl.rollout.tree_spec import KINDS, TreeSpec
from thaw_rl.trainers.tree_attention import MASK_KINDS

ROLLOUT_BACKENDS = ("native", "vllm", "pool")
_POOL_FIELDS = ("pool_num_workers", "pool_devices", "async_rollouts")


@dataclass
class ThawGRPOConfig(GRPOConfig):
    """Configuration of ``ThawGRPOTrainer``: every ``GRPOConfig`` field plus the ones below."""

    _policy_ratio_loss = True  # the loss has a policy ratio, so stale samples need importance sampling

    rollout_backend: str = field(
        default="native",
        metadata={"help": "Generation backend: 'native' (thaw-rl's paged-KV engine running the live policy "
                          "weights, no copy) or 'vllm' (vLLM's offline engine in this process, forks found through "
                          "its prefix cache; weights loaded into it after each optimizer step and its prefix cache "
                          "reset, as TRL's colocate mode does). 'vllm' uses kv_block_size, kv_cache_memory (bytes, or "
                          "a fraction: vLLM's gpu_memory_utilization), vllm_max_model_length, vllm_engine_kwargs, and "
                          "keeps its engine across generations (release_kv_cache does not apply). 'pool' (a ForkPool: "
                          "engines in worker processes on pool_devices while this process trains; the trainer's "
                          "weights are broadcast to them after every optimizer step; see async_rollouts)."})
    pool_num_workers: int | None = field(
        default=None,
        metadata={"help": "rollout_backend='pool': worker processes, one engine each (None: one per pool device). "
                          "Workers are dealt to pool_devices round-robin."})
    pool_devices: list[str] | None = field(
        default=None,
        metadata={"help": "rollout_backend='pool': devices of the workers, e.g. ['cuda:1', 'cuda:2']. None: every "
                          "visible GPU but the trainer's own (the CPU when there is no GPU). A worker on the "
                          "trainer's GPU needs kv_cache_memory in bytes."})
    pool_timeout_s: float = field(
        default=300.0,
        metadata={"help": "rollout_backend='pool': the longest one worker call (its share of a generate) may take "
                          "before the worker counts as hung. A hung worker costs this long a wait, then a "
                          "replacement's start (model build plus weights); lower it to your longest rollout."})
    pool_weight_bucket_bytes: int = field(
        default=256 << 20,
        metadata={"help": "rollout_backend='pool': bytes per broadcast of the weight sync (parameters are packed "
                          "into buckets of this size, one collective each)."})
    async_rollouts: bool = field(
        default=False,
        metadata={"help": "rollout_backend='pool': generate the rollouts of optimizer step k+1 while step k trains "
                          "(with the weights before step k). A rollout more than max_staleness versions old is "
                          "dropped and generated again. Needs native_importance_sampling_correction=True."})
    max_staleness: int = field(
        default=1,
        metadata={"help": "async_rollouts: the most optimizer steps the sampling weights may lag the trained ones "
                          "(logged as thaw/rollout_staleness)."})
    vllm_engine_kwargs: dict | None = field(
        default=None,
        metadata={"help": "rollout_backend='vllm': extra keyword arguments for vllm.LLM (e.g. {'enforce_eager': True} "
                          "to skip compilation on CPU)."})
    tree_spec: str = field(
        default="grpo",
        metadata={"help": f"Rollout tree per prompt, one of {KINDS}. 'grpo': the prompt is prefilled once and "
                          "forked into num_generations samples (same groups as GRPOTrainer). 'segments': fork "
                          "tree_branching[i] children every tree_segment_tokens tokens (TreePO). 'entropy': fork "
                          "at tokens whose entropy exceeds entropy_threshold (TreeRL's EPTree). 'best_of_n': "
                          "sampled like 'grpo' (ThawBestOfNTrainer keeps the best)."})
    tree_branching: list[int] | None = field(
        default=None,
        metadata={"help": "Children per fork, level by level, for tree_spec='segments' (e.g. [2, 2] gives 4 "
                          "leaves per prompt); the product must equal num_generations."})
    tree_segment_tokens: int | None = field(
        default=None,
        metadata={"help": "Tokens each level decodes before it forks (segments), or tokens per decode round "
                          "(entropy; None: the whole max_completion_length in one round)."})
    tree_fill: bool = field(
        default=True,
        metadata={"help": "segments: make up leaves lost to early stops by forking extra children at the last "
                          "level (TreeSpec fill). Whatever this says, a prompt still short of num_generations "
                          "leaves (an early stop before the last fork, an entropy tree with few uncertain tokens) "
                          "gets independent samples forked from its prompt, because TRL needs whole groups."})
    entropy_threshold: float | None = field(
        default=None,
        metadata={"help": "tree_spec='entropy': fork at sampled tokens whose entropy (nats) is above this."})
    entropy_initial: int = field(
        default=1, metadata={"help": "tree_spec='entropy': chains forked from the prompt before any branching."})
    entropy_branch: int = field(
        default=2, metadata={"help": "tree_spec='entropy': new children per fork point (the original path goes on)."})
    tree_credit: bool | None = field(
        default=None,
        metadata={"help": "Per-token advantages from the tree (TreeRL: a token of node n gets "
                          "(V(n) - V(root)) + (V(n) - V(parent(n))), V = mean reward of the leaves below), scaled "
                          "like TRL's scale_rewards. None: on for 'segments' and 'entropy' trees, off for 'grpo' "
                          "and 'best_of_n' (TRL's own group advantages)."})
    tree_credit_leaf_scaling: bool = field(
        default=False,
        metadata={"help": "Divide a node's advantage by sqrt(number of leaves below it) (TreeRL's reweighting of "
                          "nodes that appear in many sequences)."})
    kv_block_size: int = field(
        default=16, metadata={"help": "Tokens per KV block of the engine's paged cache (a power of two)."})
    kv_cache_memory: float | None = field(
        default=None,
        metadata={"help": "Engine KV pool size: bytes when >= 1, a fraction of free GPU memory when in (0, 1). "
                          "None: the engine default (0.5 of free GPU memory; on CPU a pool that grows with what a generation "
                          "needs, up to 512 MiB). With kv_cache_vmm this is a limit: only the blocks a generation uses "
                          "are mapped."})
    release_kv_cache: bool = field(
        default=True,
        metadata={"help": "Release the engine's KV pool after each generation so training gets the memory back "
                          "(ThawEngine.sleep); the engine, its bookkeeping and CUDA graphs are kept and the pool is "
                          "mapped again at the next generation. False keeps the pool allocated (no reallocation; "
                          "give a small kv_cache_memory). Either way the prefix cache is reset every generation "
                          "because the weights changed."})
    kv_cache_dtype: str = field(
        default="auto",
        metadata={"help": "Rollout KV cache: 'auto' (the model's dtype) or 'fp8' (float8_e4m3fn as vLLM's: twice the "
                          "tokens per byte, K/V rounded so logprobs move). Native, pool and vLLM backends."})
    kv_cache_vmm: bool | None = field(
        default=None,
        metadata={"help": "Map the engine's KV pool on demand through the CUDA driver's virtual memory API: its "
                          "addresses are reserved once, physical memory is mapped as a generation needs it and "
                          "unmapped by release_kv_cache, so the pool never moves and CUDA graphs are never "
                          "recaptured. None: on where the CUDA driver supports it (else the pool is allocated "
                          "through PyTorch, logged once); False: always through PyTorch; True: fail without VMM."})
    engine_cuda_graphs: bool | None = field(
        default=None,
        metadata={"help": "Replay decode steps as CUDA graphs. None: on CUDA unless ZeRO-3/FSDP gathers fresh "
                          "parameter storage each generation (then graphs would read stale weights). Applies to the "
                          "pool workers' engines too (rollout_backend='pool'; their weights are updated in place)."})
    engine_compile_layers: bool = field(
        default=False,
        metadata={"help": "Regional torch.compile of the decoder layers for the engine's forwards only (the model "
                          "trains uncompiled). Costs about a minute at the first generation; measured 2x faster "
                          "pure decode on an H100 (benchmarks/results). Kept across generations either way "
                          "(release_kv_cache releases only the KV pool). Applies to the pool workers' engines too."})
    engine_fuse_qkv: bool | None = field(
        default=None,
        metadata={"help": "Run each layer's q/k/v projections as one GEMM in the engine's forwards, from a copy of "
                          "those weights refreshed at every generation (engine/fused_qkv.py: ~10% of a 128-row "
                          "decode step on an H200). None: on for CUDA engines; False saves the copy's memory (for "
                          "Qwen2.5-1.5B 176 MB, ~1.6 GB for an 8B model). Applies to the pool workers' engines too."})
    engine_cascade_attention: str = field(
        default="auto",
        metadata={"help": "Cascade (shared-prefix) decode attention in the engine: a group's prompt (and a tree's "
                          "trunks) read once per decode step for all its rows. 'auto': in CUDA-graph decode steps of "
                          ">= 64 rows whose rows read >= 2^17 shared tokens in all, where it measured 1.07-2.38x "
                          "faster attention on an H200 (engine/cascade.py); 'on': every decode step with shared "
                          "blocks; 'off': never. Applies to the pool workers' engines too."})
    shared_prefix_training: bool = field(
        default=True,
        metadata={"help": "Compute each shared prefix once in training too: the training forward/backward and the "
                          "no-grad logprob passes (old policy, reference model) run each micro-batch as packed token "
                          "trees (a group's prompt and every shared tree node once, a tree attention mask, positions "
                          "along each row's own path) instead of one padded row per sample. Same logprobs, "
                          "entropies, losses and gradients as the flat path. Generation batches are shuffled by "
                          "whole groups so a group's rows share a micro-batch. False: TRL's flat path."})
    shared_prefix_max_tokens: int | None = field(
        default=None,
        metadata={"help": "Packed tokens per training forward at most (rows are never cut; a longer row gets a "
                          "forward of its own). None: one packed forward per TRL micro-batch (and per "
                          "per_device_train_batch_size rows in the no-grad passes, as TRL chunks them)."})
    shared_prefix_attention: str = field(
        default="auto",
        metadata={"help": "Tree mask kind for shared_prefix_training: 'flex' (a FlexAttention block mask, skips the "
                          "tiles no token attends), 'dense' (an (N, N) bool mask through SDPA; the reference), or "
                          "'auto' (on CUDA flex for packs of 6,144 tokens or more, where it measured faster, dense "
                          "below; dense on CPU)."})
    native_importance_sampling_correction: bool = field(
        default=False,
        metadata={"help": "Route the engine's sampling logprobs into TRL's importance-sampling correction (the "
                          "path TRL enables only for vLLM), with TRL's vllm_importance_sampling_mode / _clip_min / "
                          "_clip_max. Costs one extra no-grad forward per generation batch."})

    def __post_init__(self) -> None:
        self._check_num_generations()  # before TRL's, which divides by it
        super().__post_init__()
        self._check_backend()
        if self.kv_block_size < 1 or self.kv_block_size & (self.kv_block_size - 1):
            raise ValueError(f"kv_block_size={self.kv_block_size} must be a power of two (e.g. 16).")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(
                f"kv_cache_memory={self.kv_cache_memory}: give bytes (>= 1), a fraction in (0, 1) of free GPU "
                f"memory, or None for the engine default.")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r}: use one of {KV_CACHE_DTYPES} ('auto': the "
                             f"model's dtype; 'fp8': float8_e4m3fn).")
        if self.engine_cascade_attention not in CASCADE_MODES:
            raise ValueError(f"engine_cascade_attention={self.engine_cascade_attention!r}: use one of {CASCADE_MODES}.")
        if self.shared_prefix_attention not in MASK_KINDS:
            raise ValueError(f"shared_prefix_attention={self.shared_prefix_attention!r}: use one of {MASK_KINDS}.")
        if self.shared_prefix_max_tokens is not None and self.shared_prefix_max_tokens < 1:
            raise ValueError(f"shared_prefix_max_tokens={self.shared_prefix_max_tokens}: give a positive token count, "
                             f"or None for one packed forward per micro-batch.")
        spec = self.build_tree_spec(self.num_generations)
        self._check_tree(spec)
        self._check_groups_stay_on_one_rank()

    # -- checks ---------------------------------------------------------------------------------------
    def _check_num_generations(self) -> None:
        if not isinstance(self.num_generations, int) or self.num_generations < 2:
            raise ValueError(
                f"num_generations={self.num_generations!r}: each prompt needs at least 2 samples (advantages are "
                f"relative to the prompt's group). Set num_generations >= 2 (e.g. 4 or 8) and "
                f"per_device_train_batch_size to a multiple of it.")
        if self.num_generations_eval is not None and self.num_generations_eval < 1:
            raise ValueError(f"num_generations_eval={self.num_generations_eval}: set it >= 1, or None to use "
                             f"num_generations ({self.num_generations}).")

    def _check_backend(self) -> None:
        if self.rollout_backend not in ROLLOUT_BACKENDS:
            raise ValueError(f"rollout_backend={self.rollout_backend!r}: use one of {ROLLOUT_BACKENDS}.")
        self._check_pool()
        if self.rollout_backend == "vllm":
            from thaw_rl.backends.vllm_backend import import_vllm

            import_vllm()  # not installed or too old: say what to install now, not at the first generation
        if self.use_vllm:
            raise ValueError(
                "use_vllm=True: ThawGRPOTrainer generates with its own engine (rollout_backend="
                f"{self.rollout_backend!r}). Set use_vllm=False; rollout_backend='vllm' generates with vLLM through "
                "thaw-rl's tree sampler.")
        if self.use_transformers_continuous_batching:
            raise ValueError(
                "use_transformers_continuous_batching=True: ThawGRPOTrainer generates with its own engine. Set "
                "use_transformers_continuous_batching=False (and use_transformers_paged=False).")

    def _check_pool(self) -> None:
        if self.rollout_backend != "pool":
            given = [f"{k}={getattr(self, k)!r}" for k in _POOL_FIELDS if getattr(self, k) not in (None, False)]
            if given:
                raise ValueError(f"{', '.join(given)} only apply to rollout_backend='pool' (got "
                                 f"rollout_backend={self.rollout_backend!r}): set rollout_backend='pool' or drop them.")
            return
        if self.pool_num_workers is not None and self.pool_num_workers < 1:
            raise ValueError(f"pool_num_workers={self.pool_num_workers} must be >= 1 (or None: one per pool device).")
        if self.pool_devices is not None and (isinstance(self.pool_devices, str) or not self.pool_devices):
            raise ValueError(f"pool_devices={self.pool_devices!r}: give a non-empty list such as ['cuda:1'] (or "
                             f"None: every GPU but the trainer's).")
        if self.pool_timeout_s <= 0:
            raise ValueError(f"pool_timeout_s={self.pool_timeout_s} must be > 0 seconds.")
        if self.pool_weight_bucket_bytes < 1:
            raise ValueError(f"pool_weight_bucket_bytes={self.pool_weight_bucket_bytes} must be >= 1.")
        if self.async_rollouts and self.max_staleness < 1:
            raise ValueError(f"async_rollouts=True with max_staleness={self.max_staleness}: rollouts made while a step "
                             f"trains are 1 version old; set max_staleness >= 1, or async_rollouts=False.")
        if self.async_rollouts and self._policy_ratio_loss and not self.native_importance_sampling_correction:
            raise ValueError("async_rollouts=True samples with weights up to max_staleness steps old: set "
                             "native_importance_sampling_correction=True so TRL's importance-sampling correction "
                             "uses the sampling logprobs (or async_rollouts=False).")
        if self.n_gpu > 1:
            # one process with several GPUs visible (e.g. configs/pool_1_trainer_n_rollout.yaml): transformers
            # would count them all as this process's (nn.DataParallel, which TRL refuses), but the others are the
            # pool workers' (pool_devices); this process trains on its one device, as Trainer's model-parallel case
            self._n_gpu = 1

    def _check_tree(self, spec: TreeSpec) -> None:
        if spec.leaves_per_prompt != self.num_generations:
            if self.tree_spec == "segments":
                fix = (f"choose tree_branching whose product is {self.num_generations}, or set num_generations="
                       f"{spec.leaves_per_prompt}")
            else:
                fix = f"set num_generations={spec.leaves_per_prompt}"
            raise ValueError(
                f"tree_spec={self.tree_spec!r} with tree_branching={self.tree_branching} gives "
                f"{spec.leaves_per_prompt} leaves per prompt but num_generations={self.num_generations}: every "
                f"prompt's group must have exactly num_generations completions; {fix}.")
        try:
            spec.check_params(SamplingParams(max_tokens=self.max_completion_length))
        except ValueError as err:
            raise ValueError(
                f"tree_segment_tokens={self.tree_segment_tokens} with tree_branching={self.tree_branching} does "
                f"not fit max_completion_length={self.max_completion_length}: {err}") from None
        if self.tree_credit_enabled and self.tree_spec == "best_of_n":
            raise ValueError("tree_credit=True with tree_spec='best_of_n': best-of-n trees have no inner nodes; "
                             "set tree_credit=None or False.")

    def _check_groups_stay_on_one_rank(self) -> None:
        """Each rank's generation batch must hold whole groups: TRL shards it in consecutive slices."""
        g = self.num_generations
        rows = self.per_device_train_batch_size * self.steps_per_generation
        if rows % g:
            step = g // math.gcd(g, self.steps_per_generation)
            better = -(-self.per_device_train_batch_size // step) * step
            raise ValueError(
                f"per_device_train_batch_size * steps_per_generation = {self.per_device_train_batch_size} * "
                f"{self.steps_per_generation} = {rows} rows per rank per generation is not a multiple of "
                f"num_generations={g}, so a prompt's group would be split across ranks or generation batches and "
                f"could not be forked from one prefill. Set per_device_train_batch_size={better}, or choose "
                f"steps_per_generation (defaults to gradient_accumulation_steps) or num_generations so that "
                f"the product is a multiple of num_generations.")
        if self.do_eval and self.eval_strategy != "no":
            g_eval = self.num_generations_eval or g
            if self.per_device_eval_batch_size % g_eval:
                raise ValueError(
                    f"per_device_eval_batch_size={self.per_device_eval_batch_size} is not a multiple of the eval "
                    f"group size num_generations_eval={g_eval}: an eval group would be split across ranks. Set "
                    f"per_device_eval_batch_size to a multiple of {g_eval}.")

    # -- derived ----------------------------------------------------------------------------------------
    @property
    def tree_credit_enabled(self) -> bool:
        """Whether per-token tree advantages replace TRL's group advantages."""
        if self.tree_credit is None:
            return self.tree_spec in ("segments", "entropy")
        return bool(self.tree_credit)

    def build_tree_spec(self, num_generations: int) -> TreeSpec:
        """The ``TreeSpec`` these fields describe, for groups of ``num_generations`` leaves."""
        kind = self.tree_spec
        if kind not in KINDS:
            raise ValueError(f"tree_spec={kind!r}: use one of {KINDS}.")
        try:
            if kind == "grpo":
                return TreeSpec.grpo(num_generations)
            if kind == "best_of_n":
                return TreeSpec.best_of_n(num_generations)
            if kind == "segments":
                if not self.tree_branching:
                    raise ValueError(
                        f"tree_spec='segments' needs tree_branching (children per level) whose product is "
                        f"num_generations={num_generations}, e.g. tree_branching=[2, {max(num_generations // 2, 1)}], "
                        f"and tree_segment_tokens.")
                return TreeSpec.segments(list(self.tree_branching), self.tree_segment_tokens, fill=self.tree_fill)
            if self.entropy_threshold is None:
                raise ValueError("tree_spec='entropy' needs entropy_threshold (nats), e.g. entropy_threshold=1.0.")
            return TreeSpec.entropy(max_leaves=num_generations, threshold=self.entropy_threshold,
                                    initial=self.entropy_initial, branch=self.entropy_branch,
                                    segment_tokens=self.tree_segment_tokens)
        except ValueError as err:
            if str(err).startswith("tree_spec="):
                raise
            raise ValueError(
                f"tree_spec={kind!r} (tree_branching={self.tree_branching}, tree_segment_tokens="
                f"{self.tree_segment_tokens}, entropy_threshold={self.entropy_threshold}): {err}") from None

    @property
    def engine_kv_cache_memory(self) -> int | float | None:
        """``kv_cache_memory`` as the engine takes it: int bytes, float fraction, or None."""
        m = self.kv_cache_memory
        if m is None:
            return None
        return int(m) if m >= 1 else float(m)
