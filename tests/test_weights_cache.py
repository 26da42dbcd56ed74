"""The prepared-weights cache: a hit is bit-identical to converting, a bad entry is rebuilt,
and a changed GGUF gets a new entry."""

from __future__ import annotations

import os

import pytest
import torch

from engine import weights_cache
from engine.gguf_file import GGUFFile
from engine.gguf_weights import MODES, build_llama
from tests.tinymodels import write_tiny_llama_gguf


pytestmark = pytest.mark.usefixtures("one_torch_thread")


TOKENS = torch.tensor([[5, 17, 42, 99, 3, 250, 8, 61, 120, 33]])


def _logits(path, mode: str, *, use_cache: bool = True) -> torch.Tensor:
    model = build_llama(GGUFFile(path), mode, use_cache=use_cache)
    logits = model(TOKENS, model.new_state(max_len=32))
    step = model(torch.tensor([[7]]), model.new_state(max_len=32))  # the few-row (decode) kernels too
    return torch.cat([logits.flatten(), step.flatten()])


def _entries():
    return sorted(weights_cache.cache_root().glob("*.safetensors"))


@pytest.mark.parametrize(("quant", "mode", "tied"), [("Q4_1", "int4", True), ("Q8_0", "int8", False), ("Q4_1", "bf16", True), ("F32", "fp32", False)])
def test_cached_load_is_bit_identical_to_conversion(tmp_path, quant, mode, tied):
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", quant=quant, tied=tied)
    reference = _logits(path, mode, use_cache=False)
    assert _entries() == []
    first = _logits(path, mode)  # converts and writes the entry
    assert len(_entries()) == 1
    second = _logits(path, mode)  # reads it back
    assert torch.equal(first, reference)
    assert torch.equal(second, reference)


def test_a_hit_skips_conversion(tmp_path, monkeypatch):
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    build_llama(GGUFFile(path), "int4")
    import engine.gguf_weights as gw

    monkeypatch.setattr(gw, "_convert", lambda *a, **k: pytest.fail("converted despite a cache entry"))
    build_llama(GGUFFile(path), "int4")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "wrong_tensors"])
def test_a_damaged_entry_is_rebuilt(tmp_path, damage):
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    reference = _logits(path, "int4", use_cache=False)
    _logits(path, "int4")
    (entry,) = _entries()
    data = entry.read_bytes()
    if damage == "truncate":
        entry.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        entry.write_bytes(os.urandom(len(data)))
    elif damage == "empty":
        entry.write_bytes(b"")
    else:  # a well-formed safetensors file that is not this model
        from safetensors.torch import save_file

        save_file({"embedding.q": torch.zeros(3, 3, dtype=torch.int8)}, str(entry), metadata={"format_version": str(weights_cache.FORMAT_VERSION), "mode": "int4", "layers": "{}"})
    assert torch.equal(_logits(path, "int4"), reference)
    # ...and the rebuilt entry replaced the damaged one.
    (rebuilt,) = _entries()
    assert weights_cache.read(rebuilt) is not None
    assert torch.equal(_logits(path, "int4"), reference)


def test_a_changed_gguf_gets_a_new_key_and_the_old_entry_is_pruned(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path, seed=0)
    before = weights_cache.entry_path(path, "int4")
    _logits(path, "int4")
    write_tiny_llama_gguf(path, seed=1)  # other weights, same path and size
    after = weights_cache.entry_path(path, "int4")
    assert after != before
    assert torch.equal(_logits(path, "int4"), _logits(path, "int4", use_cache=False))
    assert _entries() == [after]


def test_modes_have_distinct_keys(tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    assert len({weights_cache.entry_path(path, mode) for mode in MODES}) == len(MODES)


def test_an_unwritable_cache_still_loads(tmp_path, monkeypatch):
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    monkeypatch.setattr(weights_cache, "cache_root", lambda: blocker / "weights")
    assert torch.equal(_logits(path, "int4"), _logits(path, "int4", use_cache=False))
    assert not list(tmp_path.glob("**/.partial-*"))


def test_entries_are_standard_safetensors_with_aligned_tensors(tmp_path):
    from safetensors import safe_open

    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    build_llama(GGUFFile(path), "int4")
    (entry,) = _entries()
    ours, metadata = weights_cache.read(entry)
    assert metadata["mode"] == "int4"
    assert all(t.data_ptr() % 64 == 0 for t in ours.values())
    with safe_open(str(entry), framework="pt") as handle:
        names = [name for name in handle.keys() if not name.startswith("__pad.")]
        assert sorted(names) == sorted(ours)
        for name in names:
            assert torch.equal(handle.get_tensor(name), ours[name]), name
