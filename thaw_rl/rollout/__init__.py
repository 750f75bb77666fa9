"""Tree rollouts: shapes (``TreeSpec``), the sampler (``TreeSampler``) and what it returns (``RolloutBatch``)."""

from thaw_rl.rollout.rollout_batch import Leaf, Node, RolloutBatch, RolloutStats
from thaw_rl.rollout.tree_sampler import TreeSampler
from thaw_rl.rollout.tree_spec import TreeSpec

__all__ = ["Leaf", "Node", "RolloutBatch", "RolloutStats", "TreeSampler", "TreeSpec"]
