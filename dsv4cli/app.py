"""The root `dsv4` command: registers the subcommands and owns error handling.

Nothing here imports torch; each command imports the engine inside its body.
"""

from __future__ import annotations

import sys

import typer

from dsv4cli import errors
from dsv4cli.commands import ask as ask_command
from dsv4cli.commands import cache as cache_command
from dsv4cli.commands import completion as completion_command
from dsv4cli.commands import config as config_command
from dsv4cli.commands import hook as hook_command
from dsv4cli.commands import logs as logs_command
from dsv4cli.commands import models as models_command
from dsv4cli.commands import pack as pack_command
from dsv4cli.commands import review as review_command

app = typer.Typer(
    name="dsv4",
    help="Pack a repository or a stack of manuals into one prompt and ask a model about it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)



def _show_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"dsv4 {version('dsv4')}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """Pack a repository or a stack of manuals into one prompt and ask a model about it."""


pack_command.register(app)
ask_command.register(app)
models_command.register(app)
cache_command.register(app)
config_command.register(app)
logs_command.register(app)
review_command.register(app)
hook_command.register(app)
completion_command.register(app)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the process exit code."""
    from typer._click import exceptions as click_exceptions

    try:
        result = app(args=argv, prog_name="dsv4", standalone_mode=False)
        code = result if isinstance(result, int) else errors.EXIT_OK
    except click_exceptions.UsageError as exc:
        if errors.debug_enabled():
            raise
        command = exc.ctx.command_path if exc.ctx is not None else "dsv4"
        print(errors.format_error(exc.format_message(), f"see '{command} --help'"), file=sys.stderr)
        code = errors.EXIT_USAGE
    except click_exceptions.ClickException as exc:
        if errors.debug_enabled():
            raise
        print(errors.format_error(exc.format_message()), file=sys.stderr)
        code = exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        print("", file=sys.stderr)
        code = errors.EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`dsv4 pack | head`): not an error worth a message.
        sys.stdout = None  # type: ignore[assignment]  # keep the interpreter from flushing again
        code = errors.EXIT_OK
    except Exception as exc:  # noqa: BLE001 - every library error becomes one line
        if errors.debug_enabled():
            raise
        code = errors.report(exc)
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
