"""Git's pattern language, for the places where git itself cannot be asked (outside a work
tree, and for our own `.dsv4ignore`): wildmatch, gitignore rule files, gitattributes patterns.

Git decides one path component at a time: a directory is checked before anything inside it,
and a pattern counts only when it matches the checked path itself. pathspec's GitIgnoreSpec
answers for whole file paths by weighing matches of their parent directories, which goes wrong
for directories themselves (the whitelist idiom `*` then `!*/` hides every directory), so
the walk uses these rules instead.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass

_POSIX_CLASSES = {
    "alnum": "a-zA-Z0-9", "alpha": "a-zA-Z", "blank": " \\t", "cntrl": "\\x00-\\x1f\\x7f",
    "digit": "0-9", "graph": "!-~", "lower": "a-z", "print": " -~",
    "punct": "!-/:-@\\[-`{-~", "space": " \\t\\n\\r\\f\\v", "upper": "A-Z",
    "xdigit": "0-9A-Fa-f",
}


def wildmatch(pattern: str) -> str:
    """A regular expression (for fullmatch) equivalent to git's wildmatch with WM_PATHNAME:
    `*` and `?` stop at '/', `**/`, `/**/` and `/**` cross directories."""
    out: list[str] = []
    index, length = 0, len(pattern)
    while index < length:
        char = pattern[index]
        if char == "*":
            start = index
            while index < length and pattern[index] == "*":
                index += 1
            double = index - start >= 2
            after_slash = start == 0 or pattern[start - 1] == "/"
            before_slash = index == length or pattern[index] == "/"
            if double and after_slash and before_slash:
                if index == length:
                    out.append(".*")                # 'dir/**': everything inside
                else:
                    out.append("(?:.*/)?")          # '**/': zero or more directories
                    index += 1
            else:
                out.append("[^/]*")                 # other runs of stars are one star
            continue
        if char == "?":
            out.append("[^/]")
        elif char == "[":
            translated, index = _bracket(pattern, index)
            out.append(translated)
            continue
        elif char == "\\" and index + 1 < length:
            index += 1
            out.append(re.escape(pattern[index]))
        else:
            out.append(re.escape(char))
        index += 1
    return "".join(out)


def _bracket(pattern: str, start: int) -> tuple[str, int]:
    """Translate the bracket expression at `start`; returns (regex, index after it). An
    unterminated bracket is a literal '['."""
    index = start + 1
    negate = index < len(pattern) and pattern[index] in "!^"
    if negate:
        index += 1
    members: list[str] = []
    first = True
    while index < len(pattern):
        char = pattern[index]
        if char == "]" and not first:
            body = "".join(members)
            return ("[^/" + body + "]") if negate else ("(?!/)[" + body + "]"), index + 1
        first = False
        if char == "[" and pattern.startswith("[:", index):
            end = pattern.find(":]", index + 2)
            name = pattern[index + 2:end] if end > 0 else ""
            if name in _POSIX_CLASSES:
                members.append(_POSIX_CLASSES[name])
                index = end + 2
                continue
        if char == "\\" and index + 1 < len(pattern):
            index += 1
            char = pattern[index]
        if char == "-" and members and index + 1 < len(pattern) and pattern[index + 1] != "]":
            members.append("-")
        else:
            members.append(re.escape(char) if char in "\\]^-[" else char)
        index += 1
    return re.escape("["), start + 1


@dataclass(frozen=True)
class IgnorePattern:
    regex: re.Pattern[str]
    negated: bool
    directories_only: bool


def parse_ignore_line(line: str) -> IgnorePattern | None:
    """One line of a .gitignore-style file, or None for blanks and comments."""
    line = line.rstrip("\r")
    if not line or line.startswith("#"):
        return None
    # trailing spaces are dropped unless escaped with a backslash
    stripped = line.rstrip(" ")
    if stripped.endswith("\\") and len(stripped) < len(line):
        stripped += " "
    line = stripped
    negated = line.startswith("!")
    if negated:
        line = line[1:]
    directories_only = line.endswith("/")
    line = line.rstrip("/")
    if not line:
        return None
    if "/" in line:         # relative to the ignore file's directory
        body = wildmatch(line.lstrip("/"))
    else:                   # any depth below it: match the last component
        body = r"(?:.*/)?" + wildmatch(line)
    return IgnorePattern(re.compile(body, re.DOTALL), negated, directories_only)


class IgnoreRules:
    """Ignore files in gitignore syntax found at several levels of a tree.

    Each file's patterns apply to paths relative to its own directory. As in git, the deepest
    file with a matching pattern decides, and within one file the last matching pattern wins.
    A directory in `boundaries` (a nested repository) does not inherit rules from above.
    """

    def __init__(self) -> None:
        # '' or 'a/b/' -> (patterns of that directory, one regex that any of them matches)
        self._levels: dict[str, tuple[list[IgnorePattern], re.Pattern[str]]] = {}
        self.boundaries: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self._levels)

    def add(self, directory: str, lines: Iterable[str]) -> None:
        patterns = [p for p in map(parse_ignore_line, lines) if p is not None]
        if patterns:
            # most paths match nothing: one combined search rules them out at once
            anything = re.compile("|".join(f"(?:{p.regex.pattern})" for p in patterns),
                                  re.DOTALL)
            self._levels[directory] = (patterns, anything)

    def add_file(self, directory: str, file: str, warnings: list[str]) -> None:
        try:
            with open(file, "rb") as handle:
                text = handle.read().decode("utf-8", "replace")
        except OSError as error:
            warnings.append(f"could not read {directory}{os.path.basename(file)}: "
                            f"{error.strerror or error}")
            return
        self.add(directory, text.removeprefix("\ufeff").split("\n"))   # git skips a BOM

    def decision(self, path: str, is_dir: bool) -> bool | None:
        """True: ignored, False: re-included by a negation, None: no pattern matched."""
        if not self._levels:
            return None
        directory = path.rpartition("/")[0]
        while True:
            prefix = directory + "/" if directory else ""
            level = self._levels.get(prefix)
            if level is not None:
                relative = path[len(prefix):]
                patterns, anything = level
                if anything.fullmatch(relative):
                    for pattern in reversed(patterns):
                        if ((is_dir or not pattern.directories_only)
                                and pattern.regex.fullmatch(relative)):
                            return not pattern.negated
            if prefix in self.boundaries or not directory:
                return None
            directory = directory.rpartition("/")[0]

    def ignores(self, path: str, is_dir: bool) -> bool:
        return self.decision(path, is_dir) is True

    def ignores_with_parents(self, path: str, is_dir: bool, cache: dict[str, bool]) -> bool:
        """A path is ignored when it or any directory above it is (git never descends into an
        ignored directory, so a negation cannot bring back a file below one)."""
        parts = path.split("/")
        for depth in range(1, len(parts)):
            directory = "/".join(parts[:depth])
            hidden = cache.get(directory)
            if hidden is None:
                hidden = cache[directory] = self.ignores(directory, True)
            if hidden:
                return True
        return self.ignores(path, is_dir)


def attribute_pattern(pattern: str) -> re.Pattern[str]:
    """gitattributes patterns match like gitignore patterns, except that they never match
    the contents of a matching directory (`dir/` matches nothing; `dir/**` is the idiom)."""
    if pattern.endswith("/"):
        return re.compile(r"(?!)")
    if "/" in pattern:
        return re.compile(wildmatch(pattern.lstrip("/")), re.DOTALL)
    return re.compile(r"(?:.*/)?" + wildmatch(pattern), re.DOTALL)


def regular_file(path: str) -> bool:
    """A regular file, not a symlink: like git, ignore and attribute files are never read
    through a symlink (which could point out of SOURCE)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False
