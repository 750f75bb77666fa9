"""The ``thaw-rl`` command: ``train`` (a recipe, in this process or under ``accelerate launch``) and ``list``.

``HELP`` below is what ``thaw-rl --help`` prints. This module imports nothing heavy at the top, so ``--help``
and ``list`` answer without importing torch (tests/test_cli.py checks); ``train`` imports on use.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

USAGE = ("usage: thaw-rl train RECIPE [--accelerate-config NAME] [--num-processes N] [--main-process-port P] "
         "[--key value ...]\n       thaw-rl train [RECIPE] --help | --help-all\n       thaw-rl list")
HELP = f"""{USAGE}

thaw-rl train RECIPE runs a recipe: a path, or a name from recipes/ (thaw-rl list shows them). Without
--accelerate-config it runs in this process (python -m thaw_rl.train --config RECIPE ...); with one it runs

    accelerate launch --config_file configs/NAME.yaml -m thaw_rl.train --config RECIPE ...

after checking the recipe here, so a bad key is reported once instead of once per rank. Every other
--key value overrides a recipe field.

thaw-rl train RECIPE --help shows the recipe's fields (model, data, rewards, tree and engine, the common
training fields) with their values; --help-all adds every TRL and transformers field.
thaw-rl list shows the recipes and accelerate configs found (./recipes, ./configs, then the package's)."""
LAUNCH_OPTIONS = {"--accelerate-config": "accelerate_config", "--num-processes": "num_processes",
                  "--main-process-port": "main_process_port"}


def search_dirs(kind: str) -> list[Path]:
    """``./<kind>`` first, then the source tree's ``<kind>`` (recipes/ and configs/ live next to thaw_rl/)."""
    dirs = [Path.cwd() / kind, Path(__file__).resolve().parents[1] / kind]
    unique = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def available(kind: str) -> list[str]:
    return sorted({p.stem for d in search_dirs(kind) for p in d.glob("*.yaml")})


def resolve_file(name: str, kind: str) -> Path:
    """A path as given, or ``<kind>/<name>.yaml``; ``ValueError`` lists what exists."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    for d in search_dirs(kind):
        for candidate in (d / name, d / f"{name}.yaml"):
            if candidate.is_file():
                return candidate
    what = "recipe" if kind == "recipes" else "accelerate config"
    where = ", ".join(str(d) for d in search_dirs(kind)) or f"./{kind}"
    raise ValueError(f"{what} {name!r} not found: give a path, or one of {available(kind)} (from {where}).")


def split_args(rest: list[str]) -> tuple[dict[str, str], list[str]]:
    """(launch options, recipe overrides) from the arguments after RECIPE."""
    options, overrides, i = {}, [], 0
    while i < len(rest):
        token = rest[i]
        name, eq, value = token.partition("=")
        if name in LAUNCH_OPTIONS:
            if not eq:
                if i + 1 >= len(rest):
                    raise ValueError(f"{name} needs a value.")
                value, i = rest[i + 1], i + 1
            options[LAUNCH_OPTIONS[name]] = value
        else:
            overrides.append(token)
        i += 1
    return options, overrides


def launch_command(recipe: Path, options: dict[str, str], overrides: list[str]) -> list[str]:
    """The ``accelerate launch`` command line for a recipe."""
    config = resolve_file(options["accelerate_config"], "configs")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    if "num_processes" in options:
        cmd += ["--num_processes", str(int(options["num_processes"]))]
    if "main_process_port" in options:
        cmd += ["--main_process_port", str(int(options["main_process_port"]))]
    return cmd + ["-m", "thaw_rl.train", "--config", str(recipe), *overrides]


def train(argv: list[str]) -> int:
    from thaw_rl import train as train_module

    if HELP_FLAGS & set(argv):
        return train_help(argv)
    if not argv or argv[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        recipe = resolve_file(argv[0], "recipes")
        options, overrides = split_args(argv[1:])
        if "num_processes" in options and "accelerate_config" not in options:
            raise ValueError("--num-processes needs --accelerate-config (e.g. --accelerate-config cpu).")
        args = ["--config", str(recipe), *overrides]
        if "accelerate_config" in options:
            cmd = launch_command(recipe, options, overrides)
            checked = train_module.parse_recipe(args)  # report a bad recipe once, not once per rank
            train_module.load_rewards(checked)
    except ValueError as err:  # a bad recipe or command line (RecipeError is a ValueError): one line
        print(f"thaw-rl: error: {err}", file=sys.stderr)
        return 2
    if "accelerate_config" not in options:
        # outside the try: an error raised while training (a reward function's, say) keeps its traceback
        return train_module.main(args)
    print("thaw-rl: " + " ".join(cmd[1:]), flush=True)
    return subprocess.run(cmd).returncode


# -- train --help ---------------------------------------------------------------------------------------------
HELP_FLAGS = {"-h", "--help", "--help-all"}
# ModelConfig fields a recipe usually sets (the rest are PEFT / quantization, which thaw_rl.train refuses)
MODEL_FIELDS = ("model_name_or_path", "model_revision", "dtype", "attn_implementation")
# TRL / transformers training fields a recipe usually sets, in reading order
TRAINING_FIELDS = ("output_dir", "max_steps", "num_train_epochs", "learning_rate", "lr_scheduler_type",
                   "per_device_train_batch_size", "gradient_accumulation_steps", "num_generations",
                   "max_completion_length", "temperature", "beta", "loss_type", "scale_rewards", "reward_weights",
                   "steps_per_generation", "num_iterations", "seed", "use_cpu", "bf16", "gradient_checkpointing",
                   "logging_steps", "save_strategy", "report_to", "log_completions")


def plain(text: str | None) -> str:
    """Help text without reStructuredText markup: ``x`` and :class:`~a.b.X` become x and X; one line."""
    text = re.sub(r":[a-z]+:`~?(?:[\w.]+\.)?([^`]+)`", r"\1", text or "")
    text = re.sub(r"``([^`]+)``", r"\1", text)
    return " ".join(text.split())


def _help_target(argv: list[str]) -> tuple[Path | None, dict, str]:
    """(recipe path or None, its fields, trainer name) for ``train ... --help``."""
    from thaw_rl import train as train_module

    recipe_path = None if not argv or argv[0].startswith("-") else resolve_file(argv[0], "recipes")
    fields = train_module.read_recipe(recipe_path) if recipe_path else {}
    trainer = train_module._option(argv, "--trainer") or fields.get("trainer") or train_module.DEFAULT_TRAINER
    return recipe_path, fields, str(trainer)


def _config_class(trainer: str) -> type:
    """The trainer's config class alone (not the trainer, whose import pulls in TRL's vLLM checks)."""
    from thaw_rl import train as train_module

    if trainer not in train_module.TRAINERS:
        raise train_module.RecipeError(f"trainer={trainer!r} is unknown: choose one of {sorted(train_module.TRAINERS)}.")
    with warnings.catch_warnings():  # TRL's vLLM version warnings say nothing about a recipe's fields
        warnings.simplefilter("ignore")
        return train_module._import(train_module.TRAINERS[trainer][0])


def _shown(path: Path) -> str:
    """A path as a user would type it: relative to the working directory when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _field_lines(f, recipe: dict, first_sentence: bool) -> list[str]:
    from dataclasses import MISSING

    default = f.default if f.default is not MISSING else (
        f.default_factory() if f.default_factory is not MISSING else None)
    head = f"  --{f.name} (default {default!r}" + (f"; recipe: {recipe[f.name]!r})" if f.name in recipe else ")")
    text = plain(f.metadata.get("help"))
    if first_sentence and ". " in text:
        text = text.split(". ")[0] + "."
    return [head] + textwrap.wrap(text, 100, initial_indent=" " * 6, subsequent_indent=" " * 6)


def recipe_help(argv: list[str]) -> str:
    """The fields a recipe is made of, grouped, its own first; TRL's hundreds are left to --help-all."""
    import dataclasses

    from thaw_rl import train as train_module

    recipe_path, recipe, trainer = _help_target(argv)
    config_cls = _config_class(trainer)
    from trl import GRPOConfig, ModelConfig

    ours = [f for f in dataclasses.fields(config_cls) if f.name not in {g.name for g in dataclasses.fields(GRPOConfig)}]
    training = {f.name: f for f in dataclasses.fields(config_cls)}
    model = {f.name: f for f in dataclasses.fields(ModelConfig)}
    groups = [
        ("recipe: trainer, data, rewards, outputs (ThawScriptArguments)", dataclasses.fields(
            train_module.ThawScriptArguments), False),
        ("model (TRL's ModelConfig)", [model[n] for n in MODEL_FIELDS], True),
        (f"thaw-rl: engine, tree, credit and trainer fields ({config_cls.__name__}'s own, beyond GRPOConfig)", ours,
         False),
        ("training: the TRL / transformers fields recipes usually set", [training[n] for n in TRAINING_FIELDS
                                                                         if n in training], True),
    ]
    shown = {f.name for _, fs, _ in groups for f in fs}
    rest = len(set(training) | set(model)) - len(shown & (set(training) | set(model)))
    lines = [USAGE, ""]
    if recipe_path:
        lines += textwrap.wrap(f"{_shown(recipe_path)} (trainer {trainer!r}) sets: " + ", ".join(
            k for k in recipe if k != "env") + ".", 110)
    else:
        lines.append(f"Fields of a recipe with trainer {trainer!r} (the default; trainer: best_of_n or ppo in a recipe, "
                     f"or --trainer, shows theirs). Recipes: {', '.join(available('recipes'))}.")
    lines.append("A recipe field is a YAML key; --key value on the command line overrides it.")
    for title, fields, short in groups:
        lines += ["", title + ":"]
        for f in fields:
            lines += _field_lines(f, recipe, short)
    launch = ["", "launch options (thaw-rl train only):",
              "  --accelerate-config NAME   run under accelerate launch with configs/NAME.yaml "
              f"({', '.join(available('configs'))})",
              "  --num-processes N          processes (with --accelerate-config)",
              "  --main-process-port P      rank 0's port (with --accelerate-config)"]
    lines += launch
    again = f"thaw-rl train {argv[0]} --help-all" if recipe_path else "thaw-rl train --help-all"
    lines += ["", f"{rest} more fields (TRL's and transformers' training fields, ModelConfig's PEFT and "
                  f"quantization fields): {again}"]
    return "\n".join(lines)


def full_help(argv: list[str]) -> str:
    """TrlParser's help over every field (TRL's and transformers' hundreds), without rst markup."""
    from thaw_rl import train as train_module

    recipe_path, _, trainer = _help_target(argv)
    parser = train_module.make_parser(_config_class(trainer))
    parser.prog = f"thaw-rl train {_shown(recipe_path) if recipe_path else 'RECIPE'}"
    for action in parser._actions:
        if action.help and action.help != argparse.SUPPRESS:
            action.help = plain(action.help).replace("%", "%%") if "%(" not in action.help else action.help
    return parser.format_help()


def train_help(argv: list[str]) -> int:
    try:
        print(full_help(argv) if "--help-all" in argv else recipe_help(argv))
    except ValueError as err:  # an unknown recipe or trainer
        print(f"thaw-rl: error: {err}", file=sys.stderr)
        return 2
    return 0


def list_files() -> int:
    for kind in ("recipes", "configs"):
        print(f"{kind}: {', '.join(available(kind)) or '(none found)'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        return train(rest)
    if command == "list":
        return list_files()
    print(f"thaw-rl: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
