"""Exact token counts per rendered block, cached on disk so an unchanged block is never re-tokenized.

The tokenizer is passed in (anything with `.name`, `.digest` and `.count_batch(texts)`); this
module never loads one. Counts are keyed by (tokenizer digest, sha256 of the block's bytes): the
block includes the path and framing, so the key covers everything that is counted. One JSON file
per tokenizer under `<cache_dir>/tokens/` holds the counts; it loads in milliseconds for tens of
thousands of entries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from ingest.disk_cache import load_json, save_json

_FORMAT_VERSION = 1
_MAX_ENTRIES = 200_000   # ~10 MB of JSON; beyond this, keep what this run used plus the newest others


class CountingTokenizer(Protocol):
    name: str
    digest: str

    def count_batch(self, texts: Sequence[str]) -> list[int]: ...


def block_key(text: str) -> str:
    # 128 bits of sha256 are plenty for a cache key and halve the file.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class TokenCounter:
    """Counts blocks with a tokenizer, remembering every count it has seen."""

    def __init__(self, tokenizer: CountingTokenizer, cache_dir: Path | None = None):
        self.tokenizer = tokenizer
        self._path = None
        if cache_dir is not None:
            safe_digest = "".join(c for c in str(tokenizer.digest) if c.isalnum())[:64] or "unknown"
            self._path = Path(cache_dir) / "tokens" / f"{safe_digest}.json"
        self._counts: dict[str, int] = self._load()
        self._used: set[str] = set()
        self._dirty = False
        self.tokenized_blocks = 0      # blocks actually sent to the tokenizer in this run
        self.tokenized_chars = 0

    def _load(self) -> dict[str, int]:
        if self._path is None:
            return {}
        data = load_json(self._path)
        if isinstance(data, dict) and data.get("version") == _FORMAT_VERSION and data.get("digest") == str(
            self.tokenizer.digest
        ):
            counts = data.get("counts")
            if isinstance(counts, dict):
                return counts
        return {}

    def count(self, blocks: Sequence[str]) -> list[int]:
        """Exact token count of each block; only blocks never seen before are tokenized."""
        keys = [block_key(b) for b in blocks]
        self._used.update(keys)
        missing: dict[str, str] = {}
        for key, block in zip(keys, blocks):
            if key not in self._counts and key not in missing:
                missing[key] = block
        if missing:
            texts = list(missing.values())
            counted = self.tokenizer.count_batch(texts)
            if len(counted) != len(texts):
                raise RuntimeError("tokenizer.count_batch returned the wrong number of counts")
            for key, value in zip(missing, counted):
                self._counts[key] = int(value)
            self.tokenized_blocks += len(texts)
            self.tokenized_chars += sum(len(t) for t in texts)
            self._dirty = True
        return [self._counts[k] for k in keys]

    def count_one(self, block: str) -> int:
        return self.count([block])[0]

    def save(self) -> None:
        if self._path is None or not self._dirty:
            return
        # Another pack may have saved since we loaded: keep its counts too.
        counts = {**self._load(), **self._counts}
        if len(counts) > _MAX_ENTRIES:
            # dicts keep insertion order, so the tail holds the most recently added counts
            keep = {k: v for k, v in counts.items() if k in self._used}
            for key in reversed(list(counts)):
                if len(keep) >= _MAX_ENTRIES // 2:
                    break
                keep.setdefault(key, counts[key])
            counts = keep
        save_json(self._path, {"version": _FORMAT_VERSION, "digest": str(self.tokenizer.digest), "counts": counts})
        self._dirty = False
