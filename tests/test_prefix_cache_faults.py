"""Faults in the prefix cache: every kind of damaged or foreign segment is a miss with a
one-line reason and is removed, never a crash or a wrong answer; a writer SIGKILLed in the
middle of a write leaves nothing partial that is ever served; two processes writing the
same prefix at once stay correct."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import engine
from engine import cached_generation, prefix_cache
from engine.cached_generation import CacheSettings
from engine.events import SamplingParams
from engine.prefix_cache import PrefixCache, chain_hashes, read_header
from engine.prefix_state import adapter_for
from tests.tinymodels import tiny_vocab_text, write_tiny_llama_gguf

CHUNK = 32
SEGMENT_BYTES = CHUNK * 4 * 256  # 4 chunks a segment with the tiny model's 256 bytes a token
SETTINGS = CacheSettings(chunk_tokens=CHUNK, segment_bytes=SEGMENT_BYTES)
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("tiny-faults") / "tiny.gguf", ctx=1024)


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return engine.load(str(tiny_path))


@pytest.fixture(scope="module")
def prompt(tiny) -> list[int]:
    return tiny.tokenizer.encode(tiny_vocab_text() * 3)[:400]


@pytest.fixture(scope="module")
def cold_text(tiny, prompt) -> str:
    return list(tiny.stream(prompt, GREEDY))[-1].text


def run(model, ids):
    return list(cached_generation.stream(model, ids, GREEDY, settings=SETTINGS))[-1]


def segments_by_start() -> dict[int, Path]:
    return {read_header(p).start: p for p in prefix_cache.segment_paths()}


# ---------------------------------------------------------------- damaged files


def _rewrite(path: Path, edit: Callable[[bytearray], None]) -> None:
    """Edit a segment and give it a valid checksum again: only the named defect remains."""
    body = bytearray(path.read_bytes()[:-32])
    edit(body)
    path.write_bytes(bytes(body) + hashlib.sha256(body).digest())


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_tensor_byte(path: Path) -> None:
    _flip(path, read_header(path).payload_offset + 1000)


def flip_header_byte(path: Path) -> None:
    _flip(path, 16)  # the header JSON's opening brace


def flip_token_byte(path: Path) -> None:
    _flip(path, read_header(path).tokens_offset + 5)


def bad_magic(path: Path) -> None:
    _rewrite(path, lambda body: body.__setitem__(slice(0, 8), b"GGUFxxxx"))


def other_version(path: Path) -> None:
    _rewrite(path, lambda body: body.__setitem__(slice(8, 12), struct.pack("<I", 99)))


def other_fingerprint(path: Path) -> None:
    digest = read_header(path).fingerprint

    def edit(body: bytearray) -> None:
        at = body.index(digest.encode())
        body[at : at + 64] = ("0" * 64).encode()

    _rewrite(path, edit)


CASES = {
    "truncated": (truncate, "truncated"),
    "tensor bit flip": (flip_tensor_byte, "checksum mismatch"),
    "token id bit flip": (flip_token_byte, "checksum mismatch"),
    "header bit flip": (flip_header_byte, "damaged header"),
    "bad magic": (bad_magic, "bad magic"),
    "foreign version": (other_version, "format version 99"),
    "other fingerprint": (other_fingerprint, "another fingerprint"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("which", [0, 128])
def test_a_damaged_segment_is_a_miss_with_a_reason_and_is_removed(tiny, prompt, cold_text, case, which):
    damage, reason = CASES[case]
    run(tiny, prompt)
    target = segments_by_start()[which]
    damage(target)
    done = run(tiny, prompt)
    report = done.extra["cache"]
    assert done.text == cold_text
    assert report["reused_tokens"] == which  # the segments before the damaged one still serve
    assert len(report["removed"]) == 1 and reason in report["removed"][0], report["removed"]
    assert "\n" not in report["removed"][0] and report["removed"][0].endswith("(removed)")
    assert report["miss_reason"]
    # The run published a good copy again; the next one reuses everything.
    again = run(tiny, prompt).extra["cache"]
    assert again["reused_tokens"] == 384, again


def test_token_ids_that_differ_under_colliding_hashes_are_rejected(tiny, prompt, cold_text):
    """A file whose name and header carry the prompt's hashes but whose stored tokens are
    other ones (what a hash collision would look like) is never served."""
    adapter = adapter_for(tiny.model, CHUNK)
    fingerprint = cached_generation.fingerprint_for(tiny, adapter)
    cache = PrefixCache(fingerprint)
    other = [(t + 1) % 300 for t in prompt[:128]]
    state = tiny.model.new_state()
    import torch

    tiny.model(torch.tensor([other]), state, output="none")
    tensors, meta = adapter.export_range(state, 0, 128)
    hashes = chain_hashes(fingerprint, prompt, 4)  # the prompt's hashes, the other tokens
    cache.write_segment(0, hashes, other, tensors, meta)
    done = run(tiny, prompt)
    report = done.extra["cache"]
    assert done.text == cold_text and report["reused_tokens"] == 0
    assert "token ids differ from the prompt at token 0" in report["removed"][0]


def test_read_only_cache_skips_damaged_files_without_removing_them(tiny, prompt, cold_text):
    run(tiny, prompt)
    target = segments_by_start()[0]
    flip_tensor_byte(target)
    ro = CacheSettings(chunk_tokens=CHUNK, segment_bytes=SEGMENT_BYTES, read_only=True)
    done = list(cached_generation.stream(tiny, prompt, GREEDY, settings=ro))[-1]
    assert done.text == cold_text and done.extra["cache"]["reused_tokens"] == 0
    assert target.exists() and "checksum mismatch" in done.extra["cache"]["removed"][0]
    assert not done.extra["cache"]["removed"][0].endswith("(removed)")


def test_an_unreadable_cache_directory_is_a_warning_not_an_error(tiny, prompt, cold_text):
    root = prefix_cache.root_dir()
    root.parent.mkdir(parents=True, exist_ok=True)
    root.write_text("not a directory")
    done = run(tiny, prompt)
    assert done.text == cold_text and done.extra["cache"]["reused_tokens"] == 0
    assert done.extra["cache"]["warnings"]


# ---------------------------------------------------------------- processes

_CHILD = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {root!r})
    import engine
    from engine import cached_generation
    from engine.cached_generation import CacheSettings
    from engine.events import SamplingParams
    from pathlib import Path
    go = Path({go!r})
    model = engine.load({model!r})
    ids = json.loads(Path({prompt!r}).read_text())
    while not go.exists():
        pass
    settings = CacheSettings(chunk_tokens={chunk}, segment_bytes={segment_bytes})
    done = list(cached_generation.stream(model, ids, SamplingParams(max_tokens=8), settings=settings))[-1]
    print(json.dumps({{"text": done.text, "cache": done.extra["cache"]}}))
    """
)


def _child_script(tmp_path: Path, tiny_path: Path, prompt: list[int], name: str) -> tuple[Path, Path]:
    prompt_file = tmp_path / "prompt.json"
    prompt_file.write_text(json.dumps(prompt))
    go = tmp_path / "go"
    script = tmp_path / f"{name}.py"
    script.write_text(
        _CHILD.format(root=str(ROOT), go=str(go), model=str(tiny_path), prompt=str(prompt_file), chunk=CHUNK, segment_bytes=SEGMENT_BYTES)
    )
    return script, go


@pytest.mark.slow
def test_a_writer_killed_mid_write_never_leaves_a_served_partial_segment(tiny, tiny_path, prompt, cold_text, tmp_path, dsv4_home):
    script, go = _child_script(tmp_path, tiny_path, prompt, "killed")
    go.touch()
    # Segments are ~34 kB: stop inside the third one's temp file.
    env = {**os.environ, "DSV4_HOME": str(dsv4_home), "DSV4_CACHE_TEST_PAUSE_AT": "80000"}
    child = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    paused = threading.Event()

    def watch() -> None:
        for line in child.stderr:  # type: ignore[union-attr]
            if "dsv4-cache-test: paused" in line:
                paused.set()

    threading.Thread(target=watch, daemon=True).start()
    try:
        assert paused.wait(120), "the writer never reached the pause point"
        temps = list(prefix_cache.root_dir().rglob("*.tmp.*"))
        assert len(temps) == 1 and temps[0].stat().st_size > 0
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    assert child.returncode == -signal.SIGKILL
    # Only the two finished segments are visible, and both are whole.
    assert sorted(segments_by_start()) == [0, 128]
    good, bad = prefix_cache.verify()
    assert good == 2 and bad == []
    done = run(tiny, prompt)
    assert done.extra["cache"]["reused_tokens"] == 256 and done.text == cold_text
    assert run(tiny, prompt).extra["cache"]["reused_tokens"] == 384
    # The killed writer's temp file is swept once it is stale.
    old = time.time() - 2 * 3600
    os.utime(temps[0], (old, old))
    prefix_cache.prune(cap_bytes=1 << 30)
    assert not temps[0].exists()


@pytest.mark.slow
def test_two_processes_writing_the_same_prefix_at_once(tiny, tiny_path, prompt, cold_text, tmp_path, dsv4_home):
    script, go = _child_script(tmp_path, tiny_path, prompt, "writer")
    env = {**os.environ, "DSV4_HOME": str(dsv4_home)}
    children = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    time.sleep(0.5)
    go.touch()  # both start prefilling together
    results = []
    for child in children:
        out, err = child.communicate(timeout=180)
        assert child.returncode == 0, err
        results.append(json.loads(out))
    assert all(r["text"] == cold_text for r in results)
    assert all(not r["cache"]["warnings"] for r in results)
    good, bad = prefix_cache.verify()
    assert bad == [] and good == 3
    assert not list(prefix_cache.root_dir().rglob("*.tmp.*"))
    done = run(tiny, prompt)
    assert done.extra["cache"]["reused_tokens"] == 384 and done.text == cold_text


def test_eviction_waits_for_a_reader_to_finish(tiny, prompt):
    """A reader holds the cache's shared lock while it loads; pruning (which deletes)
    takes it exclusively, so it cannot delete a segment under the reader's feet."""
    run(tiny, prompt)
    cache = PrefixCache(cached_generation.fingerprint_for(tiny, adapter_for(tiny.model, CHUNK)))
    pruned = threading.Event()

    def prune_everything() -> None:
        prefix_cache.prune(cap_bytes=0)
        pruned.set()

    with cache.reading():
        pruner = threading.Thread(target=prune_everything, daemon=True)
        pruner.start()
        assert not pruned.wait(0.5)
        assert len(prefix_cache.segment_paths()) == 3  # still all there while we read
    pruner.join(10)
    assert pruned.is_set() and not prefix_cache.segment_paths()
