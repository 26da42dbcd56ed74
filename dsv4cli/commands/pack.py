"""`dsv4 pack`: a repository or documents as one prompt on stdout, a summary on stderr.

Never imports torch: the tokenizer comes from engine.store/engine.tokenizer (tiktoken only).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

import typer

from dsv4cli.errors import EXIT_USAGE, CliError
from dsv4cli.plain_params import PlainCommand

DEFAULT_MODEL = "mini"
TOP_FILES = 10
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def register(app: typer.Typer) -> None:
    @app.command("pack", cls=PlainCommand)  # no pydantic for plain values
    def pack(
        sources: list[str] = typer.Argument(None, metavar="SOURCE",
                                            help="Directories, files or '-' (stdin). Default: '.'"),
        output: Path = typer.Option(None, "--output", "-o", metavar="FILE", help="Write the pack to FILE instead of stdout."),
        fmt: str = typer.Option("xml", "--format", metavar="xml|markdown|plain", help="Layout of the pack."),
        budget: int = typer.Option(None, "--budget", min=1, metavar="N",
                                   help="Fit into N tokens: degrade files (full, outline, path only)."),
        model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", envvar="DSV4_MODEL", metavar="MODEL",
                                  help="Whose tokenizer counts tokens: alias (mini, ...) or a path."),
        list_only: bool = typer.Option(False, "--list", help="Print the selected paths in pack order, nothing else."),
        summary_json: Path = typer.Option(None, "--summary-json", metavar="FILE", help="Write token counts per file as JSON to FILE."),
        files_from: str = typer.Option(None, "--files-from", metavar="FILE",
                                       help="Pack the paths listed in FILE ('-' = stdin; newline- or NUL-separated)."),
        include: list[str] = typer.Option(None, "--include", metavar="GLOB", help="Only paths matching GLOB (gitignore syntax)."),
        exclude: list[str] = typer.Option(None, "--exclude", metavar="GLOB", help="Leave out paths matching GLOB."),
        max_file_size: str = typer.Option("1M", "--max-file-size", metavar="SIZE",
                                          help="List larger files without their body (e.g. 512K, 2M)."),
        no_default_filters: bool = typer.Option(False, "--no-default-filters",
                                                help="Inline lock files, minified and generated files too."),
        recurse_submodules: bool = typer.Option(False, "--recurse-submodules", help="Pack the files of submodules."),
        no_git: bool = typer.Option(False, "--no-git", help="Ignore git: walk the directory with .gitignore rules."),
    ) -> None:
        """Pack a repository or documents into one prompt (stdout); a summary goes to stderr."""
        run_pack(
            sources=list(sources or []), output=output, fmt=fmt, budget=budget, model=model, list_only=list_only,
            summary_json=summary_json, files_from=files_from, include=list(include or []),
            exclude=list(exclude or []), max_file_size=max_file_size, no_default_filters=no_default_filters,
            recurse_submodules=recurse_submodules, no_git=no_git,
        )


def parse_size(text: str) -> int:
    match = _SIZE.match(text)
    if not match:
        raise CliError(f"--max-file-size: cannot read {text!r} as a size", "use bytes or a suffix: 512K, 2M, 1G",
                       exit_code=EXIT_USAGE)
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def run_pack(*, sources: list[str], output: Path | None, fmt: str, budget: int | None, model: str, list_only: bool,
             summary_json: Path | None, files_from: str | None, include: list[str], exclude: list[str],
             max_file_size: str, no_default_filters: bool, recurse_submodules: bool, no_git: bool) -> None:
    import ingest
    from engine import paths
    from ingest.render import FORMATS
    from ingest.types import ReadOptions, SelectOptions

    if fmt not in FORMATS:
        raise CliError(f"unknown --format {fmt!r}", f"choose one of {', '.join(FORMATS)}", exit_code=EXIT_USAGE)
    if no_git and recurse_submodules:
        raise CliError("--recurse-submodules needs git, and --no-git turns it off", exit_code=EXIT_USAGE)
    if sources.count("-") > 1:
        raise CliError("'-' (stdin) can be given only once", exit_code=EXIT_USAGE)
    if "-" in sources and files_from == "-":
        raise CliError("stdin cannot be both a SOURCE ('-') and --files-from -", exit_code=EXIT_USAGE)
    # before the tokenizer, which may have to be fetched: a typo should fail at once
    for source in sources:
        if source != "-" and not os.path.lexists(source):
            from ingest.errors import SourceNotFound

            raise SourceNotFound(f"no such file or directory: {source}", "check the path; use '-' to read from stdin")

    if output is not None:
        exclude = exclude + _self_exclusions(output, sources or ["."])
    options = ingest.PackOptions(
        format=fmt,
        budget=budget,
        select=SelectOptions(includes=tuple(include), excludes=tuple(exclude), recurse_submodules=recurse_submodules,
                             use_git=not no_git),
        read=ReadOptions(max_file_bytes=parse_size(max_file_size), default_filters=not no_default_filters),
        files_from=_read_files_from(files_from) if files_from is not None else None,
    )
    cache_dir = paths.cache_dir()
    if list_only:
        _write_payload("".join(p + "\n" for p in ingest.list_paths(sources, options=options, cache_dir=cache_dir)),
                       output)
        return

    tokenizer = _load_tokenizer(model, cache_dir)
    stdin_text = _read_stdin() if "-" in sources else None
    result = ingest.pack(sources, options=options, tokenizer=tokenizer, cache_dir=cache_dir, stdin_text=stdin_text)
    _write_result(result, output)
    if summary_json is not None:
        _write_summary_json(summary_json, result)
    _print_summary(result, budget)


def _self_exclusions(output: Path, sources: list[str]) -> list[str]:
    """-o inside a SOURCE would pack the previous pack: exclude it (an anchored, escaped pattern)."""
    target = output.resolve()
    patterns = []
    for source in sources:
        if source == "-" or not os.path.isdir(source):
            continue
        try:
            relative = target.relative_to(Path(source).resolve()).as_posix()
        except ValueError:
            continue
        patterns.append("/" + re.sub(r"([\\*?\[\]!#])", r"\\\1", relative))
    return patterns


def _load_tokenizer(model: str, cache_dir: Path):
    """The model's tokenizer; lazy when its name and digest are known from an earlier pack.

    An unchanged repository is answered from the pack cache, whose key needs only the digest:
    loading the tokenizer itself (the rank table, a tiktoken Encoding) would be wasted then.
    """
    from engine import store
    from engine.errors import EngineError
    from ingest.disk_cache import load_json, save_json

    def load():
        from dsv4cli import render      # rich's progress bars: only when a tokenizer is loaded

        with render.transfer_progress() as progress:
            return store.load_tokenizer(model, fetch=True, progress=progress, note=render.note)

    try:
        ref = store.resolve_model(model, fetch=False)
        info = ref.path.stat()
    except (EngineError, OSError):
        return load()          # not installed yet: fetching says how, or fails with a hint
    if ref.format != "gguf":
        return load()

    def load_installed():
        # the file is there: nothing to fetch, so no progress display to import (Rich, ~50 ms)
        from engine.tokenizer import Tokenizer

        return Tokenizer.from_gguf(ref.path)

    known_file = cache_dir / "tokens" / "models.json"
    key = f"{ref.path.resolve()}|{info.st_size}|{info.st_mtime_ns}"
    known = load_json(known_file)
    known = known if isinstance(known, dict) else {}
    entry = known.get(key)
    if isinstance(entry, list) and len(entry) == 2:
        return _LazyTokenizer(entry[0], entry[1], load_installed)
    tokenizer = load_installed()
    known[key] = [tokenizer.name, tokenizer.digest]
    save_json(known_file, known)
    return tokenizer


class _LazyTokenizer:
    """Name and digest now; the tokenizer itself at the first count."""

    def __init__(self, name: str, digest: str, load):
        import threading

        self.name, self.digest = name, digest
        self._load = load
        self._tokenizer = None
        self._lock = threading.Lock()      # ingest counts on several threads: load once

    def _real(self):
        if self._tokenizer is None:
            with self._lock:
                if self._tokenizer is None:
                    self._tokenizer = self._load()
        return self._tokenizer

    def count_batch(self, texts):
        return self._real().count_batch(texts)

    def count(self, text: str) -> int:
        return self._real().count(text)


def _read_stdin() -> str:
    try:
        return sys.stdin.read() if sys.stdin is not None else ""
    except UnicodeDecodeError as exc:
        raise CliError(f"stdin is not valid text ({exc.reason})", "pipe UTF-8 text, or pass the file as a SOURCE")


def _read_files_from(name: str) -> tuple[str, ...]:
    try:
        if name == "-":
            data = sys.stdin.buffer.read() if sys.stdin is not None else b""
        else:
            data = Path(name).read_bytes()
    except OSError as exc:
        raise CliError(f"--files-from: cannot read {name}: {exc.strerror or exc}", "check the path") from None
    text = data.decode("utf-8", "surrogateescape")
    separator = "\0" if "\0" in text else "\n"
    return tuple(line.rstrip("\r") if separator == "\n" else line for line in text.split(separator) if line.strip())


def _write_payload(text: str, output: Path | None) -> None:
    data = text.encode("utf-8", "surrogateescape")
    if output is not None:
        try:
            output.write_bytes(data)
        except OSError as exc:
            raise CliError(f"cannot write {output}: {exc.strerror or exc}", "check the output path") from None
        return
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _write_result(result, output: Path | None) -> None:
    if output is None:
        sys.stdout.flush()
        result.write_output(sys.stdout.buffer)
        return
    try:
        with open(output, "wb") as sink:
            result.write_output(sink)
    except OSError as exc:
        raise CliError(f"cannot write {output}: {exc.strerror or exc}", "check the output path") from None


def _write_summary_json(path: Path, result) -> None:
    summary = {
        "total_tokens": result.total_tokens,
        "tokenizer": result.tokenizer,
        "files": [{"path": f.path, "status": f.status, "reason": f.reason, "tokens": f.tokens} for f in result.files],
    }
    try:
        path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}", "check the --summary-json path") from None


# Text that Rich would not print as it is: markup brackets and escapes, `:emoji:` codes.
_RICH_SENSITIVE = re.compile(r"[\[\]\\]|:\S*?:")
_RICH_TERMINAL_VARIABLES = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")


def _print_summary(result, budget: int | None) -> None:
    """The summary on stderr. Where Rich would only strip the bold markup (stderr is no
    terminal, nothing forces one, no warning, no text it would change), the same lines are
    written without importing it: a fifth of a warm re-pack's own time."""
    plain = None if result.warnings else _plain_summary(result, budget)
    if plain is not None:
        sys.stderr.write(plain)
        sys.stderr.flush()
        return
    _rich_summary(result, budget)


def _summary_lines(result, budget: int | None) -> list[str]:
    """The lines `_rich_summary` prints, as they read once Rich dropped the markup."""
    files = result.files
    counts = Counter(f.status for f in files)
    lines = []
    inlined = sorted((f for f in files if f.status != "listed"), key=lambda f: (-f.tokens, f.path))[:TOP_FILES]
    if inlined:
        lines.append("Top files by tokens")
        width = len(f"{inlined[0].tokens:,}")
        for f in inlined:
            mark = " (outline)" if f.status == "reduced" else ""
            lines.append(f"  {f.tokens:>{width},}  {f.path}{mark}")
    listed = [f for f in files if f.status == "listed"]
    if listed:
        lines.append(f"Listed without their body ({len(listed)})")
        by_reason: dict[str, list[str]] = {}
        for f in listed:
            by_reason.setdefault(f.reason or "unknown", []).append(f.path)
        for reason, paths in sorted(by_reason.items(), key=lambda item: (-len(item[1]), item[0])):
            shown = ", ".join(paths[:3]) + (f", ... (+{len(paths) - 3})" if len(paths) > 3 else "")
            lines.append(f"  {reason}: {shown}")
    if result.reduced:
        outlined = sum(1 for r in result.reduced if r.after == "reduced")
        dropped = sum(1 for r in result.reduced if r.after == "listed")
        lines.append(f"Fitted to the budget of {budget:,} tokens: {outlined} file(s) reduced to an outline, "
                     f"{dropped} listed by path only")
    lines.append(f"{result.total_tokens:,} tokens ({result.tokenizer or '?'}), {len(files)} files: "
                 f"{counts['full']} full, {counts['reduced']} reduced, {counts['listed']} listed")
    return lines


def _plain_summary(result, budget: int | None) -> str | None:
    if any(os.environ.get(name) is not None for name in _RICH_TERMINAL_VARIABLES):
        return None
    try:
        if sys.stderr is None or sys.stderr.isatty():
            return None
    except (AttributeError, ValueError):
        return None
    lines = _summary_lines(result, budget)
    if not all(line.isprintable() and not _RICH_SENSITIVE.search(line) for line in lines):
        return None
    return "".join(line + "\n" for line in lines)


def _rich_summary(result, budget: int | None) -> None:
    from rich.markup import escape

    from dsv4cli import console

    err = console.err()
    for warning in result.warnings:
        console.warn(escape(warning))
    files = result.files
    counts = Counter(f.status for f in files)
    inlined = sorted((f for f in files if f.status != "listed"), key=lambda f: (-f.tokens, f.path))[:TOP_FILES]
    if inlined:
        err.print("[bold]Top files by tokens[/bold]", markup=True)
        width = len(f"{inlined[0].tokens:,}")
        for f in inlined:
            mark = " (outline)" if f.status == "reduced" else ""
            err.print(f"  {f.tokens:>{width},}  {escape(f.path)}{mark}", markup=True, highlight=False)
    listed = [f for f in files if f.status == "listed"]
    if listed:
        err.print(f"[bold]Listed without their body[/bold] ({len(listed)})", markup=True)
        by_reason: dict[str, list[str]] = {}
        for f in listed:
            by_reason.setdefault(f.reason or "unknown", []).append(f.path)
        for reason, paths in sorted(by_reason.items(), key=lambda item: (-len(item[1]), item[0])):
            shown = ", ".join(paths[:3]) + (f", ... (+{len(paths) - 3})" if len(paths) > 3 else "")
            err.print(f"  {escape(reason)}: {escape(shown)}", markup=True, highlight=False)
    if result.reduced:
        outlined = sum(1 for r in result.reduced if r.after == "reduced")
        dropped = sum(1 for r in result.reduced if r.after == "listed")
        err.print(f"Fitted to the budget of {budget:,} tokens: {outlined} file(s) reduced to an outline, "
                  f"{dropped} listed by path only", highlight=False)
    err.print(
        f"[bold]{result.total_tokens:,} tokens[/bold] ({escape(result.tokenizer or '?')}), {len(files)} files: "
        f"{counts['full']} full, {counts['reduced']} reduced, {counts['listed']} listed",
        markup=True, highlight=False,
    )
