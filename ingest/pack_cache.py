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
import stat
import time
from pathlib import Path
from typing import Any

from ingest.disk_cache import load_json, prune_oldest, save_json

_FORMAT_VERSION = 2
RACY_SECONDS = 2.0
_KEEP = 8
_CODE_DIR = Path(__file__).resolve().parent


def file_fingerprint(path: str) -> list[int] | None:
    """What changes when the file's content may have; None when it cannot be stat'ed."""
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


class PackCache:
    def __init__(self, cache_dir: Path):
        self.directory = Path(cache_dir) / "packs"

    @staticmethod
    def key(material: Any) -> str:
        encoded = json.dumps([_FORMAT_VERSION, material, code_fingerprint()], ensure_ascii=False,
                             separators=(",", ":"))
        return hashlib.sha256(encoded.encode("utf-8", "surrogatepass")).hexdigest()

    def load(self, key: str) -> tuple[dict, str] | None:
        meta = load_json(self.directory / f"{key}.json")
        if not isinstance(meta, dict) or meta.get("key") != key:
            return None
        try:
            data = (self.directory / f"{key}.txt").read_bytes()
        except OSError:
            return None
        # writes are atomic (temporary file, rename), so the length is check enough and costs
        # nothing, where hashing 15 MB again would cost a tenth of a warm re-pack
        if len(data) != meta.get("text_bytes"):
            return None
        return meta, data.decode("utf-8", "surrogatepass")

    def store(self, key: str, meta: dict, text: str, newest_change_ns: int) -> None:
        if newest_change_ns > time.time_ns() - int(RACY_SECONDS * 1e9):
            return      # a file changed just now: its next change might not move its timestamp
        data = text.encode("utf-8", "surrogatepass")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            temporary = self.directory / f".{key}.{os.getpid()}.tmp"
            temporary.write_bytes(data)
            os.replace(temporary, self.directory / f"{key}.txt")
        except OSError:
            return
        save_json(self.directory / f"{key}.json",
                  {**meta, "key": key, "text_bytes": len(data)})
        prune_oldest(self.directory, _KEEP)
        prune_oldest(self.directory, _KEEP, pattern="*.txt")
