"""pack(): end to end on generated repositories with real git history."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from ingest import PackOptions, list_paths, pack
from ingest.errors import SourceNotFound
from tests.tinymodels import write_tiny_llama_gguf

_ENV = {
    "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_NOSYSTEM": "1",
}


def git(root: Path, *args: str) -> None:
    env = {**os.environ, **_ENV, "HOME": str(root.parent)}
    subprocess.run(["git", *args], cwd=root, env=env, check=True, capture_output=True)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from engine.tokenizer import Tokenizer

    path = tmp_path_factory.mktemp("tok") / "tiny.gguf"
    write_tiny_llama_gguf(path)
    return Tokenizer.from_gguf(path)


class CountingTokenizer:
    """Wraps a real tokenizer and remembers what it was asked to count."""

    def __init__(self, inner):
        self.inner, self.name, self.digest = inner, inner.name, inner.digest
        self.seen: list[str] = []

    def count_batch(self, texts):
        self.seen.extend(texts)
        return self.inner.count_batch(texts)


_WORDS = ["def", "class", "return", "import", "x", "value", "1", "42", "  ", "\t", "é", "中文", "`", "</file>",
          "'s", "\n", "\n\n", " ", "#", "{", "}", "()", "<|im_end|>"]


def _random_text(rng: random.Random, words: int = 80) -> str:
    text = "".join(rng.choice(_WORDS) + rng.choice(["", " ", "\n"]) for _ in range(rng.randint(0, words)))
    return text + rng.choice(["", "\n", "  ", "\n\n\n", " \n", "7"])


def make_repo(root: Path, n_files: int, seed: str, commits: int = 5, words: int = 80) -> Path:
    """A repository whose files were added over several commits, in a seeded random order."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    git(root, "init", "-q", "-b", "main")
    dirs = ["", "src/", "src/core/", "docs/", "tests/", "lib/a/b/"]
    paths = sorted({f"{rng.choice(dirs)}{rng.choice('abcdefghijklmnop')}{n}.{rng.choice(['py', 'md', 'txt', 'c'])}"
                    for n in range(n_files)})
    rng.shuffle(paths)
    per_commit = max(1, len(paths) // commits)
    for start in range(0, len(paths), per_commit):
        for path in paths[start : start + per_commit]:
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text(_random_text(rng, words))
        git(root, "add", "-A")
        git(root, "commit", "-q", "-m", f"add {start}")
    return root


def shared_prefix(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


@pytest.mark.parametrize("fmt", ["xml", "markdown", "plain"])
def test_total_is_the_exact_count_of_the_output_on_random_repositories(tmp_path, tokenizer, fmt):
    for seed in range(4):
        root = make_repo(tmp_path / f"{fmt}{seed}", 25, f"{fmt}-{seed}", commits=3)
        (root / "empty.py").write_text("")
        (root / "no_newline.py").write_text("x = 1")
        (root / "trailing.py").write_text("x = 1   \n\n   ")
        (root / "bin.dat").write_bytes(b"\x00\x01binary")
        result = pack([root], options=PackOptions(format=fmt), tokenizer=tokenizer)
        assert result.total_tokens == tokenizer.count(result.text)
        assert sum(f.tokens for f in result.files) <= result.total_tokens
        assert {f.path: f.status for f in result.files}["bin.dat"] == "listed"


def test_adding_an_early_sorting_file_keeps_the_prefix_and_a_commit_keeps_everything(tmp_path, tokenizer):
    # files of ~1 KB, like source files (the tree in the tail grows with the file count)
    root = make_repo(tmp_path / "r", 300, "stability", commits=8, words=500)
    old = pack([root], tokenizer=tokenizer).text
    (root / "0000_new.py").write_text("x = 1\n")
    new = pack([root], tokenizer=tokenizer).text
    assert shared_prefix(old, new) / len(old) >= 0.95
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "add the new file")
    assert pack([root], tokenizer=tokenizer).text == new
    git(root, "commit", "-q", "--allow-empty", "-m", "empty")
    assert pack([root], tokenizer=tokenizer).text == new


def test_body_comes_first_and_the_tail_after_it(tmp_path):
    root = make_repo(tmp_path / "r", 10, "tail")
    result = pack([root])
    body = result.text[: result.stable_prefix_chars]
    assert "<directory_structure>" not in body and "<summary>" not in body
    assert result.text[result.stable_prefix_chars :].startswith("<directory_structure>")
    assert result.total_tokens is None


def test_same_state_gives_the_same_bytes_in_another_location(tmp_path):
    root = make_repo(tmp_path / "one", 30, "where")
    copy = tmp_path / "elsewhere" / "two"
    shutil.copytree(root, copy)
    first, second = pack([root]).text, pack([copy]).text
    assert first == second
    assert str(tmp_path) not in first and "\\" not in first.replace("\\x", "")


def test_token_cache_makes_a_warm_repack_tokenize_nothing(tmp_path, tokenizer):
    root = make_repo(tmp_path / "r", 40, "cache")
    cache = tmp_path / "cache"
    cold = CountingTokenizer(tokenizer)
    first = pack([root], tokenizer=cold, cache_dir=cache)
    assert cold.seen
    warm = CountingTokenizer(tokenizer)
    second = pack([root], tokenizer=warm, cache_dir=cache)
    assert warm.seen == [] and second.text == first.text and second.total_tokens == first.total_tokens
    # one edited file: only its block is tokenized (the tail is unchanged: same paths, same statuses)
    edited = sorted(p for p in root.rglob("*.py") if ".git" not in p.parts)[0]
    edited.write_text(edited.read_text() + "\nmore = 2\n")
    third = CountingTokenizer(tokenizer)
    result = pack([root], tokenizer=third, cache_dir=cache)
    assert len(third.seen) == 1 and "more = 2" in third.seen[0]
    assert result.total_tokens == tokenizer.count(result.text)


def test_stdin_single_file_several_sources_and_files_from(tmp_path, monkeypatch):
    root = make_repo(tmp_path / "r", 6, "sources")
    (tmp_path / "notes.md").write_text("# Notes\n")
    monkeypatch.chdir(tmp_path)
    stdin = pack(["-"], stdin_text="diff --git a b\n")
    assert stdin.text.startswith('<file path="stdin">\ndiff --git a b\n</file>\n')
    single = pack(["notes.md"])
    assert [f.path for f in single.files] == ["notes.md"]
    several = pack(["notes.md", "r"])
    paths = [f.path for f in several.files]
    assert paths[0] == "notes.md" and all(p.startswith("r/") for p in paths[1:]) and len(paths) == 7
    listed = pack([], options=PackOptions(files_from=("r/" + paths[3][2:], "notes.md")))
    assert [f.path for f in listed.files] == ["r/" + paths[3][2:], "notes.md"]


def test_list_paths_is_pack_order_before_content_filters(tmp_path):
    root = make_repo(tmp_path / "r", 8, "list")
    (root / "blob.bin").write_bytes(b"\x00" * 10)
    paths = list_paths([root])
    assert paths[-1] == "blob.bin"
    assert paths == [f.path for f in pack([root]).files]


def test_missing_source_raises(tmp_path):
    with pytest.raises(SourceNotFound):
        pack([tmp_path / "nope"])


def test_whole_pack_cache_serves_an_unchanged_repository_and_notices_changes(tmp_path, tokenizer, monkeypatch):
    import ingest.pack_cache as pack_cache

    monkeypatch.setattr(pack_cache, "RACY_SECONDS", -10.0)   # the files were all written just now
    root = make_repo(tmp_path / "r", 20, "whole")
    cache = tmp_path / "cache"
    first = pack([root], tokenizer=tokenizer, cache_dir=cache)
    second = pack([root], tokenizer=tokenizer, cache_dir=cache)
    assert not first.from_cache and second.from_cache
    assert (second.text, second.total_tokens, second.files) == (first.text, first.total_tokens, first.files)
    # same size, same mtime, different bytes: the ctime still moves, so it is seen
    victim = next(p for p in sorted(root.rglob("*.py")) if ".git" not in p.parts and p.stat().st_size > 3)
    info = victim.stat()
    data = bytearray(victim.read_bytes())
    data[0] = ord("Z") if data[0] != ord("Z") else ord("Y")
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(info.st_atime_ns, info.st_mtime_ns))
    third = pack([root], tokenizer=tokenizer, cache_dir=cache)
    assert not third.from_cache and third.text != first.text
    assert third.total_tokens == tokenizer.count(third.text)
    # other options are other entries
    markdown = pack([root], options=PackOptions(format="markdown"), tokenizer=tokenizer, cache_dir=cache)
    assert not markdown.from_cache and markdown.text.startswith("## ")


def test_whole_pack_cache_skips_files_changed_just_now(tmp_path, tokenizer):
    root = make_repo(tmp_path / "r", 5, "racy")
    cache = tmp_path / "cache"
    pack([root], tokenizer=tokenizer, cache_dir=cache)
    assert not pack([root], tokenizer=tokenizer, cache_dir=cache).from_cache


@pytest.mark.model
@pytest.mark.parametrize("fmt", ["xml", "markdown", "plain"])
def test_real_tokenizer_counts_add_up_on_this_repository(fmt):
    from engine.tokenizer import Tokenizer
    from tests.tinymodels import real_model_gguf_or_skip

    path = real_model_gguf_or_skip()
    tokenizer = Tokenizer.from_gguf(path)
    result = pack([Path(__file__).resolve().parents[1]], options=PackOptions(format=fmt), tokenizer=tokenizer)
    assert result.total_tokens == tokenizer.count(result.text)


def test_a_cached_pack_with_lone_surrogates_is_written_like_a_fresh_one(tmp_path, tokenizer):
    import io

    cache = tmp_path / "cache"
    text = "bytes that were not UTF-8: \udce9\udcff\n"
    first = pack(["-"], stdin_text=text, tokenizer=tokenizer, cache_dir=cache)
    second = pack(["-"], stdin_text=text, tokenizer=tokenizer, cache_dir=cache)
    assert not first.from_cache and second.from_cache and second.text == first.text
    sinks = [io.BytesIO(), io.BytesIO()]
    first.write_output(sinks[0])
    second.write_output(sinks[1])
    assert sinks[0].getvalue() == sinks[1].getvalue() == first.text.encode("utf-8", "surrogateescape")
    assert b"\xe9\xff" in sinks[1].getvalue()


def test_counting_stream_matches_count_and_tokenizes_each_block_once(tmp_path, tokenizer):
    from ingest.tokens import TokenCounter

    rng = random.Random("stream")
    blocks = [_random_text(rng, 200) + "\n" for _ in range(300)]
    blocks += blocks[:40] + ["x" * 200_000]          # repeats, and one block over a batch
    expected = TokenCounter(tokenizer).count(blocks)
    counting = CountingTokenizer(tokenizer)
    counter = TokenCounter(counting, tmp_path)
    stream = counter.stream()
    for block in blocks:
        stream.add(block)
    assert stream.finish() == expected
    assert sorted(counting.seen) == sorted(set(blocks)) and counter.tokenized_blocks == len(set(blocks))
    counter.save()
    again = CountingTokenizer(tokenizer)
    cached = TokenCounter(again, tmp_path).stream()
    for block in blocks:
        cached.add(block)
    assert cached.finish() == expected and again.seen == [] and cached._threads == []


def test_counting_stream_raises_what_the_tokenizer_raised(tokenizer):
    from ingest.tokens import TokenCounter

    class Failing(CountingTokenizer):
        def count_batch(self, texts):
            if any("boom" in t for t in texts):
                raise ValueError("boom")
            return super().count_batch(texts)

    stream = TokenCounter(Failing(tokenizer)).stream()
    for block in ["a\n", "boom\n", "b\n"]:
        stream.add(block)
    with pytest.raises(ValueError, match="boom"):
        stream.finish()


def test_counting_stream_abandoned_stops_its_workers(tokenizer):
    import threading

    from ingest.tokens import TokenCounter

    before = threading.active_count()
    stream = TokenCounter(tokenizer).stream()
    for n in range(50):
        stream.add(f"block {n}\n" * 2000)
    stream.abandon()
    for thread in [t for t in threading.enumerate() if t.name.startswith("dsv4-count-")]:
        thread.join(timeout=30)
    assert threading.active_count() <= before
