"""The log store: every turn, written to SQLite as it happens.

A turn is inserted as ``running`` and committed *before* any model runs, then updated when it
finishes or fails. A crash mid-turn therefore leaves a visible ``running`` row and never costs an
earlier turn. The schema grows by numbered migrations (as in simonw/llm): each is applied once, in
order, and the version lives in ``PRAGMA user_version`` so it changes in the same transaction as
the tables it describes.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rpra.errors import RpraError

# (number, statements). Append only: a released migration is never edited, because databases
# already at that version would never see the change.
MIGRATIONS: list[tuple[int, tuple[str, ...]]] = [
    (
        1,
        (
            """CREATE TABLE conversations (
                id TEXT PRIMARY KEY,
                created_at TEXT NOT NULL,
                title TEXT,
                source TEXT NOT NULL
            )""",
            """CREATE TABLE turns (
                id INTEGER PRIMARY KEY,
                conversation_id TEXT NOT NULL REFERENCES conversations(id),
                created_at TEXT NOT NULL,
                status TEXT NOT NULL CHECK (status IN ('running', 'done', 'error')),
                messages_json TEXT NOT NULL,
                prompt TEXT NOT NULL,
                model TEXT NOT NULL,
                protocol TEXT NOT NULL,
                predictor TEXT NOT NULL,
                prediction_json TEXT,
                expected REAL,
                p_pass REAL,
                mode TEXT NOT NULL,
                route TEXT,
                reason TEXT,
                answered_by TEXT,
                fallback INTEGER NOT NULL DEFAULT 0,
                remote_error TEXT,
                reasoning TEXT,
                answer TEXT,
                sent_remote_json TEXT,
                decision_ms REAL,
                local_ms REAL,
                remote_ms REAL,
                total_ms REAL,
                prompt_tokens INTEGER,
                local_tokens INTEGER,
                remote_tokens INTEGER,
                error TEXT
            )""",
            "CREATE INDEX turns_created_at ON turns(created_at)",
            "CREATE INDEX turns_conversation_id ON turns(conversation_id)",
        ),
    ),
    (
        2,
        (
            # What redaction masked in a deferred request (kind and placeholder, never the value).
            "ALTER TABLE turns ADD COLUMN redactions_json TEXT",
            # Every HTTP request `rpra serve` received, answered or refused (429, 4xx), with the
            # turn it ran if it got that far.
            """CREATE TABLE requests (
                id INTEGER PRIMARY KEY,
                created_at TEXT NOT NULL,
                client TEXT,
                method TEXT NOT NULL,
                path TEXT NOT NULL,
                status INTEGER NOT NULL,
                mode TEXT,
                stream INTEGER,
                turn_id INTEGER REFERENCES turns(id),
                duration_ms REAL,
                error TEXT
            )""",
            "CREATE INDEX requests_created_at ON requests(created_at)",
        ),
    ),
    (
        3,
        (
            # The remote's text before its stream broke off, when the device then answered (the
            # answer column holds everything the user saw, that text included).
            "ALTER TABLE turns ADD COLUMN remote_partial TEXT",
        ),
    ),
    (
        4,
        (
            # Routing over a pool: the target a turn went to, and what it cost at the pool's
            # prices (the spend a pool's budget counts).
            "ALTER TABLE turns ADD COLUMN target TEXT",
            "ALTER TABLE turns ADD COLUMN cost REAL",
        ),
    ),
]

# Set once by start_turn; finish_turn may not rewrite a turn's identity.
_FIXED = frozenset({"id", "conversation_id", "created_at"})


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class LogNotWritableError(RpraError):
    """The turn log cannot be written: RPRA_HOME, or the file in it, is read-only or not a directory."""


def write_problem(path: Path | str) -> str | None:
    """Why the log file ``path`` cannot be written, as an error message that says what to do, or
    None when it can be. Looks without creating: a missing directory is judged by the nearest one
    above it, where first use will create it. (`rpra doctor` asks this too.)"""
    path = Path(path)
    where = path.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    fix = "point RPRA_HOME at a writable directory, or run with --set log=false (RPRA_LOG=0)"
    if not where.is_dir():
        return f"{where} is not a directory, so the turn log {path} cannot be created: move that file aside, {fix}."
    # SQLite writes beside the file (its -wal and -shm files), so the directory must be writable too.
    if not os.access(where, os.W_OK | os.X_OK):
        return f"{where} is not writable, so the turn log {path} cannot be written: make it writable, {fix}."
    if path.exists() and not os.access(path, os.W_OK):
        return f"The turn log {path} is read-only: make it writable, {fix}."
    return None


class LogStore:
    """A SQLite file of conversations and turns, safe to share between threads and processes.

    Threads: one connection guarded by a lock. A turn writes two tiny rows, so serialising them
    inside a process costs microseconds and rules out "database is locked" between our own
    threads; one connection per call would buy parallel reads nobody needs for the price of
    reopening the file on every write. Processes (a CLI next to a server): WAL lets readers
    proceed during a write, and the busy timeout makes a writer wait its turn instead of failing.

    ``read_only`` opens an existing log for reading only, e.g. where RPRA_HOME is not writable;
    it applies no migration, and every write raises LogNotWritableError.
    """

    def __init__(self, path: Path | str, *, timeout: float = 10.0, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        try:
            if read_only:
                self._db = self._connect_read_only(timeout)
                self._check_version(self._db.execute("PRAGMA user_version").fetchone()[0])
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # isolation_level=None: autocommit. Each INSERT/UPDATE is durable when execute()
                # returns; the only multi-statement transaction (migrations) is opened explicitly.
                self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.execute("PRAGMA foreign_keys = ON")
                self._migrate()
            self._db.row_factory = sqlite3.Row
            self._columns = {row["name"] for row in self._db.execute("PRAGMA table_info(turns)")}
        except BaseException as exc:
            if self._db is not None:
                self._db.close()
            # Ask why only once opening failed: a read-only home is the common cause, and SQLite's
            # own words for it ("attempt to write a readonly database") read like damage.
            if isinstance(exc, (OSError, sqlite3.DatabaseError)) and not read_only and (problem := write_problem(self.path)):
                raise LogNotWritableError(problem) from exc
            if isinstance(exc, sqlite3.DatabaseError):
                raise RpraError(
                    f"Cannot open the log database {self.path}: {exc}. If it is damaged or not an rpra "
                    "log, move it aside (a new one will be started), or turn logging off with RPRA_LOG=0."
                ) from exc
            raise

    @classmethod
    def default(cls, *, for_reading: bool = False) -> LogStore:
        """The store at ``RPRA_HOME/logs.db``. ``for_reading`` (`rpra logs`): where RPRA_HOME is
        not writable, open an existing log read-only instead of failing."""
        from rpra.config import home

        path = home() / "logs.db"
        try:
            return cls(path)
        except LogNotWritableError:
            if for_reading and path.is_file():
                return cls(path, read_only=True)
            raise

    def _connect_read_only(self, timeout: float) -> sqlite3.Connection:
        if not self.path.is_file():
            raise RpraError(f"No log at {self.path}: nothing has been logged there yet.")
        uri = self.path.resolve().as_uri()
        db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=timeout, check_same_thread=False)
        try:
            db.execute("PRAGMA user_version").fetchone()
            return db
        except sqlite3.OperationalError:
            db.close()
        # A WAL file cannot be read where its -shm index is missing and cannot be created (a
        # read-only directory). A missing index means no connection is open on the file, so no
        # writer is active: reading it as immutable sees every committed turn.
        return sqlite3.connect(f"{uri}?immutable=1", uri=True, timeout=timeout, check_same_thread=False)

    def _check_version(self, version: int) -> None:
        latest = max(number for number, _ in MIGRATIONS)
        if version > latest:
            raise RpraError(
                f"The log database {self.path} has schema version {version}, written by a newer rpra "
                f"(this one knows up to {latest}). Upgrade rpra, or set RPRA_HOME to another directory."
            )
        if self.read_only and version < latest:
            raise RpraError(
                f"The log database {self.path} has schema version {version}, older than this rpra's {latest}, "
                "and cannot be upgraded read-only: run an rpra command that logs once with write access."
            )

    def _migrate(self) -> None:
        # IMMEDIATE takes the write lock before reading the version, so two processes opening a
        # fresh file at once cannot both apply migration 1.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            self._check_version(version)
            for number, statements in MIGRATIONS:
                if number > version:
                    for statement in statements:
                        self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version = {int(number)}")
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def _execute(self, sql: str, params: tuple | list = ()) -> sqlite3.Cursor:
        """Run a write (reads go through _rows)."""
        if self.read_only:
            raise LogNotWritableError(
                f"The log {self.path} is open read-only; writing needs a writable RPRA_HOME, or --set log=false."
            )
        with self._lock:
            return self._db.execute(sql, params)

    def _rows(self, sql: str, params: tuple | list = ()) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
        return [_decode(row) for row in rows]

    def new_conversation(self, *, source: str, title: str | None = None) -> str:
        """Start a conversation (``source``: 'chat', 'ask', 'serve', ...) and return its id."""
        conversation_id = uuid.uuid4().hex
        self._execute(
            "INSERT INTO conversations (id, created_at, title, source) VALUES (?, ?, ?, ?)",
            (conversation_id, _now(), title, source),
        )
        return conversation_id

    def start_turn(
        self,
        conversation_id: str,
        *,
        prompt: str,
        messages: list[dict],
        model: str,
        protocol: str,
        predictor: str,
        mode: str,
    ) -> int:
        """Record a turn as 'running', committed at once, and return its id for finish_turn/fail_turn."""
        try:
            cursor = self._execute(
                "INSERT INTO turns (conversation_id, created_at, status, messages_json, prompt, model,"
                " protocol, predictor, mode) VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?)",
                (conversation_id, _now(), json.dumps(messages, ensure_ascii=False), prompt, model, protocol,
                 predictor, mode),
            )
        except sqlite3.IntegrityError:
            raise ValueError(
                f"No conversation {conversation_id!r} in {self.path}; create one with new_conversation()."
            ) from None
        return cursor.lastrowid

    def finish_turn(self, turn_id: int, **fields: Any) -> None:
        """Fill in a turn's results; ``status`` becomes 'done' unless given.

        Keys are column names. Values for ``*_json`` columns are JSON-encoded (read back decoded).
        """
        fields.setdefault("status", "done")
        unknown = sorted(set(fields) - self._columns)
        if unknown:
            raise ValueError(f"Unknown turn field(s) {', '.join(unknown)}. Known: {', '.join(sorted(self._columns))}.")
        fixed = sorted(set(fields) & _FIXED)
        if fixed:
            raise ValueError(f"{', '.join(fixed)} cannot be changed once a turn has started.")
        values = []
        for name, value in fields.items():
            if name.endswith("_json"):
                value = None if value is None else json.dumps(value, ensure_ascii=False)
            elif isinstance(value, (dict, list, tuple)):
                raise ValueError(f"{name} takes a single value; only *_json fields take structured data.")
            values.append(value)
        assignments = ", ".join(f"{name} = ?" for name in fields)  # names checked against the schema above
        try:
            cursor = self._execute(f"UPDATE turns SET {assignments} WHERE id = ?", (*values, turn_id))
        except sqlite3.IntegrityError as exc:  # e.g. a status other than running/done/error
            raise ValueError(f"Turn {turn_id} rejected {sorted(fields)}: {exc}.") from None
        if cursor.rowcount == 0:
            raise ValueError(f"No turn {turn_id} in {self.path}.")

    def log_request(
        self,
        *,
        client: str | None,
        method: str,
        path: str,
        status: int,
        mode: str | None = None,
        stream: bool | None = None,
        turn_id: int | None = None,
        duration_ms: float | None = None,
        error: str | None = None,
    ) -> int:
        """Record one HTTP request the server answered (or refused)."""
        cursor = self._execute(
            "INSERT INTO requests (created_at, client, method, path, status, mode, stream, turn_id, duration_ms, error)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (_now(), client, method, path, status, mode, None if stream is None else int(stream), turn_id, duration_ms, error),
        )
        return cursor.lastrowid

    def requests(self, limit: int = 20) -> list[dict[str, Any]]:
        """The latest server requests, newest first."""
        return self._rows("SELECT * FROM requests ORDER BY id DESC LIMIT ?", (limit,))

    def spent(self, since: str) -> float:
        """What the turns since ``since`` (an ISO timestamp, UTC) cost at their pool's prices."""
        row = self._rows("SELECT COALESCE(SUM(cost), 0) AS total FROM turns WHERE created_at >= ? AND cost IS NOT NULL", (since,))
        return float(row[0]["total"])

    def fail_turn(self, turn_id: int, error: str) -> None:
        """Mark a turn as failed, keeping whatever it had recorded."""
        self.finish_turn(turn_id, status="error", error=error)

    def turns(
        self,
        *,
        query: str | None = None,
        conversation: str | None = None,
        route: str | None = None,
        limit: int = 20,
    ) -> list[dict[str, Any]]:
        """The latest turns, newest first. ``query`` matches prompt or answer, case-insensitively."""
        where, params = [], []
        if query:
            # Escape LIKE's wildcards so a search for "100%" means the text "100%".
            pattern = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            where.append("(prompt LIKE ? ESCAPE '\\' OR answer LIKE ? ESCAPE '\\')")
            params += [pattern, pattern]
        if conversation:
            where.append("conversation_id = ?")
            params.append(conversation)
        if route:
            where.append("route = ?")
            params.append(route)
        sql = "SELECT * FROM turns" + (" WHERE " + " AND ".join(where) if where else "")
        # Ids grow with time and, unlike timestamps, never tie.
        return self._rows(sql + " ORDER BY id DESC LIMIT ?", (*params, limit))

    def get_turn(self, turn_id: int) -> dict[str, Any] | None:
        """One turn by id, or None."""
        rows = self._rows("SELECT * FROM turns WHERE id = ?", (turn_id,))
        return rows[0] if rows else None

    def conversations(self, limit: int = 20) -> list[dict[str, Any]]:
        """The latest conversations, newest first, each with its ``turn_count``."""
        return self._rows(
            "SELECT c.*, COUNT(t.id) AS turn_count FROM conversations c"
            " LEFT JOIN turns t ON t.conversation_id = c.id"
            " GROUP BY c.id ORDER BY c.created_at DESC, c.rowid DESC LIMIT ?",
            (limit,),
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> LogStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    return {
        key: json.loads(row[key]) if key.endswith("_json") and row[key] is not None else row[key]
        for key in row.keys()
    }
