"""Whole-pack cache: re-packing an unchanged repository copies the previous output.

The key covers everything the output depends on: the options, the tokenizer's digest, the
selected paths in pack order, each file's stat fingerprint (type, size, mtime and ctime in
nanoseconds, inode; a symlink's target too), the .gitattributes marks, stdin's text, and the
ingest code itself (size and mtime of its modules). The file set itself always comes from a
fresh selection, so only *contents* are judged by stat, as git judges its index.

Racy files: a file changed within the same clock tick as a stat could look unchanged. As in
git, an entry is only written when every file is older than `RACY_SECONDS`, so a later change
always moves a timestamp.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import time
from pathlib import Path
from typing import Any, BinaryIO

from ingest.disk_cache import load_json, prune_oldest, save_json

_FORMAT_VERSION = 3
RACY_SECONDS = 2.0
_KEEP = 8
_CODE_DIR = Path(__file__).resolve().parent


def file_fingerprint(path: str, info: os.stat_result | None = None) -> list[int] | None:
    """What changes when the file's content may have; None when it cannot be stat'ed.
    `info`: the path's lstat, when the caller has it already."""
    if info is None:
        try:
            info = os.lstat(path)
        except OSError:
            return None
    fingerprint = [info.st_mode, info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]
    if stat.S_ISLNK(info.st_mode):
        try:
            target = os.stat(path)
            fingerprint += [target.st_mode, target.st_size, target.st_mtime_ns, target.st_ctime_ns, target.st_ino]
        except OSError:
            fingerprint.append(-1)
    return fingerprint


def code_fingerprint() -> list[Any]:
    entries = []
    for module in sorted(_CODE_DIR.glob("*.py")):
        info = module.stat()
        entries.append([module.name, info.st_size, info.st_mtime_ns])
    return entries


# A UTF-16 surrogate (U+D800-U+DFFF) in "surrogatepass" UTF-8: ED followed by A0-BF. Valid
# UTF-8 never has that pair, so its absence means the bytes are the strict UTF-8 of the text.
_SURROGATE = re.compile(rb"\xed[\xa0-\xbf]")
_COPY_CHUNK = 1 << 20


class CachedOutput:
    """A cached pack's bytes, held open: a later rename or prune cannot cut them short.

    `plain_utf8`: the text has no lone surrogates (file names that are not UTF-8 decode to
    some), so these bytes are exactly its UTF-8 and can be copied out as they are.
    """

    def __init__(self, handle: BinaryIO, size: int, plain_utf8: bool):
        self._handle, self.size, self.plain_utf8 = handle, size, plain_utf8

    def text(self) -> str:
        return os.pread(self._handle.fileno(), self.size, 0).decode("utf-8", "surrogatepass")

    def copy_to(self, sink: BinaryIO) -> None:
        """All the bytes into `sink` (flushed first), by sendfile where the kernel can."""
        sink.flush()
        source, offset = self._handle.fileno(), 0
        try:
            target: int | None = sink.fileno()
        except (OSError, ValueError):       # an in-memory stream
            target = None
        if target is not None:
            try:
                while offset < self.size:
                    sent = os.sendfile(target, source, offset, min(self.size - offset, 1 << 30))
                    if sent == 0:
                        break
                    offset += sent
            except OSError as error:
                if offset or not _sendfile_unsupported(error):
                    raise
        while offset < self.size:
            chunk = os.pread(source, min(_COPY_CHUNK, self.size - offset), offset)
            if not chunk:
                raise OSError("the cached pack shrank while being copied")
            sink.write(chunk)
            offset += len(chunk)
        sink.flush()

    def close(self) -> None:
        self._handle.close()


def _sendfile_unsupported(error: OSError) -> bool:
    import errno

    return error.errno in (errno.EINVAL, errno.ENOSYS, errno.ENOTSOCK, errno.EOPNOTSUPP)


class PackCache:
    def __init__(self, cache_dir: Path):
        self.directory = Path(cache_dir) / "packs"

    @staticmethod
    def key(material: Any) -> str:
        encoded = json.dumps([_FORMAT_VERSION, material, code_fingerprint()], ensure_ascii=False,
                             separators=(",", ":"))
        return hashlib.sha256(encoded.encode("utf-8", "surrogatepass")).hexdigest()

    def load(self, key: str) -> tuple[dict, CachedOutput] | None:
        meta = load_json(self.directory / f"{key}.json")
        if not isinstance(meta, dict) or meta.get("key") != key:
            return None
        try:
            handle = open(self.directory / f"{key}.txt", "rb")
        except OSError:
            return None
        # writes are atomic (temporary file, rename), so the length is check enough and costs
        # nothing, where hashing 15 MB again would cost a tenth of a warm re-pack
        try:
            size = os.fstat(handle.fileno()).st_size
        except OSError:
            size = -1
        if size != meta.get("text_bytes"):
            handle.close()
            return None
        return meta, CachedOutput(handle, size, meta.get("plain_utf8") is True)

    def store(self, key: str, meta: dict, text: str, newest_change_ns: int) -> bytes | None:
        """Keep `text` under `key`. Returns its strict UTF-8 when it has no lone surrogates
        (the bytes the output needs, so the caller does not encode 15 MB twice)."""
        data = text.encode("utf-8", "surrogatepass")
        plain = _SURROGATE.search(data) is None
        if newest_change_ns > time.time_ns() - int(RACY_SECONDS * 1e9):
            return data if plain else None   # a file changed just now: its next change might not move its timestamp
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            temporary = self.directory / f".{key}.{os.getpid()}.tmp"
            temporary.write_bytes(data)
            os.replace(temporary, self.directory / f"{key}.txt")
        except OSError:
            return data if plain else None
        save_json(self.directory / f"{key}.json", {**meta, "key": key, "text_bytes": len(data), "plain_utf8": plain})
        prune_oldest(self.directory, _KEEP)
        prune_oldest(self.directory, _KEEP, pattern="*.txt")
        return data if plain else None
