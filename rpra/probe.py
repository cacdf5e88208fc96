"""An activation probe: the judge score predicted from the device model's own hidden state.

The probe reads the final hidden state at the PA score slot (the last token of ``Rating: [[``),
the same state the zero-shot predictor reads its score distribution from, and applies a ridge
regression fitted to judge scores on the train split (``rpra train probe``). It predicts before a
single token is generated and costs one single-token decode (``LocalSession.hidden_state``) plus a
dot product.

The regression gives a score ``mu``; its residual spread ``sigma`` (measured by cross-validation
when fitting) turns that into a distribution over 1..N, a normal discretised onto the scale, so
the controller can route on the expected score or on P(pass) as with any predictor.

The file is a small ``.npz`` saved next to the model (numpy only: the device needs no training
stack to use it).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rpra.errors import ConfigError
from rpra.prediction import Prediction

PROBE_FORMAT = "rpra-probe/1"


@dataclass
class Probe:
    """``score = (h - mean) / std · weights + bias``, with residual spread ``sigma``."""

    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray
    bias: float
    sigma: float
    scale_max: int
    meta: dict = field(default_factory=dict)

    def fingerprint(self) -> str:
        """A hash of what the probe computes (its arrays and scalars), e.g. for cache keys."""
        digest = hashlib.sha256()
        for array in (self.mean, self.std, self.weights, np.array([self.bias, self.sigma, self.scale_max], float)):
            digest.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
        return digest.hexdigest()

    def score(self, hidden: np.ndarray) -> float:
        """The predicted judge score (unclipped) for one hidden state."""
        if hidden.shape != self.mean.shape:
            raise ConfigError(
                f"The probe expects hidden states of width {self.mean.shape[0]}, got {hidden.shape[0]}: "
                "it was fitted on another model. Refit it with `rpra train probe`."
            )
        return float((hidden - self.mean) / self.std @ self.weights + self.bias)

    def prediction(self, hidden: np.ndarray, pass_mark: int) -> Prediction:
        """A distribution over 1..N: the normal N(score, sigma²) integrated over each score's bin."""
        mu, sigma = self.score(hidden), max(self.sigma, 1e-3)
        edges = [-math.inf, *(k + 0.5 for k in range(1, self.scale_max)), math.inf]
        cdf = [0.5 * (1 + math.erf((e - mu) / (sigma * math.sqrt(2)))) if math.isfinite(e) else float(e > 0) for e in edges]
        probs = np.clip(np.diff(cdf), 1e-12, None)
        return Prediction(tuple(float(p) for p in probs / probs.sum()), pass_mark, "probe")

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part.npz")  # np.savez adds .npz to names without it
        np.savez(
            tmp, mean=self.mean, std=self.std, weights=self.weights,
            scalars=np.array([self.bias, self.sigma, self.scale_max]),
            meta=np.array(json.dumps({"format": PROBE_FORMAT, **self.meta})),
        )  # fmt: skip
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path | str) -> Probe:
        path = Path(path).expanduser()
        try:
            with np.load(path, allow_pickle=False) as f:
                meta = json.loads(str(f["meta"]))
                bias, sigma, scale_max = f["scalars"].tolist()
                probe = cls(f["mean"], f["std"], f["weights"], bias, sigma, int(scale_max), meta)
        except FileNotFoundError:
            raise ConfigError(f"No probe at {path}. Fit one with `rpra train probe`.") from None
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"{path} is not a readable rpra probe ({exc}). Refit it with `rpra train probe`.") from None
        if meta.get("format") != PROBE_FORMAT:
            raise ConfigError(f"{path} is a probe of format {meta.get('format')!r}; this rpra reads {PROBE_FORMAT}.")
        return probe


def default_probe_path(model_path: Path) -> Path:
    """Where a model's probe lives: next to the model file."""
    return model_path.with_name(f"{model_path.stem}.probe.npz")


def list_probes() -> list[dict]:
    """The probes next to the pulled models: model name, path and the fit's report."""
    from rpra.models import list_models

    found = []
    for model in list_models():
        path = default_probe_path(Path(model["path"])) if model.get("path") else None
        if path and path.exists():
            meta = Probe.load(path).meta
            keys = ("examples", "cv_rmse", "mean_baseline_rmse", "cv_spearman", "created")
            found.append({"model": model["name"], "path": str(path), **{k: meta.get(k) for k in keys}})
    return found
