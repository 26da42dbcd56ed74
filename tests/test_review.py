"""`dsv4 review`: which diff, the prompt's order (pack first, diff and instructions last),
parsing a messy answer without inventing findings, the report, --fail-on, --timeout,
--json, logging and errors. A scripted model (tests/fake_engine.py) stands in for the engine."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dsv4cli import logs
from dsv4cli.app import main
from dsv4cli.commands import ask as ask_command
from dsv4cli.commands import review
from engine.events import Event, SamplingParams
from tests.fake_engine import FakeModel, tiny_tokenizer
from tests.gitrepos import calc_repo_with_change, git
from tests.stdins import TerminalStdin


def _prompt(call: Any) -> str:
    """All the user messages of a call: the pack and the diff are messages of their own."""
    return "\n\n".join(m["content"] for m in call.messages if m["role"] == "user")


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    root = calc_repo_with_change(tmp_path / "repo", staged=True)
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "stdin", TerminalStdin())
    for name in ("DSV4_REVIEW_FAIL_ON", "DSV4_REVIEW_TIMEOUT", "DSV4_NO_LOG"):
        monkeypatch.delenv(name, raising=False)
    return root


@pytest.fixture
def fake(monkeypatch, tokenizer):
    model = FakeModel(tokenizer, answer=["no findings"])

    def open_model(name: str):
        model.name = name
        return name, model

    monkeypatch.setattr(ask_command, "_open_model", open_model)
    return model


MESSY_ANSWER = """Here is my review of the diff:

src/calc.py:2: error: add subtracts instead of adding
- `src/calc.py:6`: **warning**: division by zero when b is 0
1. src/calc.py:6:12: warning - division by zero when b is 0
src/calc.py:2: error: add subtracts instead of adding
path/to/file.ext:12: error: what is wrong and why
src/imaginary.py:3: error: this file does not exist
src/calc.py:0: error: line zero is not a line
src/calc.py:4: catastrophe: unknown severity word
README.md:1: info: mention div in the README
b/src/calc.py:5: nit: name the arguments
../outside.txt:1: error: outside the repository
The code looks fine otherwise. Overall: 2 problems.
"""


# ---------------------------------------------------------------- parsing


def test_parse_keeps_what_parses_and_invents_nothing(repo):
    known = review.path_resolver(repo, ("src/calc.py",))
    (repo.parent / "outside.txt").write_text("x\n")
    findings = review.parse_findings(MESSY_ANSWER, known_paths=known)
    assert findings == [
        review.Finding("src/calc.py", 2, "error", "add subtracts instead of adding"),
        review.Finding("src/calc.py", 6, "warning", "division by zero when b is 0"),
        review.Finding("README.md", 1, "info", "mention div in the README"),
        review.Finding("src/calc.py", 5, "info", "name the arguments"),
    ]


@pytest.mark.parametrize("answer", ["", "no findings", "Looks good to me!", "src/calc.py is fine.",
                                    "```\nsrc/calc.py\n```", "error: something somewhere"])
def test_answers_without_findings(repo, answer):
    assert review.parse_findings(answer, known_paths=review.path_resolver(repo, ("src/calc.py",))) == []


def test_diff_files_in_order():
    diff = ("diff --git a/b.py b/b.py\n--- a/b.py\n+++ b/b.py\n@@ -1 +1 @@\n-x\n+y\n"
            "diff --git a/old.py b/new.py\nsimilarity index 90%\nrename from old.py\nrename to new.py\n"
            "diff --git a/gone.py b/gone.py\ndeleted file mode 100644\n--- a/gone.py\n+++ /dev/null\n")
    assert review.diff_files(diff) == ("b.py", "new.py", "gone.py")


# ---------------------------------------------------------------- the command


def test_staged_review_prompt_order_and_report(repo, fake, capsys):
    fake.answer = [MESSY_ANSWER]
    assert main(["review", "--staged"]) == 0
    (call,) = fake.calls
    user = _prompt(call)
    assert call.system_text == review.REVIEW_SYSTEM
    # The pack of the repository first, then the diff, then the instructions last.
    pack_at, diff_at, rules_at = user.index("# Calc"), user.index("+    return a - b"), \
        user.index(review.REVIEW_INSTRUCTIONS)
    assert pack_at < diff_at < rules_at and user.endswith(review.REVIEW_INSTRUCTIONS)
    assert call.params.temperature == 0.0
    out = capsys.readouterr().out
    assert out == (
        "dsv4 review · staged changes · 1 file changed · model mini\n"
        "src/calc.py\n"
        "  2  error    add subtracts instead of adding\n"
        "  5  info     name the arguments\n"
        "  6  warning  division by zero when b is 0\n"
        "README.md\n"
        "  1  info     mention div in the README\n"
        "4 findings in 2 files: 1 error, 1 warning, 2 infos\n"
    )


@pytest.mark.parametrize(("fmt", "marker"), [("xml", '<file path="README.md">'), ("markdown", "## README.md\n\n```"),
                                             ("plain", "=== README.md ===")])
def test_format_option_lays_out_the_repository_pack(repo, fake, fmt, marker):
    assert main(["review", "--staged", "--no-log", "--format", fmt]) == 0
    assert marker in _prompt(fake.calls[-1])


def test_unknown_format_is_a_usage_error(repo, fake, capsys):
    assert main(["review", "--staged", "--format", "yaml"]) == 2
    assert fake.calls == [] and "--format must be one of xml, markdown, plain" in capsys.readouterr().err


def test_default_is_all_uncommitted_changes_and_range(repo, fake, capsys):
    (repo / "README.md").write_text("# Calc\n\nUnstaged line.\n")
    assert main(["review"]) == 0
    assert "+Unstaged line." in fake.calls[-1].user_text and "+    return a - b" in fake.calls[-1].user_text
    assert "README.md" in fake.calls[-1].messages[1]["content"]  # the repository's pack, before the diff
    assert "uncommitted changes · 2 files changed" in capsys.readouterr().out
    git(repo, "commit", "-q", "-m", "second")
    assert main(["review", "--range", "HEAD~1..HEAD"]) == 0
    user = fake.calls[-1].user_text
    assert "+    return a - b" in user and "Unstaged line." not in user.split("```diff")[1]
    assert "HEAD~1..HEAD" in capsys.readouterr().out


def test_fail_on_threshold(repo, fake, capsys):
    fake.answer = ["src/calc.py:6: warning: division by zero\n"]
    assert main(["review", "--staged", "--fail-on", "error"]) == 0
    assert main(["review", "--staged", "--fail-on", "warning"]) == 1
    assert "1 finding(s) at or above warning" in capsys.readouterr().err
    assert main(["review", "--staged", "--fail-on", "info"]) == 1
    fake.answer = ["no findings"]
    assert main(["review", "--staged", "--fail-on", "info"]) == 0
    assert main(["review", "--staged", "--fail-on", "fatal"]) == 2


def test_fail_on_from_settings(repo, fake, monkeypatch):
    fake.answer = ["src/calc.py:2: error: wrong operator\n"]
    monkeypatch.setenv("DSV4_REVIEW_FAIL_ON", "error")
    assert main(["review", "--staged"]) == 1
    (repo / ".dsv4.toml").write_text('[review]\nfail_on = "error"\n')
    monkeypatch.delenv("DSV4_REVIEW_FAIL_ON")
    assert main(["review", "--staged"]) == 1
    assert main(["review", "--staged", "--fail-on", "info"]) == 1


def test_backend_local_overrides_a_server_url_in_the_project_file_and_the_environment(repo, fake, monkeypatch, capsys):
    # Nothing listens on port 9: a review that went to the URL would fail to connect.
    (repo / ".dsv4.toml").write_text('backend = "http://127.0.0.1:9/v1"\n')
    assert main(["review", "--staged"]) == 1
    assert "cannot reach http://127.0.0.1:9/v1" in capsys.readouterr().err
    assert main(["review", "--staged", "--backend", "local"]) == 0
    monkeypatch.setenv("DSV4_BACKEND", "http://127.0.0.1:9/v1")
    assert main(["review", "--staged", "--backend", "local"]) == 0
    assert len(fake.calls) == 2


def test_json_report(repo, fake, capsys):
    fake.answer = ["src/calc.py:2: error: wrong operator\n", "src/calc.py:6: warning: b may be 0\n"]
    assert main(["review", "--staged", "--json", "--fail-on", "error"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["findings"] == [
        {"path": "src/calc.py", "line": 2, "severity": "error", "message": "wrong operator"},
        {"path": "src/calc.py", "line": 6, "severity": "warning", "message": "b may be 0"},
    ]
    assert report["failed"] is True and report["files"] == ["src/calc.py"] and report["scope"] == "staged changes"
    assert report["usage"]["prompt_tokens"] == len(fake.calls[-1].prompt_ids)


def test_nothing_to_review(repo, fake, capsys):
    git(repo, "commit", "-q", "-m", "staged")
    assert main(["review", "--staged"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "nothing to review: no staged changes" in captured.err
    assert fake.calls == []


def test_errors_are_one_line(repo, fake, tmp_path, monkeypatch, capsys):
    assert main(["review", "--staged", "--range", "a..b"]) == 2
    assert capsys.readouterr().err.startswith("Error: --staged and --range cannot be used together")
    assert main(["review", "--range", "nosuch..HEAD"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: git diff failed")
    assert main(["review", "--range", "HEAD"]) == 2
    assert "is not A..B" in capsys.readouterr().err
    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    monkeypatch.chdir(outside)
    assert main(["review"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"Error: not a git repository: {outside} (run dsv4 review inside a git repository)"]
    assert fake.calls == []


def test_a_diff_too_long_for_the_model(repo, fake, capsys):
    fake.context_length = 300
    (repo / "big.py").write_text("".join(f"value_{n} = {n} * {n}\n" for n in range(300)))
    git(repo, "add", "big.py")
    assert main(["review", "--staged"]) == 1
    assert "the diff is too long to review" in capsys.readouterr().err


def test_repository_that_does_not_fit_falls_back_to_the_diff(repo, fake, capsys):
    (repo / "src" / "big.py").write_text("".join(f"def f{n}(x):\n    return x + {n}\n\n" for n in range(400)))
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "big")
    (repo / "src" / "calc.py").write_text("def add(a, b):\n    return b + a\n")
    git(repo, "add", "src/calc.py")
    fake.context_length = 1200
    assert main(["review", "--staged", "--max-tokens", "64"]) == 0
    user = fake.calls[-1].user_text
    assert len(fake.calls[-1].prompt_ids) + 64 <= 1200 and "+    return b + a" in user


class ManualClock:
    """A clock that moves only when told: the review's deadline without real waiting."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SlowModel(FakeModel):
    """Each text piece takes `delay` seconds of `clock`; honours `cancel` only when `obeys_cancel`."""

    delay: float = 0.05
    obeys_cancel: bool = True
    cancel: Callable[[], bool] | None = None
    pieces_yielded: int = 0
    clock: ManualClock | None = None

    def chat(self, messages: list[dict[str, str]], params: SamplingParams, **kwargs: Any) -> Iterator[Event]:
        cancel = self.cancel = kwargs.get("cancel")
        inner = super().chat(messages, params)

        def slowed() -> Iterator[Event]:
            for event in inner:
                if self.obeys_cancel and cancel is not None and cancel():
                    return  # a real engine would end with Done("cancelled"); ending early is harsher
                if type(event).__name__ == "TextDelta":
                    assert self.clock is not None
                    self.clock.now += self.delay
                    self.pieces_yielded += 1
                yield event

        return slowed()


@pytest.mark.parametrize("obeys_cancel", [True, False])
def test_timeout_stops_the_model_and_keeps_complete_findings(repo, tokenizer, monkeypatch, capsys, obeys_cancel):
    pieces = ["src/calc.py:2: error: wrong operator\n", "src/calc.py:6: warning: div"] + [" more"] * 200
    clock = ManualClock()
    model = SlowModel(tokenizer, answer=pieces)
    model.obeys_cancel, model.clock = obeys_cancel, clock
    monkeypatch.setattr(ask_command, "_open_model", lambda name: (name, model))
    monkeypatch.setattr(review, "run_review", functools.partial(review.run_review, clock=clock))
    assert main(["review", "--staged", "--timeout", "0.6", "--max-tokens", "500", "--fail-on", "error"]) == 1
    # 0.6 s of 0.05 s pieces is 12; at most one more is in flight when the deadline is noticed.
    assert 12 <= model.pieces_yielded <= 13, model.pieces_yielded
    assert model.cancel is not None and model.cancel()  # the engine is told the time is up
    assert model.closed == 1  # and the review stopped pulling and closed the generation
    captured = capsys.readouterr()
    assert "2  error    wrong operator" in captured.out and "div" not in captured.out  # the cut line is dropped
    assert "stopped at the --timeout of 0.6 s" in captured.err


def test_reviews_are_logged_unless_no_log(repo, fake):
    fake.answer = ["src/calc.py:2: error: wrong operator\n"]
    assert main(["review", "--staged"]) == 0
    with logs.LogStore() as store:
        (summary,) = store.list_conversations()
        assert summary.command == "review" and summary.title == "review of staged changes: src/calc.py"
        (exchange,) = store.get_conversation(summary.id).exchanges
        assert exchange.answer == "src/calc.py:2: error: wrong operator\n"
        context = store.blob(exchange.context_sha256)
        assert "README.md" in context and "# Calc" in context and review.REVIEW_INSTRUCTIONS not in context
        assert exchange.question.endswith(review.REVIEW_INSTRUCTIONS)
    assert main(["review", "--staged", "--no-log"]) == 0
    with logs.LogStore() as store:
        assert len(store.list_conversations()) == 1


@pytest.mark.slow
def test_end_to_end_a_second_review_reuses_the_cached_repository(repo, tmp_path, capsys):
    """The real engine on a tiny GGUF, through the prefix cache: reviewing again (a hook run
    again, or with another --fail-on) restores the stored prefix (in whole cache chunks)."""
    from tests.tinymodels import write_tiny_llama_gguf

    model = write_tiny_llama_gguf(tmp_path / "tiny.gguf", ctx=4096)
    args = ["review", "--staged", "--json", "-m", str(model), "--max-tokens", "4"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(args + ["--fail-on", "error"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert first["usage"]["cached_tokens"] == 0 and first["cache"]["bytes_written"] > 0
    assert second["usage"]["prompt_tokens"] == first["usage"]["prompt_tokens"]
    assert second["usage"]["cached_tokens"] > first["usage"]["prompt_tokens"] / 2
    assert second["files"] == ["src/calc.py"]
