"""``ThawBestOfNConfig``: rejection-sampling fine-tuning on top of ``ThawGRPOConfig``.

``num_generations`` is N (samples per prompt), ``best_of_n_keep`` is how many of them, ranked by reward,
are trained on with a plain negative log-likelihood loss. Fields that only mean something for the
policy-gradient loss (the KL term, importance sampling, tree credit) are rejected when set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from thaw_rl.trainers.grpo_config import ThawGRPOConfig


@dataclass
class ThawBestOfNConfig(ThawGRPOConfig):
    """Configuration of ``ThawBestOfNTrainer``: N = ``num_generations`` samples, keep the best ``best_of_n_keep``."""

    _policy_ratio_loss = False  # plain NLL on kept samples: async rollouts need no importance sampling

    tree_spec: str = field(
        default="best_of_n",
        metadata={"help": "Must be 'best_of_n': N samples forked from one prefill of the prompt."})
    best_of_n_keep: int = field(
        default=1, metadata={"help": "Completions kept per prompt (highest reward first) and trained on with NLL."})
    best_of_n_min_reward: float | None = field(
        default=None,
        metadata={"help": "Kept completions with a reward below this get no loss (None: keep the top ones whatever "
                          "their reward)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tree_spec != "best_of_n":
            raise ValueError(f"ThawBestOfNConfig tree_spec={self.tree_spec!r}: best-of-N samples flat groups; set "
                             f"tree_spec='best_of_n' (N is num_generations).")
        if not 1 <= self.best_of_n_keep <= self.num_generations:
            raise ValueError(f"best_of_n_keep={self.best_of_n_keep} must be in [1, num_generations="
                             f"{self.num_generations}].")
        if (self.per_device_train_batch_size * self.best_of_n_keep) % self.num_generations:
            raise ValueError(
                f"per_device_train_batch_size * best_of_n_keep = {self.per_device_train_batch_size} * "
                f"{self.best_of_n_keep} is not a multiple of num_generations={self.num_generations}: each training "
                f"micro-batch holds the kept rows of whole groups. Set per_device_train_batch_size to a multiple "
                f"of {self.num_generations // _gcd(self.num_generations, self.best_of_n_keep)}.")
        if self.beta != 0.0:
            raise ValueError(f"beta={self.beta}: best-of-N trains with plain NLL and no KL term; set beta=0.0.")
        if self.native_importance_sampling_correction:
            raise ValueError("native_importance_sampling_correction=True: the NLL loss has no policy ratio to "
                             "correct; set it to False.")
        if self.tree_credit:
            raise ValueError("tree_credit=True: best-of-N does not use advantages; leave tree_credit=None.")


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a
