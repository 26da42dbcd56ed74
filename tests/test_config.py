"""Settings: precedence (option > DSV4_* > project file > user file > built-in), errors for
invalid files, warnings for unknown keys, `dsv4 config path|show|set`, and configured
values reaching real commands as their defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsv4cli import config
from dsv4cli.app import main
from dsv4cli.commands import ask as ask_command
from dsv4cli.errors import CliError
from tests.fake_engine import FakeModel, tiny_tokenizer
from tests.gitrepos import git
from tests.stdins import PipedStdin, TerminalStdin


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "project"
    (root / ".git").mkdir(parents=True)  # a repository root, as far as the lookup goes
    (root / "src").mkdir()
    monkeypatch.chdir(root / "src")
    for name in ("DSV4_MAX_TOKENS", "DSV4_REVIEW_FAIL_ON", "DSV4_EXCLUDE", "DSV4_COLOR", "DSV4_BUDGET"):
        monkeypatch.delenv(name, raising=False)
    return root


def _user(text: str) -> Path:
    path = config.user_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_built_in_defaults_match_the_commands(project):
    settings = config.load_settings()
    assert settings["model"] == ask_command.DEFAULT_MODEL
    assert settings["max_tokens"] == ask_command.DEFAULT_MAX_TOKENS
    assert all(settings.source(key) == config.BUILTIN for key in settings)
    assert settings.files == ()


def test_precedence_env_over_project_over_user(project, monkeypatch):
    user = _user('model = "flash"\nmax_tokens = 100\ntemperature = 0.5\n[review]\nfail_on = "warning"\n')
    (project / ".dsv4.toml").write_text('max_tokens = 200\nexclude = ["build/"]\n[review]\nfail_on = "error"\n')
    monkeypatch.setenv("DSV4_TEMPERATURE", "0.9")
    settings = config.load_settings()
    assert (settings["model"], settings.source("model")) == ("flash", str(user))
    assert (settings["max_tokens"], settings.source("max_tokens")) == (200, str(project / ".dsv4.toml"))
    assert (settings["temperature"], settings.source("temperature")) == (0.9, "DSV4_TEMPERATURE")
    assert settings["review.fail_on"] == "error"
    assert settings["exclude"] == ("build/",)
    assert settings.files == (user, project / ".dsv4.toml")


def test_project_file_is_found_at_the_repository_root_from_a_subdirectory(project):
    assert config.project_root() == project
    assert config.project_file() == project / ".dsv4.toml"


def test_invalid_toml_is_an_error_naming_the_file(project, capsys):
    path = _user("model = [\n")
    with pytest.raises(CliError) as caught:
        config.load_settings()
    assert str(path) in str(caught.value) and "invalid TOML" in str(caught.value)
    # Through the CLI: one line, exit 1, for any command that reads settings.
    assert main(["pack", "--list", "."]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"Error: invalid TOML in {path}") and "(" in err[0]
    # ... but `dsv4 config path` still answers, so the user can find the file.
    assert main(["config", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(path)


@pytest.mark.parametrize(
    ("text", "needle"),
    [("max_tokens = 0\n", "at least 1"), ('temperature = "hot"\n', "wrong type"),
     ('color = "pink"\n', "auto, always, never"), ("exclude = [1]\n", "list of glob"),
     ('backend = "remote"\n', "auto, local, cpu, cuda")],
)
def test_wrong_values_are_errors(project, text, needle):
    (project / ".dsv4.toml").write_text(text)
    with pytest.raises(CliError) as caught:
        config.load_settings()
    assert needle in str(caught.value) and ".dsv4.toml" in str(caught.value)


def test_wrong_environment_value_names_the_variable(project, monkeypatch):
    monkeypatch.setenv("DSV4_MAX_TOKENS", "lots")
    with pytest.raises(CliError) as caught:
        config.load_settings()
    assert "DSV4_MAX_TOKENS" in str(caught.value) and "DSV4_MAX_TOKENS" in caught.value.hint


def test_unknown_keys_only_warn(project):
    _user('model = "pro"\nmodle = "typo"\n[review]\ncolour = 1\n')
    warnings: list[str] = []
    settings = config.load_settings(warn=warnings.append)
    assert settings["model"] == "pro"
    assert len(warnings) == 2 and "'modle'" in warnings[0] and "'review.colour'" in warnings[1]


def test_config_show_lists_values_and_sources(project, monkeypatch, capsys):
    user = _user("max_tokens = 64\n")
    monkeypatch.setenv("DSV4_MODEL", "pro")
    assert main(["config", "show"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("model") and '"pro"' in line and "# DSV4_MODEL" in line for line in lines)
    assert any(line.startswith("max_tokens") and "64" in line and f"# {user}" in line for line in lines)
    assert main(["config", "show", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["max_tokens"] == {"value": 64, "source": str(user)}
    assert shown["exclude"] == {"value": [], "source": "built-in"}


def test_backend_is_a_default_of_ask_chat_and_review_and_config_show_lists_it(project, monkeypatch, capsys):
    assert {command for command, table in config.COMMAND_DEFAULTS.items() if table.get("backend") == "backend"} == {
        "ask", "chat", "review"}
    user = _user('backend = "http://gpu-box:8000/v1"\n')
    assert main(["config", "show"]) == 0
    [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("backend ")]
    assert line.split("#")[0].split("=", 1)[1].strip() == '"http://gpu-box:8000/v1"' and line.endswith(f"# {user}")
    monkeypatch.setenv("DSV4_BACKEND", "local")
    assert main(["config", "show", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == {"value": "local", "source": "DSV4_BACKEND"}


def test_config_set_rewrites_one_line_and_keeps_comments(project, capsys):
    path = _user('# my settings\nmodel = "flash"  # the fast one\n\n[review]\ntimeout = 30\n')
    assert main(["config", "set", "review.fail_on", "error"]) == 0
    assert main(["config", "set", "model", "pro"]) == 0
    assert main(["config", "set", "exclude", '["build/", "*.min.js"]']) == 0
    text = path.read_text()
    assert text.startswith("# my settings\n")
    settings = config.load_settings()
    assert settings["model"] == "pro" and settings["review.fail_on"] == "error" and settings["review.timeout"] == 30
    assert settings["exclude"] == ("build/", "*.min.js")
    assert main(["config", "set", "max_tokens", "0"]) == 1
    assert main(["config", "set", "nope", "1"]) == 2
    assert "unknown setting 'nope'" in capsys.readouterr().err


def test_configured_values_become_command_defaults(project, monkeypatch, tmp_path):
    """The real `dsv4 ask` picks up max_tokens and model from the files; options still win."""
    model = FakeModel(tiny_tokenizer(tmp_path))
    requested: list[str] = []

    def open_model(name: str):
        requested.append(name)
        return name, model

    monkeypatch.setattr(ask_command, "_open_model", open_model)
    monkeypatch.setattr(sys, "stdin", TerminalStdin())
    _user('model = "flash"\nmax_tokens = 9\n')
    (project / ".dsv4.toml").write_text("temperature = 0.25\n")
    assert main(["ask", "hello"]) == 0
    assert requested == ["flash"]
    assert (model.calls[-1].params.max_tokens, model.calls[-1].params.temperature) == (9, 0.25)
    monkeypatch.setenv("DSV4_MAX_TOKENS", "11")
    assert main(["ask", "hello"]) == 0
    assert model.calls[-1].params.max_tokens == 11
    assert main(["ask", "--max-tokens", "5", "-m", "pro", "hello"]) == 0
    assert requested[-1] == "pro" and model.calls[-1].params.max_tokens == 5


def test_project_excludes_reach_dsv4_pack(project):
    (project / "keep.py").write_text("x = 1\n")
    (project / "build").mkdir()
    (project / "build" / "out.py").write_text("y = 2\n")
    (project / ".dsv4.toml").write_text('exclude = ["build/"]\n')
    result = subprocess.run([sys.executable, "-m", "dsv4cli.app", "pack", "--list", "--no-git", "."],
                            cwd=project, capture_output=True, text=True, env={**os.environ, "DSV4_DEBUG": ""})
    assert result.returncode == 0, result.stderr
    listed = result.stdout.splitlines()
    assert "keep.py" in listed and "build/out.py" not in listed


def test_color_setting_sets_no_color_unless_the_user_chose(project, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "")
    monkeypatch.delenv("NO_COLOR")  # recorded, so the value set below is undone after the test
    monkeypatch.setenv("FORCE_COLOR", "")
    monkeypatch.delenv("FORCE_COLOR")
    _user('color = "never"\n')
    config.apply_color(config.load_settings())
    assert os.environ.get("NO_COLOR") == "1" and "FORCE_COLOR" not in os.environ
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setenv("FORCE_COLOR", "1")
    config.apply_color(config.load_settings())
    assert "NO_COLOR" not in os.environ  # the user's own variable wins


# ---------------------------------------------------------------- `exclude` in every pack


@pytest.fixture
def excluding_repo(tmp_path, monkeypatch, fake_model) -> Path:
    """A real git repository with a `build/` directory and a secret, cwd at its root."""
    root = tmp_path / "repo"
    (root / "build").mkdir(parents=True)
    (root / "app.py").write_text("def app():\n    return 'APP_BODY'\n")
    (root / "build" / "gen.py").write_text("GENERATED_BODY = 1\n")
    (root / "notes.secret").write_text("SECRET_BODY\n")
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "init")
    monkeypatch.chdir(root)
    for name in ("DSV4_EXCLUDE", "DSV4_REVIEW_FAIL_ON", "DSV4_REVIEW_TIMEOUT", "DSV4_NO_LOG"):
        monkeypatch.delenv(name, raising=False)
    return root


@pytest.fixture
def fake_model(monkeypatch, tmp_path_factory) -> FakeModel:
    model = FakeModel(tiny_tokenizer(tmp_path_factory.mktemp("tok")), answer=["no findings"])
    monkeypatch.setattr(ask_command, "_open_model", lambda name: (name, model))
    return model


def _configure_excludes(root: Path, where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if where == "user":
        _user('exclude = ["build/"]\n')
        (root / ".dsv4.toml").write_text('exclude = ["build/", "*.secret"]\n')  # the project file wins
    elif where == "project":
        (root / ".dsv4.toml").write_text('exclude = ["build/", "*.secret"]\n')
    else:
        monkeypatch.setenv("DSV4_EXCLUDE", "build/,*.secret")


@pytest.mark.parametrize("where", ["user", "project", "env"])
def test_configured_excludes_reach_the_pack_ask_builds(excluding_repo, fake_model, monkeypatch, where):
    monkeypatch.setattr(sys, "stdin", TerminalStdin())
    _configure_excludes(excluding_repo, where, monkeypatch)
    assert main(["ask", "--no-log", ".", "what is here?"]) == 0
    prompt = "\n\n".join(m["content"] for m in fake_model.calls[-1].messages if m["role"] == "user")
    assert "APP_BODY" in prompt and "GENERATED_BODY" not in prompt and "SECRET_BODY" not in prompt
    assert "build/gen.py" not in prompt  # left out, not listed


def test_user_file_excludes_alone_reach_ask(excluding_repo, fake_model, monkeypatch):
    monkeypatch.setattr(sys, "stdin", TerminalStdin())
    _user('exclude = ["*.secret"]\n')
    assert main(["ask", "--no-log", ".", "q"]) == 0
    prompt = "\n\n".join(m["content"] for m in fake_model.calls[-1].messages if m["role"] == "user")
    assert "SECRET_BODY" not in prompt and "GENERATED_BODY" in prompt


def test_configured_excludes_reach_the_pack_chat_builds(excluding_repo, fake_model, monkeypatch):
    (excluding_repo / ".dsv4.toml").write_text('exclude = ["build/", "*.secret"]\n')
    monkeypatch.setattr(sys, "stdin", PipedStdin("what is here?\n"))
    assert main(["chat", "--no-log", "."]) == 0
    prompt = "\n\n".join(m["content"] for m in fake_model.calls[-1].messages if m["role"] == "user")
    assert "APP_BODY" in prompt and "GENERATED_BODY" not in prompt and "SECRET_BODY" not in prompt


def test_configured_excludes_reach_the_pack_review_builds(excluding_repo, fake_model, monkeypatch):
    (excluding_repo / ".dsv4.toml").write_text('exclude = ["build/", "*.secret"]\n')
    (excluding_repo / "app.py").write_text("def app():\n    return 'CHANGED'\n")
    monkeypatch.setattr(sys, "stdin", TerminalStdin())
    assert main(["review"]) == 0
    prompt = "\n\n".join(m["content"] for m in fake_model.calls[-1].messages if m["role"] == "user")
    assert "APP_BODY" in prompt or "CHANGED" in prompt
    assert "GENERATED_BODY" not in prompt and "SECRET_BODY" not in prompt
