"""The conversation log: schema and migrations, contexts stored once by digest, ids and
prefixes, and `dsv4 logs` / `dsv4 logs show` (text and --json)."""

from __future__ import annotations

import hashlib
import json
import sqlite3

import pytest

from dsv4cli import logs
from dsv4cli.app import main
from dsv4cli.errors import CliError
from engine import paths

PACK = "<file path=\"a.py\">\n" + "x = 1\n" * 50_000 + "</file>\n"


def _exchange(question: str, answer: str = "an answer", **fields) -> logs.Exchange:
    return logs.Exchange(model="mini", question=question, answer=answer, **fields)


def test_ulids_are_26_characters_and_sort_by_time():
    earlier, later = logs.new_ulid(1_700_000_000_000), logs.new_ulid(1_700_000_000_001)
    assert len(earlier) == 26 and set(earlier) <= set(logs._CROCKFORD)
    assert earlier < later
    assert logs.new_ulid(5) != logs.new_ulid(5)


def test_the_database_lives_in_the_home_and_records_its_migrations():
    with logs.LogStore() as store:
        assert store.path == paths.logs_dir() / "logs.db"
        assert store.applied_migrations() == [name for name, _ in logs._MIGRATIONS]
    # Opening again applies nothing twice.
    with logs.LogStore() as store:
        assert store.applied_migrations() == [name for name, _ in logs._MIGRATIONS]
    tables = {row[0] for row in sqlite3.connect(paths.logs_dir() / "logs.db").execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"migrations", "blobs", "conversations", "messages"} <= tables


def test_a_context_is_stored_once_by_its_digest():
    with logs.LogStore() as store:
        first = store.log(_exchange("What is x?", context=PACK, prompt_tokens=100, completion_tokens=5))
        store.append(first, _exchange("And y?", context=PACK, prompt_tokens=120, completion_tokens=6))
        store.log(_exchange("Other repo?", context=PACK + "y = 2\n"))
        assert store.blob_count() == 2
        digest = hashlib.sha256(PACK.encode()).hexdigest()
        conversation = store.get_conversation(first)
        assert [e.context_sha256 for e in conversation.exchanges] == [digest, digest]
        assert store.blob(digest) == PACK
    # Compressed: far less than the pack on disk.
    size = (paths.logs_dir() / "logs.db").stat().st_size
    assert size < len(PACK) / 4


def test_conversations_list_newest_first_with_totals():
    with logs.LogStore() as store:
        old = store.log(_exchange("first question\nwith two lines", prompt_tokens=10, completion_tokens=2))
        store.append(old, _exchange("second question", prompt_tokens=12, completion_tokens=3))
        new = store.log(_exchange("review it"), command="review")
        summaries = store.list_conversations()
        assert [s.id for s in summaries] == [new, old]
        assert summaries[1].title == "first question with two lines"
        assert (summaries[1].exchanges, summaries[1].prompt_tokens, summaries[1].completion_tokens) == (2, 22, 5)
        assert summaries[0].command == "review"
        assert store.latest_conversation() == new
        assert [s.id for s in store.list_conversations(1)] == [new]


def test_ids_resolve_from_a_unique_prefix_in_any_case():
    with logs.LogStore() as store:
        conversation = store.log(_exchange("q"))
        assert store.resolve_id(conversation[:20].lower()) == conversation
        with pytest.raises(CliError, match="no conversation"):
            store.resolve_id("ZZZZ")
        with pytest.raises(CliError, match="no conversation"):
            store.append("ZZZZ", _exchange("q"))


def test_a_corrupt_database_is_a_one_line_error_with_a_way_out(capsys):
    path = paths.logs_dir() / "logs.db"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not sqlite" * 100)
    assert main(["logs"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"Error: the conversation log {path} cannot be used") and "mv" in err[0]


def test_dsv4_logs_lists_and_shows(capsys):
    assert main(["logs"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "no conversations logged yet" in captured.err
    with logs.LogStore() as store:
        first = store.log(_exchange("What does pack return?", "A Pack.", context=PACK, prompt_tokens=1000,
                                    cached_tokens=900, completion_tokens=4))
        second = store.log(_exchange("Why?", "Because."))
    assert main(["logs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "TIME", "MODEL", "TOKENS", "QUESTION"]
    assert lines[1].startswith(second) and lines[2].startswith(first)
    assert "1,004" in lines[2] and lines[2].endswith("What does pack return?")
    assert main(["logs", "-n", "1", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["id"] == second and listed["exchanges"] == 1

    assert main(["logs", "show", first[:22]]) == 0
    out = capsys.readouterr().out
    assert "### question\n\nWhat does pack return?" in out and "### answer\n\nA Pack." in out
    assert "prompt 1,000 (900 cached)" in out and "x = 1" not in out  # the pack only on request
    assert main(["logs", "show", "--json", "--context", first]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["exchanges"][0]["context"] == PACK and shown["exchanges"][0]["answer"] == "A Pack."
    assert main(["logs", "show", "nope"]) == 1
    assert capsys.readouterr().err.startswith("Error: no conversation 'nope'")


def test_logs_path_prints_the_database_path(capsys):
    assert main(["logs", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(paths.logs_dir() / "logs.db")
