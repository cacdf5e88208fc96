"""Remote and judge calls run concurrently with the device's work, bounded (fast: fakes)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from rpra.benchmarks.collect import collect
from rpra.benchmarks.collection import Collection, Provenance
from rpra.benchmarks.data import Item
from rpra.errors import InputError, RemoteError


class _Collector:
    """The Collector's interface: a device part on the caller's thread, the rest on the network."""

    def __init__(self, *, latency: float, fail_on: str | None = None, skip: str | None = None):
        self.remote, self.judge = object(), object()  # there is a network side
        self.provenance = Provenance(suite="s", split="test", device_model="m", device_sha256="a" * 64, remote_id="r",
                                     judge_id="j", prompts_version="p", settings={})  # fmt: skip
        self.latency, self.fail_on, self.skip = latency, fail_on, skip
        self.lock, self.now, self.most = threading.Lock(), 0, 0
        self.device_threads: set[str] = set()

    def has_all(self, record: dict) -> bool:
        return record.get("remote_answer") is not None

    def device_part(self, item: Item) -> dict:
        self.device_threads.add(threading.current_thread().name)
        return {"device": item.id}

    def finish(self, item: Item, part: dict) -> dict:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            time.sleep(self.latency)
            if item.id == self.fail_on:
                raise RemoteError("the judge went away")
            if item.id == self.skip:
                raise InputError("the remote says the prompt is too long")
            return {"id": item.id, "exact_local": 1.0, "remote_answer": "1", "label": {"pass": True}}
        finally:
            with self.lock:
                self.now -= 1


def _items(n: int) -> list[Item]:
    return [Item(id=f"i{k}", suite="s", prompt=f"q{k}", reference=None, category=None, gold="1", kind="number") for k in range(n)]


def test_network_calls_overlap_up_to_the_bound_and_every_record_lands(tmp_path):
    collector = _Collector(latency=0.05, skip="i3")
    collection = Collection(tmp_path / "c")
    records = collect(_items(12), collector, collection, progress=False, in_flight=3)
    assert 2 <= collector.most <= 3  # several calls at once, never more than the bound
    assert collector.device_threads == {threading.main_thread().name}  # the device is never called from the pool
    assert sorted(r["id"] for r in records) == sorted(f"i{k}" for k in range(12) if k != 3)
    assert sorted(Collection.open(tmp_path / "c").ids) == sorted(r["id"] for r in records)  # journalled
    assert [s["id"] for s in json.loads((tmp_path / "c" / "skipped.json").read_text())] == ["i3"]


def test_one_at_a_time_when_asked(tmp_path):
    collector = _Collector(latency=0.01)
    collect(_items(5), collector, Collection(tmp_path / "c"), progress=False, in_flight=1)
    assert collector.most == 1


def test_a_failing_remote_stops_the_run_and_keeps_what_was_finished(tmp_path):
    collector = _Collector(latency=0.02, fail_on="i6")
    with pytest.raises(RemoteError, match="went away"):
        collect(_items(12), collector, Collection(tmp_path / "c"), progress=False, in_flight=2)
    kept = Collection.open(tmp_path / "c").ids
    assert {"i0", "i1", "i2", "i3"} <= kept and "i6" not in kept  # a re-run does only the rest


def test_a_record_without_the_remotes_side_is_collected_again_and_superseded(tmp_path):
    collection = Collection(tmp_path / "c")
    with collection.appender() as add:  # e.g. collected with --verified, no remote
        add({"id": "i0", "exact_local": 1.0, "remote_answer": None, "label": {"pass": True}})
        add({"id": "i1", "exact_local": 0.0, "remote_answer": "2", "label": {"pass": False}})
    collector = _Collector(latency=0.0)
    records = collect(_items(2), collector, Collection.open(tmp_path / "c"), progress=False, in_flight=2)
    assert [(r["id"], r["remote_answer"]) for r in records] == [("i0", "1"), ("i1", "2")]  # i1 was complete: kept
    again = Collection.open(tmp_path / "c")
    assert [(r["id"], r["remote_answer"]) for r in again.records] == [("i0", "1"), ("i1", "2")]  # the later i0 wins


def test_ctrl_c_keeps_the_records_whose_calls_were_already_running(tmp_path):
    collector = _Collector(latency=0.2)
    real_part = collector.device_part

    def interrupted_at_i3(item):
        if item.id == "i3":
            raise KeyboardInterrupt  # the user pressed Ctrl-C while i0..i2 were with the network
        return real_part(item)

    collector.device_part = interrupted_at_i3
    with pytest.raises(KeyboardInterrupt):
        collect(_items(6), collector, Collection(tmp_path / "c"), progress=False, in_flight=4)
    assert Collection.open(tmp_path / "c").ids == {"i0", "i1", "i2"}


def test_a_second_collector_into_the_same_collection_is_refused_and_a_reader_leaves_a_busy_journal_alone(tmp_path):
    from rpra.errors import ConfigError

    held = Collection(tmp_path / "c")
    with held.writing(), held.appender() as add:
        add({"id": "i0", "exact_local": 1.0, "remote_answer": "1", "label": {"pass": True}})
        with open(held.journal, "a") as f:
            f.write('{"id": "i1", "exa')  # the collector is mid-line
        with pytest.raises(ConfigError, match="Another process is collecting"):
            collect(_items(2), _Collector(latency=0.0), Collection.open(tmp_path / "c"), progress=False)
        assert Collection.open(tmp_path / "c").ids == {"i0"} and held.journal.read_text().endswith('"exa')  # not repaired under it
    records = collect(_items(2), _Collector(latency=0.0), Collection.open(tmp_path / "c"), progress=False)  # now free: repaired, resumed
    assert [r["id"] for r in records] == ["i0", "i1"]
