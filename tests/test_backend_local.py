"""`--backend local`: the embedded engine even when the config file or DSV4_BACKEND names a
server (issue #7). The server URL is a port nothing listens on, so a command that went
there would fail with "cannot reach"; the fake engine (tests/fake_engine.py) answers locally."""

from __future__ import annotations

import sys

import pytest

from dsv4cli import config
from dsv4cli.app import main
from dsv4cli.commands import ask as ask_command
from tests.fake_engine import FakeModel, tiny_tokenizer
from tests.stdins import PipedStdin

NOWHERE = "http://127.0.0.1:9/v1"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def fake(monkeypatch, tokenizer, tmp_path):
    model = FakeModel(tokenizer)
    monkeypatch.setattr(ask_command, "_open_model", lambda name: (name, model))
    monkeypatch.chdir(tmp_path)
    for name in ("DSV4_BACKEND", "DSV4_MODEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "stdin", PipedStdin(""))
    return model


def _user_file(text: str) -> None:
    path = config.user_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize("where", ["config", "environment"])
def test_ask_backend_local_beats_a_configured_url(fake, monkeypatch, capsys, where):
    if where == "config":
        _user_file(f'backend = "{NOWHERE}"\n')
    else:
        monkeypatch.setenv("DSV4_BACKEND", NOWHERE)
    assert main(["ask", "--no-log", "hello?"]) == 1
    assert f"cannot reach {NOWHERE}" in capsys.readouterr().err
    assert main(["ask", "--no-log", "--backend", "local", "hello?"]) == 0
    assert capsys.readouterr().out == "The answer is 42.\n" and len(fake.calls) == 1


def test_chat_backend_local_beats_a_configured_url(fake, monkeypatch, capsys):
    _user_file(f'backend = "{NOWHERE}"\n')
    monkeypatch.setattr(sys, "stdin", PipedStdin("hi\n"))
    assert main(["chat", "--no-log"]) == 1
    assert f"cannot reach {NOWHERE}" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", PipedStdin("hi\n"))
    assert main(["chat", "--no-log", "--backend", "local"]) == 0
    assert capsys.readouterr().out == "The answer is 42.\n" and len(fake.calls) == 1


def test_local_in_the_environment_or_the_config_file_is_a_valid_setting(fake, monkeypatch, capsys):
    monkeypatch.setenv("DSV4_BACKEND", "local")
    assert main(["ask", "--no-log", "hello?"]) == 0
    monkeypatch.delenv("DSV4_BACKEND")
    _user_file('backend = "local"\n')
    assert config.load_settings()["backend"] == "local"
    assert main(["ask", "--no-log", "hello?"]) == 0
    assert len(fake.calls) == 2


def test_a_backend_that_is_neither_a_url_nor_local_is_a_usage_error(fake, capsys):
    assert main(["ask", "--no-log", "--backend", "localhost:8000", "hello?"]) == 2
    err = capsys.readouterr().err
    assert "--backend must be an http(s) URL or 'local', not 'localhost:8000'" in err
    assert fake.calls == []


def test_backend_help_says_local(fake, capsys):
    for command in ("ask", "chat", "review"):
        assert main([command, "--help"]) == 0
        assert "'local' forces the embedded engine" in " ".join(capsys.readouterr().out.split())
