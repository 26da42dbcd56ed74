"""The persistent prefix KV cache: self-describing segment files under <home>/cache/kv/.

Key. A `Fingerprint` is SHA-256 over everything that changes the numbers (format version,
weights digest, tokenizer digest, chat template, mode/KV dtype, the state's layout, an
engine-numerics digest). Prompt tokens are cut into fixed chunks and chained:
h_0 = fingerprint, h_i = SHA-256(h_{i-1} || chunk_i as u32 LE). Equal h_k means (barring a
SHA-256 collision) equal fingerprint and equal first k chunks; the token ids are stored in
the file anyway and compared with the prompt on every hit.

Layout. <root>/<fingerprint[:16]>/fingerprint.json names the fields; each segment holds the
state for tokens [start, end) (many chunks, tens of MB) and is named
`<h_start[:32]>-<h_end[:32]>.seg`, so a lookup globs the files that continue the prefix
matched so far. A segment file:

    MAGIC (8) | u32 format version | u32 header length | header JSON | pad to 64
    token ids (u32 LE) | pad to 64 | tensors (each 64-aligned) | SHA-256 of all the above (32)

The header lists fingerprint, token range, parent hash, every chunk hash, and each tensor's
name, dtype, shape, offset and size. A file is written to `<name>.tmp.<pid>.<uuid>`,
fsynced, then renamed, so nothing partial is ever visible; segments are content-addressed,
so two writers of the same name write the same bytes and the last rename wins harmlessly.

Faults. Anything wrong with a file (short, bad magic, other version, other fingerprint,
checksum, token ids) raises `SegmentError` with a one-line reason; callers treat it as a
miss and the file is removed (unless the cache is read-only).

Concurrency. `<root>/.lock` is an fcntl lock: readers hold it shared while they look up and
load, writers take it exclusively only to publish and evict, so eviction never deletes a
file that another process is reading.

Size. The cap (default min(20 GB, 10% of the disk); DSV4_CACHE_CAP="5G" or an option) is
enforced on real usage (st_blocks) across all fingerprints, evicting the least recently
used segments first; a hit touches the file's mtime, which is the recency.

No torch here: `dsv4 cache` uses this module without loading the engine.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import re
import shutil
import struct
import sys
import time
import uuid
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import paths
from engine.atomic_files import atomic_write_bytes, fsync_dir

MAGIC = b"DSV4KVC\x00"
FORMAT_VERSION = 1
DEFAULT_CHUNK_TOKENS = 256
DEFAULT_CAP_BYTES = 20 * 1000**3
DEFAULT_CAP_DISK_SHARE = 0.10
CAP_ENV = "DSV4_CACHE_CAP"
SEGMENT_SUFFIX = ".seg"
_ALIGN = 64
_PREAMBLE = struct.Struct("<8sII")  # magic, format version, header length
_MAX_HEADER = 16 << 20
_STALE_TEMP_S = 3600.0
# Test-only hook: a writer that has put this many bytes into a temp file stops there and
# sleeps, so a test can SIGKILL it in the middle of a write.
_PAUSE_ENV = "DSV4_CACHE_TEST_PAUSE_AT"


class SegmentError(Exception):
    """A segment that cannot be used; str(exc) is the one-line reason."""


def root_dir() -> Path:
    return paths.cache_dir() / "kv"


# ---------------------------------------------------------------- key


@dataclass(frozen=True)
class Fingerprint:
    fields: dict[str, Any]  # hashed: everything that changes the numbers
    label: str = ""  # the model's name, for listings and miss reasons; not hashed

    @property
    def digest(self) -> str:
        canonical = json.dumps({"format": FORMAT_VERSION, **self.fields}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def short(self) -> str:
        return self.digest[:16]

    @property
    def chunk_tokens(self) -> int:
        return int(self.fields.get("chunk_tokens", DEFAULT_CHUNK_TOKENS))


def chain_hashes(fingerprint: Fingerprint, tokens: Sequence[int], n_chunks: int) -> list[str]:
    """[h_0 .. h_n_chunks] (hex): h_0 is the fingerprint, h_i covers chunks 1..i."""
    chunk = fingerprint.chunk_tokens
    hashes = [fingerprint.digest]
    previous = bytes.fromhex(fingerprint.digest)
    for i in range(n_chunks):
        previous = hashlib.sha256(previous + _u32_bytes(tokens[i * chunk : (i + 1) * chunk])).digest()
        hashes.append(previous.hex())
    return hashes


def _u32_bytes(tokens: Sequence[int]) -> bytes:
    values = array("I", tokens)
    if sys.byteorder != "little":
        values.byteswap()
    return values.tobytes()


def _u32_list(data: bytes | memoryview) -> list[int]:
    values = array("I")
    values.frombytes(data)
    if sys.byteorder != "little":
        values.byteswap()
    return values.tolist()


def file_digest(path: str | os.PathLike[str], memo_dir: Path | None = None) -> str:
    """SHA-256 of a (weights) file, memoised on disk by (real path, size, mtime): a 100 MB
    model is hashed once, not on every run."""
    path = Path(path).resolve()
    stat = path.stat()
    memo_path = (memo_dir or root_dir()) / "digests.json"
    key = str(path)
    stamp = [stat.st_size, stat.st_mtime_ns]
    memo: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
        entry = memo.get(key)
        if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    value = digest.hexdigest()
    memo = {k: v for k, v in memo.items() if k != key and Path(k).exists()} if isinstance(memo, dict) else {}
    memo[key] = {"stamp": stamp, "sha256": value}
    with contextlib.suppress(OSError):
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(memo_path, json.dumps(memo, indent=1).encode())
    return value


# ---------------------------------------------------------------- sizes


def parse_size(text: str) -> int:
    """'5G', '500M', '1.5GiB', '2GB', '1048576' -> bytes (K/M/G/T are powers of 1024)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read {text!r} as a size (use e.g. 5G, 500M or a byte count)")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** "_kmgt".index(unit)) if unit else int(number)


def default_cap(root: Path | None = None) -> int:
    """min(20 GB, 10% of the disk holding the cache)."""
    probe = root or root_dir()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        disk = shutil.disk_usage(probe).total
    except OSError:
        return DEFAULT_CAP_BYTES
    return int(min(DEFAULT_CAP_BYTES, DEFAULT_CAP_DISK_SHARE * disk))


def resolve_cap(option: str | int | None = None, root: Path | None = None) -> int:
    """The cap in force: an explicit option, else $DSV4_CACHE_CAP, else the default."""
    if isinstance(option, int):
        return option
    text = option or os.environ.get(CAP_ENV)
    return parse_size(text) if text else default_cap(root)


def disk_usage(path: Path) -> int:
    """Bytes really allocated (st_blocks), not apparent sizes."""
    try:
        stat = path.stat()
    except OSError:
        return 0
    return stat.st_blocks * 512 if hasattr(stat, "st_blocks") else stat.st_size


# ---------------------------------------------------------------- segment files


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # from the start of the payload
    nbytes: int


@dataclass
class SegmentHeader:
    path: Path
    fingerprint: str
    start: int
    end: int
    chunk_tokens: int
    parent: str
    chunk_hashes: list[str]  # h_{start/C + 1} .. h_{end/C}
    tensors: list[TensorSpec]
    meta: dict[str, Any]
    tokens_offset: int
    payload_offset: int
    file_bytes: int
    created: float

    @property
    def n_tokens(self) -> int:
        return self.end - self.start


def segment_name(parent: str, end_hash: str) -> str:
    return f"{parent[:32]}-{end_hash[:32]}{SEGMENT_SUFFIX}"


def _pad(n: int) -> int:
    return -n % _ALIGN


def read_header(path: Path) -> SegmentHeader:
    """Parse and sanity-check a segment's header (reads a few kB, not the payload)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            preamble = handle.read(_PREAMBLE.size)
            if len(preamble) < _PREAMBLE.size:
                raise SegmentError(f"truncated ({size} bytes)")
            magic, version, header_len = _PREAMBLE.unpack(preamble)
            if magic != MAGIC:
                raise SegmentError("not a dsv4 cache segment (bad magic)")
            if version != FORMAT_VERSION:
                raise SegmentError(f"format version {version}, this dsv4 reads {FORMAT_VERSION}")
            if not 0 < header_len <= _MAX_HEADER:
                raise SegmentError(f"header length {header_len} is impossible")
            raw = handle.read(header_len)
    except OSError as exc:
        raise SegmentError(f"unreadable: {exc.strerror or exc}") from None
    if len(raw) < header_len:
        raise SegmentError(f"truncated in its header ({size} bytes)")
    try:
        h = json.loads(raw.decode("utf-8"))
        tensors = [TensorSpec(t["name"], t["dtype"], tuple(int(d) for d in t["shape"]), int(t["offset"]), int(t["nbytes"])) for t in h["tensors"]]
        header = SegmentHeader(
            path=path,
            fingerprint=str(h["fingerprint"]),
            start=int(h["start"]),
            end=int(h["end"]),
            chunk_tokens=int(h["chunk_tokens"]),
            parent=str(h["parent"]),
            chunk_hashes=[str(x) for x in h["chunk_hashes"]],
            tensors=tensors,
            meta=dict(h.get("meta", {})),
            tokens_offset=int(h["tokens_offset"]),
            payload_offset=int(h["payload_offset"]),
            file_bytes=int(h["file_bytes"]),
            created=float(h.get("created", 0.0)),
        )
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise SegmentError(f"damaged header ({type(exc).__name__})") from None
    if header.file_bytes != size:
        raise SegmentError(f"truncated: {size:,} of {header.file_bytes:,} bytes")
    chunks = header.n_tokens // max(1, header.chunk_tokens)
    if header.n_tokens <= 0 or header.start % header.chunk_tokens or header.n_tokens % header.chunk_tokens or len(header.chunk_hashes) != chunks:
        raise SegmentError("damaged header (token range does not match its chunks)")
    return header


@dataclass
class LoadedSegment:
    header: SegmentHeader
    tokens: list[int]
    buffer: mmap.mmap  # the file, mapped read-only; tensors are views into it
    seconds: float

    def tensor_bytes(self, spec: TensorSpec) -> memoryview:
        begin = self.header.payload_offset + spec.offset
        return memoryview(self.buffer)[begin : begin + spec.nbytes]


def load_segment(header: SegmentHeader, fingerprint: str) -> LoadedSegment:
    """Map the file, ask the kernel to read it all ahead (MADV_WILLNEED), and verify it end
    to end while the read-ahead runs. Mapping skips both the copy into a private buffer and
    the zero-filling of one: measured 2-3x faster than read() into fresh memory. Safe
    because a published segment is never changed in place: writers replace it by rename
    and eviction unlinks it, neither of which touches a mapping already made."""
    started = time.perf_counter()
    if header.fingerprint != fingerprint:
        raise SegmentError("written for another fingerprint (model, tokenizer or engine)")
    size = header.file_bytes
    try:
        with header.path.open("rb") as handle:
            actual = os.fstat(handle.fileno()).st_size
            if actual != size:
                raise SegmentError(f"truncated: {actual:,} of {size:,} bytes")
            mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:
        raise SegmentError(f"unreadable: {getattr(exc, 'strerror', None) or exc}") from None
    with contextlib.suppress(AttributeError, OSError):  # madvise: Python >= 3.8 on Unix
        mapping.madvise(mmap.MADV_WILLNEED)
    view = memoryview(mapping)
    hashed_end = size - 32
    if hashlib.sha256(view[:hashed_end]).digest() != bytes(view[hashed_end:]):
        raise SegmentError("checksum mismatch (the file is damaged)")
    n = header.n_tokens
    tokens = _u32_list(view[header.tokens_offset : header.tokens_offset + 4 * n])
    for spec in header.tensors:
        if header.payload_offset + spec.offset + spec.nbytes > hashed_end:
            raise SegmentError(f"tensor {spec.name} lies outside the file")
    return LoadedSegment(header, tokens, mapping, time.perf_counter() - started)


def _write_chunk(handle: Any, data: bytes | memoryview) -> None:
    """One write; the seam tests use to simulate a full disk (ENOSPC)."""
    handle.write(data)


@dataclass(frozen=True)
class TensorData:
    name: str
    dtype: str
    shape: tuple[int, ...]
    data: memoryview  # contiguous bytes


def encode_segment_header(
    fingerprint: str,
    start: int,
    end: int,
    chunk_tokens: int,
    parent: str,
    chunk_hashes: Sequence[str],
    tensors: Sequence[TensorData],
    meta: dict[str, Any],
) -> tuple[bytes, int, int]:
    """(header bytes incl. preamble and padding, tokens offset, payload offset)."""
    specs, offset = [], 0
    for t in tensors:
        specs.append({"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "offset": offset, "nbytes": t.data.nbytes})
        offset += t.data.nbytes + _pad(t.data.nbytes)
    payload_bytes = offset
    token_bytes = 4 * (end - start)
    fields: dict[str, Any] = {
        "fingerprint": fingerprint,
        "start": start,
        "end": end,
        "chunk_tokens": chunk_tokens,
        "parent": parent,
        "chunk_hashes": list(chunk_hashes),
        "tensors": specs,
        "meta": meta,
        "created": time.time(),
    }
    # Offsets depend on the header's own length: fix the numbers' widths, then fill them in.
    for key in ("tokens_offset", "payload_offset", "file_bytes"):
        fields[key] = 10**15
    probe = len(json.dumps(fields).encode())
    tokens_offset = _PREAMBLE.size + probe + _pad(_PREAMBLE.size + probe)
    payload_offset = tokens_offset + token_bytes + _pad(token_bytes)
    file_bytes = payload_offset + payload_bytes + 32
    fields.update(tokens_offset=tokens_offset, payload_offset=payload_offset, file_bytes=file_bytes)
    text = json.dumps(fields).encode().ljust(probe)
    preamble = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(text))
    return preamble + text + b"\0" * _pad(_PREAMBLE.size + len(text)), tokens_offset, payload_offset


# ---------------------------------------------------------------- locks and atomic files


@contextlib.contextmanager
def cache_lock(root: Path, *, exclusive: bool) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no advisory locks (Windows): atomic renames still keep files whole
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


_written_by_process = 0


def _pause_for_tests(handle: Any, n: int) -> None:
    """Counts the bytes this process wrote into segment files; past $DSV4_CACHE_TEST_PAUSE_AT
    it flushes the temp file and sleeps, to be killed in the middle of a write."""
    global _written_by_process
    _written_by_process += n
    limit = os.environ.get(_PAUSE_ENV)
    if limit and _written_by_process >= int(limit):
        handle.flush()
        print(f"dsv4-cache-test: paused after {_written_by_process} bytes", file=sys.stderr, flush=True)
        time.sleep(3600)


# ---------------------------------------------------------------- the cache


@dataclass
class Match:
    """Segments to load, in order, with how many of each one's chunks the prompt shares."""

    segments: list[tuple[SegmentHeader, int]] = field(default_factory=list)
    reason: str | None = None  # why the match stops where it does (None: it reached the end)
    removed: list[str] = field(default_factory=list)  # "name: reason" for each file dropped

    @property
    def chunks(self) -> int:
        return sum(n for _, n in self.segments)


class PrefixCache:
    """One fingerprint's view of the cache directory."""

    def __init__(self, fingerprint: Fingerprint, *, root: Path | None = None, cap_bytes: int | None = None, read_only: bool = False):
        self.fingerprint = fingerprint
        self.root = root or root_dir()
        self.dir = self.root / fingerprint.short
        self.cap_bytes = cap_bytes if cap_bytes is not None else resolve_cap(None, self.root)
        self.read_only = read_only

    @property
    def chunk_tokens(self) -> int:
        return self.fingerprint.chunk_tokens

    def reading(self) -> contextlib.AbstractContextManager[None]:
        """Hold while looking up and loading: eviction waits for it."""
        if not self.root.exists():
            return contextlib.nullcontext()
        return cache_lock(self.root, exclusive=False)

    # ---- lookup

    def match(self, hashes: Sequence[str], *, partial_ok: bool) -> Match:
        """The longest chain of segments continuing the prompt's hashes [h_0 .. h_n].
        `partial_ok`: a segment may be used up to an inner chunk boundary."""
        result = Match()
        if not self.dir.is_dir():
            result.reason = self._absent_reason()
            return result
        position = 0  # chunks matched so far
        available = len(hashes) - 1
        while position < available:
            best: tuple[SegmentHeader, int] | None = None
            longest_seen = 0
            for path in sorted(self.dir.glob(f"{hashes[position][:32]}-*{SEGMENT_SUFFIX}")):
                try:
                    header = read_header(path)
                    if header.fingerprint != self.fingerprint.digest:
                        raise SegmentError("written for another fingerprint")
                    if header.chunk_tokens != self.chunk_tokens or header.start != position * self.chunk_tokens:
                        raise SegmentError("its token range does not match its name")
                except SegmentError as exc:
                    self.discard(path, str(exc), result.removed)
                    continue
                if header.parent != hashes[position]:
                    continue  # a 128-bit name prefix collision: not ours
                shared = 0
                for own, want in zip(header.chunk_hashes, hashes[position + 1 :]):
                    if own != want:
                        break
                    shared += 1
                longest_seen = max(longest_seen, shared)
                usable = shared if partial_ok else (shared if shared == len(header.chunk_hashes) else 0)
                if usable and (best is None or usable > best[1]):
                    best = (header, usable)
            if best is None:
                tokens = position * self.chunk_tokens
                if position == 0:
                    result.reason = "no cached prefix for this prompt's first chunk"
                elif longest_seen:
                    result.reason = f"a cached segment diverges from the prompt inside it after {tokens:,} tokens (this state cannot stop inside a segment)"
                else:
                    result.reason = f"the prompt differs from every cached prefix after {tokens:,} tokens"
                return result
            # After a segment used only in part, another run may have published the
            # prompt's own continuation from that point on: keep looking there.
            result.segments.append(best)
            position += best[1]
        return result

    def _absent_reason(self) -> str:
        others = [d for d in self.root.glob("*/fingerprint.json")] if self.root.is_dir() else []
        if not others:
            return "the cache is empty"
        mine = self.fingerprint.fields
        for other in sorted(others, key=lambda p: p.stat().st_mtime, reverse=True):
            with contextlib.suppress(OSError, ValueError):
                note = json.loads(other.read_text(encoding="utf-8"))
                theirs = note.get("fields", {})
                if note.get("label") == self.fingerprint.label:
                    changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
                    return f"fingerprint changed ({', '.join(changed)}): nothing cached for this model as it is now"
        return "nothing cached for this model yet"

    def load(self, header: SegmentHeader, prompt_tokens: Sequence[int], used_tokens: int) -> LoadedSegment:
        """Load and verify a segment; its first `used_tokens` token ids must equal the
        prompt's at the same positions (the hashes said so; the ids are the proof)."""
        loaded = load_segment(header, self.fingerprint.digest)
        expected = list(prompt_tokens[header.start : header.start + used_tokens])
        if loaded.tokens[:used_tokens] != expected:
            first = next((i for i, (a, b) in enumerate(zip(loaded.tokens, expected)) if a != b), len(expected))
            raise SegmentError(f"token ids differ from the prompt at token {header.start + first:,} although the hashes match")
        return loaded

    def touch(self, header: SegmentHeader) -> None:
        """A hit makes the segment the most recently used."""
        if not self.read_only:
            with contextlib.suppress(OSError):
                os.utime(header.path)

    def discard(self, path: Path, reason: str, log: list[str] | None = None) -> None:
        """Drop an unusable file (read-only caches only note it)."""
        if log is not None:
            log.append(f"{path.name}: {reason}" + ("" if self.read_only else " (removed)"))
        if self.read_only:
            return
        with contextlib.suppress(OSError):
            path.unlink()

    # ---- writes

    def write_segment(
        self,
        start: int,
        hashes: Sequence[str],
        tokens: Sequence[int],
        tensors: Sequence[TensorData],
        meta: dict[str, Any],
    ) -> int:
        """Publish the state of tokens [start, start + len(tokens)); `hashes` is
        [h_start, .., h_end]. Returns the bytes written; raises OSError (ENOSPC...) after
        removing its temp file, so a failed write never leaves anything visible."""
        if self.read_only:
            raise PermissionError(errno.EROFS, "the cache is read-only")
        chunk = self.chunk_tokens
        end = start + len(tokens)
        if start % chunk or len(tokens) % chunk or len(hashes) != len(tokens) // chunk + 1:
            raise ValueError("a segment covers whole chunks and carries one hash per chunk boundary")
        header, tokens_offset, payload_offset = encode_segment_header(
            self.fingerprint.digest, start, end, chunk, hashes[0], hashes[1:], tensors, meta
        )
        total = payload_offset + sum(t.data.nbytes + _pad(t.data.nbytes) for t in tensors) + 32
        if total > self.cap_bytes:
            raise OSError(errno.EFBIG, f"a {total:,}-byte segment does not fit the cache cap of {self.cap_bytes:,} bytes")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_fingerprint_note()
        target = self.dir / segment_name(hashes[0], hashes[-1])
        temp = target.with_name(f"{target.name}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        with cache_lock(self.root, exclusive=True):
            self._evict_locked(incoming=total)
        try:
            digest = hashlib.sha256()
            with temp.open("wb") as handle:
                token_bytes = _u32_bytes(tokens)
                pieces: list[bytes | memoryview] = [header, token_bytes, b"\0" * (payload_offset - tokens_offset - len(token_bytes))]
                for t in tensors:
                    pieces += [t.data, b"\0" * _pad(t.data.nbytes)]
                for piece in pieces:
                    for lo in range(0, len(piece), 8 << 20):
                        part = piece[lo : lo + (8 << 20)]
                        digest.update(part)
                        _write_chunk(handle, part)
                        _pause_for_tests(handle, len(part))
                _write_chunk(handle, digest.digest())
                handle.flush()
                os.fsync(handle.fileno())
            with cache_lock(self.root, exclusive=True):
                os.replace(temp, target)
                fsync_dir(self.dir)
                self._evict_locked(incoming=0)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return total

    def _write_fingerprint_note(self) -> None:
        note = self.dir / "fingerprint.json"
        if not note.exists():
            with contextlib.suppress(OSError):
                note_text = {"label": self.fingerprint.label, "digest": self.fingerprint.digest, "fields": self.fingerprint.fields}
                atomic_write_bytes(note, json.dumps(note_text, indent=1, sort_keys=True).encode())
        else:
            with contextlib.suppress(OSError):
                os.utime(note)

    def _evict_locked(self, incoming: int, keep: Path | None = None) -> list[Path]:
        return evict_to(self.root, self.cap_bytes - incoming, keep=keep)


# ---------------------------------------------------------------- whole-cache operations


@dataclass(frozen=True)
class SegmentInfo:
    path: Path
    fingerprint: str
    model: str
    start: int
    end: int
    disk_bytes: int
    last_used: float


def segment_paths(root: Path | None = None) -> list[Path]:
    root = root or root_dir()
    return sorted(root.glob(f"*/*{SEGMENT_SUFFIX}")) if root.is_dir() else []


def total_usage(root: Path | None = None) -> int:
    """Real bytes of everything under the cache root (segments, temp files, notes)."""
    root = root or root_dir()
    if not root.is_dir():
        return 0
    return sum(disk_usage(p) for p in root.rglob("*") if p.is_file())


def evict_to(root: Path, budget: int, keep: Path | None = None) -> list[Path]:
    """Delete least recently used segments until real usage <= budget; the caller holds
    the exclusive lock. Also sweeps temp files left by killed writers."""
    removed: list[Path] = []
    now = time.time()
    for temp in root.glob("*/*.tmp.*"):
        with contextlib.suppress(OSError):
            if now - temp.stat().st_mtime > _STALE_TEMP_S:
                temp.unlink()
    usage = total_usage(root)
    if usage <= budget:
        return removed
    candidates = []
    for path in segment_paths(root):
        with contextlib.suppress(OSError):
            candidates.append((path.stat().st_mtime, path))
    for _, path in sorted(candidates):
        if usage <= budget:
            break
        if keep is not None and path == keep:
            continue
        size = disk_usage(path)
        with contextlib.suppress(OSError):
            path.unlink()
            usage -= size
            removed.append(path)
    return removed


def list_segments(root: Path | None = None) -> list[SegmentInfo]:
    root = root or root_dir()
    models: dict[str, str] = {}
    infos = []
    for path in segment_paths(root):
        fp_dir = path.parent
        if fp_dir.name not in models:
            model = "?"
            with contextlib.suppress(OSError, ValueError):
                model = str(json.loads((fp_dir / "fingerprint.json").read_text(encoding="utf-8")).get("label") or "?")
            models[fp_dir.name] = model
        start = end = -1
        with contextlib.suppress(SegmentError):
            header = read_header(path)
            start, end = header.start, header.end
        with contextlib.suppress(OSError):
            infos.append(SegmentInfo(path, fp_dir.name, models[fp_dir.name], start, end, disk_usage(path), path.stat().st_mtime))
    return infos


def verify(root: Path | None = None, *, remove: bool = True) -> tuple[int, list[str]]:
    """Read and check every segment; returns (good count, ["name: reason"] for bad ones)."""
    root = root or root_dir()
    good, bad = 0, []
    if not root.is_dir():
        return good, bad
    with cache_lock(root, exclusive=True):
        for path in segment_paths(root):
            try:
                header = read_header(path)
                loaded = load_segment(header, header.fingerprint)
                if not path.name.startswith(header.parent[:32]) or not path.name.endswith(f"-{header.chunk_hashes[-1][:32]}{SEGMENT_SUFFIX}"):
                    raise SegmentError("its name does not match its contents")
                if path.parent.name != header.fingerprint[:16]:
                    raise SegmentError("it sits under another fingerprint's directory")
                del loaded
                good += 1
            except SegmentError as exc:
                bad.append(f"{path.parent.name}/{path.name}: {exc}")
                if remove:
                    path.unlink(missing_ok=True)
    return good, bad


def prune(root: Path | None = None, *, older_than_s: float | None = None, cap_bytes: int | None = None) -> list[Path]:
    """Drop segments unused for `older_than_s`, then evict down to the cap."""
    root = root or root_dir()
    if not root.is_dir():
        return []
    removed: list[Path] = []
    with cache_lock(root, exclusive=True):
        if older_than_s is not None:
            cutoff = time.time() - older_than_s
            for path in segment_paths(root):
                with contextlib.suppress(OSError):
                    if path.stat().st_mtime < cutoff:
                        path.unlink()
                        removed.append(path)
        removed += evict_to(root, cap_bytes if cap_bytes is not None else resolve_cap(None, root))
        _drop_empty_dirs(root)
    return removed


def clear(root: Path | None = None) -> int:
    """Remove every segment (and the notes); returns how many segments went."""
    root = root or root_dir()
    if not root.is_dir():
        return 0
    with cache_lock(root, exclusive=True):
        count = len(segment_paths(root))
        for child in root.iterdir():
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            elif child.name != ".lock":
                child.unlink(missing_ok=True)
    return count


def _drop_empty_dirs(root: Path) -> None:
    for fp_dir in root.iterdir():
        if fp_dir.is_dir() and not any(fp_dir.glob(f"*{SEGMENT_SUFFIX}")) and not any(fp_dir.glob("*.tmp.*")):
            shutil.rmtree(fp_dir, ignore_errors=True)


def parse_age(text: str) -> float:
    """'30d', '12h', '90m', '45s', '2w' -> seconds."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhdw])\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read {text!r} as an age (use e.g. 30d, 12h, 90m)")
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2).lower()]
