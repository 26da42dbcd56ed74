"""`dsv4 serve` under load: requests per second and time to first token with 1, 2 and 4
concurrent streaming clients, with and without a shared cached prefix.

    python bench/serve_bench.py [--gguf PATH] [--requests 8] [--max-tokens 16] [--threads 2]

The server runs in this process on loopback (the real HTTP path, the real engine, the real
prefix cache in a temporary DSV4_HOME); clients are plain http.client streams in threads.
"shared prefix": every request carries the same ~1,500-token document (CPython's
Lib/textwrap.py) before a different question, and one warm-up request has published it to
the cache; the server then starts each request from the state the previous one left in
memory, rewound to where the questions differ; "distinct": each request's document differs
from its first token, so nothing is reused. Requests are generated one at a time (the engine lock), so concurrency shows up as
queueing in TTFT, not as throughput. Prints a Markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

from _shared import find_gguf  # bench/ is on sys.path: it holds the script

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"
DOCUMENT_CHARS = 6000


def one_request(port: int, messages: list[dict[str, str]], max_tokens: int) -> tuple[float, float]:
    """(time to first content, total time) of one streaming chat completion."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True})
    connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{response.status}: {response.read()[:200]!r}")
    first = None
    for raw in response:
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if first is None and any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
            first = time.perf_counter() - started
    connection.close()
    total = time.perf_counter() - started
    return (first if first is not None else total), total


def run_load(port: int, prompts: list[list[dict[str, str]]], clients: int, max_tokens: int) -> dict[str, float]:
    ttfts: list[float] = []
    lock = threading.Lock()
    queue = list(prompts)

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                messages = queue.pop()
            ttft, _ = one_request(port, messages, max_tokens)
            with lock:
                ttfts.append(ttft)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    ttfts.sort()
    return {
        "rps": len(prompts) / elapsed,
        "ttft_p50": statistics.median(ttfts),
        "ttft_max": ttfts[-1],
    }


def prompts_for(kind: str, count: int, run: int) -> list[list[dict[str, str]]]:
    document = DOCUMENT.read_text()[:DOCUMENT_CHARS]
    out = []
    for i in range(count):
        # distinct: a unique first line makes every chunk hash differ from the first token on
        head = "" if kind == "shared" else f"# copy {run}-{i}\n"
        question = f"Question {i}: what does the function on line {10 + i} do?"
        out.append([{"role": "user", "content": head + document + "\n\n" + question}])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", default="1,2,4")
    args = parser.parse_args()

    path = find_gguf(args.gguf)   # from the real home, before the temporary one replaces it
    os.environ["DSV4_HOME"] = tempfile.mkdtemp(prefix="dsv4-serve-bench-")
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(args.threads)
    import engine
    from dsv4cli.commands.serve import EngineServedModel, build_server
    from dsv4cli.server import start_in_thread

    served = EngineServedModel(engine.load(str(path)), "mini")
    server = build_server(served, "127.0.0.1", 0, None, queue_limit=64, default_max_tokens=args.max_tokens)
    start_in_thread(server)
    port = server.port
    one_request(port, prompts_for("shared", 1, 0)[0], args.max_tokens)  # publishes the shared prefix

    rows = []
    for run, clients in enumerate(int(c) for c in args.clients.split(",")):
        for kind in ("shared", "distinct"):
            result = run_load(port, prompts_for(kind, args.requests, run + 1), clients, args.max_tokens)
            rows.append((clients, kind, result))
            print(f"{clients} client(s), {kind}: {result}", file=sys.stderr, flush=True)
    server.shutdown()

    prompt_tokens = len(served.chat_prompt(prompts_for("shared", 1, 0)[0]))
    print(f"mini (int4, {args.threads} threads), ~{prompt_tokens:,}-token prompts, {args.max_tokens} answer tokens, "
          f"{args.requests} streaming requests per row\n")
    print("| clients | prefix | requests/s | TTFT p50 | TTFT max |")
    print("|---|---|---|---|---|")
    for clients, kind, result in rows:
        label = "shared, cached" if kind == "shared" else "distinct"
        print(f"| {clients} | {label} | {result['rps']:.2f} | {result['ttft_p50']:.2f} s | {result['ttft_max']:.2f} s |")


if __name__ == "__main__":
    main()
