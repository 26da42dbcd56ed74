"""Turn one selected file into a Document: its body, or the reason it is only listed.

Decides binary vs text, decodes text (UTF-8, UTF-8/16/32 with BOM, anything else with
U+FFFD replacements and a warning), applies the size cap and the noise filters. Never raises
for a bad file: an unreadable, vanished or odd file becomes a listed Document with a reason.
Text is kept exactly as stored (line endings, missing final newline) except for the BOM.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

from ingest.noise import Attributes, content_reason, load_attributes, name_reason
from ingest.types import Document, ReadOptions

__all__ = ["read_document", "load_attributes", "Attributes", "Converter", "human_size"]

Converter = Callable[[str, bytes], str | None]

SNIFF_BYTES = 8192
# longest BOM first: the UTF-32 LE BOM begins with the UTF-16 LE one
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
# formats that can start without a NUL byte in their first 8 KiB
_MAGIC = (
    b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"%PDF-", b"PK\x03\x04",
    b"PK\x05\x06", b"\x1f\x8b", b"\xfd7zXZ\x00", b"7z\xbc\xaf\x27\x1c", b"\x28\xb5\x2f\xfd",
    b"\x7fELF", b"\xca\xfe\xba\xbe", b"\xcf\xfa\xed\xfe", b"\xce\xfa\xed\xfe", b"\x00asm",
    b"SQLite format 3\x00", b"wOFF", b"wOF2", b"OTTO", b"Rar!\x1a\x07", b"MSCF",
    b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", b"II*\x00", b"MM\x00*", b"\x1a\x45\xdf\xa3",
    b"OggS\x00", b"fLaC",
)
# control bytes that do not occur in text (tab, newlines, form feed, backspace as used by
# overstruck man pages, and ESC for coloured logs do)
_CONTROL = bytes(sorted(set(range(32)) - set(b"\t\n\r\f\v\b\x1b"))) + b"\x7f"
_CONTROL_SHARE = 0.10
_CONTROL_SHARE_NOT_UTF8 = 0.03


def read_document(root: Path, relpath: str, options: ReadOptions = ReadOptions(), *,
                  attributes: Attributes | None = None,
                  converter: Converter | None = None,
                  lstat: os.stat_result | None = None) -> Document:
    """Read `root/relpath` (relpath with '/' separators, inside root) into a Document.

    `attributes` marks linguist-generated/-vendored paths (see `load_attributes`).
    `converter(relpath, data)` turns documents (PDF, HTML, man pages) into text, or returns
    None; it is asked before the binary check, because a PDF is binary but readable.
    `lstat`: the file's lstat when the caller took one just before (saves a system call).
    """
    document = Document(path=relpath, text=None, status="listed")
    if relpath.startswith("/") or ".." in relpath.split("/"):
        document.reason = "outside SOURCE"
        return document
    full = os.path.join(root, relpath)
    try:
        info = lstat if lstat is not None else os.lstat(full)
        if stat.S_ISLNK(info.st_mode):
            refusal = _symlink_refusal(root, full)
            if refusal:
                document.reason = refusal
                return document
            info = os.stat(full)
    except OSError as error:
        return _unreadable(document, error)
    if not stat.S_ISREG(info.st_mode):
        # a fifo would block a read forever; devices and directories have no body
        document.reason = "not a regular file"
        return document
    document.size = info.st_size

    cap = options.max_file_bytes
    # a document over the cap may still convert to text under it (PDF manuals often do)
    limit = max(cap, options.max_document_bytes) if converter else cap
    if info.st_size > limit:
        document.reason = _too_large(info.st_size, cap)
        return document
    try:
        # unbuffered: one read of the stat'ed size (plus a byte, to notice growth) instead of a
        # buffer as large as the limit, and no isatty() probe per file
        with open(full, "rb", buffering=0) as handle:
            if info.st_size > cap:
                head = _read_up_to(handle, SNIFF_BYTES)
                if not _may_be_document(head):      # don't read a big binary for nothing
                    document.reason = _too_large(info.st_size, cap)
                    return document
                data = head + _read_up_to(handle, limit + 1 - len(head))
            else:
                data = _read_up_to(handle, min(info.st_size, limit) + 1)
                if len(data) > info.st_size:        # grew since the stat: read on to the limit
                    data += _read_up_to(handle, limit + 1 - len(data))
    except OSError as error:
        return _unreadable(document, error)
    if len(data) > limit:       # grew since the stat
        document.size = len(data)
        document.reason = _too_large(len(data), cap)
        return document
    document.size = len(data)
    document.digest = hashlib.sha256(data).hexdigest()

    if converter is not None:
        converted = _convert(document, converter, data)
        if converted is not None:
            encoded = len(converted.encode("utf-8", "surrogatepass"))
            if encoded > cap:
                document.reason = _too_large(encoded, cap, what="converted text")
                return document
            document.text, document.status = converted, "full"
            return document
        if document.reason:     # the converter failed
            return document
    if len(data) > cap:
        document.reason = _too_large(len(data), cap)
        return document

    if options.default_filters:
        reason = (attributes.reason(relpath) if attributes else None) or name_reason(relpath)
        if reason:
            document.reason = reason
            return document
    text = _decode(document, data)
    if text is None:
        document.reason = "binary"
        return document
    if options.default_filters:
        reason = content_reason(relpath, data, text)
        if reason:
            document.reason = reason
            return document
    document.text, document.status = text, "full"
    return document


def _read_up_to(handle, size: int) -> bytes:
    """Up to `size` bytes, fewer only at the end of the file (a raw read may return less)."""
    chunks = []
    while size > 0:
        chunk = handle.read(size)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _may_be_document(head: bytes) -> bool:
    """Whether a converter could want this file: a PDF, or anything that starts like text
    (HTML, roff). Images, archives and executables are ruled out without reading on."""
    if b"%PDF-" in head[:1024]:
        return True
    return b"\0" not in head and not head.startswith(_MAGIC)


def _symlink_refusal(root: Path, full: str) -> str | None:
    """Why a symlink's target may not be read, or None when it is a file inside SOURCE."""
    target = os.path.realpath(full)
    top = os.path.realpath(root)
    if not (target == top or target.startswith(top.rstrip(os.sep) + os.sep)):
        return "symlink outside SOURCE"
    if not os.path.exists(target):
        return "broken symlink"
    if os.path.isdir(target):
        return "symlink to a directory"
    return None


def _unreadable(document: Document, error: OSError) -> Document:
    detail = error.strerror or type(error).__name__
    document.reason = f"unreadable: {detail}"
    document.warnings.append(f"{document.path}: unreadable ({detail}); listed without its body")
    return document


def _convert(document: Document, converter: Converter, data: bytes) -> str | None:
    try:
        return converter(document.path, data)
    except Exception as error:  # noqa: BLE001 - a broken document must not stop the pack
        document.reason = "conversion failed"
        document.warnings.append(f"{document.path}: could not convert ({error}); "
                                 "listed without its body")
        return None


def _decode(document: Document, data: bytes) -> str | None:
    """The text, BOM stripped, or None for binary data."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return _decode_with(document, data[len(bom):], encoding)
    sample = data[:SNIFF_BYTES]
    if b"\0" in sample or sample.startswith(_MAGIC):
        return None
    control = len(sample) - len(sample.translate(None, _CONTROL))
    if control > _CONTROL_SHARE * len(sample):
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    if control > _CONTROL_SHARE_NOT_UTF8 * len(sample):
        return None
    return _decode_with(document, data, "utf-8")


def _decode_with(document: Document, data: bytes, encoding: str) -> str:
    try:
        return data.decode(encoding)
    except UnicodeDecodeError:
        name = encoding.upper().replace("-LE", " LE").replace("-BE", " BE")
        document.warnings.append(f"{document.path}: not valid {name}; undecodable bytes "
                                 "replaced with U+FFFD")
        return data.decode(encoding, "replace")


def human_size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            break
    return f"{value:.1f} {unit}"


def _too_large(size: int, cap: int, what: str = "") -> str:
    subject = f"{what} " if what else ""
    return f"too large ({subject}{human_size(size)} > {human_size(cap)})"
