"""``CompletionSamples``: what the model answers to the same few prompts before and after training.

Why: a run's reward going up says the model learned something; the answers show what. At the start of
training (step 0) and at its end, the main process decodes the first ``num_prompts`` prompts of the train
dataset greedily (the model's most likely answer, so the two ends differ only by training) on the live
policy, scores them with the trainer's reward functions, and keeps the rows for the end summary
(``thaw_rl.summary``) and a W&B table. The table follows TRL's ``log_completions`` convention (columns
``step``, ``prompt``, ``completion``, one per reward function, logged with ``wandb.Table(dataframe=...)``),
under its own key ``completion_samples`` so it never collides with TRL's ``completions`` table.

Generation uses ``model.generate`` on the unwrapped policy, which every rank holds whole under DDP and
ZeRO-0/1/2; under ZeRO-3 or FSDP (parameters sharded, gathering them needs every rank) the samples are
skipped.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

WANDB_KEY = "completion_samples"


@dataclass
class CompletionSample:
    """One prompt's greedy answer at one step, with its rewards (None where a reward could not score it)."""

    step: int
    prompt: str
    completion: str
    rewards: dict[str, float | None]
    reward: float | None  # the weighted sum, as TRL's `reward` metric


class CompletionSamples(TrainerCallback):
    """Greedy answers to the first ``num_prompts`` train prompts at train begin and train end (main process)."""

    def __init__(self, trainer, num_prompts: int = 3) -> None:
        self.trainer = trainer
        self.num_prompts = num_prompts
        self.samples: list[CompletionSample] = []

    # -- callback hooks ------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self._take(state)

    def on_train_end(self, args, state, control, **kwargs):
        self._take(state)
        if self.samples and state.is_world_process_zero:
            self._log_wandb(args)

    # -- what the summary reads ------------------------------------------------------------------------------
    def as_dicts(self) -> list[dict]:
        return [asdict(s) for s in self.samples]

    # -- internals ---------------------------------------------------------------------------------------
    def _take(self, state) -> None:
        if not state.is_world_process_zero or self.num_prompts < 1 or self._sharded():
            return
        if self.samples and self.samples[-1].step == state.global_step:
            return  # a run of 0 steps: begin and end are the same model
        rows = [self.trainer.train_dataset[i] for i in range(min(self.num_prompts, len(self.trainer.train_dataset)))]
        try:
            self.samples += self._answer(rows, state)
        except Exception as err:  # the samples are a view of the run, never a reason to lose it
            logger.warning("thaw-rl: completion samples skipped at step %d: %s: %s", state.global_step,
                           type(err).__name__, err)

    def _sharded(self) -> bool:
        t = self.trainer
        if getattr(t, "is_fsdp_enabled", False):
            return True
        plugin = getattr(t.accelerator.state, "deepspeed_plugin", None)
        return bool(getattr(t, "is_deepspeed_enabled", False) and plugin is not None and plugin.zero_stage == 3)

    @torch.no_grad()
    def _answer(self, rows: list[dict], state) -> list[CompletionSample]:
        from trl.data_utils import maybe_apply_chat_template

        t = self.trainer
        tok = t.processing_class
        model = t.accelerator.unwrap_model(t.model)
        texts = [maybe_apply_chat_template({"prompt": r["prompt"]}, tok)["prompt"] for r in rows]
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            completions = []
            for text in texts:  # one at a time: no padding, so the answer is what a lone request gets
                ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)  # (1, L)
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=t.max_completion_length, pad_token_id=tok.pad_token_id)
                completions.append(out[0, ids.shape[1]:].tolist())
        finally:
            model.train(was_training)
        decoded = [tok.decode(c, skip_special_tokens=True) for c in completions]
        rewards = self._rewards(rows, decoded, completions, state)
        samples = []
        for i, (row, text) in enumerate(zip(rows, decoded)):
            per_func = {name: values[i] for name, values in rewards.items()}
            weighted = None
            if per_func and all(v is not None for v in per_func.values()):
                weights = t.reward_weights.tolist()
                weighted = sum(w * per_func[name] for w, name in zip(weights, t.reward_func_names))
            samples.append(CompletionSample(state.global_step, _prompt_text(row["prompt"]), text.strip(),
                                            per_func, weighted))
        return samples

    def _rewards(self, rows, decoded, completion_ids, state) -> dict[str, list[float | None]]:
        """The trainer's reward functions on the samples, called the way TRL calls them (callables only)."""
        from trl.data_utils import is_conversational

        t = self.trainer
        conversational = is_conversational(rows[0])
        completions = [[{"role": "assistant", "content": d}] if conversational else d for d in decoded]
        prompts = [r["prompt"] for r in rows]
        extra = {k: [r[k] for r in rows] for k in rows[0] if k not in ("prompt", "completion", "completion_ids")}
        out = {}
        for func, name in zip(t.reward_funcs, t.reward_func_names):
            if isinstance(func, torch.nn.Module):
                continue  # a reward model: scoring it here would cost a forward per sample
            try:
                values = func(prompts=prompts, completions=completions, completion_ids=completion_ids,
                              trainer_state=state, **extra)
                out[name] = [None if v is None else float(v) for v in values]
            except Exception as err:  # a function needing TRL's log_extra / log_metric hooks, say
                logger.warning("thaw-rl: reward %s could not score the completion samples: %s", name, err)
        return out

    def _log_wandb(self, args) -> None:
        report_to = args.report_to if isinstance(args.report_to, list) else [args.report_to]
        if "wandb" not in report_to and "all" not in report_to:
            return
        import wandb

        if wandb.run is None:
            return
        import pandas as pd

        names = sorted({k for s in self.samples for k in s.rewards})
        table = {"step": [s.step for s in self.samples], "prompt": [s.prompt for s in self.samples],
                 "completion": [s.completion for s in self.samples],
                 **{n: [s.rewards.get(n) for s in self.samples] for n in names},
                 "reward": [s.reward for s in self.samples]}
        wandb.log({WANDB_KEY: wandb.Table(dataframe=pd.DataFrame(table))})


def _prompt_text(prompt) -> str:
    """The last user message of a conversational prompt, or the prompt string itself."""
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
        return str(users[-1] if users else prompt[-1].get("content", ""))
    return str(prompt)
