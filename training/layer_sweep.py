"""Where does the device model know whether its answer will be right? A sweep over its layers.

For a device model's verified train records (``rpra collect --split train --verified``): every
layer's hidden state at the PA score slot, and its mean over the prompt, read during the prefill
the request needs anyway (llama.cpp's graph callback, ``LocalModel(capture_layers=...)``). For
each layer and pooling, a logistic head on the pass label, scored by 5-fold stratified
cross-validated AUROC, with the Fisher separability of its out-of-fold logits; against the
category prior (the train pass rate of the item's suite and category, cross-validated the same
way): a probe that does not beat the prior knows the category, not the item. Then, for the best
layer: AUROC within each suite, and leave-one-suite-out (train on the others, test on it).

    python -m rpra.training.layer_sweep --model smollm2-135m-instruct
    python -m rpra.training.layer_sweep --model qwen2.5-coder-0.5b-instruct --limit 600 --json

Features are cached under RPRA_HOME/features (by model sha256 and record id), so a re-run costs
only the fits. Results: benchmarks/results/layer_sweep-<model>.{json,png}. Nothing here reads a
test split.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from rpra.benchmarks.baselines import answer_confidence, category_prior
from rpra.benchmarks.collection import SEEDS, Collection, collection_dir, model_name
from rpra.config import DEFAULT_MODEL, Settings, home
from rpra.models import file_sha256, resolve

RESULTS = SEEDS.parent
DEFAULT_SUITES = ("arithmetic", "arithmetic-graded", "letter-counting", "gcd", "simple-equations", "gsm", "mmlu", "commonsenseqa",
                  "openbookqa", "medqa", "logiqa")
C_GRID = (0.003, 0.03, 0.3)  # inverse L2 strength of the logistic head, on standardised features
FOLDS = 5


def labelled_records(model: str, suites: tuple[str, ...], limit: int | None, seed: int = 0) -> list[dict]:
    """The verified train records of ``model`` on ``suites`` (those collected), at most ``limit`` per
    suite: a seeded random sample, not the first ones (a journal is in item order, which for the
    procedural suites is easiest level first)."""
    records = []
    for suite in suites:
        folder = collection_dir(model, suite, "train")
        rs = [r for r in Collection.open(folder).records if (r.get("label") or {}).get("source") == "verified"]
        if limit is not None and len(rs) > limit:
            rs = sorted(rs, key=lambda r: hashlib.sha256(f"{seed}:{r['id']}".encode()).digest())[:limit]
        records += rs
    return records


def features(model: str, records: list[dict], *, progress=None, threads: int | None = None, self_check: bool = True
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:  # fmt: skip
    """Per record, every layer's state at the PA slot and its mean over the prompt: arrays of shape
    (layers, records, width), float32; and the AutoMix-style self-verification P(yes) of its local
    answer (one more prefill). Cached by model sha256 and record id."""
    from rpra.benchmarks.baselines import self_verification
    from rpra.local import LocalModel
    from rpra.runtime import Runtime
    from rpra.training.probe import LayerReader

    path = resolve(model)
    cache = home() / "features" / file_sha256(path)[:16]
    cache.mkdir(parents=True, exist_ok=True)
    settings = Settings(model=model, temperature=0.0, log=False, mode="local-only", n_ctx=2048, n_threads=threads)
    local = None
    slot_rows, mean_rows, checks = [], [], []
    for r in records:
        file = cache / f"{_safe(r['id'])}.npz"
        saved = dict(np.load(file)) if file.exists() else {}
        if "slot" not in saved or (self_check and "self_check" not in saved):
            if local is None:
                n_layer = LocalModel.from_settings(replace(settings, n_ctx=64)).n_layer
                local = LocalModel.from_settings(replace(settings, n_batch=2048), capture_layers=range(n_layer), capture_tokens=None)
                reader = LayerReader()
                runtime = Runtime(settings, local=local, predictor=reader)
            if "slot" not in saved:
                with local.lock:
                    local.clear_cache()  # the mean covers the whole prompt, not just what a cached prefix left
                runtime.predict([{"role": "user", "content": r["prompt"]}])
                saved.update(slot=reader.slot.astype(np.float16), mean=reader.mean.astype(np.float16))
            if self_check:
                saved["self_check"] = np.float32(self_verification(local, r["prompt"], r.get("local_answer") or ""))
            tmp = file.with_name(file.stem + ".part.npz")  # whole or absent: another job may read it now
            np.savez(tmp, **saved)
            tmp.replace(file)
        slot_rows.append(np.asarray(saved["slot"], np.float32))
        mean_rows.append(np.asarray(saved["mean"], np.float32))
        checks.append(float(saved["self_check"]) if self_check else np.nan)
        if progress:
            progress()
    return np.stack(slot_rows, axis=1), np.stack(mean_rows, axis=1), np.asarray(checks) if self_check else None


def cached_slot_states(model: str, records: list[dict], layer: int) -> dict[str, np.ndarray]:
    """The slot states at ``layer`` that an earlier sweep (or a verifier's read) cached for
    ``records`` (by record id; the records without one are absent): what ``rpra train probe``
    reuses instead of a prefill."""
    cache = home() / "features" / file_sha256(resolve(model))[:16]
    found = {}
    for r in records:
        # The sweep's file, else the verifier's read of the same record (training.verifier.draft_reads),
        # which holds the same slot state: the same prompt and opening, evaluated with prefix reuse.
        for file in (cache / f"{_safe(r['id'])}.npz", cache / f"{_safe(r['id'])}.draft.npz"):
            if not file.exists():
                continue
            with np.load(file) as saved:
                layers = list(saved["layers"]) if "layers" in saved else list(range(saved["slot"].shape[0])) if "slot" in saved else []
                if layer in layers:
                    found[r["id"]] = np.asarray(saved["slot"][layers.index(layer)], np.float32)
                    break
    return found


def _safe(item_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in item_id)


def _folds(y: np.ndarray, seed: int = 0):
    from sklearn.model_selection import StratifiedKFold

    return list(StratifiedKFold(FOLDS, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def _head(c: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))


def oof_logits(x: np.ndarray, y: np.ndarray, folds, c: float) -> np.ndarray:
    """Out-of-fold logits of a logistic head with strength ``c``."""
    out = np.empty(len(y))
    for train, test in folds:
        out[test] = _head(c).fit(x[train], y[train]).decision_function(x[test])
    return out


def fisher(scores: np.ndarray, y: np.ndarray) -> float:
    """Fisher separability of a score between the classes: (m1 - m0)^2 / (v1 + v0)."""
    a, b = scores[y == 1], scores[y == 0]
    return float((a.mean() - b.mean()) ** 2 / (a.var() + b.var() + 1e-12))


def auroc(scores: np.ndarray, y: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, scores)) if 0 < y.sum() < len(y) else float("nan")


def bootstrap_ci(scores: np.ndarray, y: np.ndarray, n: int = 500, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        if 0 < y[idx].sum() < len(idx):
            values.append(auroc(scores[idx], y[idx]))
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def prior_oof(records: list[dict], folds) -> np.ndarray:
    """Out-of-fold category-prior P(pass): each fold's prior from the other folds."""
    out = np.empty(len(records))
    for train, test in folds:
        prior = category_prior([records[i] for i in train])
        out[test] = [prior(records[i]) for i in test]
    return out


def after_answer_baselines(records: list[dict], self_check: np.ndarray | None, y: np.ndarray) -> dict:
    """AUROC of the baselines that read the local answer (no fit: nothing to cross-validate):
    its mean and min token probability, and the model's self-verification."""
    out = {}
    for which in ("mean", "min"):
        scores = [answer_confidence(r, which=which) for r in records]
        if all(s is not None for s in scores):
            scores = np.asarray(scores)
            out[f"confidence_{which}"] = {"auroc": auroc(scores, y), "ci": bootstrap_ci(scores, y)}
    if self_check is not None:
        out["self_check"] = {"auroc": auroc(self_check, y), "ci": bootstrap_ci(self_check, y)}
    return out


def sweep(records: list[dict], slot: np.ndarray, mean: np.ndarray, *, self_check: np.ndarray | None = None, log=print) -> dict:
    """Every layer x pooling: the best C's CV AUROC and Fisher separability; the prior and the
    after-the-answer baselines; per-suite and leave-one-suite-out AUROC of the best layer."""
    y = np.asarray([int(r["label"]["pass"]) for r in records])
    folds = _folds(y)
    suites = np.asarray([r["suite"] for r in records])
    prior = prior_oof(records, folds)
    result: dict = {
        "records": len(y), "passing": int(y.sum()),
        "base_rate_by_suite": {s: {"n": int((suites == s).sum()), "pass_rate": float(y[suites == s].mean())} for s in sorted(set(suites))},
        "prior": {"cv_auroc": auroc(prior, y), "ci": bootstrap_ci(prior, y), "fisher": fisher(prior, y)},
        "after_answer": after_answer_baselines(records, self_check, y),
        "layers": {},
    }  # fmt: skip
    best = None
    for pooling, x_all in (("slot", slot), ("mean", mean)):
        rows = []
        for layer in range(x_all.shape[0]):
            scored = {c: oof_logits(x_all[layer], y, folds, c) for c in C_GRID}
            c, logits = max(scored.items(), key=lambda kv: auroc(kv[1], y))
            row = {"layer": layer, "c": c, "cv_auroc": auroc(logits, y), "fisher": fisher(logits, y)}
            rows.append(row)
            if best is None or row["cv_auroc"] > best["cv_auroc"]:
                best = {**row, "pooling": pooling, "logits": logits}
            log(f"{pooling:>4} layer {layer:2d}: CV AUROC {row['cv_auroc']:.3f} (C {c:g}) · Fisher {row['fisher']:.3f}")
        result["layers"][pooling] = rows
    logits = best.pop("logits")
    # The best of 2 x layers x |C_GRID| configurations is chosen on the same folds, so its AUROC is
    # slightly optimistic; the CI is a bootstrap over items of its out-of-fold logits.
    best["ci"] = bootstrap_ci(logits, y)
    result["best"] = best
    x_best = (slot if best["pooling"] == "slot" else mean)[best["layer"]]
    # The probe with the prior's information added: does it know more than the category?
    both = oof_logits(np.column_stack([x_best, np.log(prior / (1 - prior + 1e-9) + 1e-9)]), y, folds, best["c"])
    result["best_plus_prior"] = {"cv_auroc": auroc(both, y), "ci": bootstrap_ci(both, y)}
    result["by_suite"] = {
        s: {"probe": auroc(logits[suites == s], y[suites == s]), "prior": auroc(prior[suites == s], y[suites == s]),
            "n": int((suites == s).sum()), "passing": int(y[suites == s].sum())}
        for s in sorted(set(suites))
    }  # fmt: skip
    loso = {}
    for s in sorted(set(suites)):
        held = suites == s
        if 0 < y[held].sum() < held.sum() and 0 < y[~held].sum() < (~held).sum():
            scores = _head(best["c"]).fit(x_best[~held], y[~held]).decision_function(x_best[held])
            loso[s] = {"auroc": auroc(scores, y[held]), "n": int(held.sum())}
    result["leave_one_suite_out"] = loso
    result["learning_curve"] = learning_curve(x_best, y, best["c"])
    result["honest_best"] = honest_selection(slot, mean, y)
    return result


def learning_curve(x: np.ndarray, y: np.ndarray, c: float, fractions=(0.1, 0.25, 0.5, 0.75, 1.0), seed: int = 0) -> list[dict]:
    """CV AUROC of the head when it is fitted on a fraction of each training fold (the test folds
    stay whole): does more data still help?"""
    rng = np.random.default_rng(seed)
    folds = _folds(y)
    rows = []
    for fraction in fractions:
        out = np.empty(len(y))
        for train, test in folds:
            part = rng.permutation(train)[: max(10, int(fraction * len(train)))]
            if len(set(y[part])) < 2:
                part = train
            out[test] = _head(c).fit(x[part], y[part]).decision_function(x[test])
        rows.append({"fraction": fraction, "train_records": int(fraction * len(y) * (FOLDS - 1) / FOLDS), "cv_auroc": auroc(out, y)})
    return rows


def honest_selection(slot: np.ndarray, mean: np.ndarray, y: np.ndarray, seed: int = 0) -> dict:
    """The best-of-the-sweep AUROC without the optimism of choosing on the same folds: the layer,
    pooling and C are chosen by CV on one half of the records, then that head is fitted on the
    same half and scored on the other half, and the halves swapped."""
    from sklearn.model_selection import StratifiedKFold

    halves = list(StratifiedKFold(2, shuffle=True, random_state=seed + 1).split(np.zeros(len(y)), y))
    scores, chosen = [], []
    for pick, score in halves:
        best = None
        for pooling, x_all in (("slot", slot), ("mean", mean)):
            for layer in range(x_all.shape[0]):
                inner = _folds(y[pick], seed)
                for c in C_GRID:
                    value = auroc(oof_logits(x_all[layer][pick], y[pick], inner, c), y[pick])
                    if best is None or value > best[0]:
                        best = (value, pooling, layer, c)
        _, pooling, layer, c = best
        x = (slot if pooling == "slot" else mean)[layer]
        scores.append(auroc(_head(c).fit(x[pick], y[pick]).decision_function(x[score]), y[score]))
        chosen.append({"pooling": pooling, "layer": layer, "c": c})
    return {"auroc": float(np.mean(scores)), "halves": scores, "chosen": chosen}


def plot(result: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    for pooling, style in (("slot", "-o"), ("mean", "-s")):
        rows = result["layers"][pooling]
        top.plot([r["layer"] for r in rows], [r["cv_auroc"] for r in rows], style, ms=3, label=f"probe: {pooling} state")
        bottom.plot([r["layer"] for r in rows], [r["fisher"] for r in rows], style, ms=3, label=pooling)
    top.axhline(result["prior"]["cv_auroc"], color="k", ls="--", label=f"category prior ({result['prior']['cv_auroc']:.2f})")
    top.axhline(0.5, color="grey", ls=":", lw=1)
    top.set_ylabel("5-fold CV AUROC (pass)")
    top.set_title(title)
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.axhline(result["prior"]["fisher"], color="k", ls="--")
    bottom.set_ylabel("Fisher separability")
    bottom.set_xlabel("layer")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--suites", default=",".join(DEFAULT_SUITES), help="Comma-separated; suites without a collection are skipped.")
    parser.add_argument("--limit", type=int, default=None, help="Records per suite (default: all collected).")
    parser.add_argument("--out", type=Path, default=None, help="Result files' stem (default: benchmarks/results/layer_sweep-<model>).")
    parser.add_argument("--json", action="store_true", help="Print the results as JSON.")
    parser.add_argument("--no-self-check", action="store_true", help="Skip the self-verification baseline (it doubles the feature pass).")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: one per core; 1 on a machine busy with other jobs).")
    args = parser.parse_args(argv)

    records = labelled_records(args.model, tuple(s for s in args.suites.split(",") if s), args.limit)
    if len(records) < 4 * FOLDS:
        raise SystemExit(f"Only {len(records)} verified train records for {args.model}: collect more first "
                         "(`rpra collect --split train --verified --suite SUITE`).")  # fmt: skip
    from rich.progress import track

    started = time.perf_counter()
    bar = iter(track(range(len(records)), description="layer states", transient=True))
    slot, mean, self_check = features(args.model, records, progress=lambda: next(bar, None), threads=args.threads,
                                      self_check=not args.no_self_check)
    feature_s = time.perf_counter() - started
    result = sweep(records, slot, mean, self_check=self_check, log=(lambda line: None) if args.json else print)
    result.update({"model": args.model, "model_sha256": file_sha256(resolve(args.model)), "layers_read": int(slot.shape[0]), "width": int(slot.shape[2]), "feature_seconds": round(feature_s, 1)})
    stem = args.out or RESULTS / f"layer_sweep-{model_name(args.model)}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    # Not with_suffix: "layer_sweep-qwen2.5-coder-0.5b-instruct" has a dot of its own.
    json_path, png_path = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".png")
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, png_path, f"{args.model}: where the probe finds pass/fail ({len(records)} verified train records)")
    if args.json:
        print(json.dumps(result, indent=2))
        return
    b, p = result["best"], result["prior"]
    print(f"\n{len(records)} records ({result['passing']} pass); features {feature_s:.0f} s")
    print(f"category prior: CV AUROC {p['cv_auroc']:.3f} [{p['ci'][0]:.2f}, {p['ci'][1]:.2f}]")
    print(f"best probe: {b['pooling']} state, layer {b['layer']}, C {b['c']:g}: CV AUROC {b['cv_auroc']:.3f} [{b['ci'][0]:.2f}, {b['ci'][1]:.2f}]")
    print(f"best probe + prior: CV AUROC {result['best_plus_prior']['cv_auroc']:.3f}")
    print(f"best probe, chosen on one half and scored on the other: AUROC {result['honest_best']['auroc']:.3f}")
    print("learning curve: " + ", ".join(f"{row['train_records']} records {row['cv_auroc']:.3f}" for row in result["learning_curve"]))
    for name, row in result["after_answer"].items():
        print(f"after the answer, {name}: AUROC {row['auroc']:.3f} [{row['ci'][0]:.2f}, {row['ci'][1]:.2f}]")
    for s, row in result["by_suite"].items():
        loso = result["leave_one_suite_out"].get(s, {}).get("auroc", float("nan"))
        print(f"  {s:<18} n {row['n']:4d} pass {row['passing']:4d}  probe {row['probe']:.3f}  prior {row['prior']:.3f}  leave-one-suite-out {loso:.3f}")
    print(f"results: {json_path}, {png_path}")


if __name__ == "__main__":
    main()
