"""Every model call of the benchmark, cached on disk by content hash.

A benchmark run makes thousands of slow model calls (answers, judgements); a crash, a new metric
or a second look at the results must not pay for them again. The key is the sha256 of everything
that decides a call's result: its kind, the model's *content* and the full request. So a changed
prompt, parameter or model never meets a stale entry, and the cache needs no invalidation.

``model_id`` must name the model's content, not where it lives: a GGUF's sha256, or for a remote
API the endpoint URL and model name (the best identity such an API offers). A local server on a
random port is *not* identified by its URL; give it the sha256 of the GGUF it serves.

Only results are stored: a call that raises is not cached and is made again next time.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sqlite3
import threading
import zlib
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from rpra.errors import RpraError

_SCHEMA_VERSION = 1


def key(kind: str, model_id: str, payload: dict) -> str:
    """The cache key of one call: sha256 of a canonical JSON of (kind, model_id, payload).

    Canonical: sorted keys, no whitespace, no NaN. Numbers keep their JSON spelling, so ``0`` and
    ``0.0`` give different keys; build payloads the same way every time.
    """
    if not kind or not model_id:
        raise ValueError("A cache key needs a kind and a model_id (the model's content hash or endpoint + name).")
    try:
        text = json.dumps(
            [kind, model_id, payload], sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"The payload of a {kind!r} call is not plain JSON, so it cannot be keyed: {exc}.") from None
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class CallCache:
    """A SQLite file of call results (JSON objects) by key; safe across threads and processes.

    Same pattern as ``rpra.store.LogStore``: one autocommit connection per object guarded by a
    lock; WAL so readers in other processes never wait for a writer, and a busy timeout so two
    writers take turns instead of failing.
    """

    def __init__(self, path: Path | str | None = None, *, timeout: float = 30.0) -> None:
        if path is None:
            from rpra.config import home

            path = home() / "cache" / "calls.sqlite"
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode = WAL")
            self._setup()
        except BaseException as exc:
            self._db.close()
            if isinstance(exc, sqlite3.DatabaseError):
                raise RpraError(
                    f"Cannot open the call cache {self.path}: {exc}. It holds only cached model calls: "
                    "delete it (they will be made again) or point the benchmark at another cache file."
                ) from exc
            raise

    @classmethod
    def default(cls) -> CallCache:
        """The cache at ``RPRA_HOME/cache/calls.sqlite``."""
        return cls()

    def _setup(self) -> None:
        # IMMEDIATE: two processes opening a fresh file at once cannot both create the table.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise RpraError(
                    f"The call cache {self.path} has schema version {version}, written by a newer rpra "
                    f"(this one knows {_SCHEMA_VERSION}). Upgrade rpra, or use another cache file."
                )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, value_json TEXT NOT NULL, created_at TEXT NOT NULL)"
            )
            self._db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def get(self, key: str) -> dict | None:
        """The stored result for ``key``, or None."""
        with self._lock:
            row = self._db.execute("SELECT value_json FROM calls WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, value: dict) -> None:
        """Store ``value`` (a JSON object) under ``key``, replacing any earlier one."""
        if not isinstance(value, dict):
            raise TypeError(f"The call cache stores JSON objects (dicts); got {type(value).__name__}.")
        text = json.dumps(value, ensure_ascii=False)  # -Infinity is a logprob a server may send
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO calls (key, value_json, created_at) VALUES (?, ?, ?)", (key, text, now)
            )

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> CallCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cached(cache: CallCache | None, kind: str, model_id: str, payload: dict, fn: Callable[[], dict]) -> dict:
    """The stored result of this call, or ``fn()``'s, stored before it is returned. An exception
    from ``fn`` propagates and nothing is stored. With ``cache=None``, ``fn()`` is called every
    time. (Whether it was a hit: wrap ``fn`` to note that it ran, as ``Judge.score`` does.)"""
    if cache is None:
        return fn()
    call_key = key(kind, model_id, payload)
    hit = cache.get(call_key)
    if hit is not None:
        return hit
    value = fn()
    cache.put(call_key, value)
    return value


class Journal:
    """A cache whose entries are also kept in a committed file, for calls too slow to lose with the
    machine (a report card's writer: about an hour of one core per build).

    The file is gzipped JSON Lines of ``{"key", "value"}``, one gzip member appended per call as it
    returns, so a build stopped at any point has kept every finished call (a torn last member from a
    hard kill is cut; a file that is not gzip at all is refused). Opening a journal copies its entries into ``cache``; ``get`` and
    ``put`` are the cache's (``put`` also appends to the file unless ``write=False``), so ``cached``
    takes either. Keys name the calls' content (``key``), so a journal written on one machine
    replays on another.
    """

    def __init__(self, cache: CallCache, path: Path, *, write: bool = True) -> None:
        self.cache, self.path, self.write = cache, Path(path), write
        entries, good = self._read()
        if good == 0 and self.path.is_file() and not self.path.read_bytes().startswith(b"\x1f\x8b"):  # not even a torn gzip member
            raise RpraError(f"{self.path} is not a journal of model calls (gzipped JSON lines): move it away, or restore it from git.")
        for entry in entries:
            if cache.get(entry["key"]) is None:
                cache.put(entry["key"], entry["value"])
        self.loaded = len(entries)
        if write and self.path.is_file() and good < self.path.stat().st_size:
            with open(self.path, "r+b") as f:  # cut the torn tail, or every call appended after it is unreadable
                f.truncate(good)

    def _read(self) -> tuple[list[dict], int]:
        """The entries of the whole members, and the byte length they take."""
        if not self.path.is_file():
            return [], 0
        entries, data, good = [], self.path.read_bytes(), 0
        while good < len(data):
            inflate = zlib.decompressobj(wbits=31)
            try:
                text = inflate.decompress(data[good:])
            except zlib.error:
                break
            if not inflate.eof:
                break
            good = len(data) - len(inflate.unused_data)
            for line in text.decode("utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(entry, dict) and isinstance(entry.get("key"), str) and isinstance(entry.get("value"), dict):
                    entries.append(entry)
        return entries, good

    def get(self, key: str) -> dict | None:
        return self.cache.get(key)

    def put(self, key: str, value: dict) -> None:
        self.cache.put(key, value)
        if not self.write:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"key": key, "value": value}, ensure_ascii=False, sort_keys=True) + "\n"
        with open(self.path, "ab") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as gz:
            gz.write(line.encode("utf-8"))
