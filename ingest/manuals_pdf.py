"""PDF to text with pypdf: one marker line per page, bookmarks as headings.

Format (documented for readers of a pack, and stable):

    --- page 1 ---
    # Chapter title            (bookmarks pointing at this page, `#` per outline depth)
    text of page 1

    --- page 2 (printed "ii") ---

Page numbers are physical and 1-based; the printed label follows when the PDF defines page
labels that differ from it. A page without text keeps its marker, so numbering never drifts.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Iterator

from ingest.errors import ConversionError

_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TRAILING_SPACE = re.compile(r"[ \t\u00a0]+$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")
# Tables of contents fill the gap to the page number with spaced dots, a token each.
_DOT_LEADER = re.compile(r" ?\.(?: \.){4,} ?")


def pdf_to_text(data: bytes) -> str:
    with _quiet_pypdf():
        reader = _open(data)
        try:
            pages = list(reader.pages)
        except Exception as exc:  # pypdf raises many kinds on a damaged page tree
            raise _unreadable(exc) from exc
        if not pages:
            raise ConversionError("PDF has no pages", "check the file, or exclude it")
        labels = _printed_labels(reader, len(pages))
        headings = _outline_headings(reader)
        blocks: list[str] = []
        found_text = False
        for index, page in enumerate(pages):
            lines = [_marker(index, labels)]
            lines.extend(headings.get(index, ()))
            text = _page_text(page)
            found_text = found_text or bool(text)
            if text:
                lines.append(text)
            blocks.append("\n".join(lines))
    if not found_text:
        raise ConversionError(
            "PDF has no text layer (scanned pages?)",
            "run OCR on it first (e.g. ocrmypdf), then pack the result",
        )
    return "\n\n".join(blocks) + "\n"


@contextlib.contextmanager
def _quiet_pypdf() -> Iterator[None]:
    """pypdf logs and warns about every quirk of a damaged file; the pack's stderr is for us."""
    logger = logging.getLogger("pypdf")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(previous)


def _open(data: bytes):  # -> pypdf.PdfReader (kept unannotated: pypdf imports lazily)
    from pypdf import PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError

    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            # Many PDFs are encrypted only to restrict printing or copying, with an empty
            # user password; those open without asking anyone for anything.
            from pypdf import PasswordType

            if reader.decrypt("") == PasswordType.NOT_DECRYPTED:
                raise _needs_password()
        return reader
    except ConversionError:
        raise
    except FileNotDecryptedError as exc:
        raise _needs_password() from exc
    except DependencyError as exc:
        raise ConversionError(
            f"encrypted PDF that needs an extra package to read ({_one_line(exc)})",
            "pip install cryptography",
        ) from exc
    except Exception as exc:  # a damaged file can fail in any of pypdf's parsing paths
        raise _unreadable(exc) from exc


def _needs_password() -> ConversionError:
    return ConversionError(
        "encrypted PDF: it needs a password to open",
        "decrypt it first, e.g. `qpdf --decrypt --password=PASSWORD in.pdf out.pdf`",
    )


def _unreadable(exc: Exception) -> ConversionError:
    return ConversionError(
        f"unreadable PDF ({type(exc).__name__}: {_one_line(exc)})",
        "check that the file is complete, or exclude it",
    )


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text[:200] if text else "no details"


def _marker(index: int, labels: list[str] | None) -> str:
    number = str(index + 1)
    if labels is not None and labels[index] and labels[index] != number:
        return f'--- page {number} (printed "{labels[index]}") ---'
    return f"--- page {number} ---"


def _printed_labels(reader, page_count: int) -> list[str] | None:
    """Page labels when the PDF defines them (pypdf otherwise invents "1", "2", ...)."""
    try:
        if "/PageLabels" not in reader.trailer["/Root"]:
            return None
        labels = [" ".join(str(label).split()) for label in reader.page_labels]
    except Exception:  # labels are a nicety; a damaged label tree just goes unused
        return None
    return labels if len(labels) == page_count else None


def _outline_headings(reader) -> dict[int, list[str]]:
    """Bookmarks as Markdown headings, grouped by the page (0-based) they point to."""
    headings: dict[int, list[str]] = {}

    def walk(items: list, depth: int) -> None:
        for item in items:
            if isinstance(item, list):
                walk(item, depth + 1)
                continue
            try:
                page = reader.get_destination_page_number(item)
                title = " ".join(str(item.title).split())
            except Exception:  # a bookmark to nowhere is skipped, not fatal
                continue
            if page is not None and page >= 0 and title:
                headings.setdefault(page, []).append("#" * min(depth, 6) + " " + title)

    try:
        walk(reader.outline, 1)
    except Exception:
        return {}
    return headings


def _page_text(page) -> str:
    try:
        text = page.extract_text() or ""
    except Exception:  # one damaged content stream must not lose the rest of the book
        return "(the text of this page could not be extracted)"
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL_CHARS.sub("", text)
    text = _TRAILING_SPACE.sub("", text)
    text = _BLANK_RUNS.sub("\n\n", text)
    text = _DOT_LEADER.sub(" \u2026 ", text)
    return text.strip("\n")
