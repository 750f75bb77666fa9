"""TRL trainers whose rollouts come from thaw-rl's tree sampler.

- ``ThawGRPOTrainer`` / ``ThawGRPOConfig``: TRL 1.16's GRPOTrainer with generation through one seam
  (``_generate_single_turn``); tree specs add per-token tree credit (``tree_advantages``).
- ``ThawBestOfNTrainer`` / ``ThawBestOfNConfig``: sample N per prompt, keep the best k, NLL fine-tune.
- ``ThawPPOTrainer`` / ``ThawPPOConfig``: PPO with a value head, GAE (per tree node with ``tree_gae``) and a
  KL-penalised reward, on the same rollouts (TRL 1.16 has no PPOTrainer).

Importing this package imports TRL (slow); ``thaw_rl`` itself only does so when one of these names is
first used.
"""

from thaw_rl.trainers.best_of_n_config import ThawBestOfNConfig
from thaw_rl.trainers.best_of_n_trainer import ThawBestOfNTrainer
from thaw_rl.trainers.grpo_config import ThawGRPOConfig
from thaw_rl.trainers.grpo_trainer import ThawGRPOTrainer
from thaw_rl.trainers.ppo_config import ThawPPOConfig
from thaw_rl.trainers.ppo_trainer import ThawPPOTrainer
from thaw_rl.trainers.rollout_metrics import reduce_rollout_metrics
from thaw_rl.trainers.tree_advantages import node_advantages, node_values, tree_advantages

__all__ = [
    "ThawBestOfNConfig",
    "ThawBestOfNTrainer",
    "ThawGRPOConfig",
    "ThawGRPOTrainer",
    "ThawPPOConfig",
    "ThawPPOTrainer",
    "node_advantages",
    "node_values",
    "reduce_rollout_metrics",
    "tree_advantages",
]
