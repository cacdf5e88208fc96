"""The log store against real SQLite files: migrations, crash safety, search, concurrency."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from rpra import store as store_module
from rpra.errors import RpraError
from rpra.store import LogStore

LATEST = max(number for number, _ in store_module.MIGRATIONS)


def _version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("PRAGMA user_version").fetchone()[0]


def _start(store: LogStore, conversation: str, prompt: str = "hello") -> int:
    return store.start_turn(
        conversation,
        prompt=prompt,
        messages=[{"role": "user", "content": prompt}],
        model="smollm2-135m-instruct",
        protocol="rpra",
        predictor="zero-shot",
        mode="auto",
    )


@pytest.fixture
def store(tmp_path):
    with LogStore(tmp_path / "logs.db") as s:
        yield s


def test_fresh_file_gets_the_schema_and_latest_version(tmp_path):
    path = tmp_path / "logs.db"
    LogStore(path).close()
    with sqlite3.connect(path) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        indexes = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        columns = {row[1] for row in db.execute("PRAGMA table_info(turns)")}
        journal = db.execute("PRAGMA journal_mode").fetchone()[0]
    assert {"conversations", "turns"} <= tables
    assert {"turns_created_at", "turns_conversation_id"} <= indexes
    assert {"messages_json", "prediction_json", "sent_remote_json", "answered_by", "fallback", "total_ms"} <= columns
    assert journal == "wal"
    assert _version(path) == LATEST


def test_reopening_keeps_data_and_applies_nothing_twice(tmp_path):
    path = tmp_path / "logs.db"
    with LogStore(path) as s:
        conversation = s.new_conversation(source="ask")
        _start(s, conversation)
    with LogStore(path) as s:
        assert len(s.turns()) == 1
    assert _version(path) == LATEST


def test_default_lives_under_rpra_home_and_creates_it(tmp_path, monkeypatch):
    monkeypatch.setenv("RPRA_HOME", str(tmp_path / "nested" / "home"))
    with LogStore.default() as s:
        assert s.path == tmp_path / "nested" / "home" / "logs.db"
    assert s.path.exists()


def test_older_database_is_upgraded_in_place(tmp_path, monkeypatch):
    path = tmp_path / "logs.db"
    with LogStore(path) as s:
        turn = _start(s, s.new_conversation(source="chat"))
    added = (LATEST + 1, ("ALTER TABLE turns ADD COLUMN rating INTEGER",))
    monkeypatch.setattr(store_module, "MIGRATIONS", [*store_module.MIGRATIONS, added])
    with LogStore(path) as s:
        s.finish_turn(turn, rating=9)  # the new column is known without editing the store
        assert s.get_turn(turn)["rating"] == 9
    assert _version(path) == LATEST + 1


def test_failed_migration_rolls_back_entirely(tmp_path, monkeypatch):
    path = tmp_path / "logs.db"
    LogStore(path).close()
    broken = ("ALTER TABLE turns ADD COLUMN rating INTEGER", "THIS IS NOT SQL")
    monkeypatch.setattr(store_module, "MIGRATIONS", [*store_module.MIGRATIONS, (LATEST + 1, broken)])
    with pytest.raises(RpraError):
        LogStore(path)
    assert _version(path) == LATEST
    with sqlite3.connect(path) as db:
        assert "rating" not in {row[1] for row in db.execute("PRAGMA table_info(turns)")}


def test_database_from_a_newer_rpra_is_refused_with_advice(tmp_path):
    path = tmp_path / "logs.db"
    LogStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {LATEST + 5}")
    with pytest.raises(RpraError, match="newer rpra") as info:
        LogStore(path)
    assert "Upgrade rpra" in str(info.value)
    assert _version(path) == LATEST + 5  # left untouched


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path):
    path = tmp_path / "logs.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(RpraError, match="move it aside"):
        LogStore(path)


def test_started_turn_is_committed_before_it_finishes(store):
    turn = _start(store, store.new_conversation(source="chat"), "half done")
    with sqlite3.connect(store.path) as other:  # an independent connection sees only committed rows
        row = other.execute("SELECT status, prompt FROM turns WHERE id = ?", (turn,)).fetchone()
    assert row == ("running", "half done")


def test_crash_mid_turn_loses_no_earlier_turn(tmp_path):
    path = tmp_path / "logs.db"
    script = textwrap.dedent(
        f"""
        import os
        from rpra.store import LogStore
        s = LogStore({str(path)!r})
        c = s.new_conversation(source="chat")
        first = s.start_turn(c, prompt="first", messages=[], model="m", protocol="pa", predictor="p", mode="auto")
        s.finish_turn(first, answer="one", route="local")
        s.start_turn(c, prompt="second", messages=[], model="m", protocol="pa", predictor="p", mode="auto")
        os._exit(1)  # no close, no cleanup: as if the process were killed mid-answer
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    with LogStore(path) as s:
        second, first = s.turns()
    assert (first["prompt"], first["status"], first["answer"]) == ("first", "done", "one")
    assert (second["prompt"], second["status"], second["answer"]) == ("second", "running", None)


def test_finish_turn_round_trips_json_and_scalars(store):
    turn = _start(store, store.new_conversation(source="serve"))
    prediction = {"distribution": {"1": 0.25, "2": 0.75}, "expected": 1.75}
    sent = [{"role": "user", "content": "héllo"}]
    store.finish_turn(
        turn, prediction_json=prediction, sent_remote_json=sent, expected=1.75, route="remote",
        answered_by="remote:gpt-4o", fallback=False, total_ms=12.5, remote_tokens=7,
    )
    row = store.get_turn(turn)
    assert row["prediction_json"] == prediction
    assert row["sent_remote_json"] == sent
    assert row["messages_json"] == [{"role": "user", "content": "hello"}]
    assert (row["status"], row["route"], row["expected"], row["fallback"], row["remote_tokens"]) == (
        "done", "remote", 1.75, 0, 7
    )


def test_fail_turn_records_the_error(store):
    turn = _start(store, store.new_conversation(source="ask"))
    store.fail_turn(turn, "PromptTooLongError: 5000 tokens > 2048")
    row = store.get_turn(turn)
    assert (row["status"], row["error"]) == ("error", "PromptTooLongError: 5000 tokens > 2048")


def test_finish_turn_rejects_unknown_and_fixed_fields(store):
    turn = _start(store, store.new_conversation(source="ask"))
    with pytest.raises(ValueError, match="bogus"):
        store.finish_turn(turn, bogus=1)
    with pytest.raises(ValueError, match="conversation_id"):
        store.finish_turn(turn, conversation_id="elsewhere")
    with pytest.raises(ValueError):
        store.finish_turn(turn, status="maybe")
    assert store.get_turn(turn)["status"] == "running"  # nothing half-applied


def test_missing_turn_and_conversation_are_value_errors(store):
    with pytest.raises(ValueError, match="No turn"):
        store.finish_turn(999, answer="x")
    with pytest.raises(ValueError, match="new_conversation"):
        _start(store, "no-such-conversation")
    assert store.get_turn(999) is None


def test_turns_filter_by_query_conversation_and_route_newest_first(store):
    a, b = store.new_conversation(source="chat"), store.new_conversation(source="chat")
    for conversation, prompt, answer, route in [
        (a, "What is Python?", "A language.", "local"),
        (a, "Prove the Riemann hypothesis", "Deferred.", "remote"),
        (b, "Name a snake", "A PYTHON.", "local"),
    ]:
        store.finish_turn(_start(store, conversation, prompt), answer=answer, route=route)
    assert [t["prompt"] for t in store.turns()] == ["Name a snake", "Prove the Riemann hypothesis", "What is Python?"]
    assert [t["prompt"] for t in store.turns(query="python")] == ["Name a snake", "What is Python?"]
    assert [t["prompt"] for t in store.turns(conversation=a, route="local")] == ["What is Python?"]
    assert [t["prompt"] for t in store.turns(route="remote")] == ["Prove the Riemann hypothesis"]
    assert [t["prompt"] for t in store.turns(limit=2)] == ["Name a snake", "Prove the Riemann hypothesis"]


def test_query_wildcards_are_literal(store):
    conversation = store.new_conversation(source="ask")
    for prompt in ["a 100% answer", "a 1000 answer", "snake_case", "snakeXcase"]:
        _start(store, conversation, prompt)
    assert [t["prompt"] for t in store.turns(query="100%")] == ["a 100% answer"]
    assert [t["prompt"] for t in store.turns(query="e_c")] == ["snake_case"]
    assert [t["prompt"] for t in store.turns(query="%")] == ["a 100% answer"]


def test_conversations_newest_first_with_turn_counts(store):
    first = store.new_conversation(source="chat", title="first")
    second = store.new_conversation(source="serve")
    _start(store, first)
    _start(store, first)
    listed = store.conversations()
    assert [(c["id"], c["turn_count"], c["title"], c["source"]) for c in listed] == [
        (second, 0, None, "serve"),
        (first, 2, "first", "chat"),
    ]
    assert len(store.conversations(1)) == 1


@pytest.mark.parametrize("shared", [True, False], ids=["one-store", "two-stores"])
def test_concurrent_writers_do_not_lock_each_other_out(tmp_path, shared):
    path = tmp_path / "logs.db"
    stores = [LogStore(path)] * 2 if shared else [LogStore(path), LogStore(path)]
    conversation = stores[0].new_conversation(source="serve")
    errors: list[BaseException] = []

    def write(s: LogStore, n: int) -> None:
        try:
            for i in range(n):
                s.finish_turn(_start(s, conversation, f"q{i}"), answer=f"a{i}", total_ms=1.0)
        except BaseException as exc:  # surfaced by the assertion below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(s, 50)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert {t["status"] for t in stores[0].turns(limit=-1)} == {"done"}
    assert len(stores[0].turns(limit=-1)) == 100
    for s in set(stores):
        s.close()


def test_a_home_that_cannot_be_written_is_a_clear_error_not_a_sqlite_one(tmp_path):
    # A file where the directory should be stops even root (chmod does not): the same error path
    # as a read-only directory. test_cli_manage.py covers the read-only directory itself.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(store_module.LogNotWritableError) as info:
        LogStore(blocker / "home" / "logs.db")
    message = str(info.value)
    assert isinstance(info.value, RpraError)
    assert str(blocker) in message and "not a directory" in message
    assert "RPRA_HOME" in message and "--set log=false" in message
    assert "damaged" not in message


def test_read_only_opens_an_existing_log_for_reading_and_refuses_writes(tmp_path):
    path = tmp_path / "logs.db"
    with LogStore(path) as s:
        _start(s, s.new_conversation(source="ask"), "kept")
    with LogStore(path, read_only=True) as reader:
        assert [t["prompt"] for t in reader.turns()] == ["kept"]
        with pytest.raises(store_module.LogNotWritableError, match="read-only"):
            reader.new_conversation(source="ask")


def test_read_only_on_a_missing_log_says_there_is_nothing_to_read(tmp_path):
    with pytest.raises(RpraError, match="No log at"):
        LogStore(tmp_path / "none" / "logs.db", read_only=True)
    assert not (tmp_path / "none").exists()
