"""What counts as noise: files whose bodies cost many tokens and tell a model little.

Lock files, minified bundles, SVG, base64 blobs, and files that `.gitattributes` marks
`linguist-generated` or `linguist-vendored`. Each check returns the reason a file is listed
without its body, or None. Nothing here reads files except the attribute files themselves.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

from ingest.errors import IngestError
from ingest.gitpatterns import attribute_pattern, regular_file
from ingest.types import Selection

LOCK_FILES = frozenset({
    "package-lock.json", "npm-shrinkwrap.json", "yarn.lock", "pnpm-lock.yaml", "bun.lockb",
    "bun.lock", "deno.lock", "Cargo.lock", "poetry.lock", "Pipfile.lock", "pdm.lock",
    "uv.lock", "pylock.toml", "composer.lock", "Gemfile.lock", "go.sum", "go.work.sum",
    "mix.lock", "pubspec.lock", "Podfile.lock", "Package.resolved", "packages.lock.json",
    "paket.lock", "flake.lock", "gradle.lockfile", "conan.lock", "vcpkg-lock.json",
    "MODULE.bazel.lock", "shard.lock", "stack.yaml.lock", "cabal.project.freeze",
    "renv.lock", "Manifest.toml",
})
MINIFIED_SUFFIXES = (".min.js", ".min.mjs", ".min.css", ".map")

# A line this long is not written by hand; when such lines hold most of a file, the file is
# a bundle or a data dump.
LONG_LINE = 1000
LONG_LINE_SHARE = 0.5
# Prose is often written one paragraph per line, so long lines there are not minification.
PROSE_SUFFIXES = (".md", ".markdown", ".rst", ".txt", ".adoc", ".asciidoc", ".org", ".tex")

# base64 runs this long appear only in embedded data (hex digests are at most 128 digits);
# line-wrapped base64 (PEM, MIME) is not a run and stays text.
BASE64_RUN = 200
BASE64_SHARE = 0.5
# A match can only start where a run starts, so the scan stays linear in the line's length
# (an unanchored `[...]{200,}` would rescan every position of every shorter run).
_BASE64_RUNS = re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{%d,}={0,2}" % BASE64_RUN)

# the root element of an SVG, after an optional XML declaration, comments and a doctype
_SVG_ROOT = re.compile(
    rb"\A\s*(?:<\?xml[^>]{0,500}\?>\s*)?(?:<!--(?:[^-]|-(?!->)){0,4000}-->\s*)*"
    rb"(?:<!DOCTYPE\s+svg[^>]{0,1000}>\s*)?<svg[\s>]", re.IGNORECASE)


def name_reason(relpath: str) -> str | None:
    """Noise recognisable from the path alone."""
    name = relpath.rpartition("/")[2]
    if name in LOCK_FILES:
        return "lock file"
    lowered = name.lower()
    if lowered.endswith((".svg", ".svgz")):
        return "svg"
    if lowered.endswith(MINIFIED_SUFFIXES):
        return "minified"
    return None


def content_reason(relpath: str, data: bytes, text: str) -> str | None:
    """Noise recognisable from the contents: SVG without the suffix, base64 blobs, bundles."""
    if _SVG_ROOT.match(data, 0, 8192):
        return "svg"
    # both blobs and bundles need long lines; most files have none (a split is the fastest
    # way to know: several times faster than a regex scan)
    lines = text.split("\n")
    if max(map(len, lines)) < BASE64_RUN:
        return None
    long_lines = [line for line in lines if len(line) >= BASE64_RUN]
    blob = sum(match.end() - match.start()
               for line in long_lines for match in _BASE64_RUNS.finditer(line))
    if blob > BASE64_SHARE * len(text):
        return "base64 blob"
    if not relpath.lower().endswith(PROSE_SUFFIXES):
        minified = sum(len(line) for line in long_lines if len(line) > LONG_LINE)
        if minified > LONG_LINE_SHARE * len(text):
            return "minified"
    return None


# --------------------------------------------------------------------------- .gitattributes

LINGUIST = ("linguist-generated", "linguist-vendored")


class Attributes:
    """Which selected paths `.gitattributes` marks linguist-generated or linguist-vendored."""

    def __init__(self, marks: dict[str, str] | None = None):
        self._marks = marks or {}   # path relative to SOURCE -> the linguist attribute set on it

    def reason(self, relpath: str) -> str | None:
        """'linguist-generated', 'linguist-vendored' or None."""
        return self._marks.get(relpath)

    def __len__(self) -> int:
        return len(self._marks)


def load_attributes(selection: Selection) -> Attributes:
    """Ask git in one batch call inside a work tree; parse .gitattributes files outside it."""
    if not selection.paths:
        return Attributes()
    if selection.git_root is not None:
        try:
            return Attributes(_git_check_attr(selection))
        except (IngestError, ImportError, OSError) as error:
            selection.warnings.append(f"{error}; reading .gitattributes files directly")
    return Attributes(_parse_attributes(selection.root, selection.paths))


def _truthy(value: str) -> bool | None:
    """Linguist's reading of an attribute state: set or 'true' marks, unset or other values
    clear, 'unspecified' says nothing."""
    if value == "unspecified":
        return None
    return value in ("set", "true")


def _decide(states: dict[str, str]) -> str | None:
    for attribute in LINGUIST:
        if _truthy(states.get(attribute, "unspecified")):
            return attribute
    return None


def _git_check_attr(selection: Selection) -> dict[str, str]:
    """One `git check-attr --stdin` per repository (files of recursed submodules are asked
    in their own repository, whose .gitattributes git would not read from the superproject)."""
    groups: dict[str, list[str]] = {}
    nested = sorted(selection.recursed_submodules, key=len, reverse=True)
    for path in selection.paths:
        owner = next((sub for sub in nested if path.startswith(sub + "/")), "")
        groups.setdefault(owner, []).append(path)
    marks: dict[str, str] = {}
    for owner, paths in groups.items():
        offset = len(owner) + 1 if owner else 0
        directory = selection.root / owner if owner else selection.root
        states = _check_attr(directory, [path[offset:] for path in paths])
        for path in paths:
            reason = _decide(states.get(path[offset:], {}))
            if reason:
                marks[path] = reason
    return marks


def _check_attr(directory: Path, paths: list[str]) -> dict[str, dict[str, str]]:
    import git

    command = [git.Git.GIT_PYTHON_GIT_EXECUTABLE or "git", "-c", "core.quotepath=off",
               "check-attr", "-z", "--stdin", *LINGUIST]
    # a file, not a pipe: git answers while it reads, and a full pipe both ways would block
    with tempfile.TemporaryFile() as names:
        names.write(b"".join(os.fsencode(path) + b"\0" for path in paths))
        names.seek(0)
        try:
            output = git.Git(str(directory)).execute(command, istream=names,
                                                      stdout_as_string=False)
        except git.GitCommandError as error:
            raise IngestError(f"git check-attr failed in {directory}: {error.stderr}") from error
    assert isinstance(output, bytes)
    fields = output.split(b"\0")
    count = (len(fields) - 1) // 3 * 3
    names, attributes, values = fields[0:count:3], fields[1:count:3], fields[2:count:3]
    states: dict[str, dict[str, str]] = {}
    # nearly every answer is "unspecified", which _decide reads as absent: decode only the rest
    for index, value in enumerate(values):
        if value != b"unspecified":
            path = os.fsdecode(names[index])
            states.setdefault(path, {})[os.fsdecode(attributes[index])] = os.fsdecode(value)
    return states


def _parse_attributes(root: Path, paths: Iterable[str]) -> dict[str, str]:
    """Outside git: every .gitattributes from SOURCE down to each file's directory; deeper
    files override shallower ones, later lines override earlier ones."""
    paths = list(paths)
    directories = {""}
    for path in paths:
        while "/" in path:
            path = path.rpartition("/")[0]
            if path in directories:
                break
            directories.add(path)
    rules: dict[str, list[tuple[re.Pattern[str], dict[str, str]]]] = {}
    for directory in directories:
        candidate = os.path.join(root, directory, ".gitattributes")
        if regular_file(candidate):
            parsed = _parse_attributes_file(candidate)
            if parsed:
                rules[directory + "/" if directory else ""] = parsed
    if not rules:
        return {}
    marks: dict[str, str] = {}
    for path in paths:
        states: dict[str, str] = {}
        # shallow to deep, lines in order: later assignments win
        parts = path.split("/")
        for depth in range(len(parts)):
            prefix = "/".join(parts[:depth]) + "/" if depth else ""
            for pattern, assignments in rules.get(prefix, ()):
                if pattern.fullmatch(path[len(prefix):]):
                    states.update(assignments)
        reason = _decide(states)
        if reason:
            marks[path] = reason
    return marks


def _parse_attributes_file(file: str) -> list[tuple[re.Pattern[str], dict[str, str]]]:
    try:
        with open(file, "rb") as handle:
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return []
    rules = []
    for line in text.removeprefix("\ufeff").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line.startswith("[attr]"):
            continue
        pattern, rest = _split_pattern(line)
        if not pattern or pattern.startswith("!"):     # negative patterns are forbidden
            continue
        assignments: dict[str, str] = {}
        for token in rest.split():
            if token.startswith("-"):
                name, value = token[1:], "unset"
            elif token.startswith("!"):
                name, value = token[1:], "unspecified"
            elif "=" in token:
                name, value = token.split("=", 1)
            else:
                name, value = token, "set"
            if name in LINGUIST:
                assignments[name] = value
        if assignments:
            rules.append((attribute_pattern(pattern), assignments))
    return rules


def _split_pattern(line: str) -> tuple[str, str]:
    """A pattern may be a C-style quoted string (to hold spaces)."""
    if line.startswith('"'):
        end = 1
        chars = []
        while end < len(line) and line[end] != '"':
            if line[end] == "\\" and end + 1 < len(line):
                end += 1
                chars.append({"n": "\n", "t": "\t"}.get(line[end], line[end]))
            else:
                chars.append(line[end])
            end += 1
        return "".join(chars), line[end + 1:]
    pattern, _, rest = line.partition(" ")
    if "\t" in pattern:
        pattern, _, more = pattern.partition("\t")
        rest = more + " " + rest
    return pattern, rest
