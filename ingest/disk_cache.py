"""Small JSON files under the cache directory: loaded whole, written atomically.

A cache is only ever an accelerator: a missing, unreadable or corrupt file reads as empty, and a
failed write is ignored, so concurrent packs can at worst lose each other's additions.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def load_json(path: Path) -> Any | None:
    try:
        with open(path, "rb") as handle:
            return json.loads(handle.read())
    except (OSError, ValueError):
        return None


def save_json(path: Path, value: Any) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "wb") as handle:
                # dumps, not dump: only dumps uses the C encoder; ASCII escapes keep file names
                # that are not UTF-8 (lone surrogates) exact
                handle.write(json.dumps(value, separators=(",", ":"), ensure_ascii=True).encode("ascii"))
            os.replace(temporary, path)
        except BaseException:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise
    except OSError:
        pass


def prune_oldest(directory: Path, keep: int, pattern: str = "*.json") -> None:
    """Keep the `keep` most recently modified files matching `pattern` in `directory`."""
    try:
        entries = sorted(directory.glob(pattern), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    except OSError:
        return
    for stale in entries[keep:]:
        try:
            stale.unlink()
        except OSError:
            pass
