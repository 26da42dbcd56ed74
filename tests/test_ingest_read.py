"""Reading one file: binary sniffing, decoding, size cap, noise filters, attributes."""

from __future__ import annotations

import base64
import builtins
import hashlib
import io
import os
import subprocess
from pathlib import Path

import git
import pytest

from ingest.noise import load_attributes
from ingest.read import read_document
from ingest.select import select
from ingest.types import ReadOptions, SelectOptions

DEFAULT = ReadOptions()
NO_FILTERS = ReadOptions(default_filters=False)


@pytest.fixture(autouse=True)
def git_identity(tmp_path_factory, monkeypatch) -> None:
    config = tmp_path_factory.mktemp("gitconfig") / "config"
    config.write_text("[user]\n\tname = Test\n\temail = test@example.com\n")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(config))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")


def put(root: Path, name: str, content: str | bytes) -> str:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return name


def read(root: Path, name: str, content: str | bytes, options: ReadOptions = DEFAULT, **kw):
    return read_document(root, put(root, name, content), options, **kw)


# --------------------------------------------------------------------------- decoding


def test_utf8_is_kept_exactly(tmp_path: Path) -> None:
    raw = "naïve\r\nline two\n\tno final newline → ok".encode("utf-8")
    document = read(tmp_path, "a.txt", raw)
    assert document.status == "full" and document.reason == ""
    assert document.text == raw.decode("utf-8")
    assert document.size == len(raw)
    assert document.digest == hashlib.sha256(raw).hexdigest()
    assert document.warnings == []


def test_utf8_bom_is_stripped(tmp_path: Path) -> None:
    document = read(tmp_path, "bom.py", b"\xef\xbb\xbfprint('hi')\n")
    assert document.text == "print('hi')\n"
    assert document.size == 15 and document.warnings == []


@pytest.mark.parametrize("encoding,bom", [("utf-16-le", b"\xff\xfe"), ("utf-16-be", b"\xfe\xff"),
                                          ("utf-32-le", b"\xff\xfe\x00\x00")])
def test_utf16_and_utf32_with_bom(tmp_path: Path, encoding: str, bom: bytes) -> None:
    text = "Grüße aus Köln\r\n€ 10\n"
    raw = bom + text.encode(encoding)
    document = read(tmp_path, "wide.txt", raw)
    assert document.status == "full"
    assert document.text == text
    assert document.digest == hashlib.sha256(raw).hexdigest()


def test_latin1_is_decoded_with_replacements_and_a_warning(tmp_path: Path) -> None:
    document = read(tmp_path, "old.c", "/* café */\nint x;\n".encode("latin-1"))
    assert document.status == "full"
    assert document.text == "/* caf\ufffd */\nint x;\n"
    assert document.warnings == ["old.c: not valid UTF-8; undecodable bytes replaced with U+FFFD"]


def test_broken_utf16_gets_a_warning_not_a_crash(tmp_path: Path) -> None:
    document = read(tmp_path, "odd.txt", b"\xff\xfe" + "ok".encode("utf-16-le") + b"\x00\xd8")
    assert document.status == "full"
    assert document.text.startswith("ok") and "\ufffd" in document.text
    assert "not valid UTF-16 LE" in document.warnings[0]


# --------------------------------------------------------------------------- binary


def test_nul_bytes_mean_binary(tmp_path: Path) -> None:
    document = read(tmp_path, "data.bin", b"text then \x00 a NUL")
    assert (document.status, document.reason, document.text) == ("listed", "binary", None)
    assert document.size == 17 and document.digest


def test_magic_numbers_mean_binary_even_without_nul(tmp_path: Path) -> None:
    for name, head in [("x.png", b"\x89PNG\r\n\x1a\n"), ("x.gif", b"GIF89a"),
                       ("x.pdf", b"%PDF-1.7\n"), ("x.gz", b"\x1f\x8b\x08")]:
        document = read(tmp_path, name, head + b"plain ascii afterwards\n" * 20)
        assert document.reason == "binary", name


def test_control_bytes_mean_binary(tmp_path: Path) -> None:
    noisy = bytes(range(1, 9)) * 200 + b"some text"
    assert read(tmp_path, "ctl.dat", noisy).reason == "binary"
    # escape sequences (coloured logs) and backspaces (overstruck man pages) are text
    log = b"\x1b[31merror\x1b[0m: failed\n" * 50 + b"B\bBo\bol\bld\bd\n"
    assert read(tmp_path, "build.out", log).status == "full"


def test_binary_is_listed_even_without_default_filters(tmp_path: Path) -> None:
    assert read(tmp_path, "x.bin", b"\x00\x01", NO_FILTERS).reason == "binary"


# --------------------------------------------------------------------------- noise


@pytest.mark.parametrize("name", ["package-lock.json", "yarn.lock", "pnpm-lock.yaml",
                                  "Cargo.lock", "poetry.lock", "Pipfile.lock", "composer.lock",
                                  "Gemfile.lock", "go.sum", "uv.lock", "sub/dir/Cargo.lock"])
def test_lock_files(tmp_path: Path, name: str) -> None:
    document = read(tmp_path, name, '{"lockfileVersion": 3}\n')
    assert (document.status, document.reason, document.text) == ("listed", "lock file", None)
    assert document.digest and document.size == 23
    assert read_document(tmp_path, name, NO_FILTERS).status == "full"


def test_lock_like_names_are_not_lock_files(tmp_path: Path) -> None:
    assert read(tmp_path, "lock.py", "import threading\n").status == "full"
    assert read(tmp_path, "Cargo.toml", "[package]\n").status == "full"


def test_minified_by_name_and_by_long_lines(tmp_path: Path) -> None:
    assert read(tmp_path, "app.min.js", "var a=1;\n").reason == "minified"
    assert read(tmp_path, "style.min.css", "a{b:c}\n").reason == "minified"
    assert read(tmp_path, "app.js.map", '{"version":3}\n').reason == "minified"
    bundle = "/*! v1 */\n" + "".join(f"function f{i}(a,b){{return a+b*{i}}};" for i in range(400))
    assert read(tmp_path, "bundle.js", bundle).reason == "minified"
    assert read(tmp_path, "bundle.js", bundle, NO_FILTERS).status == "full"


def test_long_lines_that_are_not_minified(tmp_path: Path) -> None:
    # one long fixture line in an otherwise normal source file
    source = "def f():\n    return 1\n" * 200 + "DATA = '" + "x y " * 400 + "'\n"
    assert read(tmp_path, "mod.py", source).status == "full"
    # prose written one paragraph per line
    prose = ("A long paragraph of prose that goes on. " * 40 + "\n\n") * 5
    assert read(tmp_path, "README.md", prose).status == "full"


def test_svg_by_name_and_by_content(tmp_path: Path) -> None:
    svg = '<svg xmlns="http://www.w3.org/2000/svg"><path d="M0 0"/></svg>\n'
    assert read(tmp_path, "logo.svg", svg).reason == "svg"
    declared = ('<?xml version="1.0" encoding="UTF-8"?>\n<!-- drawn -->\n'
                '<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "x.dtd">\n' + svg)
    assert read(tmp_path, "diagram.xml", declared).reason == "svg"
    assert read(tmp_path, "page.html", "<html><body>" + svg + "</body></html>\n").status == "full"
    assert read(tmp_path, "logo.svg", svg, NO_FILTERS).status == "full"


def test_base64_blobs(tmp_path: Path) -> None:
    payload = base64.b64encode(os.urandom(6000)).decode("ascii")
    data_uri = '{"icon": "data:image/png;base64,' + payload + '"}\n'
    assert read(tmp_path, "icons.json", data_uri).reason == "base64 blob"
    # hashes and short tokens are not blobs
    digests = "".join(f"{hashlib.sha512(str(i).encode()).hexdigest()}  file{i}\n"
                      for i in range(100))
    assert read(tmp_path, "SHA512SUMS", digests).status == "full"
    # one embedded blob in a large source file does not make the file a blob
    source = "x = 1\n" * 2000 + f"ICON = '{payload[:2000]}'\n"
    assert read(tmp_path, "icons.py", source).status == "full"


# --------------------------------------------------------------------------- attributes


ATTRIBUTE_TREE = {
    ".gitattributes": "\n".join([
        "gen/** linguist-generated",
        "*.pb.go linguist-generated=true",
        "vendor/** linguist-vendored",
        "vendor/ours.js -linguist-vendored",
        "third_party/** linguist-vendored=false",
        "docs/ linguist-generated",       # a directory pattern matches nothing in attributes
        "",
    ]),
    "gen/a.py": "x = 1\n",
    "gen/deep/b.py": "x = 1\n",
    "api/service.pb.go": "package api\n",
    "vendor/lib.js": "var a;\n",
    "vendor/ours.js": "var b;\n",
    "third_party/c.py": "x\n",
    "docs/guide.md": "# guide\n",
    "src/main.py": "print()\n",
    "src/.gitattributes": "*.py linguist-generated\nmain.py !linguist-generated\n",
    "src/made.py": "x\n",
}
ATTRIBUTE_REASONS = {
    "gen/a.py": "linguist-generated",
    "gen/deep/b.py": "linguist-generated",
    "api/service.pb.go": "linguist-generated",
    "vendor/lib.js": "linguist-vendored",
    "src/made.py": "linguist-generated",
}


def reasons_for(root: Path, options: SelectOptions) -> dict[str, str]:
    selection = select(root, options)
    attributes = load_attributes(selection)
    documents = [read_document(selection.root, path, DEFAULT, attributes=attributes)
                 for path in selection.paths]
    assert all(d.status == "full" for d in documents if d.path not in ATTRIBUTE_REASONS)
    return {d.path: d.reason for d in documents if d.status == "listed"}


def test_linguist_attributes_inside_git(tmp_path: Path) -> None:
    for name, content in ATTRIBUTE_TREE.items():
        put(tmp_path, name, content)
    repo = git.Repo.init(tmp_path)
    repo.git.add(A=True)
    repo.git.commit("-q", "-m", "init")
    assert reasons_for(tmp_path, SelectOptions()) == ATTRIBUTE_REASONS


def test_linguist_attributes_outside_git_match_git(tmp_path: Path) -> None:
    for name, content in ATTRIBUTE_TREE.items():
        put(tmp_path, name, content)
    assert reasons_for(tmp_path, SelectOptions()) == ATTRIBUTE_REASONS
    git.Repo.init(tmp_path)     # the same tree under git: the parser agrees with git itself
    assert reasons_for(tmp_path, SelectOptions(use_git=False)) == ATTRIBUTE_REASONS
    assert reasons_for(tmp_path, SelectOptions()) == ATTRIBUTE_REASONS


def test_attribute_patterns_follow_wildmatch(tmp_path: Path) -> None:
    rules = "\n".join(["**/fixtures/*.json linguist-generated", "/root-only.txt linguist-generated",
                       "a?c.txt linguist-vendored", "[xy].md linguist-vendored",
                       '"with space.txt" linguist-generated', ""])
    files = {".gitattributes": rules, "t/fixtures/x.json": "{}", "fixtures/y.json": "{}",
             "t/fixtures/deep/z.json": "{}", "root-only.txt": "x", "d/root-only.txt": "x",
             "d/abc.txt": "x", "abbc.txt": "x", "x.md": "x", "z.md": "x",
             "with space.txt": "x"}
    for name, content in files.items():
        put(tmp_path, name, content)
    outside = load_attributes(select(tmp_path))
    expected = {"t/fixtures/x.json": "linguist-generated", "fixtures/y.json": "linguist-generated",
                "root-only.txt": "linguist-generated", "d/abc.txt": "linguist-vendored",
                "x.md": "linguist-vendored", "with space.txt": "linguist-generated"}
    assert {p: outside.reason(p) for p in files if outside.reason(p)} == expected
    git.Repo.init(tmp_path)
    inside = load_attributes(select(tmp_path))
    assert {p: inside.reason(p) for p in files if inside.reason(p)} == expected


def test_attributes_are_ignored_without_default_filters(tmp_path: Path) -> None:
    put(tmp_path, ".gitattributes", "*.py linguist-generated\n")
    put(tmp_path, "a.py", "x\n")
    attributes = load_attributes(select(tmp_path))
    assert read_document(tmp_path, "a.py", DEFAULT, attributes=attributes).reason == \
        "linguist-generated"
    assert read_document(tmp_path, "a.py", NO_FILTERS, attributes=attributes).status == "full"


# --------------------------------------------------------------------------- size, errors


def test_size_cap(tmp_path: Path) -> None:
    options = ReadOptions(max_file_bytes=1024)
    document = read(tmp_path, "big.txt", "x" * 3000, options)
    assert (document.status, document.text) == ("listed", None)
    assert document.reason == "too large (2.9 KiB > 1.0 KiB)"
    assert document.size == 3000
    assert read(tmp_path, "edge.txt", ("x" * 63 + "\n") * 16, options).status == "full"


def test_huge_file_is_not_read(tmp_path: Path, monkeypatch) -> None:
    huge = tmp_path / "huge.bin"
    with huge.open("wb") as handle:
        handle.truncate(8 << 30)        # sparse: 8 GiB that reading would take seconds
    # Judged from its size alone: any attempt to open it fails the test.
    real_open, real_os_open = builtins.open, os.open

    def is_huge(file: object) -> bool:
        return isinstance(file, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(file)) == str(huge)

    def guarded_open(file, *args, **kwargs):
        assert not is_huge(file), "the over-cap file was opened"
        return real_open(file, *args, **kwargs)

    def guarded_os_open(path, *args, **kwargs):
        assert not is_huge(path), "the over-cap file was opened"
        return real_os_open(path, *args, **kwargs)

    with monkeypatch.context() as guard:
        guard.setattr(builtins, "open", guarded_open)
        guard.setattr(io, "open", guarded_open)
        guard.setattr(os, "open", guarded_os_open)
        document = read_document(tmp_path, "huge.bin", DEFAULT)
    assert document.reason == "too large (8.0 GiB > 1.0 MiB)"
    assert document.size == 8 << 30 and document.digest == ""


def test_vanished_file_is_listed_as_unreadable(tmp_path: Path) -> None:
    put(tmp_path, "a.txt", "x")
    selection = select(tmp_path)
    (tmp_path / "a.txt").unlink()
    document = read_document(selection.root, "a.txt", DEFAULT)
    assert document.status == "listed"
    assert document.reason == "unreadable: No such file or directory"
    assert document.warnings == ["a.txt: unreadable (No such file or directory); "
                                 "listed without its body"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied_is_listed_as_unreadable(tmp_path: Path) -> None:
    put(tmp_path, "secret.txt", "x")
    (tmp_path / "secret.txt").chmod(0)
    document = read_document(tmp_path, "secret.txt", DEFAULT)
    assert document.reason == "unreadable: Permission denied"
    assert document.warnings


def test_special_files_are_not_read(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")        # reading would block forever
    assert read_document(tmp_path, "pipe", DEFAULT).reason == "not a regular file"
    (tmp_path / "dir").mkdir()
    assert read_document(tmp_path, "dir", DEFAULT).reason == "not a regular file"


def test_paths_escaping_the_root_are_refused(tmp_path: Path) -> None:
    put(tmp_path, "outside.txt", "secret")
    (tmp_path / "root").mkdir()
    document = read_document(tmp_path / "root", "../outside.txt", DEFAULT)
    assert (document.status, document.reason, document.text) == ("listed", "outside SOURCE", None)


# --------------------------------------------------------------------------- converter


def upper_pdf_text(relpath: str, data: bytes) -> str | None:
    """Stands in for ingest.manuals.convert: text for PDFs, None for anything else."""
    if data.startswith(b"%PDF-"):
        return f"[{relpath}: {len(data)} bytes of PDF]\n"
    return None


def test_converter_runs_before_binary_detection(tmp_path: Path) -> None:
    pdf = b"%PDF-1.7\n\x00\x01binary streams\n%%EOF\n"
    document = read(tmp_path, "manual.pdf", pdf, converter=upper_pdf_text)
    assert (document.status, document.text) == ("full", f"[manual.pdf: {len(pdf)} bytes of PDF]\n")
    assert document.digest == hashlib.sha256(pdf).hexdigest()
    assert read(tmp_path, "manual.pdf", pdf).reason == "binary"
    # None: not a document, read as usual
    assert read(tmp_path, "a.py", "x = 1\n", converter=upper_pdf_text).text == "x = 1\n"
    assert read(tmp_path, "img.png", b"\x89PNG\r\n\x1a\n\x00", converter=upper_pdf_text).reason \
        == "binary"


def test_converter_gets_documents_larger_than_the_cap(tmp_path: Path) -> None:
    options = ReadOptions(max_file_bytes=1024)
    big_pdf = b"%PDF-1.7\n" + b"\x00" * 5000
    document = read(tmp_path, "big.pdf", big_pdf, options, converter=upper_pdf_text)
    assert document.status == "full" and document.size == len(big_pdf)
    # but other files over the cap are still listed, and so is converted text over the cap
    assert read(tmp_path, "big.txt", "x" * 5000, options,
                converter=upper_pdf_text).reason == "too large (4.9 KiB > 1.0 KiB)"
    wordy = read(tmp_path, "wordy.pdf", big_pdf, options, converter=lambda p, d: "y" * 2048)
    assert wordy.reason == "too large (converted text 2.0 KiB > 1.0 KiB)"


def test_failing_converter_lists_the_file_with_a_warning(tmp_path: Path) -> None:
    def broken(relpath: str, data: bytes) -> str | None:
        raise ValueError("corrupt xref table")

    document = read(tmp_path, "bad.pdf", b"%PDF-1.4\n", converter=broken)
    assert (document.status, document.reason) == ("listed", "conversion failed")
    assert document.warnings == ["bad.pdf: could not convert (corrupt xref table); "
                                 "listed without its body"]


# --------------------------------------------------------------------------- speed


def _python_tree(root: Path, count: int) -> None:
    """`count` modules in 30 packages, pkg1 marked linguist-generated, committed."""
    line = "def function_{0}(argument):\n    return argument * {0}  # comment\n"
    for index in range(count):
        put(root, f"pkg{index % 30}/module_{index}.py", line.format(index) * 60)
    put(root, ".gitattributes", "pkg1/** linguist-generated\n")
    repo = git.Repo.init(root)
    repo.git.add(A=True)
    repo.git.commit("-q", "-m", "init")


def _select_and_read_counting_launches(root: Path, monkeypatch) -> tuple[list, int]:
    launches = 0
    popen_init = subprocess.Popen.__init__

    def counting_init(self, *args, **kwargs):
        nonlocal launches
        launches += 1
        popen_init(self, *args, **kwargs)

    with monkeypatch.context() as counting:
        counting.setattr(subprocess.Popen, "__init__", counting_init)
        selection = select(root)
        attributes = load_attributes(selection)
        documents = [read_document(selection.root, p, DEFAULT, attributes=attributes)
                     for p in selection.paths]
    return documents, launches


@pytest.mark.slow
def test_three_thousand_files_read_without_per_file_processes(tmp_path: Path, monkeypatch) -> None:
    """Not a benchmark: a guard against per-file subprocesses (git check-attr, git show, ...).
    A hundred times the files must start exactly as many processes."""
    _python_tree(tmp_path / "small", 30)
    _python_tree(tmp_path / "large", 3000)
    small, small_launches = _select_and_read_counting_launches(tmp_path / "small", monkeypatch)
    large, large_launches = _select_and_read_counting_launches(tmp_path / "large", monkeypatch)
    assert (len(small), len(large)) == (31, 3001)
    assert sum(d.reason == "linguist-generated" for d in small) == 1
    assert sum(d.reason == "linguist-generated" for d in large) == 100
    assert sum(d.status == "full" for d in large) == 2901  # with .gitattributes
    assert 0 < large_launches == small_launches, (small_launches, large_launches)


def test_attributes_from_above_a_subdirectory_source(tmp_path: Path) -> None:
    put(tmp_path, ".gitattributes", "sub/gen/** linguist-generated\n")
    put(tmp_path, "sub/gen/a.py", "x\n")
    put(tmp_path, "sub/b.py", "x\n")
    repo = git.Repo.init(tmp_path)
    repo.git.add(A=True)
    repo.git.commit("-q", "-m", "init")
    selection = select(tmp_path / "sub")
    attributes = load_attributes(selection)
    assert (attributes.reason("gen/a.py"), attributes.reason("b.py")) == ("linguist-generated", None)


def test_attributes_inside_a_recursed_submodule(tmp_path: Path) -> None:
    library = tmp_path / "library"
    put(library, ".gitattributes", "*.js linguist-vendored\n")
    put(library, "lib.js", "var a;\n")
    put(library, "lib.py", "a = 1\n")
    repo = git.Repo.init(library)
    repo.git.add(A=True)
    repo.git.commit("-q", "-m", "init")
    main = tmp_path / "main"
    put(main, "app.js", "var b;\n")
    repo = git.Repo.init(main)
    repo.git.execute(["git", "-c", "protocol.file.allow=always", "submodule", "add", "-q",
                      str(library), "vendor/library"])
    repo.git.add(A=True)
    repo.git.commit("-q", "-m", "init")
    selection = select(main, SelectOptions(recurse_submodules=True))
    attributes = load_attributes(selection)
    marked = {p: attributes.reason(p) for p in selection.paths if attributes.reason(p)}
    assert marked == {"vendor/library/lib.js": "linguist-vendored"}


def test_empty_file_is_full_and_empty(tmp_path: Path) -> None:
    document = read(tmp_path, "__init__.py", b"")
    assert (document.status, document.text, document.size) == ("full", "", 0)
    assert document.digest == hashlib.sha256(b"").hexdigest()


def test_big_binaries_are_not_read_for_the_converter(tmp_path: Path) -> None:
    offered: list[str] = []

    def converter(relpath: str, data: bytes) -> str | None:
        offered.append(relpath)
        return None

    with (tmp_path / "disk.img").open("wb") as handle:
        handle.truncate(32 << 20)       # zeros: NUL bytes in the head rule it out
    put(tmp_path, "photo.jpg", b"\xff\xd8\xff\xe0" + b"\x01" * (2 << 20))
    put(tmp_path, "page.html", "<html>" + "<p>text</p>\n" * 200_000)
    for name in ("disk.img", "photo.jpg", "page.html"):
        document = read_document(tmp_path, name, DEFAULT, converter=converter)
        assert document.reason.startswith("too large (") and document.reason.endswith("> 1.0 MiB)")
    assert offered == ["page.html"]
    assert read_document(tmp_path, "disk.img", DEFAULT, converter=converter).digest == ""


def test_permission_denied_simulated(tmp_path: Path, monkeypatch) -> None:
    """The same path as chmod 000 for a non-root user: the open fails with EACCES."""
    import ingest.read as read_module

    put(tmp_path, "secret.txt", "x")

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(read_module, "open", refuse, raising=False)
    document = read_document(tmp_path, "secret.txt", DEFAULT)
    assert (document.status, document.reason) == ("listed", "unreadable: Permission denied")
    assert document.warnings == ["secret.txt: unreadable (Permission denied); "
                                 "listed without its body"]
