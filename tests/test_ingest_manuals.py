"""Documents to text: PDF (always), HTML and man pages (document mode), and their cache."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pytest

from ingest.conversion_cache import ConversionCache
from ingest.errors import ConversionError, IngestError
from ingest.manuals import convert, document_kind

FIXTURES = Path(__file__).parent / "fixtures" / "manuals"


# --- a real PDF, written by hand: text content streams and exact xref offsets -------------

def _pdf_string(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def make_pdf(pages: list[list[str]]) -> bytes:
    """A valid PDF 1.4 whose page i shows pages[i], one text line per entry (Helvetica)."""
    page_ids = [4 + 2 * i for i in range(len(pages))]
    objects = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: ("<< /Type /Pages /Kids [" + " ".join(f"{p} 0 R" for p in page_ids)
            + f"] /Count {len(pages)} >>").encode(),
        3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    }
    for page_id, lines in zip(page_ids, pages):
        operators = ["BT", "/F1 12 Tf", "14 TL", "72 720 Td"]
        operators += [f"({_pdf_string(line)}) Tj T*" for line in lines]
        operators.append("ET")
        stream = "\n".join(operators).encode("latin-1")
        objects[page_id] = (
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {page_id + 1} 0 R >>"
        ).encode()
        objects[page_id + 1] = b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream"
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets: dict[int, int] = {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += b"%d 0 obj\n" % number + objects[number] + b"\nendobj\n"
    xref_at = len(out)
    size = max(objects) + 1
    out += b"xref\n0 %d\n0000000000 65535 f \n" % size
    for number in range(1, size):
        out += b"%010d 00000 n \n" % offsets[number]
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (size, xref_at)
    return bytes(out)


THREE_PAGES = [
    ["Installation guide", "Run the installer (as root)."],
    ["Configuration", "Edit /etc/tool.conf and restart."],
    ["Troubleshooting", "Caf\u00e9 logs live in /var/log/tool."],
]


def _rewrite(pdf: bytes, edit) -> bytes:
    """Let pypdf's writer add features (bookmarks, labels, encryption) to a hand-made PDF."""
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf)))
    edit(writer)
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def test_pdf_text_with_page_markers() -> None:
    text = convert("docs/guide.pdf", make_pdf(THREE_PAGES), document_mode=False)
    assert text == (
        "--- page 1 ---\nInstallation guide\nRun the installer (as root).\n\n"
        "--- page 2 ---\nConfiguration\nEdit /etc/tool.conf and restart.\n\n"
        "--- page 3 ---\nTroubleshooting\nCaf\u00e9 logs live in /var/log/tool.\n"
    )


def test_pdf_detected_by_magic_not_by_name() -> None:
    pdf = make_pdf(THREE_PAGES)
    assert document_kind("blob.bin", pdf, document_mode=False) == "pdf"
    assert convert("blob.bin", pdf, document_mode=True).startswith("--- page 1 ---\n")
    # A name ending in .pdf is not enough: a Git LFS pointer is text, packed as it is.
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n"
    assert convert("manual.pdf", pointer, document_mode=True) is None


def test_pdf_empty_page_keeps_its_marker() -> None:
    text = convert("a.pdf", make_pdf([["one"], [], ["three"]]), document_mode=False)
    assert text == "--- page 1 ---\none\n\n--- page 2 ---\n\n--- page 3 ---\nthree\n"


def test_pdf_bookmarks_become_headings_and_labels_show() -> None:
    from pypdf.constants import PageLabelStyle

    def edit(writer) -> None:
        part = writer.add_outline_item(title="Part I: Setup", page_number=0)
        writer.add_outline_item(title="Configuring  the\ntool", page_number=1, parent=part)
        writer.set_page_label(0, 1, style=PageLabelStyle.LOWERCASE_ROMAN)
        writer.set_page_label(2, 2, style=PageLabelStyle.DECIMAL, start=1)

    text = convert("a.pdf", _rewrite(make_pdf(THREE_PAGES), edit), document_mode=False)
    assert text.startswith('--- page 1 (printed "i") ---\n# Part I: Setup\nInstallation guide\n')
    assert '\n--- page 2 (printed "ii") ---\n## Configuring the tool\nConfiguration\n' in text
    assert '\n--- page 3 (printed "1") ---\nTroubleshooting\n' in text


def test_encrypted_pdf_raises_typed_error() -> None:
    locked = _rewrite(make_pdf(THREE_PAGES), lambda w: w.encrypt("s3cret", algorithm="AES-128"))
    with pytest.raises(ConversionError, match="needs a password") as caught:
        convert("locked.pdf", locked, document_mode=False)
    assert isinstance(caught.value, IngestError) and "qpdf" in caught.value.hint


def test_pdf_with_only_an_owner_password_opens() -> None:
    restricted = _rewrite(
        make_pdf(THREE_PAGES), lambda w: w.encrypt("", owner_password="owner", algorithm="RC4-128")
    )
    assert "Edit /etc/tool.conf and restart." in convert("r.pdf", restricted, document_mode=False)


@pytest.mark.parametrize(
    "damaged",
    [b"%PDF-1.4\nthis is not a pdf at all\n", make_pdf(THREE_PAGES)[:200]],
    ids=["garbage", "truncated"],
)
def test_broken_pdf_raises_typed_error(damaged: bytes) -> None:
    with pytest.raises(ConversionError, match="PDF"):
        convert("broken.pdf", damaged, document_mode=False)


def test_pdf_without_text_layer_is_reported() -> None:
    with pytest.raises(ConversionError, match="no text layer"):
        convert("scan.pdf", make_pdf([[], []]), document_mode=False)


def test_hundred_page_pdf_converts_quickly() -> None:
    import time

    pages = [[f"Page {p} line {n}: the quick brown fox jumps." for n in range(40)] for p in range(100)]
    started = time.perf_counter()
    text = convert("book.pdf", make_pdf(pages), document_mode=False)
    elapsed = time.perf_counter() - started
    assert text.count("\n--- page ") == 99 and "--- page 100 ---\nPage 99 line 0:" in text
    assert elapsed < 10, f"100 pages took {elapsed:.1f} s"


# --- the conversion cache -------------------------------------------------------------------

class CountingConverter:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, relpath: str, data: bytes, *, document_mode: bool) -> str | None:
        self.calls.append(relpath)
        return convert(relpath, data, document_mode=document_mode)


def _cache_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*.json"))


def test_cache_hit_does_not_convert_again(tmp_path: Path) -> None:
    folder = {f"manuals/part{i}.pdf": make_pdf([[f"Part {i}"], ["more"]]) for i in range(3)}
    converter = CountingConverter()
    first = {p: ConversionCache(tmp_path / "c").get_or_convert(p, d, True, converter)
             for p, d in folder.items()}
    assert len(converter.calls) == 3 and len(_cache_files(tmp_path / "c")) == 3

    again = CountingConverter()
    cache = ConversionCache(tmp_path / "c")  # a new process: only the disk is shared
    second = {p: cache.get_or_convert(p, d, True, again) for p, d in folder.items()}
    assert again.calls == [] and second == first
    assert first["manuals/part1.pdf"].startswith("--- page 1 ---\nPart 1\n")
    # Same bytes under another name (or in the other mode) is the same PDF: still a hit.
    assert cache.get_or_convert("copy.pdf", folder["manuals/part1.pdf"], False, again) == \
        first["manuals/part1.pdf"] and again.calls == []


def test_cache_misses_when_content_or_mode_changes(tmp_path: Path) -> None:
    cache = ConversionCache(tmp_path)
    converter = CountingConverter()
    html = b"<html><body><h1>Title</h1><p>Body</p></body></html>"
    assert cache.get_or_convert("a.html", html, True, converter) == "# Title\n\nBody\n"
    assert cache.get_or_convert("a.html", html + b" ", True, converter) == "# Title\n\nBody\n"
    assert len(converter.calls) == 2
    # Outside document mode HTML is not a document: no conversion is cached or served.
    assert cache.get_or_convert("a.html", html, False, converter) is None
    assert len(_cache_files(tmp_path)) == 2


def test_cache_recovers_from_corrupt_entries(tmp_path: Path) -> None:
    pdf = make_pdf(THREE_PAGES)
    cache = ConversionCache(tmp_path)
    expected = cache.get_or_convert("g.pdf", pdf, False, CountingConverter())
    [entry] = _cache_files(tmp_path)
    good = entry.read_bytes()
    for damage in (good[: len(good) // 2], b"\x00\xff garbage",
                   good.replace(b"Installation", b"Instalation")):
        entry.write_bytes(damage)
        converter = CountingConverter()
        assert cache.get_or_convert("g.pdf", pdf, False, converter) == expected
        assert converter.calls == ["g.pdf"]
        assert json.loads(entry.read_bytes())["text"] == expected  # rewritten whole
    assert not list(tmp_path.rglob(".tmp-*"))


def test_cache_remembers_failures(tmp_path: Path) -> None:
    locked = _rewrite(make_pdf(THREE_PAGES), lambda w: w.encrypt("pw", algorithm="AES-128"))
    cache = ConversionCache(tmp_path)
    for expected_calls in (1, 0):
        converter = CountingConverter()
        with pytest.raises(ConversionError, match="needs a password") as caught:
            cache.get_or_convert("locked.pdf", locked, False, converter)
        assert len(converter.calls) == expected_calls and "qpdf" in caught.value.hint


def test_cache_passes_non_documents_through(tmp_path: Path) -> None:
    converter = CountingConverter()
    assert ConversionCache(tmp_path).get_or_convert("main.py", b"print(1)\n", True, converter) is None
    assert converter.calls == ["main.py"] and _cache_files(tmp_path) == []
