"""Tiny but real GGUF models for tests: written with gguf.GGUFWriter exactly as llama.cpp's
converter lays out a Llama checkpoint, with random weights (fixed seed) and a small byte-level
BPE tokenizer learned here from a built-in text. Other tests import this module: keep its
signatures stable.

    write_tiny_llama_gguf(path, quant="Q4_1") -> Path
    tiny_llama_weights(...) -> dict of the float32 Hugging Face-layout weights the file holds
    tiny_vocab() -> TinyVocab(tokens, token_types, merges)
    tiny_vocab_text() -> the text the vocabulary was learned from
    write_tiny_hf_tokenizer(directory, style="deepseek") -> a Hugging Face tokenizer.json directory
    real_model_gguf() -> Path of the real SmolLM2 GGUF, or None when it is not installed
    real_model_gguf_or_skip() -> that Path; skips the calling test when it is not installed
"""

from __future__ import annotations

import json
import os
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np
import regex

from engine.tokenizer import DEEPSEEK_V3_STAGES, DIGITS_PAT_STR, bytes_to_unicode

# Captured at import, before conftest points DSV4_HOME at a temporary directory per test.
_REAL_DSV4_HOME = os.environ.get("DSV4_HOME")

CONTROL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<file_sep>", "<filename>")
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 0, 1, 2
# Bytes that never occur in valid UTF-8 are left out, as SmolLM2's vocabulary leaves some out,
# so the "missing single byte" path of the tokenizer is exercised.
MISSING_BYTES = (0xC0, 0xC1, *range(0xF5, 0x100))
TINY_MERGES = 320

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named Tiny<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TINY_TEXT = """\
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun, and the fox runs
into the forest. What is the capital of France? The capital of France is Paris.
Paris is the largest city in France; it has 2,102,650 residents (2023) and 20 districts.

def fibonacci(n: int) -> int:
    \"\"\"Return the n-th Fibonacci number.\"\"\"
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

class Repository:
    def __init__(self, path, files=None):
        self.path = path
        self.files = files or []

    def read(self, name):
        with open(self.path / name, encoding="utf-8") as handle:
            return handle.read()

for index, value in enumerate([10, 20, 30, 40]):
    print(f"{index}: {value}")  # prints 0: 10 and so on

import os, sys
if __name__ == "__main__":
    sys.exit(main(os.environ.get("HOME", "/tmp")))

Unicode text: café, naïve, résumé, Größe, señor, déjà vu.
中文文本：你好，世界。日本語のテキスト。한국어 텍스트.
Emoji: 🙂 🚀 ✨ 👍🏽 and symbols: → ≤ ≥ ∑ π ∞ € £ ¥.
"""


class TinyVocab(NamedTuple):
    tokens: list[str]
    token_types: list[int]
    merges: list[str]


def tiny_vocab_text() -> str:
    return _TINY_TEXT


@lru_cache(maxsize=4)
def tiny_vocab(n_merges: int = TINY_MERGES) -> TinyVocab:
    """Control tokens, then the byte symbols, then one token per learned merge (ids rise in
    merge order, as in SmolLM2's vocabulary)."""
    byte_chars = bytes_to_unicode()
    tokens = list(CONTROL_TOKENS)
    types = [gguf.TokenType.CONTROL] * len(CONTROL_TOKENS)
    for b in range(256):
        if b not in MISSING_BYTES:
            tokens.append(byte_chars[b])
            types.append(gguf.TokenType.NORMAL)
    merges = _learn_merges(_TINY_TEXT, n_merges)
    vocab = set(tokens)
    for left, right in merges:
        tokens.append(left + right)
        types.append(gguf.TokenType.NORMAL)
        vocab.add(left + right)
    return TinyVocab(tokens, [int(t) for t in types], [f"{a} {b}" for a, b in merges])


def _learn_merges(text: str, n_merges: int) -> list[tuple[str, str]]:
    """Plain byte-level BPE training: repeatedly merge the most frequent adjacent pair."""
    byte_chars = bytes_to_unicode()
    words: Counter[tuple[str, ...]] = Counter()
    for piece in regex.findall(DIGITS_PAT_STR, text):
        words[tuple(byte_chars[b] for b in piece.encode("utf-8"))] += 1
    merges: list[tuple[str, str]] = []
    known = {byte_chars[b] for b in range(256)}
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        # Most frequent first, ties broken by the pair itself so the result is deterministic;
        # a pair whose concatenation is already a token would give it a second origin.
        candidates = sorted((p for p in pairs if p[0] + p[1] not in known), key=lambda p: (-pairs[p], p))
        if not candidates:
            break
        best = candidates[0]
        merges.append(best)
        known.add(best[0] + best[1])
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            merged[_apply_merge(word, best)] += count
        words = merged
    return merges


def _apply_merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def tiny_llama_weights(
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_vocab: int | None = None,
    seed: int = 0,
    tied: bool = True,
) -> dict[str, np.ndarray]:
    """The float32 weights in Hugging Face Llama layout (q/k rows not permuted) that
    write_tiny_llama_gguf stores, before permutation and quantisation."""
    if n_vocab is None:
        n_vocab = len(tiny_vocab().tokens)
    rng = np.random.default_rng(seed)
    head_dim = n_embd // n_head

    def matrix(n_out: int, n_in: int) -> np.ndarray:
        return (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    weights = {"model.embed_tokens.weight": (rng.standard_normal((n_vocab, n_embd)) * 0.5).astype(np.float32)}
    for i in range(n_layer):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = norm(n_embd)
        weights[p + "self_attn.q_proj.weight"] = matrix(n_head * head_dim, n_embd)
        weights[p + "self_attn.k_proj.weight"] = matrix(n_head_kv * head_dim, n_embd)
        weights[p + "self_attn.v_proj.weight"] = matrix(n_head_kv * head_dim, n_embd)
        weights[p + "self_attn.o_proj.weight"] = matrix(n_embd, n_head * head_dim)
        weights[p + "post_attention_layernorm.weight"] = norm(n_embd)
        weights[p + "mlp.gate_proj.weight"] = matrix(n_ff, n_embd)
        weights[p + "mlp.up_proj.weight"] = matrix(n_ff, n_embd)
        weights[p + "mlp.down_proj.weight"] = matrix(n_embd, n_ff)
    weights["model.norm.weight"] = norm(n_embd)
    if not tied:
        weights["lm_head.weight"] = matrix(n_vocab, n_embd)
    return weights


def _permute_for_gguf(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter reorders q/k rows per head from half-split to interleaved pairs."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


_QUANT_TYPES = {
    "F32": gguf.GGMLQuantizationType.F32,
    "F16": gguf.GGMLQuantizationType.F16,
    "BF16": gguf.GGMLQuantizationType.BF16,
    "Q8_0": gguf.GGMLQuantizationType.Q8_0,
    "Q4_1": gguf.GGMLQuantizationType.Q4_1,
}
_FILE_TYPES = {
    "F32": gguf.LlamaFileType.ALL_F32,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
}


def _add_matrix(writer: gguf.GGUFWriter, name: str, values: np.ndarray, qtype: gguf.GGMLQuantizationType) -> None:
    if qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, values.astype(np.float32))
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, values.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(values.astype(np.float32), qtype), raw_dtype=qtype)


def write_tiny_llama_gguf(
    path: str | Path,
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    vocab: TinyVocab | None = None,
    ctx: int = 256,
    quant: str = "Q4_1",
    seed: int = 0,
    tied: bool = True,
    rope_freq_base: float = 100000.0,
    rms_eps: float = 1e-5,
    name: str = "Tiny Llama Test",
    chat_template: str | None = CHATML_TEMPLATE,
    pre: str = "smollm",
) -> Path:
    """A real llama GGUF: llama.cpp tensor names and hyperparameter keys, matrices in `quant`
    (the token embedding in Q8_0 for Q4_1 files, as in SmolLM2's file), norms in F32."""
    if quant not in _QUANT_TYPES:
        raise ValueError(f"quant must be one of {sorted(_QUANT_TYPES)}")
    if n_embd % n_head or (n_embd // n_head) % 2:
        raise ValueError("n_embd must split into heads of even size")
    vocab = vocab or tiny_vocab()
    n_vocab = len(vocab.tokens)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    qtype = _QUANT_TYPES[quant]
    embd_type = gguf.GGMLQuantizationType.Q8_0 if quant == "Q4_1" else qtype
    weights = tiny_llama_weights(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff, n_vocab=n_vocab, seed=seed, tied=tied)

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_type("model")
    writer.add_name(name)
    writer.add_basename("tiny-llama")
    writer.add_size_label("test")
    writer.add_license("apache-2.0")
    writer.add_block_count(n_layer)
    writer.add_context_length(ctx)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_freq_base(rope_freq_base)
    writer.add_layer_norm_rms_eps(rms_eps)
    writer.add_file_type(_FILE_TYPES[quant])
    writer.add_vocab_size(n_vocab)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_add_space_prefix(False)
    writer.add_add_bos_token(False)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(IM_START_ID)
    writer.add_eos_token_id(IM_END_ID)
    writer.add_unk_token_id(ENDOFTEXT_ID)
    writer.add_pad_token_id(IM_END_ID)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    _add_matrix(writer, "token_embd.weight", weights["model.embed_tokens.weight"], embd_type)
    for i in range(n_layer):
        p = f"model.layers.{i}."
        b = f"blk.{i}."
        writer.add_tensor(b + "attn_norm.weight", weights[p + "input_layernorm.weight"])
        _add_matrix(writer, b + "attn_q.weight", _permute_for_gguf(weights[p + "self_attn.q_proj.weight"], n_head), qtype)
        _add_matrix(writer, b + "attn_k.weight", _permute_for_gguf(weights[p + "self_attn.k_proj.weight"], n_head_kv), qtype)
        _add_matrix(writer, b + "attn_v.weight", weights[p + "self_attn.v_proj.weight"], qtype)
        _add_matrix(writer, b + "attn_output.weight", weights[p + "self_attn.o_proj.weight"], qtype)
        writer.add_tensor(b + "ffn_norm.weight", weights[p + "post_attention_layernorm.weight"])
        _add_matrix(writer, b + "ffn_gate.weight", weights[p + "mlp.gate_proj.weight"], qtype)
        _add_matrix(writer, b + "ffn_up.weight", weights[p + "mlp.up_proj.weight"], qtype)
        _add_matrix(writer, b + "ffn_down.weight", weights[p + "mlp.down_proj.weight"], qtype)
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    if not tied:
        _add_matrix(writer, "output.weight", weights["lm_head.weight"], qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# DeepSeek's special tokens, in DeepSeek's order for the first three (bos 0, eos 1, pad 2).
HF_SPECIAL_TOKENS = (
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜▁pad▁｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<think>",
    "</think>",
)
HF_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% else %}<｜Assistant｜></think>{{ m['content'] }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜></think>{% endif %}"
)


def write_tiny_hf_tokenizer(directory: str | Path, *, style: str = "deepseek", vocab_size: int = 700, extra_text: tuple[str, ...] = ()) -> Path:
    """tokenizer.json + tokenizer_config.json trained with the `tokenizers` library (a test
    dependency) on the built-in text: `style="deepseek"` uses DeepSeek-V3's Split sequence,
    `style="smollm"` single digits then GPT-2's byte-level regex."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    if style == "deepseek":
        pre = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(p), "isolated") for p in DEEPSEEK_V3_STAGES]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    elif style == "smollm":
        pre = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        raise ValueError("style must be 'deepseek' or 'smollm'")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(HF_SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    hf.train_from_iterator([_TINY_TEXT, *extra_text], trainer)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf.save(str(directory / "tokenizer.json"))
    config = {
        "bos_token": {"content": HF_SPECIAL_TOKENS[0]},
        "eos_token": HF_SPECIAL_TOKENS[1],
        "pad_token": HF_SPECIAL_TOKENS[2],
        "add_bos_token": False,
        "chat_template": HF_CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1), encoding="utf-8")
    return directory


REAL_MODEL_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def real_model_gguf() -> Path | None:
    """The real embedded model: $DSV4_TEST_GGUF, else <real home>/models/mini/<file>."""
    override = os.environ.get("DSV4_TEST_GGUF")
    if override:
        candidate = Path(override).expanduser()
        return candidate if candidate.is_file() else None
    if _REAL_DSV4_HOME:
        home = Path(_REAL_DSV4_HOME).expanduser()
    else:
        import platformdirs

        home = Path(platformdirs.user_data_dir("dsv4", appauthor=False))
    candidate = home / "models" / "mini" / REAL_MODEL_FILENAME
    return candidate if candidate.is_file() else None


def real_model_gguf_or_skip() -> Path:
    """For `model`-marked tests: the real embedded model, or the test is skipped."""
    import pytest  # here: bench/ imports this module where pytest need not be installed

    path = real_model_gguf()
    if path is None:
        pytest.skip("the real embedded model is not installed (dsv4 pull mini, or set DSV4_TEST_GGUF)")
    return path
