"""Settings: built-in defaults, the user file, the project file and DSV4_* variables.

Precedence, highest first: a command-line option > `DSV4_<KEY>` in the environment >
`.dsv4.toml` at the repository's root (the project file) > `<DSV4_HOME>/config/config.toml`
(the user file) > the built-in default. Command options get the configured values through
click's `default_map` (see `install_defaults`), so click itself applies "the command line
wins" and every command sees the same rule without reading files itself.

A key is flat (`model`) or belongs to a table (`[review] fail_on` = `review.fail_on`);
its variable is the key in capitals with dots as underscores (`DSV4_REVIEW_FAIL_ON`).
Invalid TOML or a value of the wrong type is an error naming the file; an unknown key is
only a warning, so an older dsv4 still runs with a newer file.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from dsv4cli.errors import EXIT_USAGE, CliError
from engine import paths

USER_FILE_NAME = "config.toml"
PROJECT_FILE_NAME = ".dsv4.toml"
ENV_PREFIX = "DSV4_"
BUILTIN = "built-in"
SEVERITIES = ("info", "warning", "error")
COLORS = ("auto", "always", "never")


def _positive_int(value: Any) -> int:
    number = _int(value)
    if number < 1:
        raise ValueError("must be at least 1")
    return number


def _int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("must be a whole number")
    if isinstance(value, str):
        value = value.strip().replace("_", "")
    number = int(value)
    if isinstance(value, float) and number != value:
        raise ValueError("must be a whole number")
    return number


def _non_negative_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("must be a number")
    number = float(value)
    if number < 0:
        raise ValueError("must not be negative")
    return number


def _positive_float(value: Any) -> float:
    number = _non_negative_float(value)
    if number == 0:
        raise ValueError("must be more than 0")
    return number


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty string")
    return value.strip()


def _choice(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        text = _text(value).lower()
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return text

    return check


def _backend(value: Any) -> str:
    # A URL sends ask, chat and review to a server; `local` (and the device words) keeps them
    # on the embedded engine: the words of dsv4cli/backend.py LOCAL_WORDS, kept here as well
    # so that reading settings imports no command code.
    text = _text(value)
    return text if text.startswith(("http://", "https://")) else _choice("auto", "local", "cpu", "cuda")(text)


def _globs(value: Any) -> tuple[str, ...]:
    # In a variable: comma-separated (DSV4_EXCLUDE="build/,*.min.js").
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if not isinstance(value, list) or not all(isinstance(item, str) and item.strip() for item in value):
        raise ValueError("must be a list of glob strings")
    return tuple(item.strip() for item in value)


def _size(value: Any) -> str:
    """A size as text ("20G", "512M", bytes): validated here, parsed by the prefix cache."""
    from engine.prefix_cache import parse_size

    text = str(value).strip() if not isinstance(value, bool) else ""
    try:
        parse_size(text)
    except (ValueError, TypeError):
        raise ValueError("must be a size such as 20G or 512M") from None
    return text


@dataclass(frozen=True)
class Setting:
    key: str
    parse: Callable[[Any], Any]
    default: Any
    help: str

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper().replace(".", "_")


# The commands' own defaults (tests check they agree); not imported from the commands, so
# that reading settings does not load every command module.
DEFAULT_MODEL = "mini"
DEFAULT_MAX_TOKENS = 512


def _builtin_settings() -> tuple[Setting, ...]:
    return (
        Setting("model", _text, DEFAULT_MODEL, "model alias (mini, flash, pro) or path"),
        Setting("max_tokens", _positive_int, DEFAULT_MAX_TOKENS, "longest answer, in tokens"),
        Setting("temperature", _non_negative_float, 0.0, "sampling temperature (0 = greedy)"),
        Setting("budget", _positive_int, None, "dsv4 pack: fit the pack into this many tokens"),
        Setting("color", _choice(*COLORS), "auto", "colour on stderr and terminals: auto, always, never"),
        Setting("backend", _backend, "auto", "where answers come from: an OpenAI-compatible server URL, or local (also auto, cpu, cuda)"),
        Setting("api_key", _text, None, "API key for a --backend server (or DSV4_API_KEY / OPENAI_API_KEY)"),
        Setting("cache_cap", _size, None, "prefix cache cap on disk (20G, 512M); unset: min(20 GB, 10% of the disk)"),
        Setting("exclude", _globs, (), "extra paths to leave out of packs (gitignore globs)"),
        Setting("review.fail_on", _choice(*SEVERITIES), None, "dsv4 review: exit 1 at or above this severity"),
        Setting("review.timeout", _positive_float, None, "dsv4 review: time budget in seconds"),
        Setting("review.max_tokens", _positive_int, 512, "dsv4 review: longest review, in tokens"),
    )


# Which configured key gives the default of which command option (click parameter name).
COMMAND_DEFAULTS: dict[str, dict[str, str]] = {
    "ask": {"model": "model", "max_tokens": "max_tokens", "temperature": "temperature", "cache_cap": "cache_cap",
            "backend": "backend"},
    # chat's --model stays unset by default: a resumed conversation keeps its own model
    "chat": {"max_tokens": "max_tokens", "temperature": "temperature", "backend": "backend"},
    "pack": {"model": "model", "budget": "budget", "exclude": "exclude"},
    "review": {"model": "model", "fail_on": "review.fail_on", "timeout": "review.timeout",
               "max_tokens": "review.max_tokens", "backend": "backend"},
}


@dataclass(frozen=True)
class Value:
    value: Any
    source: str         # "built-in", a file path, or the variable's name


class Settings(Mapping[str, Any]):
    """The effective settings: key -> value, and where each value came from."""

    def __init__(self, values: dict[str, Value], files: tuple[Path, ...]):
        self._values = values
        self.files = files  # the files that were read, lowest precedence first

    def __getitem__(self, key: str) -> Any:
        return self._values[key].value

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def source(self, key: str) -> str:
        return self._values[key].source

    def is_configured(self, key: str) -> bool:
        return self._values[key].source != BUILTIN


def settings_catalogue() -> dict[str, Setting]:
    return {setting.key: setting for setting in _builtin_settings()}


def user_file() -> Path:
    return paths.config_dir() / USER_FILE_NAME


def project_root(start: Path | None = None) -> Path:
    """The repository's root above `start` (where `.git` is), else `start` itself."""
    start = (start or Path.cwd()).resolve()
    for directory in (start, *start.parents):
        if (directory / ".git").exists():
            return directory
    return start


def project_file(start: Path | None = None) -> Path:
    return project_root(start) / PROJECT_FILE_NAME


def load_settings(
    start: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    warn: Callable[[str], None] | None = None,
) -> Settings:
    """Read the user file, the project file (for the repository around `start`, default the
    current directory) and the environment; an invalid file or variable raises CliError."""
    environ = os.environ if environ is None else environ
    warn = warn or _warn
    catalogue = settings_catalogue()
    values = {key: Value(setting.default, BUILTIN) for key, setting in catalogue.items()}
    files: list[Path] = []
    for path in (user_file(), project_file(start)):
        raw = _read_toml(path)
        if raw is None:
            continue
        files.append(path)
        for key, value in _flatten(raw, path, warn).items():
            setting = catalogue.get(key)
            if setting is None:
                warn(f"{path}: unknown setting {key!r} ignored (known: {', '.join(catalogue)})")
                continue
            values[key] = Value(_parse(setting, value, str(path), "fix the value in the file"), str(path))
    for key, setting in catalogue.items():
        text = environ.get(setting.env, "")
        if text.strip():
            values[key] = Value(_parse(setting, text, setting.env, f"fix or unset {setting.env}"), setting.env)
    return Settings(values, tuple(files))


def _read_toml(path: Path) -> dict[str, Any] | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise CliError(f"{path} is a directory, not a settings file", "remove it or make it a TOML file") from None
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}", "check its permissions") from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise CliError(f"{path} is not UTF-8 text", "save the settings file as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise CliError(f"invalid TOML in {path}: {exc}", "fix the file, or remove it to use the defaults") from None


def _flatten(raw: dict[str, Any], path: Path, warn: Callable[[str], None]) -> dict[str, Any]:
    """One level of tables: `[review] fail_on` becomes `review.fail_on`."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            for inner, inner_value in value.items():
                if isinstance(inner_value, dict):
                    warn(f"{path}: nested table [{key}.{inner}] ignored")
                    continue
                flat[f"{key}.{inner}"] = inner_value
        else:
            flat[key] = value
    return flat


def _parse(setting: Setting, value: Any, where: str, hint: str) -> Any:
    try:
        return setting.parse(value)
    except (ValueError, TypeError) as exc:
        reason = str(exc) if isinstance(exc, ValueError) and "must" in str(exc) else "has the wrong type"
        raise CliError(f"{where}: {setting.key} = {value!r} {reason}", hint) from None


def _warn(message: str) -> None:
    from dsv4cli.console import warn

    from rich.markup import escape

    warn(escape(message))


def format_value(value: Any) -> str:
    """A value as TOML would spell it (for `dsv4 config show`)."""
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(format_value(item) for item in value) + "]"
    return str(value)


# ---------------------------------------------------------------- wiring into the commands


# Commands that take no configured defaults and must work while a settings file is broken.
_SETTINGS_FREE = frozenset({"config", "completion"})


class _CommandDefaults(Mapping[str, Any]):
    """click's `default_map` for the root command, read when a subcommand is parsed.

    Lazy so that `dsv4 --help` reads no file, and fresh on every lookup because one
    process may run several commands (tests) in different directories and environments.
    Only configured values are given: an unconfigured option keeps its own default.
    """

    def __init__(self, app: Any):
        self._app = app

    def _is_command(self, name: str) -> bool:
        # The root context also looks up its own options here (`--version`): not commands.
        commands = {info.name or info.callback.__name__.replace("_", "-") for info in self._app.registered_commands}
        groups = {info.name for info in self._app.registered_groups}
        return name in commands | groups

    def get(self, command: str, default: Any = None) -> Any:
        if not self._is_command(command):
            return default
        if command in _SETTINGS_FREE:
            # `dsv4 config path` must work while a settings file is broken: colour only.
            with contextlib.suppress(CliError):
                apply_color(load_settings(warn=lambda message: None))
            return default
        warnings: list[str] = []
        settings = load_settings(warn=warnings.append)
        apply_color(settings)  # before the warnings, which are the first thing drawn
        for message in warnings:
            _warn(message)
        table = COMMAND_DEFAULTS.get(command, {})
        return {option: settings[key] for option, key in table.items() if settings.is_configured(key)}

    def __getitem__(self, command: str) -> Any:
        value = self.get(command)
        if value is None:
            raise KeyError(command)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(COMMAND_DEFAULTS)

    def __len__(self) -> int:
        return len(COMMAND_DEFAULTS)


def install_defaults(app: Any) -> None:
    """Give every command its configured defaults (called once, when the app is built)."""
    app.info.context_settings = {**(app.info.context_settings or {}), "default_map": _CommandDefaults(app)}


def apply_color(settings: Settings) -> None:
    """`color` works through the variables Rich reads, unless the user set those already."""
    if "NO_COLOR" in os.environ or "FORCE_COLOR" in os.environ or not settings.is_configured("color"):
        return
    if settings["color"] == "never":
        os.environ["NO_COLOR"] = "1"
    elif settings["color"] == "always":
        os.environ["FORCE_COLOR"] = "1"


# ---------------------------------------------------------------- writing the user file


def set_user_value(key: str, text: str) -> Path:
    """`dsv4 config set KEY VALUE`: validate, then rewrite that one line of the user file
    (other lines and comments stay as they are)."""
    catalogue = settings_catalogue()
    setting = catalogue.get(key)
    if setting is None:
        raise CliError(f"unknown setting {key!r}", f"known settings: {', '.join(catalogue)}", exit_code=EXIT_USAGE)
    value = _parse(setting, _from_text(text), "the value", "see 'dsv4 config show' for the current values")
    path = user_file()
    _read_toml(path)  # refuse to edit a file we cannot read back
    table, _, name = key.rpartition(".")
    line = f"{name} = {format_value(list(value) if isinstance(value, tuple) else value)}\n"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.exists() else []
    lines = _replace_or_add(lines, table, name, line)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".toml.tmp")
    temporary.write_text("".join(lines), encoding="utf-8")
    try:
        tomllib.loads(temporary.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:  # pragma: no cover - our own output
        temporary.unlink()
        raise CliError(f"could not update {path}: {exc}", "edit the file by hand") from None
    os.replace(temporary, path)
    return path


def _from_text(text: str) -> Any:
    """A command-line value: TOML syntax when it parses (`[\"a\", \"b\"]`, `0.7`), else the text."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def _replace_or_add(lines: list[str], table: str, name: str, line: str) -> list[str]:
    """Replace `name = ...` in `[table]` ("" = top level), else add it at the end of that table."""
    lines = [raw if raw.endswith("\n") else raw + "\n" for raw in lines]
    section, first_header, header_at, section_end = "", None, None, None
    for index, raw in enumerate(lines):
        stripped = raw.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            section = stripped.strip("[]").strip()
            first_header = index if first_header is None else first_header
            if section == table:
                header_at = section_end = index + 1
            continue
        if section != table:
            continue
        if "=" in stripped and stripped.split("=", 1)[0].strip() == name:
            return lines[:index] + [line] + lines[index + 1:]
        if stripped:
            section_end = index + 1
    if not table:
        at = first_header if first_header is not None else len(lines)
        return lines[:at] + [line] + lines[at:]
    if header_at is None:
        return lines + (["\n"] if lines and lines[-1].strip() else []) + [f"[{table}]\n", line]
    return lines[:section_end] + [line] + lines[section_end:]
