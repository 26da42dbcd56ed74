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
