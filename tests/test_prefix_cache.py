"""The prefix KV cache on real files: warm == cold, longest prefix reuse, the last token
recomputed, fingerprints, the cap with LRU eviction, read-only and disabled modes, a full
disk, the reports; the DeepSeek-V4 adapter on the tiny checkpoint.

The tiny GGUF (tests/tinymodels.py) goes through engine.load, with 32-token chunks and
small segments so a few hundred tokens make several chunk boundaries and segment files."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
import torch

import engine
from engine import cached_generation, prefix_cache
from engine.cached_generation import CacheSettings
from engine.events import Done, PrefillProgress, SamplingParams
from engine.prefix_cache import Fingerprint, PrefixCache, TensorData, chain_hashes
from engine.prefix_state import DSV4Adapter, adapter_for
from tests.tinymodels import (
    real_model_gguf_or_skip,
    tiny_vocab_text,
    write_tiny_llama_gguf,
)

CHUNK = 32
SETTINGS = CacheSettings(chunk_tokens=CHUNK, segment_bytes=CHUNK * 4 * 256)  # 4 chunks a segment
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("tiny-cache") / "tiny.gguf", ctx=1024)


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return engine.load(str(tiny_path))


@pytest.fixture(scope="module")
def prompt(tiny) -> list[int]:
    ids = tiny.tokenizer.encode(tiny_vocab_text() * 3)
    assert len(ids) > 400
    return ids[:400]


def run(model, ids, settings=SETTINGS, params=GREEDY) -> Done:
    events = list(cached_generation.stream(model, ids, params, settings=settings))
    assert isinstance(events[-1], Done)
    progress = [e.done for e in events if isinstance(e, PrefillProgress)]
    assert progress == sorted(progress) and progress[-1] == len(ids)
    return events[-1]


def segments() -> list[Path]:
    return prefix_cache.segment_paths()


def test_warm_answer_equals_cold_and_reuses_the_longest_prefix(tiny, prompt):
    cold_plain = list(tiny.stream(prompt, GREEDY))[-1]
    cold = run(tiny, prompt)
    report = cold.extra["cache"]
    assert report["reused_tokens"] == 0 and report["miss_reason"] == "the cache is empty"
    assert report["segments_written"] == 3 and len(segments()) == 3  # 12 chunks, 4 a segment
    warm = run(tiny, prompt)
    report = warm.extra["cache"]
    # 399 cacheable tokens: 12 whole chunks; the rest, and always the last token, recomputed.
    assert warm.usage.cached_tokens == report["reused_tokens"] == 384
    assert report["prefilled_tokens"] == 16 and report["segments_loaded"] == 3 and report["segments_written"] == 0
    assert report["bytes_loaded"] == sum(p.stat().st_size for p in segments())
    assert report["miss_reason"] is None
    assert warm.text == cold.text == cold_plain.text
    assert warm.timings.ttft_s > 0 and warm.usage.prompt_tokens == 400


def test_warm_logits_match_cold_within_tolerance(tiny, prompt):
    run(tiny, prompt)
    adapter = adapter_for(tiny.model, CHUNK)
    fingerprint = cached_generation.fingerprint_for(tiny, adapter)
    cache = PrefixCache(fingerprint)
    hashes = chain_hashes(fingerprint, prompt, (len(prompt) - 1) // CHUNK)
    match = cache.match(hashes, partial_ok=True)
    warm_state = tiny.model.new_state()
    for header, used in match.segments:
        adapter.import_range(warm_state, header.start, used * CHUNK, cache.load(header, prompt, used * CHUNK))
    assert warm_state.length == 384
    ids = torch.tensor([prompt])
    warm = tiny.model(ids[:, 384:], warm_state, output="all")
    # The restore is lossless: equal, bit for bit, to a cold prefill in the same steps
    # (the cached run prefilled 128 tokens at a time, one segment per step).
    same_steps = tiny.model.new_state()
    for lo in range(0, 384, 128):
        tiny.model(ids[:, lo : lo + 128], same_steps, output="none")
    assert torch.equal(warm, tiny.model(ids[:, 384:], same_steps, output="all"))
    # Against a one-shot prefill, only the engine's chunked-vs-one-shot rounding differs
    # (bf16 keys and values, attention precision per path), with or without the cache.
    cold = tiny.model(ids, tiny.model.new_state(), output="all")[:, 384:]
    assert (warm.argmax(-1) == cold.argmax(-1)).float().mean() >= 0.9
    assert torch.allclose(warm, cold, atol=0.3, rtol=0.05), (warm - cold).abs().max()


def test_a_shared_prefix_is_reused_up_to_the_chunk_where_prompts_differ(tiny, prompt):
    run(tiny, prompt)
    other = prompt[:250] + list(reversed(prompt[250:]))
    done = run(tiny, other)
    report = done.extra["cache"]
    assert report["reused_tokens"] == 224  # chunks 1..7 are shared; chunk 8 (224..256) differs
    assert "differs from every cached prefix after 224 tokens" in report["miss_reason"]
    assert done.text == list(tiny.stream(other, GREEDY))[-1].text
    # The new continuation was published from the divergence point; both are served now.
    assert run(tiny, other).extra["cache"]["reused_tokens"] == 384
    assert run(tiny, prompt).extra["cache"]["reused_tokens"] == 384


def test_a_prompt_equal_to_the_cached_prefix_still_recomputes_its_last_token(tiny, prompt):
    run(tiny, prompt)
    exact = prompt[:257]  # 256 cached tokens are a whole prefix of it; the 257th is computed
    done = run(tiny, exact)
    assert done.extra["cache"]["reused_tokens"] == 256 and done.extra["cache"]["prefilled_tokens"] == 1
    assert done.text == list(tiny.stream(exact, GREEDY))[-1].text
    short = prompt[:CHUNK]  # one chunk, but its last token must be computed: nothing reusable
    assert "shorter than one cache chunk" not in (run(tiny, prompt[:CHUNK + 1]).extra["cache"]["miss_reason"] or "")
    assert "shorter than one cache chunk" in run(tiny, short).extra["cache"]["miss_reason"]


def test_a_fingerprint_change_is_a_miss(tmp_path, prompt):
    path = write_tiny_llama_gguf(tmp_path / "model.gguf", ctx=1024, seed=0)
    first = engine.load(str(path))
    run(first, prompt)
    assert run(first, prompt).extra["cache"]["reused_tokens"] == 384
    # Same name, same shapes, other weights: the weights digest changes the key.
    time.sleep(0.01)
    write_tiny_llama_gguf(path, ctx=1024, seed=1)
    second = engine.load(str(path))
    done = run(second, prompt)
    assert done.extra["cache"]["reused_tokens"] == 0
    assert done.extra["cache"]["miss_reason"].startswith("fingerprint changed (weights)")
    # Another weight mode (KV computed differently) is another key too.
    int8 = engine.load(str(path), quant="int8")
    assert run(int8, prompt).extra["cache"]["reused_tokens"] == 0


def test_the_weights_digest_is_memoised_by_path_size_and_mtime(tmp_path, monkeypatch):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 1000)
    first = prefix_cache.file_digest(path)
    calls = []
    real_open = Path.open

    def counting_open(self, *args, **kwargs):
        if self == path.resolve():
            calls.append(1)
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", counting_open)
    assert prefix_cache.file_digest(path) == first and not calls
    path.write_bytes(b"b" * 1000)
    os.utime(path, ns=(time.time_ns() + 10**9,) * 2)
    assert prefix_cache.file_digest(path) != first and calls


def test_read_only_reuses_but_writes_nothing(tiny, prompt):
    ro = CacheSettings(chunk_tokens=CHUNK, segment_bytes=SETTINGS.segment_bytes, read_only=True)
    done = run(tiny, prompt, ro)
    assert done.extra["cache"]["segments_written"] == 0 and not segments()
    run(tiny, prompt)
    before = {p: p.stat().st_mtime_ns for p in segments()}
    done = run(tiny, prompt, ro)
    assert done.extra["cache"]["reused_tokens"] == 384 and done.extra["cache"]["read_only"]
    assert {p: p.stat().st_mtime_ns for p in segments()} == before  # not even touched


def test_disabled_cache_reads_and_writes_nothing(tiny, prompt):
    run(tiny, prompt)
    done = run(tiny, prompt, CacheSettings(enabled=False))
    assert done.usage.cached_tokens == 0
    assert done.extra["cache"]["enabled"] is False and "--no-cache" in done.extra["cache"]["miss_reason"]


def test_a_full_disk_still_answers_uncached_with_a_warning(tiny, prompt, monkeypatch):
    def full_disk(handle, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(prefix_cache, "_write_chunk", full_disk)
    done = run(tiny, prompt)
    report = done.extra["cache"]
    assert done.text == list(tiny.stream(prompt, GREEDY))[-1].text
    assert report["segments_written"] == 0 and len(report["warnings"]) == 1
    assert "No space left on device" in report["warnings"][0]
    assert not list(prefix_cache.root_dir().rglob("*.seg")) and not list(prefix_cache.root_dir().rglob("*.tmp.*"))


def test_a_segment_larger_than_the_cap_is_not_written(tiny, prompt):
    done = run(tiny, prompt, CacheSettings(chunk_tokens=CHUNK, segment_bytes=SETTINGS.segment_bytes, cap=1000))
    assert done.extra["cache"]["segments_written"] == 0 and "cap" in done.extra["cache"]["warnings"][0]
    assert not segments()


# ---------------------------------------------------------------- cap and LRU eviction


def _synthetic_segment(cache: PrefixCache, tokens: list[int], size: int) -> Path:
    hashes = chain_hashes(cache.fingerprint, tokens, len(tokens) // cache.chunk_tokens)
    payload = memoryview(bytes(range(256)) * (size // 256))
    cache.write_segment(0, hashes, tokens, [TensorData("x", "uint8", (len(payload),), payload)], {})
    return cache.dir / prefix_cache.segment_name(hashes[0], hashes[-1])


def test_the_cap_holds_on_real_disk_usage_and_evicts_the_least_recently_used(tmp_path):
    root = tmp_path / "kv"
    fingerprint = Fingerprint({"test": 1, "chunk_tokens": 4}, label="t")
    one = 64 * 1024
    # Room for three segments (and the small fingerprint note), not four.
    cache = PrefixCache(fingerprint, root=root, cap_bytes=3 * one + 3 * 8192 + 16384)
    paths = []
    for i in range(3):
        paths.append(_synthetic_segment(cache, [i] * 8, one))
        os.utime(paths[-1], (time.time() - 100 + i, time.time() - 100 + i))
    assert all(p.exists() for p in paths)
    os.utime(paths[0])  # a hit: the first is now the most recently used
    fourth = _synthetic_segment(cache, [9] * 8, one)
    assert fourth.exists() and paths[0].exists() and paths[2].exists()
    assert not paths[1].exists()  # the least recently used went
    assert prefix_cache.total_usage(root) <= cache.cap_bytes


def test_cap_parsing_and_default(monkeypatch, tmp_path):
    assert prefix_cache.parse_size("5G") == 5 * 1024**3
    assert prefix_cache.parse_size("1.5GiB") == int(1.5 * 1024**3)
    assert prefix_cache.parse_size("500m") == 500 * 1024**2
    assert prefix_cache.parse_size("4096") == 4096
    with pytest.raises(ValueError):
        prefix_cache.parse_size("lots")
    monkeypatch.setenv(prefix_cache.CAP_ENV, "3M")
    assert prefix_cache.resolve_cap(None, tmp_path) == 3 * 1024**2
    assert prefix_cache.resolve_cap("1K", tmp_path) == 1024
    monkeypatch.delenv(prefix_cache.CAP_ENV)
    import shutil

    assert prefix_cache.resolve_cap(None, tmp_path) == min(20 * 1000**3, int(0.1 * shutil.disk_usage(tmp_path).total))


def test_chain_hashes_depend_on_everything_before(tmp_path):
    fingerprint = Fingerprint({"a": 1, "chunk_tokens": 2})
    base = chain_hashes(fingerprint, [1, 2, 3, 4, 5, 6], 3)
    assert len(base) == 4 and base[0] == fingerprint.digest
    changed_first = chain_hashes(fingerprint, [9, 2, 3, 4, 5, 6], 3)
    assert all(a != b for a, b in zip(base[1:], changed_first[1:]))
    changed_last = chain_hashes(fingerprint, [1, 2, 3, 4, 5, 9], 3)
    assert base[:3] == changed_last[:3] and base[3] != changed_last[3]
    other = chain_hashes(Fingerprint({"a": 2, "chunk_tokens": 2}), [1, 2, 3, 4, 5, 6], 3)
    assert not set(base) & set(other)


# ---------------------------------------------------------------- DeepSeek-V4 state


def test_deepseek_v4_segments_restore_the_state_exactly(tmp_path):
    from dsv4_tiny import write_tiny

    from engine.deepseek_v4.weights import load_checkpoint

    model = load_checkpoint(write_tiny(tmp_path / "ckpt", "fp32", index_topk=2)).model
    adapter = adapter_for(model, 16)  # ratios 4 and 16, window 8
    assert isinstance(adapter, DSV4Adapter) and not adapter.partial_ok
    with pytest.raises(ValueError, match="multiple"):
        DSV4Adapter(model, 6)
    fingerprint = Fingerprint({"chunk_tokens": 16, **adapter.layout()}, label="dsv4-tiny")
    cache = PrefixCache(fingerprint, root=tmp_path / "kv")
    tokens = torch.randint(0, 512, (1, 70), generator=torch.Generator().manual_seed(5))
    prompt = tokens[0].tolist()
    hashes = chain_hashes(fingerprint, prompt, 4)
    with torch.no_grad():
        full = model(tokens)
        state = model.new_state()
        for start, end in ((0, 32), (32, 64)):  # two segments of two chunks
            model(tokens[:, start:end], state)
            data, meta = adapter.export_range(state, start, end)
            cache.write_segment(start, hashes[start // 16 : end // 16 + 1], prompt[start:end], data, meta)
        match = cache.match(hashes, partial_ok=False)
        assert [(h.start, n) for h, n in match.segments] == [(0, 2), (32, 2)]
        restored = model.new_state()
        for header, used in match.segments:
            adapter.import_range(restored, header.start, used * 16, cache.load(header, prompt, used * 16))
        assert restored.pos == 64
        rest = model(tokens[:, 64:], restored)
    assert torch.allclose(rest, full[:, 64:], atol=1e-4)
    # A prompt that leaves the second segment halfway cannot use it (no snapshot there).
    other = prompt[:48] + [(t + 1) % 512 for t in prompt[48:]]
    match = cache.match(chain_hashes(fingerprint, other, 4), partial_ok=False)
    assert [(h.start, n) for h, n in match.segments] == [(0, 2)]
    assert "cannot stop inside a segment" in match.reason


# ---------------------------------------------------------------- the real embedded model


@pytest.mark.model
@pytest.mark.slow
def test_real_mini_warm_equals_cold():
    path = real_model_gguf_or_skip()
    mini = engine.load(str(path))
    text = Path(engine.__file__).with_name("generate.py").read_text()
    ids = mini.tokenizer.render_chat([{"role": "user", "content": text[:2500] + "\n\nWhat does stream() yield?"}])
    params = SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=1.1)
    settings = CacheSettings()
    cold = list(cached_generation.stream(mini, ids, params, settings=settings))[-1]
    warm = list(cached_generation.stream(mini, ids, params, settings=settings))[-1]
    assert cold.extra["cache"]["reused_tokens"] == 0
    assert warm.extra["cache"]["reused_tokens"] == (len(ids) - 1) // 256 * 256 > 0
    assert warm.text == cold.text


def test_segment_ends():
    from engine.cached_generation import segment_ends

    # Per-token state: big segments, the last one at the final chunk boundary.
    assert segment_ends(0, 1024, 32, 256, partial_ok=True) == [256, 512, 768, 1024]
    assert segment_ends(224, 600, 32, 256, partial_ok=True) == [480, 600]
    # Snapshot state: also ends 1, 2, 4, 8 ... chunks before the end, so a new question
    # after the same pack loses little.
    assert segment_ends(0, 1024, 32, 4096, partial_ok=False) == [512, 768, 896, 960, 992, 1024]
    assert segment_ends(1000, 1000, 32, 256, partial_ok=False) == []


@pytest.mark.slow
def test_deepseek_v4_through_cached_generation(tmp_path):
    """The whole path with the tiny DeepSeek-V4 checkpoint: warm == cold greedy answer,
    and a changed ending (a new question) still reuses most of the prompt."""
    from dsv4_tiny import write_tiny

    from engine.deepseek_v4.weights import load_checkpoint
    from engine.runtime import LoadedModel
    from engine.tokenizer import Tokenizer
    from tests.tinymodels import write_tiny_hf_tokenizer

    checkpoint = write_tiny(tmp_path / "ckpt", "fp32", index_topk=2)
    model = load_checkpoint(checkpoint).model
    tokenizer = Tokenizer.from_hf_dir(write_tiny_hf_tokenizer(tmp_path / "tok"))
    loaded = LoadedModel(model, tokenizer, name="dsv4-tiny", arch="deepseek_v4", mode="fp32", path=checkpoint)
    settings = CacheSettings(chunk_tokens=16, segment_bytes=1 << 20)
    prompt = torch.randint(3, 512, (150,), generator=torch.Generator().manual_seed(7)).tolist()
    params = SamplingParams(max_tokens=6)
    plain = list(loaded.stream(prompt, params))[-1]
    cold = list(cached_generation.stream(loaded, prompt, params, settings=settings))[-1]
    warm = list(cached_generation.stream(loaded, prompt, params, settings=settings))[-1]
    assert cold.extra["cache"]["reused_tokens"] == 0 and cold.extra["cache"]["segments_written"] >= 3
    assert warm.extra["cache"]["reused_tokens"] == 144 and warm.text == cold.text == plain.text
    new_question = prompt[:130] + [5, 6, 7, 8, 9, 10]
    done = list(cached_generation.stream(loaded, new_question, params, settings=settings))[-1]
    assert done.extra["cache"]["reused_tokens"] == 128  # the segment ending 1 chunk early
    assert done.text == list(loaded.stream(new_question, params))[-1].text
