"""`dsv4 logs`: recent conversations; `dsv4 logs show ID`: one of them in full."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime

import typer

from dsv4cli import logs


def _local_time(stamp: str) -> str:
    try:
        return datetime.fromisoformat(stamp).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return stamp


def _summary_json(summary: logs.ConversationSummary) -> dict:
    return dataclasses.asdict(summary)


def conversation_list(summaries: list[logs.ConversationSummary]) -> str:
    """The `dsv4 logs` table: aligned columns, the question last and unpadded."""
    rows = [(s.id, _local_time(s.created_at), s.model, f"{s.prompt_tokens + s.completion_tokens:,}", s.title)
            for s in summaries]
    header = ("ID", "TIME", "MODEL", "TOKENS", "QUESTION")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    lines = []
    for row in [header, *rows]:
        cells = [row[i].rjust(widths[i]) if i == 3 else row[i].ljust(widths[i]) for i in range(4)]
        lines.append("  ".join(cells + [row[4]]).rstrip() + "\n")
    return "".join(lines)


def register(app: typer.Typer) -> None:
    logs_app = typer.Typer(
        help="List the logged conversations; 'dsv4 logs show ID' prints one.",
        invoke_without_command=True,
        rich_markup_mode=None,
    )

    @logs_app.callback()
    def list_conversations(
        ctx: typer.Context,
        count: int = typer.Option(20, "-n", "--count", min=1, help="How many, newest first."),
        json_output: bool = typer.Option(False, "--json", help="Print a JSON array."),
    ) -> None:
        """List recent conversations: id, time, model, tokens, first question."""
        if ctx.invoked_subcommand is not None:
            return
        with logs.LogStore() as store:
            summaries = store.list_conversations(count)
        if json_output:
            print(json.dumps([_summary_json(s) for s in summaries], indent=2, ensure_ascii=False), flush=True)
            return
        if not summaries:
            from dsv4cli import render

            render.note("no conversations logged yet")
            return
        print(conversation_list(summaries), end="", flush=True)

    @logs_app.command("show")
    def show(
        conversation: str = typer.Argument(..., metavar="ID", help="A conversation id, or a unique prefix of one."),
        json_output: bool = typer.Option(False, "--json", help="Print a JSON object."),
        context: bool = typer.Option(False, "--context", help="Include the packed context each question was about."),
    ) -> None:
        """Print one conversation: each question and answer, with usage."""
        with logs.LogStore() as store:
            found = store.get_conversation(conversation)
            contexts = {e.context_sha256: store.blob(e.context_sha256) for e in found.exchanges
                        if context and e.context_sha256}
        if json_output:
            payload = _summary_json(found.summary)
            payload["exchanges"] = []
            for exchange in found.exchanges:
                item = dataclasses.asdict(exchange)
                if context:
                    item["context"] = contexts.get(exchange.context_sha256)
                payload["exchanges"].append(item)
            print(json.dumps(payload, indent=2, ensure_ascii=False), flush=True)
            return
        summary = found.summary
        print(f"# {summary.id} · {_local_time(summary.created_at)} · {summary.model} · {summary.command}")
        for exchange in found.exchanges:
            tokens = ""
            if exchange.prompt_tokens is not None:
                tokens = (f" · prompt {exchange.prompt_tokens:,} ({exchange.cached_tokens or 0:,} cached)"
                          f" · completion {exchange.completion_tokens or 0:,}")
            print(f"\n## {_local_time(exchange.created_at)} · {exchange.model}{tokens}")
            if exchange.context_sha256:
                body = contexts.get(exchange.context_sha256)
                if body is not None:
                    print(f"\n### context\n\n{body}")
                else:
                    print(f"\ncontext: sha256 {exchange.context_sha256[:12]} (--context prints it)")
            print(f"\n### question\n\n{exchange.question}\n\n### answer\n\n{exchange.answer}")
        print("", end="", flush=True)

    @logs_app.command("path")
    def path() -> None:
        """Print the path of the log database."""
        print(logs.LogStore.default_path(), flush=True)

    app.add_typer(logs_app, name="logs")

