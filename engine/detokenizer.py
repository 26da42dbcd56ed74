"""Turn a stream of token ids into text deltas that never end inside a UTF-8 character."""

from __future__ import annotations

from typing import Protocol

# Control tokens that stay in the text even when control tokens are skipped.
# - The reasoning markers: DeepSeek-V4 (and R1, Qwen3) have `<think>`/`</think>` as special
#   tokens; dropping them would hide where the reasoning ends, and the CLI splits the stream there.
# - DeepSeek-V3.2/V4's DSML marker `｜DSML｜`: one added token, marked special in tokenizer.json
#   (sgl-project/sglang#16122; antirez/ds4#95 lists it among V4's special tokens), inside the
#   generated tool-call tags `<｜DSML｜tool_calls>`, `<｜DSML｜invoke ...>`. Dropped, the calls
#   arrive as `<tool_calls>` that no parser recognises (vllm-project/vllm#30541; SGLang decodes
#   DeepSeek calls with skip_special_tokens=False for this: sgl-project/sglang#15155).
VISIBLE_SPECIALS = frozenset({b"<think>", b"</think>", "｜DSML｜".encode()})


class _DecodesBytes(Protocol):
    def id_to_bytes(self, token_id: int) -> bytes: ...

    def is_special(self, token_id: int) -> bool: ...


class StreamingDetokenizer:
    """Feed ids one at a time; each `add` returns the newly completed text (maybe "").

    A token can end in the middle of a multi-byte character (byte-level BPE splits emoji and
    CJK across tokens), so trailing bytes of an incomplete sequence are held until the next
    token completes them. Bytes that can never become valid UTF-8 are emitted as U+FFFD.
    """

    def __init__(self, tokenizer: _DecodesBytes, *, skip_special: bool = False):
        self._tokenizer = tokenizer
        # leave control tokens (<|im_end|>, <file_sep>) out of the text, but not VISIBLE_SPECIALS
        self._skip_special = skip_special
        self._pending = b""

    def add(self, token_id: int) -> str:
        token = self._tokenizer.id_to_bytes(token_id)
        if self._skip_special and self._tokenizer.is_special(token_id) and token not in VISIBLE_SPECIALS:
            return ""
        data = self._pending + token
        keep = _incomplete_tail_length(data)
        self._pending = data[len(data) - keep :] if keep else b""
        complete = data[: len(data) - keep]
        return complete.decode("utf-8", errors="replace") if complete else ""

    def flush(self) -> str:
        """Whatever is held back, decoded with replacement characters (end of stream)."""
        data, self._pending = self._pending, b""
        return data.decode("utf-8", errors="replace")

    @property
    def pending_bytes(self) -> bytes:
        return self._pending


def _incomplete_tail_length(data: bytes) -> int:
    """How many trailing bytes form the start of a UTF-8 sequence that is not yet complete."""
    # Look back at most 3 bytes for a lead byte whose sequence runs past the end.
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:  # continuation byte: keep looking for the lead
            continue
        if byte >= 0xF0 and byte <= 0xF4:
            needed = 4
        elif byte >= 0xE0 and byte < 0xF0:
            needed = 3
        elif byte >= 0xC2 and byte < 0xE0:
            needed = 2
        else:
            return 0  # ASCII or an invalid lead: nothing to wait for
        return back if back < needed else 0
    return 0
