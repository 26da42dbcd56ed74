"""Shell completions: the committed scripts are what the app generates now, and they complete
subcommands, options and values in the real shells, without starting Python.

When this fails after a command or option changed: python completions/generate.py
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsv4cli import completion
from dsv4cli.app import main

COMPLETIONS = Path(__file__).resolve().parents[1] / "completions"


@pytest.mark.parametrize("shell", completion.SHELLS)
def test_committed_scripts_match_the_app(shell):
    committed = (COMPLETIONS / completion.FILE_NAMES[shell]).read_text(encoding="utf-8")
    assert committed == completion.script(shell), (
        f"completions/{completion.FILE_NAMES[shell]} is out of date: run python completions/generate.py"
    )


def test_generate_check_mode_and_the_completion_command(capsys):
    result = subprocess.run([sys.executable, str(COMPLETIONS / "generate.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert main(["completion", "bash"]) == 0
    assert capsys.readouterr().out == (COMPLETIONS / "dsv4.bash").read_text(encoding="utf-8")
    assert main(["completion", "tcsh"]) == 2
    assert capsys.readouterr().err.startswith("Error: unknown shell 'tcsh'")


def test_every_command_and_option_is_in_the_tree():
    from dsv4cli.app import app

    specs = {spec.key: spec for spec in completion.command_tree(app)}
    assert {"ask", "pack", "review", "config", "config show", "logs", "logs show", "hook install"} <= set(specs)
    review_options = {name for option in specs["review"].options for name in option.names}
    assert {"--staged", "--range", "--fail-on", "--timeout", "--model", "-m", "--json", "--help", "-h"} <= review_options
    assert specs["pull"].argument_choices == tuple(specs["review"].options[[o.names[0] for o in
                                                   specs["review"].options].index("--model")].choices)


def _bash_complete(line: str, cwd: Path) -> list[str]:
    """Complete `line` (the cursor at its end) with bash's own machinery: source the script,
    set COMP_WORDS/COMP_CWORD/COMP_LINE/COMP_POINT, call the function `complete` registered."""
    words = shlex.split(line) + ([""] if line.endswith(" ") else [])
    program = f"""
source {shlex.quote(str(COMPLETIONS / 'dsv4.bash'))}
COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})
COMP_CWORD={len(words) - 1}
COMP_LINE={shlex.quote(line)}
COMP_POINT={len(line)}
spec=$(complete -p dsv4); function_name=${{spec##*-F }}; function_name=${{function_name%% *}}
"$function_name" dsv4 "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    # An empty PATH: the script may use only bash itself (no Python, no dsv4 on each TAB).
    result = subprocess.run(["/bin/bash", "--norc", "--noprofile", "-c", program], cwd=cwd, capture_output=True,
                            text=True, env={"PATH": str(cwd / "no-such-bin")}, timeout=30)
    assert result.returncode == 0, result.stderr
    return [item for item in result.stdout.splitlines() if item]


@pytest.mark.skipif(not Path("/bin/bash").exists(), reason="needs bash")
def test_bash_completes_ask_from_a(tmp_path):
    assert _bash_complete("dsv4 a", tmp_path) == ["ask"]


@pytest.mark.skipif(not Path("/bin/bash").exists(), reason="needs bash")
@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("dsv4 re", ["review"]),
        ("dsv4 c", ["chat", "completion", "cache", "config"]),
        ("dsv4 config ", ["path", "show", "set"]),
        ("dsv4 review --fa", ["--fail-on"]),
        ("dsv4 review --fail-on ", ["info", "warning", "error"]),
        ("dsv4 review -m m", ["mini"]),
        ("dsv4 ask --max-tokens 5 --verb", ["--verbose"]),
        ("dsv4 hook install --f", ["--force", "--fail-on"]),
        ("dsv4 config set review.f", ["review.fail_on"]),
        ("dsv4 --version lo", ["logs"]),
        ("dsv4 logs show --j", ["--json"]),
        ("dsv4 ask notes", ["notes.md"]),          # files after the options
        ("dsv4 pack -o no", ["notes.md"]),         # an option's value: a file
    ],
)
def test_bash_completes_subcommands_options_values_and_files(tmp_path, line, expected):
    (tmp_path / "notes.md").write_text("x\n")
    assert _bash_complete(line, tmp_path) == expected


@pytest.mark.skipif(shutil.which("fish") is None, reason="needs fish")
@pytest.mark.parametrize(
    ("line", "expected"),
    [("dsv4 a", ["ask"]), ("dsv4 config s", ["set", "show"]), ("dsv4 review --fail-on ", ["error", "info", "warning"]),
     ("dsv4 review --ti", ["--timeout"]), ("dsv4 hook ", ["install", "uninstall"])],
)
def test_fish_completes(tmp_path, line, expected):
    script = f"source {shlex.quote(str(COMPLETIONS / 'dsv4.fish'))}; complete -C{shlex.quote(line)}"
    result = subprocess.run(["fish", "--no-config", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    assert [item.split("\t")[0] for item in result.stdout.splitlines()] == expected


@pytest.mark.skipif(shutil.which("zsh") is None, reason="needs zsh")
def test_zsh_script_offers_the_right_candidates(tmp_path):
    """zsh's completion widgets need a terminal; the script's choices are checked by standing
    in for the three completion builtins it calls (compadd, _describe, _files)."""
    program = f"""
compadd() {{ print -r -- "values: ${{(P)${{@[-1]}}}}"; }}
_files() {{ print -r -- "files"; }}
_describe() {{ local -a items; items=("${{(@P)4}}"); print -r -- "$3:" ${{items%%:*}}; }}
compdef() {{ :; }}
source {shlex.quote(str(COMPLETIONS / '_dsv4'))}
words=(dsv4 ""); CURRENT=2; _dsv4
words=(dsv4 config ""); CURRENT=3; _dsv4
words=(dsv4 review --fail-on ""); CURRENT=4; _dsv4
words=(dsv4 review -m x --st); CURRENT=5; _dsv4
words=(dsv4 pull ""); CURRENT=3; _dsv4
words=(dsv4 ask --json ""); CURRENT=4; _dsv4
"""
    assert subprocess.run(["zsh", "-n", str(COMPLETIONS / "_dsv4")]).returncode == 0
    result = subprocess.run(["zsh", "-f", "-c", program], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("command: pack ask ") and " review " in lines[0]
    assert lines[1] == "command: path show set"
    assert lines[2] == "values: info warning error"
    assert lines[3].startswith("option: ") and "--staged" in lines[3].split()
    assert lines[4] == "values: mini flash pro"
    assert lines[5] == "files"
