"""Tokenizer.count and count_batch: the fast path (tiktoken's id buffer, only its length read)
gives exactly len(encode(text)) whatever the text holds."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from engine.tokenizer import Tokenizer
from tests.tinymodels import real_model_gguf_or_skip, write_tiny_llama_gguf

_PIECES = ["def", " x", "\n", "\n\n", "  ", "\t", "é", "中文", "😀", "\U00041234", "\U000b0000", "\x04", "\x1d",
           "\x00", "\x7f", "<|im_end|>", "<|endoftext|>", "'s", "123", " 4", "\ufffd", "\u0085", "`", "</file>"]


def _texts(seed: str, n: int = 300) -> list[str]:
    rng = random.Random(seed)
    texts = ["", "x", "\x04", "\U00041234", "a\ud800b", "plain ASCII only\n" * 50]
    for _ in range(n):
        texts.append("".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 60))))
    return texts


def _with_missing_bytes(tokenizer: Tokenizer, missing: list[int]) -> Tokenizer:
    """The same vocabulary without the single-byte tokens of `missing` (ranked past its end,
    so encode drops them, as it does for bytes a real vocabulary lacks)."""
    table = tokenizer._table
    ids = [i for i, raw in enumerate(table.id_bytes) if len(raw) == 1 and raw[0] in missing]
    extra = sorted(set(table.extra_bytes) | set(missing))
    changed = dataclasses.replace(table, non_rank_ids=sorted(set(table.non_rank_ids) | set(ids)), extra_bytes=extra)
    return Tokenizer(changed, name="missing", digest="0" * 64, vocab_size=len(table.id_bytes))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("count") / "tiny.gguf"
    write_tiny_llama_gguf(path)
    return Tokenizer.from_gguf(path)


@pytest.mark.parametrize("missing", [[], [0x04, 0x1D, 0xF1], [0x85], [0xC3, 0xF0]])
def test_count_is_the_length_of_encode(tiny, missing):
    tokenizer = _with_missing_bytes(tiny, missing) if missing else tiny
    texts = _texts(f"count-{missing}")
    expected = [len(tokenizer.encode(t)) for t in texts]
    assert [tokenizer.count(t) for t in texts] == expected
    assert tokenizer.count_batch(texts) == expected
    assert tokenizer.count_batch(texts, num_threads=1) == expected
    assert tokenizer.count_batch(texts[:1], num_threads=3) == expected[:1]
    assert tokenizer.count_batch([]) == []
    if 0x04 in missing:     # a lone control byte stays a byte token: encode drops it
        dropped = [t for t in texts if tokenizer._may_drop(t)]
        assert dropped and any(len(tokenizer.encode(t)) < len(tiny.encode(t)) for t in dropped)


@pytest.mark.model
def test_count_is_the_length_of_encode_with_the_real_vocabulary():
    path = real_model_gguf_or_skip()
    tokenizer = Tokenizer.from_gguf(path)
    assert tokenizer._missing_ascii      # SmolLM2 lacks some control bytes: both paths are used
    texts = _texts("real", 400) + [Path(__file__).read_text(encoding="utf-8")]
    assert tokenizer.count_batch(texts) == [len(tokenizer.encode(t)) for t in texts]
