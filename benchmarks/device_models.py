"""The device models side by side, from their verified train collections (no model call).

Per model and suite: the records, the pass rate (the label the predictors learn: for multiple
choice, right in both orderings of the options), for multiple choice also the accuracy in the
original order alone and the letters the answers choose (as the verifier reads them: "B",
"Answer: B", an option's text) against the keys' letters, and the
device's time per item (the whole local turn: prediction and answer). This is the table the
default device model is chosen on, and the base rates a predictor's target must have.

    .venv/bin/python -m rpra.benchmarks.device_models --model smollm2-135m-instruct --model qwen2.5-coder-0.5b-instruct

Writes benchmarks/results/device_models.{json,md}. Only train splits are read.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from rpra.benchmarks.collection import SEEDS, Collection, collection_dir
from rpra.benchmarks.data import SUITES, _choice_letter, _options_in_prompt
from rpra.benchmarks.first_letters import OTHER

RESULTS = SEEDS.parent
KEYED = tuple(s for s in SUITES if s not in ("mtbench",))


def suite_row(records: list[dict]) -> dict:
    """One suite's figures for one model."""
    passed = [r["label"]["pass"] for r in records]
    row = {
        "n": len(records),
        "pass_rate": float(np.mean(passed)),
        "local_s_p50": float(np.median([r["local_ms"] for r in records])) / 1000,
        "answer_tokens_mean": float(np.mean([r.get("local_tokens") or 0 for r in records])),
        "by_category": {},
    }
    for category in sorted({r.get("category") or "" for r in records}):
        mine = [r["label"]["pass"] for r in records if (r.get("category") or "") == category]
        if len(mine) >= 5:
            row["by_category"][category] = {"n": len(mine), "pass_rate": float(np.mean(mine))}
    choice = [r for r in records if r.get("kind") == "choice"]
    if choice:
        row["accuracy_one_order"] = float(np.mean([r["exact_local"] for r in choice]))
        row["orderings"] = max(r["label"].get("orderings", 1) for r in choice)
        opens = Counter(_choice_letter(r["local_answer"] or "", _options_in_prompt(r["prompt"])) or OTHER for r in choice)
        keys = Counter(r["gold"] for r in choice)
        order = [*sorted(set(keys) | (set(opens) - {OTHER})), OTHER]
        row["opens"] = {k: opens.get(k, 0) / len(choice) for k in order}
        row["keys"] = {k: keys.get(k, 0) / len(choice) for k in order if k != OTHER}
    return row


def table(models: list[str], suites: tuple[str, ...] = KEYED) -> dict:
    out: dict = {}
    for model in models:
        rows = {}
        for suite in suites:
            records = [r for r in Collection.open(collection_dir(model, suite, "train")).records
                       if (r.get("label") or {}).get("source") == "verified"]  # fmt: skip
            if records:
                rows[suite] = suite_row(records)
        if rows:
            total = sum(r["n"] for r in rows.values())
            out[model] = {"suites": rows, "records": total,
                          "pass_rate": sum(r["pass_rate"] * r["n"] for r in rows.values()) / total,
                          "local_s_p50_mean_over_suites": float(np.mean([r["local_s_p50"] for r in rows.values()]))}  # fmt: skip
    return out


def markdown(result: dict) -> str:
    models = list(result)
    suites = list(dict.fromkeys(s for m in models for s in result[m]["suites"]))
    lines = ["| suite | " + " | ".join(f"{m}: n · pass · s/item" for m in models) + " |",
             "|---|" + "---|" * len(models)]  # fmt: skip
    for s in suites:
        cells = []
        for m in models:
            row = result[m]["suites"].get(s)
            if row is None:
                cells.append("–")
                continue
            extra = f" (one order {row['accuracy_one_order']:.0%})" if "accuracy_one_order" in row else ""
            cells.append(f"{row['n']} · {row['pass_rate']:.1%}{extra} · {row['local_s_p50']:.2f}")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines.append("| **all** | " + " | ".join(f"{result[m]['records']} · {result[m]['pass_rate']:.1%} · {result[m]['local_s_p50_mean_over_suites']:.2f}" for m in models) + " |")
    letters = []
    for m in models:
        for s, row in result[m]["suites"].items():
            if "opens" in row:
                opens = " ".join(f"{k} {v:.0%}" for k, v in row["opens"].items())
                keys = " ".join(f"{k} {v:.0%}" for k, v in row["keys"].items())
                letters.append(f"| {m} | {s} | {opens} | {keys} |")
    if letters:
        lines += ["", "The letter each answer chooses (original order, as the verifier reads it) against the keys:", "",
                  "| model | suite | answers choose | keys |", "|---|---|---|---|", *letters]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(
    model: Annotated[list[str], typer.Option(help="Device model; repeat for several.")] = ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"],  # noqa: B006
    out: Annotated[Path, typer.Option(help="Result files' stem.")] = RESULTS / "device_models",
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    result = table(model)
    if not result:
        raise typer.BadParameter("none of these models has a verified train collection (`rpra collect --split train --verified`)")
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    out.with_suffix(".md").write_text(text)
    print(json.dumps(result, indent=2) if json_out else text)


if __name__ == "__main__":
    typer.run(main)
