"""The layer sweep end to end on a handful of records, with the real device model's layer states."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rpra.benchmarks.collection import collection_dir
from rpra.training.layer_sweep import fisher, prior_oof, _folds


def test_fisher_separability_grows_with_the_gap_between_the_classes():
    y = np.array([0, 0, 0, 1, 1, 1])
    assert fisher(np.array([0, 0.1, 0.2, 1.0, 1.1, 1.2]), y) > fisher(np.array([0, 0.5, 1.0, 0.2, 0.7, 1.2]), y)


def test_the_prior_is_cross_validated_never_fitted_on_the_item_it_scores():
    # Each category has one passing item: a prior fitted on all records would know it, an
    # out-of-fold prior cannot.
    records = [{"suite": "s", "category": f"c{i // 5}", "label": {"pass": i % 5 == 0}} for i in range(25)]
    y = np.array([int(r["label"]["pass"]) for r in records])
    prior = prior_oof(records, _folds(y))
    assert prior.shape == (25,) and ((0 < prior) & (prior < 1)).all()


@pytest.mark.slow
def test_the_sweep_runs_on_real_layer_states_and_writes_its_results(model_path, isolated_home, tmp_path):
    from rpra.training.layer_sweep import main

    # Easy sums pass, long ones fail: the kind of difference a layer can carry.
    prompts = [(f"Calculate {a} + {b}.", True) for a, b in zip(range(1, 13), range(2, 14))]
    prompts += [(f"Calculate ( {a}7 - 2{b} ) * -{a} / 7 + 3{b}0 * 8{a}6.", False) for a, b in zip(range(1, 13), range(3, 15))]
    folder = collection_dir(str(model_path), "arithmetic", "train")
    folder.mkdir(parents=True)
    records = [{"id": f"t{i}", "suite": "arithmetic", "category": "level-1" if ok else "level-4", "prompt": p, "exact_local": float(ok),
                "local_answer": str(sum(map(int, p[10:-1].split(" + ")))) if ok else "12",
                "judge_local": None, "label": {"pass": ok, "source": "verified", "level": None, "remote_better": None}}
               for i, (p, ok) in enumerate(prompts)]  # fmt: skip
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    stem = tmp_path / "sweep"
    main(["--model", str(model_path), "--suites", "arithmetic", "--out", str(stem), "--json"])
    result = json.loads(stem.with_suffix(".json").read_text())
    assert result["records"] == 24 and result["layers_read"] == 30
    assert len(result["layers"]["slot"]) == 30 and len(result["layers"]["mean"]) == 29  # the last layer has only output rows
    assert result["best"]["cv_auroc"] > 0.9  # the two kinds of prompt are far apart in some layer
    assert 0 <= result["after_answer"]["self_check"]["auroc"] <= 1  # the AutoMix baseline, run on the real model
    assert [row["fraction"] for row in result["learning_curve"]] == [0.1, 0.25, 0.5, 0.75, 1.0]
    assert result["honest_best"]["auroc"] > 0.8 and len(result["honest_best"]["chosen"]) == 2  # chosen on one half, scored on the other
    assert stem.with_suffix(".png").stat().st_size > 10_000
    assert len(list((isolated_home / "features").glob("*/*.npz"))) == 24  # cached: a re-run costs only the fits


def test_a_limit_takes_a_seeded_sample_of_each_suite_not_its_first_records(isolated_home):
    from rpra.training.layer_sweep import labelled_records

    folder = collection_dir("m", "arithmetic", "train")
    folder.mkdir(parents=True)
    records = [{"id": f"a{i}", "suite": "arithmetic", "category": "level-1" if i < 20 else "level-4", "prompt": "p",
                "label": {"pass": i < 20, "source": "verified"}} for i in range(40)]  # fmt: skip
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    picked = labelled_records("m", ("arithmetic",), 10)
    assert len(picked) == 10 and [r["id"] for r in picked] == [r["id"] for r in labelled_records("m", ("arithmetic",), 10)]
    assert {r["category"] for r in picked} == {"level-1", "level-4"}  # not the journal's easiest-first head


def test_a_probe_refit_reuses_the_verifiers_reads_of_the_slot(model_path, isolated_home):
    """cached_slot_states: the sweep's file first, else the verifier's read of the same record."""
    from rpra.models import file_sha256
    from rpra.training.layer_sweep import cached_slot_states

    cache = isolated_home / "features" / file_sha256(model_path)[:16]
    cache.mkdir(parents=True)
    np.savez(cache / "a_1.npz", slot=np.full((30, 4), 1.0, np.float16))
    np.savez(cache / "a_1.draft.npz", slot=np.full((29, 4), 2.0, np.float16), layers=np.arange(29))
    np.savez(cache / "a_2.draft.npz", slot=np.arange(29 * 4, dtype=np.float16).reshape(29, 4), layers=np.arange(29))
    found = cached_slot_states(str(model_path), [{"id": "a:1"}, {"id": "a:2"}, {"id": "a:3"}], 9)
    assert sorted(found) == ["a:1", "a:2"]
    assert np.all(found["a:1"] == 1.0)  # the sweep's own read wins
    assert np.array_equal(found["a:2"], np.arange(36, 40, dtype=np.float32))
    assert cached_slot_states(str(model_path), [{"id": "a:2"}], 29) == {}  # the verifier reads no last layer
