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


def test_hundred_page_pdf_converts_in_one_pass(monkeypatch) -> None:
    # Not a benchmark: the book is parsed once and each page's text extracted once.
    import pypdf

    readers: list[object] = []
    extracted: list[int] = []
    open_reader, extract_text = pypdf.PdfReader.__init__, pypdf.PageObject.extract_text

    def counting_open(self, *args, **kwargs):
        readers.append(self)
        open_reader(self, *args, **kwargs)

    def counting_extract(self, *args, **kwargs):
        extracted.append(self.page_number)
        return extract_text(self, *args, **kwargs)

    monkeypatch.setattr(pypdf.PdfReader, "__init__", counting_open)
    monkeypatch.setattr(pypdf.PageObject, "extract_text", counting_extract)
    pages = [[f"Page {p} line {n}: the quick brown fox jumps." for n in range(40)] for p in range(100)]
    text = convert("book.pdf", make_pdf(pages), document_mode=False)
    assert text.count("\n--- page ") == 99 and "--- page 100 ---\nPage 99 line 0:" in text
    assert len(readers) == 1 and extracted == list(range(100))


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


# --- HTML -------------------------------------------------------------------------------------

def _fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def test_html_page_as_readable_text() -> None:
    text = convert("docs/guide.html", _fixture("guide.html"), document_mode=True)
    assert text == """\
# Tool manual

The tool copies files & directories safely. See the website (https://example.org/tool) or options.

## Options <flags>

- Use `--force` to overwrite
- Nested:
  3. three
  4. four
- Last item

  second paragraph

```sh
$ tool --force a b
  indented   line

last <line>
```

Exit codes
| Code | Meaning |
| --- | --- |
| 0 | success \\| ok |
| 1 | failure |

> Quoted text
> second line

term
    definition of term

[image: A diagram]

Copyright 2024
"""
    # What the page hides or decorates never shows.
    for hidden in ("color: red", "not text", "Home", "Docs", "<b>", "&amp;", "&nbsp;", "Tool manual</title>"):
        assert hidden not in text


def test_html_only_in_document_mode_and_sniffed_without_extension() -> None:
    page = b"<!DOCTYPE html>\n<html><body><p>Hello</p></body></html>"
    assert convert("site/index.html", page, document_mode=False) is None
    assert convert("site/index", page, document_mode=True) == "Hello\n"
    assert convert("site/page.xhtml", b'<?xml version="1.0"?>\n<!-- c -->\n<html><p>x</p></html>',
                   document_mode=True) == "x\n"
    assert document_kind("template.j2", b"{% extends 'base.html' %}", document_mode=True) is None


def test_html_tolerates_unclosed_tags_and_declared_charsets() -> None:
    page = ("<html><head><meta charset=iso-8859-1><title>T</title>"
            "<h1>R\u00e9sum\u00e9</h1><p>one<p>two<ul><li>a<li>b<ul><li>c</ul><li>d</ul>"
            "<dl><dt>k<dd>v<dt>k2<dd>v2</dl>").encode("latin-1")
    assert convert("a.htm", page, document_mode=True) == (
        "# R\u00e9sum\u00e9\n\none\n\ntwo\n\n- a\n- b\n  - c\n- d\n\nk\n    v\nk2\n    v2\n")


def test_html_pre_keeps_text_verbatim_with_a_long_enough_fence() -> None:
    page = b"<pre>\n  x = `a`\n  ```\n\n\tdone &lt;ok&gt;</pre><p>after</p>"
    assert convert("a.html", page, document_mode=True) == (
        "````\n  x = `a`\n  ```\n\n\tdone <ok>\n````\n\nafter\n")


def test_html_links_and_layout_tables() -> None:
    page = (b'<table><tr><td><a href="https://x.org/a">A</a> and <a href="rel.html">rel</a>'
            b' <a href="https://x.org/b">https://x.org/b</a></td></tr></table>'
            b'<p><a href="mailto:me@x.org">me@x.org</a> <a href="javascript:void(0)">js</a></p>')
    assert convert("a.html", page, document_mode=True) == (
        "A (https://x.org/a) and rel https://x.org/b\n\nme@x.org js\n")


# --- man pages --------------------------------------------------------------------------------

LS_EXPECTED = """\
LS(1)                           User Commands                            LS(1)

NAME
       ls - list directory contents

SYNOPSIS
       ls [OPTION]... [FILE]...

DESCRIPTION
       List information about the FILEs (the current directory by default). Sort entries \
alphabetically if none of -cftuvSUX nor --sort is specified.

       Mandatory arguments to long options are mandatory for short options too.

       -a, --all
              do not ignore entries starting with .

       -l     use a long listing format

       --color[=WHEN]
              color the output; WHEN can be 'always', 'auto', or 'never'

       -w, --width=COLS
              set output width to COLS.  0 means no limit

       The SIZE argument is an integer and optional unit (example: 10K is 10*1024).

   Exit status:
       0      if OK,

       1      if minor problems (e.g., cannot access subdirectory),

EXAMPLES
       List a directory\u2014the long way:

              $ ls -l /tmp
              total 0
              drwx------  2 root root 40 Apr  1 12:00 systemd-private

       Escapes: backslash \\, em dash \u2014, bullet \u2022, copyright \u00a9, quotes \u201chi\u201d.

SEE ALSO
       Full documentation <https://www.gnu.org/software/coreutils/ls>
       or available locally via: info '(coreutils) ls invocation'

GNU coreutils 9.4                 April 2024                             LS(1)
"""


def test_man_page_renders_like_man() -> None:
    # The layout `man ls` shows (checked against groff with a wide terminal), unwrapped.
    assert convert("man/man1/ls.1", _fixture("ls.1"), document_mode=True) == LS_EXPECTED


def test_compressed_man_pages() -> None:
    import bz2
    import lzma

    source = _fixture("ls.1")
    for name, packed in (("ls.1.gz", gzip.compress(source, mtime=0)), ("ls.1.bz2", bz2.compress(source)),
                         ("ls.1.xz", lzma.compress(source))):
        assert convert(f"man1/{name}", packed, document_mode=True) == LS_EXPECTED
    with pytest.raises(ConversionError, match="corrupt gzip"):
        convert("man1/ls.1.gz", gzip.compress(source)[:-30], document_mode=True)


def test_mdoc_page() -> None:
    text = convert("man/cat.1", _fixture("cat.1"), document_mode=True)
    assert text.startswith("CAT(1)                     General Commands Manual                      CAT(1)\n\n"
                           "NAME\n     cat \u2014 concatenate and print files\n\n"
                           "SYNOPSIS\n     cat [-benstuv] [-o output] [file ...]\n\n")
    assert ("If file is a single dash (\u2018-\u2019) or absent, cat reads from the standard input.\n\n"
            "     The options are as follows:\n\n"
            "     -b      Number the lines, but don't count blank lines.\n\n"
            "     -n      Number the output lines, starting at 1.\n\n"
            "     -o output, --output=output\n"
            "             Write to output instead of the standard output.\n\n"
            "     -v [-e | -t]\n"
            "             Displays non-printing characters so they are visible.\n\n"
            "     Lists may nest:\n     \u2022 first item\n     \u2022 second item\n") in text
    assert "EXIT STATUS\n     The cat utility exits 0 on success, and >0 if an error occurs.\n" in text
    assert "\n           $ cat file1\n\n     A longer display:\n\n           $ cat file1 - file2 > file3\n" \
           "           $ echo done\n" in text
    assert "SEE ALSO\n     head(1), less(1), tail(1)\n" in text
    assert "IEEE Std 1003.1-2008 (\u201cPOSIX.1\u201d) specification." in text
    assert "appeared in Version 1 AT&T UNIX.\n" in text
    assert text.endswith("March 1 2024                           CAT(1)\n")


def test_pod2man_preamble_macros_conditions_and_tables() -> None:
    # pod2man's preamble defines macros, strings inside .ie/.el blocks and a .tr.
    text = convert("man/perl-module.3pm", _fixture("perl-module.3pm"), document_mode=True)
    assert "SYNOPSIS\n         use Foo::Bar;\n         my $bar = Foo::Bar->new(name => \"x\");\n" in text
    assert 'This module does "foo" things -- quickly.\n' in text
    assert "       \u2022   first bullet\n\n       \u2022   second bullet\n\n" \
           "           with a second paragraph\n" in text
    assert "   Methods\n       new(%args)\n           Creates an object. Don't worry.\n" in text
    assert "       Name   Value\n       alpha  1\n       beta   a long text block\n" in text
    for leaked in ("Index:", "diablo", "\\*", "\\f", ".IX", "Vb"):
        assert leaked not in text


def test_roff_escapes_and_requests() -> None:
    page = (
        ".TH T 7\n.SH NAME\n"
        ".\\\" a comment\n"
        "\\fBbold\\fP \\fIital\\fR \\f(CWmono\\fP \\e \\- \\(em \\[u00E9] \\*(lqq\\*(rq \\&.dot "
        "a\\ b \\s-1small\\s0 \\(*a \\['e]\n"
        ".ds Pkg dsv4\n.nr N 3\n"
        "Package \\*[Pkg], \\nN times\\c\n"
        "joined.\n"
        ".de Twice\n\\\\$1 \\\\$1\n..\n.Twice hey\n"
        ".de Loop\n.Loop\n..\n.Loop\n"
        ".if t \\{\\\ntypeset only\n.\\}\n"
        ".ie n nroff yes\n.el nroff no\n"
        ".ig\nignored text\n..\n"
        ".so man7/other.7\n"
    )
    text = convert("t.7", page.encode(), document_mode=True)
    assert text.splitlines()[2:] == [
        "NAME",
        "       bold ital mono \\ - \u2014 \u00e9 \u201cq\u201d .dot a b small \u03b1 \u00e9 "
        "Package dsv4, 3 timesjoined. hey hey nroff yes",
        "       See man7/other.7.",
    ]  # no footer: the page names neither a source nor a date
    for absent in ("comment", "typeset only", "nroff no", "ignored"):
        assert absent not in text


def test_man_pages_only_in_document_mode_and_only_when_roff() -> None:
    ls = _fixture("ls.1")
    assert convert("man/ls.1", ls, document_mode=False) is None
    assert document_kind("man/ls.1", ls, document_mode=True) == "man"
    # Content decides for names that do not look like man pages...
    assert document_kind("doc/ls.roff.in", ls, document_mode=True) == "man"
    # ...and a man-like name is not enough.
    assert document_kind("lib/libz.so.1", b"\x7fELF\x02\x01\x01", document_mode=True) is None
    assert document_kind("notes.1", b"Release notes for 1.0\n", document_mode=True) is None


@pytest.mark.parametrize("name", ["README.md", "guide.rst", "notes.txt", "main.py", "data.json"])
def test_text_formats_are_packed_as_they_are(name: str) -> None:
    data = b"# Title\n\nSome *text* and `code`.\n"
    assert convert(name, data, document_mode=True) is None
    assert convert(name, data, document_mode=False) is None


def test_every_conversion_is_deterministic_and_ends_with_a_newline() -> None:
    documents = {
        "a.pdf": make_pdf(THREE_PAGES),
        "guide.html": _fixture("guide.html"),
        "ls.1": _fixture("ls.1"),
        "cat.1": _fixture("cat.1"),
        "perl-module.3pm": _fixture("perl-module.3pm"),
        "empty.html": b"<html><head><title>x</title></head></html>",
    }
    for name, data in documents.items():
        first = convert(name, data, document_mode=True)
        assert first is not None and first.endswith("\n") and not first.endswith("\n\n"), name
        assert convert(name, bytes(data), document_mode=True).encode() == first.encode(), name


def test_html_drops_hidden_elements_and_labels_icon_links() -> None:
    page = (b'<div hidden><p>secret</p><div>inner</div></div>'
            b'<div style="color: red; display:none">also hidden</div>'
            b'<span aria-hidden="true">icon</span>'
            b'<p>Shown <a href="https://git.example/repo" aria-label="Git repository"><svg></svg></a> '
            b'<a href="https://play.example/?code=' + b"x" * 300 + b'">Run code</a></p>')
    assert convert("a.html", page, document_mode=True) == (
        "Shown Git repository (https://git.example/repo) Run code\n")
    # A hidden element whose end tag is implied must not hide the rest of the page.
    for unclosed in (b"<div><p hidden>x</div><p>shown</p>", b"<p hidden>x<p>shown",
                     b"<ul><li hidden>x<li>shown</ul>", b"<div hidden><p>x<p>y</div>shown"):
        assert convert("a.html", unclosed, document_mode=True).strip("- \n") == "shown"


def test_pdf_table_of_contents_leaders_are_shortened() -> None:
    text = convert("a.pdf", make_pdf([["1 Introduction . . . . . . . . . . . 1", "Version 2.0.1"]]),
                   document_mode=False)
    assert text == "--- page 1 ---\n1 Introduction \u2026 1\nVersion 2.0.1\n"


@pytest.mark.parametrize(
    "definitions",
    [".de X\n.X\n.X\n..\n.X\n", ".ds a \\*a\\*a\n\\*a\n", ".de X\n.X\n..\n.X\n"],
    ids=["doubling-macro", "doubling-string", "recursive-macro"],
)
def test_self_referencing_roff_stops(definitions: str, monkeypatch) -> None:
    # A self-doubling definition would take 2**40 steps; the per-page expansion budget (50,000
    # today, far above any real page) bounds the work. Counting interpreter steps checks that
    # bound, and stops a runaway here rather than hanging the suite.
    from ingest import manuals_roff

    ceiling = 100_000
    steps = 0

    def counted(method):
        def step(self, *args, **kwargs):
            nonlocal steps
            steps += 1
            if steps > ceiling:
                raise AssertionError(f"roff expansion ran past {ceiling:,} steps")
            return method(self, *args, **kwargs)
        return step

    for name in ("expand", "call_macro"):
        monkeypatch.setattr(manuals_roff._Renderer, name, counted(getattr(manuals_roff._Renderer, name)))
    text = convert("x.1", f".TH X 1\n{definitions}still here\n".encode(), document_mode=True)
    assert "still here" in text and steps <= ceiling


def test_html_generated_documentation_furniture() -> None:
    # The shape Sphinx gives a page: related-links bar, permalinks, definition lists of <p>s.
    page = (b'<div class="related" role="navigation"><ul><li><a href="index.html">index</a></li>'
            b'</ul></div><section id="idle"><h1>IDLE<a class="headerlink" href="#idle" '
            b'title="Link to this heading">\xc2\xb6</a></h1><dl class="simple">'
            b"<dt>New File</dt><dd><p>Create a new file editing window.</p></dd>"
            b"<dt>Open\xe2\x80\xa6</dt><dd><p>Open an existing file.</p><p>Twice.</p></dd></dl></section>")
    assert convert("idle.html", page, document_mode=True) == (
        "# IDLE\n\nNew File\n    Create a new file editing window.\n\n"
        "Open\u2026\n    Open an existing file.\n\n    Twice.\n")


def test_lone_surrogates_never_reach_the_pack() -> None:
    for name, data in (("a.html", b"<p>a &#xD800; b</p>"), ("x.1", b".TH X 1\n.SH N\na \\[uD800] b\n")):
        text = convert(name, data, document_mode=True)
        text.encode("utf-8")  # raises on a lone surrogate
        assert "a " in text and " b" in text
