"""Generation with the persistent prefix cache: the same events as engine.generate.stream.

    fingerprint + chunk hashes -> longest cached prefix -> restore it -> prefill the rest up
    to the last chunk boundary before the final prompt token, publishing a segment every
    ~64 MB as it goes -> the shared loop (engine.generate) recomputes the remaining tokens,
    always including the last one (its logits pick the first answer token) -> stream.

The cache can only make things faster: any problem with it (a damaged file, a full disk,
an unreadable directory) is a miss or a warning in the report, never an error and never
state that the prompt did not produce. The report lands in `Done.extra["cache"]`;
`Done.usage.cached_tokens` counts the tokens restored from disk and `Done.timings.ttft_s`
runs from this call to the first token (lookup, load and prefill included).

`dsv4 chat` calls `stream()` once per turn with the whole conversation and a `LiveState`:
the model state stays in memory after a turn (with the ids it holds: prompt and answer), and
the next turn rewinds it to where the new prompt stops agreeing with it (normally nowhere)
and prefills only the new tokens; the disk cache is read only when nothing is kept or when
it holds more of the prompt than the kept state (`dsv4 serve` keeps one state across clients
that send different documents), and each turn publishes the chunks it added.
`Done.usage.cached_tokens` then counts the kept tokens.

What `loaded` must offer (engine.runtime.LoadedModel does; a DeepSeek-V4 wrapper will too):
`model` (an engine.llama.Llama or engine.deepseek_v4.model.Transformer: new_state() and
model(ids, state, output="none")), `tokenizer` (digest, chat_template, render_chat),
`path` (GGUF file or checkpoint directory, hashed for the fingerprint), `mode`, `name`,
`context_length`, and `stream(ids, params, state=, cached_tokens=, prefill_chunk=, cancel=)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine import generate
from engine.events import Done, Event, PrefillProgress, SamplingParams
from engine.prefix_cache import Fingerprint, PrefixCache, SegmentError, chain_hashes, file_digest, resolve_cap
from engine.prefix_state import StateAdapter, adapter_for

SEGMENT_BYTES = 64 << 20  # large sequential files: one read per ~64 MB, not one per page


@dataclass(frozen=True)
class CacheSettings:
    enabled: bool = True
    read_only: bool = False  # restore, but never write, touch or remove anything
    cap: str | int | None = None  # bytes or "5G"; None: $DSV4_CACHE_CAP, else the default
    root: Path | None = None  # default <home>/cache/kv
    chunk_tokens: int | None = None  # default 256
    segment_bytes: int = SEGMENT_BYTES


@dataclass
class CacheReport:
    enabled: bool
    read_only: bool
    prompt_tokens: int
    reused_tokens: int = 0
    prefilled_tokens: int = 0
    bytes_loaded: int = 0
    load_s: float = 0.0
    segments_loaded: int = 0
    segments_written: int = 0
    bytes_written: int = 0
    write_s: float = 0.0
    miss_reason: str | None = None  # why fewer tokens than possible were reused (None: all)
    live_tokens: int = 0  # of reused_tokens, those kept in memory from the previous turn
    live_miss: str | None = None  # why a kept state could not be extended (None: none kept, or it was)
    removed: list[str] = field(default_factory=list)  # damaged files dropped, one line each
    warnings: list[str] = field(default_factory=list)
    fingerprint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["load_bytes_per_s"] = round(self.bytes_loaded / self.load_s) if self.load_s > 0 and self.bytes_loaded else 0
        out["load_s"] = round(self.load_s, 4)
        out["write_s"] = round(self.write_s, 4)
        return out


def supports(loaded: Any) -> bool:
    """Whether `loaded` is an engine model the cache can serve (not a test double)."""
    try:
        adapter_for(getattr(loaded, "model", None))
    except TypeError:
        return False
    return hasattr(loaded, "tokenizer") and hasattr(loaded, "path")


def weights_digest(path: Path, memo_dir: Path | None = None) -> str:
    """A GGUF file's SHA-256, or for a checkpoint directory a hash over its files' digests."""
    path = Path(path)
    if path.is_file():
        return file_digest(path, memo_dir)
    digest = hashlib.sha256()
    for member in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")):
        digest.update(f"{member.relative_to(path)}\0{file_digest(member, memo_dir)}\n".encode())
    return digest.hexdigest()


def fingerprint_for(loaded: Any, adapter: StateAdapter, memo_dir: Path | None = None) -> Fingerprint:
    tokenizer = loaded.tokenizer
    template = getattr(tokenizer, "chat_template", None) or ""
    fields = {
        "chunk_tokens": adapter.chunk_tokens,
        "weights": weights_digest(loaded.path, memo_dir),
        "tokenizer": getattr(tokenizer, "digest", ""),
        "chat_template": hashlib.sha256(template.encode()).hexdigest(),
        "mode": getattr(loaded, "mode", ""),
        **adapter.layout(),
    }
    return Fingerprint(fields, label=str(getattr(loaded, "name", "")))


def chat(loaded: Any, messages: Sequence[dict[str, Any]], params: SamplingParams, **kwargs: Any) -> Iterator[Event]:
    return stream(loaded, loaded.tokenizer.render_chat(list(messages)), params, **kwargs)


@dataclass
class LiveState:
    """A conversation's model state kept between turns: `token_ids` are exactly the tokens
    `state` holds; `published` of them (a chunk boundary) are on disk as cache segments."""

    loaded: Any = None
    state: Any = None
    token_ids: list[int] = field(default_factory=list)
    published: int = 0

    def clear(self) -> None:
        self.loaded, self.state, self.token_ids, self.published = None, None, [], 0

    @property
    def length(self) -> int:
        return len(self.token_ids)


def stream(
    loaded: Any,
    prompt_ids: list[int],
    params: SamplingParams,
    *,
    settings: CacheSettings = CacheSettings(),
    prefill_chunk: int = 512,
    cancel: Callable[[], bool] | None = None,
    live: LiveState | None = None,
) -> Iterator[Event]:
    started = time.perf_counter()
    prompt_ids = list(prompt_ids)
    n_prompt = len(prompt_ids)
    report = CacheReport(settings.enabled, settings.read_only, n_prompt)
    if n_prompt >= loaded.context_length or n_prompt == 0:
        # The shared loop raises the proper error; nothing to cache or keep.
        if live is not None:
            live.clear()
        yield from loaded.stream(prompt_ids, params, prefill_chunk=prefill_chunk, cancel=cancel)
        return
    if not settings.enabled and live is None:
        report.miss_reason = "the cache is off (--no-cache)"
        report.prefilled_tokens = n_prompt
        yield from _finish(loaded.stream(prompt_ids, params, prefill_chunk=prefill_chunk, cancel=cancel), report, started, time.perf_counter(), 0.0)
        return

    adapter = adapter_for(loaded.model, settings.chunk_tokens)
    chunk = adapter.chunk_tokens
    n_chunks = (n_prompt - 1) // chunk  # the last prompt token is always recomputed
    state, published = _take_live(live, loaded, prompt_ids, adapter, report)
    cache: PrefixCache | None = None
    hashes: list[str] = []
    if not settings.enabled:
        report.miss_reason = None if report.live_tokens else "the cache is off (--no-cache)"
    else:
        try:
            fingerprint = fingerprint_for(loaded, adapter)
            report.fingerprint = fingerprint.short
            cache = PrefixCache(fingerprint, root=settings.root, cap_bytes=resolve_cap(settings.cap, settings.root), read_only=settings.read_only)
            hashes = chain_hashes(fingerprint, prompt_ids, n_chunks)
        except (OSError, ValueError) as exc:
            report.warnings.append(f"prefix cache unavailable ({_one_line(exc)}); answering uncached")
            report.miss_reason = "the cache is unavailable"
    if state is not None and cache is not None and state.length < n_chunks * chunk:
        # A server answers many documents: the state kept from the last request may share
        # only the template's first tokens with this prompt while the disk holds its prefix.
        on_disk = _cached_tokens(cache, adapter, hashes, report)
        if on_disk > state.length:
            report.live_miss = (f"the disk cache holds more of this prompt ({on_disk:,} tokens) than the state "
                                f"kept in memory ({state.length:,})")
            report.live_tokens = 0
            state.reset()
            _restore(cache, adapter, state, prompt_ids, hashes, report)
            published = state.length
    if state is None:
        state = loaded.model.new_state()
        if cache is not None:
            if n_chunks == 0:
                report.miss_reason = f"the prompt is shorter than one cache chunk ({chunk} tokens)"
            else:
                _restore(cache, adapter, state, prompt_ids, hashes, report)
        published = state.length
    restored = state.length
    report.reused_tokens = restored
    generated: list[int] = []
    on_disk = published
    try:
        yield PrefillProgress(done=restored, total=n_prompt)

        # ---- prefill up to the last chunk boundary, publishing segments on the way
        writable = cache is not None and not settings.read_only and n_chunks > 0
        target = max(restored, n_chunks * chunk) if cache is not None else restored
        per_token = max(1.0, adapter.bytes_per_token())
        segment_tokens = max(chunk, int(settings.segment_bytes / per_token) // chunk * chunk)
        step = max(chunk, min(prefill_chunk, segment_tokens) // chunk * chunk)
        ends = segment_ends(published, n_chunks * chunk, chunk, segment_tokens, adapter.partial_ok)
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        prefill_started = time.perf_counter()
        position, segment_start = restored, published
        while True:
            # Segment ends the state has reached: a kept state may already hold some.
            while writable and ends and ends[0] <= position:
                end = ends.pop(0)
                if adapter.partial_ok or end == state.length:  # DeepSeek-V4 exports only at its end
                    writable = _publish(cache, adapter, state, segment_start, end, prompt_ids, hashes, report)
                    segment_start = end
                    on_disk = end if writable else on_disk
            if position >= target:
                break
            if cancel is not None and cancel():
                break  # the shared loop sees the same cancel and reports it
            high = min(position + step, next((end for end in ends if end > position), target), target)
            loaded.model(ids[:, position:high], state, output="none")
            position = high
            yield PrefillProgress(done=position, total=n_prompt)
        own_prefill_s = time.perf_counter() - prefill_started
        report.prefilled_tokens = n_prompt - restored
        tail = generate.stream(loaded.model, loaded.tokenizer, prompt_ids, params, state=state, cached_tokens=state.length,
                               prefill_chunk=prefill_chunk, cancel=cancel, model_name=getattr(loaded, "name", "the model"),
                               generated_ids=generated)
        yield from _finish(tail, report, started, time.perf_counter(), own_prefill_s)
    finally:
        # Kept even after a cancel or an interrupt: the state is valid for its length.
        if live is not None:
            live.loaded, live.state = loaded, state
            live.token_ids = (prompt_ids + generated)[: state.length]
            live.published = min(on_disk, state.length)


def _take_live(live: LiveState | None, loaded: Any, prompt_ids: list[int], adapter: StateAdapter, report: CacheReport) -> tuple[Any, int]:
    """The kept state rewound to where it stops agreeing with the prompt, and how much of it
    is on disk; (None, 0) when nothing usable is kept (the reason lands in the report)."""
    if live is None or live.state is None:
        return None, 0
    state = live.state
    if live.loaded is not loaded or state.length != live.length:
        live.clear()
        report.live_miss = "the model changed since the last turn"
        return None, 0
    common = 0
    for own, want in zip(live.token_ids, prompt_ids[:-1]):  # the last prompt token is recomputed
        if own != want:
            break
        common += 1
    if common == 0:
        live.clear()
        report.live_miss = "the prompt does not continue the conversation kept in memory"
        return None, 0
    if common < state.length:
        if not adapter.partial_ok:
            live.clear()
            report.live_miss = (f"the prompt leaves the kept conversation at token {common:,} and this model's "
                                "state cannot be rewound; the disk cache is used instead")
            return None, 0
        state.trim(state.length - common)
        live.token_ids = live.token_ids[:common]
    report.live_tokens = common
    chunk = adapter.chunk_tokens
    return state, min(live.published, common // chunk * chunk)


def segment_ends(start: int, target: int, chunk: int, segment_tokens: int, partial_ok: bool) -> list[int]:
    """Where segments written while prefilling [start, target) end: every `segment_tokens`,
    and at `target`. A state that can only be restored at a segment's end (DeepSeek-V4)
    also gets ends at target - chunk * 2^k, so a prompt that diverges d tokens before the
    end (a new question after the same pack) still reuses all but about 2d tokens."""
    ends = set(range(start + segment_tokens, target, segment_tokens)) | {target}
    if not partial_ok:
        back = chunk
        while target - back > start:
            ends.add(target - back)
            back *= 2
    return sorted(end for end in ends if start < end <= target)


def _cached_tokens(cache: PrefixCache, adapter: StateAdapter, hashes: list[str], report: CacheReport) -> int:
    """How many of the prompt's tokens the disk cache could restore (headers only; 0 on any error)."""
    try:
        with cache.reading():
            match = cache.match(hashes, partial_ok=adapter.partial_ok)
    except (OSError, ValueError, RuntimeError):
        return 0
    report.removed += match.removed
    return sum(used for _, used in match.segments) * cache.chunk_tokens


def _restore(cache: PrefixCache, adapter: StateAdapter, state: Any, prompt_ids: list[int], hashes: list[str], report: CacheReport) -> None:
    load_started = time.perf_counter()
    try:
        with cache.reading():
            match = cache.match(hashes, partial_ok=adapter.partial_ok)
            report.removed += match.removed
            report.miss_reason = match.reason
            plan = [(header, used_chunks * cache.chunk_tokens) for header, used_chunks in match.segments]
            # Segment i + 1 is read and verified while segment i is copied into the state.
            with ThreadPoolExecutor(1) as reader:
                upcoming = reader.submit(cache.load, plan[0][0], prompt_ids, plan[0][1]) if plan else None
                for i, (header, used) in enumerate(plan):
                    try:
                        segment = upcoming.result()
                        upcoming = reader.submit(cache.load, plan[i + 1][0], prompt_ids, plan[i + 1][1]) if i + 1 < len(plan) else None
                        adapter.import_range(state, header.start, used, segment)
                    except SegmentError as exc:
                        cache.discard(header.path, str(exc), report.removed)
                        report.miss_reason = f"a cached segment at token {header.start:,} is unusable: {exc}"
                        break
                    report.bytes_loaded += header.file_bytes
                    report.segments_loaded += 1
                    cache.touch(header)
    except (OSError, ValueError, RuntimeError) as exc:
        # A broken cache directory is a miss; the state is rebuilt from the prompt.
        state.reset()
        report.bytes_loaded = report.segments_loaded = 0
        report.warnings.append(f"prefix cache could not be read ({_one_line(exc)}); answering uncached")
        report.miss_reason = "the cache could not be read"
    report.load_s = time.perf_counter() - load_started


def _publish(cache: PrefixCache, adapter: StateAdapter, state: Any, start: int, end: int, prompt_ids: list[int], hashes: list[str], report: CacheReport) -> bool:
    """Write tokens [start, end) as one segment; False stops further writes for this run."""
    chunk = cache.chunk_tokens
    write_started = time.perf_counter()
    try:
        tensors, meta = adapter.export_range(state, start, end)
        report.bytes_written += cache.write_segment(start, hashes[start // chunk : end // chunk + 1], prompt_ids[start:end], tensors, meta)
        report.segments_written += 1
        return True
    except (OSError, ValueError) as exc:
        report.warnings.append(f"prefix cache: could not write a segment ({_one_line(exc)}); this answer is not cached")
        return False
    finally:
        report.write_s += time.perf_counter() - write_started


def _finish(events: Iterator[Event], report: CacheReport, started: float, tail_started: float, own_prefill_s: float) -> Iterator[Event]:
    """Pass the shared loop's events through; make Done's usage and timings cover the
    whole call and attach the cache report."""
    for event in events:
        if isinstance(event, Done):
            t = event.timings
            prefill_s = own_prefill_s + t.prefill_s
            computed = report.prompt_tokens - report.reused_tokens
            timings = dataclasses.replace(
                t,
                ttft_s=(tail_started - started) + t.ttft_s,
                prefill_s=prefill_s,
                prefill_tok_s=computed / prefill_s if prefill_s > 0 else 0.0,
            )
            usage = dataclasses.replace(event.usage, cached_tokens=report.reused_tokens)
            event = dataclasses.replace(event, usage=usage, timings=timings, extra={**event.extra, "cache": report.to_dict()})
        yield event


def _one_line(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text.splitlines()[0] if text else type(exc).__name__
