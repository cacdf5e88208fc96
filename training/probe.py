"""``rpra train probe``: fit the activation probe (``rpra.probe``) on the collected train split.

Features are read through the runtime itself: a PA turn is opened exactly as the device opens it
and the probe predictor's own ``LocalSession.hidden_state`` call reads the state at the slot, so
the fitted probe sees at run time what it saw here. The fit is a ridge regression of the judge
score on standardised features, its strength chosen by k-fold cross-validation; the
cross-validated residual spread becomes the probe's ``sigma``. numpy only.
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
from rpra.predictors import ZeroShotPredictor
from rpra.probe import Probe
from rpra.runtime import Runtime
from rpra.slot import ScoreSlot

ALPHAS = (1.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0)


class _ReadState(ZeroShotPredictor):
    """The zero-shot predictor, also keeping the hidden state at the slot (as ProbePredictor reads
    it) and the tokens up to the slot."""

    def __init__(self) -> None:
        self.state: np.ndarray | None = None
        self.tokens: list[int] = []

    def predict(self, session: LocalSession, slot: ScoreSlot, *, pass_mark: int) -> Prediction:
        self.state, self.tokens = session.hidden_state(), list(session.tokens)
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


def read_slots(local: LocalModel, prompts: list[str], settings: Settings) -> Iterator[tuple[np.ndarray, list[int]]]:
    """For each prompt, the hidden state at the PA slot and the tokens up to it, read through the
    runtime's own turn (``Runtime.predict``: stopped at the decision, no answer generated)."""
    reader = _ReadState()
    runtime = Runtime(replace(settings, protocol="pa", mode="local-only", log=False), local=local, predictor=reader)
    for prompt in prompts:
        runtime.predict([{"role": "user", "content": prompt}])
        yield reader.state, reader.tokens


def slot_states(local: LocalModel, prompts: list[str], settings: Settings, *, progress: Callable[[], None] = lambda: None) -> np.ndarray:
    """The hidden state at the PA slot for each prompt (``read_slots``), stacked."""
    states = []
    for state, _ in read_slots(local, prompts, settings):
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



def train_probe(settings: Settings, *, suite: str, split: str = "train", folds: int = 5, output: Path | None = None,
                progress: Callable[[int], Callable[[], None]] = lambda total: lambda: None) -> tuple[Path, dict]:  # fmt: skip
    """Fit the probe on a collected split and save it (by default next to the model).

    ``progress(total)`` returns the callback advanced once per record read.
    """
    from rpra.benchmarks.bench import bench_settings
    from rpra.models import file_sha256, resolve
    from rpra.probe import default_probe_path
    from rpra.training.data import load_collection, target_score

    settings = bench_settings(settings)
    collection = load_collection(settings.model, suite, split)
    # The target is the record's pass label (verified where the item has a key, else the judge at
    # the pass mark), as scale_max / 1: the probe's P(pass) is what the controller routes on.
    records = [r for r in collection.records if target_score(r, target="pass", scale_max=settings.scale_max) is not None]
    x = slot_states(LocalModel.from_settings(settings), [r["prompt"] for r in records], settings, progress=progress(len(records)))
    y = np.asarray([target_score(r, target="pass", scale_max=settings.scale_max) for r in records], float)
    model_path = resolve(settings.model)
    meta = {"model": settings.model, "model_sha256": file_sha256(model_path), "collection": str(collection.folder)}
    probe, report = fit_probe(x, y, scale_max=settings.scale_max, folds=folds, meta=meta)
    return probe.save(output or default_probe_path(model_path)), report
