"""Render documents into the packed text: file bodies first, the volatile part after them.

Layout (every format):
  1. one block per inlined file, in pack order, each naming its path; the only thing a block
     depends on is that file's path, status and text, so an unchanged file renders to the same
     bytes wherever it sits;
  2. the tail, which changes whenever a file is added, removed or degraded: the directory tree,
     a summary with counts, and the report of files not inlined (listed or reduced, with reasons).
No timestamps, no absolute paths, '/' separators only.

Token boundaries. Every block starts with a character that is neither whitespace nor a letter
nor a digit and ends with a non-whitespace character followed by exactly one "\\n". With the
byte-level BPE pre-tokenizer pattern
    \\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?=\\p{N})|\\s+(?!\\S)|\\s+
no pre-token can then span two blocks: the final "\\n" is a pre-token of its own whether it is
followed by the end of the text or by the next block, and nothing before it can absorb it. So
the token count of the whole output is exactly the sum of the blocks' counts, and each block
can be counted (and cached) on its own. Lines of the report follow the same rule, which lets the
budget price a listed file exactly without re-counting the report.

XML (the default) is read by the model, not by an XML parser: file text goes in raw, unescaped.
A block is `<file path="...">` ... `</file>`; if the text itself contains `</file>`, the tag
grows a numeric suffix (`<file_1 ...>` ... `</file_1>`, the smallest absent from the text), the
same idea as a Markdown fence growing longer than any backtick run inside. Only the path
attribute is escaped (& " < >).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Format = Literal["xml", "markdown", "plain"]
FORMATS: tuple[str, ...] = ("xml", "markdown", "plain")

_BACKTICK_RUN = re.compile(r"`+")

# Markdown fence info strings for common extensions; unknown extensions get a bare fence.
_FENCE_LANGUAGE = {
    "py": "python", "pyi": "python", "js": "javascript", "mjs": "javascript", "cjs": "javascript",
    "jsx": "jsx", "ts": "typescript", "tsx": "tsx", "go": "go", "rs": "rust", "java": "java",
    "kt": "kotlin", "kts": "kotlin", "cs": "csharp", "c": "c", "h": "c", "cc": "cpp", "cpp": "cpp",
    "cxx": "cpp", "hpp": "cpp", "hh": "cpp", "rb": "ruby", "sh": "bash", "bash": "bash",
    "zsh": "bash", "md": "markdown", "rst": "rst", "json": "json", "toml": "toml", "yaml": "yaml",
    "yml": "yaml", "html": "html", "css": "css", "scss": "scss", "sql": "sql", "swift": "swift",
    "php": "php", "lua": "lua", "r": "r", "scala": "scala", "xml": "xml", "cfg": "ini", "ini": "ini",
}


@dataclass(frozen=True)
class TailEntry:
    """What the tail needs to know about one file."""

    path: str
    status: str          # "full" | "reduced" | "listed"
    reason: str = ""


def check_format(fmt: str) -> Format:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt  # type: ignore[return-value]


def file_block(fmt: Format, path: str, text: str, *, reduced: bool = False) -> str:
    """One file's block. `reduced` marks an outline standing in for the full text."""
    body = text if text.endswith("\n") or not text else text + "\n"
    if fmt == "xml":
        tag = _xml_tag(text)
        status = ' status="reduced"' if reduced else ""
        return f'<{tag} path="{_xml_attribute(path)}"{status}>\n{body}</{tag}>\n'
    if fmt == "markdown":
        fence = _fence(text)
        language = _FENCE_LANGUAGE.get(path.rpartition(".")[2].lower(), "") if "." in path else ""
        title = f"{path} (outline)" if reduced else path
        return f"## {_one_line(title)}\n\n{fence}{language}\n{body}{fence}\n"
    title = f"{path} (outline)" if reduced else path
    return f"=== {_one_line(title)} ===\n{body}=== end {_one_line(path)} ===\n"


def tail_blocks(fmt: Format, entries: Sequence[TailEntry]) -> list[str]:
    """Directory tree, summary, and (when there is any) the not-inlined report, in that order."""
    blocks = [tree_block(fmt, [e.path for e in entries]), summary_block(fmt, entries)]
    omitted = [e for e in entries if e.status != "full"]
    if omitted:
        header, footer = report_frame(fmt)
        blocks.append(header + "".join(report_line(fmt, e) for e in omitted) + footer)
    return blocks


def tree_block(fmt: Format, paths: Sequence[str]) -> str:
    lines = _tree_lines(paths) or ["(no files)"]
    tree = "\n".join(lines) + "\n"
    if fmt == "xml":
        return f"<directory_structure>\n{tree}</directory_structure>\n"
    if fmt == "markdown":
        fence = _fence(tree)
        return f"## Directory structure\n\n{fence}\n{tree}{fence}\n"
    return f"=== directory structure ===\n{tree}=== end directory structure ===\n"


def summary_block(fmt: Format, entries: Sequence[TailEntry]) -> str:
    full = sum(1 for e in entries if e.status == "full")
    reduced = sum(1 for e in entries if e.status == "reduced")
    listed = len(entries) - full - reduced
    counts = f"files: {len(entries)} ({full} full, {reduced} reduced to an outline, {listed} listed by path only)"
    about = _ABOUT[fmt]
    if fmt == "xml":
        return f"<summary>\n{about}\n{counts}\n</summary>\n"
    if fmt == "markdown":
        return f"## Summary\n\n{about}\n\n{counts}\n"
    return f"=== summary ===\n{about}\n{counts}\n=== end summary ===\n"


_ABOUT = {
    "xml": (
        "The files above are a packed repository. Each is enclosed in <file path=\"...\"> ... </file>"
        " (the tag gets a numeric suffix when the file itself contains </file>); status=\"reduced\""
        " marks an outline of definitions and signatures in place of the full text."
    ),
    "markdown": (
        "The files above are a packed repository, one section per file, headed by its path;"
        " \"(outline)\" marks definitions and signatures in place of the full text."
    ),
    "plain": (
        "The files above are a packed repository, each between \"=== path ===\" and \"=== end path ===\";"
        " \"(outline)\" marks definitions and signatures in place of the full text."
    ),
}


def report_frame(fmt: Format) -> tuple[str, str]:
    """The text around the report lines: (header, footer)."""
    if fmt == "xml":
        return "<files_not_inlined>\n", "</files_not_inlined>\n"
    if fmt == "markdown":
        return "## Files not inlined\n", ""
    return "=== files not inlined ===\n", "=== end files not inlined ===\n"


def report_line(fmt: Format, entry: TailEntry) -> str:
    """One report line; starts with '-' and ends with ')' + newline (see the module docstring)."""
    what = "listed" if entry.status == "listed" else "outline"
    reason = f": {_one_line(entry.reason)}" if entry.reason else ""
    return f"- {_one_line(entry.path)} ({what}{reason})\n"


def _tree_lines(paths: Sequence[str]) -> list[str]:
    root: dict[str, dict] = {}
    for path in paths:
        node = root
        for part in path.split("/"):
            node = node.setdefault(part, {})
    lines: list[str] = []

    def walk(node: dict[str, dict], depth: int) -> None:
        # Directories and files interleave in byte-wise name order, as `ls` does in C locale.
        for name in sorted(node, key=lambda n: n.encode("utf-8", "surrogateescape")):
            child = node[name]
            lines.append("  " * depth + _one_line(name) + ("/" if child else ""))
            if child:
                walk(child, depth + 1)

    walk(root, 0)
    return lines


def _xml_tag(text: str) -> str:
    if "</file>" not in text:
        return "file"
    suffix = 1
    while f"</file_{suffix}>" in text:
        suffix += 1
    return f"file_{suffix}"


def _xml_attribute(value: str) -> str:
    return (
        _one_line(value).replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")
    )


def _fence(text: str) -> str:
    longest = max((len(run) for run in _BACKTICK_RUN.findall(text)), default=0)
    return "`" * max(3, longest + 1)


def _one_line(text: str) -> str:
    """Paths with control characters (a newline in a file name) must not break the layout."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
