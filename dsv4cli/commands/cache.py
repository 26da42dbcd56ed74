"""`dsv4 cache ls|stats|verify|prune|clear`: the prefix KV cache on disk.

Listings go to stdout (tab-separated in a pipe, --json for tools); notes to stderr.
No torch: engine.prefix_cache reads segment headers by itself.
"""

from __future__ import annotations

import json
import shutil
import time

import typer

from dsv4cli import render
from dsv4cli.console import stdout_is_terminal
from dsv4cli.errors import EXIT_USAGE, CliError


def _size(text: str | None, option: str) -> int | None:
    from engine.prefix_cache import parse_size

    if text is None:
        return None
    try:
        return parse_size(text)
    except ValueError as exc:
        raise CliError(f"{option}: {exc}", "see 'dsv4 cache --help'", exit_code=EXIT_USAGE) from None


def _file_size(path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _age(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f}{unit} ago"
    return "just now"


def register(app: typer.Typer) -> None:
    cache_app = typer.Typer(
        help="Inspect and trim the prefix KV cache (prompts already read, kept on disk).",
        no_args_is_help=True,
        rich_markup_mode=None,
    )

    @cache_app.command("ls")
    def ls(json_output: bool = typer.Option(False, "--json", help="Print a JSON array.")) -> None:
        """List cached segments: model, token range, size on disk, last use."""
        from engine import prefix_cache

        segments = sorted(prefix_cache.list_segments(), key=lambda s: (s.model, s.fingerprint, s.start))
        if json_output:
            rows = [
                {"model": s.model, "fingerprint": s.fingerprint, "start": s.start, "end": s.end,
                 "disk_bytes": s.disk_bytes, "last_used": s.last_used, "path": str(s.path)}
                for s in segments
            ]
            print(json.dumps(rows, indent=2), flush=True)
            return
        if not segments:
            render.note(f"the prefix cache is empty ({prefix_cache.root_dir()})")
            return
        now = time.time()
        if stdout_is_terminal():
            for s in segments:
                span = f"{s.start:,}-{s.end:,}" if s.start >= 0 else "damaged"
                print(f"{s.model:<12} {s.fingerprint}  tokens {span:<16} {render.human_bytes(s.disk_bytes):>9}  {_age(now - s.last_used)}", flush=True)
        else:
            print("".join(f"{s.model}\t{s.fingerprint}\t{s.start}\t{s.end}\t{s.disk_bytes}\t{int(s.last_used)}\t{s.path}\n" for s in segments), end="", flush=True)

    @cache_app.command("stats")
    def stats(json_output: bool = typer.Option(False, "--json", help="Print a JSON object.")) -> None:
        """Totals: segments, tokens, real disk usage against the cap, free disk."""
        from engine import prefix_cache

        root = prefix_cache.root_dir()
        segments = prefix_cache.list_segments(root)
        probe = root if root.exists() else root.parent
        while not probe.exists():
            probe = probe.parent
        per_model: dict[str, dict[str, int]] = {}
        for s in segments:
            entry = per_model.setdefault(s.model, {"segments": 0, "tokens": 0, "disk_bytes": 0})
            entry["segments"] += 1
            entry["tokens"] += max(0, s.end - s.start)
            entry["disk_bytes"] += s.disk_bytes
        from engine import paths

        weight_files = paths.weights_cache_files()
        payload = {
            "path": str(root),
            "segments": len(segments),
            "tokens": sum(e["tokens"] for e in per_model.values()),
            "disk_bytes": prefix_cache.total_usage(root),
            "cap_bytes": prefix_cache.resolve_cap(None, root),
            "disk_free_bytes": shutil.disk_usage(probe).free,
            "models": per_model,
            "weights": {
                "path": str(paths.weights_cache_dir()),
                "files": len(weight_files),
                "disk_bytes": sum(_file_size(f) for f in weight_files),
            },
        }
        if json_output:
            print(json.dumps(payload, indent=2), flush=True)
            return
        lines = [
            f"path      {payload['path']}",
            f"segments  {payload['segments']:,} ({payload['tokens']:,} tokens)",
            f"on disk   {render.human_bytes(payload['disk_bytes'])} of a {render.human_bytes(payload['cap_bytes'])} cap"
            f" ({render.human_bytes(payload['disk_free_bytes'])} free on the disk)",
        ]
        lines += [
            f"  {model}: {e['segments']:,} segment(s), {e['tokens']:,} tokens, {render.human_bytes(e['disk_bytes'])}"
            for model, e in sorted(per_model.items())
        ]
        weights = payload["weights"]
        lines.append(
            f"weights   {weights['files']:,} prepared file(s), {render.human_bytes(weights['disk_bytes'])}"
            f" in {weights['path']} (rebuilt at the next load; 'dsv4 cache clear --weights')"
        )
        print("\n".join(lines), flush=True)

    @cache_app.command("verify")
    def verify(
        keep: bool = typer.Option(False, "--keep", help="Report damaged segments without removing them."),
    ) -> None:
        """Read every segment and check its checksum; damaged ones are removed (exit 1 if any)."""
        from engine import prefix_cache

        good, bad = prefix_cache.verify(remove=not keep)
        for line in bad:
            render.note(f"damaged: {line}" + ("" if keep else " (removed)"))
        print(f"{good} segment(s) ok, {len(bad)} damaged", flush=True)
        if bad:
            raise typer.Exit(1)

    @cache_app.command("prune")
    def prune(
        older_than: str = typer.Option(None, "--older-than", metavar="AGE", help="Remove segments unused for AGE (e.g. 30d, 12h)."),
        cap: str = typer.Option(None, "--cap", metavar="SIZE", help="Evict least recently used segments down to SIZE (default: the cap in force)."),
    ) -> None:
        """Remove old segments, then evict least recently used ones down to the cap."""
        from engine import prefix_cache

        age = None
        if older_than is not None:
            try:
                age = prefix_cache.parse_age(older_than)
            except ValueError as exc:
                raise CliError(f"--older-than: {exc}", "see 'dsv4 cache prune --help'", exit_code=EXIT_USAGE) from None
        before = prefix_cache.total_usage()
        removed = prefix_cache.prune(older_than_s=age, cap_bytes=_size(cap, "--cap"))
        freed = max(0, before - prefix_cache.total_usage())
        print(f"removed {len(removed)} segment(s), freed {render.human_bytes(freed)}", flush=True)

    @cache_app.command("clear")
    def clear(
        weights: bool = typer.Option(
            False, "--weights", help="Also remove the prepared weights (converted model files; the next load rebuilds them)."
        ),
    ) -> None:
        """Remove every cached segment (and with --weights the prepared weights)."""
        from engine import paths, prefix_cache

        before = prefix_cache.total_usage()
        count = prefix_cache.clear()
        message = f"removed {count} segment(s), freed {render.human_bytes(before)}"
        if weights:
            removed, freed = 0, 0
            for path in paths.weights_cache_files():
                size = _file_size(path)
                try:
                    path.unlink()
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    render.note(f"could not remove {path}: {exc.strerror}")
                    continue
                removed, freed = removed + 1, freed + size
            message += f"; removed {removed} prepared weight file(s), freed {render.human_bytes(freed)}"
        print(message, flush=True)

    app.add_typer(cache_app, name="cache")
