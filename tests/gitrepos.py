"""Throwaway git repositories for review tests, built with the real git command.

    git(root, *args) -> str: run git in root, isolated from the user's and system's settings
    calc_repo_with_change(root, *, staged) -> root: a committed `src/calc.py` and README.md,
    then an uncommitted change to `src/calc.py` (a bug in add, a new div), staged or not
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

# A fixed identity and no global or system config: commits work on any machine, and no
# user setting (hooks, signing, diff drivers) can change what a test sees.
GIT_ENV = {
    "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
}

CALC_BEFORE = "def add(a, b):\n    return a + b\n"
CALC_AFTER = "def add(a, b):\n    return a - b\n\n\ndef div(a, b):\n    return a / b\n"


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, env={**os.environ, **GIT_ENV}, check=True,
                          capture_output=True, text=True).stdout


def calc_repo_with_change(root: Path, *, staged: bool) -> Path:
    (root / "src").mkdir(parents=True)
    (root / "src" / "calc.py").write_text(CALC_BEFORE)
    (root / "README.md").write_text("# Calc\n")
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "init")
    (root / "src" / "calc.py").write_text(CALC_AFTER)
    if staged:
        git(root, "add", "src/calc.py")
    return root
