"""Budget: priorities, step-by-step degradation, exactness of the fitted total."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest import PackOptions, pack
from ingest.budget import BudgetTooSmall, Candidate, fit, priority
from ingest.errors import IngestError
from tests.tinymodels import write_tiny_llama_gguf


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from engine.tokenizer import Tokenizer

    path = tmp_path_factory.mktemp("tok") / "tiny.gguf"
    write_tiny_llama_gguf(path)
    return Tokenizer.from_gguf(path)


@pytest.mark.parametrize(
    "path, tier",
    [
        ("README.md", 5), ("readme.rst", 5), ("src/app.py", 4), ("main.go", 4), ("lib/x/README.md", 2),
        ("pyproject.toml", 3), (".github/workflows/ci.yml", 3), ("Makefile", 3), ("docs/index.md", 2),
        ("CHANGELOG.md", 2), ("examples/demo.py", 2), ("tests/test_app.py", 1), ("pkg/app_test.go", 1),
        ("web/a.spec.ts", 1), ("data/table.csv", 0), ("vendor/lib.js", 0), ("static/app.min.js", 0),
        ("proto/x_pb2.py", 0),
    ],
)
def test_priority_tiers(path, tier):
    assert priority(path) == tier


def _fit_plain(files, budget, outline=None):
    """fit() with additive prices: block tokens, 1 per report line, 2 for the frame, no tail."""

    def exact_total(statuses, tokens):
        omitted = sum(1 for s in statuses if s != "full")
        return sum(tokens) + (2 + omitted if omitted else 0)

    return fit(
        files, budget,
        outline_tokens=lambda i: (outline or {}).get(files[i].path),
        report_line_tokens=lambda i, status: 1,
        report_frame_tokens=2,
        exact_total=exact_total,
    )


def test_nothing_changes_when_it_fits():
    files = [Candidate("a.py", "full", 10), Candidate("b.py", "full", 10)]
    result = _fit_plain(files, 20)
    assert result.statuses == ["full", "full"] and result.reductions == [] and result.total == 20


def test_lowest_tier_is_outlined_then_listed_before_the_next_tier():
    files = [
        Candidate("README.md", "full", 100),
        Candidate("src/core.py", "full", 100),
        Candidate("tests/test_core.py", "full", 100),
        Candidate("docs/guide.md", "full", 100),
    ]
    outlines = {"src/core.py": 20, "tests/test_core.py": 30, "docs/guide.md": 10, "README.md": 10}
    result = _fit_plain(files, 250, outlines)
    # tests first (outline 30 -> 333; listed -> 303), then docs (outline -> 213 fits)
    assert [(r.path, r.after) for r in result.reductions] == [
        ("tests/test_core.py", "reduced"), ("tests/test_core.py", "listed"), ("docs/guide.md", "reduced"),
    ]
    assert result.statuses == ["full", "full", "listed", "reduced"]
    assert result.total <= 250


def test_readme_outlives_source_and_larger_files_go_first():
    files = [Candidate("README.md", "full", 50), Candidate("a.py", "full", 40), Candidate("b.py", "full", 60)]
    result = _fit_plain(files, 60)
    assert [r.path for r in result.reductions] == ["b.py", "a.py"]
    assert result.statuses[0] == "full"


def test_too_small_budget_raises_a_typed_error_with_a_hint():
    files = [Candidate("a.py", "full", 40)]
    with pytest.raises(BudgetTooSmall) as caught:
        _fit_plain(files, 2)
    assert isinstance(caught.value, IngestError) and "--budget" in caught.value.hint


def _repo(root: Path) -> Path:
    root.mkdir()
    (root / "README.md").write_text("# Project\n\nWhat it does.\n" * 5)
    (root / "src").mkdir()
    for n in range(6):
        body = "".join(f"def function_{n}_{k}(argument, other=1):\n    '''Doc {k}.'''\n    return argument * {k}\n\n"
                       for k in range(30))
        (root / "src" / f"mod{n}.py").write_text(body)
    (root / "tests").mkdir()
    (root / "tests" / "test_mod.py").write_text("def test_x():\n    assert True\n" * 40)
    (root / "docs").mkdir()
    (root / "docs" / "guide.md").write_text("## Usage\n\nlong text here\n" * 60)
    return root


@pytest.mark.parametrize("fmt", ["xml", "markdown", "plain"])
def test_pack_fits_the_budget_exactly_counted_on_the_output(tmp_path, tokenizer, fmt):
    root = _repo(tmp_path / "r")
    unlimited = pack([root], options=PackOptions(format=fmt), tokenizer=tokenizer, cache_dir=tmp_path / "c")
    assert unlimited.total_tokens == tokenizer.count(unlimited.text)
    for budget in (unlimited.total_tokens - 1, unlimited.total_tokens // 2, unlimited.total_tokens // 4):
        result = pack([root], options=PackOptions(format=fmt, budget=budget), tokenizer=tokenizer,
                      cache_dir=tmp_path / "c")
        assert result.total_tokens == tokenizer.count(result.text) <= budget
        assert result.reduced, "something must have been degraded"
        statuses = {f.path: f.status for f in result.files}
        # lowest tiers degrade first; the README outlives the source
        if statuses["README.md"] != "full":
            assert all(statuses[f"src/mod{n}.py"] == "listed" for n in range(6))
        if any(statuses[f"src/mod{n}.py"] != "full" for n in range(6)):
            assert statuses["tests/test_mod.py"] == "listed" and statuses["docs/guide.md"] == "listed"
        for report in result.files:
            if report.path in {r.path for r in result.reduced}:
                assert report.reason == "budget"
        # deterministic
        again = pack([root], options=PackOptions(format=fmt, budget=budget), tokenizer=tokenizer, cache_dir=None)
        assert again.text == result.text


def test_pack_budget_reduced_files_show_their_outline(tmp_path, tokenizer):
    root = _repo(tmp_path / "r")
    full = pack([root], tokenizer=tokenizer).total_tokens
    result = pack([root], options=PackOptions(budget=int(full * 0.7)), tokenizer=tokenizer)
    reduced = [f.path for f in result.files if f.status == "reduced"]
    assert reduced
    assert f'<file path="{reduced[0]}" status="reduced">' in result.text
    assert "return argument" not in result.text.split(f'<file path="{reduced[0]}" status="reduced">')[1].split("</file>")[0]


def test_pack_budget_too_small(tmp_path, tokenizer):
    root = _repo(tmp_path / "r")
    with pytest.raises(BudgetTooSmall):
        pack([root], options=PackOptions(budget=10), tokenizer=tokenizer)


def test_budget_without_tokenizer_is_an_error(tmp_path):
    root = _repo(tmp_path / "r")
    with pytest.raises(IngestError):
        pack([root], options=PackOptions(budget=100))


# ------------------------------------------------------------------------------ outlines

from ingest.outline import HEAD_LINES, outline  # noqa: E402


def test_python_outline_keeps_decorators_signatures_and_docstring_first_lines():
    source = '''"""Module doc.

More.
"""
import os


@decorator(1)
class Widget(Base):
    """A widget.

    Details.
    """

    size = 3

    def grow(self, amount: int,
             *, twice: bool = False) -> int:
        # a comment before the body is not part of the signature
        return amount


async def fetch(url):
    return await get(url)
'''
    assert outline("pkg/widget.py", source) == (
        '"""Module doc."""\n'
        "@decorator(1)\n"
        "class Widget(Base):\n"
        '    """A widget."""\n'
        "    def grow(self, amount: int,\n"
        "             *, twice: bool = False) -> int:\n"
        "async def fetch(url):\n"
    )


def test_python_with_syntax_errors_falls_back_to_patterns():
    assert outline("x.py", "def ok(a):\n    pass\nclass Broken(:\n") == "def ok(a):\nclass Broken(:\n"


@pytest.mark.parametrize(
    "path, source, expected",
    [
        ("a.ts", "import x from 'y'\nexport interface Props {\n  a: string\n}\nexport const f = (a: number) => a\n"
                 "function g() {\n  return 1\n}\n", ["export interface Props {", "export const f = (a: number) => a",
                                                    "function g() {"]),
        ("main.go", "package main\n\ntype Server struct {\n}\n\nfunc (s *Server) Run() error {\n\treturn nil\n}\n",
         ["type Server struct {", "func (s *Server) Run() error {"]),
        ("lib.rs", "use std::io;\npub struct A;\nimpl A {\n    pub fn new() -> Self { A }\n}\nenum E { X }\n",
         ["pub struct A;", "impl A {", "    pub fn new() -> Self { A }", "enum E { X }"]),
        ("App.java", "package a;\npublic class App {\n    private int x;\n    public static void main(String[] args) {\n"
                     "    }\n}\n", ["public class App {", "    public static void main(String[] args) {"]),
        ("util.c", "#include <stdio.h>\nstatic int add(int a, int b)\n{\n    if (a) {\n        return a;\n    }\n}\n"
                   "struct point {\n", ["static int add(int a, int b)", "struct point {"]),
        ("a.rb", "module M\n  class C\n    def run(x)\n      x\n    end\n  end\nend\n",
         ["module M", "  class C", "    def run(x)"]),
        ("run.sh", "#!/bin/sh\nsetup() {\n  echo hi\n}\nfunction main {\n  setup\n}\n", ["setup() {", "function main {"]),
        ("README.md", "# Title\ntext\n## Usage\n```\n# not a heading? (inside a fence, kept: regex outline)\n```\n",
         ["# Title", "## Usage", "# not a heading? (inside a fence, kept: regex outline)"]),
        ("guide.rst", "Title\n=====\n\ntext\n\nSection\n-------\n", ["Title", "Section"]),
    ],
)
def test_regex_outlines_per_language(path, source, expected):
    assert outline(path, source).splitlines() == expected


def test_unknown_files_keep_their_first_lines():
    text = "".join(f"line {n}\n" for n in range(50))
    result = outline("data.unknown", text).splitlines()
    assert result[:HEAD_LINES] == [f"line {n}" for n in range(HEAD_LINES)]
    assert result[-1] == f"... ({50 - HEAD_LINES} more lines)"
    assert outline("empty.py", "") == ""
