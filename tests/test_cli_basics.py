"""The root command: help, version, usage errors, and no torch on the light paths."""

from __future__ import annotations

import subprocess
import sys

from dsv4cli.app import main


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "pack" in out


def test_unknown_command_is_a_one_line_usage_error(capsys):
    assert main(["no-such-command"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ")


def test_help_does_not_import_torch():
    code = "import sys; from dsv4cli.app import main; main(['--help']); assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_library_error_is_one_line_with_hint(capsys, tmp_path):
    assert main(["pack", str(tmp_path / "missing")]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "(" in lines[0]


def test_help_lists_every_command_in_registration_order(capsys):
    from dsv4cli.app import app
    from typer.main import get_command

    assert main(["--help"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.split("Commands:")[1].splitlines() if line.strip()]
    assert listed == list(get_command(app).commands)
    assert {"pack", "ask", "pull", "models", "review", "completion", "cache", "config", "logs", "hook"} <= set(listed)


def test_a_known_command_imports_only_its_own_module(tmp_path):
    code = ("import sys; from dsv4cli.app import main; main(['pack', '--list', '--no-git', sys.argv[1]]); "
            "print(sorted(m for m in sys.modules if m.startswith('dsv4cli.commands.')), file=sys.stderr)")
    (tmp_path / "a.txt").write_text("a\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "a.txt\n"
    assert result.stderr.strip().splitlines()[-1] == "['dsv4cli.commands.pack']"


def test_commands_run_one_after_another_in_one_process(capsys, tmp_path):
    (tmp_path / "a.txt").write_text("a\n")
    assert main(["pack", "--list", "--no-git", str(tmp_path)]) == 0
    assert main(["--version"]) == 0
    assert main(["pack", "--no-such-option"]) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith("a.txt\ndsv4 ")
    assert "see 'dsv4 pack --help'" in captured.err


def test_plain_values_skip_pydantic_and_every_answer_matches_typers_own(tmp_path, capsys, monkeypatch):
    """The same arguments give the same exit code, output and message with and without the plain
    coercion (dsv4cli/plain_params.py), and a plain `pack` never imports pydantic."""
    from dsv4cli import plain_params

    source, out = tmp_path / "source", tmp_path / "out.txt"
    source.mkdir()
    (source / "a.txt").write_text("a\n")
    cases = [
        ["pack", "--list", "--no-git", str(source)],
        ["pack", "--list", "--no-git", "--budget", "5", str(source)],
        ["pack", "--list", "--no-git", "--budget", "0", str(source)],
        ["pack", "--list", "--no-git", "--budget", "abc", str(source)],
        ["pack", "--list", "--no-git", "--budget", "+7", str(source)],
        ["pack", "--list", "--no-git", "--budget", "", str(source)],
        ["pack", "--list", "--no-git", "-o", str(out), "--include", "*.txt", str(source)],
        ["pack", "--list", "--no-git", "-o", "", str(source)],
        ["pack", "--list", "--no-git", "--exclude", "a.*", "--exclude", "b", str(source)],
        ["pack", "--list", "--no-git", "--max-file-size", "2M", "--format", "plain", str(source)],
        ["--help"],
    ]

    def answers() -> list[tuple]:
        results = []
        for args in cases:
            out.unlink(missing_ok=True)
            code = main(list(args))
            captured = capsys.readouterr()
            written = out.read_text() if out.exists() else None
            results.append((code, captured.out, captured.err, written))
        return results

    plain = answers()
    monkeypatch.setattr(plain_params, "install", lambda params: None)
    assert answers() == plain
    code = "import sys; from dsv4cli.app import main; main(sys.argv[1:]); assert 'pydantic' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code, "pack", "--list", "--no-git", "--budget", "9", "-o",
                             str(tmp_path / "o"), str(source)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
