"""The ``thaw-rl`` command.

    thaw-rl train RECIPE [--accelerate-config NAME] [--num-processes N] [--main-process-port P] [--key value ...]
    thaw-rl list

``train`` runs a recipe (a path, or a name from ``recipes/``). Without ``--accelerate-config`` it runs
in this process (``python -m thaw_rl.train --config RECIPE ...``); with one it wraps

    accelerate launch --config_file configs/NAME.yaml -m thaw_rl.train --config RECIPE ...

after checking the recipe here, so a bad key is reported once instead of once per rank. Every other
``--key value`` overrides a recipe field. ``list`` shows the recipes and accelerate configs found.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

USAGE = ("usage: thaw-rl train RECIPE [--accelerate-config NAME] [--num-processes N] [--main-process-port P] "
         "[--key value ...]\n       thaw-rl list")
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

    if not argv or argv[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        recipe = resolve_file(argv[0], "recipes")
        options, overrides = split_args(argv[1:])
        if "num_processes" in options and "accelerate_config" not in options:
            raise ValueError("--num-processes needs --accelerate-config (e.g. --accelerate-config cpu).")
        args = ["--config", str(recipe), *overrides]
        if "accelerate_config" not in options:
            return train_module.main(args)
        cmd = launch_command(recipe, options, overrides)
        checked = train_module.parse_recipe(args)  # report a bad recipe once, not once per rank
        train_module.load_rewards(checked)
    except ValueError as err:  # RecipeError is a ValueError
        print(f"thaw-rl: error: {err}", file=sys.stderr)
        return 2
    print("thaw-rl: " + " ".join(cmd[1:]), flush=True)
    return subprocess.run(cmd).returncode


def list_files() -> int:
    for kind in ("recipes", "configs"):
        print(f"{kind}: {', '.join(available(kind)) or '(none found)'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
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
