"""`dsv4 pull [MODEL]` fetches a model into the home directory; `dsv4 models` lists them."""

from __future__ import annotations

import json

import typer

from dsv4cli import render
from dsv4cli.console import stdout_is_terminal
from dsv4cli.errors import EXIT_USAGE, CliError

DEFAULT_MODEL = "mini"


def register(app: typer.Typer) -> None:
    @app.command("pull")
    def pull(
        model: str = typer.Argument(DEFAULT_MODEL, help="Model alias: mini, flash or pro."),
    ) -> None:
        """Fetch a model into the home directory, verified (prints its path)."""
        from engine import store

        if model not in store.MODELS:
            raise CliError(
                f"unknown model {model!r}",
                f"pull takes an alias ({', '.join(store.MODELS)}); a file path needs no pull",
                exit_code=EXIT_USAGE,
            )
        with render.transfer_progress() as progress:
            ref = store.fetch_model(model, progress, note=render.note)
        # A single GGUF is checked against its known SHA-256; a hub snapshot is not.
        checked = ", sha256 verified" if ref.format == "gguf" else ""
        render.note(f"{model} is ready ({render.human_bytes(ref.size)}{checked})")
        print(ref.path, flush=True)

    @app.command("models")
    def models(
        json_output: bool = typer.Option(False, "--json", help="Print a JSON array."),
        verify: bool = typer.Option(False, "--verify", help="Re-hash every file (reads them all)."),
    ) -> None:
        """List the installed models with their sizes and paths."""
        from engine import store

        rows = [
            {
                "alias": model.alias,
                "format": model.format,
                "size": model.size,
                "verified": model.verified,
                "source": model.source,
                "path": str(model.path),
            }
            for model in store.installed_models(verify=verify)
        ]
        if json_output:
            print(json.dumps(rows, indent=2), flush=True)
        elif not rows:
            render.note("no models installed yet; run `dsv4 pull mini` (or just `dsv4 ask`, which fetches it)")
        elif stdout_is_terminal():
            render.models_table(rows)
        else:
            print(render.models_lines(rows), end="", flush=True)
