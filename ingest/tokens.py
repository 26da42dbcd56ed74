"""Exact token counts per rendered block, cached on disk so an unchanged block is never re-tokenized.

The tokenizer is passed in (anything with `.name`, `.digest` and `.count_batch(texts)`); this
module never loads one. Counts are keyed by (tokenizer digest, sha256 of the block's bytes): the
block includes the path and framing, so the key covers everything that is counted. One JSON file
per tokenizer under `<cache_dir>/tokens/` holds the counts; it loads in milliseconds for tens of
thousands of entries.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
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

    def stream(self) -> CountingStream:
        """Count blocks while the caller is still producing them (see CountingStream)."""
        return CountingStream(self)

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


_BATCH_CHARS = 64 * 1024


def _worker_count() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


class CountingStream:
    """Blocks are counted on worker threads as they are added, so tokenizing overlaps reading
    and rendering (the tokenizer releases the GIL while it encodes). The counts are exactly
    those of `TokenCounter.count` over the same blocks: cached blocks are never tokenized,
    and a block that occurs twice is tokenized once. Workers start with the first block that
    must be tokenized, so a fully cached pack never loads a lazy tokenizer."""

    def __init__(self, counter: TokenCounter):
        self._counter = counter
        self._keys: list[str] = []
        self._queued: dict[str, str] = {}          # key -> block, what the workers were given
        self._counted: dict[str, int] = {}
        self._errors: list[BaseException] = []
        self._queue: queue.SimpleQueue[list[tuple[str, str]] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._batch: list[tuple[str, str]] = []
        self._batch_chars = 0

    def add(self, block: str) -> None:
        key = block_key(block)
        self._keys.append(key)
        if key in self._counter._counts or key in self._queued:
            return
        self._queued[key] = block
        if not self._threads:
            for index in range(_worker_count()):
                thread = threading.Thread(target=self._work, name=f"dsv4-count-{index}", daemon=True)
                thread.start()
                self._threads.append(thread)
        # handed over in batches: every hand-over wakes a thread, which costs more than a
        # small file's tokens
        self._batch.append((key, block))
        self._batch_chars += len(block)
        if self._batch_chars >= _BATCH_CHARS:
            self._hand_over()

    def _hand_over(self) -> None:
        if self._batch:
            self._queue.put(self._batch)
            self._batch, self._batch_chars = [], 0

    def _work(self) -> None:
        tokenizer = self._counter.tokenizer
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            for key, block in batch:
                if self._errors:
                    break                   # drain: the first error is raised by finish()
                try:
                    counted = tokenizer.count_batch([block])
                    if len(counted) != 1:
                        raise RuntimeError("tokenizer.count_batch returned the wrong number of counts")
                    self._counted[key] = int(counted[0])
                except BaseException as error:  # noqa: BLE001 - raised in the caller's thread
                    self._errors.append(error)

    def abandon(self) -> None:
        """Stop the workers without waiting (the caller failed; nothing will be asked)."""
        self._errors.append(RuntimeError("counting abandoned"))
        self._batch = []
        for _ in self._threads:
            self._queue.put(None)
        self._threads = []

    def finish(self) -> list[int]:
        """The count of every added block, in order; raises what a worker raised."""
        self._hand_over()
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        if self._errors:
            raise self._errors[0]
        counter = self._counter
        counter._used.update(self._keys)
        if self._queued:
            counter._counts.update(self._counted)
            counter.tokenized_blocks += len(self._queued)
            counter.tokenized_chars += sum(len(b) for b in self._queued.values())
            counter._dirty = True
        return [counter._counts[k] for k in self._keys]
