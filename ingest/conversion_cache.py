"""Converted documents on disk, keyed by content, so a re-pack does not convert them again.

One JSON file per conversion under `<home>/cache/conversions/<2 hex>/<key>.json`. The key is
the sha256 of the converter's version, the document kind, the document mode (where it changes
the output) and the sha256 of the bytes: an edited file, a new converter or a new pypdf all
miss. Failures (an encrypted PDF) are cached too, so they are not retried on every pack.

The cache only ever accelerates: an unreadable, corrupt or foreign entry is ignored and
rewritten, and a failed write is ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from ingest.errors import ConversionError
from ingest.manuals import converter_version, document_kind

_ENTRY_FORMAT = 1

ConvertFn = Callable[..., "str | None"]  # called as convert_fn(relpath, data, document_mode=...)


class ConversionCache:
    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def get_or_convert(
        self,
        relpath: str,
        data: bytes,
        document_mode: bool,
        convert_fn: ConvertFn,
        *,
        content_digest: str | None = None,
    ) -> str | None:
        """convert_fn's result for these bytes, from disk when converted before.

        `content_digest` (sha256 hex of `data`) saves hashing again when the caller has it.
        Raises the ConversionError convert_fn raised, also when it comes from the cache.
        """
        kind = document_kind(relpath, data, document_mode=document_mode)
        if kind is None:
            # Not a document: convert_fn answers None at once; nothing worth caching.
            return convert_fn(relpath, data, document_mode=document_mode)
        key = self.key(kind, content_digest or hashlib.sha256(data).hexdigest(), document_mode)
        path = self.directory / key[:2] / f"{key}.json"
        entry = _load(path, key)
        if entry is not None:
            if entry["ok"]:
                return entry["text"]
            raise ConversionError(entry["error"], entry["hint"])
        try:
            text = convert_fn(relpath, data, document_mode=document_mode)
        except ConversionError as exc:
            _store(path, {"format": _ENTRY_FORMAT, "key": key, "ok": False,
                          "error": str(exc), "hint": exc.hint})
            raise
        if text is not None:
            _store(path, {"format": _ENTRY_FORMAT, "key": key, "ok": True, "text": text,
                          "text_sha256": _text_digest(text)})
        return text

    @staticmethod
    def key(kind: str, content_digest: str, document_mode: bool) -> str:
        # A PDF converts the same in both modes; HTML and man pages only in document mode.
        mode = "any" if kind == "pdf" else ("documents" if document_mode else "files")
        material = f"{converter_version(kind)}\n{kind}\n{mode}\n{content_digest}"
        return hashlib.sha256(material.encode("utf-8")).hexdigest()


def _text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _load(path: Path, key: str) -> dict | None:
    """The entry if it is whole and ours, else None (a miss; the caller rewrites it)."""
    try:
        entry = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("format") != _ENTRY_FORMAT or entry.get("key") != key:
        return None
    if entry.get("ok") is True:
        text = entry.get("text")
        if isinstance(text, str) and entry.get("text_sha256") == _text_digest(text):
            return entry
        return None
    if entry.get("ok") is False and isinstance(entry.get("error"), str):
        hint = entry.get("hint")
        if hint is None or isinstance(hint, str):
            return entry
    return None


def _store(path: Path, entry: dict) -> None:
    """Write through a temporary file and os.replace, so no reader ever sees half an entry."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(entry, handle, ensure_ascii=False, separators=(",", ":"))
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
    except (OSError, ValueError):
        pass  # a read-only or full disk (or an unwritable text) costs speed, never the pack
