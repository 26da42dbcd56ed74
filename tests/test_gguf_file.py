"""engine.gguf_file against gguf's own GGUFReader on files written with gguf.GGUFWriter."""

from __future__ import annotations

import subprocess
import sys

import gguf
import numpy as np
import pytest

from engine.errors import ModelFormatError
from engine.gguf_file import GGUFFile
from tests.tinymodels import IM_END_ID, IM_START_ID, real_model_gguf_or_skip, tiny_llama_weights, tiny_vocab, write_tiny_llama_gguf

QUANTS = ["Q4_1", "Q8_0", "F32", "F16", "BF16"]


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-gguf")
    return {q: write_tiny_llama_gguf(root / f"tiny-{q}.gguf", quant=q, tied=(q != "F16")) for q in QUANTS}


@pytest.mark.parametrize("quant", QUANTS)
def test_metadata_and_tensors_match_gguf_reader(tiny_files, quant):
    ours = GGUFFile(tiny_files[quant])
    reader = gguf.GGUFReader(tiny_files[quant])
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    assert list(ours.metadata) == keys
    for key in keys:
        assert ours.metadata[key] == reader.fields[key].contents(), key
    assert list(ours.tensors) == [t.name for t in reader.tensors]
    for ref in reader.tensors:
        tensor = ours.tensors[ref.name]
        assert tensor.ggml_type == ref.tensor_type
        assert tensor.shape == tuple(int(d) for d in reversed(ref.shape.tolist()))
        assert tensor.data.dtype == ref.data.dtype and tensor.data.shape == ref.data.shape
        assert np.array_equal(tensor.data, ref.data), ref.name


def test_llama_hyperparameters_and_tensor_names(tiny_files):
    f = GGUFFile(tiny_files["Q4_1"])
    assert f.architecture == "llama"
    assert f.arch_param("block_count") == 2
    assert f.arch_param("embedding_length") == 64
    assert f.arch_param("feed_forward_length") == 128
    assert f.arch_param("attention.head_count") == 4
    assert f.arch_param("attention.head_count_kv") == 2
    assert f.arch_param("rope.dimension_count") == 16
    assert f.arch_param("rope.freq_base") == 100000.0
    assert f.arch_param("context_length") == 256
    assert f.arch_param("attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert f.arch_param("vocab_size") == len(tiny_vocab().tokens)
    assert f.arch_param("missing.key", None) is None
    with pytest.raises(ModelFormatError, match="llama.missing.key"):
        f.arch_param("missing.key")
    names = set(f.tensors)
    assert {"token_embd.weight", "output_norm.weight", "blk.1.ffn_down.weight", "blk.0.attn_k.weight"} <= names
    assert "output.weight" not in names  # tied
    assert f.tensors["token_embd.weight"].ggml_type == gguf.GGMLQuantizationType.Q8_0
    assert f.tensors["blk.0.ffn_gate.weight"].ggml_type == gguf.GGMLQuantizationType.Q4_1
    assert f.tensors["blk.0.ffn_gate.weight"].shape == (128, 64)
    assert f.tensors["blk.0.ffn_down.weight"].shape == (64, 128)
    assert "output.weight" in GGUFFile(tiny_files["F16"]).tensors


@pytest.mark.parametrize("quant,tolerance", [("F32", 0.0), ("F16", 2e-3), ("BF16", 1.6e-2), ("Q8_0", 2e-2), ("Q4_1", 0.25)])
def test_dequantized_weights_match_the_source(tiny_files, quant, tolerance):
    f = GGUFFile(tiny_files[quant])
    source = tiny_llama_weights()
    for ours, theirs in [("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight"), ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight")]:
        values = f.tensors[ours].dequantize()
        assert values.shape == source[theirs].shape and values.dtype == np.float32
        scale = np.abs(source[theirs]).max()
        assert np.abs(values - source[theirs]).max() <= tolerance * scale + 1e-7


def test_query_rows_are_permuted_as_llama_cpp_stores_them(tiny_files):
    stored = GGUFFile(tiny_files["F32"]).tensors["blk.0.attn_q.weight"].dequantize()
    hf = tiny_llama_weights()["model.layers.0.self_attn.q_proj.weight"]
    head_dim = 16
    # Row 2i of a stored head is row i of the HF head, row 2i+1 is row i + head_dim/2.
    assert np.array_equal(stored[0], hf[0]) and np.array_equal(stored[1], hf[head_dim // 2])
    assert np.array_equal(stored[head_dim + 2], hf[head_dim + 1])


def test_tokenizer_spec(tiny_files):
    spec = GGUFFile(tiny_files["Q4_1"]).tokenizer_spec()
    vocab = tiny_vocab()
    assert spec.model == "gpt2" and spec.pre == "smollm"
    assert spec.tokens == vocab.tokens and spec.token_types == vocab.token_types and spec.merges == vocab.merges
    assert (spec.bos_id, spec.eos_id, spec.pad_id, spec.unk_id) == (IM_START_ID, IM_END_ID, IM_END_ID, 0)
    assert spec.add_bos is False
    assert "<|im_start|>" in spec.chat_template
    assert len(spec.digest) == 64


def test_tokenizer_digest_follows_vocabulary_not_weights(tmp_path):
    a = write_tiny_llama_gguf(tmp_path / "a.gguf", seed=1)
    b = write_tiny_llama_gguf(tmp_path / "b.gguf", seed=2, quant="F32")
    v = tiny_vocab()
    other = v._replace(merges=v.merges[:-1], tokens=v.tokens[:-1], token_types=v.token_types[:-1])
    c = write_tiny_llama_gguf(tmp_path / "c.gguf", vocab=other)
    d = write_tiny_llama_gguf(tmp_path / "d.gguf", pre="gpt-2")
    digests = [GGUFFile(p).tokenizer_digest() for p in (a, b, c, d)]
    assert digests[0] == digests[1]
    assert len(set(digests[1:])) == 3


def test_not_a_gguf_and_truncated_files_fail_clearly(tmp_path, tiny_files):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all, just text" * 4)
    with pytest.raises(ModelFormatError, match="not a GGUF"):
        GGUFFile(junk)
    data = tiny_files["Q4_1"].read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match="truncated|past the end"):
        GGUFFile(truncated)
    last_tensor_cut = tmp_path / "last.gguf"
    last_tensor_cut.write_bytes(data[:-8])
    with pytest.raises(ModelFormatError, match="output_norm.weight runs past the end"):
        GGUFFile(last_tensor_cut).tensors
    header_cut = tmp_path / "header.gguf"
    header_cut.write_bytes(data[:5000])
    with pytest.raises(ModelFormatError):
        GGUFFile(header_cut)
    with pytest.raises(ModelFormatError, match="cannot open"):
        GGUFFile(tmp_path / "absent.gguf")


def test_metadata_reading_needs_neither_numpy_nor_torch(tiny_files):
    # `dsv4 pack` reads the tokenizer through this module; it must stay light to import.
    code = (
        "import sys; from engine.gguf_file import GGUFFile; from engine.tokenizer import Tokenizer; "
        f"f = GGUFFile({str(tiny_files['Q4_1'])!r}); f.tokenizer_spec(); f.metadata; "
        f"Tokenizer.from_gguf({str(tiny_files['Q4_1'])!r}).encode('x = 1'); "
        "bad = [m for m in ('numpy', 'torch', 'gguf') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr + result.stdout


@pytest.mark.model
def test_real_model_metadata_reads_cheaply(monkeypatch):
    path = real_model_gguf_or_skip()
    # What keeps this cheap: no gguf.GGUFReader (a numpy slice per string), the big string
    # arrays decoded only on use and once each, tensor views built only on use.
    def must_not_use_reader(*args, **kwargs):
        raise AssertionError("GGUFReader is the slow path")

    decoded_arrays: list[int] = []
    decode_strings = GGUFFile._decode_strings

    def counting_decode(self, offset, count):
        decoded_arrays.append(count)
        return decode_strings(self, offset, count)

    monkeypatch.setattr(gguf.GGUFReader, "__init__", must_not_use_reader)
    monkeypatch.setattr(GGUFFile, "_decode_strings", counting_decode)
    f = GGUFFile(path)
    assert all(count < 1024 for count in decoded_arrays), decoded_arrays  # opening decodes no vocabulary
    spec = f.tokenizer_spec()
    assert sorted(count for count in decoded_arrays if count >= 1024) == [48900, 49152]
    assert f._tensors is None  # no tensor view yet
    assert f.architecture == "llama"
    assert (f.arch_param("block_count"), f.arch_param("embedding_length"), f.arch_param("attention.head_count")) == (30, 576, 9)
    assert f.arch_param("rope.freq_base") == 100000.0 and f.arch_param("context_length") == 8192
    assert len(spec.tokens) == 49152 and len(spec.merges) == 48900 and spec.pre == "smollm"
    assert spec.tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert len(f.tensors) == 272 and "output.weight" not in f.tensors
    assert f.tensors["token_embd.weight"].shape == (49152, 576)
    q = f.tensors["blk.0.attn_q.weight"]
    assert q.ggml_type == gguf.GGMLQuantizationType.Q4_1 and q.dequantize().shape == (576, 576)
