"""``ThawPPOTrainer``: PPO with a value head, token-level GAE and a KL-penalised reward, over tree rollouts.

TRL 1.16 has no PPOTrainer. This one is a ``ThawGRPOTrainer`` (so a ``GRPOTrainer``, so a
``transformers.Trainer``), because everything around the PPO update is what GRPO already does: the prompt
data flow and chat templates, forked rollouts through ``TreeSampler`` on the live policy, reward
functions (same signature and weights), a rollout buffer reused for several optimizer steps
(``steps_per_generation``) and epochs (``num_iterations``), the reference model's logprobs, logging,
checkpointing, and ``accelerate launch`` (DDP, ZeRO-2). Three seams change:

- ``_generate_and_score_completions`` calls the parent (rollouts, rewards, old and reference logprobs,
  ``thaw/...`` metrics), then adds the rollout's values, per-token rewards
  ``-kl_coef * KL_t (+ score at the last token)``, GAE advantages and returns (once per tree node with
  ``tree_gae``) and logs TRL PPO's ``objective/...`` and ``val/...`` metrics.
- ``_compute_loss`` is PPO's clipped policy loss plus ``vf_coef`` times the clipped value loss, with
  ``loss/...``, ``policy/...`` and ``val/...`` metrics.
- ``_get_per_token_logps_and_entropies`` opens a value capture around the parent's call for the policy,
  so every policy forward (old logprobs at rollout time, the loss forward) also yields values from the
  same backbone pass (see ``policy_and_value.py``). With ``shared_prefix_training`` that pass runs over packed
  token trees, and the values are read back per row at each token's predictor, like the logprobs.

The value head is the trainer's, not the model's: after ``__init__``, ``trainer.model`` is a
``PolicyAndValueHead`` holding the user's policy (unchanged: no attribute, parameter or hook is added to
it) and ``trainer.value_head``; that wrapper is what the Trainer prepares with accelerate and optimizes, so
DDP, DeepSpeed ZeRO and FSDP2 train and synchronize the head with the policy (``policy_and_value.py`` says
why a wrapper). ``_policy_of`` hands the bare policy to the engine, the pool and the checkpoint code.

Batches: a rollout batch is ``per_device_train_batch_size * gradient_accumulation_steps *
num_mini_batches`` completions per rank; it is shuffled once and split into mini-batches by TRL's
buffer, and the same split is reused by every PPO epoch (TRL PPO drew a new permutation per epoch).

Values at shared tree nodes: with ``tree_gae`` the tokens of a node shared by several leaves take one
value and one advantage (GAE runs once per node, see ``ppo_objective.tree_gae``). With
``shared_prefix_training`` (default) the policy/value forward also computes each shared token once.

Checkpoints: the policy is saved as a plain causal LM (its own keys, no value-head keys) and the value
head beside it as ``value_head.safetensors``, in each ``checkpoint-N`` and by ``save_model``;
``resume_from_checkpoint`` restores both, ``ThawPPOTrainer(model=<that directory>)`` loads the head back,
and ``value_head.load_value_head(<that directory>)`` gives it to a user (its docstring shows how).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
from typing import Any

import torch
from trl import GRPOTrainer
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import (
    add_fused_lm_head,
    create_model_from_path,
    disable_dropout_in_model,
)

from thaw_rl.rewards.reward_checks import without_unscorable
from thaw_rl.trainers.finite_checks import check_finite_state_dict
from thaw_rl.trainers.grpo_trainer import ThawGRPOTrainer
from thaw_rl.trainers.ppo_config import ThawPPOConfig
from thaw_rl.trainers.ppo_objective import (
    explained_variance,
    masked_mean,
    masked_whiten,
    per_token_kl,
    policy_loss,
    token_gae,
    token_rewards,
    tree_gae,
    value_loss,
)
from thaw_rl.trainers.policy_and_value import VALUE_HEAD_PREFIX, PolicyAndValueHead, split_state_dict
from thaw_rl.trainers.value_head import VALUE_HEAD_FILE, ValueHead, load_value_head, save_value_head, value_head_for


class ThawPPOTrainer(ThawGRPOTrainer):
    """PPO (clipped policy and value losses, GAE, KL-penalised reward) on ``ThawGRPOTrainer``'s rollouts.

    Same constructor as ``GRPOTrainer``; ``args`` must be a ``ThawPPOConfig`` and ``reward_funcs`` is
    required. Overrides ``_generate_and_score_completions``, ``_compute_loss`` and
    ``_get_per_token_logps_and_entropies`` (see the module docstring). ``value_head`` is the critic,
    ``policy_and_value`` (also ``model`` from construction on) the module trained, ``ref_model`` the frozen
    reference policy (None when ``kl_coef == 0``).
    """

    _tag_names = ["trl", "ppo", "thaw-rl"]

    def __init__(self, model, reward_funcs=None, args: ThawPPOConfig | None = None, *rest, **kwargs) -> None:
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = ThawPPOConfig(f"{str(name).split('/')[-1] or 'model'}-ThawPPO")
        if not isinstance(args, ThawPPOConfig):
            raise ValueError(f"ThawPPOTrainer needs a ThawPPOConfig, got {type(args).__name__}: build "
                             f"ThawPPOConfig(**fields) (it adds the PPO and rollout fields).")
        if reward_funcs is None or (isinstance(reward_funcs, (list, tuple)) and not reward_funcs):
            raise ValueError(
                "reward_funcs is missing: ThawPPOTrainer scores each completion at its last token with reward "
                "functions (TRL's signature: f(prompts, completions, completion_ids, **kwargs) -> list[float]) or "
                "reward models. Pass reward_funcs=my_reward or a list of them.")
        arguments = inspect.signature(GRPOTrainer.__init__).bind(self, model, reward_funcs, args, *rest,
                                                                 **kwargs).arguments
        self._check_ppo_arguments(args, arguments)
        ref_source = self._reference_source(model, args)
        super().__init__(model, reward_funcs, args, *rest, **kwargs)
        self.ref_model = self._prepare_reference(ref_source)
        policy = self.model
        head = load_value_head(model, policy.get_output_embeddings().weight.device) if isinstance(model, str) else None
        self.value_head: ValueHead = head if head is not None else value_head_for(policy)
        # what the Trainer prepares (DDP / DeepSpeed / FSDP2) and optimizes from here on: policy and head together
        self.policy_and_value = PolicyAndValueHead(policy, self.value_head)
        self.model = self.model_wrapped = self.policy_and_value
        self.beta = args.kl_coef if self.ref_model is not None else 0.0  # GRPO computes ref logps when beta != 0
        if args.stop_token_id is not None:
            self.eos_token_ids = [args.stop_token_id]
        self._captured_values: torch.Tensor | None = None

    # -- construction -----------------------------------------------------------------------------------
    @staticmethod
    def _check_ppo_arguments(args: ThawPPOConfig, arguments: dict[str, Any]) -> None:
        if arguments.get("peft_config") is not None:
            raise ValueError("peft_config: ThawPPOTrainer trains the value head with the full policy and does not "
                             "support PEFT adapters yet. Drop peft_config.")
        if (arguments.get("tools") or arguments.get("environment_factory")) and args.tree_gae_enabled:
            raise ValueError("tree_gae with tools/environment_factory: tool calls extend completions after the tree "
                             "was sampled, so its spans no longer match the rows. Set tree_gae=False.")

    @staticmethod
    def _reference_source(model, args: ThawPPOConfig):
        """What the reference model is built from: a path, or a copy of the policy taken before training."""
        if args.kl_coef == 0.0:
            return None
        if args.ref_model_name_or_path:
            return args.ref_model_name_or_path
        if isinstance(model, str):
            return model
        return copy.deepcopy(model)

    def _prepare_reference(self, source) -> torch.nn.Module | None:
        if source is None:
            return None
        if isinstance(source, str):
            policy = self.accelerator.unwrap_model(self.model)
            init = dict(self.args.model_init_kwargs or {})
            init.setdefault("dtype", policy.dtype)
            init.setdefault("attn_implementation", policy.config._attn_implementation)
            if self.args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
                init["device_map"] = None
            source = create_model_from_path(source, **init)
        ref = source.eval().requires_grad_(False)
        disable_dropout_in_model(ref)
        add_fused_lm_head(ref, temperature=self.temperature)
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(ref, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(ref, self.accelerator)
        return self.accelerator.prepare_model(ref, evaluation_mode=True)

    # -- generation -------------------------------------------------------------------------------------
    def _sampling_params(self, seed: int):
        params = super()._sampling_params(seed)
        if self.args.stop_token_id is not None:
            return dataclasses.replace(params, stop_token_ids=[self.args.stop_token_id])
        if self.args.stop_token is None:
            return dataclasses.replace(params, stop_token_ids=[], ignore_eos=True)
        return params

    # -- values from the policy's own forward ---------------------------------------------------------------
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        if self.ref_model is not None and model is self.ref_model:
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                              *args, **kwargs)
        with self.policy_and_value.capture() as captured:
            out = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                             *args, **kwargs)
        if not captured:
            raise RuntimeError("the policy forward did not run through PolicyAndValueHead (was it called on the "
                               "policy itself, not on trainer.model?)")
        if self.last_packed_batch is not None:
            # packed token trees: each completion token's value is read at its predictor, like its logprob
            # (a chunk's forward may run padding tokens after its N real ones: index N must read unpack's zero)
            chunks = self.last_packed_batch.chunks
            self._captured_values = self.last_packed_batch.unpack(
                [v[0, :c.num_tokens] for v, c in zip(captured, chunks, strict=True)])  # (B, T)
            return out
        # position j's hidden state is the state before token j + 1: keep the T states before the completion tokens
        self._captured_values = torch.cat([v[:, :-1][:, -logits_to_keep:] for v in captured], dim=0)  # (B, T)
        return out

    # -- rollout: values, rewards, GAE --------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        self._captured_values = None
        output = super()._generate_and_score_completions(inputs)
        mask = output["completion_mask"] if "tool_mask" not in output else output["completion_mask"] * output["tool_mask"]
        mask = mask.float()
        if "old_per_token_logps" not in output or self._captured_values is None:
            output["old_per_token_logps"] = self._rollout_logps(output)
        values = self._captured_values.detach().float() * mask  # (B, T)
        old_logps = output["old_per_token_logps"]
        ref_logps = output.get("ref_per_token_logps")
        kl = per_token_kl(old_logps, ref_logps, self.args.kl_estimator) * mask if ref_logps is not None \
            else torch.zeros_like(mask)  # (B, T)
        scores = self._scores(output)  # (B,)
        rewards = token_rewards(scores, kl, mask, self.args.kl_coef)  # (B, T)
        if self.args.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        if self._use_tree_gae(mask.size(0)):
            advantages, returns, values = tree_gae(self.last_rollout, rewards, values, mask, self.args.gamma,
                                                   self.args.lam)
        else:
            advantages, returns = token_gae(rewards, values, mask, self.args.gamma, self.args.lam)
        self._log_rollout_objective(scores, kl, values, returns, mask)
        if self.args.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        advantages = without_unscorable(advantages, self._local_rewards(mask.size(0))[0])  # TRL's meaning of None
        output.update(advantages=advantages, returns=returns, old_values=values)
        return output

    @torch.no_grad()
    def _rollout_logps(self, output: dict[str, Any]) -> torch.Tensor:
        """Old logprobs (and, through the capture, values) when GRPO did not need them itself."""
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)  # (B, P + T)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        mode = "train" if self.model.training else "eval"
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            logps, _, _ = self._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask, output["completion_ids"].size(1), batch_size=batch_size)
        return logps

    def _scores(self, output: dict[str, Any]) -> torch.Tensor:
        """This rank's sequence scores (B,): weighted reward sum, unscorable as 0, minus missing_eos_penalty."""
        completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
        local, _ = self._local_rewards(completion_ids.size(0))
        scores = torch.nan_to_num(local.float(), nan=0.0).to(completion_ids.device)  # (B,)
        if self.args.missing_eos_penalty is not None:
            lengths = completion_mask.sum(dim=1).long()
            last = completion_ids.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
            stops = torch.tensor(self.eos_token_ids, device=completion_ids.device)
            missing = ~torch.isin(last, stops) | (lengths == 0)
            scores = scores - self.args.missing_eos_penalty * missing.float()
        return scores

    def _use_tree_gae(self, num_rows: int) -> bool:
        batch = self.last_rollout
        return bool(self.args.tree_gae_enabled and batch is not None and len(batch.leaves) == num_rows)

    # -- the loss ----------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P + T)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        mask = mask.float()
        logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True)  # (B, T)
        values = self._captured_values  # (B, T), with grad
        pg_loss, pg = policy_loss(logps, inputs["old_per_token_logps"], inputs["advantages"], mask,
                                  self.args.cliprange)
        vf_loss, vf_clipfrac = value_loss(values, inputs["old_values"], inputs["returns"], mask,
                                          self.args.cliprange_value)
        loss = pg_loss + self.args.vf_coef * vf_loss
        mode = "train" if self.model.training else "eval"
        self._log_means(mode, {
            "loss/policy_avg": pg_loss, "loss/value_avg": vf_loss, "loss/total": loss,
            "policy/approxkl_avg": pg.approx_kl, "policy/clipfrac_avg": pg.clipfrac,
            "policy/entropy_avg": masked_mean(entropies, mask), "val/clipfrac_avg": vf_clipfrac, "val/ratio": pg.ratio,
        })
        # HF does not scale GRPO losses for accumulation; current_* is set by the training loop (outside it: the config's)
        accumulation = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        return loss / (accumulation if mode == "train" else 1.0)

    # -- metrics ----------------------------------------------------------------------------------------
    def _log_rollout_objective(self, scores, kl, values, returns, mask) -> None:
        """TRL PPO's rollout metrics: per-sequence KL, penalty and score means; critic fit (over ranks)."""
        mode = "train" if self.model.training else "eval"
        seq_kl = kl.sum(dim=1)  # (B,)
        non_score = -self.args.kl_coef * seq_kl
        self._log_means(mode, {
            "objective/kl": seq_kl.mean(), "objective/non_score_reward": non_score.mean(),
            "objective/scores": scores.mean(), "objective/rlhf_reward": (scores + non_score).mean(),
            "val/mean": masked_mean(values, mask), "val/returns_mean": masked_mean(returns, mask),
            "val/explained_variance": explained_variance(values, returns, mask),
        })

    def _log_means(self, mode: str, metrics: dict[str, torch.Tensor]) -> None:
        """Append each metric's mean over ranks (one gather for all of them)."""
        local = torch.stack([v.detach().float().reshape(()) for v in metrics.values()]).to(self.accelerator.device)
        means = self.accelerator.gather(local).view(-1, len(metrics)).mean(dim=0).tolist()
        for key, value in zip(metrics, means):
            self._metrics[mode][key].append(value)

    # -- optimizer --------------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        """Trainer's optimizer, with the value head in its own param group when ``value_learning_rate`` is set."""
        optimizer = super().create_optimizer(model)
        lr = self.args.value_learning_rate
        head = {id(p) for p in self.value_head.parameters()}
        if lr is None or not any(id(p) in head for g in optimizer.param_groups for p in g["params"]):
            return optimizer
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in head]
        optimizer.add_param_group({"params": list(self.value_head.parameters()), "lr": lr, "weight_decay": 0.0})
        return optimizer

    # -- the policy inside the wrapper ---------------------------------------------------------------------
    def _policy_of(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.policy if isinstance(module, PolicyAndValueHead) else module

    @contextlib.contextmanager
    def _policy_as_model(self):
        """``self.model`` is the bare policy inside the block (what the Trainer's save and load code expects)."""
        wrapper = self.model
        self.model = self._policy_of(wrapper)
        try:
            yield self.model
        finally:
            self.model = wrapper

    # -- checkpoints ---------------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The policy as a plain causal LM (the user's own keys), the head as ``value_head.safetensors`` beside it.

        ``state_dict`` is the wrapper's (the Trainer gathers it from the DDP / DeepSpeed / FSDP module).
        """
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if state_dict is None:
            state_dict = self.accelerator.unwrap_model(self.model).state_dict()
        policy_state, head_state = split_state_dict(state_dict)
        check_finite_state_dict({**policy_state, **{VALUE_HEAD_PREFIX + k: v for k, v in head_state.items()}},
                                output_dir)
        with self._policy_as_model():
            super()._save(output_dir, state_dict=policy_state)
        if self.args.should_save and head_state:
            save_value_head(head_state, output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """The policy from ``model.safetensors``, the head from ``value_head.safetensors``.

        Under FSDP the Trainer restores the whole wrapper from its own sharded checkpoint (head included);
        under DeepSpeed it never calls this (the engine's checkpoint holds both).
        """
        if self.is_fsdp_enabled:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        policy = self._policy_of(self.accelerator.unwrap_model(model if model is not None else self.model))
        super()._load_from_checkpoint(resume_from_checkpoint, policy)
        self._load_value_head_from(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:  # their checkpoints hold the wrapper, head included
            return super()._load_best_model()
        with self._policy_as_model():
            super()._load_best_model()
        self._load_value_head_from(self.state.best_model_checkpoint)

    def _load_value_head_from(self, directory: str) -> None:
        head = load_value_head(directory, self.value_head.summary.weight.device)
        if head is None:
            raise ValueError(f"{directory} has no {VALUE_HEAD_FILE}: it was not written by ThawPPOTrainer, so the "
                             f"critic cannot be restored. Resume from a ThawPPOTrainer checkpoint.")
        self.value_head.load_state_dict(head.state_dict())
