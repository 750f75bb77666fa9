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
