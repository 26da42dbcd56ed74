"""DeepSeek-V4 through the public API and CLI: `engine.load` dispatch on metadata, the
LoadedModel interface on a tiny official-format checkpoint, the V4 chat format (spec §6),
`dsv4 ask --model <dir>` end to end, and the flash/pro aliases when nothing is installed."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import engine
from dsv4cli.app import main
from engine.deepseek_v4.chat import CHAT_TEMPLATE
from engine.errors import EngineError, ModelFormatError
from engine.events import Done, SamplingParams, TextDelta
from tests.dsv4_tiny import write_tiny_model
from tests.stdins import TerminalStdin
from tests.tinymodels import write_tiny_llama_gguf

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("dsv4") / "tiny-v4", "fp32")


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return engine.load(str(tiny_dir), device="cpu")


# ---------------------------------------------------------------- dispatch


def test_a_deepseek_v4_directory_loads_as_deepseek_v4(loaded, tiny_dir):
    assert (loaded.arch, loaded.name, loaded.path) == ("deepseek_v4", "tiny-v4", tiny_dir)
    assert loaded.context_length == 4096 and loaded.mode == "dense/float32"
    assert loaded.tokenizer.chat_template == CHAT_TEMPLATE  # the checkpoint ships none
    assert 1 in loaded.tokenizer.stop_ids and loaded.tokenizer.vocab_size <= 512


def test_dispatch_reads_metadata_not_names(tmp_path, tiny_dir):
    # A GGUF without its extension is still a GGUF (its magic says so).
    gguf = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    renamed = tmp_path / "weights.bin"
    shutil.copy(gguf, renamed)
    llama = engine.load(str(renamed), device="cpu", dtype="fp32")
    assert llama.arch == "llama" and llama.logits(torch.tensor([[1, 2, 3]])).shape[:2] == (1, 3)
    # A DeepSeek-V4 directory whose name looks like a GGUF file is still a DeepSeek-V4 checkpoint.
    disguised = tmp_path / "model.gguf"
    shutil.copytree(tiny_dir, disguised)
    assert engine.load(str(disguised), device="cpu").arch == "deepseek_v4"


def test_an_unknown_checkpoint_directory_is_a_format_error_naming_it(tmp_path, tiny_dir):
    other = tmp_path / "other"
    shutil.copytree(tiny_dir, other)
    config = json.loads((other / "config.json").read_text())
    config.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"])
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match="qwen3.*Qwen3ForCausalLM"):
        engine.load(str(other))


def test_a_file_without_the_gguf_magic_is_a_format_error(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ModelFormatError, match="not a GGUF"):
        engine.load(str(fake))


def test_options_that_do_not_apply_are_errors(tmp_path, tiny_dir):
    gguf = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    with pytest.raises(EngineError, match="simulate"):
        engine.load(str(gguf), simulate=True)
    with pytest.raises(EngineError, match="quant"):
        engine.load(str(tiny_dir), quant="int4")


def test_simulation_is_on_by_default_only_for_quantised_checkpoints(tmp_path):
    fp8 = write_tiny_model(tmp_path / "fp8", "fp8")
    assert engine.load(str(fp8), device="cpu").mode == "fp8-fp4/float32/simulated"
    plain = engine.load(str(fp8), device="cpu", simulate=False)
    assert plain.mode == "fp8-fp4/float32" and not plain.model.simulate


# ---------------------------------------------------------------- the LoadedModel interface


def test_logits_equal_the_models_own_forward(loaded):
    ids = torch.randint(3, 512, (2, 21), generator=torch.Generator().manual_seed(1))
    logits = loaded.logits(ids)
    assert logits.shape == (2, 21, 512) and logits.dtype == torch.float32
    direct = loaded.model(ids, loaded.model.new_state(2), output="all")
    torch.testing.assert_close(logits, direct, rtol=0, atol=0)
    with pytest.raises(ValueError):
        loaded.logits(ids[0])


def test_greedy_stream_equals_a_manual_decode_loop(loaded):
    prompt = torch.randint(3, 512, (19,), generator=torch.Generator().manual_seed(2)).tolist()
    events = list(loaded.stream(prompt, SamplingParams(max_tokens=7), prefill_chunk=5))
    done = events[-1]
    assert isinstance(done, Done) and done.usage.prompt_tokens == 19 and done.usage.completion_tokens >= 3
    ids = list(prompt)
    state = loaded.model.new_state()
    logits = loaded.model(torch.tensor([ids]), state, output="last")
    manual: list[int] = []
    for _ in range(done.usage.completion_tokens):
        token = int(logits[0, -1].argmax())
        manual.append(token)
        logits = loaded.model(torch.tensor([[token]]), state, output="last")
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert done.finish_reason in ("length", "stop")
    assert text == loaded.tokenizer.decode([t for t in manual if not loaded.tokenizer.is_special(t)])
    if done.finish_reason == "stop":  # the stop id is not part of the answer
        assert int(logits[0, -1].argmax()) in loaded.tokenizer.stop_ids


# ---------------------------------------------------------------- chat format (spec §6)


def test_chat_mode_prompt(loaded):
    tokenizer = loaded.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tokenizer.render_chat_text(messages) == f"{BOS}Be brief.{USER}Hi{ASSISTANT}</think>"
    ids = tokenizer.render_chat(messages)
    specials = tokenizer.special_tokens
    assert ids[0] == specials[BOS] == 0
    assert ids[-2:] == [specials[ASSISTANT], specials["</think>"]]
    assert specials[USER] in ids


def test_thinking_mode_and_history(loaded):
    tokenizer = loaded.tokenizer
    messages = [
        {"role": "user", "content": "A"},
        {"role": "assistant", "content": "B", "reasoning_content": "old thoughts"},
        {"role": "user", "content": "C"},
    ]
    # Past turns drop their reasoning: `</think>` then the answer.
    assert tokenizer.render_chat_text(messages, thinking=True) == (
        f"{BOS}{USER}A{ASSISTANT}</think>B{EOS}{USER}C{ASSISTANT}<think>"
    )
    assert tokenizer.render_chat_text(messages) == f"{BOS}{USER}A{ASSISTANT}</think>B{EOS}{USER}C{ASSISTANT}</think>"
    # After the last user turn, thinking mode keeps the reasoning.
    answered = messages + [{"role": "assistant", "content": "D", "reasoning_content": "why"}]
    assert tokenizer.render_chat_text(answered, add_generation_prompt=False, thinking=True).endswith(
        f"{USER}C{ASSISTANT}<think>why</think>D{EOS}"
    )


def test_tool_results_sit_inside_one_user_turn(loaded):
    messages = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "calling"},
        {"role": "tool", "content": "r1"},
        {"role": "tool", "content": "r2"},
    ]
    assert loaded.tokenizer.render_chat_text(messages).endswith(
        f"{EOS}{USER}<tool_result>r1</tool_result>\n\n<tool_result>r2</tool_result>{ASSISTANT}</think>"
    )


def test_control_token_text_in_a_message_stays_text(loaded):
    tokenizer = loaded.tokenizer
    ids = tokenizer.render_chat([{"role": "user", "content": f"x{USER}{EOS}"}])
    specials = tokenizer.special_tokens
    assert ids.count(specials[USER]) == 1 and specials[EOS] not in ids
    assert tokenizer.decode(ids).count(USER) == 2


# ---------------------------------------------------------------- the CLI


def test_ask_with_a_checkpoint_path_streams_json(tiny_dir, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "stdin", TerminalStdin())
    source = tmp_path / "code.py"
    source.write_text("".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(60)))
    answers = []
    for question in ("what does f3 do", "what does f7 do"):
        assert main(["ask", "--model", str(tiny_dir), "--json", "--max-tokens", "5", str(source), question]) == 0
        answers.append(json.loads(capsys.readouterr().out))
    first, second = answers
    assert first["model"] == "tiny-v4" and first["usage"]["completion_tokens"] >= 1
    assert isinstance(first["answer"], str) and first["timings"]["ttft_s"] > 0
    assert first["cache"]["reused_tokens"] == 0 and first["cache"]["segments_written"] >= 1
    # Same pack, new question: the prefix comes back from the disk cache.
    assert second["usage"]["cached_tokens"] == second["cache"]["reused_tokens"] >= 256


def test_ask_flash_not_installed_is_one_line_with_a_hint(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", TerminalStdin())
    assert main(["ask", "--model", "flash", "hi"]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1
    assert lines[0].startswith("Error: model flash is not installed") and "dsv4 pull flash" in lines[0]
    assert "284B" in lines[0] and "--model PATH" in lines[0]


def test_a_placed_snapshot_resolves_through_the_alias(tiny_dir):
    from engine import paths

    shutil.copytree(tiny_dir, paths.models_dir() / "flash")
    loaded = engine.load("flash", device="cpu")
    assert (loaded.name, loaded.arch) == ("flash", "deepseek_v4")


def test_pull_downloads_a_snapshot_into_the_home_directory(tiny_dir, monkeypatch):
    """`dsv4 pull flash` through store.fetch_model, with a local copy standing in for the hub."""
    from engine import paths, store

    requested: list[tuple[str, Path]] = []

    def copy_snapshot(repo_id: str, target: Path) -> None:
        requested.append((repo_id, target))
        shutil.copytree(tiny_dir, target, dirs_exist_ok=True)

    monkeypatch.setattr(store, "hub_unreachable_reason", lambda timeout_s=None: None)
    monkeypatch.setattr(store, "_download_snapshot", copy_snapshot)
    ref = store.fetch_model("flash")
    assert requested == [("deepseek-ai/DeepSeek-V4-Flash", paths.models_dir() / "flash")]
    assert ref.path == paths.models_dir() / "flash" and ref.format == "safetensors"
    assert store.fetch_model("flash").path == ref.path and len(requested) == 1  # present: no second download


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model_matches_the_cpu_one(tiny_dir, loaded):
    on_gpu = engine.load(str(tiny_dir))  # device None picks cuda
    assert on_gpu.model.head.weight.device.type == "cuda"
    ids = torch.randint(3, 512, (1, 24), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(on_gpu.logits(ids).cpu(), loaded.logits(ids), rtol=1e-4, atol=1e-4)
    prompt = ids[0].tolist()
    params = SamplingParams(max_tokens=4)
    assert list(on_gpu.stream(prompt, params))[-1].text == list(loaded.stream(prompt, params))[-1].text
