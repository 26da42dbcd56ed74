"""Golden renders: the CLI's main outputs, drawn by the very consoles the CLI uses over a
buffer (80 columns, colour on and off), compared byte for byte with tests/golden/.

Each golden file holds what one run wrote to stdout and to stderr. Nothing in them depends
on the machine: the scripted model (tests/fake_engine.py) reports fixed timings, the load
clock is injected, paths are relative, times are shown in UTC.

After an intended change of the output, regenerate them and review the diff:

    DSV4_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py

"Colour on" is a console with colours that is not a terminal: a live terminal redraws its
status line on a timer, which no golden file can hold; what is compared is everything that
stays on screen (the answer, the reasoning, notes, tables), styles included.
"""

from __future__ import annotations

import difflib
import io
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dsv4cli import console as consoles
from dsv4cli import logs, render
from dsv4cli.app import main
from dsv4cli.commands import ask as ask_command
from dsv4cli.commands import logs as logs_command
from dsv4cli.commands import models as models_command
from dsv4cli.commands import pack as pack_command
from tests.fake_engine import FakeModel, tiny_tokenizer
from tests.gitrepos import calc_repo_with_change
from tests.stdins import TerminalStdin

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("DSV4_UPDATE_GOLDEN", "") not in ("", "0")
WIDTH = 80
_CONSOLE_VARIABLES = ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS", "LINES", "TERM",
                      "DSV4_COLOR", "DSV4_EXCLUDE", "DSV4_NO_LOG", "DSV4_REVIEW_FAIL_ON", "DSV4_REVIEW_TIMEOUT")


def check_golden(name: str, actual: str, directory: Path = GOLDEN) -> None:
    """Compare `actual` with directory/name byte for byte (or write it, with DSV4_UPDATE_GOLDEN=1)."""
    path = directory / name
    data = actual.encode("utf-8")
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return
    if not path.exists():
        pytest.fail(f"no golden file {path.name}; create it with DSV4_UPDATE_GOLDEN=1 python -m pytest {__file__}")
    expected = path.read_bytes()
    if expected != data:
        # Escapes made visible, so the diff shows a changed colour as well as changed text.
        visible = [line.replace("\x1b", "\\x1b") for line in expected.decode("utf-8").splitlines(keepends=True)]
        now = [line.replace("\x1b", "\\x1b") for line in actual.splitlines(keepends=True)]
        diff = "".join(difflib.unified_diff(visible, now, f"golden/{name}", "now"))
        raise AssertionError(f"{name} differs from its golden file (DSV4_UPDATE_GOLDEN=1 regenerates it):\n{diff}")


@dataclass
class Capture:
    """Stdout and stderr of one run, with the consoles the CLI draws on."""

    color: bool
    stdout: io.StringIO
    stderr: io.StringIO

    @property
    def suffix(self) -> str:
        return "color" if self.color else "plain"

    def text(self) -> str:
        return f"--- stdout ---\n{self.stdout.getvalue()}--- stderr ---\n{self.stderr.getvalue()}"


@pytest.fixture
def quiet_environment(monkeypatch) -> None:
    for name in _CONSOLE_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def utc(monkeypatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture
def capture(monkeypatch, quiet_environment) -> Callable[[bool], Capture]:
    """Route every output of the CLI into two buffers, through consoles built like its own."""

    def start(color: bool) -> Capture:
        out, err = io.StringIO(), io.StringIO()
        options = {"width": WIDTH, "height": 25, "color_system": "standard" if color else None, "force_terminal": False}
        out_console = render.stdout_console(out, **options)
        err_console = consoles.stderr_console(err, **options)
        monkeypatch.setattr(sys, "stdout", out)
        monkeypatch.setattr(sys, "stderr", err)
        monkeypatch.setattr(render, "stdout_console", lambda *args, **kwargs: out_console)
        monkeypatch.setattr(consoles, "err", lambda: err_console)
        # With colour the CLI believes stdout is a terminal (Markdown, tables); without, a pipe.
        for module in (ask_command, models_command):
            monkeypatch.setattr(module, "stdout_is_terminal", lambda: color)
        return Capture(color, out, err)

    return start


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def fake(monkeypatch, tokenizer) -> FakeModel:
    model = FakeModel(tokenizer)

    def open_model(name: str):
        model.name = name
        return name, model

    monkeypatch.setattr(ask_command, "_open_model", open_model)
    monkeypatch.setattr(sys, "stdin", TerminalStdin())
    return model


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """A small git repository with an uncommitted change; the current directory."""
    root = calc_repo_with_change(tmp_path / "repo", staged=False)
    monkeypatch.chdir(root)
    return root


def _fixed_clock() -> Callable[[], float]:
    """Each reading one second after the last: the model 'loads' in exactly 1.00 s."""
    ticks = iter(range(1000))
    return lambda: float(next(ticks))


ANSWER = ["`greet` returns a **greeting**:\n\n", "- it takes a name\n", "- it returns `hello {name}`\n"]


# ---------------------------------------------------------------- dsv4 ask


@pytest.mark.parametrize("color", [False, True])
def test_ask_streamed_answer_with_usage(capture, fake, repo, color):
    fake.answer = ANSWER
    run = capture(color)
    options = ask_command.AskOptions(model="fake", verbose=True, log=False)
    ask_command.run_ask(["src", "What does greet return?"], options, clock=_fixed_clock())
    check_golden(f"ask.{run.suffix}.txt", run.text())


def test_ask_json(capture, fake, repo):
    fake.answer = ANSWER
    run = capture(False)
    ask_command.run_ask(["src", "What does greet return?"], ask_command.AskOptions(model="fake", json_output=True, log=False),
                        clock=_fixed_clock())
    check_golden("ask-json.plain.txt", run.text())


def test_ask_stopped_at_max_tokens(capture, fake, repo):
    fake.answer = ANSWER
    run = capture(False)
    ask_command.run_ask(["What does greet return?"], ask_command.AskOptions(model="fake", max_tokens=2, log=False),
                        clock=_fixed_clock())
    check_golden("ask-length.plain.txt", run.text())


@pytest.mark.parametrize("color", [False, True])
def test_ask_think_reasoning_dimmed_then_the_answer(capture, fake, repo, color):
    fake.answer = ["\nThe user asks", " about greet; it", " formats a string.</thi", "nk>\n\n", *ANSWER]
    run = capture(color)
    ask_command.run_ask(["What does greet return?"], ask_command.AskOptions(model="flash", think=True, log=False),
                        clock=_fixed_clock())
    check_golden(f"ask-think.{run.suffix}.txt", run.text())


def test_ask_think_json(capture, fake, repo):
    fake.answer = ["\nThe user asks about greet.</think>\n\n", *ANSWER]
    run = capture(False)
    ask_command.run_ask(["q"], ask_command.AskOptions(model="pro", think=True, json_output=True, log=False),
                        clock=_fixed_clock())
    check_golden("ask-think-json.plain.txt", run.text())


# ---------------------------------------------------------------- dsv4 pack's summary


def _pack_result(warnings: list[str]):
    from ingest import FileReport, PackResult, Reduction

    files = [FileReport("src/app.py", "full", "", 1_234), FileReport("src/big.py", "reduced", "budget", 20_480),
             FileReport("logo.png", "listed", "binary", 0), FileReport("font.woff", "listed", "binary", 0),
             FileReport("poetry.lock", "listed", "lock file", 0), FileReport("README.md", "full", "", 310)]
    return PackResult(total_tokens=22_101, files=files, tokenizer="tiny-llama-test", warnings=warnings,
                      reduced=[Reduction("src/big.py", "full", "reduced")])


@pytest.mark.parametrize("color", [False, True])
def test_pack_summary(capture, color):
    run = capture(color)
    pack_command._rich_summary(_pack_result(["src/odd.bin: unreadable (permission denied)"]), 24_000)
    check_golden(f"pack-summary.{run.suffix}.txt", run.text())


def test_pack_summary_without_rich_matches_its_golden_render(capture):
    """The fast path that skips Rich writes what Rich writes without colour."""
    run = capture(False)
    result = _pack_result([])
    pack_command._print_summary(result, 24_000)  # stderr is no terminal: the plain path
    plain = run.text()
    run = capture(False)
    pack_command._rich_summary(result, 24_000)
    assert plain == run.text()
    check_golden("pack-summary-no-warning.plain.txt", plain)


# ---------------------------------------------------------------- dsv4 review


REVIEW_ANSWER = ("src/calc.py:2: error: add subtracts instead of adding\n"
                 "README.md:1: info: mention div in the README\n"
                 "src/calc.py:6: warning: division by zero when b is 0\n"
                 "src/calc.py:12: info: name the arguments\n")


@pytest.mark.parametrize("color", [False, True])
def test_review_findings_grouped_by_file(capture, fake, repo, color):
    fake.answer = [REVIEW_ANSWER]
    (repo / "README.md").write_text("# Calc\n\nAdds and divides.\n")
    run = capture(color)
    assert main(["review", "--no-log"]) == 0
    check_golden(f"review.{run.suffix}.txt", run.text())


def test_review_without_findings(capture, fake, repo):
    fake.answer = ["no findings"]
    run = capture(False)
    assert main(["review", "--no-log"]) == 0
    check_golden("review-none.plain.txt", run.text())


# ---------------------------------------------------------------- dsv4 models, dsv4 logs


MODEL_ROWS = [
    {"alias": "mini", "format": "gguf", "size": 98_362_432, "verified": True, "source": "hf",
     "path": "models/mini/SmolLM2-135M-Instruct.Q4_1.gguf"},
    {"alias": "flash", "format": "hf", "size": 284_019_331_072, "verified": False, "source": "hf",
     "path": "models/flash/deepseek-ai--DeepSeek-V4-Flash"},
]


@pytest.mark.parametrize("color", [False, True])
def test_models_table(capture, monkeypatch, color):
    """A table on a terminal, tab-separated lines in a pipe."""
    from engine import store

    installed = [store.InstalledModel(**{**row, "path": Path(row["path"])}) for row in MODEL_ROWS]
    monkeypatch.setattr(store, "installed_models", lambda verify=False: installed)
    run = capture(color)
    assert main(["models"]) == 0
    check_golden(f"models.{run.suffix}.txt", run.text())


def test_logs_list(capture, utc):
    summaries = [
        logs.ConversationSummary("c7f3a9e1", "2026-03-02T09:15:00+00:00", "flash", "chat",
                                 "How is the prefix cache keyed?", 3, 41_200, 980),
        logs.ConversationSummary("0b12de44", "2026-03-01T18:02:30+00:00", "mini", "ask",
                                 "What does greet return?", 1, 312, 24),
    ]
    run = capture(False)
    print(logs_command.conversation_list(summaries), end="")
    check_golden("logs.plain.txt", run.text())


# ---------------------------------------------------------------- errors


def test_error_lines(capture, fake, repo):
    run = capture(False)
    assert main(["ask", "missing.py", "What is in it?"]) == 1
    assert main(["ask", "--format", "yaml", "q"]) == 2
    assert main(["ask", "--max-tokens", "0", "q"]) == 2
    check_golden("errors.plain.txt", run.text())


# ---------------------------------------------------------------- the check itself


def test_a_difference_fails_and_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "UPDATE", False)
    (tmp_path / "case.color.txt").write_bytes(b"--- stdout ---\n\x1b[1mbold\x1b[0m\n")
    check_golden("case.color.txt", "--- stdout ---\n\x1b[1mbold\x1b[0m\n", tmp_path)  # equal: passes
    for changed in ("--- stdout ---\n\x1b[2mbold\x1b[0m\n", "--- stdout ---\n\x1b[1mbold\x1b[0m \n", "--- stdout ---\n"):
        with pytest.raises(AssertionError, match=r"case\.color\.txt differs") as failure:
            check_golden("case.color.txt", changed, tmp_path)
        assert "\\x1b" in str(failure.value) or changed == "--- stdout ---\n"
    with pytest.raises(pytest.fail.Exception, match="no golden file"):
        check_golden("missing.txt", "x", tmp_path)
