"""Stdout hygiene: in a pipe stdout carries only the payload, with no escape codes;
stderr is coloured only on a terminal or when FORCE_COLOR asks, never with NO_COLOR
(colours) or TERM=dumb (any escape); every --json output parses."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dsv4cli.app import main
from dsv4cli.commands import ask as ask_command
from engine import paths
from tests.fake_engine import FakeModel, tiny_tokenizer
from tests.stdins import TerminalStdin
from tests.tinymodels import write_tiny_llama_gguf

ESCAPE = "\x1b["
COLOUR = re.compile(r"\x1b\[(?:[0-9;]*;)?(?:3[0-9]|9[0-7]|38;[0-9;]+)m")
_GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf")


@pytest.fixture
def repo(tmp_path) -> Path:
    root = tmp_path / "repo"
    (root / "src").mkdir(parents=True)
    (root / "src" / "app.py").write_text("def main():\n    return 1\n")
    (root / "README.md").write_text("# Demo\n")
    env = {**os.environ, **_GIT_ENV}
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "init"]):
        subprocess.run(["git", *args], cwd=root, env=env, check=True, capture_output=True)
    return root


def _environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TERM", "COLUMNS")}
    return {**env, "DSV4_DEBUG": "", "TERM": "xterm-256color", **extra}


def run_piped(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsv4cli.app", *args], cwd=cwd, capture_output=True, text=True,
                          env=_environment(**env), timeout=120)


def run_with_terminal_stderr(args: list[str], cwd: Path, **env: str) -> tuple[int, str, str]:
    """stdout a pipe, stderr a pseudo-terminal (`dsv4 ... > out.txt` typed in a terminal)."""
    master, slave = pty.openpty()
    try:
        result = subprocess.run([sys.executable, "-m", "dsv4cli.app", *args], cwd=cwd, stdout=subprocess.PIPE,
                                stderr=slave, env=_environment(**env), timeout=120)
    finally:
        os.close(slave)
    data = b""
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # EIO: the writer is gone and everything was read
            break
        if not chunk:
            break
        data += chunk
    os.close(master)
    return result.returncode, result.stdout.decode(), data.decode(errors="replace")


def _settings_with_a_warning() -> None:
    """An unknown key makes every command print a (yellow) warning on stderr."""
    path = paths.config_dir() / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("modle = 'typo'\n")


def test_pack_into_a_pipe_has_no_escape_codes(repo, tiny_gguf):
    _settings_with_a_warning()
    result = run_piped(["pack", "--model", str(tiny_gguf), "."], repo)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("<file path=") and ESCAPE not in result.stdout
    assert "warning:" in result.stderr and "tokens" in result.stderr and ESCAPE not in result.stderr


def test_force_color_colours_stderr_in_a_pipe_but_never_stdout(repo, tiny_gguf):
    _settings_with_a_warning()
    result = run_piped(["pack", "--model", str(tiny_gguf), "."], repo, FORCE_COLOR="1")
    assert result.returncode == 0
    assert COLOUR.search(result.stderr) and ESCAPE not in result.stdout


def test_a_terminal_stderr_is_coloured_unless_no_color_or_dumb(repo, tiny_gguf):
    _settings_with_a_warning()
    args = ["pack", "--model", str(tiny_gguf), "."]
    code, out, err = run_with_terminal_stderr(args, repo)
    assert code == 0 and COLOUR.search(err) and "warning:" in err and ESCAPE not in out
    code, out, err = run_with_terminal_stderr(args, repo, NO_COLOR="1")
    assert code == 0 and "warning:" in err and not COLOUR.search(err)
    code, out, err = run_with_terminal_stderr(args, repo, TERM="dumb")
    assert code == 0 and "warning:" in err and ESCAPE not in err


def test_color_never_in_the_settings_acts_as_no_color(repo, tiny_gguf):
    path = paths.config_dir() / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("color = 'never'\nmodle = 'typo'\n")
    code, _, err = run_with_terminal_stderr(["pack", "--model", str(tiny_gguf), "."], repo)
    assert code == 0 and "warning:" in err and not COLOUR.search(err)


def test_pack_into_a_closed_pipe_is_quiet(repo, tiny_gguf):
    command = f"{sys.executable} -m dsv4cli.app pack --model {tiny_gguf} . | head -c 5"
    result = subprocess.run(command, shell=True, cwd=repo, capture_output=True, text=True, env=_environment())
    assert result.stdout == "<file" and "Traceback" not in result.stderr and "Error" not in result.stderr


# ---------------------------------------------------------------- --json everywhere


@pytest.fixture
def fake(monkeypatch, tmp_path):
    model = FakeModel(tiny_tokenizer(tmp_path), answer=["src/app.py:2: warning: returns a constant\n"])
    monkeypatch.setattr(ask_command, "_open_model", lambda name: (name, model))
    monkeypatch.setattr(sys, "stdin", TerminalStdin())
    return model


def test_every_json_output_parses(repo, fake, monkeypatch, capsys):
    monkeypatch.chdir(repo)
    (repo / "src" / "app.py").write_text("def main():\n    return 2\n")
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env={**os.environ, **_GIT_ENV})
    outputs = {}
    for args in (["ask", "--json", "hello"], ["review", "--staged", "--json"], ["logs", "--json"],
                 ["config", "show", "--json"], ["models", "--json"]):
        assert main(args) == 0, args
        captured = capsys.readouterr()
        assert ESCAPE not in captured.out
        outputs[args[0]] = json.loads(captured.out)
    assert outputs["ask"]["answer"] == "src/app.py:2: warning: returns a constant\n"
    assert outputs["review"]["findings"] == [
        {"path": "src/app.py", "line": 2, "severity": "warning", "message": "returns a constant"}
    ]
    assert [c["command"] for c in outputs["logs"]] == ["review", "ask"]   # newest first
    (conversation,) = [c for c in outputs["logs"] if c["command"] == "review"]
    assert main(["logs", "show", "--json", conversation["id"]]) == 0
    assert json.loads(capsys.readouterr().out)["exchanges"][0]["answer"].startswith("src/app.py:2")
    assert outputs["models"] == []


def test_review_report_in_a_pipe_is_plain_text(repo, fake, monkeypatch, capsys):
    monkeypatch.chdir(repo)
    (repo / "src" / "app.py").write_text("def main():\n    return 2\n")
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env={**os.environ, **_GIT_ENV})
    assert main(["review", "--staged"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "dsv4 review · staged changes · 1 file changed · model mini",
        "src/app.py",
        "  2  warning  returns a constant",
        "1 finding in 1 file: 1 warning",
    ]
    assert ESCAPE not in captured.out + captured.err
