"""The device-model table from verified train records (no model call)."""

from __future__ import annotations

import json

import pytest

from rpra.benchmarks.collection import Collection, collection_dir
from rpra.benchmarks.device_models import main, table


def _choice(i: int, answer: str, gold: str, one: float, both: float) -> dict:
    return {"id": f"m{i}", "suite": "mmlu", "category": "c", "kind": "choice", "gold": gold,
            "prompt": "Q?\n\nA) x\nB) y\nC) z\n\nAnswer with the letter.", "local_answer": answer, "local_ms": 1000.0 + i,
            "local_tokens": 2, "exact_local": one, "label": {"pass": bool(both), "source": "verified", "orderings": 2}}  # fmt: skip


def test_the_table_has_pass_rates_one_order_accuracy_and_letters(isolated_home):
    # Always "A": right in the original order on the items keyed A, never in both orders.
    records = [_choice(i, "A) x", "A" if i < 3 else "B", float(i < 3), 0.0) for i in range(6)]
    folder = collection_dir("m", "mmlu", "train")
    folder.mkdir(parents=True)
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "provenance.json").write_text("{}")
    assert len(Collection.open(folder).records) == 6
    row = table(["m"])["m"]["suites"]["mmlu"]
    assert row["n"] == 6 and row["pass_rate"] == 0.0 and row["accuracy_one_order"] == 0.5
    assert row["opens"] == {"A": 1.0, "B": 0.0, "other": 0.0} and row["keys"] == {"A": 0.5, "B": 0.5}
    assert row["local_s_p50"] == pytest.approx(1.0025)


def test_no_collection_is_a_clear_error(isolated_home, tmp_path):
    import typer

    with pytest.raises(typer.BadParameter, match="verified train collection"):
        main(model=["nothing-here"], out=tmp_path / "dm", json_out=False)
