"""mdoc(7), the BSD man page macros, for the roff renderer in manuals_roff.py.

Covered: the prologue (`.Dd`, `.Dt`, `.Os`: header and footer), sections (`.Sh`, `.Ss`),
paragraphs (`.Pp`), lists (`.Bl` -tag, -hang, -ohang, -inset, -bullet, -dash, -enum, -item,
-column, with -width, -offset, -compact; `.It`, `.El`, `Xo`/`Xc` tags), displays (`.Bd`
-literal/-unfilled/-filled with -offset, `.Ed`, `.D1`, `.Dl`), the semantic inline macros
(`Nm`, `Nd`, `Fl`, `Ar`, `Op`, `Cm`, `Ic`, `Pa`, `Xr`, `Fn`, `Fa`, `Ft`, `In`, `Ev`, `Er`,
`Dv`, `Va`, `Sx`, `Lk`, `Mt`, `St`, `Ex`, `Rv`, `At`/`Bx`/`Ox`/...), the enclosures (`Pq`,
`Dq`, `Sq`, `Qq`, `Aq`, `Bq`, `Brq`, `Ql` and their `-o`/`-c` halves), spacing (`Ns`, `Pf`,
`Sm`) and references (`.Rs` ... `.Re`).

Macros are recognised inside a line the way mdoc does it: a word that names a callable macro
starts that macro; punctuation such as `, . ) ]` sticks to the word before it and `( [` to the
word after.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the renderer mixes this class in; these are its parts we use
    from ingest.manuals_roff import _Layout

_CLOSING = frozenset({".", ",", ":", ";", ")", "]", "?", "!"})
_OPENING = frozenset({"(", "["})
_ENCLOSURES = {
    "Op": ("[", "]"), "Pq": ("(", ")"), "Bq": ("[", "]"), "Brq": ("{", "}"), "Aq": ("\u27e8", "\u27e9"),
    "Dq": ("\u201c", "\u201d"), "Sq": ("\u2018", "\u2019"), "Qq": ('"', '"'), "Ql": ("\u2018", "\u2019"),
}
_OPENERS = {"Oo": "[", "Po": "(", "Bo": "[", "Bro": "{", "Ao": "\u27e8", "Do": "\u201c",
            "So": "\u2018", "Qo": '"'}
_CLOSERS = {"Oc": "]", "Pc": ")", "Bc": "]", "Brc": "}", "Ac": "\u27e9", "Dc": "\u201d",
            "Sc": "\u2019", "Qc": '"'}
_PLAIN = frozenset({"Cm", "Ic", "Li", "Sy", "Em", "Pa", "Va", "Dv", "Er", "Ev", "Ad", "Fa", "Ms",
                    "Tn", "Cd", "Vt", "Ot", "Sx", "No", "An", "Ft", "Mt", "Ev", "Fr", "Lb"})
_SYSTEMS = {"Bsx": "BSD/OS", "Dx": "DragonFly", "Fx": "FreeBSD", "Nx": "NetBSD", "Ox": "OpenBSD"}
_CALLABLE = frozenset(
    set(_ENCLOSURES) | set(_OPENERS) | set(_CLOSERS) | _PLAIN | set(_SYSTEMS)
    | {"Fl", "Ar", "Nm", "Xr", "Fn", "Lk", "St", "At", "Bx", "Ux", "Ns", "Pf", "Ta", "Xo", "Xc",
       "Eo", "Ec", "Es", "Sm", "Fo", "Fc", "In"}
)
_STANDARDS = {
    "-p1003.1": "IEEE Std 1003.1 (\u201cPOSIX.1\u201d)",
    "-p1003.1-2001": "IEEE Std 1003.1-2001 (\u201cPOSIX.1\u201d)",
    "-p1003.1-2004": "IEEE Std 1003.1-2004 (\u201cPOSIX.1\u201d)",
    "-p1003.1-2008": "IEEE Std 1003.1-2008 (\u201cPOSIX.1\u201d)",
    "-p1003.1-2017": "IEEE Std 1003.1-2017 (\u201cPOSIX.1\u201d)",
    "-p1003.2": "IEEE Std 1003.2 (\u201cPOSIX.2\u201d)",
    "-ansiC": "ANSI X3.159-1989 (\u201cANSI C89\u201d)",
    "-isoC": "ISO/IEC 9899:1990 (\u201cISO C90\u201d)",
    "-isoC-99": "ISO/IEC 9899:1999 (\u201cISO C99\u201d)",
    "-isoC-2011": "ISO/IEC 9899:2011 (\u201cISO C11\u201d)",
    "-xpg4": "X/Open Portability Guide Issue 4 (\u201cXPG4\u201d)",
    "-susv2": "Version 2 of the Single UNIX Specification (\u201cSUSv2\u201d)",
    "-susv3": "Version 3 of the Single UNIX Specification (\u201cSUSv3\u201d)",
    "-susv4": "Version 4 of the Single UNIX Specification (\u201cSUSv4\u201d)",
    "-svid4": "System V Interface Definition, Fourth Edition (\u201cSVID4\u201d)",
    "-ieee754": "IEEE Std 754-1985",
}
VOLUMES = {
    "1": "General Commands Manual", "2": "System Calls Manual", "3": "Library Functions Manual",
    "4": "Device Drivers Manual", "5": "File Formats Manual", "6": "Games Manual",
    "7": "Miscellaneous Information Manual", "8": "System Manager's Manual",
    "9": "Kernel Developer's Manual",
}
_MDOC_STRINGS = {
    "Le": "\u2264", "Ge": "\u2265", "Lt": "<", "Gt": ">", "Pm": "\u00b1", "If": "\u221e",
    "Na": "NaN", "Ba": "|", "Am": "&", "Lq": "\u201c", "Rq": "\u201d", "Ne": "\u2260",
    "Pi": "\u03c0", "Aq": "'", "q": '"', "Ua": "\u2191", "Ra": "\u2192", "Ql": "'", "Ds": "      ",
}
_REFERENCE_ORDER = ("%T", "%B", "%J", "%R", "%V", "%N", "%I", "%C", "%D", "%P", "%Q", "%U", "%O")
_SECTION_INDENT = 5  # mandoc's text column


@dataclass
class _Block:
    """An open .Bl list or .Bd display."""

    kind: str                    # list type ("tag", "bullet", ...) or "display"
    base: int                    # column of tags / display text
    body: int                    # column of item text
    compact: bool = False
    number: int = 0
    columns: list[int] = field(default_factory=list)
    item_open: bool = False
    nofill_before: bool = False


class _Words:
    """Words of one line with mdoc's spacing: punctuation sticks to its neighbour."""

    def __init__(self, spacing: bool) -> None:
        self.items: list[tuple[str, bool]] = []
        self.nospace_next = False
        self.spacing = spacing

    def add(self, text: str, space: bool = True) -> None:
        self.items.append((text, space and self.spacing and not self.nospace_next))
        self.nospace_next = False

    def punctuation(self, token: str) -> None:
        if token in _CLOSING:
            self.add(token, space=False)
        elif token in _OPENING:
            self.add(token)
            self.nospace_next = True
        else:
            self.add(token)

    def text(self) -> str:
        out = ""
        for index, (word, space) in enumerate(self.items):
            out += (" " if space and index else "") + word
        return out

    def leading_space(self) -> bool:
        return self.items[0][1] if self.items else True


class MdocMacros:
    out: _Layout
    expand: Callable[..., str]
    split_args: Callable[[str], list[str]]
    indent_width: Callable[[str | None, int], int]
    strings: dict[str, str]

    def __init__(self) -> None:
        self.strings.update(_MDOC_STRINGS)
        self.mdoc_name = ""
        self.mdoc_section = ""
        self.mdoc_date = ""
        self.mdoc_os = ""
        self.mdoc_title = ""
        self.mdoc_blocks: list[_Block] = []
        self.mdoc_spacing = True
        self.mdoc_in_tag = False        # an `.It ... Xo` tag continues until Xc
        self.mdoc_end_tag = False
        self.mdoc_function: list[str] | None = None   # .Fo name, then .Fa arguments
        self.mdoc_reference: list[tuple[str, str]] | None = None
        self.mdoc_split_authors = False

    # -- dispatch ------------------------------------------------------------------------------

    def mdoc_handler(self, name: str) -> Callable[[Any, str], None] | None:
        if name in _LINE_MACROS:
            return _LINE_MACROS[name]
        if name in _CALLABLE:
            return lambda renderer, rest: renderer.mdoc_line(name, rest)
        if name.startswith("%") and len(name) == 2:
            return lambda renderer, rest: renderer.mdoc_reference_field(name, rest)
        return None

    def mdoc_after_line(self) -> None:
        if self.mdoc_end_tag:
            self.mdoc_end_tag = False
            self.mdoc_in_tag = False
            self.out.finish_tag()

    def mdoc_line(self, name: str, rest: str) -> None:
        """A line whose macro is callable: its words go into the paragraph."""
        if name == "Nm" and self.mdoc_section == "SYNOPSIS" and not self.out.collecting_tag:
            self.out.end_block()
            self.out.indent = self.mdoc_indent()
        words = self.mdoc_words([name] + self.split_args(rest))
        self.mdoc_emit(words)

    def mdoc_emit(self, words: _Words) -> None:
        if words.items:
            self.out.text(words.text(), space=words.leading_space())
        if words.nospace_next or not self.mdoc_spacing:
            self.out.glue = True

    # -- words ---------------------------------------------------------------------------------

    def mdoc_words(self, tokens: list[str]) -> _Words:
        words = _Words(self.mdoc_spacing)
        self.mdoc_sequence(tokens, words)
        return words

    def mdoc_sequence(self, tokens: list[str], words: _Words) -> None:
        i = 0
        while i < len(tokens):
            token = tokens[i]
            if token in _CALLABLE:
                i = self.mdoc_call(token, tokens, i + 1, words)
            else:
                self.mdoc_plain(token, words)
                i += 1

    def mdoc_plain(self, token: str, words: _Words) -> None:
        if token in _CLOSING or token in _OPENING or token == "|":
            words.punctuation(token)
        else:
            words.add(self.expand(token).replace("\x01", ""))

    def mdoc_call(self, name: str, tokens: list[str], i: int, words: _Words) -> int:
        """Apply the callable macro `name` to tokens[i:]; returns where its arguments end."""
        if name in _ENCLOSURES:
            opening, closing = _ENCLOSURES[name]
            end = len(tokens)
            while end > i and tokens[end - 1] in _CLOSING:
                end -= 1
            words.add(opening)
            words.nospace_next = True
            self.mdoc_sequence(tokens[i:end], words)
            words.add(closing, space=False)
            for token in tokens[end:]:
                words.add(token, space=False)
            return len(tokens)
        if name in _OPENERS:
            words.add(_OPENERS[name])
            words.nospace_next = True
            return i
        if name in _CLOSERS:
            words.add(_CLOSERS[name], space=False)
            return i
        if name == "Ns":
            words.nospace_next = True
            return i
        if name == "Sm":
            if i < len(tokens) and tokens[i] in ("on", "off"):
                self.mdoc_spacing = tokens[i] == "on"
                i += 1
            else:
                self.mdoc_spacing = not self.mdoc_spacing
            words.spacing = self.mdoc_spacing
            return i
        if name == "Xo":
            self.mdoc_in_tag = self.out.collecting_tag
            return i
        if name == "Xc":
            if self.mdoc_in_tag:
                self.mdoc_end_tag = True
            return i
        if name == "Ta":
            words.add("\t", space=False)
            words.nospace_next = True
            return i
        if name == "Pf":
            if i < len(tokens):
                words.add(self.expand(tokens[i]))
                words.nospace_next = True
                i += 1
            return i
        if name in ("Eo", "Ec", "Es"):
            if i < len(tokens) and tokens[i] not in _CALLABLE:
                words.add(self.expand(tokens[i]), space=name != "Ec")
                words.nospace_next = name != "Ec"
                i += 1
            return i
        if name == "Fo":
            if i < len(tokens):
                self.mdoc_function = [self.expand(tokens[i])]
                i += 1
            return i
        if name == "Fc":
            if self.mdoc_function is not None:
                function, *arguments = self.mdoc_function
                self.mdoc_function = None
                words.add(f"{function}({', '.join(arguments)})"
                          + (";" if self.mdoc_section == "SYNOPSIS" else ""))
            return i

        end = i
        while end < len(tokens) and tokens[end] not in _CALLABLE:
            end += 1
        args = tokens[i:end]
        content = [a for a in args if a not in _CLOSING and a not in _OPENING]
        trailing = [a for a in args if a in _CLOSING or a in _OPENING]

        if name == "Fa" and self.mdoc_function is not None:
            self.mdoc_function.extend(self.expand(a) for a in content)
            return end
        if name == "Fl":
            if not content:
                words.add("-")
                # `.Fl Fl long` is how mdoc writes --long.
                words.nospace_next = not args and end < len(tokens)
            for arg in args:
                if arg in _CLOSING or arg in _OPENING or arg == "|":
                    words.punctuation(arg)
                else:
                    words.add("-" + self.expand(arg))
            return end
        if name in ("Ar", "Nm") and not content:
            words.add("file ..." if name == "Ar" else self.mdoc_name)
            for arg in trailing:
                words.punctuation(arg)
            return end
        if name == "Nm" and not self.mdoc_name and content:
            self.mdoc_name = self.expand(content[0])
        if name == "Xr":
            page = [self.expand(a) for a in content[:2]]
            words.add(f"{page[0]}({page[1]})" if len(page) == 2 else "".join(page))
            for arg in content[2:]:
                words.add(self.expand(arg))
            for arg in trailing:
                words.punctuation(arg)
            return end
        if name == "Fn":
            if content:
                function = self.expand(content[0])
                arguments = ", ".join(self.expand(a) for a in content[1:])
                synopsis = self.mdoc_section == "SYNOPSIS"
                words.add(f"{function}({arguments})" + (";" if synopsis else ""))
            for arg in trailing:
                words.punctuation(arg)
            return end
        if name == "In":
            for arg in content:
                header = f"<{self.expand(arg)}>"
                synopsis = self.mdoc_section == "SYNOPSIS"
                words.add(f"#include {header}" if synopsis else header)
            for arg in trailing:
                words.punctuation(arg)
            return end
        if name == "Lk":
            if content:
                url = self.expand(content[0])
                label = " ".join(self.expand(a) for a in content[1:])
                words.add(f"{label}: {url}" if label else url)
            for arg in trailing:
                words.punctuation(arg)
            return end
        if name == "St":
            for arg in content:
                words.add(_STANDARDS.get(arg, self.expand(arg)))
            for arg in trailing:
                words.punctuation(arg)
            return end
        if name in ("At", "Bx", "Ux") or name in _SYSTEMS:
            version = [self.expand(a) for a in content]
            if name == "At":
                words.add(("Version " + version[0].lstrip("v") + " " if version else "") + "AT&T UNIX")
            elif name == "Bx":
                words.add((version[0] if version else "") + "BSD"
                          + (f" {'-'.join(version[1:])}" if len(version) > 1 else ""))
            elif name == "Ux":
                words.add("UNIX")
            else:
                words.add(_SYSTEMS[name] + (f" {version[0]}" if version else ""))
            for arg in trailing:
                words.punctuation(arg)
            return end
        # The plain semantic macros (Cm, Pa, Ev, ...): their words as they are.
        for arg in args:
            if name == "An" and arg in ("-split", "-nosplit"):
                self.mdoc_split_authors = arg == "-split"
                continue
            self.mdoc_plain(arg, words)
        return end

    # -- blocks --------------------------------------------------------------------------------

    def mdoc_indent(self) -> int:
        """The column text goes to now: the innermost list item's body or display, else the
        section's."""
        for block in reversed(self.mdoc_blocks):
            if block.kind == "display":
                return block.base
            return block.body if block.item_open else block.base
        return _SECTION_INDENT

    def mdoc_reference_field(self, name: str, rest: str) -> None:
        if self.mdoc_reference is not None:
            self.mdoc_reference.append((name, self.expand(rest.strip()).replace("\x01", "")))


def _offset(r: Any, argument: str) -> int:
    """A list's or display's -offset or -width, in characters."""
    if argument in ("indent", "Ds"):
        return 6
    if argument == "indent-two":
        return 12
    if argument in ("left", "center", "centre", "right"):
        return 0
    if re.fullmatch(r"[+-]?\d+(\.\d*)?[a-zA-Z]?", argument):
        return r.indent_width(argument, 0)
    return len(argument)


def _dd(r: Any, rest: str) -> None:
    r.mdoc_date = " ".join(r.expand(a) for a in r.split_args(rest))
    if r.mdoc_date.startswith("$Mdocdate:"):
        r.mdoc_date = r.mdoc_date.removeprefix("$Mdocdate:").rstrip("$ ").strip()
    r.section_indent = r.base = _SECTION_INDENT
    r.out.indent = _SECTION_INDENT
    _update_frame(r)


def _dt(r: Any, rest: str) -> None:
    args = [r.expand(a) for a in r.split_args(rest)]
    if args:
        r.mdoc_title = f"{args[0]}({args[1]})" if len(args) > 1 else args[0]
        volume = VOLUMES.get(args[1][:1], "") if len(args) > 1 else ""
        r.header = (r.mdoc_title, volume, r.mdoc_title)
    r.section_indent = r.base = _SECTION_INDENT
    _update_frame(r)


def _os(r: Any, rest: str) -> None:
    r.mdoc_os = " ".join(r.expand(a) for a in r.split_args(rest))
    _update_frame(r)


def _update_frame(r: Any) -> None:
    if r.mdoc_title:
        r.footer = (r.mdoc_os, r.mdoc_date, r.mdoc_title)


def _section(r: Any, rest: str, kind: str) -> None:
    title = r.mdoc_words(r.split_args(rest)).text()
    r.mdoc_blocks.clear()
    if kind == "Sh":
        r.mdoc_section = title
    r.section_heading(kind, title)
    r.out.indent = _SECTION_INDENT


def _pp(r: Any, rest: str) -> None:
    r.out.blank()
    r.out.indent = r.mdoc_indent()


def _nd(r: Any, rest: str) -> None:
    words = r.mdoc_words(r.split_args(rest))
    r.out.text("\u2014 " + words.text())


def _bl(r: Any, rest: str) -> None:
    args = r.split_args(rest)
    kind, width, offset, compact, columns = "item", None, 0, False, []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "-width" and index + 1 < len(args):
            width = args[index + 1]
            index += 1
        elif arg == "-offset" and index + 1 < len(args):
            offset = _offset(r, args[index + 1])
            index += 1
        elif arg == "-compact":
            compact = True
        elif arg.startswith("-") and arg[1:] in ("tag", "hang", "ohang", "inset", "diag", "bullet",
                                                 "dash", "hyphen", "enum", "item", "column"):
            kind = arg[1:]
        elif kind == "column":
            columns.append(len(r.expand(arg)) if not arg.startswith("-") else 0)
        index += 1
    r.out.end_block()
    base = r.mdoc_indent() + offset
    defaults = {"bullet": 2, "dash": 2, "hyphen": 2, "enum": 4, "item": 0, "column": 0}
    if kind in defaults:
        body = base + defaults[kind]
    else:
        tag_width = 8 if width is None else (
            len(r.mdoc_words(r.split_args(width)).text()) if width in ("Fl", "Ar", "Cm") else _offset(r, width))
        body = base + tag_width + 2
    r.mdoc_blocks.append(_Block(kind, base, body, compact, columns=columns))
    if not compact:
        r.out.blank()


def _it(r: Any, rest: str) -> None:
    args = r.split_args(rest)
    # `.It ... Xo`: the tag goes on over the next lines until an Xc.
    r.mdoc_in_tag = "Xo" in args
    args = [a for a in args if a != "Xo"]
    block = next((b for b in reversed(r.mdoc_blocks) if b.kind != "display"), None)
    if block is None:
        r.mdoc_emit(r.mdoc_words(args))
        return
    while r.mdoc_blocks and r.mdoc_blocks[-1] is not block:
        r.mdoc_blocks.pop()  # a display left open inside the previous item
    r.out.end_block()
    r.out.collecting_tag = False
    if not block.compact and block.kind != "column":  # table rows stay together
        r.out.blank()
    block.item_open = True
    out = r.out
    out.tag_same_line = False
    out.tag_gap = 2
    out.tag_indent = block.base
    if block.kind in ("bullet", "dash", "hyphen", "enum"):
        block.number += 1
        out.tag_gap = 1
        out.indent = block.body
        out.tag = {"bullet": "\u2022", "enum": f"{block.number}."}.get(block.kind, "-")
        return
    if block.kind == "item":
        out.indent = block.body
        return
    if block.kind == "column":
        cells, current = [], []
        for arg in args:
            if arg == "Ta":
                cells.append(current)
                current = []
            else:
                parts = arg.split("\t")
                current.append(parts[0])
                for part in parts[1:]:
                    cells.append(current)
                    current = [part] if part else []
        cells.append(current)
        texts = [r.mdoc_words(cell).text() for cell in cells]
        padded = [text.ljust(block.columns[n] + 2) if n < len(block.columns) and n < len(texts) - 1
                  else text for n, text in enumerate(texts)]
        out.line("".join(padded).rstrip(), block.base)
        out.indent = block.base
        return
    words = r.mdoc_words(args)
    tag = words.text()
    if block.kind == "ohang":
        out.line(tag, block.base)
        out.indent = block.base
        return
    if block.kind in ("inset", "diag"):
        out.indent = block.base
        out.text(tag)
        return
    out.indent = block.body
    out.tag_same_line = block.kind == "hang"
    if r.mdoc_in_tag:
        out.collecting_tag = True
        out.tag_words = tag
    else:
        out.tag = tag


def _el(r: Any, rest: str) -> None:
    r.out.end_block()
    r.out.collecting_tag = False
    while r.mdoc_blocks:
        if r.mdoc_blocks.pop().kind != "display":
            break
    r.out.indent = r.mdoc_indent()


def _bd(r: Any, rest: str) -> None:
    args = r.split_args(rest)
    offset = 0
    if "-offset" in args and args.index("-offset") + 1 < len(args):
        offset = _offset(r, args[args.index("-offset") + 1])
    r.out.end_block()
    if "-compact" not in args:
        r.out.blank()
    base = r.mdoc_indent() + offset
    r.mdoc_blocks.append(_Block("display", base, base, nofill_before=r.out.nofill))
    r.out.nofill = "-literal" in args or "-unfilled" in args
    r.out.indent = base


def _ed(r: Any, rest: str) -> None:
    r.out.flush()
    for index in range(len(r.mdoc_blocks) - 1, -1, -1):
        if r.mdoc_blocks[index].kind == "display":
            r.out.nofill = r.mdoc_blocks[index].nofill_before
            del r.mdoc_blocks[index:]
            break
    r.out.indent = r.mdoc_indent()


def _display_line(r: Any, rest: str) -> None:
    r.out.end_block()
    saved = r.out.indent
    r.out.indent = r.mdoc_indent() + 6
    r.mdoc_emit(r.mdoc_words(r.split_args(rest)))
    r.out.flush()
    r.out.indent = saved


def _synopsis_line(r: Any, rest: str, name: str) -> None:
    """.Ft, .In, .Fd: their own lines in a SYNOPSIS, plain words elsewhere."""
    args = r.split_args(rest)
    if r.mdoc_section != "SYNOPSIS":
        r.mdoc_line(name, rest)
        return
    if name == "Ft":
        r.out.blank()
    else:
        r.out.flush()
    r.mdoc_line(name, rest) if name == "In" else r.out.text(r.mdoc_words(args).text())
    r.out.flush()


def _function(r: Any, rest: str, name: str) -> None:
    if r.mdoc_section == "SYNOPSIS" and name in ("Fn", "Fo"):
        r.out.flush()
    r.mdoc_line(name, rest)
    if r.mdoc_section == "SYNOPSIS" and name in ("Fn", "Fc"):
        r.out.flush()


def _an(r: Any, rest: str) -> None:
    args = r.split_args(rest)
    if args and args[0] in ("-split", "-nosplit"):
        r.mdoc_split_authors = args[0] == "-split"
        return
    if r.mdoc_split_authors and r.mdoc_section == "AUTHORS":
        r.out.flush()
    r.mdoc_line("An", rest)


def _exit_status(r: Any, rest: str) -> None:
    names = [a for a in r.split_args(rest) if a != "-std"] or [r.mdoc_name]
    subject = " and ".join(names)
    plural = len(names) > 1
    r.out.text(f"The {subject} utilit{'ies' if plural else 'y'} exit{'' if plural else 's'} 0 "
               "on success, and >0 if an error occurs.")


def _return_values(r: Any, rest: str) -> None:
    names = [a for a in r.split_args(rest) if a != "-std"] or [r.mdoc_name]
    functions = " and ".join(f"{name}()" for name in names)
    plural = len(names) > 1
    r.out.text(f"The {functions} function{'s' if plural else ''} return{'' if plural else 's'} "
               "the value 0 if successful; otherwise the value -1 is returned and the global "
               "variable errno is set to indicate the error.")


def _rs(r: Any, rest: str) -> None:
    r.mdoc_reference = []


def _re(r: Any, rest: str) -> None:
    fields, r.mdoc_reference = r.mdoc_reference or [], None
    authors = [value for key, value in fields if key == "%A"]
    parts = []
    if authors:
        parts.append(authors[0] if len(authors) == 1 else ", ".join(authors[:-1]) + " and " + authors[-1])
    for key in _REFERENCE_ORDER:
        for found, value in fields:
            if found == key:
                parts.append(f"\u201c{value}\u201d" if key == "%T" else value)
    if parts:
        r.out.text(", ".join(parts) + ".")


def _lb(r: Any, rest: str) -> None:
    args = r.split_args(rest)
    if args:
        r.out.text(f"library \u201c{r.expand(args[0])}\u201d")


def _ignore(r: Any, rest: str) -> None:
    return None


_LINE_MACROS: dict[str, Callable[[Any, str], None]] = {
    "Dd": _dd, "Dt": _dt, "Os": _os,
    "Sh": lambda r, rest: _section(r, rest, "Sh"), "Ss": lambda r, rest: _section(r, rest, "Ss"),
    "Pp": _pp, "Lp": _pp, "Nd": _nd,
    "Bl": _bl, "It": _it, "El": _el, "Bd": _bd, "Ed": _ed, "D1": _display_line,
    "Dl": _display_line,
    "Ft": lambda r, rest: _synopsis_line(r, rest, "Ft"),
    "In": lambda r, rest: _synopsis_line(r, rest, "In"),
    "Fd": lambda r, rest: _synopsis_line(r, rest, "Fd"),
    "Fn": lambda r, rest: _function(r, rest, "Fn"), "Fo": lambda r, rest: _function(r, rest, "Fo"),
    "Fc": lambda r, rest: _function(r, rest, "Fc"),
    "An": _an, "Ex": _exit_status, "Rv": _return_values, "Rs": _rs, "Re": _re, "Lb": _lb,
    "Ud": lambda r, rest: r.out.text("currently under development."),
    "Bk": _ignore, "Ek": _ignore, "Bf": _ignore, "Ef": _ignore, "Db": _ignore, "Tg": _ignore,
    "Hf": _ignore, "Bt": lambda r, rest: r.out.text("is currently in beta test."),
}
