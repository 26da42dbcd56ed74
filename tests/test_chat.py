"""`dsv4 chat` and conversation logging: piped-stdin sessions against the scripted model
(tests/fake_engine.py), one session in a real pseudo-terminal, and an end-to-end run on a
tiny real GGUF whose second turn reuses the first turn's cached prefix."""

from __future__ import annotations

import json
import sys

import pytest

from dsv4cli.app import main
from dsv4cli.commands import ask as ask_command
from dsv4cli.commands import chat as chat_command
from dsv4cli.logs import LogStore
from tests.fake_engine import FakeModel, tiny_tokenizer
from tests.stdins import PipedStdin


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
    assert ask_command.question_turns(context, stored.question) == fake.calls[-1].messages[1:]


def test_ask_no_log_writes_nothing(fake, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", PipedStdin(""))
    assert main(["ask", "--no-log", "hello?"]) == 0
    assert _conversations() == []


# ---------------------------------------------------------------- chat with the scripted model


@pytest.fixture
def opened(fake):
    """The model names chat asked for, in order (`/model` adds one)."""
    names: list[str] = []

    def open_model(name_or_path: str):
        names.append(name_or_path)
        fake.name = name_or_path
        return name_or_path, fake

    ask_command._open_model = open_model  # monkeypatched back by `fake`'s fixture
    return names


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    (root / "greet.py").write_text('def greet(name):\n    return f"hello {name}"\n')
    return root


def _chat(monkeypatch, lines: str, *args: str) -> int:
    monkeypatch.setattr(sys, "stdin", PipedStdin(lines))
    return main(["chat", *args])


def test_each_turn_extends_the_previous_prompt(fake, monkeypatch, capsys, repo, tokenizer):
    assert _chat(monkeypatch, "first?\nsecond?\nthird?\n", str(repo)) == 0
    out = capsys.readouterr().out
    assert out == "The answer is 42.\n" * 3  # stdout holds only the answers
    assert len(fake.calls) == 3
    pack = ask_command.context_of(fake.calls[0].messages, "first?")  # the pack first, the question last
    assert pack is not None and pack.lstrip().index("greet.py") < 16 and "def greet" in pack
    texts = [tokenizer.render_chat_text(call.messages) for call in fake.calls]
    for before, after in zip(texts, texts[1:]):
        assert after.startswith(before)  # the whole earlier prompt is the next one's prefix
    assert [m["role"] for m in fake.calls[2].messages] == ["system", "user", "user", "assistant", "user", "assistant", "user"]
    assert fake.calls[2].messages[3]["content"] == "The answer is 42."
    # The pack appears once, in the first user message only.
    assert sum("greet.py" in m["content"] for m in fake.calls[2].messages) == 1


@pytest.mark.parametrize(("fmt", "marker"), [("xml", '<file path="greet.py">'), ("markdown", "## greet.py\n\n```"),
                                             ("plain", "=== greet.py ===")])
def test_format_option_lays_out_the_pack_as_ask_does(fake, monkeypatch, repo, fmt, marker):
    assert _chat(monkeypatch, "first?\n", "--format", fmt, str(repo)) == 0
    assert marker in fake.calls[0].messages[1]["content"]


def test_unknown_format_is_a_usage_error(fake, monkeypatch, capsys, repo):
    assert _chat(monkeypatch, "first?\n", "--format", "yaml", str(repo)) == 2
    assert fake.calls == [] and "--format must be one of xml, markdown, plain" in capsys.readouterr().err


def test_clear_forgets_the_turns_but_keeps_the_pack(fake, monkeypatch, capsys, repo):
    assert _chat(monkeypatch, "first?\n/clear\nagain?\n", str(repo)) == 0
    assert "conversation cleared" in capsys.readouterr().err
    first, again = fake.calls
    assert again.messages[:-1] == first.messages[:-1]
    assert again.messages[-2:] == ask_command.question_turns(first.messages[-2]["content"], "again?")
    assert len(again.messages) == 3


@pytest.mark.parametrize("suffix", [".json", ".md"])
def test_save_then_load_restores_the_conversation(fake, monkeypatch, capsys, repo, tmp_path, suffix):
    saved = tmp_path / f"talk{suffix}"
    script = f"first?\n/save {saved}\n/clear\n/load {saved}\nsecond?\n"
    assert _chat(monkeypatch, script, str(repo)) == 0
    err = capsys.readouterr().err
    assert "saved 1 turn(s)" in err and "loaded 1 turn(s)" in err
    if suffix == ".md":
        text = saved.read_text()
        assert "## You\n\nfirst?" in text and "The answer is 42." in text
    else:
        assert json.loads(saved.read_text())["turns"] == [{"question": "first?", "answer": "The answer is 42."}]
    # After /clear and /load the second turn is asked exactly as without them.
    reference = FakeModel(fake.tokenizer)
    ask_command._open_model = lambda name: (name, reference)
    assert _chat(monkeypatch, "first?\nsecond?\n", "--no-log", str(repo)) == 0
    assert fake.calls[-1].prompt_ids == reference.calls[-1].prompt_ids


def test_load_rejects_a_file_that_is_not_a_conversation(fake, monkeypatch, capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert _chat(monkeypatch, f"/load {bad}\n") == 1  # piped: a failed command is the exit status
    assert "is not a conversation saved by /save" in capsys.readouterr().err


def test_stats_reports_the_last_turn_and_the_session(fake, monkeypatch, capsys):
    assert _chat(monkeypatch, "/stats\nhi\nhello\n/stats\n") == 0
    err = capsys.readouterr().err
    assert "no turns yet" in err
    last = next(line for line in err.splitlines() if line.startswith("last turn:"))
    session = next(line for line in err.splitlines() if line.startswith("session (2 turn(s)):"))
    prompt = len(fake.calls[1].prompt_ids)
    assert f"prompt {prompt:,} tokens (0 cached) · completion 2" in last
    total = len(fake.calls[0].prompt_ids) + prompt
    assert f"prompt {total:,} tokens" in session and "completion 4" in session


def test_model_switches_the_model_and_keeps_the_turns(fake, opened, monkeypatch, capsys):
    assert _chat(monkeypatch, "hi\n/model flash\nand now?\n") == 0
    assert opened == ["mini", "flash"]
    assert "now chatting with flash" in capsys.readouterr().err
    assert [m["role"] for m in fake.calls[1].messages] == ["system", "user", "assistant", "user"]


def test_ctrl_c_stops_the_reply_and_keeps_the_session(fake, monkeypatch, capsys):
    fake.interrupt_after = 1  # every reply is cut after its first piece
    assert _chat(monkeypatch, "first?\nsecond?\n") == 0
    captured = capsys.readouterr()
    assert captured.out == "The answer\n" * 2
    assert captured.err.count("stopped") == 2
    # The cut answer stays in the conversation, so "go on" can refer to it.
    assert fake.calls[1].messages[2] == {"role": "assistant", "content": "The answer"}


def test_first_ctrl_c_asks_the_engine_to_stop_the_second_interrupts():
    import os
    import signal

    with chat_command._ctrl_c_cancels() as cancelled:
        assert not cancelled()
        os.kill(os.getpid(), signal.SIGINT)
        assert cancelled()  # the engine sees this at its next token and ends the turn cleanly
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_end_of_input_exits_zero(fake, monkeypatch, capsys):
    assert _chat(monkeypatch, "") == 0
    assert fake.calls == []
    assert capsys.readouterr().out == ""


def test_multi_line_messages(fake, monkeypatch, capsys):
    script = 'one \\\ntwo\n"""\nthree\n\nfour\n"""\n"""five"""\n'
    assert _chat(monkeypatch, script) == 0
    assert [call.user_text for call in fake.calls] == ["one \ntwo", "three\n\nfour", "five"]


def test_unknown_command_and_missing_argument(fake, monkeypatch, capsys):
    assert _chat(monkeypatch, "/nope\n/save\n") == 1
    err = capsys.readouterr().err
    assert "Error: unknown command /nope (/help lists the commands)" in err
    assert "missing argument: /save FILE" in err
    assert fake.calls == []


def test_continue_rebuilds_the_same_prompt(fake, monkeypatch, capsys, repo):
    assert _chat(monkeypatch, "first?\nsecond?\nthird?\n", str(repo)) == 0
    uninterrupted = fake.calls[2].prompt_ids
    fake.calls.clear()
    assert _chat(monkeypatch, "first?\nsecond?\n", str(repo)) == 0
    assert _chat(monkeypatch, "third?\n", "--continue") == 0
    assert fake.calls[-1].prompt_ids == uninterrupted  # byte-identical: the prefix cache hits
    conversations = _conversations()
    assert [(c.command, c.exchanges) for c in conversations] == [("chat", 3), ("chat", 3)]
    # --cid with a unique prefix picks the older conversation
    older = conversations[1].id
    assert _chat(monkeypatch, "fourth?\n", "--cid", older[:20].lower()) == 0
    assert "resumed conversation " + older in capsys.readouterr().err
    with LogStore() as store:
        assert len(store.get_conversation(older).exchanges) == 4


def test_continue_refuses_sources_and_needs_a_conversation(fake, monkeypatch, capsys, repo):
    assert _chat(monkeypatch, "", "--continue") == 1
    assert "there is no conversation to continue" in capsys.readouterr().err
    assert _chat(monkeypatch, "hi\n") == 0
    assert _chat(monkeypatch, "", "--continue", str(repo)) == 2
    assert _chat(monkeypatch, "", "--continue", "--cid", "01") == 2


def test_no_log_keeps_the_chat_out_of_the_log(fake, monkeypatch, capsys):
    assert _chat(monkeypatch, "hi\nagain\n", "--no-log") == 0
    assert _conversations() == []


def test_loaded_turns_are_logged_with_the_next_one(fake, monkeypatch, capsys, tmp_path):
    saved = tmp_path / "talk.json"
    assert _chat(monkeypatch, f"first?\n/save {saved}\n", "--no-log") == 0
    assert _chat(monkeypatch, f"/load {saved}\nsecond?\n") == 0
    with LogStore() as store:
        [summary] = store.list_conversations()
        assert [e.question for e in store.get_conversation(summary.id).exchanges] == ["first?", "second?"]


# ---------------------------------------------------------------- --think


def test_think_shows_reasoning_apart_from_the_answer(fake, monkeypatch, capsys):
    fake.answer = ("Hmm, greet", " says hi.</think>", "It says hello.")
    assert _chat(monkeypatch, "what?\n", "--think", "--model", "flash") == 0
    captured = capsys.readouterr()
    assert captured.out == "It says hello.\n"
    assert "Hmm, greet says hi." in captured.err
    with LogStore() as store:
        [summary] = store.list_conversations()
        assert store.get_conversation(summary.id).exchanges[0].answer == "It says hello."


def test_think_keeps_only_the_answer_in_the_next_turns_history(fake, monkeypatch, capsys):
    # DeepSeek-V4's format drops an earlier turn's reasoning, so the conversation holds answers only.
    fake.answer = ("Weigh it.", "</think>", "Forty-two.")
    assert _chat(monkeypatch, "first?\nsecond?\n", "--think", "--model", "flash", "--system", "") == 0
    captured = capsys.readouterr()
    assert captured.out == "Forty-two.\n" * 2
    assert captured.err.count("Weigh it.") == 2
    second = fake.calls[1].messages
    assert second == [{"role": "user", "content": "first?"}, {"role": "assistant", "content": "Forty-two."},
                      {"role": "user", "content": "second?"}]


def test_think_without_an_end_tag_still_prints_an_answer(fake, monkeypatch, capsys):
    fake.answer = ("It says", " hello.")  # a stream that never shows `</think>`
    assert _chat(monkeypatch, "what?\n", "--think", "--model", "pro") == 0
    captured = capsys.readouterr()
    assert captured.out == "It says hello.\n"
    assert "no end of the reasoning was seen" in captured.err


def test_think_is_a_no_op_for_mini(fake, monkeypatch, capsys):
    assert _chat(monkeypatch, "what?\n", "--think") == 0
    captured = capsys.readouterr()
    assert "mini has no thinking mode" in captured.err
    assert captured.out == "The answer is 42.\n"


# ---------------------------------------------------------------- a real terminal

_PTY_DRIVER = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tests.fake_engine import FakeModel, tiny_tokenizer
from dsv4cli.commands import ask
model = FakeModel(tiny_tokenizer(Path(sys.argv[2])))
ask._open_model = lambda name: (name, model)
from dsv4cli.app import main
main(["chat"])
"""


_PROMPT_STARTS = b"\x1b[?2004h"


def _read_until(fd: int, needle: bytes, seen: bytearray, timeout: float = 60.0, count: int = 1) -> bool:
    import os
    import select
    import time

    deadline = time.monotonic() + timeout
    while seen.count(needle) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                return seen.count(needle) >= count
            if not chunk:
                return seen.count(needle) >= count
            seen += chunk
    return True


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
@pytest.mark.parametrize("stdout_redirected", [False, True], ids=["terminal", "stdout-to-file"])
def test_a_typed_line_in_a_real_terminal_then_ctrl_d(tmp_path, dsv4_home, stdout_redirected):
    import os
    import subprocess
    from pathlib import Path

    driver = tmp_path / "driver.py"
    driver.write_text(_PTY_DRIVER)
    root = Path(__file__).resolve().parent.parent
    primary, secondary = os.openpty()
    environment = {**os.environ, "DSV4_HOME": str(dsv4_home), "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1",
                   "COLUMNS": "80", "LINES": "24"}
    environment.pop("NO_COLOR", None)
    answers = tmp_path / "answers.md"
    with open(answers, "wb") as redirected:
        child = subprocess.Popen([sys.executable, str(driver), str(root), str(tmp_path)], stdin=secondary,
                                 stdout=redirected if stdout_redirected else secondary, stderr=secondary,
                                 env=environment, close_fds=True)
    os.close(secondary)
    seen = bytearray()
    try:
        assert _read_until(primary, b">>>", seen), seen.decode(errors="replace")
        os.write(primary, b"hello there\r")
        if not stdout_redirected:
            assert _read_until(primary, b"42", seen), seen.decode(errors="replace")
        # Each prompt starts by turning on bracketed paste: the second one means the turn is over.
        assert _read_until(primary, _PROMPT_STARTS, seen, count=2), seen.decode(errors="replace")
        os.write(primary, b"\x04")  # Ctrl-D
        assert child.wait(timeout=60) == 0, seen.decode(errors="replace")
    finally:
        if child.poll() is None:
            child.kill()
        os.close(primary)
    if stdout_redirected:
        assert answers.read_text() == "The answer is 42.\n"  # the prompt went to the terminal, not the file
    history = (dsv4_home / "logs" / "chat_history").read_text()
    assert "+hello there" in history  # the line editor kept it for the next session
    with LogStore() as store:
        [summary] = store.list_conversations()
        assert summary.command == "chat" and summary.title == "hello there"


# ---------------------------------------------------------------- the real engine


@pytest.mark.slow
def test_second_turn_reuses_the_cached_prefix_with_a_tiny_real_gguf(tmp_path, repo, dsv4_home):
    import os
    import re
    import subprocess

    from tests.tinymodels import write_tiny_llama_gguf

    model = write_tiny_llama_gguf(tmp_path / "tiny.gguf", ctx=2048)
    # a pack of several cache chunks, so the first turn leaves whole chunks behind
    (repo / "notes.md").write_text("".join(f"Note {i}: the greeting is friendly and short.\n" for i in range(60)))
    environment = {**os.environ, "DSV4_HOME": str(dsv4_home), "HF_HUB_OFFLINE": "1"}
    environment.pop("DSV4_MODEL", None)
    result = subprocess.run(
        [sys.executable, "-m", "dsv4cli.app", "chat", "--max-tokens", "4", "--model", str(model), str(repo)],
        input="What does greet return?\n/stats\nAnd the notes?\n/stats\n",
        capture_output=True, text=True, env=environment, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    stats = re.findall(r"last turn: prompt ([\d,]+) tokens \(([\d,]+) cached(?:, ([\d,]+) kept in memory)?\)", result.stderr)
    assert len(stats) == 2, result.stderr
    (first_prompt, first_cached, first_kept), (second_prompt, second_cached, second_kept) = [
        (int(p.replace(",", "")), int(c.replace(",", "")), int((k or "0").replace(",", ""))) for p, c, k in stats]
    assert first_prompt > 512 and first_cached == first_kept == 0
    assert second_prompt > first_prompt
    # The first turn's prompt and answer stayed in memory: only the new turn was prefilled.
    assert first_prompt <= second_kept == second_cached < second_prompt
    with LogStore() as store:
        [summary] = store.list_conversations()
        assert (summary.command, summary.exchanges) == ("chat", 2)
