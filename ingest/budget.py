"""Fit a pack into a token budget by degrading files step by step: full -> outline -> listed.

Priority (lowest is degraded first), by path only so the result is deterministic:
  0 data, vendored and generated files (csv/jsonl, data/fixtures folders, vendor/, dist/, *.min.*)
  1 tests
  2 documentation and examples (docs/, examples/, *.md, *.rst, *.txt, nested READMEs)
  3 configuration and build files (*.toml, *.yaml, *.json, Makefile, Dockerfile, .github/, ...)
  4 source code (everything else)
  5 the top-level README, the map of the repository: degraded only after all the source
Within a tier, files whose full block costs the most tokens go first (they free the most), ties
by path. A tier is first reduced to outlines, then listed, before the next tier is touched.

Counting is exact without re-tokenizing the output: the caller prices each block (a block's
count is exact by construction, see render.py) and gives the exact total for a set of
statuses, which is only asked for when the running estimate says the pack fits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ingest.errors import IngestError

TIER_NAMES = ("data/vendored/generated", "tests", "docs", "config", "source", "README")

_DATA_EXTENSIONS = {"csv", "tsv", "jsonl", "ndjson", "parquet", "arff", "dat", "log", "pbtxt", "snap", "map"}
_DATA_DIRS = {"data", "dataset", "datasets", "fixtures", "testdata", "test_data", "assets", "static", "vendor",
              "vendored", "third_party", "thirdparty", "third-party", "external", "node_modules", "dist",
              "build", "generated", "gen", "__snapshots__", "snapshots"}
_TEST_DIRS = {"test", "tests", "testing", "spec", "specs", "__tests__", "e2e", "benchmarks", "bench"}
_DOC_DIRS = {"doc", "docs", "documentation", "examples", "example", "docs_src", "tutorial", "tutorials", "samples"}
_DOC_EXTENSIONS = {"md", "markdown", "rst", "txt", "adoc", "asciidoc", "org", "tex", "ipynb", "html", "htm", "pdf"}
_CONFIG_EXTENSIONS = {"toml", "yaml", "yml", "json", "json5", "ini", "cfg", "conf", "xml", "properties", "gradle",
                      "lock", "env", "editorconfig", "gitignore", "gitattributes", "dockerignore", "in"}
_CONFIG_NAMES = {"makefile", "dockerfile", "cmakelists.txt", "setup.py", "setup.cfg", "pyproject.toml",
                 "package.json", "tsconfig.json", "cargo.toml", "go.mod", "go.sum", "gemfile", "rakefile",
                 "justfile", "procfile", "license", "licence", "copying", "notice", "codeowners"}


class BudgetTooSmall(IngestError):
    pass


def priority(path: str) -> int:
    """The tier of `path` (see the module docstring); higher survives longer."""
    parts = path.lower().split("/")
    name = parts[-1]
    folders = set(parts[:-1])
    extension = name.rpartition(".")[2] if "." in name else ""
    if len(parts) == 1 and name.startswith("readme"):
        return 5
    if (folders & _DATA_DIRS) or extension in _DATA_EXTENSIONS or ".min." in name or name.endswith(
        ("_pb2.py", ".pb.go", ".generated.ts")
    ):
        return 0
    if (
        folders & _TEST_DIRS
        or name.startswith(("test_", "tests_"))
        or name.endswith(("_test.py", "_test.go", "_tests.py", "_spec.rb", "conftest.py"))
        or ".test." in name
        or ".spec." in name
    ):
        return 1
    if folders & _DOC_DIRS or extension in _DOC_EXTENSIONS or name.startswith("readme"):
        return 2
    if name in _CONFIG_NAMES or extension in _CONFIG_EXTENSIONS or ".github" in folders or name.startswith("."):
        return 3
    return 4


@dataclass
class Candidate:
    """A file as the budget sees it."""

    path: str
    status: str            # status before fitting: "full", "reduced" or "listed"
    tokens: int            # tokens of its block at that status (0 when listed)


@dataclass
class Reduction:
    path: str
    before: str
    after: str


@dataclass
class FitResult:
    statuses: list[str]
    tokens: list[int]                    # block tokens per file at its final status (0 = listed)
    total: int                           # exact total of the whole output
    reductions: list[Reduction] = field(default_factory=list)


def fit(
    files: Sequence[Candidate],
    budget: int,
    *,
    outline_tokens: Callable[[int], int | None],
    report_line_tokens: Callable[[int, str], int],
    report_frame_tokens: int,
    exact_total: Callable[[list[str], list[int]], int],
) -> FitResult:
    """Degrade files until `exact_total` <= `budget`.

    outline_tokens(i): tokens of file i's outline block, or None when it has no outline.
    report_line_tokens(i, status): tokens of file i's line in the not-inlined report.
    report_frame_tokens: tokens of the report's header and footer (present once any file is).
    exact_total(statuses, block_tokens): the exact token count of the output they render to.
    """
    statuses = [f.status for f in files]
    tokens = [f.tokens for f in files]
    total = exact_total(statuses, tokens)
    reductions: list[Reduction] = []
    if total <= budget:
        return FitResult(statuses, tokens, total, reductions)

    omitted = sum(1 for s in statuses if s != "full")
    estimate = total

    def apply(index: int, new_status: str, new_tokens: int) -> None:
        nonlocal estimate, omitted
        old_status = statuses[index]
        delta = new_tokens - tokens[index] + report_line_tokens(index, new_status)
        if old_status == "full":
            if omitted == 0:
                delta += report_frame_tokens
            omitted += 1
        else:
            delta -= report_line_tokens(index, old_status)
        statuses[index], tokens[index] = new_status, new_tokens
        reductions.append(Reduction(files[index].path, old_status, new_status))
        estimate += delta

    def fits_exactly() -> bool:
        nonlocal estimate, total
        if estimate > budget:
            return False
        total = exact_total(statuses, tokens)
        estimate = total     # the summary's digits may have moved it a little
        return total <= budget

    by_tier: dict[int, list[int]] = {}
    for index, candidate in enumerate(files):
        by_tier.setdefault(priority(candidate.path), []).append(index)
    for tier in sorted(by_tier):
        members = sorted(by_tier[tier], key=lambda i: (-tokens[i], files[i].path))
        for index in members:
            if statuses[index] != "full":
                continue
            reduced = outline_tokens(index)
            if reduced is not None and reduced < tokens[index]:
                apply(index, "reduced", reduced)
                if fits_exactly():
                    return FitResult(statuses, tokens, total, reductions)
        for index in sorted(members, key=lambda i: (-tokens[i], files[i].path)):
            if statuses[index] == "listed":
                continue
            apply(index, "listed", 0)
            if fits_exactly():
                return FitResult(statuses, tokens, total, reductions)
    total = exact_total(statuses, tokens)
    if total <= budget:
        return FitResult(statuses, tokens, total, reductions)
    raise BudgetTooSmall(
        f"the pack needs {total} tokens even with every file listed by path only, over the budget of {budget}",
        f"raise --budget to at least {total}, or narrow the selection with --include/--exclude",
    )
