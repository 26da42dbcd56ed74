"""`dsv4 serve` keeps the last answer's model state in memory: a request that shares a
document with the previous one prefills only from where they differ and reads nothing back
from disk, and answers what a fresh run answers; a request whose document the disk cache
holds, after one about something else, restores it from disk rather than the few template
tokens the kept state shares with it. A tiny real GGUF, the real engine and HTTP server."""

from __future__ import annotations

import pytest

from dsv4cli.commands.serve import EngineServedModel, build_server
from dsv4cli.server import start_in_thread
from engine import cached_generation
from engine.cached_generation import CacheSettings
from engine.events import Done, SamplingParams
from tests.tinymodels import write_tiny_llama_gguf

openai = pytest.importorskip("openai")

GREEDY = SamplingParams(max_tokens=6, temperature=0.0)
CHUNK = 256  # the prefix cache's chunk for a llama state


def document(name: str) -> str:
    return "".join(f"{name} note {i}: the greeting is friendly and short.\n" for i in range(40))


def question(doc: str, text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": doc + "\n\n" + text}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import engine

    return engine.load(str(write_tiny_llama_gguf(tmp_path_factory.mktemp("serve-live") / "tiny.gguf", ctx=2048)))


def answer(served: EngineServedModel, messages: list[dict[str, str]]) -> Done:
    events = list(served.generate(served.chat_prompt(messages), GREEDY, lambda: False))
    assert isinstance(events[-1], Done)
    return events[-1]


def fresh_text(tiny, messages: list[dict[str, str]]) -> str:
    events = list(cached_generation.stream(tiny, tiny.tokenizer.render_chat(messages), GREEDY, settings=CacheSettings(enabled=False)))
    return events[-1].text


def test_a_request_sharing_the_document_prefills_only_the_new_question(tiny):
    served = EngineServedModel(tiny, "tiny")
    first = question(document("A"), "What is the greeting like?")
    answer(served, first)
    second = question(document("A"), "How many notes are there?")
    prompt = served.chat_prompt(second)
    shared = next(i for i, (a, b) in enumerate(zip(served.chat_prompt(first), prompt)) if a != b)
    assert shared > CHUNK  # the document is longer than a cache chunk

    done = answer(served, second)
    report = done.extra["cache"]
    assert report["live_tokens"] == shared == done.usage.cached_tokens  # beyond the last chunk boundary on disk
    assert report["prefilled_tokens"] == len(prompt) - shared
    assert report["bytes_loaded"] == 0 and report["segments_written"] == 0
    assert done.text == fresh_text(tiny, second)


def test_a_document_the_disk_holds_wins_over_a_kept_state_about_another(tiny):
    served = EngineServedModel(tiny, "tiny")
    about_a = question(document("A"), "What is the greeting like?")
    answer(served, about_a)  # publishes A's chunks
    answer(served, question(document("B"), "What is the greeting like?"))  # keeps B in memory
    again = question(document("A"), "How many notes are there?")
    prompt = served.chat_prompt(again)

    done = answer(served, again)
    report = done.extra["cache"]
    assert report["live_tokens"] == 0 and "disk cache holds more" in report["live_miss"]
    assert report["bytes_loaded"] > 0 and report["reused_tokens"] == (len(prompt) - 1) // CHUNK * CHUNK
    assert done.text == fresh_text(tiny, again)
    # and the state kept now is A's, so the next question about A is served from memory
    follow_up = answer(served, question(document("A"), "Is it short?"))
    assert follow_up.extra["cache"]["live_tokens"] > report["reused_tokens"]
    assert follow_up.extra["cache"]["bytes_loaded"] == 0


def test_the_http_usage_counts_the_tokens_kept_in_memory(tiny):
    srv = build_server(EngineServedModel(tiny, "tiny"), "127.0.0.1", 0, None)
    start_in_thread(srv)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key="unused", max_retries=0, timeout=30)
        first = client.chat.completions.create(model="tiny", messages=question(document("A"), "What is it?"), max_tokens=4, temperature=0)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        second = client.chat.completions.create(model="tiny", messages=question(document("A"), "Why?"), max_tokens=4, temperature=0)
        kept = srv.stats.last_done.extra["cache"]["live_tokens"]
        assert second.usage.prompt_tokens_details.cached_tokens == kept > CHUNK
    finally:
        srv.shutdown()
        srv.server_close()
