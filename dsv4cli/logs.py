"""Conversations kept in SQLite at `<DSV4_HOME>/logs/logs.db`.

A conversation is a series of exchanges (question, answer) with one model. The context an
exchange was asked about (a pack: megabytes) is stored once in `blobs`, keyed by its
sha256, and exchanges refer to it, so asking ten questions about a repository stores it
once. Schema changes are named migrations, applied in order and recorded in `migrations`.
Ids are ULIDs: sortable by time, so "the latest" is the largest id.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from dsv4cli.errors import CliError
from engine import paths

DB_NAME = "logs.db"
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_ulid(now_ms: int | None = None) -> str:
    """48 bits of milliseconds then 80 random bits, in Crockford base32 (26 characters)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    value = (now_ms << 80) | secrets.randbits(80)
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# ---------------------------------------------------------------- migrations

_MIGRATIONS: list[tuple[str, Callable[[sqlite3.Connection], None]]] = []


def _migration(function: Callable[[sqlite3.Connection], None]) -> Callable[[sqlite3.Connection], None]:
    _MIGRATIONS.append((function.__name__, function))
    return function


@_migration
def m001_initial(db: sqlite3.Connection) -> None:
    _run_statements(
        db,
        """
        CREATE TABLE blobs (
            sha256 TEXT PRIMARY KEY,
            size INTEGER NOT NULL,              -- bytes of the UTF-8 text
            content BLOB NOT NULL               -- zlib-compressed UTF-8 text
        );
        CREATE TABLE conversations (
            id TEXT PRIMARY KEY,                -- ULID
            created_at TEXT NOT NULL,
            model TEXT NOT NULL,
            command TEXT NOT NULL,              -- ask, review, chat
            title TEXT NOT NULL DEFAULT ''      -- the first question, shortened
        );
        CREATE TABLE messages (
            id TEXT PRIMARY KEY,                -- ULID
            conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            created_at TEXT NOT NULL,
            model TEXT NOT NULL,
            system TEXT,
            context_sha256 TEXT REFERENCES blobs(sha256),
            question TEXT NOT NULL,
            answer TEXT NOT NULL,
            finish_reason TEXT,
            prompt_tokens INTEGER,
            cached_tokens INTEGER,
            completion_tokens INTEGER,
            ttft_s REAL,
            prefill_s REAL,
            decode_s REAL,
            duration_s REAL
        );
        CREATE INDEX messages_by_conversation ON messages(conversation_id, id);
        """,
    )


def _run_statements(db: sqlite3.Connection, script: str) -> None:
    # Not executescript(): it commits first, and a migration must run inside our transaction.
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class Exchange:
    """One question and its answer, as the caller hands it over."""

    model: str
    question: str
    answer: str
    system: str | None = None
    context: str | None = None           # the pack or piped text the question was about
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_s: float | None = None
    prefill_s: float | None = None
    decode_s: float | None = None
    duration_s: float | None = None


@dataclass(frozen=True)
class StoredExchange:
    id: str
    created_at: str
    model: str
    system: str | None
    context_sha256: str | None
    question: str
    answer: str
    finish_reason: str | None
    prompt_tokens: int | None
    cached_tokens: int | None
    completion_tokens: int | None
    ttft_s: float | None
    prefill_s: float | None
    decode_s: float | None
    duration_s: float | None


@dataclass(frozen=True)
class ConversationSummary:
    id: str
    created_at: str
    model: str
    command: str
    title: str
    exchanges: int
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Conversation:
    summary: ConversationSummary
    exchanges: tuple[StoredExchange, ...]


_TITLE_CHARS = 120


class LogStore:
    """The conversation log. Use as a context manager, or call `close()`."""

    def __init__(self, path: Path | None = None):
        self.path = path or self.default_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
            self._db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise _error(self.path, exc) from None
        except OSError as exc:
            raise CliError(f"cannot open the log {self.path}: {exc.strerror or exc}", "check DSV4_HOME") from None

    @staticmethod
    def default_path() -> Path:
        return paths.logs_dir() / DB_NAME

    def __enter__(self) -> LogStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    # ---- schema

    def _migrate(self) -> None:
        self._db.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
        applied = {row[0] for row in self._db.execute("SELECT name FROM migrations")}
        for name, function in _MIGRATIONS:
            if name in applied:
                continue
            with self._transaction():
                function(self._db)
                self._db.execute("INSERT INTO migrations (name, applied_at) VALUES (?, ?)", (name, _utc_now()))

    def applied_migrations(self) -> list[str]:
        return [row[0] for row in self._db.execute("SELECT name FROM migrations ORDER BY rowid")]

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        # BEGIN IMMEDIATE: two processes logging at once queue up instead of failing.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ---- writing

    def start_conversation(self, model: str, command: str = "ask", title: str = "") -> str:
        """A new conversation; its title is the first question unless given."""
        conversation_id = new_ulid()
        try:
            with self._transaction():
                self._db.execute(
                    "INSERT INTO conversations (id, created_at, model, command, title) VALUES (?, ?, ?, ?, ?)",
                    (conversation_id, _utc_now(), model, command, _title(title)),
                )
        except sqlite3.DatabaseError as exc:
            raise _error(self.path, exc) from None
        return conversation_id

    def append(self, conversation_id: str, exchange: Exchange) -> str:
        """Add an exchange to a conversation; returns its id."""
        message_id = new_ulid()
        try:
            with self._transaction():
                if self._db.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone() is None:
                    raise CliError(f"no conversation {conversation_id}", "see 'dsv4 logs' for the ids")
                digest = self._put_blob(exchange.context) if exchange.context is not None else None
                self._db.execute(
                    "INSERT INTO messages (id, conversation_id, created_at, model, system, context_sha256, question,"
                    " answer, finish_reason, prompt_tokens, cached_tokens, completion_tokens, ttft_s, prefill_s,"
                    " decode_s, duration_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (message_id, conversation_id, _utc_now(), exchange.model, exchange.system, digest,
                     exchange.question, exchange.answer, exchange.finish_reason, exchange.prompt_tokens,
                     exchange.cached_tokens, exchange.completion_tokens, exchange.ttft_s, exchange.prefill_s,
                     exchange.decode_s, exchange.duration_s),
                )
                self._db.execute(
                    "UPDATE conversations SET title = ? WHERE id = ? AND title = ''",
                    (_title(exchange.question), conversation_id),
                )
        except sqlite3.DatabaseError as exc:
            raise _error(self.path, exc) from None
        return message_id

    def log(self, exchange: Exchange, *, conversation_id: str | None = None, command: str = "ask",
            title: str = "") -> str:
        """Append to `conversation_id`, or to a new conversation; returns the conversation id."""
        conversation_id = conversation_id or self.start_conversation(exchange.model, command, title)
        self.append(conversation_id, exchange)
        return conversation_id

    def _put_blob(self, text: str) -> str:
        data = text.encode("utf-8", "surrogatepass")
        digest = hashlib.sha256(data).hexdigest()
        self._db.execute(
            "INSERT OR IGNORE INTO blobs (sha256, size, content) VALUES (?, ?, ?)",
            (digest, len(data), zlib.compress(data, 6)),
        )
        return digest

    # ---- reading

    def blob(self, digest: str) -> str | None:
        row = self._db.execute("SELECT content FROM blobs WHERE sha256 = ?", (digest,)).fetchone()
        return None if row is None else zlib.decompress(row[0]).decode("utf-8", "surrogatepass")

    def blob_count(self) -> int:
        return self._db.execute("SELECT count(*) FROM blobs").fetchone()[0]

    def list_conversations(self, limit: int | None = 20) -> list[ConversationSummary]:
        """Newest first."""
        query = _SUMMARY_QUERY + " GROUP BY c.id ORDER BY c.id DESC"
        rows = self._db.execute(query + (" LIMIT ?" if limit is not None else ""), (limit,) if limit is not None else ())
        return [ConversationSummary(*row) for row in rows]

    def latest_conversation(self) -> str | None:
        row = self._db.execute("SELECT id FROM conversations ORDER BY id DESC LIMIT 1").fetchone()
        return None if row is None else row[0]

    def resolve_id(self, id_or_prefix: str) -> str:
        """A full id, or a unique prefix of one (case-insensitive, as ULIDs are)."""
        prefix = id_or_prefix.strip().upper()
        if not prefix:
            raise CliError("empty conversation id", "see 'dsv4 logs' for the ids")
        rows = self._db.execute(
            "SELECT id FROM conversations WHERE id >= ? AND id < ? ORDER BY id LIMIT 2", (prefix, prefix + "\U0010ffff")
        ).fetchall()
        if not rows:
            raise CliError(f"no conversation {id_or_prefix!r}", "see 'dsv4 logs' for the ids")
        if len(rows) > 1:
            raise CliError(f"{id_or_prefix!r} matches several conversations", "give more characters of the id")
        return rows[0][0]

    def get_conversation(self, id_or_prefix: str) -> Conversation:
        conversation_id = self.resolve_id(id_or_prefix)
        summary = ConversationSummary(*self._db.execute(_SUMMARY_QUERY + " WHERE c.id = ? GROUP BY c.id",
                                                         (conversation_id,)).fetchone())
        rows = self._db.execute(
            "SELECT id, created_at, model, system, context_sha256, question, answer, finish_reason, prompt_tokens,"
            " cached_tokens, completion_tokens, ttft_s, prefill_s, decode_s, duration_s"
            " FROM messages WHERE conversation_id = ? ORDER BY id",
            (conversation_id,),
        )
        return Conversation(summary, tuple(StoredExchange(*row) for row in rows))


_SUMMARY_QUERY = (
    "SELECT c.id, c.created_at, c.model, c.command, c.title, count(m.id),"
    " coalesce(sum(m.prompt_tokens), 0), coalesce(sum(m.completion_tokens), 0)"
    " FROM conversations c LEFT JOIN messages m ON m.conversation_id = c.id"
)


def _title(question: str) -> str:
    line = " ".join(question.split())
    return line if len(line) <= _TITLE_CHARS else line[: _TITLE_CHARS - 1] + "…"


def _error(path: Path, exc: sqlite3.DatabaseError) -> CliError:
    return CliError(f"the conversation log {path} cannot be used: {exc}",
                    f"move it aside (mv {path} {path}.bad) and a new one is started")


def logging_disabled() -> bool:
    """`DSV4_NO_LOG=1` turns logging off everywhere (as --no-log does for one command)."""
    return os.environ.get("DSV4_NO_LOG", "") not in ("", "0")
