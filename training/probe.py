"""``rpra train probe``: fit the activation probe (``rpra.probe``) on collected train splits.

Features are read through the runtime itself: a PA turn is opened exactly as the device opens it
and the probe predictor's own ``predictors.probe_state`` reads the state at the slot (the final
state, or a middle layer's captured during the prefill), so the fitted probe sees at run time
what it saw here.

- ``head="logistic"`` (the default): a logistic regression of the pass label on standardised
  features, its strength chosen by stratified k-fold CV AUROC, then Platt-calibrated on the
  out-of-fold logits (folded into the weights), so the device computes P(pass) with one dot
  product and a sigmoid. Needs scikit-learn (the train extra).
- ``head="ridge"``: the regression of the score (pass as scale_max / 1) of format 1, numpy only.

``layer="auto"`` takes the best slot layer of the model's layer sweep
(benchmarks/results/layer_sweep-<model>.json, made on the train split), else the final state.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from rpra.benchmarks.metrics import auroc, spearman
from rpra.config import Settings
from rpra.errors import RpraError
from rpra.local import LocalModel, LocalSession
from rpra.prediction import Prediction
from rpra.predictors import ZeroShotPredictor, probe_state
from rpra.probe import Probe
from rpra.runtime import Runtime
from rpra.slot import ScoreSlot

ALPHAS = (1.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0)


class _ReadState(ZeroShotPredictor):
    """The zero-shot predictor, also keeping the state a probe of ``layer`` reads at the slot
    (``probe_state``, as ProbePredictor reads it) and the tokens up to the slot."""

    def __init__(self, layer: int | None = None) -> None:
        self.layer = layer
        self.capture_layers = [] if layer is None else [layer]
        self.state: np.ndarray | None = None
        self.tokens: list[int] = []

    def predict(self, session: LocalSession, slot: ScoreSlot, *, pass_mark: int) -> Prediction:
        self.state, self.tokens = probe_state(session, self.layer), list(session.tokens)
        return super().predict(session, slot, pass_mark=pass_mark)


class LayerReader(ZeroShotPredictor):
    """The zero-shot predictor, also keeping every captured layer's state at the slot and its mean
    over the tokens the prefill evaluated (a model opened with ``capture_layers``)."""

    def __init__(self) -> None:
        self.slot: np.ndarray | None = None
        self.mean: np.ndarray | None = None

    def predict(self, session: LocalSession, slot: ScoreSlot, *, pass_mark: int) -> Prediction:
        last, mean = session.layer_states("last"), session.layer_states("mean")
        self.slot = np.stack([last[layer] for layer in sorted(last)])
        self.mean = np.stack([mean[layer] for layer in sorted(mean)])
        return super().predict(session, slot, pass_mark=pass_mark)


def read_slots(local: LocalModel, prompts: list[str], settings: Settings, *, layer: int | None = None
               ) -> Iterator[tuple[np.ndarray, list[int]]]:  # fmt: skip
    """For each prompt, the probe's state at the PA slot (``layer``: None for the final state) and
    the tokens up to it, read through the runtime's own turn (``Runtime.predict``: stopped at the
    decision, no answer generated)."""
    reader = _ReadState(layer)
    runtime = Runtime(replace(settings, protocol="pa", mode="local-only", log=False), local=local, predictor=reader)
    for prompt in prompts:
        runtime.predict([{"role": "user", "content": prompt}])
        yield reader.state, reader.tokens


def slot_states(local: LocalModel, prompts: list[str], settings: Settings, *, layer: int | None = None,
                progress: Callable[[], None] = lambda: None) -> np.ndarray:  # fmt: skip
    """The probe's state at the PA slot for each prompt (``read_slots``), stacked."""
    states = []
    for state, _ in read_slots(local, prompts, settings, layer=layer):
        states.append(state)
        progress()
    return np.stack(states)


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """Ridge on centred data (x already standardised): weights and intercept."""
    xm, ym = x.mean(0), y.mean()
    xc = x - xm
    # The dual form: features (hundreds) outnumber examples here.
    coef = xc.T @ np.linalg.solve(xc @ xc.T + alpha * np.eye(len(x)), y - ym)
    return coef, float(ym - xm @ coef)


def cross_validate(x: np.ndarray, y: np.ndarray, alpha: float, *, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold predictions for every example."""
    order = np.random.default_rng(seed).permutation(len(y))
    pred = np.empty(len(y))
    for fold in np.array_split(order, folds):
        train = np.setdiff1d(order, fold)
        mean, std = x[train].mean(0), x[train].std(0) + 1e-6
        coef, bias = _ridge((x[train] - mean) / std, y[train], alpha)
        pred[fold] = (x[fold] - mean) / std @ coef + bias
    return pred


def choose_alpha(x: np.ndarray, y: np.ndarray, *, folds: int = 5, seed: int = 0) -> tuple[float, np.ndarray, dict[float, float]]:
    """The ridge strength with the lowest out-of-fold RMSE: it, its out-of-fold predictions, and
    every strength's RMSE."""
    oof = {alpha: cross_validate(x, y, alpha, folds=folds, seed=seed) for alpha in ALPHAS}
    rmse = {alpha: float(np.sqrt(np.mean((pred - y) ** 2))) for alpha, pred in oof.items()}
    best = min(rmse, key=rmse.get)
    return best, oof[best], rmse


def mean_rmse(y: np.ndarray) -> float:
    """The error of always predicting the mean: what a probe has to beat."""
    return float(np.sqrt(np.mean((y - y.mean()) ** 2)))


def fit_probe(x: np.ndarray, y: np.ndarray, *, scale_max: int, folds: int = 5, seed: int = 0, meta: dict | None = None) -> tuple[Probe, dict]:
    """Choose alpha by cross-validated error, refit on everything; returns the probe and its CV report."""
    if len(y) < 2 * folds:
        raise RpraError(f"Need at least {2 * folds} judged records to fit and cross-validate a probe; have {len(y)}.")
    best, oof, scores = choose_alpha(x, y, folds=folds, seed=seed)
    mean, std = x.mean(0), x.std(0) + 1e-6
    coef, bias = _ridge((x - mean) / std, y, best)
    report = {
        "alpha": best,
        "cv_rmse": scores[best],
        "cv_rmse_by_alpha": {str(a): round(v, 4) for a, v in scores.items()},
        "mean_baseline_rmse": mean_rmse(y),
        "cv_spearman": float(spearman(oof, y)),
        # How well the out-of-fold predictions rank passing above failing answers (when y is pass / fail).
        "cv_auroc_pass": float(auroc(oof, y == y.max())) if len(np.unique(y)) == 2 else None,
        "examples": int(len(y)),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    probe = Probe(mean, std, coef, bias, sigma=scores[best], scale_max=scale_max, meta={**(meta or {}), **report})
    return probe, report



def out_of_fold_logits(x: np.ndarray, y: np.ndarray, c: float, split: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Each row's logit from a logistic head (strength ``c``) fitted, standardised, on the other
    folds of ``split`` (index pairs, e.g. ``StratifiedKFold``'s)."""
    from sklearn.linear_model import LogisticRegression

    out = np.empty(len(y))
    for train, test in split:
        mean, std = x[train].mean(0), x[train].std(0) + 1e-6
        head = LogisticRegression(C=c, max_iter=2000).fit((x[train] - mean) / std, y[train])
        out[test] = head.decision_function((x[test] - mean) / std)
    return out


def out_of_fold_p_pass(x: np.ndarray, y: np.ndarray, *, c: float, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Calibrated P(pass) for each row as a probe fitted without it would give (``fit_logistic``'s
    head at strength ``c``, Platt-scaled on the out-of-fold logits): what a calibration split
    drawn from the train records may be scored with, since the probe itself saw them."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(y, int)
    logits = out_of_fold_logits(x, y, c, list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y)))
    platt = LogisticRegression(C=1e6, max_iter=1000).fit(logits[:, None], y)
    return platt.predict_proba(logits[:, None])[:, 1]


def fit_logistic(x: np.ndarray, y: np.ndarray, *, folds: int = 5, seed: int = 0, layer: int | None = None,
                 scale_max: int = 10, meta: dict | None = None) -> tuple[Probe, dict]:  # fmt: skip
    """A calibrated logistic probe of the pass label ``y`` (0 / 1) on states ``x``.

    The strength C is chosen by stratified k-fold CV AUROC; Platt scaling (a 1-D logistic on the
    out-of-fold logits) calibrates it; both are folded into one weight vector and bias, refitted
    on everything. The report holds the CV AUROC and Brier score of the calibrated out-of-fold
    probabilities, and the base rate's Brier score for comparison.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    from rpra.training.layer_sweep import C_GRID  # the strengths the sweep tries: one grid

    y = np.asarray(y, int)
    positives = int(y.sum())
    if min(positives, len(y) - positives) < folds:
        raise RpraError(f"A logistic probe needs at least {folds} passing and {folds} failing records to cross-validate; "
                        f"have {positives} passing of {len(y)}. Collect more (`rpra collect --split train --verified`).")  # fmt: skip
    split = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y))
    scored = {c: out_of_fold_logits(x, y, c, split) for c in C_GRID}
    aurocs = {c: float(auroc(logits, y == 1)) for c, logits in scored.items()}
    best = max(aurocs, key=aurocs.get)
    platt = LogisticRegression(C=1e6, max_iter=1000).fit(scored[best][:, None], y)
    a, c0 = float(platt.coef_[0, 0]), float(platt.intercept_[0])
    calibrated = 1 / (1 + np.exp(-(a * scored[best] + c0)))
    mean, std = x.mean(0), x.std(0) + 1e-6
    head = LogisticRegression(C=best, max_iter=2000).fit((x - mean) / std, y)
    base = y.mean()
    report = {
        "head": "logistic", "layer": layer, "c": best,
        "cv_auroc_by_c": {str(c): round(v, 4) for c, v in aurocs.items()},
        "cv_auroc_pass": aurocs[best],
        "cv_brier": float(np.mean((calibrated - y) ** 2)), "base_rate_brier": float(base * (1 - base)),
        "examples": int(len(y)), "passing": positives,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip
    probe = Probe(mean, std, a * head.coef_[0], a * float(head.intercept_[0]) + c0, sigma=0.0, scale_max=scale_max,
                  meta={**(meta or {}), **report}, layer=layer, head="logistic")  # fmt: skip
    return probe, report


def with_remote_head(probe: Probe, remote: Probe, report: dict) -> Probe:
    """``probe`` carrying ``remote``'s logistic head (fitted on a subset of the records, with its
    own standardisation), re-expressed on ``probe``'s standardisation: the same logit for every
    state, one ``(h - mean) / std`` for both heads on the device."""
    scale = remote.weights / remote.std
    probe.remote_weights = scale * probe.std
    probe.remote_bias = float(remote.bias + scale @ (probe.mean - remote.mean))
    probe.meta["remote_head"] = report
    return probe


def sweep_layer(model: str, results: Path | None = None) -> int | None:
    """The best slot layer of ``model``'s committed layer sweep, or None (the final state) without one.

    Slot pooling only: a mean over the prompt would need the whole prompt evaluated on every
    request (no cached prefix), which costs more than the zero-shot decision.
    """
    import json

    from rpra.benchmarks.collection import SEEDS, model_name
    from rpra.models import file_sha256, resolve

    path = (results or SEEDS.parent) / f"layer_sweep-{model_name(model)}.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    if result.get("model_sha256") not in (None, file_sha256(resolve(model))):
        return None  # a sweep of another file of that name
    rows = result["layers"]["slot"]
    return int(max(rows, key=lambda row: row["cv_auroc"])["layer"])


def _states(local: LocalModel, records: list[dict], settings: Settings, layer: int | None, advance: Callable[[], None]) -> np.ndarray:
    """Each record's probe state. A middle layer's comes from the feature cache the layer sweep
    keeps (every layer's slot state, by model file and record id); a record not in it is read
    once with every layer captured (``layer_sweep.features``) and added to it, so a refit, a
    remote head or a probe at another layer costs no prefill again. The final state is read
    with a prefill (``slot_states``)."""
    from rpra.training.pool import shared_states

    if layer is None:
        return slot_states(local, [r["prompt"] for r in records], settings, layer=None, progress=advance)
    found = shared_states(settings.model, records, layer, threads=settings.n_threads, progress=advance)
    return np.stack([found[r["id"]] for r in records])


def train_probe(settings: Settings, *, suite: str, split: str = "train", folds: int = 5, output: Path | None = None,
                layer: int | str | None = "auto", head: str = "logistic", remote: bool = False,
                progress: Callable[[int], Callable[[], None]] = lambda total: lambda: None) -> tuple[Path, dict]:  # fmt: skip
    """Fit the probe on collected splits and save it (by default next to the model).

    ``suite``: one suite or several, comma-separated (their collections are pooled). ``layer``:
    a layer number, None for the final state, or "auto" (``sweep_layer``). ``remote``: also fit
    the remote head, P(the remote's answer passes), on the records that hold a remote answer
    (collected with ``--remote``), for ``route_on=advantage``; its report is ``report["remote"]``.
    ``progress(total)`` returns the callback advanced once per record read.
    """
    from rpra.benchmarks.bench import bench_settings
    from rpra.benchmarks.collection import remote_passed
    from rpra.models import file_sha256, resolve
    from rpra.probe import HEADS, default_probe_path
    from rpra.training.data import load_collection, target_score

    if head not in HEADS:
        raise RpraError(f"Unknown probe head {head!r}; use one of {', '.join(HEADS)}.")
    if remote and head != "logistic":
        raise RpraError("A remote head is logistic, beside a logistic pass head: use --head logistic with --remote.")
    settings = bench_settings(settings)
    suites = [s.strip() for s in suite.split(",") if s.strip()]
    collections = [load_collection(settings.model, s, split) for s in suites]
    # The target is the record's pass label (verified where the item has a key, else the judge at
    # the pass mark): the probe's P(pass) is what the controller routes on.
    records = [r for c in collections for r in c.records if target_score(r, target="pass", scale_max=settings.scale_max) is not None]
    if layer == "auto":
        layer = sweep_layer(settings.model)
    local = LocalModel.from_settings(settings)  # a middle layer's states come from layer_sweep.features (_states)
    if layer is not None and not 0 <= int(layer) < local.n_layer:
        raise RpraError(f"layer {layer} is not a layer of {settings.model} (0 to {local.n_layer - 1}).")
    layer = None if layer is None else int(layer)
    x = _states(local, records, settings, layer, progress(len(records)))
    model_path = resolve(settings.model)
    meta = {"model": settings.model, "model_sha256": file_sha256(model_path), "collections": [str(c.folder) for c in collections],
            "target": "pass",
            "feature": "final hidden state at the PA slot" if layer is None else f"residual stream l_out-{layer} at the PA slot"}  # fmt: skip
    if head == "logistic":
        y = np.asarray([bool(r["label"]["pass"]) for r in records], int)
        probe, report = fit_logistic(x, y, folds=folds, layer=layer, scale_max=settings.scale_max, meta=meta)
        if remote:
            passed = [remote_passed(r, pass_mark=settings.pass_mark) for r in records]
            held = [i for i, p in enumerate(passed) if p is not None]
            if not held:
                raise RpraError(f"No record in {suite} ({split}) holds a remote answer: collect some with "
                                "`rpra collect --verified --remote --split train`, then fit the remote head.")  # fmt: skip
            y_remote = np.asarray([passed[i] for i in held], int)
            remote_probe, report["remote"] = fit_logistic(x[held], y_remote, folds=folds, layer=layer, scale_max=settings.scale_max)
            with_remote_head(probe, remote_probe, report["remote"])
    else:
        y = np.asarray([target_score(r, target="pass", scale_max=settings.scale_max) for r in records], float)
        probe, report = fit_probe(x, y, scale_max=settings.scale_max, folds=folds, meta=meta)
        probe.layer = layer
        report["layer"] = layer
    return probe.save(output or default_probe_path(model_path)), report
