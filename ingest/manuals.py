"""Documents as readable text for the packer: PDF always, HTML and man pages in document mode.

`convert()` returns None for anything that is not such a document (source code, Markdown,
reStructuredText, plain text): the reader packs those as they are. A document that cannot be
read raises ConversionError, whose message is the reason the caller lists the file with.

Output contract, for every kind: the same bytes give byte-identical text, which ends with a
newline. Lines are not wrapped (a model reads long lines as well as short ones, and wrapping
only costs tokens).

- PDF: the text of each page after a marker line with its 1-based physical page number,
  `--- page 3 ---`, or `--- page 5 (printed "iii") ---` where the PDF labels its pages
  differently. Bookmarks (the PDF outline) become Markdown `#` headings under the marker of
  the page they point to. See manuals_pdf.py.
- HTML: Markdown-like text: `#` headings, `- ` lists, fenced `<pre>` blocks, `|` table rows,
  links as `text (url)` when the url is absolute. See manuals_html.py.
- man pages (man and mdoc roff, gzip/bzip2/xz compressed too): laid out like `man` prints
  them (section headings at column 0, text indented 7, tagged paragraphs), without fonts.
  See manuals_roff.py.
"""

from __future__ import annotations

import functools
import re
from typing import Literal

from ingest.errors import ConversionError

DocumentKind = Literal["pdf", "html", "man"]

# Bump a kind's version whenever its output changes: cached conversions keyed by the old
# version are then ignored.
_RENDERER_VERSIONS: dict[str, str] = {"pdf": "pdf-1", "html": "html-1", "man": "man-1"}

_HTML_SUFFIXES = (".html", ".htm", ".xhtml")
# ls.1, printf.3p, openssl.1ssl, foo.man, bar.mdoc, optionally compressed
_MAN_NAME = re.compile(r"\.(?:[1-9][a-z0-9]{0,8}|man|mdoc|roff)(?:\.(?:gz|bz2|xz))?$", re.IGNORECASE)
_COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz"}
# A man page larger than this after decompression is not a man page (or is a zip bomb).
_MAX_MAN_BYTES = 16 << 20
# Requests a man page typically starts with, before any text.
_ROFF_START = re.compile(r"^[.'][ \t]*(TH|Dd|Dt|Os|SH|Sh|so|de|ds|nr|ie|if|ig|tr|pc|ad|nh|hy|ll|ft|in)\b")


def convert(relpath: str, data: bytes, *, document_mode: bool) -> str | None:
    """Readable text of a document, or None when the bytes are not one (pack them as they are)."""
    kind = document_kind(relpath, data, document_mode=document_mode)
    if kind is None:
        return None
    if kind == "pdf":
        from ingest.manuals_pdf import pdf_to_text  # pypdf costs an import only when needed

        text = pdf_to_text(data)
    elif kind == "html":
        from ingest.manuals_html import html_to_text

        text = html_to_text(data)
    else:
        from ingest.manuals_roff import roff_to_text

        text = roff_to_text(_man_source(data))
    # A document can name a lone surrogate (&#xD800;, \[uD800]); the pack must be valid UTF-8.
    return text.encode("utf-8", errors="replace").decode("utf-8")


def document_kind(relpath: str, data: bytes, *, document_mode: bool) -> DocumentKind | None:
    """Which converter `convert` would use, cheaply (no conversion, no decompression of text)."""
    name = relpath.rsplit("/", 1)[-1].lower()
    if data.startswith(b"%PDF-") or (name.endswith(".pdf") and b"%PDF-" in data[:1024]):
        return "pdf"
    if not document_mode:
        return None
    if name.endswith(_HTML_SUFFIXES) or _sniff_html(data):
        return "html"
    if _MAN_NAME.search(name):
        if _compression(data) is not None:
            return "man"  # decided by name; a broken archive is reported by convert
        if _sniff_roff(data, strict=False):
            return "man"
    elif _sniff_roff(data, strict=True):
        return "man"
    return None


@functools.lru_cache(maxsize=None)
def converter_version(kind: DocumentKind) -> str:
    """Identifies the converter's output format; part of every cache key."""
    if kind == "pdf":
        from importlib.metadata import version

        # pypdf's text extraction changes between releases.
        return f"{_RENDERER_VERSIONS['pdf']}+pypdf-{version('pypdf')}"
    return _RENDERER_VERSIONS[kind]


def _sniff_html(data: bytes) -> bool:
    head = data[:2048].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<?xml"):
        head = head[head.find(b"?>") + 2 :].lstrip()
    while head.startswith(b"<!--"):
        end = head.find(b"-->")
        if end < 0:
            return False
        head = head[end + 3 :].lstrip()
    return head.startswith((b"<!doctype html", b"<html"))


def _sniff_roff(data: bytes, *, strict: bool) -> bool:
    """Does the text start like a man page? `strict`: the file's name does not say it is one,
    so only .TH / .Dd (after comments and blank lines) count."""
    if b"\x00" in data[:8192]:
        return False
    text = data[:8192].decode("latin-1")
    for line in text.splitlines()[:400]:
        stripped = line.strip()
        if not stripped or stripped.startswith(('.\\"', "'\\\"", '\\"', ".\\#")) or stripped == ".":
            continue
        if strict:
            return re.match(r"^\.[ \t]*(TH|Dd)\b", stripped) is not None
        if _ROFF_START.match(stripped):
            return True
        break
    # Named like a man page: a title or section request anywhere near the top will do
    # (some pages start with `.lf` lines or stray text).
    return not strict and re.search(r"^[.'][ \t]*(TH|Dd|SH|Sh)\b", text, re.MULTILINE) is not None


def _compression(data: bytes) -> str | None:
    for magic, name in _COMPRESSED_MAGIC.items():
        if data.startswith(magic):
            return name
    return None


def _man_source(data: bytes) -> str:
    """The roff text of a man page: decompressed, decoded (UTF-8, else Latin-1 as groff does)."""
    compression = _compression(data)
    if compression is not None:
        data = _decompress(data, compression)
        if not _sniff_roff(data, strict=False):
            raise ConversionError(
                f"the {compression} archive does not hold a man page",
                "exclude it, or unpack it if it is some other kind of document",
            )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _decompress(data: bytes, compression: str) -> bytes:
    import bz2
    import gzip
    import io
    import lzma

    source = io.BytesIO(data)
    stream_of = {"gzip": lambda: gzip.GzipFile(fileobj=source), "bzip2": lambda: bz2.BZ2File(source),
                 "xz": lambda: lzma.LZMAFile(source)}[compression]
    try:
        with stream_of() as stream:
            out = stream.read(_MAX_MAN_BYTES + 1)
    except (OSError, EOFError, lzma.LZMAError, ValueError) as exc:
        raise ConversionError(
            f"corrupt {compression} data ({exc})", "check the file, or exclude it"
        ) from exc
    if len(out) > _MAX_MAN_BYTES:
        raise ConversionError(
            f"unpacks to more than {_MAX_MAN_BYTES >> 20} MiB, too large for a man page",
            "exclude it",
        )
    return out
