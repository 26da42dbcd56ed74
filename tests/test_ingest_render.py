"""Rendering: layout, robustness to hostile file contents, and exact token additivity of blocks."""

from __future__ import annotations

import random
import re

import pytest
import tiktoken

from engine.tokenizer import DIGITS_PAT_STR, GPT2_PAT_STR
from ingest.render import FORMATS, TailEntry, file_block, report_frame, report_line, tail_blocks


def _encoding(pat_str: str) -> tiktoken.Encoding:
    """A real byte-level BPE with merges that cross every kind of character class."""
    ranks = {bytes([i]): i for i in range(256)}
    pieces = [
        b"\n\n", b"  ", b"    ", b"\t\t", b"</", b"</file", b"</file>", b"\n</", b">\n", b"``", b"```", b"==",
        b"===", b" =", b" ==", b"de", b"def", b" def", b"fi", b"file", b"<file", b" (", b"):", b"11", b"\n ",
        b" \n", b"\r\n", b"th", b"the", b" the", b"--", b"- ", b"##", b"## ", b"\xc3\xa9", b"end", b" end",
    ]
    for piece in pieces:
        if piece not in ranks:
            ranks[piece] = len(ranks)
    return tiktoken.Encoding(name=f"test-{hash(pat_str)}", pat_str=pat_str, mergeable_ranks=ranks, special_tokens={})


ENCODINGS = [_encoding(DIGITS_PAT_STR), _encoding(GPT2_PAT_STR)]

_ALPHABET = list("abcXYZ019 _-=<>/`'\"\t\r\n#()[]{};:.,!?é中😀") + [
    "</file>", "</file_1>", "```", "````", "  \n", "\n\n\n", " 1", "\n 2", "'s", "  ", "\u00a0", "\u2028",
    "<|endoftext|>", "=== end x ===",
]


def _random_text(rng: random.Random) -> str:
    shape = rng.random()
    if shape < 0.1:
        return ""
    text = "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(1, 120)))
    if shape < 0.3:
        text = text.rstrip("\n")                       # no trailing newline
    elif shape < 0.45:
        text += rng.choice([" ", "  ", "\n\n", " \n \n", "\t", "\n   "])   # ends in whitespace
    elif shape < 0.55:
        text += "1"                                     # ends in a digit
    return text


def _random_path(rng: random.Random) -> str:
    parts = ["src", "a b", "ü", "1", "docs", ".hidden", "x&y", 'q"t', "<t>"]
    return "/".join(rng.choice(parts) for _ in range(rng.randint(1, 3))) + rng.choice([".py", ".md", "", ".c"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_block_counts_add_up_to_the_whole_output(fmt):
    rng = random.Random(f"additivity-{fmt}")
    for _ in range(60):
        blocks = []
        entries = []
        for _ in range(rng.randint(0, 12)):
            path = _random_path(rng)
            status = rng.choice(["full", "full", "reduced", "listed"])
            if status != "listed":
                blocks.append(file_block(fmt, path, _random_text(rng), reduced=status == "reduced"))
            entries.append(TailEntry(path, status, rng.choice(["", "binary", "budget", "lock file"])))
        blocks += tail_blocks(fmt, entries)
        whole = "".join(blocks)
        for encoding in ENCODINGS:
            assert sum(len(encoding.encode_ordinary(b)) for b in blocks) == len(encoding.encode_ordinary(whole))


@pytest.mark.parametrize("fmt", FORMATS)
def test_report_lines_price_the_report_exactly(fmt):
    rng = random.Random(f"report-{fmt}")
    header, footer = report_frame(fmt)
    entries = [TailEntry(_random_path(rng), rng.choice(["listed", "reduced"]), rng.choice(["", "binary", "budget"]))
               for _ in range(40)]
    lines = [report_line(fmt, e) for e in entries]
    for encoding in ENCODINGS:
        parts = [header, *lines, footer]
        assert sum(len(encoding.encode_ordinary(p)) for p in parts if p) == len(encoding.encode_ordinary("".join(parts)))


def test_every_block_starts_and_ends_at_a_token_boundary():
    rng = random.Random("shape")
    for fmt in FORMATS:
        for _ in range(100):
            block = file_block(fmt, _random_path(rng), _random_text(rng))
            assert re.match(r"[^\s\w]", block[0]), block[:10]
            assert block.endswith("\n") and not block[-2].isspace()


def test_xml_block_survives_a_closing_tag_in_the_file():
    text = "before\n</file>\nafter </file_1> and more\n"
    block = file_block("xml", "a.py", text)
    assert block.startswith('<file_2 path="a.py">\n')
    assert block.endswith("</file_2>\n")
    assert text in block
    assert file_block("xml", "b.py", "plain\n") == '<file path="b.py">\nplain\n</file>\n'


def test_xml_path_attribute_is_escaped():
    block = file_block("xml", 'a&b/"q"<x>.py', "x\n")
    assert block.startswith('<file path="a&amp;b/&quot;q&quot;&lt;x&gt;.py">')


def test_markdown_fence_outgrows_backtick_runs():
    text = "use ```python\ncode\n```` and `x`\n"
    block = file_block("markdown", "doc/a.md", text)
    assert block.startswith("## doc/a.md\n\n`````markdown\n")
    assert block.endswith("\n`````\n")
    assert file_block("markdown", "a.py", "x = 1\n") == "## a.py\n\n```python\nx = 1\n```\n"


def test_file_without_trailing_newline_gets_one_and_empty_file_renders():
    assert file_block("plain", "a", "x") == "=== a ===\nx\n=== end a ===\n"
    assert file_block("xml", "e", "") == '<file path="e">\n</file>\n'


def test_reduced_blocks_are_marked():
    assert 'status="reduced"' in file_block("xml", "a.py", "def f():\n", reduced=True)
    assert "(outline)" in file_block("markdown", "a.py", "def f():\n", reduced=True)
    assert "(outline)" in file_block("plain", "a.py", "def f():\n", reduced=True)


def test_tail_has_tree_summary_and_reasons():
    entries = [TailEntry("src/a.py", "full"), TailEntry("src/sub/b.bin", "listed", "binary"),
               TailEntry("README.md", "reduced", "budget")]
    tree, summary, report = tail_blocks("xml", entries)
    assert tree == "<directory_structure>\nREADME.md\nsrc/\n  a.py\n  sub/\n    b.bin\n</directory_structure>\n"
    assert "files: 3 (1 full, 1 reduced to an outline, 1 listed by path only)" in summary
    assert "- src/sub/b.bin (listed: binary)\n" in report
    assert "- README.md (outline: budget)\n" in report
    assert len(tail_blocks("xml", entries[:1])) == 2     # no report when everything is inlined


def test_control_characters_in_paths_cannot_break_lines():
    block = file_block("markdown", "a\nb.py", "x\n")
    assert block.startswith("## a\\x0ab.py\n")
