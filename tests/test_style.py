"""The tree passes the ruff configuration in pyproject.toml (line length 120; pycodestyle, pyflakes,
import order)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_ruff_passes():
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=root, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
