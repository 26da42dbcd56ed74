"""`dsv4 chat` keeps the model state in memory between turns (engine.cached_generation.LiveState):
the second turn prefills only the tokens the first did not leave behind, and answers exactly
what a fresh run over the whole conversation answers. A tiny real GGUF, the real engine."""

from __future__ import annotations

import pytest

from engine import cached_generation
from engine.cached_generation import CacheSettings, LiveState
from engine.events import Done, PrefillProgress, SamplingParams
from tests.tinymodels import write_tiny_llama_gguf

SYSTEM = "You are a helpful assistant."
PACK = "".join(f"Note {i}: the greeting is friendly and short.\n" for i in range(40))
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=1.1)
SEEDED = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=7)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import engine

    return engine.load(str(write_tiny_llama_gguf(tmp_path_factory.mktemp("live") / "tiny.gguf", ctx=2048)))


def run(loaded, prompt_ids: list[int], params: SamplingParams, **kwargs) -> tuple[Done, list[PrefillProgress]]:
    events = list(cached_generation.stream(loaded, prompt_ids, params, **kwargs))
    done = events[-1]
    assert isinstance(done, Done)
    return done, [e for e in events if isinstance(e, PrefillProgress)]


def conversation(*turns: tuple[str, str | None]) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM}]
    for question, answer in turns:
        messages.append({"role": "user", "content": question})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return messages


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("disk_cache", [True, False], ids=["disk-cache", "no-cache"])
def test_second_turn_prefills_only_the_new_tokens_and_answers_as_a_fresh_run(tiny, params, disk_cache):
    settings = CacheSettings(enabled=disk_cache)
    live = LiveState()
    first_prompt = tiny.tokenizer.render_chat(conversation((PACK + "\n\nWhat is the greeting like?", None)))
    first, _ = run(tiny, first_prompt, params, settings=settings, live=live)
    assert first.usage.cached_tokens == 0 and first.extra["cache"]["live_tokens"] == 0
    # The state holds the prompt and the answer, all but its last token (never fed back).
    assert live.length == len(first_prompt) + first.usage.completion_tokens - 1
    assert live.token_ids[: len(first_prompt)] == first_prompt

    second_prompt = tiny.tokenizer.render_chat(conversation((PACK + "\n\nWhat is the greeting like?", first.text), ("And the notes?", None)))
    second, progress = run(tiny, second_prompt, params, settings=settings, live=live)
    report = second.extra["cache"]
    kept = report["live_tokens"]
    common = next((i for i, (a, b) in enumerate(zip(live.token_ids, second_prompt)) if a != b), None)
    assert kept >= len(first_prompt)  # the whole first prompt (and the answer as re-rendered) stayed
    assert report["reused_tokens"] == second.usage.cached_tokens == kept
    assert report["prefilled_tokens"] == len(second_prompt) - kept
    assert progress[0].done == kept and progress[-1].done == len(second_prompt)
    assert report["bytes_loaded"] == 0 and report["live_miss"] is None  # nothing read back from disk
    assert common is None or common >= kept

    fresh, fresh_progress = run(tiny, second_prompt, params, settings=CacheSettings(enabled=False))
    assert fresh_progress[0].done == 0
    assert second.text == fresh.text
    assert second.usage.completion_tokens == fresh.usage.completion_tokens


def test_a_changed_conversation_rewinds_the_kept_state_and_still_answers_right(tiny):
    live = LiveState()
    settings = CacheSettings(enabled=False)
    first_prompt = tiny.tokenizer.render_chat(conversation((PACK + "\n\nWhat is the greeting like?", None)))
    run(tiny, first_prompt, GREEDY, settings=settings, live=live)
    # /clear: the same system prompt and pack, another question
    other = tiny.tokenizer.render_chat(conversation((PACK + "\n\nHow many notes are there?", None)))
    shared = next(i for i, (a, b) in enumerate(zip(first_prompt, other)) if a != b)
    done, progress = run(tiny, other, GREEDY, settings=settings, live=live)
    assert done.extra["cache"]["live_tokens"] == shared == progress[0].done
    assert done.text == run(tiny, other, GREEDY, settings=settings)[0].text


def test_a_kept_state_with_nothing_in_common_or_another_model_is_dropped(tiny, tmp_path):
    import engine

    live = LiveState()
    settings = CacheSettings(enabled=False)
    run(tiny, tiny.tokenizer.render_chat(conversation(("Hello there", None))), GREEDY, settings=settings, live=live)
    unrelated = tiny.tokenizer.encode("Something else entirely")
    done, _ = run(tiny, unrelated, GREEDY, settings=settings, live=live)
    assert done.extra["cache"]["live_tokens"] == 0 and "does not continue" in done.extra["cache"]["live_miss"]

    another = engine.load(str(write_tiny_llama_gguf(tmp_path / "other.gguf", ctx=2048, seed=3)))
    done, _ = run(another, unrelated, GREEDY, settings=settings, live=live)
    assert done.extra["cache"]["live_tokens"] == 0 and "model changed" in done.extra["cache"]["live_miss"]
    assert live.loaded is another


def test_a_prompt_beyond_the_context_is_an_error_and_drops_the_kept_state(tiny):
    from engine.errors import ContextOverflow

    live = LiveState()
    run(tiny, tiny.tokenizer.render_chat(conversation(("Hello there", None))), GREEDY, settings=CacheSettings(enabled=False), live=live)
    assert live.state is not None
    with pytest.raises(ContextOverflow):
        run(tiny, [5] * tiny.context_length, GREEDY, live=live)
    assert live.state is None and live.length == 0


def test_each_turn_publishes_its_new_chunks_for_a_later_run(tiny):
    live = LiveState()
    first_prompt = tiny.tokenizer.render_chat(conversation((PACK + "\n\nWhat is the greeting like?", None)))
    first, _ = run(tiny, first_prompt, GREEDY, live=live)
    longer = "".join(f"Extra {i}: one more note.\n" for i in range(20))  # the second turn adds whole chunks
    second_prompt = tiny.tokenizer.render_chat(conversation((PACK + "\n\nWhat is the greeting like?", first.text), (longer + "\n\nAnd now?", None)))
    second, _ = run(tiny, second_prompt, GREEDY, live=live)
    assert second.extra["cache"]["segments_written"] >= 1
    chunk = 256
    assert live.published == (len(second_prompt) - 1) // chunk * chunk
    # A new process (no kept state) restores all of it from disk and answers the same.
    again, _ = run(tiny, second_prompt, GREEDY)
    assert again.extra["cache"]["reused_tokens"] == live.published
    assert again.text == second.text


def test_a_state_that_cannot_be_rewound_falls_back_to_the_disk_cache(tmp_path_factory):
    """DeepSeek-V4's compressed state cannot forget tokens: a prompt that leaves the kept
    conversation (here: /clear, then another question) is served from the disk cache."""
    import engine
    from tests.dsv4_tiny import write_tiny_model

    loaded = engine.load(str(write_tiny_model(tmp_path_factory.mktemp("dsv4-live") / "tiny-v4", "fp32")), device="cpu")
    params = SamplingParams(max_tokens=4)
    live = LiveState()
    first = loaded.tokenizer.render_chat(conversation((PACK + "\n\nWhat is the greeting like?", None)))
    run(loaded, first, params, live=live)
    other = loaded.tokenizer.render_chat(conversation((PACK + "\n\nHow many notes are there?", None)))
    done, progress = run(loaded, other, params, live=live)
    report = done.extra["cache"]
    assert report["live_tokens"] == 0 and "cannot be rewound" in report["live_miss"]
    assert report["reused_tokens"] == progress[0].done > 0 and report["bytes_loaded"] > 0  # from disk instead
    assert done.text == run(loaded, other, params, settings=CacheSettings(enabled=False))[0].text


@pytest.mark.model
@pytest.mark.slow
def test_mini_second_turn_prefills_only_its_new_tokens():
    import engine
    from tests.tinymodels import real_model_gguf_or_skip

    path = real_model_gguf_or_skip()
    loaded = engine.load(str(path))
    source = "".join(f"def step_{i}(x):\n    return x + {i}\n\n" for i in range(40))
    params = SamplingParams(max_tokens=16, repetition_penalty=1.1)
    live = LiveState()
    first_prompt = loaded.tokenizer.render_chat(conversation((source + "\n\nWhat does step_3 return?", None)))
    first, _ = run(loaded, first_prompt, params, settings=CacheSettings(enabled=False), live=live)
    second_prompt = loaded.tokenizer.render_chat(conversation((source + "\n\nWhat does step_3 return?", first.text), ("And step_7?", None)))
    second, progress = run(loaded, second_prompt, params, settings=CacheSettings(enabled=False), live=live)
    kept = second.extra["cache"]["live_tokens"]
    assert kept >= len(first_prompt) and progress[0].done == kept
    assert second.extra["cache"]["prefilled_tokens"] == len(second_prompt) - kept < 40
    assert second.text == run(loaded, second_prompt, params, settings=CacheSettings(enabled=False))[0].text
