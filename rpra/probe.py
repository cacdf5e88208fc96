"""An activation probe: whether the device model's answer will pass, read from its own hidden state.

The probe reads a hidden state at the PA score slot (the last token of ``Rating: [[``), before a
single answer token is generated, and applies a linear head fitted on the train split
(``rpra train probe``):

- ``layer``: which state. None is the final hidden state (one single-token decode,
  ``LocalSession.hidden_state``); a number is that block's residual stream, captured during the
  prefill the request needs anyway (``LocalModel(capture_layers=[layer])``): no extra evaluation.
  The layer sweep (``rpra.training.layer_sweep``) finds where the signal is; it is rarely the last.
- ``head`` "logistic": a calibrated P(pass) (the controller's ``route_on=p_pass``), written as a
  distribution over 1..N whose mass at or above the pass mark is that P(pass).
  ``head`` "ridge" (format 1): a regressed judge score ``mu`` with residual spread ``sigma``, a
  normal discretised onto the scale.
- ``remote_weights`` / ``remote_bias`` (optional, ``rpra train probe --remote``): a second
  logistic head on the same state, P(the remote model's answer passes), fitted on records that
  hold the remote's verified answer. With both heads the controller can route on the advantage
  P(local passes) - P(remote passes) (``route_on=advantage``): the expected reward of each
  target, predicted from the query alone, as in expected-reward routing (arXiv 2603.20217).

A **verifier** (``rpra train verifier``) is the same head read after the answer instead: on
``draft_features`` (the slot state, the mean residual stream over the local draft at the same
layer, and the draft's token log-probabilities), its P(pass) is whether *this draft* is right:
the second decision point of a cascade (``meta["reads"]`` is "draft"; a probe's is "slot").

A probe is fitted on one model file and refuses another (``check_model``): a probe's weights mean
nothing on a different model's states, even one of the same width.

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

PROBE_FORMAT = "rpra-probe/2"
READABLE = ("rpra-probe/1", PROBE_FORMAT)  # 1: ridge on the final state, no layer or head recorded
HEADS = ("ridge", "logistic")


@dataclass
class Probe:
    """``score = (h - mean) / std · weights + bias``: a judge score (ridge, residual spread
    ``sigma``) or the logit of P(pass) (logistic, calibrated), for the state of ``layer``."""

    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray
    bias: float
    sigma: float
    scale_max: int
    meta: dict = field(default_factory=dict)
    layer: int | None = None  # None: the final hidden state
    head: str = "ridge"
    remote_weights: np.ndarray | None = None  # the remote head: logit of P(remote passes), same standardisation
    remote_bias: float = 0.0

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ConfigError(f"Unknown probe head {self.head!r}; expected one of {', '.join(HEADS)}.")
        if self.remote_weights is not None and self.remote_weights.shape != self.weights.shape:
            raise ConfigError(f"The probe's remote head has {self.remote_weights.shape[0]} weights for states of width {self.weights.shape[0]}.")

    @property
    def predicts_remote(self) -> bool:
        """Whether the probe also predicts the remote's pass (``route_on=advantage`` needs it)."""
        return self.remote_weights is not None

    @property
    def reads(self) -> str:
        """What the head reads: "slot" (a probe, before the answer) or "draft" (a verifier, after it)."""
        return self.meta.get("reads", "slot")

    @property
    def capture_layers(self) -> list[int]:
        """The layers the device model must capture for this probe (none for the final state)."""
        return [] if self.layer is None else [self.layer]

    def check_model(self, sha256: str, name: str = "the device model") -> None:
        """Refuse a probe fitted on another model file."""
        fitted = self.meta.get("model_sha256")
        if fitted and fitted != sha256:
            raise ConfigError(
                f"This probe was fitted on {self.meta.get('model', 'another model')} (sha256 {fitted[:12]}...), "
                f"not on {name} (sha256 {sha256[:12]}...): its weights mean nothing on another model's states. "
                "Fit one for this model with `rpra train probe`."
            )

    def fingerprint(self) -> str:
        """A hash of what the probe computes (its arrays and scalars), e.g. for cache keys."""
        digest = hashlib.sha256()
        remote = () if self.remote_weights is None else (self.remote_weights, np.array([self.remote_bias], float))
        for array in (self.mean, self.std, self.weights, np.array([self.bias, self.sigma, self.scale_max], float), *remote):
            digest.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
        digest.update(f"{self.layer}:{self.head}".encode())
        return digest.hexdigest()

    def score(self, hidden: np.ndarray) -> float:
        """The predicted judge score (unclipped), or the logit of P(pass), for one hidden state."""
        return self._heads(hidden)[0]

    def p_remote(self, hidden: np.ndarray) -> float | None:
        """P(the remote's answer passes), from the remote head; None without one."""
        remote = self._heads(hidden)[1]
        return None if remote is None else _sigmoid(remote)

    def _heads(self, hidden: np.ndarray) -> tuple[float, float | None]:
        """Both heads' outputs for one state, standardised once: the score (or pass logit) and
        the remote head's logit (None without one)."""
        if hidden.shape != self.mean.shape:
            raise ConfigError(
                f"The probe expects hidden states of width {self.mean.shape[0]}, got {hidden.shape[0]}: "
                "it was fitted on another model. Refit it with `rpra train probe`."
            )
        z = (hidden - self.mean) / self.std
        remote = None if self.remote_weights is None else float(z @ self.remote_weights + self.remote_bias)
        return float(z @ self.weights + self.bias), remote

    def prediction(self, hidden: np.ndarray, pass_mark: int) -> Prediction:
        """A distribution over 1..N. Logistic: P(pass) spread evenly over the scores at or above
        ``pass_mark``, the rest over those below (its expected score rises with P(pass)). Ridge:
        the normal N(score, sigma²) integrated over each score's bin. With a remote head the
        prediction carries ``p_remote`` too."""
        score, remote = self._heads(hidden)
        p_remote = None if remote is None else _sigmoid(remote)
        if self.head == "logistic":
            p = _sigmoid(score)
            passing = self.scale_max - pass_mark + 1
            if passing >= self.scale_max:  # every score passes
                probs = np.full(self.scale_max, 1.0 / self.scale_max)
            else:
                probs = np.array([(1 - p) / (self.scale_max - passing)] * (self.scale_max - passing) + [p / passing] * passing)
            probs = np.clip(probs, 1e-12, None)
            return Prediction(tuple(float(q) for q in probs / probs.sum()), pass_mark, "probe", p_remote=p_remote)
        mu, sigma = score, max(self.sigma, 1e-3)
        edges = [-math.inf, *(k + 0.5 for k in range(1, self.scale_max)), math.inf]
        cdf = [0.5 * (1 + math.erf((e - mu) / (sigma * math.sqrt(2)))) if math.isfinite(e) else float(e > 0) for e in edges]
        probs = np.clip(np.diff(cdf), 1e-12, None)
        return Prediction(tuple(float(p) for p in probs / probs.sum()), pass_mark, "probe", p_remote=p_remote)

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part.npz")  # np.savez adds .npz to names without it
        remote = {} if self.remote_weights is None else {"remote_weights": self.remote_weights, "remote_bias": np.array(self.remote_bias)}
        np.savez(
            tmp, mean=self.mean, std=self.std, weights=self.weights,
            scalars=np.array([self.bias, self.sigma, self.scale_max]),
            meta=np.array(json.dumps({**self.meta, "format": PROBE_FORMAT, "layer": self.layer, "head": self.head})),
            **remote,
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
                if meta.get("format") not in READABLE:
                    raise ConfigError(f"{path} is a probe of format {meta.get('format')!r}; this rpra reads {', '.join(READABLE)}.")
                remote = {"remote_weights": f["remote_weights"], "remote_bias": float(f["remote_bias"])} if "remote_weights" in f else {}
                probe = cls(f["mean"], f["std"], f["weights"], bias, sigma, int(scale_max), meta,
                            layer=meta.get("layer"), head=meta.get("head", "ridge"), **remote)  # fmt: skip
        except FileNotFoundError:
            raise ConfigError(f"No probe at {path}. Fit one with `rpra train probe`.") from None
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"{path} is not a readable rpra probe ({exc}). Refit it with `rpra train probe`.") from None
        return probe


def draft_features(slot: np.ndarray, draft: np.ndarray, logprobs: list[float] | dict) -> np.ndarray:
    """What a verifier reads, in one layout for training and the device: the state at the PA slot,
    the mean state over the draft (the same layer), and the draft's mean and minimum token
    log-probability and log(1 + its length in tokens). ``logprobs``: each token's, or a
    record's ``{"mean", "min", "tokens"}``; an empty draft reads as certain (0, 0, 0)."""
    if isinstance(logprobs, dict):
        stats = [logprobs.get("mean") or 0.0, logprobs.get("min") or 0.0, math.log1p(logprobs.get("tokens") or 0)]
    else:
        stats = [sum(logprobs) / len(logprobs), min(logprobs), math.log1p(len(logprobs))] if logprobs else [0.0, 0.0, 0.0]
    return np.concatenate([np.asarray(slot, np.float32), np.asarray(draft, np.float32), np.asarray(stats, np.float32)])


def _sigmoid(logit: float) -> float:
    return 1.0 / (1.0 + math.exp(-min(max(logit, -50.0), 50.0)))


def default_probe_path(model_path: Path, reads: str = "slot") -> Path:
    """Where a model's probe (``reads`` "slot") or verifier ("draft") lives: next to the model file."""
    return model_path.with_name(f"{model_path.stem}.{'probe' if reads == 'slot' else 'verifier'}.npz")


def list_probes() -> list[dict]:
    """The probes and verifiers next to the pulled models: model name, path, what it reads and the fit's report."""
    from rpra.models import list_models

    found = []
    for model in list_models():
        for reads in ("slot", "draft"):
            path = default_probe_path(Path(model["path"]), reads) if model.get("path") else None
            if path and path.exists():
                probe = Probe.load(path)
                keys = ("examples", "passing", "cv_auroc_pass", "cv_rmse", "mean_baseline_rmse", "cv_spearman", "created")
                found.append({"model": model["name"], "path": str(path), "reads": probe.reads, "head": probe.head, "layer": probe.layer,
                              "remote_head": (probe.meta.get("remote_head") or {}).get("cv_auroc_pass") if probe.predicts_remote else None,
                              **{k: probe.meta.get(k) for k in keys}})  # fmt: skip
    return found
