"""Shared by the benchmark scripts: which commit a receipt was measured on."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def git_commit() -> str | None:
    """$THAW_COMMIT if set (the GPU machines get a copy of the tree whose .git, if any, is not this checkout's),
    else HEAD of this checkout."""
    if os.environ.get("THAW_COMMIT"):
        return os.environ["THAW_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
        if out.returncode == 0:
            return out.stdout.strip()
    except OSError:
        pass
    return None


def receipt(benchmark: str, args, rows: list[dict]) -> dict:
    """A benchmark's JSON receipt: device, library versions, commit, command, time, arguments and rows."""
    import importlib.metadata as md
    import platform
    import sys
    import time

    import torch

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {
        "benchmark": benchmark,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor()
                                                                                    or platform.machine()),
        "torch": torch.__version__, "transformers": version("transformers"), "trl": version("trl"),
        "torch_threads": torch.get_num_threads(), "git_commit": git_commit(),
        "command": " ".join([sys.executable, *sys.argv]), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": rows,
    }


def write_receipt(path: Path | None, data: dict) -> None:
    """Write ``data`` as indented JSON to ``path`` (its folder made), if a path was given."""
    import json

    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")
