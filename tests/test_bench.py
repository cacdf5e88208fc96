"""The deferral benchmark end to end on real parts: SmolLM2 through llama.cpp as the device, a real
llama-cpp server on 127.0.0.1 as remote and judge (the same small model, for speed: the numbers
mean nothing here, the mechanics are real)."""

from __future__ import annotations

import json
import os
import subprocess
from contextlib import contextmanager
from dataclasses import replace

import pytest

from rpra.benchmarks import bench
from rpra.benchmarks.collect import Collector
from rpra.benchmarks.collection import Collection, collection_dir
from rpra.benchmarks.report_cards import latest_card
from rpra.config import Settings

pytestmark = pytest.mark.slow


@pytest.fixture
def settings(model_path, remote_server) -> Settings:
    return Settings(
        model=str(model_path), remote_url=remote_server.url, remote_model="stand-in",
        max_tokens=16, reason_tokens=8, n_ctx=1024, n_threads=2, log=False,
    )  # fmt: skip


def collect(settings, limit, **kw):
    return bench.run_collect(settings, suite="arithmetic", which="test", limit=limit, remote_max_tokens=16, progress=False,
                             judge_grammar=True, **kw)  # the test server is llama-cpp-python's: grammar is safe


def test_collection_records_everything_the_benchmark_needs(settings):
    records, out_dir = collect(settings, 2)
    assert len(records) == 2 and (out_dir / "records.parquet").exists() and (out_dir / "provenance.json").exists()
    r = records[0]
    for field in ("pa", "rpra"):
        assert set(r[field]["distribution"]) == {str(i) for i in range(1, 11)}
        assert 1 <= r[field]["expected"] <= 10
    assert r["local_answer"] and r["remote_answer"] and r["gold"] is not None
    assert r["exact_local"] in (0.0, 1.0) and r["exact_remote"] in (0.0, 1.0)
    assert r["judge_local"]["method"] in ("logprobs", "parsed", "unparseable")
    provenance = json.loads((out_dir / "provenance.json").read_text())
    assert provenance["device_sha256"] and provenance["prompts_version"]


def test_an_interrupted_collection_resumes_without_redoing_finished_items(settings, monkeypatch):
    from rpra.benchmarks import collect as collect_module

    real_part, real_device, parts, device_calls = Collector.device_part, collect_module.device_record, [], []

    def dies_on_third(self, item):
        parts.append(item.id)
        if len(parts) == 3:
            raise KeyboardInterrupt  # the user pressed Ctrl-C mid-run
        return real_part(self, item)

    monkeypatch.setattr(Collector, "device_part", dies_on_third)
    monkeypatch.setattr(collect_module, "device_record", lambda *a: (device_calls.append(1), real_device(*a))[1])
    with pytest.raises(KeyboardInterrupt):
        collect(settings, 4)
    # Both items the device finished were with the network when Ctrl-C came: their running calls finish and are kept.
    assert len(Collection.open(collection_dir(settings.model, "arithmetic", "test")).records) == 2
    assert len(device_calls) == 2

    monkeypatch.setattr(Collector, "device_part", real_part)
    records, _ = collect(settings, 4)
    assert len(records) == 4 and len(device_calls) == 4  # each item's device work done once, over both runs


def test_a_torn_last_line_is_dropped_and_redone(settings):
    records, out_dir = collect(settings, 2)
    journal = out_dir / "records.jsonl"
    lines = journal.read_text().splitlines()
    journal.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # killed mid-write
    again, _ = collect(settings, 2)
    assert [r["id"] for r in again] == [r["id"] for r in records]
    assert all(json.loads(line) for line in journal.read_text().splitlines())


def test_rerunning_costs_no_remote_or_judge_call(settings, monkeypatch):
    records, out_dir = collect(settings, 2)
    (out_dir / "records.jsonl").unlink()
    # Same remote identity, but nothing listens there: every call must come from the cache.
    live_id = f"{settings.remote_url.rstrip('/')}|stand-in"
    offline = replace(settings, remote_url="http://127.0.0.1:9/v1", remote_retries=0)
    real_endpoints = bench.endpoints

    @contextmanager
    def same_identity(s, **kw):
        with real_endpoints(s, **kw) as ep:
            ep.remote_id = ep.judge_id = live_id
            yield ep

    monkeypatch.setattr(bench, "endpoints", same_identity)
    again, _ = collect(offline, 2)

    def scores(rs):
        return [(r["id"], r["remote_answer"], r["judge_local"]["score"], r["judge_remote"]["score"]) for r in rs]

    assert scores(again) == scores(records)
    assert all(r["judge_local"]["cached"] and r["judge_remote"]["cached"] for r in again)


def test_bench_run_through_the_cli_writes_table_json_plot_and_report(rpra_bin, settings, isolated_home):
    env = {**os.environ, "RPRA_MODEL": settings.model, "RPRA_REMOTE_URL": settings.remote_url, "RPRA_REMOTE_MODEL": "stand-in",
           "RPRA_MAX_TOKENS": "16", "RPRA_N_CTX": "1024", "RPRA_N_THREADS": "2"}  # fmt: skip
    run = subprocess.run([rpra_bin, "bench", "run", "--suite", "rpra-mix", "--limit", "6", "--judge-grammar", "--json"], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    routers = out["results"]["routers"]
    suites = {r["suite"] for r in Collection.load(settings.model, "rpra-mix", "test").records}
    assert len(suites) >= 3  # a few items from each of several suites
    assert {"zero-shot PA", "zero-shot RPRA", "random", "oracle", "always-local", "always-remote"} <= set(routers)
    # the baselines that read the answer, run on the real model
    assert {"answer confidence: mean (after the answer)", "self-verification, AutoMix (after the answer)"} <= set(routers)
    # On a handful of items the local answers can match the remote's, where APGR is ill-defined;
    # the oracle's best mix is at least as good as random's best (an end point: always local or remote).
    assert max(routers["oracle"]["curve"]["quality"]) >= max(routers["random"]["curve"]["quality"]) - 1e-9
    for path in out["files"].values():
        assert os.path.getsize(path) > 0


def test_an_item_the_device_cannot_take_is_skipped_and_reported(settings, monkeypatch):
    from rpra.errors import PromptTooLongError

    real_record = Collector.device_part

    def too_long_first(self, item):
        if item.id == first_id:
            raise PromptTooLongError("The prompt is 5000 tokens ...")
        return real_record(self, item)

    first_id = bench.items_for("arithmetic", "test", limit=2)[0].id
    monkeypatch.setattr(Collector, "device_part", too_long_first)
    records, out_dir = collect(settings, 2)
    assert [r["id"] for r in records] != [] and first_id not in {r["id"] for r in records}
    (skipped,) = json.loads((out_dir / "skipped.json").read_text())
    assert skipped["id"] == first_id and "5000 tokens" in skipped["reason"]


def test_a_users_file_with_malformed_rows_is_collected_and_the_rows_reported(settings, tmp_path, capsys):
    data = tmp_path / "mine.jsonl"
    rows = [{"prompt": f"What is {i} + 1?", "reference": str(i + 1), "gold": str(i + 1)} for i in range(12)]
    data.write_text("\n".join(json.dumps(r) for r in rows[:6]) + "\n{not json\n" + json.dumps({"reference": "x"}) + "\n"
                    + "\n".join(json.dumps(r) for r in rows[6:]) + "\n")  # fmt: skip
    records, out_dir = bench.run_collect(settings, suite=str(data), which="test", limit=2, remote_max_tokens=16,
                                         progress=False, judge_grammar=True)  # fmt: skip
    assert len(records) == 2 and all(r["suite"].startswith("file:") for r in records)
    assert out_dir.name.endswith("mine.jsonl--test")
    err = capsys.readouterr().err
    assert "line 7" in err and "line 8" in err


def test_calibrate_writes_a_threshold_that_defers_the_target_share(rpra_bin, settings, isolated_home):
    from rpra.config import load_settings

    env = {**os.environ, "RPRA_MODEL": settings.model, "RPRA_REMOTE_URL": settings.remote_url, "RPRA_REMOTE_MODEL": "stand-in",
           "RPRA_MAX_TOKENS": "16", "RPRA_N_CTX": "1024", "RPRA_N_THREADS": "2"}  # fmt: skip
    run = subprocess.run([rpra_bin, "calibrate", "--target-share", "0.5", "--suite", "arithmetic", "--limit", "4", "--judge-grammar"],
                         env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr
    threshold = load_settings().threshold  # read back from $RPRA_HOME/config.toml
    records = Collection.load(settings.model, "arithmetic", "calibration").records
    deferred = sum(r["pa"]["expected"] < threshold for r in records)
    assert "remote share 50.0%" in run.stdout and deferred == len(records) // 2


def test_report_card_build_writes_a_grounded_card_that_the_benchmark_then_evaluates(rpra_bin, settings, isolated_home):
    env = {**os.environ, "RPRA_MODEL": settings.model, "RPRA_REMOTE_URL": settings.remote_url, "RPRA_REMOTE_MODEL": "stand-in",
           "RPRA_MAX_TOKENS": "16", "RPRA_N_CTX": "1024", "RPRA_N_THREADS": "2"}  # fmt: skip
    build = subprocess.run([rpra_bin, "report-card", "build", "--suite", "arithmetic", "--limit", "3", "--batch-size", "2",
                            "--max-words", "30", "--judge-grammar"], env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert build.returncode == 0, build.stderr
    show = subprocess.run([rpra_bin, "report-card", "show"], env=env, capture_output=True, text=True, timeout=60)
    assert show.returncode == 0 and "Measured on 3 judged answers:" in show.stdout and "- arithmetic: 3 answers" in show.stdout
    assert "version 1" in show.stderr
    run = subprocess.run([rpra_bin, "bench", "run", "--suite", "arithmetic", "--limit", "2", "--judge-grammar", "--json"], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr
    card_router = json.loads(run.stdout)["results"]["routers"]["report card PA"]
    assert len(card_router["curve"]["share"]) == 3  # 0, 1 or 2 of 2 deferred
    # From verified train records of two suites: device calls only (no remote answers, no judge), a new version.
    train = subprocess.run([rpra_bin, "report-card", "build", "--verified", "--split", "train", "--suite", "arithmetic,gcd", "--limit", "2",
                            "--batch-size", "2", "--max-words", "30"], env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert train.returncode == 0, train.stderr
    card = latest_card(settings.model)
    assert card.version == 2 and card.meta["split"] == "train" and card.meta["verified"] and card.meta["updates"] == 2
    assert "Measured on 4 verified answers:" in card.text and "- arithmetic: 2 answers" in card.text and "- gcd: 2 answers" in card.text
    for suite in ("arithmetic", "gcd"):
        records = Collection.load(settings.model, suite, "train").records
        assert len(records) == 2 and all(r["judge_local"] is None and r["remote_answer"] is None for r in records)


def test_a_report_card_is_never_built_from_the_test_split(rpra_bin, isolated_home):
    run = subprocess.run([rpra_bin, "report-card", "build", "--split", "test"], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "test split" in run.stderr


def test_a_limited_sample_of_a_split_spans_a_suites_levels():
    # The source lists arithmetic by level; the first 8 train items in that order would be level 1.
    chosen = bench.items_for("arithmetic", "train", limit=8)
    assert len(chosen) == 8 and {item.category for item in chosen} == {"level-1", "level-2", "level-3", "level-4"}
    assert [i.id for i in bench.items_for("arithmetic", "train", limit=8)] == [i.id for i in chosen]  # the same on every run
    assert {i.id for i in chosen} <= {i.id for i in bench.items_for("arithmetic", "train", limit=None)}  # still the train split


def test_a_card_journal_with_nothing_committed_to_write_into_is_refused_before_any_call(rpra_bin, isolated_home):
    run = subprocess.run([rpra_bin, "report-card", "build", "--journal"], capture_output=True, text=True, timeout=60)  # RPRA_SEEDS="" here
    assert run.returncode != 0 and "--journal needs a folder of committed results" in run.stderr
