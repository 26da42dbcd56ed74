"""Man pages (roff: the man and mdoc macro packages) rendered to plain text, as `man` shows them.

Our own small roff interpreter, so a fresh machine needs neither groff nor mandoc:
- roff itself: escapes (fonts dropped, special characters as Unicode, strings `\\*`, number
  registers `\\n`), `.de`/`.am` macros with arguments, `.ds`/`.as` strings, `.nr`,
  `.if`/`.ie`/`.el` with `\\{ ... \\}` blocks, `.ig`, `.so` (shown as a reference), `.nf`/`.fi`,
  `.br`, `.sp`, `.in`, `.ce`, and tbl tables (`.TS`/`.TE`) as aligned columns;
- man(7): `.TH` header and footer, `.SH`/`.SS` headings at columns 0 and 3, text at column 7,
  `.PP`/`.LP`/`.P`, tagged paragraphs `.TP`/`.TQ`/`.IP`/`.HP` (a tag that fits sits on the
  body's first line, as man does), `.RS`/`.RE`, `.B`/`.I` and the alternating font macros,
  `.EX`/`.EE`, `.UR`/`.UE`, `.MT`/`.ME`, `.SY`/`.OP`/`.YS`, `.MR`;
- mdoc(7): see manuals_mdoc.py.

Differences from `man`, on purpose: paragraphs are not filled to a line width (one paragraph is
one line: a model reads it as well and it costs fewer tokens), nothing is hyphenated, and bold
or underlined text is plain.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

from ingest.manuals_mdoc import VOLUMES, MdocMacros

GLUE = "\x01"  # `\c`: the next text continues this word (no space, no line break)
_MAX_DEPTH = 40  # nested macro calls and string interpolations (a loop must not hang a pack)
# Macro calls and string interpolations per page: far above any real page (the most among
# Ubuntu's 23,000 pages is 4,220, cmake-modules(7)), low enough that a self-doubling
# definition stops in a fraction of a second.
_MAX_EXPANSIONS = 50_000
_HEADER_WIDTH = 78

# Special characters by their roff names (groff_char(7)): what an UTF-8 terminal shows, except
# where plain ASCII reads better for a model (hyphens, minus signs, quotes in code).
_GLYPHS: dict[str, str] = {
    "em": "\u2014", "en": "\u2013", "hy": "-", "mi": "-", "-": "-", "\\-": "-", "pl": "+",
    "bu": "\u2022", "co": "\u00a9", "rg": "\u00ae", "tm": "\u2122", "dg": "\u2020",
    "dd": "\u2021", "sc": "\u00a7", "ps": "\u00b6", "de": "\u00b0", "ct": "\u00a2",
    "Po": "\u00a3", "Ye": "\u00a5", "Eu": "\u20ac", "eu": "\u20ac", "lq": "\u201c",
    "rq": "\u201d", "oq": "\u2018", "cq": "\u2019", "aq": "'", "dq": '"', "ga": "`",
    "aa": "\u00b4", "ha": "^", "ti": "~", "rs": "\\", "sl": "/", "ba": "|", "or": "|",
    "br": "\u2502", "ul": "_", "ru": "_", "rn": "\u203e", "mu": "\u00d7", "di": "\u00f7",
    "+-": "\u00b1", "<=": "\u2264", ">=": "\u2265", "!=": "\u2260", "==": "\u2261",
    "~~": "\u2248", "~=": "\u2245", "->": "\u2192", "<-": "\u2190", "<>": "\u2194",
    "ua": "\u2191", "da": "\u2193", "rA": "\u21d2", "lA": "\u21d0", "hA": "\u21d4",
    "if": "\u221e", "pd": "\u2202", "no": "\u00ac", "sr": "\u221a", "es": "\u2205",
    "mo": "\u2208", "nm": "\u2209", "sb": "\u2282", "sp": "\u2283", "ca": "\u2229",
    "cu": "\u222a", "fa": "\u2200", "te": "\u2203", "AN": "\u2227", "OR": "\u2228",
    "fo": "\u2039", "fc": "\u203a", "Fo": "\u00ab", "Fc": "\u00bb", "la": "\u27e8",
    "ra": "\u27e9", "lh": "\u261c", "rh": "\u261e", "ss": "\u00df", "ae": "\u00e6",
    "AE": "\u00c6", "oe": "\u0153", "OE": "\u0152", "/o": "\u00f8", "/O": "\u00d8",
    "oa": "\u00e5", "oA": "\u00c5", "12": "\u00bd", "14": "\u00bc", "34": "\u00be",
    "S1": "\u00b9", "S2": "\u00b2", "S3": "\u00b3", "r!": "\u00a1", "r?": "\u00bf",
    "ff": "ff", "fi": "fi", "fl": "fl", "Fi": "ffi", "Fl": "ffl", "bq": "\u201e",
    "Bq": "\u201a", "at": "@", "sh": "#", "Do": "$", "ci": "\u25cb", "sq": "\u25a1",
    "lB": "[", "rB": "]", "lC": "{", "rC": "}",
    "tno": "\u00ac", "ap": "~", "product": "\u220f", "sum": "\u2211", "integral": "\u222b",
}
_GREEK = dict(zip("abgdezyhiklmncoprstufxqw", "\u03b1\u03b2\u03b3\u03b4\u03b5\u03b6\u03b7\u03b8"
                  "\u03b9\u03ba\u03bb\u03bc\u03bd\u03be\u03bf\u03c0\u03c1\u03c3\u03c4\u03c5\u03c6"
                  "\u03c7\u03c8\u03c9"))
_ACCENTS = {"'": "\u0301", "`": "\u0300", "^": "\u0302", ":": "\u0308", "~": "\u0303",
            ",": "\u0327", "v": "\u030c", "o": "\u030a"}
# Escapes whose argument is delimited, like \w'text': what each one leaves in the text.
_DELIMITED = frozenset("hvwoblLDXZRABxSHNCY")
_SIMPLE_ESCAPES = {
    "e": "\\", "E": "\\", "\\": "\\", "-": "-", "'": "'", "`": "`", ".": ".", " ": " ",
    "~": " ", "0": " ", "|": "", "^": "", ":": "", "&": "", ")": "", "%": "", "/": "",
    ",": "", "d": "", "u": "", "r": "", "p": "", "a": "", "t": "\t", "{": "", "}": "",
    "z": "", "c": GLUE, "!": "", "?": "",
}
_UNITS = {"n": 1.0, "m": 1.0, "v": 1.0, "i": 10.0, "c": 4.0, "p": 10 / 72, "P": 10 / 6, "u": 1 / 24, "M": 0.01}


@dataclass
class _Layout:
    """Lines of output text: filled paragraphs (one line each), verbatim lines, indents, tags."""

    lines: list[str] = field(default_factory=list)
    words: str = ""                # the paragraph being filled
    started: bool = False          # the paragraph has begun (even if its text so far is empty)
    indent: int = 7                # where the paragraph's text goes
    tag: str | None = None         # a tagged paragraph's tag, waiting for its first body line
    tag_indent: int = 0
    tag_same_line: bool = False    # hanging lists: the body always follows the tag
    tag_gap: int = 1               # least room between a tag and its body on one line
    collecting_tag: bool = False
    tag_words: str = ""
    nofill: bool = False
    glue: bool = False             # the next text joins the previous without a space
    pending_blank: bool = False
    after_heading: bool = False    # no blank line between a heading and its first paragraph

    def text(self, text: str, space: bool = True) -> None:
        glued = text.endswith(GLUE)
        text = text.replace(GLUE, "")
        if self.collecting_tag:
            joiner = " " if space and self.tag_words and not self.glue else ""
            self.tag_words += joiner + text
        elif self.nofill:
            text = text.expandtabs(8)  # tab stops every 8 columns from the indent, as in nroff
            if self.glue and self.lines:
                self.lines[-1] += text
            else:
                self._place(text)
        else:
            joiner = " " if space and self.started and not self.glue else ""
            self.words += joiner + text
            self.started = True
        self.glue = glued

    def finish_tag(self) -> None:
        if self.collecting_tag:
            self.collecting_tag = False
            self.flush()
            self.tag = self.tag_words.strip()
            self.tag_words = ""

    def flush(self) -> None:
        """End the paragraph's current line (roff's break)."""
        if self.started:
            self._place(self.words.strip(" "))
        self.words = ""
        self.started = False
        self.glue = False

    def blank(self) -> None:
        self.flush()
        self.flush_tag()
        if not self.after_heading:
            self.pending_blank = True

    def heading(self, text: str, indent: int) -> None:
        self.flush()
        self.flush_tag()
        self.pending_blank = True
        self._emit(" " * indent + text)
        self.after_heading = True

    def line(self, text: str, indent: int) -> None:
        """A line of its own at a given column (headers, tables, displays)."""
        self.flush()
        self.flush_tag()
        self._emit(" " * indent + text)

    def _place(self, text: str) -> None:
        if self.tag is not None:
            tag, self.tag = self.tag, None
            room = self.indent - self.tag_indent
            if self.tag_same_line:
                self._emit(" " * self.tag_indent + (tag + " " + text.lstrip()).rstrip())
                return
            if tag and len(tag) + self.tag_gap <= room:
                self._emit(" " * self.tag_indent + tag.ljust(room) + text.lstrip())
                return
            if tag:
                self._emit(" " * self.tag_indent + tag)
        self._emit(" " * self.indent + text if text else "")

    def end_block(self) -> None:
        """A break that also writes out a tag still waiting for its body."""
        self.flush()
        self.flush_tag()

    def flush_tag(self) -> None:
        if self.tag:
            self._emit(" " * self.tag_indent + self.tag)
        self.tag = None

    def _emit(self, line: str) -> None:
        if self.pending_blank and self.lines and self.lines[-1]:
            self.lines.append("")
        self.pending_blank = False
        self.after_heading = False
        self.lines.append(line.rstrip())

    def result(self) -> str:
        self.flush()
        self.flush_tag()
        out: list[str] = []
        for line in self.lines:
            if line or (out and out[-1]):
                out.append(line)
        while out and not out[-1]:
            out.pop()
        return "\n".join(out) + "\n"


def roff_to_text(source: str) -> str:
    renderer = _Renderer()
    renderer.run(_input_lines(source))
    return renderer.finish()


def _input_lines(source: str) -> list[str]:
    """Physical lines, with `\\<newline>` continuations joined."""
    source = source.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    lines: list[str] = []
    pending = ""
    for raw in source.split("\n"):
        trailing = len(raw) - len(raw.rstrip("\\"))
        if trailing % 2 == 1:
            pending += raw[:-1]
            continue
        lines.append(pending + raw)
        pending = ""
    if pending:
        lines.append(pending)
    return lines


def split_args(text: str) -> list[str]:
    """Request arguments: blank-separated, "double quoted" with "" for a quote; a `\\"` starts a
    comment. Escapes stay unexpanded."""
    args: list[str] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t":
            i += 1
        if i >= n or text.startswith('\\"', i):
            break
        if text[i] == '"':
            i += 1
            current = []
            while i < n:
                if text[i] == '"':
                    if i + 1 < n and text[i + 1] == '"':
                        current.append('"')
                        i += 2
                        continue
                    i += 1
                    break
                if text[i] == "\\" and i + 1 < n:
                    current.append(text[i : i + 2])
                    i += 2
                    continue
                current.append(text[i])
                i += 1
            args.append("".join(current))
        else:
            start = i
            while i < n and text[i] not in " \t":
                if text[i] == "\\" and i + 1 < n:
                    if text[i + 1] == '"':
                        break
                    i += 2
                    continue
                i += 1
            args.append(text[start:i])
    return args


def _glyph(name: str) -> str:
    if name in _GLYPHS:
        return _GLYPHS[name]
    if len(name) == 2 and name[0] == "*" and name[1].lower() in _GREEK:
        letter = _GREEK[name[1].lower()]
        return letter.upper() if name[1].isupper() else letter
    if len(name) == 2 and name[0] in _ACCENTS and name[1].isalpha():
        return unicodedata.normalize("NFC", name[1] + _ACCENTS[name[0]])
    if re.fullmatch(r"u[0-9A-F]{4,6}(_[0-9A-F]{4,6})*", name):
        text = "".join(chr(int(part.lstrip("u"), 16)) for part in name.split("_"))
        return unicodedata.normalize("NFC", text)
    if re.fullmatch(r"char\d{1,3}", name) and 32 <= int(name[4:]) < 256:
        return chr(int(name[4:]))
    if len(name) == 1:
        return name
    return ""


class _Renderer(MdocMacros):
    """The interpreter: roff requests and escapes, man(7) macros; mdoc(7) comes mixed in."""

    split_args = staticmethod(lambda text: split_args(text))
    indent_width = staticmethod(lambda argument, default: _width(argument, default))

    def __init__(self) -> None:
        self.out = _Layout()
        self.strings: dict[str, str] = {
            "R": "\u00ae", "Tm": "\u2122", "lq": "\u201c", "rq": "\u201d", "S": "", "HF": "B",
        }
        self.macros: dict[str, list[str]] = {}
        self.registers: dict[str, int] = {".g": 1, ".T": 0, ".x": 1, ".y": 23, ".V": 1, ".H": 1,
                                          ".l": _HEADER_WIDTH, ".i": 0, ".$": 0}
        self.conditions: list[bool] = []          # .ie results waiting for their .el
        self.depth = 0
        self.expansions = 0
        self.section_indent = 7                    # man; mdoc uses 5
        self.base = 7                              # left margin of the current .RS level
        self.prevailing = 7                        # indent of tagged paragraphs (.TP/.IP)
        self.tagged = False                        # inside a tagged paragraph's body
        self.relative: list[tuple[int, bool]] = [] # .RS stack: (base, tagged)
        self.paragraph_space = True                # .PD 0 turns the blank before paragraphs off
        self.heading_next: str | None = None       # .SH with its text on the next line
        self.tag_next = False                      # .TP: the next line is the tag
        self.center_lines = 0
        self.header: tuple[str, str, str] | None = None   # (left, centre, right)
        self.footer: tuple[str, str, str] | None = None
        self.link_url: list[str] = []
        self.translations: dict[str, str] = {}    # .tr
        MdocMacros.__init__(self)

    # -- driving -------------------------------------------------------------------------------

    def run(self, lines: list[str]) -> None:
        i = 0
        while i < len(lines):
            i = self.line(lines, i)

    def line(self, lines: list[str], i: int) -> int:
        """Interpret lines[i]; returns the index of the next line (blocks consume several)."""
        text = lines[i]
        i += 1
        if text[:1] in (".", "'"):
            i = self.request(text[1:], lines, i)
        else:
            self.text_line(text)
        self.after_input_line()
        return i

    def after_input_line(self) -> None:
        if self.tag_next and self.out.tag_words:
            self.tag_next = False  # .TP: the first line with text was the tag
            self.out.finish_tag()
        self.mdoc_after_line()

    def finish(self) -> str:
        self.out.flush()
        if self.header:
            self.out.lines[:0] = [_spread(*self.header), ""]
        if self.footer and (self.footer[0] or self.footer[1]):
            self.out.pending_blank = True
            self.out.line(_spread(*self.footer), 0)
        return self.out.result()

    # -- text ----------------------------------------------------------------------------------

    def text_line(self, raw: str) -> None:
        if self.heading_next:
            kind, self.heading_next = self.heading_next, None
            self.section_heading(kind, self.expand(raw))
            return
        if not raw.strip() and not self.out.nofill:
            self.out.blank()  # an empty line in filled text is a paragraph break
            return
        if raw.startswith(('\\"', "\\#")):
            return  # a comment on a line of its own (man pages mean `.\\"`)
        if raw[:1] in (" ", "\t") and not self.out.nofill:
            self.out.flush()
        text = self.expand(raw)
        if not self.out.nofill:
            text = text.rstrip(" ") if raw[:1] in (" ", "\t") else text.strip(" ")
        self.out.text(text)
        if self.center_lines:
            self.center_lines -= 1
            self.out.flush()

    def expand(self, text: str, depth: int = 0) -> str:
        """Interpret escapes: the printable text of a line or an argument."""
        out: list[str] = []
        i, n = 0, len(text)
        while i < n:
            ch = text[i]
            if ch != "\\" or i + 1 >= n:
                out.append(ch)
                i += 1
                continue
            code = text[i + 1]
            i += 2
            if code in ('"', "#"):
                while out and out[-1] in (" ", "\t"):
                    out.pop()
                break
            if code in _SIMPLE_ESCAPES:
                out.append(_SIMPLE_ESCAPES[code])
                if code == "z" and i < n:
                    out.append(text[i])
                    i += 1
            elif code in "fFmMgkVjsY":
                if code == "s":  # \s+1, \s-2, \s12, \s(12, \s[12], \s'12'
                    if i < n and text[i] in "+-":
                        i += 1
                    if i < n and text[i] == "'":
                        end = text.find("'", i + 1)
                        i = n if end < 0 else end + 1
                        continue
                    if i < n and text[i].isdigit() and text[i] in "123" and i + 1 < n and text[i + 1].isdigit():
                        i += 2
                        continue
                _, i = _escape_name(text, i)
            elif code == "(" or code == "[":
                name, i = _escape_name(text, i - 1)
                if code == "[" and " " in name:
                    name = name.split(" ", 1)[0]
                out.append(_glyph(name))
            elif code == "*":
                name, i = _escape_name(text, i)
                self.expansions += 1
                if depth < _MAX_DEPTH and self.expansions < _MAX_EXPANSIONS:
                    out.append(self.expand(self.strings.get(name.split(" ", 1)[0], ""), depth + 1))
            elif code == "n":
                if i < n and text[i] in "+-":
                    i += 1
                name, i = _escape_name(text, i)
                out.append(str(self.registers.get(name, 0)))
            elif code == "$":
                _, i = _escape_name(text, i)  # macro arguments were substituted on call
            elif code in _DELIMITED:
                argument, i = _delimited(text, i)
                if code == "w":
                    out.append(str(len(self.expand(argument, depth + 1))))
                elif code in "oZ":
                    out.append(self.expand(argument, depth + 1))
                elif code == "C":
                    out.append(_glyph(argument))
                elif code == "N" and argument.isdigit() and 32 <= int(argument) < 0x110000:
                    out.append(chr(int(argument)))
                elif code in "AB":
                    out.append("1")
            else:
                out.append(code)  # an unknown escape prints its character, as groff does
        text = "".join(out)
        if self.translations and depth == 0:
            text = "".join(self.translations.get(ch, ch) for ch in text)
        return text

    # -- requests ------------------------------------------------------------------------------

    def request(self, body: str, lines: list[str], i: int) -> int:
        stripped = body.lstrip(" \t")
        if stripped.startswith(('\\"', "\\#")) or not stripped:
            return i
        match = re.match(r"[^\s\\]+", stripped)
        if not match:
            return i  # `.\}` and other escape-only control lines
        name = match.group(0)
        rest = stripped[match.end():]
        if rest.startswith("\\}"):
            rest = rest[2:]
        rest = rest.lstrip(" \t") if not rest.startswith("\\") else rest

        if name in self.macros:
            self.call_macro(name, split_args(rest))
            return i
        handler = _REQUESTS.get(name) or self.mdoc_handler(name)
        if handler is None:
            return i  # unknown requests are ignored, as groff does (with a warning)
        if name in _BLOCK_REQUESTS:
            return handler(self, rest, lines, i)
        handler(self, rest)
        return i

    def call_macro(self, name: str, args: list[str]) -> None:
        self.expansions += 1
        if self.depth >= _MAX_DEPTH or self.expansions >= _MAX_EXPANSIONS:
            return
        self.depth += 1
        saved = self.registers[".$"]
        self.registers[".$"] = len(args)
        body = [_substitute_args(line, args) for line in self.macros[name]]
        try:
            self.run(body)
        finally:
            self.registers[".$"] = saved
            self.depth -= 1

    def run_body(self, body: str) -> None:
        """The body of a conditional: a request or text, after an optional `\\{`."""
        body = body.lstrip(" \t")
        if body.startswith("\\{"):
            body = body[2:].lstrip(" \t")
        if not body:
            return
        if body[:1] in (".", "'"):
            self.request(body[1:], [], 0)
        else:
            self.text_line(body)

    def define(self, rest: str, lines: list[str], i: int, *, append: bool = False) -> int:
        args = split_args(rest)
        end = args[1] if len(args) > 1 else "."
        body: list[str] = []
        while i < len(lines):
            line = lines[i]
            i += 1
            if line[:1] in (".", "'") and line[1:].strip() in ("." if end == "." else end,):
                break
            body.append(line.replace("\\\\", "\\"))  # copy mode
        if args:
            self.macros[args[0]] = (self.macros.get(args[0], []) if append else []) + body
        return i

    def skip_block(self, body: str, lines: list[str], i: int) -> int:
        """A false condition's body: skip it, and every line up to its closing `\\}`."""
        depth = body.count("\\{") - body.count("\\}")
        while depth > 0 and i < len(lines):
            depth += lines[i].count("\\{") - lines[i].count("\\}")
            i += 1
        return i

    def condition(self, rest: str) -> tuple[bool, str]:
        """Evaluate an .if condition; returns (result, the rest of the line: the body)."""
        rest = rest.lstrip(" \t")
        negate = False
        while rest.startswith("!"):
            negate = not negate
            rest = rest[1:]
        result: bool
        if rest[:1] in ("n", "t", "e", "o", "v") and (len(rest) == 1 or not rest[1].isalnum()):
            result = rest[0] in ("n", "o")  # we are nroff, on an odd page
            rest = rest[1:]
        elif rest[:1] in ("d", "r", "c", "m", "F", "S") and rest[1:2] in (" ", "\t"):
            kind = rest[0]
            words = rest[1:].lstrip().split(None, 1)
            name = words[0] if words else ""
            rest = words[1] if len(words) > 1 else ""
            if kind == "d":
                result = name in self.strings or name in self.macros or name in _REQUESTS \
                    or self.mdoc_handler(name) is not None
            elif kind == "r":
                result = name in self.registers
            else:
                result = kind == "c"
        elif rest[:1] and not rest[0].isalnum() and rest[0] not in "(\\+-|" :
            delimiter = rest[0]
            parts = rest[1:].split(delimiter, 2)
            if len(parts) == 3:
                result = self.expand(parts[0]) == self.expand(parts[1])
                rest = parts[2]
            else:
                result, rest = False, ""
        else:
            expression_end = re.match(r"\S*", rest).end()
            value = _evaluate(self.expand(rest[:expression_end]))
            result = value > 0
            rest = rest[expression_end:]
        return (not result) if negate else result, rest

    # -- man(7) layout -------------------------------------------------------------------------

    def section_heading(self, kind: str, text: str) -> None:
        self.out.nofill = False
        self.tag_next = False
        self.out.collecting_tag = False
        self.relative.clear()
        self.base = self.section_indent
        self.prevailing = 7
        self.tagged = False
        self.out.heading(text.strip(), 0 if kind in ("SH", "Sh") else 3)
        self.out.indent = self.base

    def paragraph(self) -> None:
        self.out.flush()
        if self.paragraph_space:
            self.out.blank()
        else:
            self.out.flush_tag()

    def set_indent(self) -> None:
        self.out.indent = self.base + (self.prevailing if self.tagged else 0)


def _escape_name(text: str, i: int) -> tuple[str, int]:
    """The name after an escape: `x`, `(xx` or `[long name]`."""
    if i >= len(text):
        return "", i
    if text[i] == "(":
        return text[i + 1 : i + 3], i + 3
    if text[i] == "[":
        end = text.find("]", i)
        return (text[i + 1 :], len(text)) if end < 0 else (text[i + 1 : end], end + 1)
    return text[i], i + 1


def _delimited(text: str, i: int) -> tuple[str, int]:
    """The argument of \\w'...' and the like; the delimiter is whatever character comes first."""
    if i >= len(text):
        return "", i
    delimiter = text[i]
    j = i + 1
    while j < len(text):
        if text[j] == "\\":
            j += 2
            continue
        if text[j] == delimiter:
            return text[i + 1 : j], j + 1
        j += 1
    return text[i + 1 :], len(text)


def _substitute_args(line: str, args: list[str]) -> str:
    def replace(match: re.Match[str]) -> str:
        which = match.group(1) or match.group(2) or match.group(3)
        if which in ("*", "@"):
            return " ".join(f'"{a}"' if which == "@" else a for a in args)
        index = int(which) if which.isdigit() else 0
        return args[index - 1] if 0 < index <= len(args) else ""

    return re.sub(r"\\\$(?:(\d|\*|@)|\((\d\d)|\[(\d+)\])", replace, line)


def _evaluate(expression: str) -> float:
    """roff numeric expressions: left to right, no precedence; units scaled to characters."""
    tokens = re.findall(r"\d+(?:\.\d*)?[a-zA-Z]?|\.\d+[a-zA-Z]?|<=|>=|==|<\?|>\?|[-+*/%<>=&:()]", expression)
    position = 0

    def operand() -> float:
        nonlocal position
        if position >= len(tokens):
            return 0.0
        token = tokens[position]
        position += 1
        if token == "(":
            value = chain()
            if position < len(tokens) and tokens[position] == ")":
                position += 1
            return value
        if token in ("-", "+"):
            value = operand()
            return -value if token == "-" else value
        number = re.match(r"[\d.]+", token)
        if not number:
            return 0.0
        try:
            value = float(number.group(0))
        except ValueError:
            return 0.0
        unit = token[number.end():]
        return value * _UNITS.get(unit, 1.0) if unit else value

    def chain() -> float:
        nonlocal position
        value = operand()
        while position < len(tokens) and tokens[position] != ")":
            op = tokens[position]
            position += 1
            right = operand()
            if op == "+":
                value += right
            elif op == "-":
                value -= right
            elif op == "*":
                value *= right
            elif op == "/":
                value = value / right if right else 0.0
            elif op == "%":
                value = value % right if right else 0.0
            elif op == "<":
                value = float(value < right)
            elif op == ">":
                value = float(value > right)
            elif op == "<=":
                value = float(value <= right)
            elif op == ">=":
                value = float(value >= right)
            elif op in ("=", "=="):
                value = float(value == right)
            elif op == "&":
                value = float(value > 0 and right > 0)
            elif op == ":":
                value = float(value > 0 or right > 0)
            elif op == "<?":
                value = min(value, right)
            elif op == ">?":
                value = max(value, right)
        return value

    return chain()


def _width(argument: str | None, default: int) -> int:
    """A .TP/.IP/.RS indent: a number with an optional unit (n by default), in characters."""
    if not argument:
        return default
    match = re.fullmatch(r"([+-]?\d+(?:\.\d*)?|[+-]?\.\d+)([a-zA-Z]?)", argument.strip())
    if not match:
        return default
    value = float(match.group(1)) * _UNITS.get(match.group(2) or "n", 1.0)
    return max(0, min(40, round(value)))


def _spread(left: str, centre: str, right: str) -> str:
    """A man header or footer: left, centred and right parts on one line."""
    width = max(_HEADER_WIDTH, len(left) + len(centre) + len(right) + 4)
    middle_start = max(len(left) + 2, (width - len(centre)) // 2)
    line = left.ljust(middle_start) + centre
    return (line.ljust(width - len(right)) + right if right else line).rstrip()


# --- the requests and man(7) macros, by name ------------------------------------------------

def _th(r: _Renderer, rest: str) -> None:
    args = [r.expand(a) for a in split_args(rest)] + [""] * 5
    title = f"{args[0]}({args[1]})" if args[1] else args[0]
    # Without a manual name, man shows the section's (groff 1.23 does too).
    r.header = (title, args[4] or VOLUMES.get(args[1][:1], ""), title)
    r.footer = (args[3], args[2], title)
    r.section_indent = r.base = 7
    r.out.indent = 7


def _sh(r: _Renderer, rest: str, kind: str = "SH") -> None:
    args = split_args(rest)
    if not args:
        r.out.flush()
        r.heading_next = kind
        return
    r.section_heading(kind, " ".join(r.expand(a) for a in args))


def _pp(r: _Renderer, rest: str) -> None:
    r.tag_next = False
    r.out.collecting_tag = False
    r.paragraph()
    r.tagged = False
    r.prevailing = 7
    r.set_indent()


def _tp(r: _Renderer, rest: str, *, another: bool = False) -> None:
    if another:  # .TQ: one more tag for the same body
        r.out.end_block()
    else:
        r.paragraph()
        r.prevailing = _width(split_args(rest)[0] if rest.strip() else None, r.prevailing)
    r.tagged = True
    r.out.tag_indent = r.base
    r.out.tag_same_line = False
    r.out.tag_gap = 1
    r.set_indent()
    r.out.collecting_tag = True
    r.out.tag_words = ""
    r.tag_next = True


def _ip(r: _Renderer, rest: str) -> None:
    args = split_args(rest)
    r.paragraph()
    r.prevailing = _width(args[1] if len(args) > 1 else None, r.prevailing)
    r.tagged = True
    r.out.tag_indent = r.base
    r.out.tag_same_line = False
    r.out.tag_gap = 1
    r.set_indent()
    if args and args[0]:
        r.out.tag = r.expand(args[0]).replace(GLUE, "")


def _hp(r: _Renderer, rest: str) -> None:
    r.paragraph()
    r.tagged = False
    r.set_indent()


def _rs(r: _Renderer, rest: str) -> None:
    r.out.flush()
    r.relative.append((r.base, r.tagged))
    args = split_args(rest)
    r.base = r.base + _width(args[0] if args else None, r.prevailing)
    r.tagged = False
    r.set_indent()


def _re(r: _Renderer, rest: str) -> None:
    r.out.flush()
    if r.relative:
        r.base, r.tagged = r.relative.pop()
    r.set_indent()


def _font(r: _Renderer, rest: str) -> None:
    args = split_args(rest)
    if args:
        r.out.text(" ".join(r.expand(a) for a in args))


def _alternating(r: _Renderer, rest: str) -> None:
    r.out.text("".join(r.expand(a).replace(GLUE, "") for a in split_args(rest)))


def _br(r: _Renderer, rest: str) -> None:
    r.out.flush()


def _sp(r: _Renderer, rest: str) -> None:
    if rest.strip() and _evaluate(rest.strip()) <= 0:
        r.out.flush()
        return
    r.out.blank()


def _nf(r: _Renderer, rest: str) -> None:
    r.out.flush()
    r.out.nofill = True


def _fi(r: _Renderer, rest: str) -> None:
    r.out.flush()
    r.out.nofill = False


def _in(r: _Renderer, rest: str) -> None:
    r.out.flush()
    argument = rest.strip().split(" ")[0] if rest.strip() else ""
    if not argument:
        r.set_indent()
        return
    sign = argument[0] if argument[0] in "+-" else ""
    amount = _width(argument.lstrip("+-"), 0)
    if sign == "+":
        r.out.indent += amount
    elif sign == "-":
        r.out.indent = max(0, r.out.indent - amount)
    else:
        r.out.indent = r.base + amount


def _ce(r: _Renderer, rest: str) -> None:
    r.out.flush()
    r.center_lines = int(_evaluate(rest)) if rest.strip() else 1


def _pd(r: _Renderer, rest: str) -> None:
    r.paragraph_space = not rest.strip() or _evaluate(rest.strip()) > 0


def _ds(r: _Renderer, rest: str, *, append: bool = False) -> None:
    parts = rest.split(None, 1)
    if not parts:
        return
    value = parts[1] if len(parts) > 1 else ""
    if value.startswith('"'):
        value = value[1:]
    value = value.replace("\\\\", "\\")
    r.strings[parts[0]] = (r.strings.get(parts[0], "") if append else "") + value


def _nr(r: _Renderer, rest: str) -> None:
    parts = rest.split()
    if len(parts) >= 2:
        value = parts[1]
        current = r.registers.get(parts[0], 0)
        number = int(_evaluate(r.expand(value.lstrip("+-"))))
        r.registers[parts[0]] = current + number if value[0] == "+" else (
            current - number if value[0] == "-" else number)


def _tr(r: _Renderer, rest: str) -> None:
    """Character translations, in pairs; a lone last character becomes a space (`.tr ~`)."""
    characters: list[str] = []
    i = 0
    argument = rest.strip()
    while i < len(argument):
        if argument[i] == "\\" and i + 1 < len(argument):
            if argument[i + 1] in "([":
                name, i = _escape_name(argument, i + 1)
                characters.append(_glyph(name))
            else:
                characters.append(_SIMPLE_ESCAPES.get(argument[i + 1], argument[i + 1]))
                i += 2
        else:
            characters.append(argument[i])
            i += 1
    if len(characters) % 2:
        characters.append(" ")
    for source, target in zip(characters[::2], characters[1::2]):
        if len(source) == 1:
            r.translations[source] = target


def _rm(r: _Renderer, rest: str) -> None:
    for name in rest.split():
        r.macros.pop(name, None)
        r.strings.pop(name, None)


def _rn(r: _Renderer, rest: str) -> None:
    parts = rest.split()
    if len(parts) == 2 and parts[0] in r.macros:
        r.macros[parts[1]] = r.macros.pop(parts[0])


def _als(r: _Renderer, rest: str) -> None:
    parts = rest.split()
    if len(parts) == 2 and parts[1] in r.macros:
        r.macros[parts[0]] = r.macros[parts[1]]


def _if(r: _Renderer, rest: str, lines: list[str], i: int) -> int:
    result, body = r.condition(rest)
    if result:
        r.run_body(body)
        return i
    return r.skip_block(body, lines, i)


def _ie(r: _Renderer, rest: str, lines: list[str], i: int) -> int:
    result, body = r.condition(rest)
    r.conditions.append(result)
    if result:
        r.run_body(body)
        return i
    return r.skip_block(body, lines, i)


def _el(r: _Renderer, rest: str, lines: list[str], i: int) -> int:
    earlier = r.conditions.pop() if r.conditions else True
    if not earlier:
        r.run_body(rest)
        return i
    return r.skip_block(rest, lines, i)


def _de(r: _Renderer, rest: str, lines: list[str], i: int) -> int:
    return r.define(rest, lines, i)


def _am(r: _Renderer, rest: str, lines: list[str], i: int) -> int:
    return r.define(rest, lines, i, append=True)


def _ig(r: _Renderer, rest: str, lines: list[str], i: int) -> int:
    end = rest.split()[0] if rest.split() else "."
    while i < len(lines):
        line = lines[i]
        i += 1
        if line[:1] in (".", "'") and line[1:].strip() == end:
            break
    return i


def _skip_until(end: str):
    def skip(r: _Renderer, rest: str, lines: list[str], i: int) -> int:
        while i < len(lines):
            line = lines[i]
            i += 1
            if line[:1] in (".", "'") and line[1:].strip().startswith(end):
                break
        return i

    return skip


def _so(r: _Renderer, rest: str) -> None:
    # We see one file; the included one is packed (or not) on its own.
    target = rest.strip()
    if target:
        r.out.flush()
        r.out.text(f"See {target}.")
        r.out.flush()


def _ur(r: _Renderer, rest: str) -> None:
    args = split_args(rest)
    r.link_url.append(r.expand(args[0]) if args else "")


def _ue(r: _Renderer, rest: str) -> None:
    url = r.link_url.pop() if r.link_url else ""
    args = split_args(rest)
    trailing = r.expand(args[0]) if args else ""
    if url:
        r.out.text(f"<{url}>{trailing}")
    elif trailing:
        r.out.text(trailing, space=False)


def _mr(r: _Renderer, rest: str) -> None:
    args = [r.expand(a) for a in split_args(rest)] + ["", "", ""]
    r.out.text(f"{args[0]}({args[1]}){args[2]}" if args[1] else args[0] + args[2])


def _sy(r: _Renderer, rest: str) -> None:
    r.out.flush()
    args = split_args(rest)
    r.out.text(" ".join(r.expand(a) for a in args))


def _op(r: _Renderer, rest: str) -> None:
    args = [r.expand(a) for a in split_args(rest)]
    if args:
        r.out.text("[" + " ".join(args) + "]")


def _ys(r: _Renderer, rest: str) -> None:
    r.out.flush()


def _ts(r: _Renderer, rest: str, lines: list[str], i: int) -> int:
    """A tbl table: rows of cells, columns padded to their widest cell."""
    block: list[str] = []
    while i < len(lines):
        line = lines[i]
        i += 1
        if re.match(r"^[.'][ \t]*TE\b", line):
            break
        block.append(line)
    tab = "\t"
    if block and block[0].rstrip().endswith(";"):
        found = re.search(r"tab\s*\((.)\)", block[0])
        tab = found.group(1) if found else tab
        block = block[1:]
    rows: list[list[str]] = []
    row: list[str] = []
    text_block: list[str] | None = None   # the lines of a T{ ... T} cell
    in_format = True

    def take(fragment: str) -> None:
        nonlocal row, text_block
        cells = fragment.split(tab)
        if cells[-1].rstrip().endswith("T{"):
            cells[-1] = cells[-1].rstrip()[:-2]
            row.extend(cells[:-1])
            text_block = [cells[-1]] if cells[-1].strip() else []
            return
        row.extend(cells)
        rows.append(row)
        row = []

    for line in block:
        if in_format:
            in_format = not line.rstrip().endswith(".")
            continue
        if text_block is not None:
            if line.startswith("T}"):
                row.append(" ".join(r.expand(part).strip() for part in text_block))
                text_block = None
                remainder = line[2:]
                if remainder.startswith(tab):
                    take(remainder[1:])
                else:
                    rows.append(row)
                    row = []
            elif line[:1] not in (".", "'"):
                text_block.append(line)
            else:
                font_macro = re.match(r"^[.'][ \t]*(B|I|SM|BR|BI|IB|IR|RB|RI)\b(.*)", line)
                if font_macro:  # fonts are gone; their words stay
                    words = split_args(font_macro.group(2))
                    joiner = "" if len(font_macro.group(1)) == 2 else " "
                    text_block.append(joiner.join(words))
            continue
        if re.match(r"^[.'][ \t]*T&", line):
            in_format = True
            continue
        if line[:1] in (".", "'") or line.strip() in ("_", "=", ""):
            continue
        take(line)
    if row:
        rows.append(row)
    cells_by_row = [[_cell(r, c) for c in cells] for cells in rows]
    cells_by_row = [cells for cells in cells_by_row if any(cells)]
    r.out.end_block()
    if not cells_by_row:
        return i
    columns = max(len(cells) for cells in cells_by_row)
    widths = [max((len(cells[c]) for cells in cells_by_row if c < len(cells)), default=0)
              for c in range(columns)]
    r.out.pending_blank = True
    for cells in cells_by_row:
        r.out.line("  ".join(cell.ljust(widths[c]) for c, cell in enumerate(cells)), r.out.indent)
    r.out.pending_blank = True
    return i


def _cell(r: _Renderer, raw: str) -> str:
    text = raw if "\\" not in raw else r.expand(raw)
    text = text.replace(GLUE, "").strip()
    return "" if text in ("_", "=", "\\^", "^") else text


_REQUESTS = {
    "TH": _th, "SH": _sh, "SS": lambda r, rest: _sh(r, rest, "SS"),
    "PP": _pp, "LP": _pp, "P": _pp,
    "TP": _tp, "TQ": lambda r, rest: _tp(r, rest, another=True), "IP": _ip, "HP": _hp,
    "RS": _rs, "RE": _re,
    "B": _font, "I": _font, "SM": _font, "SB": _font, "R": _font,
    "BR": _alternating, "BI": _alternating, "IB": _alternating, "IR": _alternating,
    "RB": _alternating, "RI": _alternating,
    "br": _br, "sp": _sp, "nf": _nf, "fi": _fi, "EX": _nf, "EE": _fi, "in": _in, "ce": _ce,
    "PD": _pd, "ds": _ds, "as": lambda r, rest: _ds(r, rest, append=True), "nr": _nr,
    "tr": _tr, "rm": _rm, "rn": _rn, "als": _als, "so": _so, "UR": _ur, "UE": _ue, "MT": _ur, "ME": _ue,
    "MR": _mr, "SY": _sy, "OP": _op, "YS": _ys,
    "if": _if, "ie": _ie, "el": _el, "de": _de, "de1": _de, "am": _am, "am1": _am, "ig": _ig,
    "TS": _ts, "EQ": _skip_until("EN"), "PS": _skip_until("PE"),
}
_BLOCK_REQUESTS = frozenset({"if", "ie", "el", "de", "de1", "am", "am1", "ig", "TS", "EQ", "PS"})
