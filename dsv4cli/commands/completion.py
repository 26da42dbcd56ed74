"""`dsv4 completion bash|zsh|fish`: print the shell's completion script (see README)."""

from __future__ import annotations

import typer

from dsv4cli.errors import EXIT_USAGE, CliError


def register(app: typer.Typer) -> None:
    @app.command("completion")
    def completion(shell: str = typer.Argument(..., metavar="SHELL", help="bash, zsh or fish.")) -> None:
        """Print the completion script for a shell (bash, zsh or fish)."""
        from dsv4cli import completion as scripts

        if shell not in scripts.SHELLS:
            raise CliError(f"unknown shell {shell!r}", f"choose one of {', '.join(scripts.SHELLS)}", exit_code=EXIT_USAGE)
        # The whole command tree, whichever commands `app` was built with.
        print(scripts.script(shell), end="", flush=True)
