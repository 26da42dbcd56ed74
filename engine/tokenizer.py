"""The model's tokenizer as a tiktoken Encoding built from the checkpoint's own vocabulary.

Byte-level BPE vocabularies (GGUF `gpt2` model, Hugging Face ByteLevel) store each token as
GPT-2's printable-unicode spelling of its bytes. tiktoken wants bytes -> rank and applies the
merge whose result has the lowest rank. When token ids rise in merge order (checked below),
rank = id reproduces the BPE merge order exactly, so the Encoding gives the same ids as the
reference tokenizer, 4-10x faster. No torch here: `dsv4 pack` counts tokens with this module,
through engine/bpe_count.py's C counter (exactly len(encode), ~10x faster again) where it applies.

Policy: text passed to `encode`/`count` is plain text. Special-token strings inside it
("<|im_end|>" in a file) are encoded as ordinary text, never as control tokens; only the
chat template's own structure produces control tokens (`render_chat`).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import tiktoken

from engine.atomic_files import atomic_write_bytes
from engine.bpe_count import FastCounter, derive_table, fast_counter
from engine.errors import ModelFormatError

# Bump when the derived table's meaning changes, so stale cache entries are ignored.
_CACHE_FORMAT = 1

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# GPT-2's split pattern, closed with `\s+` as tiktoken's r50k pattern is.
GPT2_PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# llama.cpp splits single digits first, then GPT-2's pattern; in one regex that is a leading
# `\p{N}` branch, plus `\s+(?=\p{N})` so a whitespace run before a digit stays whole (the digit
# split happened before the whitespace rule saw it).
DIGITS_PAT_STR = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""

# DeepSeek-V3's isolating splits (llama.cpp's deepseek-v3 pre-tokenizer, and tokenizer.json's
# Split sequence): digit groups, then CJK runs, then the word/punctuation/space rule.
DEEPSEEK_V3_STAGES = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
)

# tokenizer.ggml.pre values -> split stages applied in order, grouped as llama.cpp groups them.
_PRE_STAGES: dict[str, tuple[str, ...]] = {
    **{name: (r"\p{N}", GPT2_PAT_STR) for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")},
    **{name: (GPT2_PAT_STR,) for name in ("gpt-2", "gpt2", "mpt", "olmo", "jais")},
    "deepseek-v3": DEEPSEEK_V3_STAGES,
}

# Control tokens that end a turn in common chat formats (llama.cpp treats these as end-of-generation).
_END_OF_TURN_NAMES = (
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|end_of_text|>",
    "<EOT>",
    "<｜end▁of▁sentence｜>",
    "<|end▁of▁sentence|>",
)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used to spell byte-level BPE tokens."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


@lru_cache(maxsize=1)
def _unicode_to_latin1_translation() -> dict[int, int]:
    # str.translate to latin-1 code points, then .encode("latin-1") gives the bytes: one C call per token.
    return {ord(ch): b for b, ch in bytes_to_unicode().items()}


def token_text_to_bytes(text: str) -> bytes | None:
    """Bytes of a byte-level BPE token spelling; None when it is not a valid spelling."""
    mapped = text.translate(_unicode_to_latin1_translation())
    try:
        return mapped.encode("latin-1")
    except UnicodeEncodeError:
        return None


def split_stages_for_pre(pre: str | None) -> tuple[str, ...]:
    """The isolating split patterns a GGUF's `tokenizer.ggml.pre` stands for."""
    if pre is None or pre == "default":
        raise ModelFormatError(
            "the GGUF does not name its pre-tokenizer (tokenizer.ggml.pre), so its split rule is unknown",
            "re-convert the model with a current llama.cpp",
        )
    stages = _PRE_STAGES.get(pre)
    if stages is None:
        supported = ", ".join(sorted(_PRE_STAGES))
        raise ModelFormatError(f"unsupported pre-tokenizer {pre!r}", f"supported: {supported}")
    return stages


@dataclass(frozen=True)
class _Table:
    """The derived tokenizer. The disk cache stores all but `pat_str`, which always comes from
    this module so a corrected pattern takes effect without clearing caches."""

    pat_str: str
    id_bytes: list[bytes]  # every id's bytes; a special's bytes are its UTF-8 text
    special_tokens: dict[str, int]
    non_rank_ids: list[int]  # ids not in the BPE rank table (specials, unused, unreachable)
    extra_bytes: list[int]  # single bytes missing from the vocabulary, ranked after it

    def mergeable_ranks(self) -> dict[bytes, int]:
        skip = set(self.non_rank_ids)
        ranks = {token: i for i, token in enumerate(self.id_bytes) if i not in skip}
        n = len(self.id_bytes)
        for k, byte in enumerate(self.extra_bytes):
            ranks[bytes([byte])] = n + k
        return ranks

    def to_json(self) -> dict[str, Any]:
        return {
            "format": _CACHE_FORMAT,
            "id_bytes": [b.decode("latin-1") for b in self.id_bytes],
            "special_tokens": self.special_tokens,
            "non_rank_ids": self.non_rank_ids,
            "extra_bytes": self.extra_bytes,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], pat_str: str) -> _Table:
        if data.get("format") != _CACHE_FORMAT:
            raise ValueError("stale tokenizer cache format")
        return cls(
            pat_str=pat_str,
            id_bytes=[s.encode("latin-1") for s in data["id_bytes"]],
            special_tokens={str(k): int(v) for k, v in data["special_tokens"].items()},
            non_rank_ids=[int(i) for i in data["non_rank_ids"]],
            extra_bytes=[int(b) for b in data["extra_bytes"]],
        )


def build_byte_level_table(tokens: Sequence[str], token_types: Sequence[int], merges: Sequence[str], pat_str: str) -> _Table:
    """Derive tiktoken's rank table from a byte-level BPE vocabulary; rank = token id.

    Raises ModelFormatError when rank = id would not reproduce the merge order. The C extension
    does the same work ~3x faster (it runs before a cold pack's first count); this Python code
    is the reference, and raises the errors.
    """
    derived = derive_table(tokens, token_types, merges)
    if derived is not None:
        id_bytes, special_ids, non_rank_ids, extra_bytes = derived
        return _Table(pat_str, id_bytes, {tokens[i]: i for i in special_ids}, non_rank_ids, extra_bytes)
    return build_byte_level_table_in_python(tokens, token_types, merges, pat_str)


def build_byte_level_table_in_python(tokens: Sequence[str], token_types: Sequence[int], merges: Sequence[str], pat_str: str) -> _Table:
    id_bytes: list[bytes] = []
    special_tokens: dict[str, int] = {}
    non_rank_ids: list[int] = []
    seen: dict[bytes, int] = {}
    translation = _unicode_to_latin1_translation()
    # token_text_to_bytes inlined (once per token)
    for token_id, (text, kind) in enumerate(zip(tokens, token_types)):
        if kind == TOKEN_CONTROL or kind == TOKEN_USER_DEFINED:
            special_tokens[text] = token_id
            non_rank_ids.append(token_id)
            id_bytes.append(text.encode("utf-8"))
            continue
        try:
            raw: bytes | None = text.translate(translation).encode("latin-1")
        except UnicodeEncodeError:
            raw = None
        if kind == TOKEN_UNKNOWN or kind == TOKEN_UNUSED or raw is None or raw in seen:
            # Not reachable by byte-level BPE; decodes as its text so generation never fails on it.
            non_rank_ids.append(token_id)
            id_bytes.append(raw if raw is not None else text.encode("utf-8"))
            continue
        seen[raw] = token_id
        id_bytes.append(raw)

    produced = _check_merge_order(tokens, merges, special_tokens)
    # Tokens longer than one byte that no merge produces are unreachable for the reference BPE;
    # tiktoken would reach them by concatenation, so they leave the rank table.
    for raw, token_id in list(seen.items()):
        if len(raw) > 1 and tokens[token_id] not in produced:
            non_rank_ids.append(token_id)
            del seen[raw]
    extra = [b for b in range(256) if bytes([b]) not in seen]
    return _Table(pat_str, id_bytes, special_tokens, sorted(non_rank_ids), extra)


def _check_merge_order(tokens: Sequence[str], merges: Sequence[str], specials: dict[str, int]) -> set[str]:
    """The texts the merges produce, once rank = id is known to reproduce their order."""
    ids = {text: i for i, text in enumerate(tokens)}
    produced: list[str] = []
    previous = -1
    for index, merge in enumerate(merges):
        left, space, right = merge.partition(" ")
        if not space or not left or not right:
            raise ModelFormatError(f"merge #{index} {merge!r} is not two tokens separated by a space", "the tokenizer data is damaged")
        merged = left + right
        merged_id = ids.get(merged)
        if merged_id is None or left not in ids or right not in ids or merged in specials:
            raise ModelFormatError(
                f"merge #{index} {merge!r} does not produce a vocabulary token",
                "this byte-level BPE vocabulary cannot be used with tiktoken ranks",
            )
        if merged_id <= previous:
            raise ModelFormatError(
                f"token ids do not rise in merge order (merge #{index} {merge!r} gives id {merged_id} after id {previous})",
                "rank = id would change the tokenization; this vocabulary needs a rank remap that dsv4 does not do",
            )
        previous = merged_id
        produced.append(merged)
    return set(produced)


class Tokenizer:
    """Encode/decode/count with a model's own vocabulary; build with from_gguf or from_hf_dir."""

    def __init__(
        self,
        table: _Table,
        *,
        name: str,
        digest: str,
        vocab_size: int,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        unk_id: int | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
        extra_stop_ids: Iterable[int] = (),
        presplit_patterns: Sequence[str] = (),
    ):
        self.name = name
        self.digest = digest
        self.vocab_size = vocab_size
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.unk_id = unk_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.special_tokens: dict[str, int] = dict(table.special_tokens)
        self._table = table
        self._id_bytes = table.id_bytes
        # Built at first use (~50 ms each): `dsv4 pack` counts with the C counter alone when
        # it applies, and never needs tiktoken's Encoding then.
        self._lazy_encoding: tiktoken.Encoding | None = None
        self._lazy_fast: FastCounter | None | bool = False      # False: not decided yet
        self._lazy_lock = threading.Lock()
        self._has_extra_bytes = bool(table.extra_bytes)
        # bytes the vocabulary lacks: ASCII ones as characters, the rest as byte values
        self._missing_ascii = tuple(chr(b) for b in table.extra_bytes if b < 0x80)
        self._missing_high = tuple(b for b in table.extra_bytes if b >= 0x80)
        # Earlier stages of a Hugging Face pre-tokenizer Sequence; tiktoken runs the last one.
        self._presplit = _Presplitter(presplit_patterns) if presplit_patterns else None
        self._special_id_set = frozenset(table.special_tokens.values())
        stop = {i for i in (eos_id, *extra_stop_ids) if i is not None}
        template = chat_template or ""
        for text in _END_OF_TURN_NAMES:
            token_id = self.special_tokens.get(text)
            if token_id is not None and (text in template or token_id == eos_id or text == "<|endoftext|>"):
                stop.add(token_id)
        self.stop_ids: frozenset[int] = frozenset(stop)
        self._template: Any = None

    # ---- construction ---------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """The tokenizer a GGUF file carries (rank table cached on disk, memoised per process)."""
        path = Path(path)
        try:
            stat = path.stat()
        except OSError as exc:
            raise ModelFormatError(f"cannot read {path}: {exc.strerror}", "check the model path") from exc
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        with _memo_lock:
            cached = _file_memo.get(key)
        if cached is not None:
            return cached

        from engine.gguf_file import GGUFFile

        gguf_file = GGUFFile(path)
        # .get decodes single keys: the vocabulary is decoded only when the table must be derived.
        model = gguf_file.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ModelFormatError(
                f"{path.name}: tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')",
                "use a model with a byte-level BPE tokenizer",
            )
        digest = gguf_file.tokenizer_digest()
        pat_str, presplit = _stages_to_patterns(list(split_stages_for_pre(gguf_file.get("tokenizer.ggml.pre"))))

        def derive() -> _Table:
            spec = gguf_file.tokenizer_spec()
            return build_byte_level_table(spec.tokens, spec.token_types, spec.merges, pat_str)

        table = _load_or_build_table(digest, pat_str, derive)

        def token_id(key: str) -> int | None:
            value = gguf_file.get(key)
            return int(value) if value is not None else None

        tokenizer = cls(
            table,
            name=_tokenizer_name(gguf_file),
            digest=digest,
            vocab_size=len(table.id_bytes),
            bos_id=token_id("tokenizer.ggml.bos_token_id"),
            eos_id=token_id("tokenizer.ggml.eos_token_id"),
            pad_id=token_id("tokenizer.ggml.padding_token_id"),
            unk_id=token_id("tokenizer.ggml.unknown_token_id"),
            add_bos=bool(gguf_file.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=gguf_file.get("tokenizer.chat_template"),
            extra_stop_ids=[i for i in (token_id("tokenizer.ggml.eot_token_id"), token_id("tokenizer.ggml.eom_token_id")) if i is not None],
            presplit_patterns=presplit,
        )
        with _memo_lock:
            _file_memo[key] = tokenizer
        return tokenizer

    @classmethod
    def from_hf_dir(cls, directory: str | Path) -> Tokenizer:
        """A Hugging Face checkpoint directory's byte-level BPE `tokenizer.json` (with
        tokenizer_config.json and generation_config.json when present)."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        try:
            raw = path.read_bytes()
            stat = path.stat()
        except OSError as exc:
            raise ModelFormatError(f"cannot read {path}: {exc.strerror}", "the checkpoint needs its tokenizer.json") from exc
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        with _memo_lock:
            cached = _file_memo.get(key)
        if cached is not None:
            return cached
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ModelFormatError(f"{path} is not valid JSON: {exc}", "fetch the checkpoint again") from exc
        stages = _hf_pre_tokenizer_stages(data.get("pre_tokenizer"), path)
        pat_str, presplit = _stages_to_patterns(stages)
        digest = hashlib.sha256(raw).hexdigest()
        table = _load_or_build_table(digest, pat_str, lambda: _build_hf_table(data, pat_str, path))
        config = _read_json_if_present(directory / "tokenizer_config.json")
        generation = _read_json_if_present(directory / "generation_config.json")
        specials = table.special_tokens

        def special_id(field: str) -> int | None:
            value = config.get(field)
            if isinstance(value, dict):
                value = value.get("content")
            return specials.get(value) if isinstance(value, str) else None

        extra_stop = generation.get("eos_token_id")
        extra_stop_ids = [extra_stop] if isinstance(extra_stop, int) else [i for i in extra_stop or [] if isinstance(i, int)]
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: use the default one
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
        if not isinstance(template, str):
            jinja = directory / "chat_template.jinja"
            template = jinja.read_text(encoding="utf-8") if jinja.is_file() else None
        tokenizer = cls(
            table,
            name=_slug_name(directory.name),
            digest=digest,
            vocab_size=len(table.id_bytes),
            bos_id=special_id("bos_token"),
            eos_id=special_id("eos_token"),
            pad_id=special_id("pad_token"),
            unk_id=special_id("unk_token"),
            add_bos=bool(config.get("add_bos_token", False)),
            chat_template=template,
            extra_stop_ids=extra_stop_ids,
            presplit_patterns=presplit,
        )
        with _memo_lock:
            _file_memo[key] = tokenizer
        return tokenizer

    # ---- encoding -------------------------------------------------------------------------

    @property
    def _encoding(self) -> tiktoken.Encoding:
        if self._lazy_encoding is None:
            with self._lazy_lock:
                if self._lazy_encoding is None:
                    table = self._table
                    self._lazy_encoding = tiktoken.Encoding(
                        name=f"{self.name}-{self.digest[:12]}",
                        pat_str=table.pat_str,
                        mergeable_ranks=table.mergeable_ranks(),
                        special_tokens=table.special_tokens,
                    )
        return self._lazy_encoding

    @property
    def _fast(self) -> FastCounter | None:
        """The C counter when it implements this tokenizer's split rule (engine/bpe_count.py)."""
        if self._lazy_fast is False:
            with self._lazy_lock:
                if self._lazy_fast is False:
                    table = self._table
                    self._lazy_fast = fast_counter(table.pat_str, self._presplit is not None, table.id_bytes, table.non_rank_ids)
        return self._lazy_fast  # type: ignore[return-value]

    @property
    def counter_name(self) -> str:
        """What counts tokens: "c" (engine/_bpecount.c) or "tiktoken" (the reference)."""
        return "c" if self._fast is not None else "tiktoken"

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text: special-token strings inside it stay text."""
        if self._presplit is None:
            return self._drop_missing_bytes(self._encoding.encode_ordinary(text))
        encode_piece = self._encoding.encode_ordinary
        ids: list[int] = []
        for piece in self._presplit.split(text):
            ids.extend(encode_piece(piece))
        return self._drop_missing_bytes(ids)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 4) -> list[list[int]]:
        if self._presplit is not None:
            return [self.encode(t) for t in texts]
        batches = self._encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)
        return [self._drop_missing_bytes(ids) for ids in batches]

    def count(self, text: str) -> int:
        """len(self.encode(text)), without building the list of ids when it can be avoided:
        the C counter where it applies; else tiktoken fills a buffer with the GIL released and
        only its length is read."""
        fast = self._fast
        if fast is not None:
            return fast.count(text)
        return self._tiktoken_count(text)

    def _tiktoken_count(self, text: str) -> int:
        count_buffer = getattr(getattr(self._encoding, "_core_bpe", None), "encode_to_tiktoken_buffer", None)  # tiktoken >= 0.7
        if self._presplit is None and count_buffer is not None and not self._may_drop(text):
            try:
                return len(memoryview(count_buffer(text, _NO_SPECIALS))) // _ID_BYTES
            except (UnicodeEncodeError, ValueError):
                pass        # lone surrogates: the full path replaces them as encode does
        return len(self.encode(text))

    def count_batch(self, texts: Sequence[str], num_threads: int = 4) -> list[int]:
        texts = list(texts)
        if num_threads <= 1 or len(texts) <= 1:
            return [self.count(t) for t in texts]
        from concurrent.futures import ThreadPoolExecutor

        # one task per thread over an interleaved share of the texts, not one per text
        workers = min(num_threads, len(texts))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            shares = list(pool.map(lambda k: [self.count(t) for t in texts[k::workers]], range(workers)))
        counts = [0] * len(texts)
        for k, share in enumerate(shares):
            counts[k::workers] = share
        return counts

    def _may_drop(self, text: str) -> bool:
        """Whether the UTF-8 of `text` holds a byte the vocabulary lacks (its id would be dropped).
        Cheap: one memchr-like scan per missing byte, UTF-8 encoded only for non-ASCII text."""
        for char in self._missing_ascii:
            if char in text:
                return True
        if not self._missing_high or text.isascii():
            return False
        data = text.encode("utf-8", "surrogatepass")
        return any(byte in data for byte in self._missing_high)

    def _drop_missing_bytes(self, ids: list[int]) -> list[int]:
        # Bytes the vocabulary lacks got ranks past its end; like llama.cpp, leave them out.
        if self._has_extra_bytes and ids and max(ids) >= self.vocab_size:
            limit = self.vocab_size
            return [i for i in ids if i < limit]
        return ids

    def encode_special(self, name: str) -> int:
        token_id = self.special_tokens.get(name)
        if token_id is None:
            raise KeyError(f"{name!r} is not a special token of {self.name}")
        return token_id

    # ---- decoding -------------------------------------------------------------------------

    def id_to_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            raise IndexError(f"token id {token_id} is outside the vocabulary of {self.vocab_size}")
        return self._id_bytes[token_id]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        table = self._id_bytes
        return b"".join([table[i] for i in ids])

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_id_set

    # ---- chat -----------------------------------------------------------------------------

    def _chat_template(self) -> Any:
        if self._template is None:
            from engine.chat_template import ChatTemplate

            if not self.chat_template:
                raise ModelFormatError(f"{self.name} has no chat template", "use a chat (instruct) model")
            self._template = ChatTemplate(
                self.chat_template,
                bos_token=self._token_text(self.bos_id),
                eos_token=self._token_text(self.eos_id),
            )
        return self._template

    def _token_text(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        return self._id_bytes[token_id].decode("utf-8", errors="replace")

    def render_chat_text(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The chat template's output as text (display and debugging)."""
        return self._chat_template().render(messages, add_generation_prompt=add_generation_prompt, **kwargs)

    def render_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """Token ids of a chat prompt: control tokens only where the template itself puts them."""
        pieces = self._chat_template().render_pieces(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        specials = self.special_tokens
        splitter = _special_splitter(tuple(sorted(specials, key=len, reverse=True)))
        # Flatten to plain-text runs and control ids; adjacent text (structure + content) is
        # encoded as one run so the split rule sees the same text llama.cpp would.
        ids: list[int] = []
        run: list[str] = []

        def flush() -> None:
            if run:
                ids.extend(self.encode("".join(run)))
                run.clear()

        for is_content, text in pieces:
            if is_content or splitter is None:
                run.append(text)
                continue
            for part in splitter.split(text):
                if not part:
                    continue
                token_id = specials.get(part)
                if token_id is None:
                    run.append(part)
                else:
                    flush()
                    ids.append(token_id)
        flush()
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids


_NO_SPECIALS: frozenset[str] = frozenset()   # encode() with no special allowed == encode_ordinary()
_ID_BYTES = 4                                # tiktoken's buffer holds uint32 ids


class _Presplitter:
    """Hugging Face `Split(pattern, behavior="isolated")` stages applied in order: each stage
    cuts every piece into its matches and the text between them."""

    def __init__(self, patterns: Sequence[str]):
        import regex

        self._stages = [regex.compile(p) for p in patterns]

    def split(self, text: str) -> list[str]:
        pieces = [text]
        for stage in self._stages:
            out: list[str] = []
            for piece in pieces:
                last = 0
                for match in stage.finditer(piece):
                    start, end = match.span()
                    if start > last:
                        out.append(piece[last:start])
                    if end > start:
                        out.append(piece[start:end])
                    last = end
                if last < len(piece):
                    out.append(piece[last:])
            pieces = out
        return pieces


# ---- Hugging Face tokenizer.json -----------------------------------------------------------


def _hf_pre_tokenizer_stages(pre: Any, path: Path) -> list[str]:
    """The pre-tokenizer as a list of isolating split patterns, applied in order."""

    def unsupported(what: str) -> ModelFormatError:
        return ModelFormatError(f"{path}: unsupported pre-tokenizer ({what})", "dsv4 reads byte-level BPE tokenizers with Split/Digits/ByteLevel pre-tokenizers")

    if not isinstance(pre, dict):
        raise unsupported("none")
    items = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    stages: list[str] = []
    saw_byte_level = False
    for item in items or []:
        kind = item.get("type")
        if saw_byte_level:
            raise unsupported(f"{kind} after ByteLevel")
        if kind == "Split":
            pattern = item.get("pattern") or {}
            if item.get("behavior") != "Isolated" or item.get("invert"):
                raise unsupported(f"Split with behavior {item.get('behavior')} invert={item.get('invert')}")
            if "Regex" in pattern:
                stages.append(pattern["Regex"])
            elif "String" in pattern:
                import regex

                stages.append(regex.escape(pattern["String"]))
            else:
                raise unsupported("Split without a pattern")
        elif kind == "Digits":
            stages.append(r"\p{N}" if item.get("individual_digits") else r"\p{N}+")
        elif kind == "ByteLevel":
            if item.get("add_prefix_space"):
                raise unsupported("ByteLevel with add_prefix_space")
            if item.get("use_regex", True):
                stages.append(GPT2_PAT_STR)
            saw_byte_level = True
        else:
            raise unsupported(str(kind))
    if not saw_byte_level or not stages:
        raise unsupported("no byte-level stage")
    return stages


def _stages_to_patterns(stages: list[str]) -> tuple[str, list[str]]:
    """(tiktoken pat_str, earlier stages split in Python). tiktoken drops text its pattern does
    not match, while an isolating Split keeps it as a piece, so the last stage gets a branch
    that takes such a run whole."""
    if stages == [r"\p{N}", GPT2_PAT_STR]:
        return DIGITS_PAT_STR, []  # the common digits-then-GPT-2 case in one pattern
    last = stages[-1]
    pat_str = last if last == GPT2_PAT_STR else f"(?:{last})|(?:(?!(?:{last}))[\\s\\S])+"
    return pat_str, stages[:-1]


def _build_hf_table(data: dict[str, Any], pat_str: str, path: Path) -> _Table:
    model = data.get("model") or {}
    if model.get("type") not in (None, "BPE") or model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ModelFormatError(f"{path}: only byte-level BPE tokenizers are supported", "this tokenizer.json uses another model")
    if data.get("normalizer"):
        raise ModelFormatError(f"{path}: tokenizers with a normalizer are not supported", "byte-level BPE tokenizers have none")
    vocab: dict[str, int] = model.get("vocab") or {}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    added = {t["content"]: int(t["id"]) for t in data.get("added_tokens") or []}
    size = max([*vocab.values(), *added.values()], default=-1) + 1
    tokens = [""] * size
    kinds = [TOKEN_UNUSED] * size
    for text, token_id in vocab.items():
        tokens[token_id] = text
        kinds[token_id] = TOKEN_NORMAL
    for text, token_id in added.items():
        # Every added token is a control token here: in user text it stays plain text.
        tokens[token_id] = text
        kinds[token_id] = TOKEN_CONTROL
    return build_byte_level_table(tokens, kinds, merges, pat_str)


def _read_json_if_present(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _slug_name(text: str) -> str:
    from engine.gguf_file import _slug

    return _slug(text)


@lru_cache(maxsize=8)
def _special_splitter(names: tuple[str, ...]) -> Any:
    if not names:
        return None
    import re

    return re.compile("(" + "|".join(re.escape(n) for n in names) + ")")


def _tokenizer_name(gguf_file: Any) -> str:
    meta = gguf_file
    if meta.get("general.basename"):
        from engine.gguf_file import _slug

        return _slug("-".join(str(p) for p in (meta.get("general.basename"), meta.get("general.size_label")) if p))
    return gguf_file.model_name()


# ---- cache -------------------------------------------------------------------------------

_memo_lock = threading.Lock()
_file_memo: dict[tuple[str, int, int], Tokenizer] = {}
_table_memo: dict[str, _Table] = {}


def _cache_path(digest: str) -> Path:
    from engine.paths import cache_dir

    return cache_dir() / "tokenizers" / f"{digest}.json"


def _load_or_build_table(digest: str, pat_str: str, derive: Any) -> _Table:
    """Process memo, then the disk cache, then derive (and write the cache atomically)."""
    key = f"{_CACHE_FORMAT}:{digest}:{pat_str}"
    with _memo_lock:
        table = _table_memo.get(key)
    if table is not None:
        return table
    path = _cache_path(digest)
    table = _read_cached_table(path, pat_str)
    if table is None:
        table = derive()
        _write_cached_table(path, table)
    with _memo_lock:
        _table_memo[key] = table
    return table


def _read_cached_table(path: Path, pat_str: str) -> _Table | None:
    try:
        with open(path, encoding="utf-8") as f:
            return _Table.from_json(json.load(f), pat_str)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # damaged or stale: rebuild and overwrite


def _write_cached_table(path: Path, table: _Table) -> None:
    # dumps, not dump: only dumps uses the C encoder (the same text, several times faster)
    data = json.dumps(table.to_json(), ensure_ascii=True, separators=(",", ":")).encode("ascii")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
    except OSError:
        pass  # a read-only home only costs speed next time


def clear_memo() -> None:
    """Forget tokenizers built in this process (tests use it to exercise the disk cache)."""
    with _memo_lock:
        _file_memo.clear()
        _table_memo.clear()

