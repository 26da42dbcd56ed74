"""HTML to readable, Markdown-like text with the standard library's parser (no dependency).

What a reader of the pack sees:
- headings as `#` lines, paragraphs separated by blank lines, `<br>` as a line break;
- lists as `- ` / `1. ` items, nested ones indented under their parent's text;
- `<pre>` as a fenced block, verbatim (the fence outgrows any backtick run inside), with the
  language from a `language-xxx` class; inline `<code>` in backticks;
- tables as `| a | b |` rows (a `| --- |` rule under a header row); one-column tables, which
  are page layout rather than data, as plain paragraphs;
- links as `text (url)` when the url is absolute (and not absurdly long), else just the text;
  an icon link by its aria-label or title; images as their alt text;
- script, style, head, nav, forms' controls and other page furniture dropped, and elements
  marked hidden (`hidden`, `aria-hidden="true"`, an inline `display: none`), navigation by
  role, and Sphinx's `¶` heading permalinks;
- entities decoded, whitespace collapsed outside `<pre>`, lines never wrapped.

The parser tolerates what browsers tolerate here: unclosed `<p>`, `<li>`, `<dd>`, `<td>` and
`<head>` are closed where the next element implies it.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser

# Never shown: page furniture and non-text content.
_DROPPED = frozenset({
    "script", "style", "head", "title", "nav", "noscript", "template", "svg", "math",
    "iframe", "object", "canvas", "button", "select", "textarea", "datalist", "dialog",
})
_VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
                   "param", "source", "track", "wbr"})
# Elements whose end tag HTML lets an author leave out.
_IMPLIED_END = frozenset({"p", "li", "dt", "dd", "tr", "td", "th", "option", "thead", "tbody"})
_INVISIBLE_STYLE = re.compile(r"display\s*:\s*none|visibility\s*:\s*hidden", re.IGNORECASE)
_HEAD_CONTENT = frozenset({"title", "meta", "link", "style", "script", "base", "noscript", "template"})
# Blocks that start a paragraph (blank line) or only a new line.
_PARAGRAPHS = frozenset({
    "p", "section", "article", "main", "header", "footer", "aside", "figure", "address",
    "details", "fieldset", "form", "hgroup", "body", "html",
})
_LINES = frozenset({"div", "summary", "figcaption", "legend", "center", "caption", "search"})
_INLINE_CODE = frozenset({"code", "kbd", "samp", "tt", "var"})
_URL_SCHEMES = ("http://", "https://", "ftp://", "mailto:")
_LONGEST_SHOWN_URL = 160
_LANGUAGE_CLASS = re.compile(r"(?:^|\s)(?:language|lang|highlight-source)-([\w+#.-]+)")
_DECLARED_CHARSET = re.compile(rb"""(?:charset|encoding)\s*=\s*["']?([A-Za-z0-9_.:-]+)""", re.IGNORECASE)
_LINE_BREAK = "\x00"  # stands for <br> inside a paragraph; NULs in the input are removed

NO_BREAK, LINE, BLANK = 0, 1, 2


def html_to_text(data: bytes) -> str:
    builder = _TextBuilder()
    builder.feed(_decode(data).replace("\r\n", "\n").replace("\r", "\n"))
    builder.close()
    return builder.text()


def _decode(data: bytes) -> str:
    for bom, encoding in ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
                          (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            return data.decode(encoding, errors="replace")
    declared = _DECLARED_CHARSET.search(data[:4096])
    if declared:
        name = declared.group(1).decode("ascii").lower()
        # Browsers read Latin-1 and ASCII labels as Windows-1252; so do we.
        if name in ("iso-8859-1", "latin-1", "latin1", "ascii", "us-ascii"):
            name = "cp1252"
        try:
            codecs.lookup(name)
        except LookupError:
            pass
        else:
            return data.decode(name, errors="replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


@dataclass
class _Container:
    """Something that prefixes the lines inside it: a list item, a quote, a definition."""

    kind: str                   # "list", "item", "quote", "definition"
    first: str = ""             # prefix of the first line inside (the list marker)
    rest: str = ""              # prefix of the following lines
    used: bool = False          # the first line has been written
    ordered: bool = False       # lists only
    next_number: int = 1        # lists only
    items: int = 0              # lists only


@dataclass
class _Table:
    rows: list[tuple[list[str], bool]] = field(default_factory=list)  # (cells, is header row)
    row: list[str] | None = None
    row_is_header: bool = True
    cell: list[str] | None = None
    caption: list[str] | None = None
    caption_text: str = ""
    in_head: bool = False
    nested: int = 0             # tables inside a cell are flattened into the cell's text


class _TextBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self.pending = NO_BREAK
        self.inline: list[str] = []
        self.containers: list[_Container] = []
        self.dropping: list[str] = []
        self.heading = 0
        self.pre_depth = 0
        self.pre_parts: list[str] = []
        self.pre_language = ""
        self.links: list[tuple[str | None, int, str]] = []  # (shown url, text start, label)
        self.code_starts: list[int] = []
        self.tables: list[_Table] = []

    # -- parser callbacks ------------------------------------------------------------------

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if self.dropping:
            if self.dropping == ["head"] and (tag == "body" or tag not in _HEAD_CONTENT):
                self.dropping.clear()  # the head ends where the body's content begins
            elif self.dropping[0] in _IMPLIED_END and self.dropping[-1] == tag and \
                    all(open_tag in _IMPLIED_END for open_tag in self.dropping):
                self.dropping.clear()  # <p hidden>x<p>y: the second <p> ends the first
            else:
                if tag not in _VOID:
                    self.dropping.append(tag)  # so that the dropped element's own end is found
                return
        if tag in _DROPPED or _is_furniture(attributes):
            if tag not in _VOID:
                self.dropping.append(tag)
            return
        if self.pre_depth:
            if tag == "pre":
                self.pre_depth += 1
            elif tag == "br":
                self.pre_parts.append("\n")
            elif tag == "code" and not self.pre_language:
                self.pre_language = _language(attributes)
            return
        if self._in_cell() and self._flatten_in_cell(tag):
            return
        self._start(tag, attributes)

    def handle_endtag(self, tag: str) -> None:
        if self.dropping:
            if tag in self.dropping:
                while self.dropping.pop() != tag:
                    pass
            elif self.dropping[0] in _IMPLIED_END:
                self.dropping.clear()  # the parent of an unclosed hidden <p> or <li> ended
            return
        if self.pre_depth:
            if tag == "pre":
                self.pre_depth -= 1
                if not self.pre_depth:
                    self._end_pre()
            return
        if self._in_cell() and self._flatten_in_cell(tag, end=True):
            return
        self._end(tag)

    def handle_data(self, data: str) -> None:
        if self.dropping:
            return
        data = data.replace(_LINE_BREAK, "")
        if self.pre_depth:
            self.pre_parts.append(data)
        elif self.tables and not self._in_cell():
            return  # whitespace between rows and cells
        else:
            self._target().append(data)

    def unknown_decl(self, data: str) -> None:
        if data.startswith("CDATA["):  # XHTML
            self.handle_data(data[len("CDATA["):])

    # -- elements ----------------------------------------------------------------------------

    def _start(self, tag: str, attributes: dict[str, str]) -> None:
        if tag in _PARAGRAPHS:
            self._block(BLANK)
        elif tag in _LINES:
            self._block(LINE)
            if tag == "caption" and self.tables:
                self.tables[-1].caption = []
        elif len(tag) == 2 and tag[0] == "h" and tag[1] in "123456":
            self._block(BLANK)
            self.heading = int(tag[1])
        elif tag in ("ul", "ol", "menu", "dir"):
            self._block(LINE if self._inside("item") else BLANK)
            start = attributes.get("start", "1")
            self.containers.append(_Container(
                "list", ordered=tag == "ol", next_number=int(start) if start.isdigit() else 1))
        elif tag == "li":
            self._start_item()
        elif tag == "dl":
            self._block(BLANK)
        elif tag == "dt":
            self._flush()
            self._close("definition")
            self._block(LINE)
        elif tag == "dd":
            self._flush()
            self._close("definition")
            self._block(LINE)
            self.containers.append(_Container("definition", first="    ", rest="    "))
        elif tag == "blockquote":
            self._block(BLANK)
            self.containers.append(_Container("quote", first="> ", rest="> "))
        elif tag == "pre":
            self._block(BLANK)
            self.pre_depth = 1
            self.pre_parts = []
            self.pre_language = _language(attributes)
        elif tag == "br":
            self.inline.append(_LINE_BREAK)
        elif tag == "hr":
            self._block(BLANK)
            self._emit("---")
            self.pending = BLANK
        elif tag == "a":
            label = attributes.get("aria-label") or attributes.get("title") or ""
            self.links.append((_shown_url(attributes.get("href", "")), len(self._target()), label))
        elif tag in _INLINE_CODE:
            self.code_starts.append(len(self._target()))
            self._target().append("`")
        elif tag == "img":
            alt = " ".join(attributes.get("alt", "").split())
            if alt:
                self._target().append(f"[image: {alt}]")
        elif tag == "table":
            self._block(BLANK)
            self.tables.append(_Table())
        elif tag in ("thead", "tbody", "tfoot") and self.tables:
            self._close_row()
            self.tables[-1].in_head = tag == "thead"
        elif tag == "tr" and self.tables:
            self._close_row()
            self.tables[-1].row = []
            self.tables[-1].row_is_header = True
        elif tag in ("td", "th") and self.tables:
            table = self.tables[-1]
            self._close_cell()
            if table.row is None:
                table.row = []
                table.row_is_header = True
            table.row_is_header = table.row_is_header and (tag == "th" or table.in_head)
            table.cell = []

    def _end(self, tag: str) -> None:
        if tag in _PARAGRAPHS:
            self._block(BLANK)
        elif tag in _LINES:
            if tag == "caption" and self.tables and self.tables[-1].caption is not None:
                table = self.tables[-1]
                table.caption_text = _collapse("".join(table.caption))
                table.caption = None
            self._block(LINE)
        elif len(tag) == 2 and tag[0] == "h" and tag[1] in "123456":
            self._flush()
            self.heading = 0
            self.pending = BLANK
        elif tag in ("ul", "ol", "menu", "dir"):
            self._flush()
            self._close("list")
            self.pending = max(self.pending, LINE if self._inside("item") else BLANK)
        elif tag == "li":
            self._flush()
            self._close("item")
        elif tag == "dt":
            self._block(LINE)
        elif tag == "dd":
            self._flush()
            self._close("definition")
        elif tag == "dl":
            self._flush()
            self._close("definition")
            self.pending = BLANK
        elif tag == "blockquote":
            self._flush()
            self._close("quote")
            self.pending = BLANK
        elif tag == "a" and self.links:
            url, start, label = self.links.pop()
            target = self._target()
            text = _collapse("".join(target[start:]))
            if not text and label and (url or not self.heading):
                text = _collapse(label)  # an icon link says what it is in its label
                target.append(text)
            if url and not self.heading and text not in (url, url.removeprefix("mailto:")):
                target.append(f" ({url})" if text else url)
        elif tag in _INLINE_CODE and self.code_starts:
            start = self.code_starts.pop()
            target = self._target()
            if start < len(target) and not "".join(target[start + 1:]).strip():
                del target[start:]  # an empty <code></code> leaves no stray backticks
            else:
                target.append("`")
        elif tag == "table" and self.tables:
            self._close_row()
            self._emit_table(self.tables.pop())
            self.pending = BLANK
        elif tag == "tr" and self.tables:
            self._close_row()
        elif tag in ("td", "th") and self.tables:
            self._close_cell()
        elif tag in ("thead", "tbody", "tfoot") and self.tables:
            self._close_row()
            self.tables[-1].in_head = False

    def _start_item(self) -> None:
        self._flush()
        self._close("item")
        if not self.containers or self.containers[-1].kind != "list":
            self.containers.append(_Container("list"))  # a stray <li>: an unordered list
        owner = self.containers[-1]
        if owner.items:
            self.pending = LINE  # items of one list stay together, however their text ends
        else:
            self.pending = max(self.pending, LINE)
        owner.items += 1
        if owner.ordered:
            marker = f"{owner.next_number}. "
            owner.next_number += 1
        else:
            marker = "- "
        self.containers.append(_Container("item", first=marker, rest=" " * len(marker)))

    # -- tables ------------------------------------------------------------------------------

    def _in_cell(self) -> bool:
        return bool(self.tables) and (
            self.tables[-1].cell is not None or self.tables[-1].caption is not None)

    def _flatten_in_cell(self, tag: str, end: bool = False) -> bool:
        """Inside a cell, blocks only separate words: a cell is one line of a row."""
        table = self.tables[-1]
        if tag == "table":
            table.nested += -1 if end else 1
            self._target().append(" ")
            return True
        if table.nested and tag in ("tr", "td", "th", "thead", "tbody", "tfoot", "caption"):
            self._target().append(" ")
            return True
        if tag in ("td", "th", "tr", "thead", "tbody", "tfoot", "caption"):
            return False
        if tag in ("a", "img") or tag in _INLINE_CODE:
            return False
        if tag in _PARAGRAPHS or tag in _LINES or tag in (
                "br", "li", "ul", "ol", "dl", "dt", "dd", "blockquote", "hr", "pre") or (
                len(tag) == 2 and tag[0] == "h" and tag[1] in "123456"):
            self._target().append(" ")
            if tag == "pre" and not end:
                self.pre_depth = 1
                self.pre_parts = []
            return True
        return False

    def _close_cell(self) -> None:
        table = self.tables[-1]
        if table.cell is None:
            return
        if table.row is None:
            table.row = []
        table.row.append(_collapse("".join(table.cell).replace(_LINE_BREAK, " ")).replace("|", "\\|"))
        table.cell = None

    def _close_row(self) -> None:
        table = self.tables[-1]
        self._close_cell()
        if table.row:
            table.rows.append((table.row, table.row_is_header))
        table.row = None

    def _emit_table(self, table: _Table) -> None:
        if table.caption_text:
            self._emit(table.caption_text)
        rows = [cells for cells, _ in table.rows if any(cells)]
        if not rows:
            return
        width = max(len(cells) for cells in rows)
        if width == 1:
            for (cell,) in rows:  # a layout table: its cells are paragraphs
                self.pending = BLANK
                self._emit(cell)
            return
        for index, (cells, is_header) in enumerate(table.rows):
            if not any(cells):
                continue
            padded = cells + [""] * (width - len(cells))
            self._emit("| " + " | ".join(padded) + " |")
            if index == 0 and is_header:
                self._emit("|" + " --- |" * width)

    # -- output ------------------------------------------------------------------------------

    def _target(self) -> list[str]:
        if self.tables:
            table = self.tables[-1]
            if table.caption is not None:
                return table.caption
            if table.cell is not None:
                return table.cell
        return self.inline

    def _inside(self, kind: str) -> bool:
        return any(container.kind == kind for container in self.containers)

    def _close(self, kind: str) -> None:
        """Close the innermost open `kind` container (and what is open inside it), if the
        innermost list does not stand between: an item closes only items of its own list."""
        for index in range(len(self.containers) - 1, -1, -1):
            found = self.containers[index].kind
            if found == kind:
                del self.containers[index:]
                return
            if found == "list" and kind != "list":
                return

    def _block(self, level: int) -> None:
        self._flush()
        if level == BLANK and self.containers and self.containers[-1].kind in ("item", "definition") \
                and not self.containers[-1].used:
            level = LINE  # a paragraph opening a list item or definition stays close to it
        self.pending = max(self.pending, level)

    def _flush(self) -> None:
        if not self.inline:
            return
        text = "".join(self.inline)
        self.inline = []
        for segment in text.split(_LINE_BREAK):
            segment = _collapse(segment)
            if segment:
                self._emit("#" * self.heading + " " + segment if self.heading else segment)

    def _end_pre(self) -> None:
        text = "".join(self.pre_parts)
        if self._in_cell():
            self._target().append(" " + _collapse(text) + " ")
            return
        if text.startswith("\n"):
            text = text[1:]  # as browsers do: a newline right after <pre> is not content
        lines = [line.rstrip() for line in text.split("\n")]
        while lines and not lines[-1]:
            lines.pop()
        while lines and not lines[0]:
            lines.pop(0)
        if lines:
            longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
            fence = "`" * max(3, longest + 1)
            self.pending = max(self.pending, BLANK)
            self._emit(fence + self.pre_language)
            for line in lines:
                self._emit(line)
            self._emit(fence)
        self.pending = BLANK
        self.pre_language = ""

    def _emit(self, text: str) -> None:
        if self.pending == BLANK and self.lines:
            self.lines.append(self._prefix(blank=True))
        self.lines.append(self._prefix() + text)
        self.pending = NO_BREAK

    def _prefix(self, blank: bool = False) -> str:
        parts: list[str] = []
        for container in self.containers:
            if blank:
                # A blank line before a container's first line lies outside it.
                parts.append(container.rest if container.used else "")
            elif container.used:
                parts.append(container.rest)
            else:
                parts.append(container.first)
                container.used = True
        prefix = "".join(parts)
        return prefix.rstrip() if blank else prefix

    def text(self) -> str:
        self._flush()
        while self.tables:  # an unclosed table still shows its rows
            self._close_row()
            self._emit_table(self.tables.pop())
        if self.pre_depth:
            self._end_pre()
        body = "\n".join(line.rstrip() for line in self.lines)
        return body.strip("\n") + "\n"


def _is_furniture(attributes: dict[str, str]) -> bool:
    """Hidden elements, navigation by role, and the `¶` permalinks documentation generators
    put after every heading."""
    return (
        "hidden" in attributes
        or attributes.get("aria-hidden") == "true"
        or attributes.get("role") in ("navigation", "search")
        or "headerlink" in attributes.get("class", "").split()
        or _INVISIBLE_STYLE.search(attributes.get("style", "")) is not None
    )


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _language(attributes: dict[str, str]) -> str:
    found = _LANGUAGE_CLASS.search(attributes.get("class", ""))
    return found.group(1) if found else ""


def _shown_url(href: str) -> str | None:
    href = href.strip()
    # A very long url carries data (a playground link holds its whole program), not a place.
    if len(href) > _LONGEST_SHOWN_URL or not href.lower().startswith(_URL_SCHEMES):
        return None
    return href
