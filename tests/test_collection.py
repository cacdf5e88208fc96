"""The collection: labels and their source, seeding from a committed export, one model per folder,
and a verified collection on the real device model."""

from __future__ import annotations

import gzip
import json
from dataclasses import replace

import pytest

from rpra.benchmarks.collection import Collection, Provenance, collection_dir, label, remote_passed, upgrade
from rpra.errors import ConfigError


def _judged(score, *, exact=None, remote=None, exact_remote=None) -> dict:
    return {"id": "x", "judge_local": {"score": score}, "judge_remote": None if remote is None else {"score": remote},
            "exact_local": exact, "exact_remote": exact_remote}  # fmt: skip


def test_a_key_decides_the_label_whatever_the_judge_says():
    assert label(_judged(9.0, exact=0.0)) == {"pass": False, "source": "verified", "level": "great", "remote_better": None, "orderings": 1, "remote_pass": None}
    assert label(_judged(2.0, exact=1.0))["pass"] is True
    assert label({"id": "x", "judge_local": None, "exact_local": 1.0})["source"] == "verified"


def test_without_a_key_the_judge_labels_at_the_pass_mark():
    assert label(_judged(7.0)) == {"pass": True, "source": "judge", "level": "great", "remote_better": None, "orderings": 1, "remote_pass": None}
    assert label(_judged(6.9), pass_mark=7)["pass"] is False and label(_judged(6.0), pass_mark=6)["pass"] is True
    assert label({"id": "x", "judge_local": {"score": None}, "exact_local": None}) == {"pass": None, "source": None, "level": None, "remote_better": None, "orderings": 1, "remote_pass": None}


def test_with_the_options_rotated_both_answers_must_be_right():
    both = label({"id": "x", "exact_local": 1.0, "exact_permuted": 1.0})
    assert both["pass"] is True and both["orderings"] == 2
    assert label({"id": "x", "exact_local": 1.0, "exact_permuted": 0.0})["pass"] is False  # the right letter by position
    assert label({"id": "x", "exact_local": 0.0, "exact_permuted": 1.0})["pass"] is False
    assert label({"id": "x", "exact_local": 1.0, "exact_permuted": None})["orderings"] == 1  # not asked: the one answer decides


def test_a_collection_is_named_after_the_whole_model_name():
    # Path.stem would cut "qwen2.5-coder-0.5b-instruct" at its last dot
    assert collection_dir("qwen2.5-coder-0.5b-instruct", "gsm", "train").name == "qwen2.5-coder-0.5b-instruct--gsm--train"
    assert collection_dir("/models/My Model.gguf", "gsm", "train").name == "My_Model--gsm--train"


def test_three_levels_cover_the_scale():
    assert [label(_judged(s))["level"] for s in (1, 3, 3.4, 4, 6, 6.6, 7, 10)] == ["bad", "bad", "bad", "ok", "ok", "great", "great", "great"]


def test_remote_better_by_the_key_where_both_have_one_else_by_the_judge():
    assert label(_judged(3.0, exact=0.0, remote=2.0, exact_remote=1.0))["remote_better"] is True  # the key wins
    assert label(_judged(3.0, remote=8.0))["remote_better"] is True
    assert label(_judged(5.0, remote=5.0))["remote_better"] is False  # a tie is not better


def test_remote_pass_by_the_key_where_there_is_one_else_by_the_judge():
    assert label(_judged(3.0, exact=0.0, remote=2.0, exact_remote=1.0))["remote_pass"] is True  # the key wins
    assert label(_judged(3.0, remote=8.0))["remote_pass"] is True
    assert label(_judged(3.0, remote=6.0))["remote_pass"] is False  # under the pass mark
    assert label(_judged(3.0, remote=6.0), pass_mark=6)["remote_pass"] is True
    assert remote_passed({"id": "x", "exact_remote": None, "judge_remote": None}) is None  # no remote answer


def test_old_records_gain_their_label_when_read(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "records.jsonl").write_text(json.dumps(_judged(8.0)) + "\n")
    (folder / "provenance.json").write_text(json.dumps({"settings": {"pass_mark": 9}}))
    record = Collection.open(folder).records[0]
    assert record["label"]["pass"] is False and record["label"]["source"] == "judge"  # 8 < the collection's pass mark 9
    assert upgrade(dict(record))["label"] == record["label"]


def _provenance(sha: str) -> Provenance:
    return Provenance("arithmetic", "train", "m", sha, "none", "verifier", "v", {"pass_mark": 7})


def test_an_export_seeds_an_empty_collection_and_is_byte_identical_when_unchanged(tmp_path, monkeypatch, isolated_home):
    seeds = tmp_path / "seeds"
    source = Collection(tmp_path / "m--arithmetic--train", [upgrade({**_judged(5.0 + i), "id": f"i{i}"}) for i in range(3)])
    source.set_provenance(_provenance("a" * 64))
    first = source.export(seeds).read_bytes()
    assert source.export(seeds).read_bytes() == first  # reproducible: safe to re-export and commit
    assert [json.loads(line)["id"] for line in gzip.decompress(first).decode().splitlines()] == ["i0", "i1", "i2"]

    monkeypatch.setenv("RPRA_SEEDS", str(seeds))
    seeded = Collection.load("m", "arithmetic", "train")  # the home has nothing: the export fills it
    assert seeded.folder == collection_dir("m", "arithmetic", "train") and seeded.ids == {"i0", "i1", "i2"}
    assert seeded.provenance["device_sha256"] == "a" * 64
    with seeded.appender() as add:
        add({**_judged(1.0), "id": "i3"})
    assert len(Collection.open(seeded.folder).records) == 4  # a collection with records is never reseeded


def test_records_of_another_model_file_are_never_mixed_in(tmp_path):
    collection = Collection(tmp_path / "c")
    collection.set_provenance(_provenance("a" * 64))
    with collection.appender() as add:
        add({**_judged(5.0), "id": "i0"})
    with pytest.raises(ConfigError, match="another device model file"):
        Collection.open(tmp_path / "c").set_provenance(_provenance("b" * 64))


@pytest.mark.slow
def test_a_verified_collection_labels_keyed_items_by_the_verifier_alone(rpra, env, isolated_home):
    run = rpra("collect", "--suite", "arithmetic", "--split", "train", "--limit", "4", "--verified", "--set", "max_tokens=24", env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "items/hour" in run.stderr and "pass rate" in run.stderr
    records = Collection.load(env["RPRA_MODEL"], "arithmetic", "train").records
    assert len(records) == 4
    for r in records:
        assert r["judge_local"] is None and r["remote_answer"] is None and "rpra" not in r
        assert r["label"]["source"] == "verified" and r["label"]["pass"] == (r["exact_local"] == 1.0)
        assert r["local_logprobs"]["min"] <= r["local_logprobs"]["mean"] <= 0  # the answer-confidence baseline's input
    again = rpra("collect", "--suite", "arithmetic", "--split", "train", "--limit", "4", "--verified", "--set", "max_tokens=24", env=env, timeout=300)
    assert again.returncode == 0 and "4 records" in again.stderr
    assert "items/hour" not in again.stderr  # nothing new: no rate, not the last run's


@pytest.mark.slow
def test_a_verified_collection_asks_multiple_choice_twice_with_the_options_rotated(rpra, env, isolated_home, tmp_path):
    questions = tmp_path / "quiz.jsonl"
    rows = [{"prompt": f"What is {a} + {a}?\n\nA) {2 * a}\nB) {2 * a + 1}\nC) {a}\n\nAnswer with the letter.", "gold": "A"} for a in (2, 3)]
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run = rpra("collect", "--suite", str(questions), "--split", "train", "--verified", "--set", "max_tokens=8", env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    records = Collection.load(env["RPRA_MODEL"], str(questions), "train").records
    assert records, "no item of the two landed in the train split"  # the split is a hash of the id
    for r in records:
        assert r["permuted_gold"] in "BC" and r["permuted_answer"] is not None and r["label"]["orderings"] == 2
        assert r["label"]["pass"] == (r["exact_local"] == 1.0 and r["exact_permuted"] == 1.0)


@pytest.mark.slow
def test_a_verified_collection_with_the_remote_checks_both_answers_and_calls_no_judge(rpra, env, isolated_home, remote_server):
    run = rpra("collect", "--suite", "arithmetic", "--split", "test", "--limit", "3", "--verified", "--remote", "--remote-max-tokens", "12",
               "--set", "max_tokens=16", env={**env, "RPRA_REMOTE_URL": remote_server.url, "RPRA_REMOTE_MODEL": "stand-in"}, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    records = Collection.load(env["RPRA_MODEL"], "arithmetic", "test").records
    assert len(records) == 3
    for r in records:
        assert r["remote_answer"] and r["exact_remote"] in (0.0, 1.0) and r["judge_local"] is None and r["judge_remote"] is None
        assert r["remote_tokens"] <= 12
        assert r["label"]["remote_better"] == (r["exact_remote"] > r["exact_local"])
    report = rpra("bench", "report", "--suite", "arithmetic", "--split", "test", "--quality", "exact", "--json", env=env, timeout=300)
    assert report.returncode == 0, report.stderr  # no judge anywhere: no agreement to report, and no crash
    out = json.loads(report.stdout)
    assert out["agreement"] is None and "zero-shot PA" in out["results"]["routers"]


def test_train_collections_made_with_another_answer_budget_are_named(tmp_path):
    from rpra.benchmarks.bench import label_mismatches

    same, other = Collection(tmp_path / "m--gsm--train"), Collection(tmp_path / "m--mmlu--train")
    same.provenance = {"settings": {"max_tokens": 48, "pass_mark": 7}}
    other.provenance = {"settings": {"max_tokens": 24, "pass_mark": 7}}
    assert label_mismatches({"max_tokens": 48, "pass_mark": 7}, [same, other]) == [
        "m--mmlu--train: max_tokens=24, the evaluated records max_tokens=48"]  # fmt: skip
    assert label_mismatches(None, [other]) == []


def _one_record(folder, provenance: Provenance, **record) -> Collection:
    """A collection of one record made under ``provenance``."""
    collection = Collection(folder)
    collection.set_provenance(provenance)
    with collection.appender() as add:
        add({"id": "i0", "exact_local": 1.0, **record})
    return collection


AT_48 = Provenance(suite="s", split="train", device_model="m", device_sha256="a" * 64, remote_id="none", judge_id="verifier",
                   prompts_version="p", settings={"max_tokens": 48, "pass_mark": 7})  # fmt: skip


def test_records_of_another_answer_budget_are_refused(tmp_path):
    provenance = AT_48
    collection = _one_record(tmp_path / "c", provenance)
    collection.set_provenance(provenance)  # the same settings: fine
    with pytest.raises(ConfigError, match=r"max_tokens=48 \(this run: 24\)"):
        collection.set_provenance(replace(provenance, settings={"max_tokens": 24, "pass_mark": 7}))


def test_a_device_only_run_keeps_the_remote_that_answered_earlier_records(tmp_path):
    provenance = replace(AT_48, remote_id="gguf:remote")
    collection = _one_record(tmp_path / "c", provenance, remote_answer="B")
    collection.set_provenance(replace(provenance, remote_id="none"))  # `rpra collect --verified` without --remote, more items
    assert Collection.open(tmp_path / "c").provenance["remote_id"] == "gguf:remote"
    collection.set_provenance(replace(provenance, remote_id="https://api.example/v1|big"))  # a run with another remote says so
    assert Collection.open(tmp_path / "c").provenance["remote_id"] == "https://api.example/v1|big"
