"""``ThawBestOfNTrainer``: sample N per prompt, keep the best k by reward, fine-tune on them with NLL.

Rejection-sampling fine-tuning (RAFT / ReST-style) reuses everything GRPO already has: the prompt
data flow and group layout, reward functions and their logging, and ``ThawGRPOTrainer``'s forked
sampling (each prompt is prefilled once and forked N ways). So it subclasses ``ThawGRPOTrainer`` and
changes two things:

- ``_generate_and_score_completions`` calls the parent, then keeps only the k best rows of each group
  (ties: the earlier sample) and drops the others from the batch, so training computes nothing for
  rejected samples. Each rank's kept rows are split into ``steps_per_generation`` micro-batches as
  usual; the config checks that they divide evenly.
- ``_compute_loss`` is the token-mean negative log-likelihood of the kept completions at temperature 1
  (the sampling temperature shapes exploration, not the target), divided for gradient accumulation
  like TRL's GRPO losses.

Metrics: ``best_of_n/reward`` (all samples), ``best_of_n/kept_reward`` and ``best_of_n/nll``, next to
TRL's reward metrics and the ``thaw/...`` rollout metrics.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from thaw_rl.trainers.best_of_n_config import ThawBestOfNConfig
from thaw_rl.rewards.reward_checks import without_unscorable
from thaw_rl.trainers.grpo_trainer import ThawGRPOTrainer


class ThawBestOfNTrainer(ThawGRPOTrainer):
    """Best-of-N rejection sampling + NLL fine-tuning; generation through ``ThawGRPOTrainer``'s seam.

    Overrides ``_generate_and_score_completions`` (keeps the top ``best_of_n_keep`` rows per group) and
    ``_compute_loss`` (NLL on them). ``args`` must be a ``ThawBestOfNConfig``.
    """

    _tag_names = ["trl", "best-of-n", "thaw-rl"]

    def __init__(self, model, reward_funcs=None, args: ThawBestOfNConfig | None = None, *rest, **kwargs) -> None:
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = ThawBestOfNConfig(f"{str(name).split('/')[-1] or 'model'}-ThawBestOfN")
        if not isinstance(args, ThawBestOfNConfig):
            raise ValueError(f"ThawBestOfNTrainer needs a ThawBestOfNConfig, got {type(args).__name__}.")
        super().__init__(model, reward_funcs, args, *rest, **kwargs)

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        group = self.num_generations if mode == "train" else self.num_generations_eval
        num_rows = output["completion_ids"].size(0)
        local, everyone = self._local_rewards(num_rows)
        keep = min(self.args.best_of_n_keep, group)
        kept = select_best(local.cpu(), group, keep)  # (B * keep / group,) row indices
        kept_rewards = local[kept]
        weights = torch.ones(len(kept), device=output["completion_ids"].device)  # (K,)
        if self.args.best_of_n_min_reward is not None:
            weights = (kept_rewards >= self.args.best_of_n_min_reward).float().to(weights.device)
        weights = without_unscorable(weights, kept_rewards)  # a completion no reward scored is never a target
        output = take_rows(output, kept.to(output["completion_ids"].device), num_rows)
        output["keep_weights"] = weights
        device = self.accelerator.device
        gathered = self.accelerator.gather(torch.nan_to_num(kept_rewards.to(device).float(), nan=0.0))
        self._metrics[mode]["best_of_n/reward"].append(float(torch.nanmean(everyone.float())))
        self._metrics[mode]["best_of_n/kept_reward"].append(float(gathered.mean()))
        return output

    def _training_group_size(self) -> int:
        """Only the kept rows of each group reach training: they are the groups to shuffle together."""
        return min(self.args.best_of_n_keep, self.num_generations)

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P + T)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        with _temperature(self, 1.0):
            per_token_logps, _, _ = self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, completion_ids.size(1))  # (B, T)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        mask = mask * inputs["keep_weights"][:, None]  # (B, T)
        nll = -(per_token_logps * mask).sum() / mask.sum().clamp(min=1.0)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["best_of_n/nll"].append(self.accelerator.gather(nll.detach()).mean().item())
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        return nll / normalizer


def select_best(rewards: torch.Tensor, group_size: int, keep: int) -> torch.Tensor:
    """Row indices of the ``keep`` highest rewards of each consecutive group (NaN lowest, ties: earlier row).

    >>> select_best(torch.tensor([0.1, 0.9, 0.5, 0.0, 0.0, 1.0]), group_size=3, keep=1).tolist()
    [1, 5]
    """
    grouped = torch.nan_to_num(rewards.float(), nan=-torch.inf).view(-1, group_size)  # (P, G)
    # stable sort on -reward keeps the earlier row first among equal rewards
    order = torch.sort(-grouped, dim=1, stable=True).indices[:, :keep]  # (P, keep)
    order = order.sort(dim=1).values  # kept rows in sample order
    base = torch.arange(grouped.size(0))[:, None] * group_size
    return (base + order).reshape(-1)


def take_rows(output: dict[str, Any], rows: torch.Tensor, num_rows: int) -> dict[str, Any]:
    """Every per-row entry of TRL's batch dict restricted to ``rows``; scalars and others unchanged."""
    out = {}
    for key, value in output.items():
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.size(0) == num_rows:
            out[key] = value.index_select(0, rows.to(value.device))
        elif isinstance(value, list) and len(value) == num_rows:
            out[key] = [value[i] for i in rows.tolist()]
        else:
            out[key] = value
    return out


@contextlib.contextmanager
def _temperature(trainer, value: float):
    previous = trainer.temperature
    trainer.temperature = value
    try:
        yield
    finally:
        trainer.temperature = previous
