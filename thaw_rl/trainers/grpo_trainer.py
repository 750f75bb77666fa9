"""``ThawGRPOTrainer``: TRL 1.16's GRPOTrainer whose rollouts come from thaw-rl's tree sampler.

Generation is the one seam: ``GRPOTrainer._generate_single_turn(prompt_ids, images, multimodal_fields,
num_generations, has_tool_images=False) -> (completion_ids, logprobs)``. TRL hands it the rank's rows
with each prompt already repeated ``num_generations`` times in consecutive copies; we take the unique
prompts, prefill each once on a paged-KV engine that runs the live policy module (no weight copy), fork
the prompt's KV into its group (or a deeper tree), and return the leaves in the rows' order. Reward
computation, advantages, the loss, logging, checkpointing and distributed data handling are TRL's.

Three thin wrappers (each calls TRL's method and adds to it, none copies it):

- ``_calculate_rewards`` keeps the gathered rewards, which tree credit needs per leaf.
- ``_generate_and_score_completions`` replaces the ``(B,)`` group advantages with ``(B, T)`` per-token
  tree advantages when tree credit is on (TRL's ``_compute_loss`` accepts both shapes), and logs the
  ``thaw/...`` rollout metrics gathered over ranks.
- ``_compute_loss`` (and the generation wrapper) switch TRL's importance-sampling correction on when
  ``native_importance_sampling_correction`` is set. TRL applies it only under ``use_vllm and
  vllm_importance_sampling_correction``; for the duration of those two calls we raise ``use_vllm``,
  which with generation going through our seam, no ``rollout_func`` and ``vllm_mode`` renamed reaches
  exactly TRL's importance-sampling branches (a test pins those lines to TRL 1.16).

With ``rollout_backend="vllm"`` the sampler runs on a ``VLLMBackend`` built once, in this process, from
the policy's model directory (saved to ``output_dir/vllm-model-rank<i>`` when it has none); before each
generation whose optimizer step is new, the policy's named parameters are loaded into vLLM's model and
its prefix cache is reset (TRL's colocate sync).

Engine lifetime (native): the engine is built lazily at the first generation over ``accelerator.unwrap_model``'s
module, under the same ``unwrap_model_for_generation`` / ``summon_full_params`` contexts TRL's
``model.generate`` path uses (ZeRO-3 and FSDP gather the parameters there), and kept across generations;
its prefix cache is reset at every generation (the weights changed). With ``release_kv_cache`` (default)
only its KV pool is released after each generation (``ThawEngine.sleep``) so training gets the memory back;
the next generation maps it again.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any

import torch
from transformers import TrainerCallback
from trl import GRPOTrainer
from trl.extras.profiling import profiling_context
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import nanstd

from thaw_rl.backends.native import NativeBackend
from thaw_rl.engine.engine import SUPPORTED_MODEL_TYPES
from thaw_rl.engine.sampling import SamplingParams, derive_seed
from thaw_rl.rewards.reward_checks import check_reward_matrix, checked_reward_funcs
from thaw_rl.rollout import RolloutBatch, RolloutStats, TreeSampler, TreeSpec
from thaw_rl.trainers.deepspeed_hooks import paused_deepspeed_forward_hooks
from thaw_rl.trainers.finite_checks import FiniteGradientGuard, check_finite_state_dict
from thaw_rl.trainers.grpo_config import ThawGRPOConfig
from thaw_rl.trainers.group_fill import add_stats, complete_groups
from thaw_rl.trainers.pool_rollouts import Lookahead, PoolRollouts, prompts_of, rollout_seed
from thaw_rl.trainers.rollout_metrics import TOTALLED_METRICS, local_vector, reduce_rollout_metrics
from thaw_rl.trainers.pack_ahead import PackAhead
from thaw_rl.trainers.shared_prefix import group_shuffle, packed_logps
from thaw_rl.trainers.tree_attention import tree_attention_mode
from thaw_rl.trainers.tree_advantages import tree_advantages

logger = logging.getLogger(__name__)

# generation_kwargs keys the engine honours (or that do not change what is sampled)
_ENGINE_GENERATION_KEYS = {"max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "min_p",
                           "repetition_penalty", "pad_token_id", "bos_token_id", "eos_token_id",
                           "cache_implementation"}


class ThawGRPOTrainer(GRPOTrainer):
    """GRPOTrainer generating through ``TreeSampler`` on thaw-rl's engine.

    Overrides one generation seam, ``_generate_single_turn`` (see the module docstring for the three
    wrappers around it). Same constructor as ``GRPOTrainer``; ``args`` must be a ``ThawGRPOConfig``.
    With the default ``tree_spec="grpo"`` it samples the same groups a flat sampler would, computing
    each prompt once. After each generation, ``last_rollout`` holds the ``RolloutBatch`` (the tree,
    the sampling logprobs, the savings).
    """

    _tag_names = ["trl", "grpo", "thaw-rl"]

    def __init__(self, model, reward_funcs=None, args: ThawGRPOConfig | None = None, *rest, **kwargs) -> None:
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = ThawGRPOConfig(f"{str(name).split('/')[-1] or 'model'}-ThawGRPO")
        if not isinstance(args, ThawGRPOConfig):
            raise ValueError(f"{type(self).__name__} needs a ThawGRPOConfig, got {type(args).__name__}: build "
                             f"ThawGRPOConfig(**fields) with the same fields (it adds the rollout fields).")
        bound = inspect.signature(GRPOTrainer.__init__).bind(self, model, reward_funcs, args, *rest, **kwargs)
        self._check_arguments(args, bound.arguments)
        super().__init__(model, reward_funcs, args, *rest, **kwargs)
        self._check_model(self.accelerator.unwrap_model(self.model))
        self.reward_funcs = checked_reward_funcs(self.reward_funcs, self.reward_func_names)  # finite floats or None
        self.add_callback(FiniteGradientGuard(self.accelerator))  # no NaN/inf gradient is ever applied
        unknown = set(self.generation_kwargs) - _ENGINE_GENERATION_KEYS
        if unknown:
            logger.warning("generation_kwargs %s are ignored by thaw-rl's engine (it honours %s).",
                           sorted(unknown), sorted(_ENGINE_GENERATION_KEYS))
        # TRL's tool loop reads vLLM's engine when use_vllm and vllm_mode == "colocate": never true here.
        self.vllm_mode = "thaw-native"
        self.vllm_importance_sampling_correction = args.native_importance_sampling_correction
        self.tree_spec = args.build_tree_spec(self.num_generations)
        self.last_rollout: RolloutBatch | None = None
        self._backend: NativeBackend | None = None
        self._cuda_graphs_failed = False
        self.vllm_backend = None  # VLLMBackend, built at the first generation when rollout_backend="vllm"
        self._vllm_synced_step: int | None = None
        self._pending_stats: list[tuple[RolloutStats, int]] = []
        # exact run totals of the count/time metrics (all ranks), for the end-of-run summary: the logged
        # values are averages over each logging window, which cannot be summed back exactly
        self.rollout_totals: dict[str, float] = {}
        self._rewards_per_func: torch.Tensor | None = None
        self._seed_step, self._seed_calls = -1, 0
        # training tokens of the current optimizer step: [packed, flat], and micro-batches seen
        self._train_token_counts = [0, 0]
        self._train_micro_batches = 0
        self._warned_unpackable = False
        self.last_packed_batch = None  # the PackedBatch of the last scoring pass (None: it ran flat)
        # the loss forwards' packs, built on the host ahead of them (pack_ahead.py); the one compute_loss is in
        self._pack_ahead = PackAhead(self.accelerator.device, args.shared_prefix_attention,
                                     args.shared_prefix_max_tokens)
        self._loss_pack = None
        self._pool_rollouts: PoolRollouts | None = None  # rollout_backend="pool" (see pool_rollouts.py)
        if args.rollout_backend == "pool":
            self._pool_rollouts = PoolRollouts(args, self._generation_model, self._live_parameters,
                                               lambda: self.state.global_step)
            self._lookahead = Lookahead(args.steps_per_generation * self.num_iterations)
            self.add_callback(_PoolWeightsCallback(self._pool_rollouts))

    @property
    def rollout_pool(self):
        """The ``ForkPool`` of ``rollout_backend="pool"`` (None before the first rollout or otherwise)."""
        return None if self._pool_rollouts is None else self._pool_rollouts.pool

    def _live_parameters(self) -> dict[str, torch.Tensor]:
        """The policy's parameters as they are now, not gathered (a pool replacement's fallback source)."""
        return dict(self._policy_of(self.accelerator.unwrap_model(self.model)).named_parameters())

    def _policy_of(self, module: torch.nn.Module) -> torch.nn.Module:
        """The causal LM inside an unwrapped training module: the module itself here (PPO: its ``policy``)."""
        return module

    # -- checks ---------------------------------------------------------------------------------------
    @staticmethod
    def _check_arguments(args: ThawGRPOConfig, arguments: dict[str, Any]) -> None:
        if arguments.get("rollout_func") is not None:
            raise ValueError("rollout_func replaces TRL's generation, so ThawGRPOTrainer's engine would never run. "
                             "Drop rollout_func, or use GRPOTrainer with it.")
        if (arguments.get("tools") or arguments.get("environment_factory")) and args.async_rollouts:
            raise ValueError("async_rollouts=True with tools/environment_factory: rollouts queued ahead cannot run "
                             "tool calls in the trainer. Set async_rollouts=False.")
        if (arguments.get("tools") or arguments.get("environment_factory")) and args.tree_credit_enabled:
            raise ValueError(
                f"tree_credit with tools/environment_factory: tool calls extend completions after the tree was "
                f"sampled, so its spans no longer match. Set tree_credit=False or tree_spec='grpo' (got "
                f"tree_spec={args.tree_spec!r}).")

    def _check_model(self, model: torch.nn.Module) -> None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES and self.args.rollout_backend == "native":
            raise ValueError(
                f"ThawGRPOTrainer's engine does not run model_type {model_type!r} (it runs "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}). Use GRPOTrainer for this model.")
        if self._dist.is_zero3 and not self.args.ds3_gather_for_generation:
            raise ValueError("ds3_gather_for_generation=False under ZeRO-3: the engine needs the full weights for a "
                             "generation. Set ds3_gather_for_generation=True.")

    # -- the generation seam ----------------------------------------------------------------------------
    def _tokenize_prompts(self, prompts: list):
        """TRL's, run once per distinct prompt.

        TRL's sampler repeats each prompt ``num_generations`` times and TRL tokenizes (and chat-templates)
        every copy: on the H200 host, 16 prompts x 16 copies of ~2K tokens took 0.68 s a step, more than
        the packed loss forward saves per group. A shared prompt is tokenized once; each row gets its own
        copy of the ids. Vision-language prompts and per-environment tool schemas go to TRL unchanged.
        """
        if getattr(self, "_is_vlm", False) or getattr(self, "environment_factories", None) is not None:
            return super()._tokenize_prompts(prompts)
        slot_of: dict[str, int] = {}
        slots = [slot_of.setdefault(repr(prompt), len(slot_of)) for prompt in prompts]
        if len(slot_of) == len(prompts):
            return super()._tokenize_prompts(prompts)
        first = {slot: i for i, slot in reversed(list(enumerate(slots)))}  # slot -> its first row
        prompt_ids, images, multimodal_fields = super()._tokenize_prompts([prompts[first[s]] for s in range(len(slot_of))])
        if images is not None or multimodal_fields:  # a processor that found images: let TRL do every row
            return super()._tokenize_prompts(prompts)
        return [list(prompt_ids[slot]) for slot in slots], None, multimodal_fields

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """Rows (each prompt ``num_generations`` consecutive times) -> (completion_ids, sampling logprobs)."""
        if (images is not None and any(img for img in images)) or multimodal_fields or has_tool_images:
            raise ValueError("ThawGRPOTrainer generates text only; use GRPOTrainer for vision-language prompts.")
        prompts = unique_prompts(prompt_ids, num_generations)
        spec = self.tree_spec if self.tree_spec.leaves_per_prompt == num_generations else TreeSpec.grpo(num_generations)
        params = self._sampling_params(self._rollout_seed())
        if self._pool_rollouts is not None:
            return self._pool_rollout(prompts, spec, num_generations, params, len(prompt_ids))
        with profiling_context(self, "thaw.rollout"), self._generation_model() as model:
            backend = self._backend_for(model)
            batch = TreeSampler(backend, spec).rollout(prompts, params)
            filled = 0
            if len(batch.leaves) < num_generations * len(prompts):
                batch, filled = complete_groups(backend, batch, num_generations, params)
            if backend is self._backend and backend.engine.runner.graphs_failed:
                self._cuda_graphs_failed = True  # later engines skip the capture that failed
            if self.args.release_kv_cache and self._backend is not None:
                self._backend.engine.sleep()  # KV memory back to training; the engine itself is kept
        if len(batch.leaves) != len(prompt_ids):
            raise RuntimeError(f"rollout returned {len(batch.leaves)} leaves for {len(prompt_ids)} rows")
        self.last_rollout = batch
        self._pending_stats.append((batch.stats, filled))
        return batch.completion_ids, batch.logprobs

    def _pool_rollout(self, prompts, spec, num_generations, params, num_rows):
        """rollout_backend="pool": the (possibly queued) rollout of ``prompts``, its staleness and weight metrics."""
        with profiling_context(self, "thaw.rollout"):
            rollout = self._pool_rollouts.generate(prompts, spec, num_generations, params)
        batch = rollout.batch
        if len(batch.leaves) != num_rows:
            raise RuntimeError(f"rollout returned {len(batch.leaves)} leaves for {num_rows} rows")
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["thaw/rollout_staleness"].append(float(self._pool_rollouts.staleness_history[-1]))
        for key, value in self._pool_rollouts.metrics().items():
            self._metrics[mode][key].append(value)
        self.last_rollout = batch
        self._pending_stats.append((batch.stats, rollout.filled))
        return batch.completion_ids, batch.logprobs

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """async_rollouts: also read the next optimizer step's batches and queue their rollouts on the pool."""
        if self._pool_rollouts is None or not self.args.async_rollouts:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        batches, to_start = self._lookahead.take(epoch_iterator, num_batches)
        for index, inputs in to_start:
            step = index // max(num_batches, 1)  # the optimizer step that will train on it
            params = self._sampling_params(rollout_seed(self.args.seed, step, self.accelerator.process_index))
            self._pool_rollouts.queue(unique_prompts(prompts_of(self, inputs), self.num_generations), self.tree_spec,
                                      self.num_generations, params)
        return batches, self._get_num_items_in_batch(batches, device)

    @contextlib.contextmanager
    def _generation_model(self):
        """The unwrapped policy with full parameters, no grad, no gradient checkpointing (as TRL's generate path)."""
        with (
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped_model,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
            paused_deepspeed_forward_hooks(self._deepspeed_engine(), self._dist.zero_stage),
        ):
            yield self._policy_of(unwrapped_model)

    def _deepspeed_engine(self):
        """The ``DeepSpeedEngine`` wrapping the policy, or None without DeepSpeed."""
        if not self.is_deepspeed_enabled:
            return None
        return self.model_wrapped if hasattr(self.model_wrapped, "module_forward_pre_hook") else None

    def _backend_for(self, model: torch.nn.Module):
        if self.args.rollout_backend == "vllm":
            return self._vllm_backend_for(model)
        if self._backend is not None and self._backend.model is model:
            self._backend.reset_prefix_cache()  # cached KV was computed with the previous weights
            return self._backend
        graphs = self.args.engine_cuda_graphs
        if graphs is None and (self._dist.is_zero3 or self._dist.is_fsdp):
            graphs = False  # parameters are gathered into fresh storage each generation: graphs would go stale
        if graphs is None and self._cuda_graphs_failed:
            graphs = False  # an earlier engine's capture failed in this process (logged there)
        self._backend = NativeBackend(model, self._tokenizer, block_size=self.args.kv_block_size,
                                      kv_cache_memory=self.args.engine_kv_cache_memory, use_cuda_graphs=graphs,
                                      kv_cache_vmm=self.args.kv_cache_vmm, kv_cache_dtype=self.args.kv_cache_dtype,
                                      compile_layers=self.args.engine_compile_layers,
                                      fuse_qkv=self.args.engine_fuse_qkv,
                                      cascade_attention=self.args.engine_cascade_attention, seed=self.args.seed)
        return self._backend

    def _vllm_backend_for(self, model: torch.nn.Module):
        """The vLLM backend, holding the weights of the current optimizer step (loaded once per step)."""
        if self.vllm_backend is None:
            from thaw_rl.backends.vllm_backend import build_vllm_backend_for

            self.vllm_backend = build_vllm_backend_for(model, self.args)
        step = self.state.global_step
        if self._vllm_synced_step != step:
            self.vllm_backend.update_weights({name: p.detach() for name, p in model.named_parameters()})
            self._vllm_synced_step = step
        return self.vllm_backend

    def _sampling_params(self, seed: int) -> SamplingParams:
        """TRL's sampling settings (``generation_kwargs`` included) as the engine's ``SamplingParams``."""
        gk = self.generation_kwargs
        greedy = gk.get("do_sample", True) is False
        return SamplingParams(
            temperature=0.0 if greedy else float(gk.get("temperature", self.temperature)),
            top_p=float(gk.get("top_p") or 1.0),
            top_k=int(gk.get("top_k") or 0),
            min_p=float(gk.get("min_p") or 0.0),
            repetition_penalty=float(gk.get("repetition_penalty") or 1.0),
            max_tokens=int(gk.get("max_new_tokens") or self.max_completion_length),
            stop_token_ids=[int(t) for t in self.eos_token_ids],
            seed=seed,
        )

    def _rollout_seed(self) -> int:
        """A function of (args.seed, global step, call within the step, rank): reruns reproduce, resumes too."""
        step = self.state.global_step
        if step != self._seed_step:
            self._seed_step, self._seed_calls = step, 0
        self._seed_calls += 1
        return derive_seed(self.args.seed, step, self._seed_calls, self.accelerator.process_index)

    # -- wrappers ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _importance_sampling_switch(self):
        """Raise ``use_vllm`` so TRL's importance-sampling branches run on our logprobs (see module doc)."""
        if not self.args.native_importance_sampling_correction:
            yield
            return
        self.use_vllm = True
        try:
            yield
        finally:
            self.use_vllm = False

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        check_reward_matrix(rewards_per_func, self.reward_funcs, self.reward_func_names)
        self._rewards_per_func = rewards_per_func  # (N over all ranks, num_reward_funcs)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        self._pending_stats, self._rewards_per_func = [], None
        with self._importance_sampling_switch():
            output = super()._generate_and_score_completions(inputs)
        if self.args.tree_credit_enabled:
            output["advantages"] = self._tree_credit(output)
        self._log_rollout_metrics(output)
        return output

    def _compute_loss(self, model, inputs):
        with self._importance_sampling_switch():
            return super()._compute_loss(model, inputs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Trainer's save, refused when a weight is NaN or inf (see ``finite_checks``)."""
        check_finite_state_dict(self.accelerator.unwrap_model(self.model).state_dict() if state_dict is None
                                else state_dict, output_dir)
        super()._save(output_dir, state_dict=state_dict)

    # -- shared-prefix training (see shared_prefix.py) ----------------------------------------------------
    def train(self, *args, **kwargs):
        """TRL's ``train``, with the models in ``thaw_tree`` attention mode throughout (tree_attention.py says why)."""
        if not self.args.shared_prefix_training:
            return super().train(*args, **kwargs)
        models = [self._policy_of(self.accelerator.unwrap_model(self.model))]
        if getattr(self, "ref_model", None) is not None:
            models.append(self.accelerator.unwrap_model(self.ref_model))
        with tree_attention_mode(*models):
            return super().train(*args, **kwargs)

    def _training_group_size(self) -> int:
        """Rows per group in a generation batch (what ``group_shuffle`` keeps together)."""
        return self.num_generations

    def _prepare_inputs(self, generation_batch):
        if not (self.args.shared_prefix_training and self.model.training):
            return super()._prepare_inputs(generation_batch)
        with group_shuffle(self._training_group_size()):
            inputs = super()._prepare_inputs(generation_batch)
        buffered = getattr(self, "_buffered_inputs", None)  # every micro-batch of this generation batch
        if buffered is not None and buffered is not self._pack_ahead.source:
            policy = self._policy_of(self.accelerator.unwrap_model(self.model))
            self._pack_ahead.prepare(buffered, policy.config)
        return inputs

    def compute_loss(self, model, inputs, *args, **kwargs):
        """TRL's, with this micro-batch's pack taken from the pack-ahead for its scoring pass."""
        self._loss_pack = self._pack_ahead.take(inputs) if self.args.shared_prefix_training else None
        try:
            return super().compute_loss(model, inputs, *args, **kwargs)
        finally:
            self._loss_pack = None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        scores = None
        self.last_packed_batch = None
        if self.args.shared_prefix_training and not compute_aux_loss and not any(
                v is not None for v in multimodal.values()):
            prepared = self._loss_pack
            if prepared is not None and not (batch_size is None and torch.is_grad_enabled()
                                             and prepared.fits(input_ids, logits_to_keep)):
                prepared = None  # not the loss forward of the micro-batch it was packed for
            if prepared is not None:
                self._pack_ahead.num_used += 1
            scores = packed_logps(
                model, self._policy_of(self.accelerator.unwrap_model(model)), input_ids, attention_mask, logits_to_keep,
                max_rows=batch_size, max_tokens=self.args.shared_prefix_max_tokens,
                mask_kind=self.args.shared_prefix_attention, compute_entropy=compute_entropy,
                autocast=self.accelerator.autocast, prepared=prepared)
            if scores is None and not self._warned_unpackable:
                logger.warning("shared_prefix_training: a batch's attention mask is not TRL's padding layout (left-"
                               "padded prompt, right-padded completion); it is scored with the flat path.")
                self._warned_unpackable = True
        if self.model.training and torch.is_grad_enabled():  # the loss forward
            flat = input_ids.numel()
            self._train_token_counts[0] += scores.batch.num_tokens if scores is not None else flat
            self._train_token_counts[1] += flat
        if scores is not None:
            self.last_packed_batch = scores.batch  # PPO reads its value capture back through it
            return scores.logps, scores.entropies, None
        return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                          batch_size, compute_entropy, compute_aux_loss, **multimodal)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.args.shared_prefix_training:
            self._pack_ahead.prepare_next()  # the next micro-batch, packed while the device runs this backward
        self._train_micro_batches += 1
        if self._train_micro_batches >= getattr(self, "current_gradient_accumulation_steps",
                                                self.args.gradient_accumulation_steps):
            self._log_train_tokens()
        return loss

    def _log_train_tokens(self) -> None:
        """``thaw/train_tokens`` and ``thaw/train_tokens_flat`` of the optimizer step just finished (all ranks)."""
        if self.accelerator.num_processes == 1:  # host numbers: no device round trip (it would wait for the backward)
            packed, flat = map(float, self._train_token_counts)
        else:
            local = torch.tensor(self._train_token_counts, dtype=torch.float64, device=self.accelerator.device)
            packed, flat = self.accelerator.gather(local).view(-1, 2).sum(dim=0).tolist()
        self._train_token_counts, self._train_micro_batches = [0, 0], 0
        self._metrics["train"]["thaw/train_tokens"].append(packed)
        self._metrics["train"]["thaw/train_tokens_flat"].append(flat)
        for key, value in (("thaw/train_tokens", packed), ("thaw/train_tokens_flat", flat)):
            self.rollout_totals[key] = self.rollout_totals.get(key, 0.0) + value

    # -- tree credit ------------------------------------------------------------------------------------
    def _local_rewards(self, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(this rank's rewards (B,), every rank's rewards (N,)), weighted and summed over reward functions."""
        rpf = self._rewards_per_func
        if rpf is None:
            raise RuntimeError("no rewards were computed for this generation batch (TRL's _calculate_rewards moved?)")
        rewards = (rpf * self.reward_weights.to(rpf.device)[None, :]).nansum(dim=1)  # (N,)
        rewards[torch.isnan(rpf).all(dim=1)] = torch.nan
        start = self.accelerator.process_index * num_rows
        return rewards[start:start + num_rows], rewards

    def _tree_credit(self, output: dict[str, Any]) -> torch.Tensor:
        """Per-token advantages (B, T) from ``last_rollout`` and this batch's rewards, scaled as scale_rewards says."""
        batch = self.last_rollout
        completion_ids = output["completion_ids"]  # (B, T)
        local, everyone = self._local_rewards(completion_ids.size(0))
        if batch is None or len(batch.leaves) != completion_ids.size(0):
            raise RuntimeError("tree credit needs the rollout of this batch's rows (tools or rollout_func in use?)")
        advantages = tree_advantages(batch, local.tolist(), self.args.tree_credit_leaf_scaling,
                                     num_columns=completion_ids.size(1))  # (B, T)
        if self.scale_rewards == "group":
            groups = local.view(-1, self.num_generations if self.model.training else self.num_generations_eval)
            std = nanstd(groups.cpu().float(), dim=1).nan_to_num(0.0)  # (P,)
            advantages = advantages / (std.repeat_interleave(groups.size(1))[:, None] + 1e-4)
        elif self.scale_rewards == "batch":
            advantages = advantages / (float(nanstd(everyone.cpu().float()).nan_to_num(0.0)) + 1e-4)
        return advantages.to(completion_ids.device)

    # -- metrics ----------------------------------------------------------------------------------------
    def _log_rollout_metrics(self, output: dict[str, Any]) -> None:
        """``thaw/...`` keys into ``self._metrics[mode]`` (one gather per generation, on every rank)."""
        mode = "train" if self.model.training else "eval"
        stats, filled = None, 0
        for s, f in self._pending_stats:
            stats = s if stats is None else add_stats(stats, s)
            filled += f
        diff = None
        old, sampled = output.get("old_per_token_logps"), output.get("sampling_per_token_logps")
        if old is not None and sampled is not None:
            mask = output["completion_mask"].bool()
            if "tool_mask" in output:
                mask &= output["tool_mask"].bool()
            gap = (old - sampled).abs()[mask]
            diff = gap[~torch.isnan(gap)]
        vector = local_vector(stats, filled, diff, self.accelerator.device)
        for key, value in reduce_rollout_metrics(self.accelerator.gather(vector)).items():
            self._metrics[mode][key].append(value)
            if mode == "train" and key in TOTALLED_METRICS:
                self.rollout_totals[key] = self.rollout_totals.get(key, 0.0) + value


def unique_prompts(prompt_ids: list[list[int]], group_size: int) -> list[list[int]]:
    """The prompt of each run of ``group_size`` consecutive identical rows (TRL's RepeatSampler layout)."""
    if group_size < 1 or len(prompt_ids) % group_size:
        raise RuntimeError(f"{len(prompt_ids)} rows do not split into groups of {group_size}: check "
                           f"per_device_train_batch_size * steps_per_generation against num_generations")
    out = []
    for start in range(0, len(prompt_ids), group_size):
        group = [list(p) for p in prompt_ids[start:start + group_size]]
        if any(p != group[0] for p in group[1:]):
            raise RuntimeError(
                f"rows {start}..{start + group_size - 1} are not {group_size} copies of one prompt: the trainer "
                f"expects TRL's RepeatSampler layout (each prompt num_generations times, consecutively)")
        out.append(group[0])
    return out


class _PoolWeightsCallback(TrainerCallback):
    """rollout_backend="pool": push the new weights after every optimizer step; stop the workers at the end."""

    def __init__(self, rollouts: PoolRollouts) -> None:
        self.rollouts = rollouts

    def on_step_end(self, args, state, control, **kwargs):
        self.rollouts.push_weights()

    def on_train_end(self, args, state, control, **kwargs):
        self.rollouts.close()
