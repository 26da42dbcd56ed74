"""engine.generate / engine.sampling / engine.runtime on a tiny real GGUF: event order,
sampling rules, stop strings across tokens, limits, cancellation, cached prefixes."""

from __future__ import annotations

import pytest
import torch

import engine
from engine.errors import ContextOverflow
from engine.events import Done, PrefillProgress, SamplingParams, TextDelta
from engine.generate import StopStrings
from engine.sampling import Sampler, apply_repetition_penalty, filter_logits
from tests.tinymodels import write_tiny_llama_gguf

CTX = 256


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_llama_gguf(tmp_path_factory.mktemp("tiny-gen") / "tiny.gguf", quant="Q4_1", ctx=CTX)
    return engine.load(path, dtype="fp32")


@pytest.fixture(scope="module")
def prompt(tiny):
    return tiny.tokenizer.encode("The quick brown fox jumps over the lazy dog.")


def run(model, ids, params, **kw):
    events = list(model.stream(ids, params, **kw))
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert isinstance(events[-1], Done) and not any(isinstance(e, Done) for e in events[:-1])
    return events, deltas, events[-1]


def test_event_order_counts_and_text(tiny, prompt):
    events, deltas, done = run(tiny, prompt, SamplingParams(max_tokens=12), prefill_chunk=4)
    progress = [e for e in events if isinstance(e, PrefillProgress)]
    assert progress[0] == PrefillProgress(0, len(prompt)) and progress[-1] == PrefillProgress(len(prompt), len(prompt))
    assert [p.done for p in progress] == sorted(p.done for p in progress)
    assert events.index(progress[-1]) < events.index(deltas[0])
    assert done.text == "".join(d.text for d in deltas)
    assert [d.completion_tokens for d in deltas] == sorted(d.completion_tokens for d in deltas)
    assert done.usage.prompt_tokens == len(prompt) and done.usage.completion_tokens == 12
    assert done.finish_reason == "length"
    t = done.timings
    assert 0 < t.prefill_s <= t.ttft_s and t.prefill_tok_s > 0 and t.decode_tok_s > 0


def test_greedy_is_deterministic_and_matches_argmax_of_logits(tiny, prompt):
    a = run(tiny, prompt, SamplingParams(max_tokens=5))[2]
    b = run(tiny, prompt, SamplingParams(max_tokens=5))[2]
    assert a.text == b.text
    first = int(tiny.logits(torch.tensor([prompt]))[0, -1].argmax())
    assert a.text.startswith(tiny.tokenizer.decode([first]))


def test_seed_reproduces_a_sampled_completion(tiny, prompt):
    params = SamplingParams(max_tokens=10, temperature=1.5, seed=7)
    assert run(tiny, prompt, params)[2].text == run(tiny, prompt, params)[2].text
    texts = {run(tiny, prompt, SamplingParams(max_tokens=10, temperature=1.5, seed=s))[2].text for s in range(6)}
    assert len(texts) > 1


def test_top_k_one_is_greedy(tiny, prompt):
    greedy = run(tiny, prompt, SamplingParams(max_tokens=6))[2].text
    assert run(tiny, prompt, SamplingParams(max_tokens=6, temperature=1.0, top_k=1, seed=3))[2].text == greedy


def test_top_k_and_top_p_masks():
    logits = torch.tensor([3.0, 1.0, 2.0, 0.0, -1.0])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [False, True, False, True, True]
    # probabilities ~ [0.64, 0.09, 0.24, 0.03, 0.01]: 0.8 needs the two likeliest
    assert torch.isinf(filter_logits(logits, top_p=0.8)).tolist() == [False, True, False, True, True]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [False, True, True, True, True]
    assert not torch.isinf(filter_logits(logits, top_p=1.0)).any()
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=0))
    assert {sampler(logits) for _ in range(50)} <= {0, 2}


def test_repetition_penalty_lowers_seen_tokens_only():
    logits = torch.tensor([2.0, -1.0, 4.0, 1.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -2.0, 4.0, 1.0]
    assert logits.tolist() == [2.0, -1.0, 4.0, 1.0]  # input untouched
    sampler = Sampler(SamplingParams(repetition_penalty=3.0))
    assert sampler(torch.tensor([3.0, 2.0]), torch.tensor([0])) == 1


def test_penalty_changes_a_looping_greedy_completion(tiny, prompt):
    plain = run(tiny, prompt, SamplingParams(max_tokens=16))[2].text
    penalised = run(tiny, prompt, SamplingParams(max_tokens=16, repetition_penalty=1.8))[2].text
    assert plain != penalised


def test_stop_strings_unit():
    stops = StopStrings(("END", "xy"))
    assert stops.feed("abcE") == ("abc", False)  # "E" could start "END"
    assert stops.feed("N") == ("", False)
    assert stops.feed("Dtail") == ("", True)
    assert stops.emitted == "abc"
    other = StopStrings(("END",))
    assert other.feed("aEN") == ("a", False) and other.feed("ope") == ("ENope", False)
    assert other.feed("E", final=True) == ("E", False)


def test_stop_string_split_across_tokens(tiny, prompt):
    params = SamplingParams(max_tokens=30, temperature=1.5, seed=1)
    _, deltas, done = run(tiny, prompt, params)
    full = done.text
    # A stop string that starts in one token's text and ends in a later one (first occurrence).
    boundaries, total = [], 0
    for d in deltas[:-2]:
        total += len(d.text)
        boundaries.append(total)
    start = next(b - 1 for b in boundaries if b > 0 and full.find(full[b - 1 : b + 2]) == b - 1)
    stop = full[start : start + 3]
    _, stopped_deltas, stopped = run(tiny, prompt, SamplingParams(max_tokens=30, temperature=1.5, seed=1, stop=(stop,)))
    assert stopped.finish_reason == "stop"
    assert stopped.text == full[:start] == "".join(d.text for d in stopped_deltas)


def test_max_tokens_finishes_with_length(tiny, prompt):
    done = run(tiny, prompt, SamplingParams(max_tokens=3))[2]
    assert done.finish_reason == "length" and done.usage.completion_tokens == 3
    _, deltas, done = run(tiny, prompt, SamplingParams(max_tokens=0))
    assert not deltas and done.finish_reason == "length" and done.usage.completion_tokens == 0


def test_context_overflow_is_an_error_not_a_truncation(tiny):
    with pytest.raises(ContextOverflow) as info:
        list(tiny.stream([5] * CTX, SamplingParams(max_tokens=1)))
    assert "256" in str(info.value) and info.value.hint


def test_generation_stops_when_the_context_is_full(tiny):
    done = run(tiny, [5] * (CTX - 4), SamplingParams(max_tokens=50), prefill_chunk=100)[2]
    assert done.finish_reason == "length" and done.usage.completion_tokens <= 5


def test_cancel_between_steps(tiny, prompt):
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 4

    events, deltas, done = run(tiny, prompt, SamplingParams(max_tokens=50), prefill_chunk=4, cancel=cancel)
    assert done.finish_reason == "cancelled" and done.usage.completion_tokens < 50


def test_keyboard_interrupt_leaves_a_consistent_state(tiny, prompt):
    state = tiny.new_state()
    seen = []

    def interrupt() -> bool:
        seen.append(1)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return False

    with pytest.raises(KeyboardInterrupt):
        list(tiny.stream(prompt, SamplingParams(max_tokens=5), state=state, prefill_chunk=2, cancel=interrupt))
    assert state.length == 4  # two whole chunks, nothing half-written counted
    done = run(tiny, prompt, SamplingParams(max_tokens=5), state=state, cached_tokens=4)[2]
    assert done.text == run(tiny, prompt, SamplingParams(max_tokens=5))[2].text


def test_cached_prefix_is_not_recomputed(tiny, prompt):
    fresh = run(tiny, prompt, SamplingParams(max_tokens=8))[2]
    state = tiny.new_state()
    tiny.model(torch.tensor([prompt[:6]]), state, output="none")
    events, _, done = run(tiny, prompt, SamplingParams(max_tokens=8), state=state, cached_tokens=6)
    assert events[0] == PrefillProgress(6, len(prompt))
    assert done.usage.cached_tokens == 6 and done.text == fresh.text
    # A state holding the whole prompt still recomputes the last token for its logits.
    full = tiny.new_state()
    tiny.model(torch.tensor([prompt]), full, output="none")
    done = run(tiny, prompt, SamplingParams(max_tokens=8), state=full, cached_tokens=len(prompt))[2]
    assert done.usage.cached_tokens == len(prompt) - 1 and done.text == fresh.text


def test_chat_renders_the_template(tiny):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    done = list(tiny.chat(messages, SamplingParams(max_tokens=4)))[-1]
    assert done.usage.prompt_tokens == len(tiny.tokenizer.render_chat(messages))


def test_logits_api(tiny, prompt):
    ids = torch.tensor([prompt, prompt[::-1]])
    logits = tiny.logits(ids)
    assert logits.shape == (2, len(prompt), tiny.tokenizer.vocab_size) and logits.dtype == torch.float32
    assert tiny.arch == "llama" and tiny.mode == "fp32" and tiny.context_length == CTX


def test_load_resolves_modes(tiny):
    from engine.runtime import DEFAULT_MODE, resolve_mode

    assert resolve_mode() == DEFAULT_MODE
    assert resolve_mode(torch.bfloat16) == "bf16" and resolve_mode("fp32") == "fp32"
    assert resolve_mode(quant="int8") == "int8"
    with pytest.raises(engine.EngineError):
        resolve_mode(quant="int3")
    with pytest.raises(engine.EngineError):
        engine.load(tiny.path, device="cuda")
