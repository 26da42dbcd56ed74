"""`dsv4 pack` end to end in a subprocess: stdout is the payload, stderr the summary, no torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tinymodels import write_tiny_llama_gguf

_GIT_ENV = {
    "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_NOSYSTEM": "1",
}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.gguf"
    write_tiny_llama_gguf(path)
    return path


@pytest.fixture
def repo(tmp_path) -> Path:
    root = tmp_path / "repo"
    (root / "src").mkdir(parents=True)
    (root / "README.md").write_text("# Demo\n")
    (root / "src" / "app.py").write_text("def main():\n    return 1\n")
    (root / "src" / "big.py").write_text("".join(f"def f{n}(x):\n    return x + {n}\n\n" for n in range(60)))
    (root / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (root / ".gitignore").write_text("*.log\n")
    (root / "debug.log").write_text("noise\n")
    env = {**os.environ, **_GIT_ENV}
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "init"]):
        subprocess.run(["git", *args], cwd=root, env=env, check=True, capture_output=True)
    return root


def dsv4(*args: str, cwd: Path, stdin: bytes | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "DSV4_DEBUG": "", **(env or {})}
    return subprocess.run([sys.executable, "-m", "dsv4cli.app", *args], cwd=cwd, input=stdin,
                          capture_output=True, env=environment, timeout=120)


def test_pack_prints_only_the_pack_and_a_summary_on_stderr(repo, tiny_gguf, tmp_path):
    summary = tmp_path / "summary.json"
    result = dsv4("pack", "--model", str(tiny_gguf), "--summary-json", str(summary), cwd=repo)
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    assert out.startswith("<file path=")
    assert '<file path="src/app.py">\ndef main():\n    return 1\n</file>\n' in out
    assert "debug.log" not in out                      # ignored by .gitignore
    assert "- logo.png (listed: binary)" in out
    err = result.stderr.decode()
    assert "tokens" in err and "\x1b[" not in err      # no colours outside a terminal
    data = json.loads(summary.read_text())
    assert set(data) == {"total_tokens", "tokenizer", "files"}
    from engine.tokenizer import Tokenizer

    assert data["total_tokens"] == Tokenizer.from_gguf(tiny_gguf).count(out)
    assert data["tokenizer"] == "tiny-llama-test"
    by_path = {f["path"]: f for f in data["files"]}
    assert by_path["logo.png"] == {"path": "logo.png", "status": "listed", "reason": "binary", "tokens": 0}
    assert by_path["src/app.py"]["status"] == "full" and by_path["src/app.py"]["tokens"] > 0


def test_list_prints_paths_in_pack_order_and_nothing_else(repo, tmp_path):
    result = dsv4("pack", "--list", cwd=repo)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == [".gitignore", "README.md", "logo.png", "src/app.py", "src/big.py"]
    assert result.stderr == b""
    narrowed = dsv4("pack", "src", "--list", "--exclude", "*.md", cwd=repo)
    assert narrowed.stdout.decode().splitlines() == ["app.py", "big.py"]


def test_output_file_stdin_and_files_from(repo, tiny_gguf, tmp_path):
    target = tmp_path / "out.md"
    result = dsv4("pack", "--model", str(tiny_gguf), "--format", "markdown", "-o", str(target), cwd=repo)
    assert result.returncode == 0 and result.stdout == b""
    assert target.read_text().startswith("## ")
    inside = repo / "pack [1].xml"
    for _ in range(2):
        assert dsv4("pack", "--model", str(tiny_gguf), "-o", str(inside), cwd=repo).returncode == 0
    assert "pack [1].xml" not in inside.read_text()        # the previous pack is not packed
    piped = dsv4("pack", "-", "--model", str(tiny_gguf), cwd=repo, stdin=b"some text\n")
    assert piped.stdout.decode().startswith('<file path="stdin">\nsome text\n</file>\n')
    listed = dsv4("pack", "--files-from", "-", "--model", str(tiny_gguf), "--format", "plain", cwd=repo,
                  stdin=b"src/app.py\0README.md\0")
    out = listed.stdout.decode()
    assert out.index("=== src/app.py ===") < out.index("=== README.md ===")


def test_budget_fits_and_reports(repo, tiny_gguf, tmp_path):
    summary = tmp_path / "s.json"
    full = dsv4("pack", "--model", str(tiny_gguf), "--summary-json", str(summary), cwd=repo)
    total = json.loads(summary.read_text())["total_tokens"]
    fitted = dsv4("pack", "--model", str(tiny_gguf), "--budget", str(total - 200), "--summary-json", str(summary),
                  cwd=repo)
    assert fitted.returncode == 0, fitted.stderr
    data = json.loads(summary.read_text())
    assert data["total_tokens"] <= total - 200
    assert {f["path"]: f["status"] for f in data["files"]}["src/big.py"] == "reduced"
    assert b"budget" in fitted.stderr
    assert len(fitted.stdout) < len(full.stdout)


@pytest.mark.parametrize(
    "args, message",
    [
        (["pack", "missing-dir"], "no such file or directory"),
        (["pack", "--budget", "5"], "--budget"),
        (["pack", "--format", "yaml"], "unknown --format"),
        (["pack", "--max-file-size", "lots"], "--max-file-size"),
    ],
)
def test_errors_are_one_line(repo, tiny_gguf, args, message):
    result = dsv4(*args, "--model", str(tiny_gguf), cwd=repo)
    assert result.returncode != 0
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], lines
    assert result.stdout == b""


def test_files_from_outside_the_working_directory_is_a_one_line_error(repo, tiny_gguf, tmp_path):
    (tmp_path / "elsewhere.py").write_text("secret = 1\n")
    for listed in (b"README.md\n../elsewhere.py\n", b"README.md\n" + str(tmp_path / "elsewhere.py").encode() + b"\n"):
        result = dsv4("pack", "--files-from", "-", "--model", str(tiny_gguf), cwd=repo, stdin=listed)
        lines = result.stderr.decode().strip().splitlines()
        assert result.returncode == 1 and result.stdout == b""
        assert len(lines) == 1 and lines[0].startswith("Error: ") and "outside the working directory" in lines[0], lines
    inside = dsv4("pack", "--files-from", "-", "--list", cwd=repo, stdin=b"src/../README.md\n" + str(repo / "src/app.py").encode() + b"\n")
    assert inside.returncode == 0 and inside.stdout.decode().splitlines() == ["README.md", "src/app.py"]


def test_git_only_option_outside_git_is_an_error(tmp_path, tiny_gguf):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "a.txt").write_text("a\n")
    result = dsv4("pack", "--recurse-submodules", "--model", str(tiny_gguf), cwd=plain)
    assert result.returncode == 1
    assert result.stderr.decode().startswith("Error: ") and "git" in result.stderr.decode()


def test_unknown_model_fails_clearly_without_network(repo, tmp_path):
    result = dsv4("pack", "--model", str(tmp_path / "absent.gguf"), cwd=repo)
    assert result.returncode == 1 and result.stderr.decode().startswith("Error: ")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads unreadable files")
def test_unreadable_file_is_listed_with_a_warning(repo, tiny_gguf):
    secret = repo / "src" / "secret.py"
    secret.write_text("x = 1\n")
    secret.chmod(0)
    try:
        result = dsv4("pack", "--model", str(tiny_gguf), cwd=repo)
    finally:
        secret.chmod(0o644)
    assert result.returncode == 0
    assert "secret.py" in result.stderr.decode() and "- src/secret.py (listed: unreadable" in result.stdout.decode()


def test_pack_never_imports_torch(repo, tiny_gguf):
    code = (
        "import sys; from dsv4cli.app import main; "
        f"code = main(['pack', '--model', {str(tiny_gguf)!r}, '-o', 'out.xml']); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(code)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr


_WARM_TWICE = """
import sys
import ingest.pack_cache
from dsv4cli.app import main
ingest.pack_cache.RACY_SECONDS = -10.0    # the files were all written just now
main(["pack", *sys.argv[1:]])
"""


def test_a_cache_hit_copies_the_same_bytes_to_a_pipe_and_to_a_file(repo, tiny_gguf, tmp_path):
    (repo / "caf\u00e9 \u2603.txt").write_text("non-ASCII name\n")
    env = {**os.environ, "DSV4_HOME": str(tmp_path / "home"), "DSV4_DEBUG": "1"}
    outputs = []
    for run in range(3):
        target = tmp_path / f"out{run}"
        # a file (copied by sendfile from the cache on a hit), then a pipe
        written = subprocess.run([sys.executable, "-c", _WARM_TWICE, "--model", str(tiny_gguf), "-o", str(target)],
                                 cwd=repo, env=env, capture_output=True)
        assert written.returncode == 0, written.stderr
        piped = subprocess.run([sys.executable, "-c", _WARM_TWICE, "--model", str(tiny_gguf)],
                               cwd=repo, env=env, capture_output=True)
        assert piped.returncode == 0, piped.stderr
        assert piped.stdout == target.read_bytes()
        outputs.append(piped.stdout)
    assert outputs[0] == outputs[1] == outputs[2]
    assert "caf\u00e9 \u2603.txt".encode() in outputs[0]
    assert len(list((tmp_path / "home").rglob("packs/*.txt"))) == 1


@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that takes any bytes as a name")
def test_a_cache_hit_with_a_name_that_is_not_utf8(repo, tiny_gguf, tmp_path, monkeypatch):
    import ingest
    import ingest.pack_cache

    monkeypatch.setattr(ingest.pack_cache, "RACY_SECONDS", -10.0)
    with open(os.path.join(os.fsencode(repo), b"latin1-caf\xe9.txt"), "wb") as handle:
        handle.write(b"a name in Latin-1\n")
    from engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(tiny_gguf)
    cache = tmp_path / "cache"
    first = ingest.pack([repo], tokenizer=tokenizer, cache_dir=cache)
    second = ingest.pack([repo], tokenizer=tokenizer, cache_dir=cache)
    assert not first.from_cache and second.from_cache
    import io

    sinks = [io.BytesIO(), io.BytesIO()]
    first.write_output(sinks[0])
    second.write_output(sinks[1])
    assert sinks[0].getvalue() == sinks[1].getvalue()
    assert b'path="latin1-caf\\xdce9.txt"' in sinks[0].getvalue()     # shown escaped, never raw
    assert second.text == first.text


@pytest.mark.parametrize("odd", ["plain.py", "trailing space ", "a:smile:b.py", "a: b:c.py", "x[bold]y.py",
                                 "back\\slash.py", "tab\there.py", "caf\u00e9/\u2603.py", "[link]", "a]b", "\U0001f600.md"])
def test_summary_without_rich_is_what_rich_prints(odd, capsys, monkeypatch):
    from ingest import FileReport, PackResult, Reduction

    from dsv4cli.commands import pack as pack_command

    files = [FileReport(f"src/{odd}", "full", "", 1234), FileReport("big.py", "reduced", "budget", 99_999),
             FileReport(odd, "listed", "binary", 0), FileReport("b.bin", "listed", "binary", 0),
             FileReport("c.lock", "listed", f"lock {odd}", 0)] + [
             FileReport(f"f{n}.py", "full", "", n) for n in range(12)]
    result = PackResult(total_tokens=123_456, files=files, tokenizer="tok", reduced=[Reduction("big.py", "full", "reduced")])
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
    pack_command._rich_summary(result, 10_000)
    by_rich = capsys.readouterr().err
    plain = pack_command._plain_summary(result, 10_000)
    if plain is not None:
        assert plain == by_rich
    assert (plain is None) == (odd not in ("plain.py", "trailing space ", "caf\u00e9/\u2603.py",
                                           "\U0001f600.md"))
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert pack_command._plain_summary(result, 10_000) is None
