"""`dsv4 pack`: being built (issue 2)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("pack")
    def pack() -> None:
        """Pack a repository or documents into one prompt."""
        raise typer.Exit(1)
