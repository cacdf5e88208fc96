"""Which hidden states should the activation probe read? Measured on the collected train split.

The probe (``rpra.probe``) reads the final hidden state at the PA score slot, the last token of
``Rating: [[``. This compares that choice with poolings over the whole prompt the runtime builds
(the same tokens, re-evaluated with every position's hidden state kept), and the regression
target (the judge score, or pass/fail at the pass mark), by 5-fold cross-validation on the train
split. Nothing here looks at the test split.

    python -m rpra.training.probe_pooling                    # all judged train records
    python -m rpra.training.probe_pooling --limit 100 --json

Feature sets:
- ``slot``: the final hidden state at the score slot (what the probe ships with);
- ``mean``: the mean over every token of the prompt up to the slot;
- ``mean-last-16``: the mean over its last 16 tokens;
- ``slot+mean``: both, concatenated.

For each: CV Spearman with the judge score, CV AUROC for "the local answer passes", CV RMSE
(against always predicting the mean), for a ridge on the score and a ridge on pass/fail.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np

from rpra.benchmarks.metrics import auroc, spearman
from rpra.config import load_settings
from rpra.local import LocalModel
from rpra.training.data import load_collection
from rpra.training.probe import choose_alpha, mean_rmse, read_slots


def features(records: list[dict], settings) -> tuple[dict[str, np.ndarray], float]:
    from rpra.benchmarks.bench import bench_settings

    settings = bench_settings(settings)
    local = LocalModel.from_settings(replace(settings, n_batch=max(settings.n_batch, settings.n_ctx)))
    sets: dict[str, list[np.ndarray]] = {"slot": [], "mean": [], "mean-last-16": []}
    agreement = []  # the slot state against the same position re-evaluated in one batch: a check on hidden_states
    for state, tokens in read_slots(local, [r["prompt"] for r in records], settings):
        with local.lock:
            hidden = local.hidden_states(tokens)
        agreement.append(float(np.corrcoef(hidden[-1], state)[0, 1]))
        sets["slot"].append(state)
        sets["mean"].append(hidden.mean(0))
        sets["mean-last-16"].append(hidden[-16:].mean(0))
    out = {name: np.stack(rows) for name, rows in sets.items()}
    out["slot+mean"] = np.concatenate([out["slot"], out["mean"]], axis=1)
    return out, min(agreement)


def evaluate(x: np.ndarray, score: np.ndarray, passed: np.ndarray) -> dict:
    """Cross-validated quality of a ridge on the score and of a ridge on pass/fail, best alpha each."""
    result = {}
    for target, y in (("score", score), ("pass", passed.astype(float))):
        best, pred, rmse = choose_alpha(x, y)
        result[target] = {"alpha": best, "cv_rmse": rmse[best], "mean_rmse": mean_rmse(y),
                          "cv_spearman": float(spearman(pred, score)), "cv_auroc_pass": float(auroc(pred, passed))}  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="rpra-mix")
    parser.add_argument("--limit", type=int, default=None, help="Train records to use (default: all judged ones).")
    parser.add_argument("--json", action="store_true", help="Print the results as JSON.")
    args = parser.parse_args(argv)

    settings = load_settings()
    records = [r for r in load_collection(settings.model, args.suite, "train").records if (r.get("judge_local") or {}).get("score") is not None]
    records = records[: args.limit]
    score = np.asarray([r["judge_local"]["score"] for r in records], float)
    passed = score >= settings.pass_mark
    start = time.perf_counter()
    sets, agreement = features(records, settings)
    results = {"records": len(records), "passing": int(passed.sum()), "feature_seconds": time.perf_counter() - start,
               "slot_vs_batch_min_correlation": agreement,
               "features": {name: {"width": int(x.shape[1]), **evaluate(x, score, passed)} for name, x in sets.items()}}  # fmt: skip
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{results['records']} train records ({results['passing']} passing); 5-fold CV, ridge, best alpha by CV RMSE")
    print(f"(check: the slot state and its batch re-evaluation correlate >= {agreement:.4f})")
    print(f"{'features':<14}{'target':<8}{'Spearman':>10}{'AUROC pass':>12}{'RMSE':>8}{'mean RMSE':>11}")
    for name, row in results["features"].items():
        for target in ("score", "pass"):
            t = row[target]
            print(f"{name:<14}{target:<8}{t['cv_spearman']:>10.3f}{t['cv_auroc_pass']:>12.3f}{t['cv_rmse']:>8.3f}{t['mean_rmse']:>11.3f}")


if __name__ == "__main__":
    main()
