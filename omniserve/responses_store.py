"""Where ``/v1/responses`` keeps what ``store: true`` asks it to: one interface, SQLite by default.

A stored response is what ``previous_response_id`` continues and ``GET /v1/responses/{id}`` returns:
the answer as it was sent, the request's own input items, and the whole conversation up to and
including that answer (so a continuation is one read, and still works when an older response in the
chain has expired). ``--responses-store`` picks the place: ``sqlite://:memory:`` (the default: this
process's memory, gone at exit), ``sqlite:///PATH`` (a file: kept across restarts, shareable by the
processes of one host through SQLite's own locking), ``postgresql://...`` (one database for several
replicas; psycopg, the ``responses-postgres`` extra) or ``none``. Every response is written in one
transaction, which also deletes what is past ``--responses-retention`` or beyond
``--responses-max-stored``. Both drivers block, so the store runs on one thread of its own, never on
the event loop.
"""

from __future__ import annotations

import abc
import asyncio
import json
import re
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from omniserve.errors import InvalidRequest, ModelLoadError, OmniServeError
from omniserve.extras import require_extra

T = TypeVar("T")
MEMORY = "sqlite://:memory:"


class StoreUnavailable(ModelLoadError):
    """The store cannot be opened (a folder that cannot be written, a database that does not answer).

    A ``ModelLoadError`` so the server's start-up reports it in one line, as every start-up failure.
    """


def _shown(target: str) -> str:
    """A store's address as it may be logged: a password in a URL is replaced by ``***``."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", target)


class ResponseNotFound(OmniServeError):
    """An id this server does not hold (never stored, deleted, expired, or the store is off)."""

    status_code = 404
    default_code = "response_not_found"


@dataclass(frozen=True)
class StoredResponse:
    """One stored answer: the Response object, the request's input items, and the conversation it ends."""

    id: str
    created_at: float
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    conversation: list[dict[str, Any]]  # input items: every turn before, this request's input, this answer


class ResponsesStore(abc.ABC):
    """What the Responses endpoint needs of a store; every method is safe to await on the event loop."""

    @abc.abstractmethod
    async def put(self, stored: StoredResponse) -> None:
        """Keep ``stored`` (atomically) and let go of what retention says is past keeping."""

    @abc.abstractmethod
    async def get(self, response_id: str) -> StoredResponse | None:
        """The stored response, or None when unknown or expired."""

    @abc.abstractmethod
    async def delete(self, response_id: str) -> bool:
        """Forget a response; False when there was none."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection (further calls fail)."""


class _SqlStore(ResponsesStore):
    """Responses in one SQL table, reached through a single worker thread holding the one connection.

    The flow is shared; a subclass says how to connect, how to open a write transaction and how its
    dialect writes parameters (``?`` or ``%s``) and an upsert.
    """

    UPSERT: str
    PARAM = "?"

    def __init__(
        self, target: str, *, retention_seconds: float, max_stored: int, clock: Callable[[], float] = time.time
    ) -> None:
        self.retention_seconds = retention_seconds
        self.max_stored = max_stored
        self._clock = clock
        self._target = target
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="omniserve-responses-store")
        # connected now, so a store that cannot be reached stops the server at start-up, not at a request
        try:
            self._db: Any = self._thread.submit(self._connect, target).result()
        except Exception as exc:
            self._thread.shutdown()
            raise StoreUnavailable(f"cannot open the responses store {_shown(target)}: {exc}") from exc

    @abc.abstractmethod
    def _connect(self, target: str) -> Any:
        """A connection in autocommit mode with the table created."""

    @abc.abstractmethod
    def _write(self, db: Any, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        """Run ``statements`` in one write transaction."""

    def _sql(self, statement: str) -> str:
        return statement.replace("?", self.PARAM)

    def _broken(self) -> bool:
        """Whether the connection is lost (a database server restarted): then it is opened again, once."""
        return False

    async def _run(self, work: Callable[[Any], T]) -> T:
        def attempt() -> T:
            try:
                return work(self._db)
            except Exception:
                if not self._broken():
                    raise
            self._db = self._connect(self._target)
            return work(self._db)

        return await asyncio.wrap_future(self._thread.submit(attempt))

    async def put(self, stored: StoredResponse) -> None:
        body = json.dumps(
            {"response": stored.response, "input_items": stored.input_items, "conversation": stored.conversation},
            ensure_ascii=False,
            separators=(",", ":"),
        )
        cutoff = self._clock() - self.retention_seconds
        statements = [
            (self._sql(self.UPSERT), (stored.id, stored.created_at, body)),
            (self._sql("DELETE FROM responses WHERE created_at < ?"), (cutoff,)),
            (
                self._sql(
                    "DELETE FROM responses WHERE id IN "
                    "(SELECT id FROM responses ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?)"
                ),
                (2**62, self.max_stored),
            ),
        ]
        await self._run(lambda db: self._write(db, statements))

    async def get(self, response_id: str) -> StoredResponse | None:
        cutoff = self._clock() - self.retention_seconds
        query = self._sql("SELECT created_at, body FROM responses WHERE id = ? AND created_at >= ?")
        row = await self._run(lambda db: db.execute(query, (response_id, cutoff)).fetchone())
        if row is None:
            return None
        body = json.loads(row[1])
        return StoredResponse(response_id, row[0], body["response"], body["input_items"], body["conversation"])

    async def delete(self, response_id: str) -> bool:
        query = self._sql("DELETE FROM responses WHERE id = ?")
        return await self._run(lambda db: db.execute(query, (response_id,)).rowcount > 0)

    def close(self) -> None:
        self._thread.submit(self._db.close).result()
        self._thread.shutdown()


_TABLE = (
    "CREATE TABLE IF NOT EXISTS responses "
    "(id TEXT PRIMARY KEY, created_at DOUBLE PRECISION NOT NULL, body TEXT NOT NULL)"
)
_INDEX = "CREATE INDEX IF NOT EXISTS responses_created_at ON responses (created_at)"


class SqliteStore(_SqlStore):
    """An embedded SQLite database: ``:memory:`` or a file (WAL, so processes of one host can share it)."""

    UPSERT = "INSERT OR REPLACE INTO responses (id, created_at, body) VALUES (?, ?, ?)"

    def _connect(self, target: str) -> sqlite3.Connection:
        memory = target == ":memory:"
        if not memory:
            target = str(Path(target).expanduser())
            Path(target).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(target, isolation_level=None)  # autocommit; writes open their own transaction
        if not memory:
            db.execute("PRAGMA journal_mode=WAL")  # readers in other processes do not wait for a writer
            db.execute("PRAGMA busy_timeout=5000")  # a writer in another process: wait for it, not fail
        db.execute(_TABLE)
        db.execute(_INDEX)
        return db

    def _write(self, db: sqlite3.Connection, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement, values in statements:
                db.execute(statement, values)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


class PostgresStore(_SqlStore):
    """A PostgreSQL database shared by several replicas (``postgresql://user:password@host:port/database``).

    Needs the ``responses-postgres`` extra (psycopg). Each replica holds one connection; ids are random,
    so replicas never write the same row, and each write prunes for all of them.
    """

    UPSERT = (
        "INSERT INTO responses (id, created_at, body) VALUES (?, ?, ?) "
        "ON CONFLICT (id) DO UPDATE SET created_at = EXCLUDED.created_at, body = EXCLUDED.body"
    )
    PARAM = "%s"

    def __init__(self, target: str, **limits: Any) -> None:
        require_extra("responses-postgres", ("psycopg",), purpose="--responses-store postgresql://...")
        super().__init__(target, **limits)

    def _connect(self, target: str) -> Any:
        import psycopg

        db = psycopg.connect(target, autocommit=True, connect_timeout=10)
        with db.transaction():  # two replicas starting at once: the second waits, then finds the table
            db.execute("SELECT pg_advisory_xact_lock(7460531)")
            db.execute(_TABLE)
            db.execute(_INDEX)
        return db

    def _broken(self) -> bool:
        return bool(self._db.broken or self._db.closed)

    def _write(self, db: Any, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        with db.transaction():
            for statement, values in statements:
                db.execute(statement, values)


def open_store(url: str, *, retention_seconds: float, max_stored: int) -> ResponsesStore | None:
    """The store ``--responses-store`` names (checked by ``ServerConfig``); None for ``none``."""
    if url == "none":
        return None
    limits = {"retention_seconds": retention_seconds, "max_stored": max_stored}
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url, **limits)
    return SqliteStore(url.removeprefix("sqlite://") or ":memory:", **limits)


def store_off(param: str) -> InvalidRequest:
    """The 400 for asking a server without a store for a stored response."""
    return InvalidRequest(
        "this server stores no responses (--responses-store none): previous_response_id cannot be used",
        param=param,
        code="store_disabled",
    )
