"""`dsv4 review`: review a git diff with the repository as context; findings by file.

The prompt is the repository's pack first (fitted by the same helper `dsv4 ask` uses), then
the diff and the instructions, so the pack is a prefix that stays cached from one review to
the next. The model is asked for one finding a line, `path:line: severity: message`; what
parses and names a real file is kept, everything else is ignored (a small model writes
prose, repeats the format, or invents paths: none of that becomes a finding).

Advisory: exit 0 whatever was found, unless --fail-on is met (exit 1). It never prompts,
and --timeout stops the model when the time is spent (what was complete by then is kept).
With `--backend URL` a server reviews; the --timeout budget bounds its HTTP request too.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import typer

from dsv4cli import backend as backends
from dsv4cli import render
from dsv4cli.commands import ask as ask_command
from dsv4cli.errors import EXIT_ERROR, EXIT_OK, EXIT_USAGE, CliError
from dsv4cli.inputs import AskInputs
from dsv4cli.remote import BackendTimeout

SEVERITIES = ("info", "warning", "error")  # in rising order
REVIEW_SYSTEM = (
    "You are dsv4 review, a careful code reviewer. You are given a repository and then a diff of "
    "changes to it. Report real problems that the changes introduce: bugs, security issues, missed "
    "edge cases, wrong documentation. Do not praise, summarise or restate the diff."
)
FORMAT_EXAMPLE = "path/to/file.ext:12: error: what is wrong and why"
NO_FINDINGS = "no findings"
REVIEW_INSTRUCTIONS = (
    "Report each problem on its own line, in exactly this format:\n"
    f"{FORMAT_EXAMPLE}\n"
    "where the path is the file's path as in the diff, the number is a line of the new file, and "
    "the severity is error, warning or info. Write nothing else. "
    f"If there is no problem, write only: {NO_FINDINGS}"
)
_SEVERITY_WORDS = {
    "error": "error", "err": "error", "critical": "error", "bug": "error", "high": "error",
    "warning": "warning", "warn": "warning", "medium": "warning",
    "info": "info", "note": "info", "nit": "info", "suggestion": "info", "style": "info", "low": "info",
}
_FINDING = re.compile(
    r"""^\s*(?:[-*+•]|\d+[.)])?\s*        # a list marker
        `?(?P<path>[^\s:`'"]+?)`?          # the path, maybe in backticks
        :(?P<line>\d+)(?:[:-]\d+)?         # :line, maybe :column or a range
        \s*:?\s*[\[(]?(?P<severity>[A-Za-z]+)[\])]?
        \s*[:\-–—]\s*(?P<message>\S.*?)\s*$""",
    re.VERBOSE,
)
_DIFF_PATH = re.compile(r"^\+\+\+ b/(?P<path>.+?)\t?$|^diff --git a/.+? b/(?P<path2>.+)$")
_NO_COMMIT_OPTIONS = ("--no-color", "--no-ext-diff")
# A socket timeout set to the time left fires at the deadline, give or take the scheduler.
_DEADLINE_SLACK_S = 0.05


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    severity: str
    message: str


@dataclass(frozen=True)
class DiffToReview:
    root: Path
    scope: str            # "staged changes", "uncommitted changes", "A..B"
    text: str
    files: tuple[str, ...]


# ---------------------------------------------------------------- the diff


def read_diff(start: Path, *, staged: bool, range_spec: str | None) -> DiffToReview:
    import git

    try:
        repo = git.Repo(start, search_parent_directories=True)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        raise CliError(f"not a git repository: {start}", "run dsv4 review inside a git repository") from None
    if repo.bare or repo.working_tree_dir is None:
        raise CliError(f"{repo.git_dir} is a bare repository", "run dsv4 review in a working tree")
    root = Path(repo.working_tree_dir)
    try:
        if range_spec is not None:
            if ".." not in range_spec:
                raise CliError(f"--range {range_spec!r} is not A..B", "give two commits: --range main..HEAD",
                               exit_code=EXIT_USAGE)
            scope, text = range_spec, repo.git.diff(range_spec, *_NO_COMMIT_OPTIONS)
        elif staged:
            scope, text = "staged changes", repo.git.diff("--cached", *_NO_COMMIT_OPTIONS)
        else:
            # Before the first commit there is no HEAD: compare with the empty tree.
            base = "HEAD" if repo.head.is_valid() else repo.git.hash_object("-t", "tree", "/dev/null")
            scope, text = "uncommitted changes", repo.git.diff(base, *_NO_COMMIT_OPTIONS)
    except git.GitCommandError as exc:
        detail = " ".join(str(exc.stderr or exc).replace("stderr:", "").split()).strip("' ")
        raise CliError(f"git diff failed: {detail}", "check the --range commits exist (git log --oneline)") from None
    text = text + "\n" if text and not text.endswith("\n") else text
    return DiffToReview(root, scope, text, diff_files(text))


def diff_files(diff: str) -> tuple[str, ...]:
    """The new-side paths a diff touches, in diff order."""
    seen: dict[str, None] = {}
    for line in diff.splitlines():
        match = _DIFF_PATH.match(line)
        if match:
            path = match.group("path") or match.group("path2")
            seen.setdefault(path.strip('"'), None)
    return tuple(seen)


# ---------------------------------------------------------------- findings


def parse_findings(text: str, *, known_paths: Callable[[str], str | None]) -> list[Finding]:
    """Findings from the model's answer: lines in the agreed format whose path `known_paths`
    recognises (it returns the path as the repository spells it, or None). Duplicates and
    the format's own example are dropped; nothing is inferred from prose."""
    findings: list[Finding] = []
    seen: set[Finding] = set()
    for raw in text.splitlines():
        line = raw.replace("**", "").strip()
        if not line or line.strip("` ") == FORMAT_EXAMPLE:
            continue
        match = _FINDING.match(line)
        if not match:
            continue
        severity = _SEVERITY_WORDS.get(match.group("severity").lower())
        number = int(match.group("line"))
        path = known_paths(match.group("path"))
        if severity is None or number < 1 or path is None:
            continue
        finding = Finding(path, number, severity, match.group("message").strip("` "))
        if finding not in seen:
            seen.add(finding)
            findings.append(finding)
    return findings


def path_resolver(root: Path, changed: tuple[str, ...]) -> Callable[[str], str | None]:
    """Accept a path the diff touches or a file in the working tree (not outside it); `a/`,
    `b/` and `./` prefixes as diffs and models write them are tolerated."""
    resolved_root = root.resolve()

    def known(path: str) -> str | None:
        candidates = [path]
        for prefix in ("./", "a/", "b/"):
            if path.startswith(prefix):
                candidates.append(path[len(prefix):])
        for candidate in candidates:
            if candidate in changed:
                return candidate
        for candidate in candidates:
            full = (root / candidate).resolve()
            if full.is_file() and full.is_relative_to(resolved_root) and ".git" not in full.relative_to(resolved_root).parts:
                return full.relative_to(resolved_root).as_posix()
        return None

    return known


def severity_met(findings: list[Finding], fail_on: str | None) -> list[Finding]:
    if fail_on is None:
        return []
    threshold = SEVERITIES.index(fail_on)
    return [f for f in findings if SEVERITIES.index(f.severity) >= threshold]


def group_by_file(findings: list[Finding], order: tuple[str, ...]) -> dict[str, list[Finding]]:
    """Files in diff order (others after, by name); findings by line, most severe first."""
    rank = {path: index for index, path in enumerate(order)}
    groups: dict[str, list[Finding]] = {}
    for finding in sorted(findings, key=lambda f: (rank.get(f.path, len(rank)), f.path, f.line,
                                                  -SEVERITIES.index(f.severity))):
        groups.setdefault(finding.path, []).append(finding)
    return groups


# ---------------------------------------------------------------- the command


@dataclass(frozen=True)
class ReviewOptions:
    staged: bool = False
    range_spec: str | None = None
    fail_on: str | None = None
    timeout: float | None = None
    model: str = ask_command.DEFAULT_MODEL
    max_tokens: int = 512
    json_output: bool = False
    log: bool = True
    cache: bool = True
    cache_read_only: bool = False
    backend: str | None = None  # an OpenAI-compatible /v1 URL reviews instead of the embedded engine
    pack_format: str = ask_command.DEFAULT_PACK_FORMAT


def register(app: typer.Typer) -> None:
    @app.command("review")
    def review(
        staged: bool = typer.Option(False, "--staged", "--cached", help="Review the staged changes (for a pre-commit hook)."),
        range_spec: str = typer.Option(None, "--range", metavar="A..B", help="Review the changes between two commits."),
        fail_on: str = typer.Option(None, "--fail-on", metavar="info|warning|error",
                                    help="Exit 1 when a finding is this severe or more (default: never)."),
        timeout: float = typer.Option(None, "--timeout", min=0.0, metavar="SECONDS",
                                      help="Stop the model after this long (the review so far is kept)."),
        model: str = typer.Option(ask_command.DEFAULT_MODEL, "--model", "-m", envvar="DSV4_MODEL",
                                  help="Alias (mini, flash, pro) or path."),
        max_tokens: int = typer.Option(512, "--max-tokens", min=1, help="Longest review, in tokens."),
        pack_format: str = ask_command.format_option(),
        json_output: bool = typer.Option(False, "--json", help="Print one JSON object (findings, usage)."),
        no_log: bool = typer.Option(False, "--no-log", help="Do not keep this review in the conversation log."),
        no_cache: bool = ask_command.no_cache_option(),
        cache_ro: bool = ask_command.cache_ro_option(),
        backend: str = ask_command.backend_option("review with"),
    ) -> None:
        """Review a diff (uncommitted changes by default) with the repository as context.

        Prints findings grouped by file. Exits 0 (advisory) unless --fail-on is met.
        """
        if staged and range_spec is not None:
            raise CliError("--staged and --range cannot be used together", "see 'dsv4 review --help'",
                           exit_code=EXIT_USAGE)
        if fail_on is not None and fail_on.lower() not in SEVERITIES:
            raise CliError(f"--fail-on must be one of {', '.join(SEVERITIES)}, not {fail_on!r}",
                           "see 'dsv4 review --help'", exit_code=EXIT_USAGE)
        options = ReviewOptions(staged=staged, range_spec=range_spec, fail_on=fail_on.lower() if fail_on else None,
                                timeout=timeout, model=model, max_tokens=max_tokens, json_output=json_output,
                                log=not no_log, cache=not no_cache, cache_read_only=cache_ro, backend=backend,
                                pack_format=pack_format)
        code = run_review(options)
        if code != EXIT_OK:
            raise typer.Exit(code)


def run_review(options: ReviewOptions, *, clock: Callable[[], float] = time.monotonic) -> int:
    ask_command.check_pack_format(options.pack_format, "review")
    started = clock()
    deadline = None if options.timeout is None else started + options.timeout
    diff = read_diff(Path.cwd(), staged=options.staged, range_spec=options.range_spec)
    if not diff.text.strip():
        nothing = diff.scope if diff.scope.endswith(" changes") else f"changes in {diff.scope}"
        render.note(f"nothing to review: no {nothing}")
        return EXIT_OK

    # A server's requests run on time.monotonic(); `clock` may be a test's.
    http_deadline = None if deadline is None else time.monotonic() + max(0.0, deadline - clock())
    url = backends.backend_url(options.backend)
    try:
        backend = backends.open_backend(options.model, url, deadline=http_deadline)
    except BackendTimeout:
        if not _budget_spent(http_deadline):
            raise
        render.note(f"the review stopped at the --timeout of {options.timeout:g} s before {url} listed its models")
        if options.json_output:
            print(_json_report(diff, options.model, [], [], options, None, True), flush=True)
        return EXIT_OK
    name, model = backend.name, backend.model
    question = _review_request(diff)
    messages = _fit_messages(model, name, diff, question, options)
    params = _sampling(name, options.max_tokens)

    timed_out = False

    def out_of_time() -> bool:
        return deadline is not None and clock() >= deadline

    view = render.AnswerView("json", name)  # "json": shows only the status line, prints nothing
    if out_of_time():
        timed_out = True
    else:
        with view:
            timed_out = _review(backend, view, messages, params, options, http_deadline, out_of_time)
    done = view.done
    timed_out = timed_out or (done is not None and done.finish_reason == "cancelled")
    answer = view.text
    if timed_out and not answer.endswith("\n"):
        answer = answer.rpartition("\n")[0]  # an unfinished last line may be a truncated finding
    findings = parse_findings(answer, known_paths=path_resolver(diff.root, diff.files))
    failing = severity_met(findings, options.fail_on)

    if options.log:
        title = f"review of {diff.scope}: {', '.join(diff.files)}"
        _log(name, title, messages, question, view.text, done, clock() - started)
    if options.json_output:
        print(_json_report(diff, name, findings, failing, options, done, timed_out), flush=True)
    else:
        _print_report(diff, name, findings)
    cache_report = done.extra.get("cache") if done is not None else None
    if cache_report:
        from rich.markup import escape

        from dsv4cli.console import warn

        for warning in cache_report.get("warnings", []):
            warn(escape(warning))
    if timed_out:
        render.note(f"the review stopped at the --timeout of {options.timeout:g} s; findings complete by then are shown")
    elif done is not None and done.finish_reason == "length":
        render.note(f"the review stopped at --max-tokens {options.max_tokens}")
    if failing:
        from dsv4cli.console import err

        err().print(f"dsv4 review: {len(failing)} finding(s) at or above {options.fail_on} (--fail-on {options.fail_on})",
                    markup=False, highlight=False)
        return EXIT_ERROR
    return EXIT_OK


def _review_request(diff: DiffToReview) -> str:
    """The tail of the prompt: the diff, then the instructions (nearest to the answer)."""
    fence = "```"
    while fence in diff.text:
        fence += "`"
    return f"Review this diff ({diff.scope}):\n\n{fence}diff\n{diff.text}{fence}\n\n{REVIEW_INSTRUCTIONS}"


def _fit_messages(model: Any, name: str, diff: DiffToReview, question: str, options: ReviewOptions) -> list[dict[str, str]]:
    ask_options = ask_command.AskOptions(model=options.model, system=REVIEW_SYSTEM, max_tokens=options.max_tokens,
                                         pack_format=options.pack_format)
    tokenizer, context = model.tokenizer, model.context_length
    alone = tokenizer.render_chat([{"role": "system", "content": REVIEW_SYSTEM}, {"role": "user", "content": question}])
    if len(alone) + options.max_tokens > context:
        raise CliError(
            f"the diff is too long to review: with the instructions it takes {len(alone):,} tokens and "
            f"--max-tokens {options.max_tokens:,} more, but {name} holds {context:,}",
            "review fewer changes at a time (stage part of them, or a shorter --range)",
        )
    try:
        return ask_command._messages(model, AskInputs((str(diff.root),), question, None), ask_options, name)
    except CliError as exc:
        if not str(exc).startswith("context too long"):
            raise
        render.note("the repository does not fit beside the diff; reviewing the diff alone")
        return ask_command._messages(model, AskInputs((), question, None), ask_options, name)


def _review(backend: backends.Backend, view: render.AnswerView, messages: list[dict[str, str]], params: Any,
            options: ReviewOptions, http_deadline: float | None, out_of_time: Callable[[], bool]) -> bool:
    """Stream the review into `view` (through the prefix cache locally, so the repository's
    pack is read once); True when the time budget ran out first."""
    cache = backends.CacheOptions(enabled=options.cache, read_only=options.cache_read_only)
    events = backend.events(messages, params, cache=cache, cancel=out_of_time, deadline=http_deadline)
    try:
        with contextlib.closing(events) if hasattr(events, "close") else contextlib.nullcontext():
            for event in events:
                view.handle(event)
                # A model that does not look at `cancel` is stopped here instead.
                if out_of_time():
                    return True
    except BackendTimeout:
        # The budget, not the server's own limit, ended the request: like a local model
        # stopped by --timeout, what arrived is kept. Otherwise it is an error.
        if not _budget_spent(http_deadline):
            raise
        return True
    return False


def _budget_spent(http_deadline: float | None) -> bool:
    return http_deadline is not None and time.monotonic() >= http_deadline - _DEADLINE_SLACK_S


def _sampling(name: str, max_tokens: int) -> Any:
    from engine.events import SamplingParams

    # Greedy: the same diff gets the same review; small models need the repetition penalty.
    penalty = ask_command._DEFAULT_REPETITION_PENALTY.get(name, 1.0)
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, repetition_penalty=penalty)


def _print_report(diff: DiffToReview, name: str, findings: list[Finding]) -> None:
    from rich.text import Text

    out = render.stdout_console()
    changed = f"{len(diff.files)} file{'s' if len(diff.files) != 1 else ''} changed"
    out.print(Text(f"dsv4 review · {diff.scope} · {changed} · model {name}", style="bold"), soft_wrap=True)
    if not findings:
        out.print("no findings", markup=False, highlight=False)
        return
    styles = {"error": "bold red", "warning": "yellow", "info": "cyan"}
    groups = group_by_file(findings, diff.files)
    for path, items in groups.items():
        out.print(Text(path, style="bold"), soft_wrap=True)
        width = max(len(str(f.line)) for f in items)
        for finding in items:
            line = Text(f"  {finding.line:>{width}}  ")
            line.append(f"{finding.severity:<7}", style=styles[finding.severity])
            line.append(f"  {finding.message}")
            out.print(line, soft_wrap=True)
    counts = {s: sum(1 for f in findings if f.severity == s) for s in reversed(SEVERITIES)}
    summary = ", ".join(f"{n} {s}{'s' if n != 1 else ''}" for s, n in counts.items() if n)
    out.print(f"{len(findings)} finding{'s' if len(findings) != 1 else ''} in {len(groups)} "
              f"file{'s' if len(groups) != 1 else ''}: {summary}", markup=False, highlight=False)


def _json_report(diff: DiffToReview, name: str, findings: list[Finding], failing: list[Finding],
                 options: ReviewOptions, done: Any, timed_out: bool) -> str:
    usage = done.usage if done is not None else None
    payload = {
        "scope": diff.scope,
        "model": name,
        "files": list(diff.files),
        "findings": [asdict(f) for f in findings],
        "fail_on": options.fail_on,
        "failed": bool(failing),
        "timed_out": timed_out,
        "finish_reason": done.finish_reason if done is not None else "cancelled",
        "usage": {
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "cached_tokens": usage.cached_tokens if usage else 0,
            "completion_tokens": usage.completion_tokens if usage else 0,
        },
        "cache": done.extra.get("cache") if done is not None else None,
    }
    return json.dumps(payload, ensure_ascii=False)


def _log(name: str, title: str, messages: list[dict[str, str]], question: str, answer: str, done: Any,
         duration_s: float) -> None:
    from dsv4cli import logs

    if logs.logging_disabled():
        return
    context = ask_command.context_of(messages, question)
    usage, timings = (done.usage, done.timings) if done is not None else (None, None)
    exchange = logs.Exchange(
        model=name, question=question, answer=answer, system=REVIEW_SYSTEM, context=context or None,
        finish_reason=done.finish_reason if done is not None else "cancelled",
        prompt_tokens=usage.prompt_tokens if usage else None, cached_tokens=usage.cached_tokens if usage else None,
        completion_tokens=usage.completion_tokens if usage else None, ttft_s=timings.ttft_s if timings else None,
        prefill_s=timings.prefill_s if timings else None, decode_s=timings.decode_s if timings else None,
        duration_s=duration_s,
    )
    try:
        with logs.LogStore() as store:
            store.log(exchange, command="review", title=title)
    except CliError as exc:
        # The review itself succeeded: a broken log must not fail a commit.
        from rich.markup import escape

        from dsv4cli.console import warn

        warn(escape(f"not logged: {exc}"))
