"""`dsv4 chat` and conversation logging: piped-stdin sessions against the scripted model
(tests/fake_engine.py), one session in a real pseudo-terminal, and an end-to-end run on a
tiny real GGUF whose second turn reuses the first turn's cached prefix."""

from __future__ import annotations

import io
import sys

import pytest

from dsv4cli.app import main
from dsv4cli.commands import ask as ask_command
from dsv4cli.logs import LogStore
from tests.fake_engine import FakeModel, tiny_tokenizer


class PipedStdin(io.StringIO):
    def isatty(self) -> bool:
        return False


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def fake(monkeypatch, tokenizer):
    model = FakeModel(tokenizer)

    def open_model(name_or_path: str):
        model.name = name_or_path
        return name_or_path, model

    monkeypatch.setattr(ask_command, "_open_model", open_model)
    return model


def _conversations() -> list:
    with LogStore() as store:
        return store.list_conversations(limit=None)


# ---------------------------------------------------------------- ask logging


def test_ask_logs_one_conversation(fake, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "stdin", PipedStdin(""))
    source = tmp_path / "notes.md"
    source.write_text("# Notes\nThe answer is 42.\n")
    assert main(["ask", str(source), "What is the answer?"]) == 0
    conversations = _conversations()
    assert [(c.command, c.exchanges, c.title) for c in conversations] == [("ask", 1, "What is the answer?")]
    with LogStore() as store:
        stored = store.get_conversation(conversations[0].id).exchanges[0]
        assert stored.answer == "The answer is 42."
        context = store.blob(stored.context_sha256)
    # The logged context and question rebuild exactly the user turn the model was asked.
    assert context + ask_command.PACK_QUESTION_SEPARATOR + stored.question == fake.calls[-1].user_text


def test_ask_no_log_writes_nothing(fake, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", PipedStdin(""))
    assert main(["ask", "--no-log", "hello?"]) == 0
    assert _conversations() == []
