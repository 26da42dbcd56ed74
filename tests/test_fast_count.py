"""The C token counter (engine/_bpecount.c via engine/bpe_count.py) counts exactly as tiktoken
encodes: len(Tokenizer.encode(text)) on real code, random text and edge cases, with and
without its piece memo, on several threads; other split rules and a missing extension fall
back to tiktoken."""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import re
import sysconfig
import threading
from pathlib import Path

import pytest

from engine import bpe_count
from engine.errors import ModelFormatError
from engine.gen_bpecount_tables import HEADER, class_ranges, render
from engine.gguf_file import GGUFFile
from engine.tokenizer import (
    DIGITS_PAT_STR,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    TOKEN_UNUSED,
    TOKEN_USER_DEFINED,
    Tokenizer,
    build_byte_level_table,
    bytes_to_unicode,
)
from tests.tinymodels import (
    CONTROL_TOKENS,
    real_model_gguf_or_skip,
    tiny_vocab,
    write_tiny_hf_tokenizer,
    write_tiny_llama_gguf,
)

needs_extension = pytest.mark.skipif(not bpe_count.available(), reason="engine._bpecount is not built (no C compiler at install)")

STDLIB = Path(sysconfig.get_paths()["stdlib"])

_PIECES = [
    "def", " x", "\n", "\n\n", "  ", "    ", "\t", "\r\n", " \n ", "é", "e\u0301", "\u0308", "中文", "日本語", "😀", "👩\u200d💻",
    "\U00041234", "\U000b0000", "\U00031350",   # a CJK Ext H letter: newer than Python 3.11's Unicode tables
    "\x04", "\x1d", "\x1c", "\x00", "\x7f", "\u0085", "\u00a0", "\u2028", "\u3000", "\u200b", "\ufeff",
    "'s", "'S", "'t", "'re", "'ve", "'m", "'ll", "'d", "''", "'", "n't", " '", "'x",
    "123", " 4", "7", "٣", "²", "Ⅻ", "½", "x2", "\ufffd", "`", "</file>", "<|im_end|>", "<|endoftext|>",
    "\ud800", "\udc00", "\ud83d\ude00", "==", "!=", " +=", "->", "#", "\\", '"""', "/*",
]


def random_texts(seed: str, n: int = 300) -> list[str]:
    rng = random.Random(seed)
    texts = ["", " ", "x", "\x04", "\U00041234", "a\ud800b", "\ud83d\ude00", "plain ASCII only\n" * 50,
             "=" * 700, "a" * 3000, " " * 600 + "1", "\n" * 400, "é" * 500]
    for _ in range(n):
        texts.append("".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 60))))
    # long pieces (past 64 bytes the C code merges through a heap instead of scanning)
    for _ in range(n // 10):
        # the letters of the tiny vocabulary's merges too, so ties between equal pairs occur
        alphabet = rng.choice(["abcde", "ab", "a", "xyzxyzq", " ", "=-", "é中", "0", "bonacirtu", "elfsan", "_", '"'])
        texts.append(" " + "".join(rng.choice(alphabet) for _ in range(rng.randint(40, 3000))))
    return texts


@functools.lru_cache(maxsize=4)
def _stdlib_sample(limit: int) -> tuple[str, ...]:
    paths = sorted(STDLIB.rglob("*.py"))
    step = max(1, len(paths) // limit)
    texts = []
    for path in paths[::step][:limit]:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
    return tuple(texts)


def stdlib_sample(limit: int = 300) -> list[str]:
    """Every k-th .py file of the standard library: ~300 real files, ~3 MB."""
    return list(_stdlib_sample(limit))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("fast") / "tiny.gguf"
    write_tiny_llama_gguf(path)
    return Tokenizer.from_gguf(path)


@pytest.fixture(scope="module")
def real() -> Tokenizer:
    return Tokenizer.from_gguf(real_model_gguf_or_skip())


def tiktoken_counts(tokenizer: Tokenizer, texts: list[str]) -> list[int]:
    return [tokenizer._tiktoken_count(t) for t in texts]


def test_the_c_split_rule_is_the_tokenizers_rule():
    assert bpe_count.IMPLEMENTED_PAT_STR == DIGITS_PAT_STR


def test_the_committed_class_table_matches_the_installed_tiktoken():
    """engine/_bpecount_tables.h was generated from tiktoken's own \\p{L}, \\p{N} and \\s."""
    committed = HEADER.read_text(encoding="ascii")
    regenerated = render(class_ranges())
    drop_version = re.compile(r"from tiktoken \S+;")
    assert drop_version.sub("", committed) == drop_version.sub("", regenerated), "run python engine/gen_bpecount_tables.py"


@needs_extension
def test_the_split_is_tiktokens_regex_split(tiny):
    import regex

    pattern = regex.compile(DIGITS_PAT_STR)
    fast = tiny._fast
    for text in random_texts("split"):
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        assert fast.pieces(text) == [m.encode("utf-8") for m in pattern.findall(text)], repr(text)


@needs_extension
def test_counts_equal_tiktoken_on_standard_library_code(tiny):
    assert tiny._fast is not None and tiny.counter_name == "c"
    texts = stdlib_sample()
    assert len(texts) > 200
    assert [tiny.count(t) for t in texts] == tiktoken_counts(tiny, texts)


@needs_extension
@pytest.mark.model
def test_counts_equal_tiktoken_with_the_real_vocabulary(real):
    assert real._fast is not None and real._missing_ascii    # SmolLM2 lacks some bytes: they are dropped
    texts = stdlib_sample() + random_texts("real")
    expected = tiktoken_counts(real, texts)
    assert [real.count(t) for t in texts] == expected
    assert [len(real.encode(t)) for t in texts[:50]] == expected[:50]


@needs_extension
def test_counts_equal_tiktoken_on_random_text(tiny):
    texts = random_texts("random", 600)
    expected = tiktoken_counts(tiny, texts)
    assert [tiny.count(t) for t in texts] == expected
    assert tiny.count("") == 0
    specials = "".join(CONTROL_TOKENS)
    assert tiny.count(specials) == len(tiny.encode(specials)) > len(CONTROL_TOKENS)   # plain text, not control ids


@needs_extension
def test_counts_with_and_without_the_memo_agree(tiny):
    texts = stdlib_sample(60) + random_texts("memo")
    table = tiny._table
    with_memo = bpe_count.FastCounter(table.id_bytes, table.non_rank_ids)
    without = bpe_count.FastCounter(table.id_bytes, table.non_rank_ids, memo=False)
    first = [with_memo.count(t) for t in texts]
    assert first == [without.count(t) for t in texts]
    assert [with_memo.count(t) for t in texts] == first      # now mostly from the memo


@needs_extension
@pytest.mark.parametrize("missing", [[0x04, 0x1D, 0xF1], [0x85], [0xC3, 0xF0]])
def test_bytes_the_vocabulary_lacks_are_not_counted(tiny, missing):
    table = tiny._table
    ids = [i for i, raw in enumerate(table.id_bytes) if len(raw) == 1 and raw[0] in missing]
    changed = dataclasses.replace(table, non_rank_ids=sorted(set(table.non_rank_ids) | set(ids)),
                                  extra_bytes=sorted(set(table.extra_bytes) | set(missing)))
    tokenizer = Tokenizer(changed, name="missing", digest="0" * 64, vocab_size=len(table.id_bytes))
    assert tokenizer._fast is not None
    texts = random_texts(f"missing-{missing}")
    assert [tokenizer.count(t) for t in texts] == [len(tokenizer.encode(t)) for t in texts]


@needs_extension
def test_threads_count_in_parallel_and_exactly(tiny):
    texts = stdlib_sample(80) + random_texts("threads", 200)
    expected = tiktoken_counts(tiny, texts)
    assert tiny.count_batch(texts, num_threads=3) == expected
    # one FastCounter from many threads at once: each thread's memo is its own
    results: dict[int, list[int]] = {}

    def work(k: int) -> None:
        results[k] = [tiny.count(t) for t in texts[k::2] + texts[1 - k::2]]

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results[0] == expected[0::2] + expected[1::2]
    assert results[1] == expected[1::2] + expected[0::2]


def test_without_the_extension_tiktoken_counts(tiny, monkeypatch):
    monkeypatch.setattr(bpe_count, "_bpecount", None)
    tokenizer = Tokenizer(tiny._table, name="fallback", digest="1" * 64, vocab_size=tiny.vocab_size)
    assert tokenizer._fast is None and tokenizer.counter_name == "tiktoken"
    texts = random_texts("fallback", 100)
    assert tokenizer.count_batch(texts) == [len(tokenizer.encode(t)) for t in texts]


def test_other_split_rules_count_with_tiktoken(tmp_path):
    gpt2 = Tokenizer.from_gguf(write_tiny_llama_gguf(tmp_path / "gpt2.gguf", pre="gpt2"))
    deepseek = Tokenizer.from_hf_dir(write_tiny_hf_tokenizer(tmp_path / "deepseek", style="deepseek"))
    texts = random_texts("other", 100)
    for tokenizer in (gpt2, deepseek):
        assert tokenizer._fast is None and tokenizer.counter_name == "tiktoken"
        assert [tokenizer.count(t) for t in texts] == [len(tokenizer.encode(t)) for t in texts]


@needs_extension
def test_a_hugging_face_smollm_tokenizer_uses_the_c_counter(tmp_path):
    tokenizer = Tokenizer.from_hf_dir(write_tiny_hf_tokenizer(tmp_path / "smollm", style="smollm"))
    assert tokenizer._fast is not None
    texts = random_texts("hf", 150) + stdlib_sample(40)
    assert [tokenizer.count(t) for t in texts] == [len(tokenizer.encode(t)) for t in texts]


# ---- the rank table derived in C equals the Python derivation --------------------------------


def _both_tables(monkeypatch, tokens, kinds, merges):
    fast = build_byte_level_table(tokens, kinds, merges, DIGITS_PAT_STR)
    with monkeypatch.context() as patch:
        patch.setattr(bpe_count, "_bpecount", None)
        reference = build_byte_level_table(tokens, kinds, merges, DIGITS_PAT_STR)
    return fast, reference


@needs_extension
def test_the_c_table_derivation_equals_the_python_one(monkeypatch, tmp_path):
    vocab = tiny_vocab()
    fast, reference = _both_tables(monkeypatch, vocab.tokens, vocab.token_types, vocab.merges)
    assert fast == reference and fast.extra_bytes        # the tiny vocabulary lacks some bytes
    for style in ("smollm", "deepseek"):
        data = json.loads((write_tiny_hf_tokenizer(tmp_path / style, style=style) / "tokenizer.json").read_text())
        model = data["model"]
        size = max(model["vocab"].values()) + 1
        tokens = [""] * size
        for text, token_id in model["vocab"].items():
            tokens[token_id] = text
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        fast, reference = _both_tables(monkeypatch, tokens, [TOKEN_NORMAL] * size, merges)
        assert fast == reference


@needs_extension
@pytest.mark.model
def test_the_c_table_derivation_equals_the_python_one_for_the_real_vocabulary(monkeypatch):
    path = real_model_gguf_or_skip()
    spec = GGUFFile(path).tokenizer_spec()
    fast, reference = _both_tables(monkeypatch, spec.tokens, spec.token_types, spec.merges)
    assert fast == reference


@needs_extension
def test_the_c_table_derivation_handles_odd_vocabularies_as_python_does(monkeypatch):
    """Duplicates, empty and unspellable texts, unknown/unused/control/user-defined kinds, a
    control token spelled like a normal one, and a multi-byte token no merge produces."""
    byte_chars = bytes_to_unicode()
    base = [byte_chars[b] for b in range(256) if b not in (0x41, 0xF5)]      # "A" and 0xF5 missing
    tokens = base + ["ab", "zz", "ab", "abc", "", "", "€", "<|x|>", "zz", "q\u0100", "Ġt", "ĠtĠ", "<u>"]
    kinds = [TOKEN_NORMAL] * len(base) + [TOKEN_NORMAL, TOKEN_NORMAL, TOKEN_NORMAL, TOKEN_NORMAL, TOKEN_NORMAL,
                                          TOKEN_NORMAL, TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_CONTROL, TOKEN_UNUSED,
                                          TOKEN_NORMAL, TOKEN_NORMAL, TOKEN_USER_DEFINED]
    kinds[5] = TOKEN_UNKNOWN
    merges = ["a b", "ab c", "Ġ t", "Ġt Ġ"]
    fast, reference = _both_tables(monkeypatch, tokens, kinds, merges)
    assert fast == reference
    assert 0x41 in fast.extra_bytes and 0xF5 in fast.extra_bytes
    assert fast.special_tokens == {"<|x|>": len(base) + 7, "zz": len(base) + 8, "<u>": len(base) + 12}
    assert len(base) + 1 in fast.non_rank_ids and len(base) + 2 in fast.non_rank_ids   # "zz": no merge makes it; "ab" twice


@needs_extension
@pytest.mark.parametrize("merges", [["ab"], ["a "], [" b"], ["a x"], ["x b"], ["ab c", "a b"], ["a b", "a b"], ["a <s>"]])
def test_merges_the_c_check_rejects_are_explained_by_python(merges):
    byte_chars = bytes_to_unicode()
    tokens = [byte_chars[b] for b in range(256)] + ["ab", "abc", "a<s>", "<s>"]
    kinds = [TOKEN_NORMAL] * 259 + [TOKEN_CONTROL]
    if merges == ["a <s>"]:
        tokens[-2], kinds[-2] = "<s>", TOKEN_NORMAL       # merged text is also a control token's
        kinds[-1] = TOKEN_NORMAL
        tokens[-1] = "a<s>"
        kinds[-1] = TOKEN_CONTROL
    assert bpe_count.derive_table(tokens, kinds, merges) is None
    with pytest.raises(ModelFormatError):
        build_byte_level_table(tokens, kinds, merges, DIGITS_PAT_STR)
