"""``ThawPPOConfig``: TRL's former ``PPOConfig`` fields on top of ``ThawGRPOConfig``'s rollout fields.

TRL 1.16 removed ``PPOTrainer``; ``ThawPPOTrainer`` is built on ``ThawGRPOTrainer`` (a ``GRPOTrainer``,
so a ``transformers.Trainer``), so this config is a ``ThawGRPOConfig`` and every TRL/Trainer field keeps
its meaning. The PPO fields below carry the names users know from TRL's PPOConfig and are mapped onto
GRPO's generation buffer in ``__post_init__``:

- a *rollout batch* (per rank) is sampled once, then trained on for ``num_ppo_epochs`` passes
  (GRPO's ``num_iterations``), each pass split into ``num_mini_batches`` optimizer steps;
- one optimizer step (mini-batch) is ``gradient_accumulation_steps`` micro-batches of
  ``per_device_train_batch_size`` rows, so a rollout batch is
  ``per_device_train_batch_size * gradient_accumulation_steps * num_mini_batches`` rows per rank (TRL
  PPO's ``local_batch_size``), or ``rollout_batch_size`` when that is given; GRPO's
  ``steps_per_generation`` becomes ``num_mini_batches * gradient_accumulation_steps``.

Rows are completions: each prompt is sampled ``num_generations`` times (forked from one prefill, or as a
deeper tree with ``tree_spec``), and a rank's rollout batch must hold whole groups.

``__post_init__`` rejects what cannot work, naming the fields, their values and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from thaw_rl.trainers.grpo_config import ThawGRPOConfig

KL_ESTIMATORS = ("k1", "k3")


@dataclass
class ThawPPOConfig(ThawGRPOConfig):
    """Configuration of ``ThawPPOTrainer``: every ``ThawGRPOConfig`` field plus TRL PPO's fields below."""

    # -- the PPO batch ------------------------------------------------------------------------------------
    num_ppo_epochs: int = field(
        default=4, metadata={"help": "Passes over each rollout batch (TRL PPO's num_ppo_epochs; GRPO's num_iterations)."})
    num_mini_batches: int = field(
        default=1,
        metadata={"help": "Optimizer steps per PPO epoch: the rollout batch is split into this many mini-batches "
                          "(each gradient_accumulation_steps micro-batches of per_device_train_batch_size rows)."})
    rollout_batch_size: int | None = field(
        default=None,
        metadata={"help": "Completions sampled per rank per rollout (TRL PPO's local_batch_size). None: "
                          "per_device_train_batch_size * gradient_accumulation_steps * num_mini_batches. When set, "
                          "it must split into num_mini_batches mini-batches of whole micro-batches, and "
                          "gradient_accumulation_steps is derived from it."})
    # -- the objective --------------------------------------------------------------------------------------
    cliprange: float = field(
        default=0.2, metadata={"help": "Clip range of the policy ratio: the ratio is kept in [1 - c, 1 + c]."})
    cliprange_value: float | None = field(
        default=0.2,
        metadata={"help": "Clip range of the value prediction around the rollout's value (None: no value clipping)."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss in the total loss."})
    value_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the value head's own parameters (its param group follows the same "
                          "schedule). None: learning_rate. A critic usually wants a larger one than the policy."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor of the per-token rewards."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda (bias/variance trade-off of the advantages)."})
    kl_coef: float = field(
        default=0.05,
        metadata={"help": "Per-token KL penalty against the reference model, added to the reward: "
                          "r_t = -kl_coef * KL_t (+ the reward functions' score at the last token). 0: no reference "
                          "model is built."})
    kl_estimator: str = field(
        default="k1",
        metadata={"help": "Per-token KL estimator of the penalty: 'k1' (log p - log p_ref, TRL PPO's default) or "
                          "'k3' (exp(log p_ref - log p) - 1 - (log p_ref - log p), non-negative)."})
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Reference model for the KL penalty, loaded like the policy (model_init_kwargs). None: the "
                          "policy's own path when the trainer is given a name, else a frozen copy of the policy "
                          "as it was at construction."})
    whiten_rewards: bool = field(
        default=False, metadata={"help": "Scale the per-token rewards of a rollout batch to unit variance (per rank)."})
    whiten_advantages: bool = field(
        default=True, metadata={"help": "Normalise the advantages of a rollout batch to mean 0, variance 1 (per rank)."})
    missing_eos_penalty: float | None = field(
        default=None,
        metadata={"help": "Subtracted from the score of a completion that ends without a stop token (truncated)."})
    tree_gae: bool | None = field(
        default=None,
        metadata={"help": "Run GAE once per rollout-tree node: tokens shared by several leaves get one value and one "
                          "advantage, whose bootstrap at a branch point is the mean over the children. None: on for "
                          "'segments' and 'entropy' trees (the only ones with shared completion tokens)."})
    # -- generation -------------------------------------------------------------------------------------
    response_length: int | None = field(
        default=None,
        metadata={"help": "TRL PPO's name for max_completion_length; when set it replaces max_completion_length."})
    stop_token: str | None = field(
        default="eos",
        metadata={"help": "'eos': completions stop at the tokenizer's eos (TRL GRPO's behaviour). None: they run to "
                          "max_completion_length unless stop_token_id is set."})
    stop_token_id: int | None = field(
        default=None, metadata={"help": "Stop completions at this token id instead of eos."})
    # -- GRPO fields with PPO defaults ------------------------------------------------------------------------
    disable_dropout: bool = field(
        default=True,
        metadata={"help": "Turn dropout off in the policy and reference model: PPO's ratios and values must not be noisy."})
    tree_credit: bool | None = field(
        default=False, metadata={"help": "Not used by PPO (GAE gives per-token credit; see tree_gae). Leave False."})

    def __post_init__(self) -> None:
        if self.response_length is not None:
            self.max_completion_length = self.response_length
        self._check_ppo_fields()
        self._derive_batch_layout()
        super().__post_init__()
        if self.stop_token_id is not None and self.stop_token_id < 0:
            raise ValueError(f"stop_token_id={self.stop_token_id} must be a token id (>= 0), or None.")

    # -- checks -----------------------------------------------------------------------------------------
    def _check_ppo_fields(self) -> None:
        self._check_num_generations()  # the batch layout below divides by it
        if self.num_mini_batches < 1:
            raise ValueError(f"num_mini_batches={self.num_mini_batches}: a rollout batch needs at least one "
                             f"mini-batch (optimizer step) per PPO epoch; set num_mini_batches >= 1 (default 1).")
        if self.num_ppo_epochs < 1:
            raise ValueError(f"num_ppo_epochs={self.num_ppo_epochs}: set num_ppo_epochs >= 1 (default 4).")
        if self.cliprange <= 0:
            raise ValueError(f"cliprange={self.cliprange} must be > 0 (e.g. 0.2).")
        if self.cliprange_value is not None and self.cliprange_value <= 0:
            raise ValueError(f"cliprange_value={self.cliprange_value} must be > 0 (e.g. 0.2), or None for no clipping.")
        if self.value_learning_rate is not None and self.value_learning_rate <= 0:
            raise ValueError(f"value_learning_rate={self.value_learning_rate} must be > 0, or None for learning_rate.")
        if self.vf_coef < 0 or self.kl_coef < 0:
            raise ValueError(f"vf_coef={self.vf_coef} and kl_coef={self.kl_coef} must be >= 0.")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1].")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator={self.kl_estimator!r}: use one of {KL_ESTIMATORS}.")
        if self.stop_token not in (None, "eos"):
            raise ValueError(f"stop_token={self.stop_token!r}: use 'eos', or None with stop_token_id for another token.")
        self._check_grpo_fields_left_alone()

    def _check_grpo_fields_left_alone(self) -> None:
        """GRPO fields whose job the PPO fields do; setting both would be ambiguous."""
        if self.beta != 0.0:
            raise ValueError(f"beta={self.beta}: PPO puts the KL penalty into the reward with kl_coef; leave beta=0.0 "
                             f"and set kl_coef={self.beta} instead.")
        if self.num_iterations not in (1, self.num_ppo_epochs):
            raise ValueError(f"num_iterations={self.num_iterations}: PPO sets it from num_ppo_epochs; set "
                             f"num_ppo_epochs={self.num_iterations} and leave num_iterations unset.")
        if self.generation_batch_size is not None or self.steps_per_generation is not None:
            raise ValueError(
                f"generation_batch_size={self.generation_batch_size}, steps_per_generation="
                f"{self.steps_per_generation}: PPO derives both from rollout_batch_size / num_mini_batches; set those "
                f"and leave generation_batch_size and steps_per_generation unset.")
        if self.tree_credit:
            raise ValueError("tree_credit=True: PPO credits tokens with GAE over the value head (tree_gae does it per "
                             "tree node); set tree_credit=False.")
        if self.async_rollouts:
            raise ValueError("async_rollouts=True is not supported by ThawPPOTrainer yet: its ratio is taken against "
                             "logprobs the trainer recomputes, so samples from older weights would go uncorrected. Set "
                             "async_rollouts=False (rollout_backend='pool' runs synchronously).")
        if self.native_importance_sampling_correction:
            raise ValueError("native_importance_sampling_correction=True: PPO's ratio is taken against the rollout "
                             "policy's logprobs already; set it to False.")
        if self.sync_ref_model:
            raise ValueError("sync_ref_model=True is not supported by ThawPPOTrainer: the reference model stays the "
                             "initial policy. Set sync_ref_model=False.")
        if self.cast_lm_head_to_fp32:
            raise ValueError("cast_lm_head_to_fp32=True is not supported by ThawPPOTrainer (the reference model would "
                             "score with a different head than the policy). Set cast_lm_head_to_fp32=False.")

    def _derive_batch_layout(self) -> None:
        """rollout batch = num_mini_batches x gradient_accumulation_steps x per_device_train_batch_size rows."""
        micro = self.per_device_train_batch_size
        if self.rollout_batch_size is not None:
            n = self.num_mini_batches
            if self.rollout_batch_size < 1 or self.rollout_batch_size % n:
                lower = max(self.rollout_batch_size // n, 1) * n
                raise ValueError(
                    f"rollout_batch_size={self.rollout_batch_size} is not divisible by num_mini_batches={n}: each "
                    f"PPO epoch splits the rollout batch into {n} equal mini-batches. Set rollout_batch_size to a "
                    f"multiple of {n} (e.g. {lower} or {lower + n}) or num_mini_batches to one of its divisors.")
            mini = self.rollout_batch_size // n
            if mini % micro:
                raise ValueError(
                    f"rollout_batch_size={self.rollout_batch_size} / num_mini_batches={n} = {mini} rows per "
                    f"mini-batch is not a multiple of per_device_train_batch_size={micro}: a mini-batch is a whole "
                    f"number of micro-batches. Set per_device_train_batch_size to a divisor of {mini}.")
            accumulation = mini // micro
            if self.gradient_accumulation_steps not in (1, accumulation):
                raise ValueError(
                    f"gradient_accumulation_steps={self.gradient_accumulation_steps} disagrees with rollout_batch_size="
                    f"{self.rollout_batch_size} / num_mini_batches={n} / per_device_train_batch_size={micro} = "
                    f"{accumulation} micro-batches per optimizer step; leave gradient_accumulation_steps unset.")
            self.gradient_accumulation_steps = accumulation
        self.steps_per_generation = self.num_mini_batches * self.gradient_accumulation_steps
        self.num_iterations = self.num_ppo_epochs
        self.rollout_batch_size = micro * self.steps_per_generation
        if self.rollout_batch_size % self.num_generations:
            raise ValueError(
                f"rollout batch of {self.rollout_batch_size} rows per rank (per_device_train_batch_size={micro} x "
                f"gradient_accumulation_steps={self.gradient_accumulation_steps} x num_mini_batches="
                f"{self.num_mini_batches}) is not a multiple of num_generations={self.num_generations}: each prompt's "
                f"samples are forked from one prefill on one rank. Make the rollout batch a multiple of "
                f"{self.num_generations}, e.g. per_device_train_batch_size={self.num_generations}.")

    # -- derived ----------------------------------------------------------------------------------------
    @property
    def tree_gae_enabled(self) -> bool:
        """Whether GAE runs per tree node (shared tokens get one value and advantage)."""
        if self.tree_gae is None:
            return self.tree_spec in ("segments", "entropy")
        return bool(self.tree_gae)
