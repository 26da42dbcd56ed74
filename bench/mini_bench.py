"""The embedded `mini` engine against llama.cpp (llama-cpp-python) on the same GGUF file.

    python bench/mini_bench.py quality [--modes fp32,bf16,int8,int4]
    python bench/mini_bench.py speed [--mode int4] [--threads 2] [--repeats 3]
    python bench/mini_bench.py decode [--threads 2] [--rounds 16]

quality: per weight mode, next-token argmax agreement with llama.cpp on the recorded
512-token text (tests/data/mini-llamacpp-textwrap.json; live llama.cpp too when installed)
and perplexity on a held-out text (the first 2,048 tokens of CPython's Lib/shlex.py).
speed: prefill tokens/s at 512 and 4,096 tokens of context, decode tokens/s after a
512-token prompt, and peak RSS for an 8k-token prompt, each engine in its own fresh process,
same threads, real text (Lib/argparse.py), flush-to-zero on. Medians of `--repeats` runs.
Also our load time: cold (empty DSV4_HOME: conversion plus writing the prepared-weights
cache) and warm (the cache in place).
decode: both engines in one process after the same 512-token prompt, alternating bursts of
16 greedy tokens, so that each pair of bursts sees the same background load; prints each
round and the median of the per-round ratios (a shared machine moves both engines' rates
by 2x and more between runs; this ratio moves far less).
Prints Markdown tables for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from _shared import find_gguf  # bench/ is on sys.path: it holds the script

ROOT = Path(__file__).resolve().parent.parent
RECORDED = ROOT / "tests" / "data" / "mini-llamacpp-textwrap.json"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
SPEED_TEXT = STDLIB / "argparse.py"
HELDOUT_TEXT = STDLIB / "shlex.py"
HELDOUT_TOKENS = 2048
DECODE_TOKENS = 64
RSS_PROMPT = 8000


def text_ids(gguf: Path, path: Path, n: int) -> list[int]:
    from engine.tokenizer import Tokenizer

    ids = Tokenizer.from_gguf(gguf).encode(path.read_text())
    while len(ids) < n:  # a longer context than the file: repeat it (still real text)
        ids = ids + ids
    return ids[:n]


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- workers (one fresh process per engine and measurement) -------------------------------


def worker_ours(gguf: Path, mode: str, threads: int, task: str) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    import engine
    from engine.events import SamplingParams

    quant = mode if mode.startswith("int") else None
    started = time.perf_counter()
    model = engine.load(gguf, dtype=None if quant else mode, quant=quant) if mode != "default" else engine.load(gguf)
    load_s = time.perf_counter() - started
    if task == "load":
        return {"load_s": load_s, "mode": model.mode}
    llm = model.model
    if task == "rss":
        ids = text_ids(gguf, SPEED_TEXT, RSS_PROMPT)
        done = list(model.stream(ids, SamplingParams(max_tokens=16)))[-1]
        return {"peak_rss_mb": peak_rss_mb(), "prefill_tok_s": done.timings.prefill_tok_s, "mode": model.mode}
    ids = text_ids(gguf, SPEED_TEXT, 4096)
    out: dict = {"mode": model.mode}
    for n in (512, 4096):
        state = llm.new_state()
        t = time.perf_counter()
        for event in model.stream(ids[:n], SamplingParams(max_tokens=1), state=state):
            pass
        out[f"prefill_{n}"] = n / event.timings.prefill_s
    # Decode: greedy through the public stream; no stop token, so every step is timed.
    done = list(model.stream(ids[:512], SamplingParams(max_tokens=DECODE_TOKENS, stop=())))[-1]
    out["decode"] = done.timings.decode_tok_s
    out["decode_tokens"] = done.usage.completion_tokens
    return out


def worker_llamacpp(gguf: Path, threads: int, task: str) -> dict:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(str(gguf), n_ctx=8192, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)

    def next_token() -> int:  # greedy from the last position's logits (llama.cpp keeps only those)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))

    if task == "rss":
        ids = text_ids(gguf, SPEED_TEXT, RSS_PROMPT)
        t = time.perf_counter()
        llm.eval(ids)
        prefill = RSS_PROMPT / (time.perf_counter() - t)
        for _ in range(16):
            llm.eval([next_token()])
        return {"peak_rss_mb": peak_rss_mb(), "prefill_tok_s": prefill}
    ids = text_ids(gguf, SPEED_TEXT, 4096)
    out: dict = {}
    for n in (512, 4096):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids[:n])
        out[f"prefill_{n}"] = n / (time.perf_counter() - t)
    llm.reset()
    llm.eval(ids[:512])
    token = next_token()
    t = time.perf_counter()
    for _ in range(DECODE_TOKENS - 1):
        llm.eval([token])
        token = next_token()
    out["decode"] = (DECODE_TOKENS - 1) / (time.perf_counter() - t)
    out["decode_tokens"] = DECODE_TOKENS
    return out


def run_worker(args: list[str], env: dict[str, str] | None = None) -> dict:
    result = subprocess.run([sys.executable, __file__, "_worker", *args], capture_output=True, text=True, cwd=ROOT, env=env)
    if result.returncode:
        sys.exit(f"worker {args} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---- commands -------------------------------------------------------------------------------


def cmd_speed(opts: argparse.Namespace) -> None:
    gguf = find_gguf(opts.gguf)
    common = [str(gguf), str(opts.threads)]
    engines = [("ours", ["ours", opts.mode]), ("llama.cpp", ["llamacpp", "-"])]
    # Interleaved, so that both engines see the same background load on a shared machine.
    runs: dict[str, list[dict]] = {label: [] for label, _ in engines}
    for _ in range(opts.repeats):
        for label, spec in engines:
            runs[label].append(run_worker([*spec, *common, "speed"]))
            print(f"{label}: {json.dumps(runs[label][-1])}", file=sys.stderr, flush=True)
    rows: dict[str, dict] = {}
    for label, spec in engines:
        row = {k: statistics.median(r[k] for r in runs[label]) for k in ("prefill_512", "prefill_4096", "decode")}
        row.update(runs_raw=runs[label], mode=runs[label][0].get("mode"))
        row.update(run_worker([*spec, *common, "rss"]))
        rows[label] = row
        print(f"{label} rss: {row['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    # Load time (engine.load, after imports) with an empty home (conversion, then the
    # prepared-weights cache is written) and again with that cache in place.
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "DSV4_HOME": home}
        cold = [run_worker(["ours", opts.mode, *common, "load"], env)["load_s"]]
        warm = [run_worker(["ours", opts.mode, *common, "load"], env)["load_s"] for _ in range(opts.repeats)]
    print(f"load: cold {cold[0]:.2f} s, warm {warm}", file=sys.stderr, flush=True)
    ours, ref = rows["ours"], rows["llama.cpp"]
    print(f"\nmini engine mode {ours.get('mode')}, {opts.threads} threads, medians of {opts.repeats} (fresh process each):\n")
    print("| measure | mini engine | llama.cpp | ratio |")
    print("|---|---|---|---|")
    for key, name, unit in (
        ("prefill_512", "prefill @512 tokens", "tok/s"),
        ("prefill_4096", "prefill @4,096 tokens", "tok/s"),
        ("decode", f"decode ({DECODE_TOKENS} tokens after 512)", "tok/s"),
    ):
        print(f"| {name} | {ours[key]:,.0f} {unit} | {ref[key]:,.0f} {unit} | {ours[key] / ref[key]:.2f}x |")
    print(f"| peak RSS, {RSS_PROMPT:,}-token prompt + 16 tokens | {ours['peak_rss_mb']:,.0f} MB | {ref['peak_rss_mb']:,.0f} MB | {ours['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x |")
    print(f"| load (`engine.load`), cold / warm (prepared-weights cache) | {cold[0]:.2f} s / {statistics.median(warm):.2f} s | | |")
    for label in rows:
        raw = ", ".join(f"{r['prefill_512']:.0f}/{r['prefill_4096']:.0f}/{r['decode']:.1f}" for r in rows[label]["runs_raw"])
        print(f"\n{label} runs (prefill512/prefill4096/decode tok/s): {raw}", end="")
    print()


def cmd_decode(opts: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from llama_cpp import Llama

    torch.set_num_threads(opts.threads)
    torch.set_flush_denormal(True)
    import engine

    gguf = find_gguf(opts.gguf)
    ids = text_ids(gguf, SPEED_TEXT, 512)
    ours = engine.load(gguf).model
    state = ours.new_state(max_len=1024)
    ours(torch.tensor([ids]), state, output="none")
    ref = Llama(str(gguf), n_ctx=1024, n_threads=opts.threads, n_threads_batch=opts.threads, n_batch=512, verbose=False)
    ref.eval(ids)
    burst = 16

    def ours_rate() -> float:  # greedy from the prompt's end, the same 16 steps every round
        state.length = len(ids) - 1
        step = torch.tensor([ids[-1:]])
        started = time.perf_counter()
        for _ in range(burst):
            step[0, 0] = int(ours(step, state, output="last")[0, -1].argmax())
        return burst / (time.perf_counter() - started)

    def ref_rate() -> float:
        ref.n_tokens = len(ids) - 1
        token = ids[-1]
        started = time.perf_counter()
        for _ in range(burst):
            ref.eval([token])
            token = int(np.argmax(np.ctypeslib.as_array(ref._ctx.get_logits(), shape=(ref.n_vocab(),))))
        return burst / (time.perf_counter() - started)

    rounds = []
    for i in range(opts.rounds):
        rounds.append((ours_rate(), ref_rate()))
        print(f"round {i}: mini engine {rounds[-1][0]:.1f} tok/s, llama.cpp {rounds[-1][1]:.1f} tok/s", file=sys.stderr, flush=True)
    mine, theirs = zip(*rounds)
    ratio = statistics.median(a / b for a, b in rounds)
    print(f"\ndecode after 512 tokens, {opts.threads} threads, {opts.rounds} alternating rounds of {burst} tokens in one process:\n")
    print("| measure | mini engine | llama.cpp | ratio |")
    print("|---|---|---|---|")
    print(f"| decode, median of rounds (tok/s) | {statistics.median(mine):.1f} | {statistics.median(theirs):.1f} | {ratio:.2f}x (median per-round ratio) |")
    print(f"| decode, best round (tok/s) | {max(mine):.1f} | {max(theirs):.1f} | {max(mine) / max(theirs):.2f}x |")


def cmd_quality(opts: argparse.Namespace) -> None:
    import importlib.util

    import torch

    torch.set_num_threads(opts.threads)
    import engine

    gguf = find_gguf(opts.gguf)
    recorded = json.loads(RECORDED.read_text())
    ids = torch.tensor([recorded["ids"]])
    recorded_argmax = torch.tensor(recorded["argmax"])
    confident = torch.tensor(recorded["margin"]) > 0.5
    heldout = torch.tensor([text_ids(gguf, HELDOUT_TEXT, HELDOUT_TOKENS)])

    live_argmax = None
    live_ppl = None
    if importlib.util.find_spec("llama_cpp") is not None:
        import numpy as np
        from llama_cpp import Llama

        ref = Llama(str(gguf), n_ctx=4096, n_threads=opts.threads, logits_all=True, verbose=False)
        ref.eval(recorded["ids"])
        live_argmax = torch.from_numpy(np.array(ref.scores[: ids.shape[1]])).argmax(-1)
        ref.reset()
        ref.eval(heldout[0].tolist())
        live_ppl = _perplexity(torch.from_numpy(np.array(ref.scores[: heldout.shape[1]], dtype=np.float32)), heldout[0])

    print(f"\nAgreement on {RECORDED.name} (512 positions; 'confident' = llama.cpp top-2 gap > 0.5, {int(confident.sum())} positions) "
          f"and perplexity on the first {HELDOUT_TOKENS:,} tokens of Lib/shlex.py:\n")
    print("| mode | agree (recorded) | agree (live llama.cpp) | agree where confident | perplexity | load s |")
    print("|---|---|---|---|---|---|")
    for mode in opts.modes.split(","):
        t = time.perf_counter()
        quant = mode if mode.startswith("int") else None
        model = engine.load(gguf, dtype=None if quant else mode, quant=quant)
        load_s = time.perf_counter() - t
        predicted = model.logits(ids)[0].argmax(-1)
        agree = float((predicted == recorded_argmax).float().mean())
        live = "n/a" if live_argmax is None else f"{float((predicted == live_argmax).float().mean()):.2%}"
        sure = float((predicted[confident] == recorded_argmax[confident]).float().mean())
        ppl = _perplexity(model.logits(heldout)[0], heldout[0])
        print(f"| {mode} | {agree:.2%} | {live} | {sure:.2%} | {ppl:.3f} | {load_s:.1f} |", flush=True)
        del model
    if live_ppl is not None:
        print(f"| llama.cpp (reference) | 100% | 100% | 100% | {live_ppl:.3f} | |")


def _perplexity(logits, ids) -> float:
    import torch

    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:])
    return float(torch.exp(nll))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        kind, mode, gguf, threads, task = sys.argv[2:7]
        sys.path.insert(0, str(ROOT))
        result = worker_ours(Path(gguf), mode, int(threads), task) if kind == "ours" else worker_llamacpp(Path(gguf), int(threads), task)
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["speed", "quality", "decode"])
    parser.add_argument("--gguf", help="the GGUF file (default: the installed mini)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=16, help="decode: alternating rounds")
    parser.add_argument("--mode", default="default", help="speed: weight mode of our engine (default: engine's default)")
    parser.add_argument("--modes", default="fp32,bf16,int8,int4", help="quality: modes to measure")
    opts = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(opts.threads))
    {"speed": cmd_speed, "quality": cmd_quality, "decode": cmd_decode}[opts.command](opts)


if __name__ == "__main__":
    main()
