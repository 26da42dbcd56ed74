"""`dsv4 ask` through the prefix cache (--json and -v reports, --no-cache, --cache-ro,
--cache-cap, a full disk) and `dsv4 cache ls|stats|verify|prune|clear`, on the tiny real
GGUF through the real engine, with the cache in the test's own DSV4_HOME."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsv4cli.app import main
from engine import prefix_cache
from tests.stdins import TerminalStdin
from tests.tinymodels import tiny_vocab_text, write_tiny_llama_gguf

QUESTION = "What does fibonacci return?"


@pytest.fixture(autouse=True)
def terminal_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", TerminalStdin())


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return str(write_tiny_llama_gguf(tmp_path_factory.mktemp("tiny-cli-cache") / "tiny.gguf", ctx=2048))


@pytest.fixture
def repo(tmp_path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("a.py", "b.py", "c.py"):
        (root / name).write_text(tiny_vocab_text())
    return root


def ask(capsys, model_path: str, repo: Path, *options: str, question: str = QUESTION) -> tuple[int, str, str]:
    code = main(["ask", "--max-tokens", "4", "--model", model_path, *options, str(repo), question])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def ask_json(capsys, model_path: str, repo: Path, *options: str, question: str = QUESTION) -> dict:
    code, out, err = ask(capsys, model_path, repo, "--json", *options, question=question)
    assert code == 0, err
    return json.loads(out)


def test_second_question_reuses_the_pack_and_reports_it(capsys, model_path, repo):
    first = ask_json(capsys, model_path, repo)
    assert first["usage"]["cached_tokens"] == 0 and first["cache"]["reused_tokens"] == 0
    assert first["cache"]["miss_reason"] == "the cache is empty" and first["cache"]["segments_written"] >= 1
    second = ask_json(capsys, model_path, repo, question="And what does Repository.read do?")
    cache = second["cache"]
    prompt = second["usage"]["prompt_tokens"]
    assert second["usage"]["cached_tokens"] == cache["reused_tokens"] > prompt // 2
    assert cache["prefilled_tokens"] == prompt - cache["reused_tokens"]
    assert cache["bytes_loaded"] > 0 and cache["load_bytes_per_s"] > 0 and cache["load_s"] > 0
    assert second["timings"]["ttft_s"] > 0
    # Asked again, the same question gives the same greedy answer from the cache.
    again = ask_json(capsys, model_path, repo)
    assert again["answer"] == first["answer"] and again["usage"]["cached_tokens"] > 0


def test_verbose_reports_reuse_speed_prefill_and_the_miss_reason(capsys, model_path, repo):
    code, out, err = ask(capsys, model_path, repo, "-v")
    assert code == 0
    assert "cache: 0/" in err and "cache miss: the cache is empty" in err and "wrote" in err
    code, out, err = ask(capsys, model_path, repo, "-v", question="Why?")
    line = next(l for l in err.splitlines() if l.startswith("cache: "))
    assert "tokens reused" in line and "/s)" in line and "prefilled" in line and "first token" in line
    assert not out.startswith("cache")  # the report is on stderr only


def test_no_cache_neither_reads_nor_writes(capsys, model_path, repo):
    ask_json(capsys, model_path, repo)
    count = len(prefix_cache.segment_paths())
    payload = ask_json(capsys, model_path, repo, "--no-cache", question="Another question?")
    assert payload["usage"]["cached_tokens"] == 0 and payload["cache"]["enabled"] is False
    assert "--no-cache" in payload["cache"]["miss_reason"]
    assert len(prefix_cache.segment_paths()) == count


def test_cache_ro_reads_but_never_writes(capsys, model_path, repo):
    payload = ask_json(capsys, model_path, repo, "--cache-ro")
    assert payload["cache"]["segments_written"] == 0 and not prefix_cache.segment_paths()
    ask_json(capsys, model_path, repo)
    assert ask_json(capsys, model_path, repo, "--cache-ro", question="Why?")["usage"]["cached_tokens"] > 0


def test_a_full_disk_warns_and_still_answers(capsys, model_path, repo, monkeypatch):
    def full_disk(handle, data):
        raise OSError(28, "No space left on device")

    expected = ask_json(capsys, model_path, repo, "--no-cache")["answer"]
    monkeypatch.setattr(prefix_cache, "_write_chunk", full_disk)
    code, out, err = ask(capsys, model_path, repo, "--json")
    # The same (greedy) answer as without a cache: the failed write lost nothing.
    assert code == 0 and json.loads(out)["answer"] == expected
    assert "No space left on device" in err and "not cached" in err


def test_bad_cache_cap_is_a_usage_error(capsys, model_path, repo):
    code, out, err = ask(capsys, model_path, repo, "--cache-cap", "lots")
    assert code == 2 and out == ""
    assert err.startswith("Error: --cache-cap: cannot read 'lots' as a size")


def test_cache_cap_option_bounds_the_cache(capsys, model_path, repo):
    code, out, err = ask(capsys, model_path, repo, "--json", "--cache-cap", "1K")
    payload = json.loads(out)
    assert code == 0 and payload["cache"]["segments_written"] == 0 and not prefix_cache.segment_paths()
    assert "does not fit the cache cap of 1,024 bytes" in payload["cache"]["warnings"][0]
    assert "does not fit the cache cap" in err


# ---------------------------------------------------------------- dsv4 cache


def cache_cmd(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["cache", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cache_commands(capsys, model_path, repo):
    code, out, err = cache_cmd(capsys, "ls")
    assert code == 0 and out == "" and "empty" in err
    ask_json(capsys, model_path, repo)
    segments = prefix_cache.segment_paths()
    assert segments

    code, out, _ = cache_cmd(capsys, "ls")
    rows = [line.split("\t") for line in out.splitlines()]
    assert len(rows) == len(segments) and all(r[0] == "tiny" for r in rows)
    assert rows[0][2] == "0" and int(rows[0][3]) > 0 and Path(rows[0][6]).exists()
    assert json.loads(cache_cmd(capsys, "ls", "--json")[1])[0]["model"] == "tiny"

    stats = json.loads(cache_cmd(capsys, "stats", "--json")[1])
    assert stats["segments"] == len(segments) and stats["disk_bytes"] >= sum(p.stat().st_size for p in segments) // 2
    assert stats["models"]["tiny"]["tokens"] > 0 and stats["cap_bytes"] > 0
    code, out, _ = cache_cmd(capsys, "stats")
    assert code == 0 and "segments" in out and "cap" in out

    code, out, _ = cache_cmd(capsys, "verify")
    assert code == 0 and out == f"{len(segments)} segment(s) ok, 0 damaged\n"
    data = bytearray(segments[0].read_bytes())
    data[-100] ^= 0xFF
    segments[0].write_bytes(bytes(data))
    code, out, err = cache_cmd(capsys, "verify")
    assert code == 1 and "1 damaged" in out and "checksum mismatch" in err and not segments[0].exists()

    code, out, _ = cache_cmd(capsys, "prune", "--older-than", "30d")
    assert code == 0 and out.startswith("removed 0 segment(s)")
    code, out, _ = cache_cmd(capsys, "prune", "--cap", "0")
    assert code == 0 and out.startswith(f"removed {len(segments) - 1} segment(s)")
    assert not prefix_cache.segment_paths()

    ask_json(capsys, model_path, repo)
    code, out, _ = cache_cmd(capsys, "clear")
    assert code == 0 and out.startswith("removed ") and not prefix_cache.segment_paths()


def test_cache_stats_shows_and_clear_weights_removes_the_prepared_weights(capsys, model_path, repo):
    from engine import paths

    ask_json(capsys, model_path, repo)  # loading converts the tiny GGUF once and keeps the result
    weight_files = paths.weights_cache_files()
    assert weight_files
    stats = json.loads(cache_cmd(capsys, "stats", "--json")[1])["weights"]
    assert stats["files"] == len(weight_files) and stats["disk_bytes"] == sum(f.stat().st_size for f in weight_files)
    assert "prepared file(s)" in cache_cmd(capsys, "stats")[1]

    code, out, _ = cache_cmd(capsys, "clear")  # segments only
    assert code == 0 and paths.weights_cache_files() == weight_files
    code, out, _ = cache_cmd(capsys, "clear", "--weights")
    assert code == 0 and f"removed {len(weight_files)} prepared weight file(s)" in out
    assert not paths.weights_cache_files() and not prefix_cache.segment_paths()
    assert ask_json(capsys, model_path, repo)["answer"] is not None  # the next load rebuilds them
    assert paths.weights_cache_files()


def test_cache_prune_rejects_a_bad_age(capsys):
    code, out, err = cache_cmd(capsys, "prune", "--older-than", "soon")
    assert code == 2 and "cannot read 'soon' as an age" in err


def test_cache_commands_do_not_import_torch(dsv4_home):
    code = "import sys; from dsv4cli.app import main; main(['cache', 'stats']); print('torch' in sys.modules, file=sys.stderr)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "DSV4_HOME": str(dsv4_home)})
    assert result.stderr.strip().endswith("False"), result.stderr
