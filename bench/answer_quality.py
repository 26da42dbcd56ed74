"""Answer quality of the embedded `mini` per prompt layout: which layout gives real answers.

`python bench/answer_quality.py` asks the real SmolLM2-135M-Instruct (offline, greedy, the
repetition penalty `dsv4 ask` uses) questions about real files of this repository and of
CPython's standard library, whose answers are checkable by keywords ("which function ...",
"name the classes"). Every layout keeps the pack FIRST and the question LAST, so the pack
stays the cacheable prefix; layouts differ in the pack format, the system prompt, the words
between pack and question, and where the question sits (same user message, a second user
message, or the pack in the system message).

Stage 1 scores each pack format with and without an instruction line; stage 2 varies the
system prompt and the question's placement around stage 1's best. Last, the layouts the CLI
ships are scored through the CLI's own code: `dsv4 ask`'s prompt (commands/ask.py) and
`dsv4 chat`'s first turn (commands/chat.py ChatSession), so the default is measured, not
assumed equal to a variant.

Score: a question's score is the share of its expected keywords the answer names (capped at
`need`); a layout's score is the mean over questions, in percent. `echo` counts answers that
copy the prompt back (start with pack markup or a sentence of the pack, or are mostly lines
of the files) instead of answering; an echo scores 0. About 10 minutes on one core of a quiet machine, more under load (`--questions N`
for fewer).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._shared import ROOT, find_gguf

STDLIB = Path(os.__file__).resolve().parent
MAX_TOKENS = 48
# The system prompt `dsv4 ask` shipped before this benchmark (kept as a variant to compare).
DSV4_SYSTEM = (
    "You are dsv4, a helpful assistant for software developers. "
    "Answer the question accurately and concisely, using the provided files when there are any."
)
FILE_SYSTEM = (
    "You are dsv4, a helpful assistant for software developers. The user shows you files, then asks "
    "a question about them. Answer the question in a few sentences, using the files. Do not repeat the files."
)
INSTRUCTION = "Answer the question about the files above."


@dataclass(frozen=True)
class Question:
    sources: tuple[Path, ...]
    text: str
    expect: tuple[str, ...]   # keywords (identifiers, numbers) a right answer names
    need: int = 1             # how many of them make a full answer


def _q(sources: list[Path] | Path, text: str, expect: list[str], need: int = 1) -> Question:
    sources = sources if isinstance(sources, list) else [sources]
    return Question(tuple(sources), text, tuple(expect), need)


ENGINE_ERRORS = ["EngineError", "ModelNotFound", "ModelFormatError", "ContextOverflow", "FetchError"]
QUESTIONS = [
    # The two reported in issue #3's follow-up: chat echoed the pack, ask invented errors.
    _q(ROOT / "engine/errors.py", "Name one error class in this file.", ENGINE_ERRORS),
    _q(ROOT / "engine/errors.py", "Which error classes does this file define?", ENGINE_ERRORS, need=5),
    _q(ROOT / "engine/errors.py", "Which class do the other error classes inherit from?", ["EngineError"]),
    _q(ROOT / "ingest/errors.py", "What is the base class of SourceNotFound?", ["IngestError"]),
    _q(ROOT / "engine/paths.py", "Which function returns the directory where models are stored?", ["models_dir"]),
    _q(ROOT / "engine/paths.py", "Which environment variable relocates the home directory?", ["DSV4_HOME"]),
    _q(ROOT / "dsv4cli/inputs.py", "Which function splits the arguments into the sources and the question?",
       ["resolve_ask_arguments"]),
    _q(ROOT / "engine/sampling.py", "Which function keeps only the top-k and top-p logits?", ["filter_logits"]),
    _q(ROOT / "engine/events.py", "Name the classes defined in this file.",
       ["SamplingParams", "PrefillProgress", "TextDelta", "Usage", "Timings", "Done"], need=6),
    _q([ROOT / "engine/errors.py", ROOT / "engine/paths.py"], "Which file defines the function home_dir?",
       ["paths.py"]),
    _q(STDLIB / "bisect.py", "Which functions does this module define?",
       ["insort_right", "bisect_right", "insort_left", "bisect_left"], need=4),
    _q(STDLIB / "fnmatch.py", "Which function turns a shell pattern into a regular expression?", ["translate"]),
    _q(STDLIB / "fnmatch.py", "Which function compares a name with a pattern case-sensitively?", ["fnmatchcase"]),
    _q(STDLIB / "colorsys.py", "Which function converts HLS coordinates back to RGB?", ["hls_to_rgb"]),
    _q(STDLIB / "secrets.py", "How many bytes does token_bytes return when nbytes is None?",
       ["32", "DEFAULT_ENTROPY"]),
    _q(STDLIB / "getopt.py", "Which exception class does this module define?", ["GetoptError"]),
    _q(STDLIB / "genericpath.py", "Which function returns the longest common leading component of a list of paths?",
       ["commonprefix"]),
]


@dataclass(frozen=True)
class Layout:
    """How the pack and the question become chat messages (pack first, question last)."""

    format: str = "xml"          # the pack's format
    system: str = "dsv4"         # dsv4 (the CLI's until now) | files (says files come first) | none (model's own)
    tail: str = "bare"           # bare: the question | instr: an instruction line, then "Question: ..."
    placement: str = "same"      # same user message | split: a second user message | system: pack in the system message
    pack: str = "whole"          # whole: as `dsv4 pack` prints it | files: the file blocks only (no directory, no summary)

    @property
    def name(self) -> str:
        return f"{self.format}/{self.system}/{self.tail}/{self.placement}/{self.pack}"

    def messages(self, pack: str, question: str) -> list[dict[str, str]]:
        system = {"dsv4": DSV4_SYSTEM, "files": FILE_SYSTEM, "none": None}[self.system]
        tail = question if self.tail == "bare" else f"{INSTRUCTION}\n\nQuestion: {question}"
        if self.placement == "system":
            head = (system + "\n\n") if system else ""
            return [{"role": "system", "content": head + pack}, {"role": "user", "content": tail}]
        out = [{"role": "system", "content": system}] if system else []
        if self.placement == "split":
            return out + [{"role": "user", "content": pack}, {"role": "user", "content": tail}]
        return out + [{"role": "user", "content": pack + "\n\n" + tail}]


@dataclass
class Score:
    total: float = 0.0
    full: int = 0
    echoes: int = 0
    answered: int = 0
    seconds: float = 0.0

    def percent(self) -> float:
        return 100.0 * self.total / max(self.answered, 1)


def keyword_score(answer: str, question: Question) -> float:
    hits = sum(1 for word in question.expect if re.search(rf"(?<![\w.]){re.escape(word)}(?!\w)", answer, re.IGNORECASE))
    return min(hits, question.need) / question.need


_ECHO_PREFIX_CHARS = 40


def is_echo(answer: str, prompt_text: str) -> bool:
    """The answer copies the prompt back (a file, the pack's markup or its summary line)
    instead of answering. `prompt_text` is everything the model was shown but the question."""
    start = answer.lstrip()
    if start.startswith(("<file", "<directory", "<summary", "```", "## ", "=== ")):
        return True
    if len(start) >= _ECHO_PREFIX_CHARS and start[:_ECHO_PREFIX_CHARS] in prompt_text:
        return True  # it opens with a copied sentence ("The files above are a packed repository ...")
    lines = [line.strip() for line in answer.splitlines() if len(line.strip()) >= 12]
    copied = [line for line in lines if line in prompt_text]
    return len(copied) >= 3 and len(copied) * 2 >= len(lines)


class Bench:
    def __init__(self, gguf: Path, questions: list[Question], verbose: bool):
        import engine
        from dsv4cli.commands import ask

        self.model = engine.load(str(gguf))
        self.name = "mini"
        self.questions = questions
        self.verbose = verbose
        self.penalty = ask._DEFAULT_REPETITION_PENALTY["mini"]
        self._packs: dict[tuple[tuple[Path, ...], str], tuple[str, str]] = {}  # -> (whole, files only)
        self._answers: dict[tuple[int, ...], str] = {}  # the same prompt (greedy) is asked once

    def pack(self, sources: tuple[Path, ...], fmt: str, which: str = "whole") -> str:
        key = (sources, fmt)
        if key not in self._packs:
            import ingest
            from engine import paths

            result = ingest.pack([str(s) for s in sources], options=ingest.PackOptions(format=fmt),
                                 tokenizer=self.model.tokenizer, cache_dir=paths.cache_dir())
            self._packs[key] = (result.text, result.text[: result.stable_prefix_chars].rstrip("\n"))
        return self._packs[key][0 if which == "whole" else 1]

    def answer(self, messages: list[dict[str, str]]) -> str:
        from engine.events import Done, SamplingParams

        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, repetition_penalty=self.penalty)
        ids = tuple(self.model.tokenizer.render_chat(messages))
        if ids not in self._answers:
            events = self.model.stream(list(ids), params)
            self._answers[ids] = next((e.text for e in events if isinstance(e, Done)), "")
        return self._answers[ids]

    def score(self, label: str, build: Callable[[Question], list[dict[str, str]]]) -> Score:
        score = Score()
        started = time.perf_counter()
        for question in self.questions:
            messages = build(question)
            answer = self.answer(messages)
            shown = "\n".join(m["content"] for m in messages).replace(question.text, "")
            echo = is_echo(answer, shown)
            value = 0.0 if echo else keyword_score(answer, question)  # a copy of the file is no answer
            score.total += value
            score.full += value == 1.0
            score.echoes += echo
            score.answered += 1
            if self.verbose:
                brief = " ".join(answer.split())[:150]
                print(f"    {value:4.2f}{' ECHO' if echo else ''}  {question.text}  -> {brief}", file=sys.stderr)
        score.seconds = time.perf_counter() - started
        print(f"{label:<34} {score.percent():5.1f}%  {score.full:>2}/{score.answered} full  "
              f"{score.echoes:>2} echo  {score.seconds:5.0f} s", flush=True)
        return score

    def score_layout(self, layout: Layout) -> Score:
        return self.score(layout.name, lambda q: layout.messages(self.pack(q.sources, layout.format, layout.pack), q.text))

    def score_cli(self) -> None:
        """The layouts the CLI ships, built by the CLI's own code."""
        from dsv4cli.commands import ask, chat
        from dsv4cli.inputs import AskInputs

        def ask_prompt(q: Question) -> list[dict[str, str]]:
            inputs = AskInputs(tuple(str(s) for s in q.sources), q.text, None)
            return ask._messages(self.model, inputs, ask.AskOptions(model=self.name), self.name)

        def chat_first_turn(q: Question) -> list[dict[str, str]]:
            options = ask.AskOptions(model=self.name)
            inputs = AskInputs(tuple(str(s) for s in q.sources), "", None)
            budget = self.model.context_length - options.max_tokens - 256
            context = ask._pack(inputs, options, self.model.tokenizer, budget, self.model.context_length, self.name).text
            return chat.ChatSession(options.system, context).messages(q.text)

        self.score(f"dsv4 ask (default: {ask.DEFAULT_PACK_FORMAT})", ask_prompt)
        self.score("dsv4 chat, first turn", chat_first_turn)


def _key(score: Score) -> tuple[float, int]:
    return score.percent(), -score.echoes


def _best(scores: dict[Layout, Score]) -> Layout:
    return max(scores, key=lambda layout: _key(scores[layout]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", help="model file (default: the installed mini)")
    parser.add_argument("--questions", type=int, default=len(QUESTIONS), help="ask only the first N questions")
    parser.add_argument("--cli-only", action="store_true", help="score only the CLI's shipped layouts")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine a second thread mostly waits)")
    parser.add_argument("-v", "--verbose", action="store_true", help="every answer on stderr")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    gguf = find_gguf(args.gguf)  # in the real home, before DSV4_HOME moves
    with tempfile.TemporaryDirectory(prefix="dsv4-answer-quality-") as home:
        os.environ["DSV4_HOME"] = home  # the packs' caches stay out of the user's home
        bench = Bench(gguf, QUESTIONS[: args.questions], args.verbose)
        print(f"{len(bench.questions)} questions, greedy, max {MAX_TOKENS} tokens, "
              f"repetition penalty {bench.penalty}; layout = format/system/tail/placement/pack", flush=True)
        if not args.cli_only:
            print("stage 1: the pack format", flush=True)
            scores = {layout: bench.score_layout(layout) for layout in (Layout(fmt) for fmt in ("xml", "markdown", "plain"))}
            best = _best(scores)
            print(f"stage 2: one change at a time to {best.name}", flush=True)
            gains: dict[str, Layout] = {}  # per field, the best change that beat `best`
            for field, value in [("tail", "instr"), ("system", "files"), ("system", "none"),
                                 ("placement", "split"), ("placement", "system"), ("pack", "files")]:
                layout = replace(best, **{field: value})
                scores[layout] = bench.score_layout(layout)
                if _key(scores[layout]) > _key(scores[gains.get(field, best)]):
                    gains[field] = layout
            if len(gains) > 1:  # the changes that helped, together
                combined = replace(best, **{field: getattr(layout, field) for field, layout in gains.items()})
                print("stage 3: the changes that helped, together", flush=True)
                scores[combined] = bench.score_layout(combined)
            print(f"best layout: {_best(scores).name}", flush=True)
        print("the CLI's own prompts", flush=True)
        bench.score_cli()


if __name__ == "__main__":
    main()
