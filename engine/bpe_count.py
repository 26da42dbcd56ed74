"""Exact token counts in C for the split rule most code models use: tiktoken's counts, ~10x faster.

engine/_bpecount.c splits text by hand with one rule, DIGITS_PAT_STR (single digits, then
GPT-2's pattern: SmolLM2, StarCoder, ...), runs byte-level BPE on each piece with the model's
ranks and remembers each piece's count per thread, so a repeated piece costs one lookup. Its
counts equal len(Tokenizer.encode(text)) exactly; tests/test_fast_count.py proves it on real
code and on random text. Where the extension was not built (no C compiler at install time) or
the tokenizer splits by another rule, `fast_counter` returns None and tiktoken counts.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

try:
    from engine import _bpecount
except ImportError:  # built without a C compiler: tiktoken counts
    _bpecount = None

# The one split rule the C code implements (a copy, not an import: engine/tokenizer.py imports
# this module, and a test checks the two are equal).
IMPLEMENTED_PAT_STR = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""


def available() -> bool:
    return _bpecount is not None


class FastCounter:
    """Counts with the C extension; one piece memo per thread (a memo is not shared)."""

    def __init__(self, id_bytes: list[bytes], non_rank_ids: Sequence[int], *, memo: bool = True):
        """id_bytes: every token id's bytes (rank = id); non_rank_ids: ids left out of the rank
        table. Bytes no ranked token spells are the ones the vocabulary lacks: not counted."""
        if _bpecount is None:
            raise RuntimeError("engine._bpecount is not built")
        self._counter: Any = _bpecount.Counter(id_bytes, non_rank_ids)
        self._use_memo = memo
        self._local = threading.local()

    def count(self, text: str) -> int:
        memo = None
        if self._use_memo:
            memo = getattr(self._local, "memo", None)
            if memo is None:
                memo = self._local.memo = _bpecount.Memo()
        try:
            return self._counter.count(text, memo)
        except UnicodeEncodeError:
            # lone surrogates: replaced as tiktoken's encode_ordinary replaces them
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return self._counter.count(text, memo)

    def pieces(self, text: str) -> list[bytes]:
        """The split alone (tests compare it with tiktoken's regex)."""
        return self._counter.pieces(text)


def fast_counter(pat_str: str, presplit: bool, id_bytes: list[bytes], non_rank_ids: Sequence[int]) -> FastCounter | None:
    """A FastCounter when the C code implements this tokenizer's split rule, else None."""
    if _bpecount is None or presplit or pat_str != IMPLEMENTED_PAT_STR:
        return None
    return FastCounter(id_bytes, non_rank_ids)


def derive_table(tokens: Sequence[str], kinds: Sequence[int], merges: Sequence[str]) -> tuple[list[bytes], list[int], list[int], list[int]] | None:
    """engine/tokenizer.py build_byte_level_table's work in C: (id_bytes, special ids, non-rank
    ids, bytes the vocabulary lacks). None where the extension is missing, the merges fail the
    rank = id check (the Python code then raises its error) or a text is not valid UTF-8."""
    if _bpecount is None:
        return None
    try:
        return _bpecount.derive_table(list(tokens), [int(k) for k in kinds], list(merges))
    except UnicodeEncodeError:      # lone surrogates in a tokenizer.json: the Python code decides
        return None
