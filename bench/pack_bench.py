"""Benchmark `dsv4 pack` against repomix and files-to-prompt on one real repository.

    python bench/pack_bench.py [--runs 3] [--no-write]

What it does (see bench/README.md for the corpus):
  1. builds the corpus once under bench/.work/corpus: a git repository made from pinned PyPI
     sdists, committed in a fixed sequence with fixed dates, so its history is real git history
     and every machine gets the same bytes and the same commits;
  2. times, in one run, medians of several runs each:
       dsv4 cold   fresh DSV4_HOME per run (no token, history or tokenizer cache), exact counts
       dsv4 warm   the same home again: an unchanged repository re-packed
       repomix     its default XML output with its token counting (o200k)
       files-to-prompt  no token counting at all
  3. the prefix-stability experiment for dsv4 and repomix on a scratch copy: add one small file
     at a path that sorts first; then `git commit` it (no content change);
  4. prints the figures and writes them into bench/RESULTS.md between its markers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = BENCH / ".work"
CORPUS = WORK / "corpus"
SDISTS = WORK / "sdists"
PEERS = BENCH / ".peers"
RESULTS = BENCH / "RESULTS.md"
PYCACHE = WORK / "pycache"
START, END = "<!-- pack_bench:start -->", "<!-- pack_bench:end -->"

# (commit message, sdist, directory in the repository). A later version of a package replaces
# its directory, so files appear, change and disappear across commits as in a real history.
CORPUS_STEPS = [
    ("fastapi 0.115.6", "fastapi==0.115.6", "fastapi"),
    ("typer 0.15.1", "typer==0.15.1", "typer"),
    ("fastapi 0.135.0", "fastapi==0.135.0", "fastapi"),
    ("starlette 0.41.3", "starlette==0.41.3", "starlette"),
    ("pydantic 2.10.3", "pydantic==2.10.3", "pydantic"),
    ("click 8.1.7", "click==8.1.7", "click"),
    ("httpx 0.28.1", "httpx==0.28.1", "httpx"),
    ("black 24.10.0", "black==24.10.0", "black"),
    ("fastapi 0.165.0", "fastapi==0.165.0", "fastapi"),
]
CORPUS_VERSION = "1"
_GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.com",
    "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.com",
    "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
}


def git(root: Path, *args: str, date: int | None = None) -> str:
    env = {**os.environ, **_GIT_IDENTITY}
    if date is not None:
        env["GIT_AUTHOR_DATE"] = env["GIT_COMMITTER_DATE"] = f"{date} +0000"
    return subprocess.run(["git", *args], cwd=root, env=env, check=True, capture_output=True, text=True).stdout


# ------------------------------------------------------------------------------ corpus


def build_corpus() -> Path:
    marker = CORPUS / ".git" / "dsv4-bench-corpus"
    if marker.is_file() and marker.read_text() == CORPUS_VERSION:
        return CORPUS
    SDISTS.mkdir(parents=True, exist_ok=True)
    if CORPUS.exists():
        shutil.rmtree(CORPUS)
    CORPUS.mkdir(parents=True)
    git(CORPUS, "init", "-q", "-b", "main")
    for step, (message, requirement, directory) in enumerate(CORPUS_STEPS):
        archive = _sdist(requirement)
        target = CORPUS / directory
        if target.exists():
            shutil.rmtree(target)
        _extract(archive, target)
        git(CORPUS, "add", "-A")
        git(CORPUS, "commit", "-q", "-m", message, date=1_700_000_000 + step * 86_400)
    marker.write_text(CORPUS_VERSION)
    return CORPUS


def _sdist(requirement: str) -> Path:
    name, version = requirement.split("==")
    found = sorted(SDISTS.glob(f"{name}-{version}.tar.gz"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        requirement, "-d", str(SDISTS)], check=True)
        found = sorted(SDISTS.glob(f"{name}-{version}.tar.gz"))
    return found[0]


def _extract(archive: Path, target: Path) -> None:
    """The sdist's files without its top-level `name-version/` folder."""
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/", 1)
            if len(parts) < 2 or not parts[1] or not member.isfile():
                continue
            path = target / parts[1]
            path.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as source, open(path, "wb") as sink:
                shutil.copyfileobj(source, sink)


def corpus_stats(root: Path) -> tuple[int, int]:
    files = git(root, "ls-files", "-z").split("\0")
    files = [f for f in files if f]
    return len(files), sum((root / f).stat().st_size for f in files)


# ------------------------------------------------------------------------------ tools


def find_model() -> Path:
    override = os.environ.get("DSV4_BENCH_MODEL")
    if override:
        return Path(override)
    sys.path.insert(0, str(REPO))
    from engine import paths

    candidate = paths.models_dir() / "mini" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not candidate.is_file():
        sys.exit(f"no tokenizer model at {candidate}: run `dsv4 pull mini` first (or set DSV4_BENCH_MODEL)")
    return candidate


def python_env() -> dict[str, str]:
    """Python tools run as installed: with bytecode caches (pip writes them at install time).
    A PYTHONDONTWRITEBYTECODE inherited from the shell would make every run compile every
    module from source; the caches go to bench/.work/pycache, not into the tree."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    return env


def run_dsv4(root: Path, home: Path, model: Path, out: Path, summary: Path | None = None,
             cpu: list[float] | None = None) -> float:
    command = [sys.executable, "-m", "dsv4cli.app", "pack", str(root), "--model", str(model), "-o", str(out)]
    if summary is not None:
        command += ["--summary-json", str(summary)]
    return _timed(command, cwd=root, env={**python_env(), "DSV4_HOME": str(home), "NO_COLOR": "1"}, cpu=cpu)


def repomix_command() -> list[str] | None:
    binary = PEERS / "node_modules" / ".bin" / "repomix"
    return [str(binary)] if binary.exists() else None


def run_repomix(root: Path, out: Path, cpu: list[float] | None = None) -> float:
    return _timed([*repomix_command(), str(root), "-o", str(out), "--style", "xml", "--quiet"], cwd=root, cpu=cpu)


def run_files_to_prompt(root: Path, out: Path, cpu: list[float] | None = None) -> float:
    binary = shutil.which("files-to-prompt")
    command = [binary] if binary else [sys.executable, "-m", "files_to_prompt"]
    before = _children_cpu()
    started = time.perf_counter()
    with open(out, "wb") as sink:
        subprocess.run([*command, str(root)], cwd=root, stdout=sink, stderr=subprocess.DEVNULL, check=True,
                       env=python_env())
    elapsed = time.perf_counter() - started
    if cpu is not None:
        cpu.append(_children_cpu() - before)
    return elapsed


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(command: list[str], cwd: Path, env: dict | None = None, cpu: list[float] | None = None) -> float:
    """Wall time of the whole process; its CPU time (user + system, all threads) goes to `cpu`."""
    before = _children_cpu()
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env if env is not None else dict(os.environ), capture_output=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed: {result.stderr.decode(errors='replace')[-2000:]}")
    if cpu is not None:
        cpu.append(_children_cpu() - before)
    return elapsed


def tool_version(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60).stdout.strip().splitlines()[-1]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"


# ------------------------------------------------------------------------------ experiments


def shared_prefix_share(old: bytes, new: bytes) -> float:
    return len(os.path.commonprefix([old, new])) / len(old) if old else 1.0


def stability(tool: str, scratch: Path, run) -> dict[str, float]:
    """Prefix kept after adding an early-sorting file, and after committing it."""
    outputs = scratch.parent / f"{tool}-outputs"
    outputs.mkdir(exist_ok=True)
    base, added, committed = (outputs / name for name in ("base", "added", "committed"))
    run(scratch, base)
    new_file = scratch / "0000_new.py"
    new_file.write_text("x = 1\n")
    run(scratch, added)
    git(scratch, "add", "0000_new.py")
    git(scratch, "commit", "-q", "-m", "add a small file", date=1_800_000_000)
    run(scratch, committed)
    # leave the scratch repository as it was for the next tool
    git(scratch, "reset", "-q", "--hard", "HEAD~1")
    return {
        "add_early_file": shared_prefix_share(base.read_bytes(), added.read_bytes()),
        "commit_no_change": shared_prefix_share(added.read_bytes(), committed.read_bytes()),
    }


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="rounds; each runs every tool once (dsv4 warm twice)")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args()

    total_started = time.perf_counter()
    model = find_model()
    corpus = build_corpus()
    n_files, n_bytes = corpus_stats(corpus)
    has_repomix = repomix_command() is not None
    if not has_repomix:
        print("repomix not found: npm install --prefix bench/.peers repomix", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="dsv4-bench-") as scratch_dir:
        scratch_root = Path(scratch_dir)
        out = scratch_root / "out"
        tools = ("dsv4 cold", "dsv4 cold counts", "dsv4 warm", "repomix", "files-to-prompt")
        times: dict[str, list[float]] = {tool: [] for tool in tools}
        cpu: dict[str, list[float]] = {tool: [] for tool in tools}

        warm_home = scratch_root / "home-warm"
        summary = scratch_root / "summary.json"
        # Rounds interleave the tools, so a neighbour's load on the machine hits all of them alike.
        load_before = os.getloadavg()
        loads = [load_before[0]]
        dsv4_out = scratch_root / "dsv4-out"
        run_dsv4(corpus, warm_home, model, dsv4_out, summary)      # fill the warm home's caches (and bytecode)
        if has_repomix:
            run_repomix(corpus, out)                               # the same first-run warm-up for the peers
        run_files_to_prompt(corpus, out)
        for run in range(args.runs):
            home = scratch_root / f"home-cold-{run}"
            times["dsv4 cold"].append(run_dsv4(corpus, home, model, out, cpu=cpu["dsv4 cold"]))
            shutil.rmtree(home)
            counts_home = scratch_root / "home-counts"
            if run == 0:
                run_dsv4(corpus, counts_home, model, out)         # the tokenizer's rank table, as after a pull
            # the pack's own caches go; the tokenizer's rank table stays
            for cache in ("tokens", "history", "conversions", "packs"):
                shutil.rmtree(counts_home / "cache" / cache, ignore_errors=True)
            times["dsv4 cold counts"].append(run_dsv4(corpus, counts_home, model, out, cpu=cpu["dsv4 cold counts"]))
            for _ in range(2):
                times["dsv4 warm"].append(run_dsv4(corpus, warm_home, model, dsv4_out, cpu=cpu["dsv4 warm"]))
            if has_repomix:
                times["repomix"].append(run_repomix(corpus, out, cpu=cpu["repomix"]))
            times["files-to-prompt"].append(run_files_to_prompt(corpus, out, cpu=cpu["files-to-prompt"]))
            loads.append(os.getloadavg()[0])
        load_after = os.getloadavg()
        counter = dsv4_counter(model, scratch_root / "home-counter")
        ours = json.loads(summary.read_text())
        dsv4_bytes = dsv4_out.stat().st_size

        scratch = scratch_root / "stability" / "repo"
        shutil.copytree(corpus, scratch, symlinks=True)
        stable_home = scratch_root / "home-stability"
        results_stability = {
            "dsv4": stability("dsv4", scratch, lambda root, target: run_dsv4(root, stable_home, model, target)),
        }
        if has_repomix:
            results_stability["repomix"] = stability("repomix", scratch, run_repomix)

    medians = {tool: median(values) for tool, values in times.items() if values}
    statuses = {s: sum(1 for f in ours["files"] if f["status"] == s) for s in ("full", "reduced", "listed")}
    report = {
        "machine": machine(),
        "versions": {
            "dsv4": _dsv4_version(),
            "repomix": tool_version([*repomix_command(), "--version"]) if has_repomix else None,
            "files-to-prompt": tool_version([shutil.which("files-to-prompt") or "files-to-prompt", "--version"]),
        },
        "corpus": {"files": n_files, "bytes": n_bytes, "head": git(corpus, "rev-parse", "HEAD").strip()},
        "dsv4_pack": {"tokens": ours["total_tokens"], "tokenizer": ours["tokenizer"], "bytes": dsv4_bytes,
                      "counter": counter, **statuses},
        "runs": times,
        "medians_s": medians,
        "cpu_s": cpu,
        "cpu_medians_s": {tool: median(values) for tool, values in cpu.items() if values},
        "stability": results_stability,
        "bench_seconds": time.perf_counter() - total_started,
        "load_average": {"before": load_before, "after": load_after, "per_round_1min": loads},
    }
    (WORK / "results.json").write_text(json.dumps(report, indent=2))
    section = render_markdown(report)
    print(section)
    if not args.no_write:
        write_results(section)


def dsv4_counter(model: Path, home: Path) -> str:
    """What counted dsv4's tokens: its C counter, or tiktoken where the extension was not built."""
    code = "import sys; from engine.tokenizer import Tokenizer; print(Tokenizer.from_gguf(sys.argv[1]).counter_name)"
    result = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True, cwd=REPO, check=False,
                            env={**python_env(), "DSV4_HOME": str(home)})
    return {"c": "C counter, engine/_bpecount.c", "tiktoken": "tiktoken"}.get(result.stdout.strip(), "?")


def _dsv4_version() -> str:
    return subprocess.run([sys.executable, "-m", "dsv4cli.app", "--version"], capture_output=True, text=True,
                          cwd=REPO).stdout.strip()


def machine() -> dict[str, str]:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.0f} GiB"
    except OSError:
        pass
    return {"cpu": cpu, "cores": str(os.cpu_count()), "memory": memory, "os": platform.platform(),
            "python": platform.python_version(),
            "node": tool_version(["node", "--version"]), "git": tool_version(["git", "--version"])}


def render_markdown(report: dict) -> str:
    m, med, corpus, pack = report["machine"], report["medians_s"], report["corpus"], report["dsv4_pack"]
    cpu = report.get("cpu_medians_s", {})
    rows = []
    for tool in ("dsv4 cold", "dsv4 cold counts", "dsv4 warm", "repomix", "files-to-prompt"):
        if tool not in med:
            continue
        runs = ", ".join(f"{t:.2f}" for t in report["runs"][tool])
        versus = f"{med['repomix'] / med[tool]:.1f}x" if "repomix" in med else "-"
        cpu_time = f"{cpu[tool]:.2f} s" if tool in cpu else "-"
        rows.append(f"| {tool} | {med[tool]:.2f} s | {versus} | {cpu_time} | {runs} |")
    stability_rows = []
    for tool, figures in report["stability"].items():
        stability_rows.append(
            f"| {tool} | {figures['add_early_file'] * 100:.2f}% | {figures['commit_no_change'] * 100:.2f}% |"
        )
    v = report["versions"]
    targets = []
    if "repomix" in med:
        cold, warm = med["repomix"] / med["dsv4 cold"], med["repomix"] / med["dsv4 warm"]
        targets += [
            f"- cold pack at least 3x faster than repomix: {cold:.1f}x, {'met' if cold >= 3 else 'NOT met'}",
            f"- warm re-pack at least 10x faster than repomix: {warm:.1f}x, {'met' if warm >= 10 else 'NOT met'}",
        ]
    targets.append(f"- warm re-pack under 1 s for about a million tokens: {med['dsv4 warm']:.2f} s for "
                   f"{pack['tokens'] / 1e6:.1f}M tokens, {'met' if med['dsv4 warm'] < 1 else 'NOT met'}")
    ours = report["stability"]["dsv4"]
    targets += [
        f"- at least 95% kept after adding a file that sorts first: {ours['add_early_file'] * 100:.2f}%, "
        f"{'met' if ours['add_early_file'] >= 0.95 else 'NOT met'}",
        f"- byte-identical after a commit that changes no content: "
        f"{'met' if ours['commit_no_change'] == 1.0 else 'NOT met'}",
    ]
    return "\n".join([
        START,
        "## `dsv4 pack` against repomix and files-to-prompt",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}; {m['os']}; Python {m['python']}, "
        f"node {m['node']}, {m['git']}.",
        f"Versions: {v['dsv4']}, repomix {v['repomix']}, files-to-prompt {v['files-to-prompt']}.",
        f"Corpus: {corpus['files']:,} files, {corpus['bytes'] / 1e6:.1f} MB, HEAD {corpus['head'][:12]} "
        "(see bench/README.md).",
        f"dsv4's pack: {pack['tokens']:,} tokens ({pack['tokenizer']}, counted by {pack.get('counter', '?')}), "
        f"{pack['bytes'] / 1e6:.1f} MB; "
        f"{pack['full']} files full, {pack['listed']} listed (binary, noise, over the size cap).",
        "",
        "| tool | median | repomix / tool | CPU (median) | runs (s) |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "Prefix kept (share of the old output that is a byte-identical prefix of the new one):",
        "",
        "| tool | add `0000_new.py` (6 bytes) | then `git commit` it |",
        "|---|---|---|",
        *stability_rows,
        "",
        "Targets (issue 2):",
        "",
        *targets,
        "",
        f"Whole benchmark: {report['bench_seconds']:.0f} s; load average (1 min) "
        f"{report['load_average']['before'][0]:.1f} before the timed rounds, "
        f"{report['load_average']['after'][0]:.1f} after, {max(report['load_average']['per_round_1min']):.1f} "
        f"at most (on {m['cores']} cores; above {m['cores']}, other work shared the machine). CPU is user + "
        "system time of the whole process, all threads. Raw figures: bench/.work/results.json. "
        "Where the time goes: bench/README.md.",
        END,
    ])


def write_results(section: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    if START in text and END in text:
        before, rest = text.split(START, 1)
        after = rest.split(END, 1)[1]
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
