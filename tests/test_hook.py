"""The git pre-commit hook: `dsv4 hook install|uninstall` in real repositories, a real
`git commit` running it, and `.pre-commit-hooks.yaml` used by the real pre-commit framework
from another repository (our package pip-installed into pre-commit's own virtualenv)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dsv4cli.app import main
from dsv4cli.commands import hook
from tests.tinymodels import write_tiny_llama_gguf

PROJECT_ROOT = Path(__file__).resolve().parents[1]
_GIT_ENV = {
    "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
}


def git(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, env={**os.environ, **_GIT_ENV, **(env or {})},
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    (root / "calc.py").write_text("def add(a, b):\n    return a + b\n")
    git(root, "add", "calc.py")
    assert git(root, "commit", "-q", "-m", "init").returncode == 0
    monkeypatch.chdir(root)
    return root


def test_install_writes_an_executable_signed_hook(repo, capsys):
    assert main(["hook", "install"]) == 0
    path = repo / ".git" / "hooks" / "pre-commit"
    text = path.read_text()
    assert text.startswith("#!/bin/sh\n") and hook.SIGNATURE in text and "dsv4 review --staged" in text
    assert path.stat().st_mode & stat.S_IXUSR
    assert f"installed {path}" in capsys.readouterr().err
    # The script is valid sh.
    assert subprocess.run(["sh", "-n", str(path)]).returncode == 0
    # Installing again just rewrites our own hook, with new review options.
    assert main(["hook", "install", "--fail-on", "error", "--timeout", "30"]) == 0
    assert "exec dsv4 review --staged --fail-on error --timeout 30\n" in path.read_text()


def test_install_refuses_a_foreign_hook_unless_forced_and_uninstall_restores_it(repo, capsys):
    path = repo / ".git" / "hooks" / "pre-commit"
    path.write_text("#!/bin/sh\necho theirs\n")
    assert main(["hook", "install"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"Error: a pre-commit hook already exists: {path}") and "--force" in err[0]
    assert path.read_text() == "#!/bin/sh\necho theirs\n"
    assert main(["hook", "install", "--force"]) == 0
    assert hook.SIGNATURE in path.read_text()
    assert (path.parent / "pre-commit.dsv4-backup").read_text() == "#!/bin/sh\necho theirs\n"
    assert main(["hook", "uninstall"]) == 0
    assert path.read_text() == "#!/bin/sh\necho theirs\n" and not (path.parent / "pre-commit.dsv4-backup").exists()
    # A hook we did not write is never removed.
    assert main(["hook", "uninstall"]) == 1
    assert "was not installed by dsv4" in capsys.readouterr().err
    assert path.exists()


def test_uninstall_without_a_hook_is_a_note(repo, capsys):
    assert main(["hook", "uninstall"]) == 0
    assert "nothing to remove" in capsys.readouterr().err


def test_core_hooks_path_is_honoured(repo):
    git(repo, "config", "core.hooksPath", ".githooks")
    (repo / "sub").mkdir()
    os.chdir(repo / "sub")
    assert main(["hook", "install"]) == 0
    assert hook.SIGNATURE in (repo / ".githooks" / "pre-commit").read_text()
    assert not (repo / ".git" / "hooks" / "pre-commit").exists()
    assert main(["hook", "uninstall"]) == 0
    assert not (repo / ".githooks" / "pre-commit").exists()


def test_outside_a_repository(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["hook", "install"]) == 1
    assert capsys.readouterr().err.startswith(f"Error: not a git repository: {tmp_path}")


def test_bad_fail_on_is_a_usage_error(repo):
    assert main(["hook", "install", "--fail-on", "fatal"]) == 2
    assert not (repo / ".git" / "hooks" / "pre-commit").exists()


def test_the_framework_hook_definition():
    yaml = pytest.importorskip("yaml")  # pre-commit's own dependency
    (definition,) = yaml.safe_load((PROJECT_ROOT / ".pre-commit-hooks.yaml").read_text())
    assert definition["id"] == "dsv4-review"
    assert definition["entry"] == "dsv4 review --staged"
    assert definition["language"] == "python"
    assert definition["pass_filenames"] is False
    assert definition["stages"] == ["pre-commit"]


# ---------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    # A context long enough for a small repository's pack beside the diff.
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf", ctx=4096)


def _review_env(tiny_model: Path, home: Path) -> dict[str, str]:
    return {"DSV4_HOME": str(home), "DSV4_MODEL": str(tiny_model), "DSV4_REVIEW_MAX_TOKENS": "8", "DSV4_DEBUG": ""}


@pytest.mark.slow
def test_git_commit_runs_the_installed_hook(repo, tiny_model, tmp_path):
    assert main(["hook", "install"]) == 0
    (repo / "calc.py").write_text("def add(a, b):\n    return a - b\n")
    git(repo, "add", "calc.py")
    # The hook finds `dsv4` on PATH, or falls back to this interpreter.
    env = _review_env(tiny_model, tmp_path / "home")
    result = git(repo, "commit", "-m", "subtract", env=env)
    assert result.returncode == 0, result.stderr
    assert "dsv4 review · staged changes · 1 file changed · model tiny" in result.stdout + result.stderr
    assert git(repo, "log", "--oneline").stdout.count("\n") == 2
    # SKIP=dsv4-review skips it, as with the pre-commit framework.
    (repo / "calc.py").write_text("def add(a, b):\n    return b + a\n")
    git(repo, "add", "calc.py")
    result = git(repo, "commit", "-m", "again", env={**env, "SKIP": "other,dsv4-review"})
    assert result.returncode == 0 and "dsv4 review" not in result.stdout + result.stderr


def _snapshot_of_this_project(destination: Path) -> str:
    """A repository holding this working tree (uncommitted files too: pre-commit clones a
    commit), committed; returns the commit."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=PROJECT_ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("the project is not a git checkout")
    destination.mkdir()
    for name in filter(None, listed.stdout.split("\0")):
        source = PROJECT_ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    git(destination, "init", "-q")
    git(destination, "add", "-A")
    assert git(destination, "commit", "-q", "-m", "snapshot").returncode == 0
    return git(destination, "rev-parse", "HEAD").stdout.strip()


@pytest.mark.slow
def test_the_pre_commit_framework_installs_and_runs_dsv4_review(repo, tiny_model, tmp_path):
    pytest.importorskip("pre_commit")
    project = tmp_path / "dsv4-snapshot"
    commit = _snapshot_of_this_project(project)
    (repo / ".pre-commit-config.yaml").write_text(
        f"repos:\n- repo: {project}\n  rev: {commit}\n  hooks:\n  - id: dsv4-review\n"
    )
    (repo / "calc.py").write_text("def add(a, b):\n    return a - b\n")
    git(repo, "add", "calc.py", ".pre-commit-config.yaml")
    env = {
        **os.environ, **_GIT_ENV, **_review_env(tiny_model, tmp_path / "home"),
        "PRE_COMMIT_HOME": str(tmp_path / "pre-commit-home"),
        # pre-commit builds its own virtualenv and pip-installs our package into it. Seeing
        # this interpreter's packages, pip finds torch and the rest already satisfied, so
        # nothing is downloaded; only dsv4 itself is built and installed from the snapshot.
        "VIRTUALENV_SYSTEM_SITE_PACKAGES": "1",
        "PIP_NO_INDEX": "1",
        "PIP_NO_BUILD_ISOLATION": "0",  # pip's inverted spelling: isolation off, setuptools from here too
    }
    result = subprocess.run([sys.executable, "-m", "pre_commit", "run", "dsv4-review"], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "- hook id: dsv4-review" in output and "Passed" in output
    assert "dsv4 review · staged changes · 2 files changed · model tiny" in output
    # Our package really is installed in pre-commit's environment, from the snapshot.
    installed = list((tmp_path / "pre-commit-home").glob("repo*/py_env-*/bin/dsv4"))
    assert len(installed) == 1
