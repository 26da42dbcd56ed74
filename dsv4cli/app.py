"""The root `dsv4` command: registers the subcommands and owns error handling.

Nothing here imports torch; each command imports the engine inside its body.
"""

from __future__ import annotations

import sys

import typer

from dsv4cli import errors

# Subcommand -> the module in dsv4cli.commands that registers it. The order of _MODULES is
# the order `dsv4 --help` lists the commands in.
_MODULES = ("pack", "ask", "chat", "models", "cache", "config", "logs", "review", "hook", "serve", "completion")
_COMMAND_MODULES = {
    "pack": "pack", "ask": "ask", "chat": "chat", "pull": "models", "models": "models", "cache": "cache",
    "config": "config", "logs": "logs", "review": "review", "hook": "hook", "serve": "serve", "completion": "completion",
}
_COMPLETION_VARIABLE = "_DSV4_COMPLETE"


def _show_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"dsv4 {version('dsv4')}")
        raise typer.Exit(0)


def build_app(modules: tuple[str, ...] = _MODULES) -> typer.Typer:
    """The root command with the subcommands of `modules` registered."""
    import importlib

    from dsv4cli.plain_params import PlainGroup

    root = typer.Typer(
        cls=PlainGroup,
        name="dsv4",
        help="Pack a repository or a stack of manuals into one prompt and ask a model about it.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    @root.callback()
    def _root(
        version: bool = typer.Option(
            False, "--version", callback=_show_version, is_eager=True, help="Show the version and exit."
        ),
    ) -> None:
        """Pack a repository or a stack of manuals into one prompt and ask a model about it."""

    for module in modules:
        importlib.import_module(f"dsv4cli.commands.{module}").register(root)
    importlib.import_module("dsv4cli.config").install_defaults(root)  # settings as the commands' defaults
    return root


def _app_for(args: list[str]) -> typer.Typer:
    """Only the invoked command's module is imported (`ask` alone pulls in rich.markdown and
    more, a third of a warm `dsv4 pack`); help, completion and unknown commands get them all."""
    import os

    module = _COMMAND_MODULES.get(args[0]) if args else None
    if module is None or os.environ.get(_COMPLETION_VARIABLE):
        return __getattr__("app")
    return build_app((module,))


def __getattr__(name: str) -> typer.Typer:
    # `from dsv4cli.app import app`: the full command tree, built on first use
    if name == "app":
        full = build_app()
        globals()["app"] = full
        return full
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the process exit code."""
    from typer._click import exceptions as click_exceptions

    try:
        args = sys.argv[1:] if argv is None else list(argv)
        result = _app_for(args)(args=args, prog_name="dsv4", standalone_mode=False)
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
