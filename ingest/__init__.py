"""Packing: repositories and manuals into one byte-stable prompt.

`pack()` runs the stages select -> read -> order -> render -> count -> budget. The tokenizer and
the cache directory are passed in: this package never imports `engine` or `dsv4cli`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from ingest.budget import Candidate, Reduction, fit
from ingest.errors import IngestError, NotAGitRepository, PathOutsideSource, SourceNotFound
from ingest.render import TailEntry, check_format, file_block, report_frame, report_line, tail_blocks
from ingest.types import Document, ReadOptions, SelectOptions, Selection

if TYPE_CHECKING:
    from ingest.pack_cache import CachedOutput

T = TypeVar("T")

__all__ = ["pack", "list_paths", "PackOptions", "PackResult", "FileReport", "Reduction", "IngestError"]

STDIN_PATH = "stdin"


@dataclass(frozen=True)
class PackOptions:
    format: str = "xml"
    budget: int | None = None
    select: SelectOptions = SelectOptions()
    read: ReadOptions = ReadOptions()
    files_from: tuple[str, ...] | None = None     # explicit paths, packed in the given order


@dataclass
class FileReport:
    path: str
    status: str           # "full" | "reduced" | "listed"
    reason: str
    tokens: int           # tokens of the file's block in the output (0 when listed)


@dataclass
class PackResult:
    total_tokens: int | None          # exact count of `text`; None without a tokenizer
    files: list[FileReport]
    warnings: list[str] = field(default_factory=list)
    reduced: list[Reduction] = field(default_factory=list)   # what the budget degraded
    stable_prefix_chars: int = 0      # length of the file bodies, before the volatile tail
    tokenizer: str | None = None
    tokenized_blocks: int = 0         # blocks the tokenizer actually saw (the rest came from cache)
    from_cache: bool = False          # the whole output came from the pack cache (nothing changed)
    _text: str | None = field(default=None, repr=False)
    _cached: CachedOutput | None = field(default=None, repr=False, compare=False)
    _utf8: bytes | None = field(default=None, repr=False, compare=False)   # the text's strict UTF-8, if known

    @property
    def text(self) -> str:
        """The packed prompt (read from the pack cache on first use after a hit)."""
        if self._text is None:
            self._text = self._cached.text() if self._cached is not None else ""
        return self._text

    def write_output(self, sink: BinaryIO) -> None:
        """The packed prompt as UTF-8 into the binary stream `sink` (file names that are not
        UTF-8 keep their own bytes). A cache hit is copied by the kernel, never decoded."""
        if self._cached is not None and self._cached.plain_utf8:
            self._cached.copy_to(sink)
            return
        sink.write(self._utf8 if self._utf8 is not None else self.text.encode("utf-8", "surrogateescape"))
        sink.flush()


@dataclass
class _Unit:
    """One SOURCE (or the --files-from list) as the pipeline sees it."""

    selection: Selection | None        # None for stdin
    prefix: str                        # display prefix, '' or 'dir/'
    document_mode: bool
    ordered: list[str] = field(default_factory=list)


def list_paths(sources: list[str | Path], *, options: PackOptions = PackOptions(),
               cache_dir: Path | None = None) -> list[str]:
    """The selected paths in pack order (ignore rules and globs applied, no content filter)."""
    units, _ = _units(sources, options, cache_dir)
    return _dedupe([u.prefix + p for u in units for p in (u.ordered if u.selection else [STDIN_PATH])])[0]


def pack(
    sources: list[str | Path],
    *,
    options: PackOptions = PackOptions(),
    tokenizer=None,
    cache_dir: Path | None = None,
    stdin_text: str | None = None,
) -> PackResult:
    """Pack `sources` ('-' = `stdin_text` as one document) into one prompt."""
    fmt = check_format(options.format)
    if options.budget is not None and tokenizer is None:
        raise IngestError("a token budget needs a tokenizer", "pass the model whose tokenizer counts")
    units, warnings = _units(sources, options, cache_dir)
    # `git check-attr` runs while this thread stats every file for the cache key
    pending_attributes = _in_background(_attributes, units, options)
    cache, key, newest_change_ns = None, None, 0
    lstats: dict[tuple[int, str], os.stat_result] = {}   # (unit, path) -> lstat: reading needs no second one
    if cache_dir is not None:
        from ingest.pack_cache import PackCache

        material, newest_change_ns = _cache_material(units, pending_attributes, options, tokenizer, stdin_text,
                                                     lstats)
        if material is not None:
            cache = PackCache(cache_dir)
            key = cache.key(material)
            hit = cache.load(key)
            if hit is not None:
                return _result_from_cache(*hit, warnings)

    attributes = pending_attributes()
    from ingest.tokens import TokenCounter

    counter = TokenCounter(tokenizer, cache_dir) if tokenizer is not None else None
    stream = counter.stream() if counter is not None else None
    read_warnings: list[str] = []
    duplicates: list[str] = []
    documents: list[Document] = []
    full_blocks: list[str] = []
    seen: set[str] = set()
    # each block goes to the tokenizer's threads as soon as its file is read
    try:
        for document in _read_all(units, attributes, options, cache_dir, stdin_text, read_warnings, lstats):
            if document.path in seen:
                duplicates.append(f"{document.path} is named by more than one SOURCE; packed once")
                continue
            seen.add(document.path)
            block = file_block(fmt, document.path, document.text) if document.text is not None else ""
            documents.append(document)
            full_blocks.append(block)
            if stream is not None and block:
                stream.add(block)
    except BaseException:
        if stream is not None:
            stream.abandon()
        raise
    read_warnings += duplicates
    block_tokens = [0] * len(documents)
    if stream is not None:
        counted = iter(stream.finish())
        block_tokens = [next(counted) if block else 0 for block in full_blocks]
    result = _pack_documents(fmt, documents, full_blocks, block_tokens, options, counter)
    result.warnings = warnings + read_warnings
    if cache is not None and key is not None:
        result._utf8 = cache.store(key, _cache_meta(result, read_warnings), result.text, newest_change_ns)
    return result


def _pack_documents(fmt, documents: list[Document], full_blocks: list[str], block_tokens: list[int],
                    options: PackOptions, counter) -> PackResult:
    """Fit and lay out documents that are already read, rendered and counted, in pack order."""
    tokenizer = counter.tokenizer if counter is not None else None
    statuses = ["full" if d.text is not None else "listed" for d in documents]
    reasons = [d.reason for d in documents]
    outlines: dict[int, str] = {}
    reductions: list[Reduction] = []

    if options.budget is not None:
        statuses, block_tokens, reductions = _fit(
            fmt, documents, statuses, block_tokens, reasons, outlines, counter, options.budget
        )
        index_of = {d.path: i for i, d in enumerate(documents)}
        for item in reductions:
            reasons[index_of[item.path]] = "budget"

    body = []
    for index, document in enumerate(documents):
        if statuses[index] == "full":
            body.append(full_blocks[index])
        elif statuses[index] == "reduced":
            body.append(file_block(fmt, document.path, outlines[index], reduced=True))
    entries = [TailEntry(d.path, statuses[i], reasons[i]) for i, d in enumerate(documents)]
    tail = tail_blocks(fmt, entries)
    body_text = "".join(body)
    total = None
    if counter is not None:
        total = sum(block_tokens) + sum(counter.count(tail))
        counter.save()
    files = [FileReport(d.path, statuses[i], reasons[i], block_tokens[i] if statuses[i] != "listed" else 0)
             for i, d in enumerate(documents)]
    return PackResult(
        _text=body_text + "".join(tail),
        total_tokens=total,
        files=files,
        reduced=reductions,
        stable_prefix_chars=len(body_text),
        tokenizer=getattr(tokenizer, "name", None),
        tokenized_blocks=counter.tokenized_blocks if counter is not None else 0,
    )


# ------------------------------------------------------------------------------ whole-pack cache


def _cache_material(units: list[_Unit], attributes: Callable[[], list], options: PackOptions, tokenizer,
                    stdin_text: str | None, lstats: dict) -> tuple[dict | None, int]:
    """What the output depends on, for the whole-pack cache key; None when it cannot be known.
    `attributes()` gives the .gitattributes marks per unit (asked for after the stats); each
    file's lstat goes to `lstats`, keyed by (unit index, path)."""
    import dataclasses
    import hashlib

    from ingest.pack_cache import file_fingerprint

    newest = 0
    described = []
    for unit_index, unit in enumerate(units):
        if unit.selection is None:
            text = stdin_text or ""
            described.append({"stdin": hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()})
            continue
        root = os.path.join(unit.selection.root, "")
        fingerprints = []
        for path in unit.ordered:
            try:
                info = os.lstat(root + path)
            except OSError:
                return None, 0
            lstats[unit_index, path] = info
            fingerprint = file_fingerprint(root + path, info)
            if fingerprint is None:
                return None, 0
            newest = max(newest, fingerprint[2], fingerprint[3])
            fingerprints.append(fingerprint)
        described.append({
            "root": str(unit.selection.root), "prefix": unit.prefix, "document_mode": unit.document_mode,
            "paths": unit.ordered, "submodules": sorted(unit.selection.submodules), "fingerprints": fingerprints,
        })
    marks_per_unit = attributes()
    for entry, unit, marks in zip(described, units, marks_per_unit):
        if unit.selection is not None:
            entry["marks"] = [marks.reason(p) for p in unit.ordered] if marks is not None else None
    material = {
        "format": options.format, "budget": options.budget,
        "select": dataclasses.asdict(options.select), "read": dataclasses.asdict(options.read),
        "tokenizer": None if tokenizer is None else str(tokenizer.digest),
        "units": described,
    }
    return material, newest


def _in_background(function: Callable[..., T], *args: Any) -> Callable[[], T]:
    """Start `function(*args)` on a thread; the returned callable waits for its result (or
    raises its exception)."""
    import threading

    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = function(*args)
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            outcome["error"] = error

    thread = threading.Thread(target=run, name="dsv4-ingest", daemon=True)
    thread.start()

    def result() -> T:
        thread.join()
        if "error" in outcome:
            raise outcome.pop("error")
        return outcome["value"]

    return result


def _cache_meta(result: PackResult, read_warnings: list[str]) -> dict:
    return {
        "total_tokens": result.total_tokens,
        "files": [[f.path, f.status, f.reason, f.tokens] for f in result.files],
        "read_warnings": read_warnings,
        "reduced": [[r.path, r.before, r.after] for r in result.reduced],
        "stable_prefix_chars": result.stable_prefix_chars,
        "tokenizer": result.tokenizer,
    }


def _result_from_cache(meta: dict, output: CachedOutput, warnings: list[str]) -> PackResult:
    return PackResult(
        _cached=output,
        total_tokens=meta["total_tokens"],
        files=[FileReport(*entry) for entry in meta["files"]],
        warnings=warnings + list(meta["read_warnings"]),
        reduced=[Reduction(*entry) for entry in meta["reduced"]],
        stable_prefix_chars=meta["stable_prefix_chars"],
        tokenizer=meta["tokenizer"],
        from_cache=True,
    )


# ------------------------------------------------------------------------------ sources


def _units(sources: list[str | Path], options: PackOptions, cache_dir: Path | None) -> tuple[list[_Unit], list[str]]:
    from ingest.order import pack_order
    from ingest.select import select

    sources = list(sources)
    if not sources and options.files_from is None:
        sources = ["."]
    several = len(sources) + (options.files_from is not None) > 1
    units: list[_Unit] = []
    warnings: list[str] = []
    for source in sources:
        if str(source) == "-":
            units.append(_Unit(selection=None, prefix="", document_mode=True))
            continue
        selection = select(Path(source), options.select)
        if options.select.recurse_submodules and selection.git_root is None:
            raise NotAGitRepository(
                f"{source} is not inside a git work tree",
                "--recurse-submodules needs git; drop it to pack the directory as it is",
            )
        warnings += selection.warnings
        single_file = not Path(source).is_dir()
        prefix = _display_prefix(Path(source), single_file) if several else ""
        unit = _Unit(selection, prefix, document_mode=single_file or selection.git_root is None)
        unit.ordered = pack_order(selection, cache_dir)
        units.append(unit)
    if options.files_from is not None:
        units.append(_files_from_unit(options.files_from))
    return units, warnings


def _display_prefix(source: Path, single_file: bool) -> str:
    """What goes before a path from `source` when several SOURCEs share one pack; never absolute."""
    directory = source.parent if single_file else source
    resolved = directory.resolve()
    try:
        relative = resolved.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        relative = resolved.name
    return "" if relative in ("", ".") else relative + "/"


def _files_from_unit(paths: tuple[str, ...]) -> _Unit:
    """An explicit list: no ignore rules, the given order, paths relative to the working
    directory (its SOURCE). Paths are normalised (`a/../b.py` is `b.py`, an absolute path
    inside is made relative) and packed once; one that leads outside is an error, as a
    missing one is."""
    cwd = Path.cwd()
    top = os.path.realpath(cwd)
    ordered: list[str] = []
    for raw in paths:
        if not raw:
            continue
        if not os.path.lexists(raw):
            raise SourceNotFound(f"no such file: {raw} (from --files-from)", "check the list of paths")
        ordered.append(_inside_path(raw, top))
    ordered = _dedupe(ordered)[0]
    selection = Selection(root=cwd, paths=ordered)
    return _Unit(selection, "", document_mode=False, ordered=ordered)


def _inside_path(raw: str, top: str) -> str:
    """`raw` relative to the directory `top` (a real path), with '/' separators. Directories
    on the way are resolved as the system resolves them (`a/..` where `a` is a symlink goes
    where the symlink goes); the last component is not, so a symlinked file stays a symlink
    and read.py decides whether its target may be read."""
    absolute = os.path.join(top, raw)  # an absolute `raw` stays itself
    head, name = os.path.split(absolute.rstrip(os.sep) or os.sep)
    target = os.path.realpath(absolute) if name in ("", ".", "..") else os.path.join(os.path.realpath(head or os.sep), name)
    if not (target == top or target.startswith(top.rstrip(os.sep) + os.sep)):
        lexical = os.path.normpath(absolute)
        how = "leads outside the working directory through a symlink" if lexical.startswith(top.rstrip(os.sep) + os.sep) else "is outside the working directory"
        raise PathOutsideSource(
            f"{raw} (from --files-from) {how}",
            "run dsv4 pack from a directory that contains every listed path",
        )
    return os.path.relpath(target, top).replace(os.sep, "/")


def _dedupe(paths: list[str]) -> tuple[list[str], list[str]]:
    seen: set[str] = set()
    kept, dropped = [], []
    for path in paths:
        (dropped if path in seen else kept).append(path)
        seen.add(path)
    return kept, dropped


# ------------------------------------------------------------------------------ reading


def _attributes(units: list[_Unit], options: PackOptions) -> list:
    """The .gitattributes marks (linguist-generated/-vendored) per unit; None when not filtering."""
    from ingest.read import load_attributes

    return [load_attributes(u.selection) if u.selection is not None and options.read.default_filters else None
            for u in units]


def _read_all(units: list[_Unit], attributes: list, options: PackOptions, cache_dir: Path | None,
              stdin_text: str | None, warnings: list[str], lstats: dict | None = None) -> Iterator[Document]:
    """The documents in pack order, one at a time (their warnings go to `warnings`); `lstats`
    holds the files' lstat where the cache key took one already."""
    from ingest.read import read_document

    lstats = lstats or {}
    for unit_index, (unit, unit_attributes) in enumerate(zip(units, attributes)):
        if unit.selection is None:
            text = stdin_text if stdin_text is not None else ""
            yield Document(path=STDIN_PATH, text=text, size=len(text.encode("utf-8", "replace")))
            continue
        selection = unit.selection
        submodules = set(selection.submodules)
        converter = _converter(cache_dir, unit.document_mode)

        def read_one(path: str, selection: Selection = selection, unit_index: int = unit_index) -> Document:
            if path in submodules:
                return Document(path=path, text=None, status="listed", reason="submodule")
            return read_document(selection.root, path, options.read, attributes=unit_attributes,
                                 converter=converter, lstat=lstats.get((unit_index, path)))

        # Sequential on purpose: with 4 threads, 2,300 files read in 0.16 s instead of 0.11 s
        # (the work is short and holds the GIL between the system calls).
        for document in map(read_one, unit.ordered):
            warnings.extend(document.warnings)
            document.path = unit.prefix + document.path
            yield document


def _converter(cache_dir: Path | None, document_mode: bool):
    from ingest import manuals

    if cache_dir is None:
        return lambda relpath, data: manuals.convert(relpath, data, document_mode=document_mode)
    from ingest.conversion_cache import ConversionCache

    cache = ConversionCache(Path(cache_dir) / "conversions")
    return lambda relpath, data: cache.get_or_convert(relpath, data, document_mode, manuals.convert)


# ------------------------------------------------------------------------------ budget


def _fit(fmt, documents, statuses, block_tokens, reasons, outlines, counter, budget):
    from ingest.outline import outline

    def entry(index: int, status: str) -> TailEntry:
        reason = reasons[index] if statuses_at_start[index] != "full" else "budget"
        return TailEntry(documents[index].path, status, reason)

    statuses_at_start = list(statuses)

    def outline_tokens(index: int) -> int | None:
        text = documents[index].text or ""
        reduced = outline(documents[index].path, text)
        if not reduced or reduced == text:
            return None
        outlines[index] = reduced
        return counter.count_one(file_block(fmt, documents[index].path, reduced, reduced=True))

    def report_line_tokens(index: int, status: str) -> int:
        return counter.count_one(report_line(fmt, entry(index, status)))

    header, footer = report_frame(fmt)
    frame_tokens = sum(counter.count([p for p in (header, footer) if p]))

    def exact_total(current_statuses: list[str], current_tokens: list[int]) -> int:
        entries = [entry(i, s) if s != "full" else TailEntry(d.path, s)
                   for i, (d, s) in enumerate(zip(documents, current_statuses))]
        return sum(current_tokens) + sum(counter.count(tail_blocks(fmt, entries)))

    candidates = [Candidate(d.path, s, t) for d, s, t in zip(documents, statuses, block_tokens)]
    result = fit(
        candidates, budget,
        outline_tokens=outline_tokens,
        report_line_tokens=report_line_tokens,
        report_frame_tokens=frame_tokens,
        exact_total=exact_total,
    )
    return result.statuses, result.tokens, result.reductions
