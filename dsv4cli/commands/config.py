"""`dsv4 config path|show|set`: where the settings live and what is in effect."""

from __future__ import annotations

import json

import typer

from dsv4cli import config


def register(app: typer.Typer) -> None:
    config_app = typer.Typer(
        help="Show where settings live and which values are in effect.",
        no_args_is_help=True,
        rich_markup_mode=None,
    )

    @config_app.command("path")
    def path(
        project: bool = typer.Option(False, "--project", help="The project file (.dsv4.toml at the repository root)."),
    ) -> None:
        """Print the path of the user settings file (it need not exist yet)."""
        print(config.project_file() if project else config.user_file(), flush=True)

    @config_app.command("show")
    def show(json_output: bool = typer.Option(False, "--json", help="Print a JSON object: key -> value, source.")) -> None:
        """Print every setting in effect and where its value came from."""
        settings = config.load_settings()
        if json_output:
            payload = {
                key: {"value": list(value) if isinstance(value, tuple) else value, "source": settings.source(key)}
                for key, value in settings.items()
            }
            print(json.dumps(payload, indent=2), flush=True)
            return
        width = max(len(key) for key in settings)
        lines = [f"{key:<{width}} = {config.format_value(value)}  # {settings.source(key)}"
                 for key, value in settings.items()]
        print("\n".join(lines), flush=True)

    @config_app.command("set")
    def set_value(
        key: str = typer.Argument(..., help="A setting, e.g. model or review.fail_on ('dsv4 config show' lists them)."),
        value: str = typer.Argument(..., help="Its value: text, a number, or a TOML list such as '[\"build/\"]'."),
    ) -> None:
        """Set a value in the user settings file (other lines are kept)."""
        written = config.set_user_value(key, value)
        from dsv4cli import render

        render.note(f"{key} set in {written}")

    app.add_typer(config_app, name="config")
