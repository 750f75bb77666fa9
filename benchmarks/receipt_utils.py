"""Shared by the benchmark scripts: which commit a receipt was measured on."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def git_commit() -> str | None:
    """HEAD of this checkout, or $THAW_COMMIT where the tree was copied without .git (the GPU machines)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
        if out.returncode == 0:
            return out.stdout.strip()
    except OSError:
        pass
    return os.environ.get("THAW_COMMIT")
