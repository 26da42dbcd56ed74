"""Incremental state: one-shot == chunked == token-by-token, export/restore, KV accounting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsv4_tiny import write_tiny
from engine.deepseek_v4.config import ModelArgs
from engine.deepseek_v4.state import DSV4State, kv_bytes, kv_growth_per_token, storage_formats
from engine.deepseek_v4.weights import load_checkpoint
from engine.errors import EngineError, ModelFormatError

DATA = Path(__file__).parent / "data"
ATOL = 1e-4  # fp32: different chunkings reorder sums, nothing more


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Window 8, CSA ratio 4 with top-2 (so selection matters), HCA ratio 16."""
    return load_checkpoint(write_tiny(tmp_path_factory.mktemp("dsv4-state"), "fp32", index_topk=2)).model


@pytest.fixture(scope="module")
def real_ratios(tmp_path_factory):
    """The real window (128) and HCA ratio (128) on the tiny widths."""
    path = write_tiny(tmp_path_factory.mktemp("dsv4-state-128"), "fp32", sliding_window=128, hca_ratio=128, index_topk=8)
    return load_checkpoint(path).model


def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def run_chunks(model, tokens: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    state, out, pos = model.new_state(tokens.shape[0]), [], 0
    for size in sizes:
        out.append(model(tokens[:, pos : pos + size], state, start_pos=pos))
        pos += size
    assert pos == tokens.shape[1] and state.pos == pos
    return torch.cat(out, dim=1)


@torch.no_grad()
@pytest.mark.parametrize("sizes", [[1, 3, 5, 7, 9, 11, 14], [5] * 10, [3, 47], [17, 16, 17]])
def test_chunked_prefill_equals_one_shot(tiny, sizes):
    tokens = ids(2, 50)  # > window 8, > ratios 4 and 16, > top-k 2 entries
    assert torch.allclose(run_chunks(tiny, tokens, sizes), tiny(tokens), atol=ATOL)


@torch.no_grad()
def test_token_by_token_decode_equals_one_shot(tiny):
    tokens = ids(2, 50, seed=1)
    assert torch.allclose(run_chunks(tiny, tokens, [1] * 50), tiny(tokens), atol=ATOL)


@torch.no_grad()
def test_real_window_and_hca_ratio_chunked_and_decoded(real_ratios):
    tokens = ids(1, 300, seed=2)  # > 2 HCA windows of 128, > the 128-token window
    one_shot = real_ratios(tokens)
    assert torch.allclose(run_chunks(real_ratios, tokens, [130, 1, 3, 5, 130, 31]), one_shot, atol=ATOL)
    decoded = run_chunks(real_ratios, tokens, [250] + [1] * 50)
    assert torch.allclose(decoded, one_shot, atol=ATOL)


@torch.no_grad()
def test_simulated_low_precision_stays_chunk_invariant(tmp_path):
    # With QAT rounding on, a value on a rounding boundary could round differently when
    # matmul batch shapes change; in practice nearly every position agrees exactly.
    model = load_checkpoint(write_tiny(tmp_path, "fp8", index_topk=2)).model
    tokens = ids(1, 50, seed=3)
    diff = (run_chunks(model, tokens, [1, 3, 5, 13, 28]) - model(tokens)).abs().amax(-1)
    assert (diff < ATOL).float().mean() >= 0.9


@torch.no_grad()
def test_export_restore_continue_equals_uninterrupted(tiny):
    tokens = ids(2, 45, seed=4)
    full = tiny(tokens)
    state = tiny.new_state(2)
    tiny(tokens[:, :23], state)
    saved, meta = state.export()
    json.dumps(meta)  # metadata must be plain JSON
    assert all(isinstance(t, torch.Tensor) for t in saved.values())
    tiny(tokens[:, 23:30], state)  # the original moves on; the export must not alias it
    restored = DSV4State.restore(tiny.args, saved, meta)
    assert restored.pos == 23
    rest = torch.cat([tiny(tokens[:, 23:24], restored), tiny(tokens[:, 24:], restored)], dim=1)
    assert torch.allclose(rest, full[:, 23:], atol=ATOL)


def test_restore_rejects_mismatched_state(tiny):
    state = tiny.new_state(1)
    with torch.no_grad():
        tiny(ids(1, 10), state)
    saved, meta = state.export()
    with pytest.raises(ModelFormatError, match="pos|position"):
        DSV4State.restore(tiny.args, saved, {**meta, "pos": 12})
    del saved["layers.1.indexer.entries"]
    with pytest.raises(ModelFormatError, match="layers.1.indexer.entries"):
        DSV4State.restore(tiny.args, saved, meta)


@torch.no_grad()
@pytest.mark.parametrize("length", [0, 3, 17, 50])
def test_state_nbytes_matches_the_config_accounting(tiny, length):
    state = tiny.new_state(1)
    if length:
        tiny(ids(1, length), state)
    expected = kv_bytes(tiny.args, length, storage_formats(tiny.args)["fp32"])
    assert state.nbytes == expected.total
    # entries at 50 tokens: CSA 2 layers x 12 (main + indexer), HCA 1 layer x 3
    if length == 50:
        a = tiny.args
        assert expected.compressed == 2 * 12 * (a.head_dim + a.index_head_dim) * 4 + 3 * a.head_dim * 4


# ---------- the real configs at 1M tokens (spec §3) ----------

MILLION = 1_048_576
# Spec §3 table, bytes per token.
SPEC_PER_TOKEN = {
    "flash": {"bf16": 6880, "fp8": 3850.25, "fp8_fp4idx": 3514.25},
    "pro": {"bf16": 9848, "fp8": 5511.4375, "fp8_fp4idx": 5031.4375},
}


def real_args(name: str) -> ModelArgs:
    return ModelArgs.from_file(DATA / f"deepseek-v4-{name}-config.json")


@pytest.mark.parametrize("name", ["flash", "pro"])
@pytest.mark.parametrize("storage", ["bf16", "fp8", "fp8_fp4idx"])
def test_kv_bytes_per_token_at_1m_match_the_spec(name, storage):
    args = real_args(name)
    fmt = storage_formats(args)[storage]
    counted = kv_bytes(args, MILLION, fmt)
    assert counted.compressed / MILLION == SPEC_PER_TOKEN[name][storage]
    assert kv_growth_per_token(args, fmt) == SPEC_PER_TOKEN[name][storage]
    # the fixed parts (window, compressor rows) are under 1% at 1M tokens
    assert counted.total / MILLION < 1.01 * SPEC_PER_TOKEN[name][storage]


def test_production_entry_sizes():
    fmt = storage_formats(real_args("pro"))
    assert (fmt["fp8"].main, fmt["fp8"].index, fmt["fp8_fp4idx"].index) == (584, 132, 68)
    assert (fmt["bf16"].main, fmt["bf16"].index) == (1024, 256)


def test_pro_kv_is_at_most_11_percent_of_v32():
    # V3.2: 61 layers of MLA (512 latent + 64 rope) plus a 128-d indexer key, per token.
    v32_fp8 = 61 * (656 + 132)  # FlashMLA fp8 layout
    v32_bf16 = 61 * (1152 + 132)
    pro, flash = real_args("pro"), real_args("flash")
    fmt_pro, fmt_flash = storage_formats(pro), storage_formats(flash)
    assert kv_growth_per_token(pro, fmt_pro["fp8_fp4idx"]) / v32_fp8 <= 0.11  # 10.5%
    assert kv_growth_per_token(flash, fmt_flash["fp8_fp4idx"]) / v32_fp8 == pytest.approx(0.073, abs=0.001)
    # like for like with an FP8 indexer it is 11.5% (spec §3)
    assert kv_growth_per_token(pro, fmt_pro["fp8"]) / v32_fp8 == pytest.approx(0.115, abs=0.001)
    assert v32_bf16 == 78_324
    assert kv_bytes(pro, MILLION, fmt_pro["bf16"]).compressed / 2**30 == pytest.approx(9.62, abs=0.005)


@torch.no_grad()
def test_generation_loop_hooks(tiny):
    """What the shared loop calls: new_state, forward(output=...), length, trim, reset, restore_state."""
    tokens = ids(1, 30, seed=5)
    full = tiny(tokens)
    state = tiny.new_state(1, max_len=64)
    assert state.max_len == 64 and tiny.new_state(1).max_len == tiny.args.context_length
    assert tiny(tokens[:, :12], state, "none") is None
    last = tiny(tokens[:, 12:20], state, "last")
    assert last.shape == (1, 1, 512) and state.length == 20
    assert torch.allclose(last, full[:, 19:20], atol=ATOL)
    saved, meta = state.export()
    state.reset()
    assert state.length == 0 and state.nbytes == tiny.new_state(1).nbytes
    assert torch.allclose(tiny(tokens, state), full, atol=ATOL)  # a reset state is a fresh one
    with pytest.raises(ModelFormatError, match="bfloat16"):
        tiny.restore_state(saved, {**meta, "dtype": "bfloat16"})
    again = tiny.restore_state(saved, meta)
    assert again.max_len == tiny.args.context_length
    assert torch.allclose(tiny(tokens[:, 20:], again), full[:, 20:], atol=ATOL)
    with pytest.raises(ValueError, match="start_pos"):
        tiny(tokens[:, :1], again, start_pos=3)
    assert again.trim(0) == 0
    with pytest.raises(EngineError, match="rewind"):
        again.trim(1)
    with pytest.raises(ValueError, match="exceed"):
        tiny(ids(1, 65), tiny.new_state(1, max_len=64))


@torch.no_grad()
def test_an_interrupted_pass_leaves_an_unusable_state(tiny, monkeypatch):
    state = tiny.new_state(1)
    tiny(ids(1, 10), state)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny.layers[2], "forward", interrupt)
    with pytest.raises(KeyboardInterrupt):
        tiny(ids(1, 5), state)
    monkeypatch.undo()
    with pytest.raises(EngineError, match="interrupted"):
        tiny(ids(1, 5), state)
    with pytest.raises(EngineError, match="interrupted"):
        state.export()
    state.reset()
    assert torch.isfinite(tiny(ids(1, 5), state)).all()


class _AsciiTokenizer:
    """Ids 0-2 are specials (bos, eos, pad); the rest print as one ASCII letter each."""

    stop_ids = frozenset({1})

    def id_to_bytes(self, token_id: int) -> bytes:
        return b"" if token_id < 3 else bytes([97 + token_id % 26])

    def is_special(self, token_id: int) -> bool:
        return token_id < 3


@torch.no_grad()
def test_the_shared_generation_loop_drives_the_model(tiny):
    from engine.events import Done, SamplingParams, TextDelta
    from engine.generate import stream

    prompt = ids(1, 37, seed=6)[0].tolist()
    params = SamplingParams(max_tokens=12, temperature=0.0)
    events = list(stream(tiny, _AsciiTokenizer(), prompt, params, prefill_chunk=10))
    done = events[-1]
    assert isinstance(done, Done) and done.usage.prompt_tokens == 37
    text = "".join(e.text for e in events if isinstance(e, TextDelta))

    # the same greedy continuation by hand, one-shot over the growing sequence
    seq, expected = list(prompt), []
    for _ in range(done.usage.completion_tokens + (done.finish_reason == "stop")):
        nxt = int(tiny(torch.tensor([seq]))[0, -1].argmax())
        if nxt in _AsciiTokenizer.stop_ids:
            break
        expected.append(nxt)
        seq.append(nxt)
    assert text == "".join(_AsciiTokenizer().id_to_bytes(t).decode() for t in expected)
    assert done.usage.completion_tokens == len(expected)


@torch.no_grad()
def test_mtp_predictions_are_chunk_invariant(tiny):
    tokens = ids(1, 31, seed=7)
    inputs, following = tokens[:, :-1], tokens[:, 1:]

    def run(sizes: list[int]) -> torch.Tensor:
        state, mtp_state, out, pos = tiny.new_state(1), tiny.new_mtp_state(1), [], 0
        for size in sizes:
            h = tiny.hidden_streams(inputs[:, pos : pos + size], state, pos)
            out.append(tiny.mtp_logits(h, following[:, pos : pos + size], pos, mtp_state))
            pos += size
        return torch.cat(out, dim=1)

    one_shot = run([30])
    assert one_shot.shape == (1, 30, 512) and torch.isfinite(one_shot).all()
    assert torch.allclose(run([1, 4, 9, 16]), one_shot, atol=ATOL)
    assert torch.allclose(run([1] * 30), one_shot, atol=ATOL)
    # it is a different head from the main one
    assert not torch.allclose(one_shot, tiny(inputs), atol=1e-2)
