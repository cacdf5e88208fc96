"""The controller: a pure function from (prediction, policy) to a routing decision.

No I/O and no model here, so it can be tested exhaustively and reused by the benchmark, which
replays recorded predictions through the same code the runtime runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal, TypeVar

from rpra.config import Mode, RouteOn
from rpra.errors import ConfigError
from rpra.ladder import Allocation
from rpra.prediction import Prediction

Route = Literal["local", "remote"]
Score = TypeVar("Score")  # a float, or a numpy array of them when the benchmark replays many


def routed_score(prediction: Prediction | Mapping, route_on: RouteOn) -> float:
    """The quantity the controller thresholds, from a ``Prediction`` or its ``to_dict()`` form
    (what collected records hold): E[score], P(pass), or the advantage P(local passes) -
    P(remote passes), which only a predictor of the remote's pass gives."""
    value = prediction.get(route_on) if isinstance(prediction, Mapping) else getattr(prediction, route_on)
    if value is None:
        name = prediction.get("predictor") if isinstance(prediction, Mapping) else prediction.predictor
        raise ConfigError(f"route_on = {route_on} needs a prediction of the remote's pass as well; the {name} predictor "
                         "gives none (a probe with a remote head does: `rpra train probe --remote`).")  # fmt: skip
    return float(value)


def defers(score: Score, threshold: float) -> Score:
    """The routing rule: a routed score below the threshold goes to the remote model.

    The one place the comparison is written: the runtime, the benchmark's replay of recorded
    predictions and `rpra calibrate` all call it (elementwise on arrays), so what they report is
    what the device does.
    """
    return score < threshold


@dataclass(frozen=True)
class Decision:
    """Where a request goes, and why."""

    route: Route
    mode: Mode
    reason: str
    score: float | None = None  # the routed quantity (expected score, P(pass) or advantage), if predicted
    threshold: float | None = None
    route_on: RouteOn | None = None
    # The cascade's second point: the routed quantity of the verifier's prediction for the local
    # draft, and its threshold; None when no draft was checked (the first point decided).
    draft_score: float | None = None
    draft_threshold: float | None = None
    # The ladder's allocation: the rung the request's difficulty bin gets ("answer", "best-of-N",
    # "revise" or "defer"; ``rpra.ladder.Allocation``), None when routed by the threshold.
    action: str | None = None

    @property
    def point(self) -> str:
        """Which point decided: "prompt" (before any answer) or "draft" (the verifier, after one)."""
        return "prompt" if self.draft_score is None else "draft"

    def to_dict(self) -> dict:
        return {
            "route": self.route,
            "mode": self.mode,
            "reason": self.reason,
            "score": None if self.score is None else round(self.score, 4),
            "threshold": self.threshold,
            "route_on": self.route_on,
            "point": self.point,
            **({} if self.draft_score is None else {"draft_score": round(self.draft_score, 4), "draft_threshold": self.draft_threshold}),
            **({} if self.action is None else {"action": self.action}),
        }


@dataclass(frozen=True)
class Controller:
    """Threshold routing (as in RouteLLM): defer when the predicted quality is below ``threshold``.

    With ``route_on="advantage"`` the quality is relative, P(local passes) - P(remote passes):
    threshold 0 defers whenever the remote is expected to do better, and -c prices a remote call
    at c passes (defer only when the remote is expected to gain more than c)."""

    threshold: float = 5.0
    route_on: RouteOn = "expected"
    mode: Mode = "auto"
    verify_threshold: float | None = None  # the cascade's second point: a checked draft below it is deferred (None: threshold)
    # The ladder's compute-optimal allocation (``rpra.ladder.Allocation``): in mode auto it routes
    # instead of the threshold, by the bin of the prediction's P(pass).
    allocation: Allocation | None = None

    @property
    def draft_threshold(self) -> float:
        return self.threshold if self.verify_threshold is None else self.verify_threshold

    def needs_prediction(self, mode: Mode | None = None) -> bool:
        """remote-only skips the local model entirely; the other modes predict (local-only to log it)."""
        return (mode or self.mode) != "remote-only"

    def decide(self, prediction: Prediction | None, mode: Mode | None = None) -> Decision:
        """Route one request. ``mode`` overrides the controller's mode for this request only."""
        mode = mode or self.mode
        if mode == "remote-only":
            return Decision("remote", mode, "mode remote-only")
        if prediction is None:
            if mode == "local-only":
                return Decision("local", mode, "mode local-only")
            raise ValueError("mode auto needs a prediction")
        score = routed_score(prediction, self.route_on)
        shown = _show(score, self.route_on, prediction.scale_max)
        limit = _show(self.threshold, self.route_on, prediction.scale_max)
        common = dict(mode=mode, score=score, threshold=self.threshold, route_on=self.route_on)
        if mode == "local-only":
            return Decision("local", reason=f"mode local-only (predicted {shown})", **common)
        if self.allocation is not None:
            action = self.allocation.action(prediction.p_pass)
            reason = f"allocation: P(pass) {prediction.p_pass:.2f} -> {action}"
            return Decision("remote" if action == "defer" else "local", reason=reason, action=action, **common)
        if defers(score, self.threshold):
            return Decision("remote", reason=f"predicted {shown} < {limit}", **common)
        return Decision("local", reason=f"predicted {shown} >= {limit}", **common)


    def check(self, first: Decision, verdict: Prediction) -> Decision:
        """The cascade's second point: ``first`` kept the request on the device, the device
        drafted an answer, and a verifier predicted ``verdict`` for that draft. Keep the draft, or
        defer it when its routed quantity is below ``verify_threshold`` (by default ``threshold``; the same ``route_on``
        and the same rule as the first point, ``defers``). In mode local-only the draft stays,
        with its check recorded."""
        if first.route != "local":
            raise ValueError("Only a draft the first point kept local is checked.")
        score = routed_score(verdict, self.route_on)
        shown = _show(score, self.route_on, verdict.scale_max)
        limit = _show(self.draft_threshold, self.route_on, verdict.scale_max)
        checked = dict(draft_score=score, draft_threshold=self.draft_threshold)
        if first.mode != "auto":
            return replace(first, reason=f"{first.reason}; draft checked: {shown}", **checked)
        if defers(score, self.draft_threshold):
            return replace(first, route="remote", reason=f"{first.reason}; draft checked: {shown} < {limit}", **checked)
        return replace(first, reason=f"{first.reason}; draft checked: {shown} >= {limit}", **checked)


def cascade_scores(first: Score, draft: Score, threshold: float) -> Score:
    """One routed score per request for a cascade, for the benchmark's curves: a request the
    first point defers (``first`` below ``threshold``) ranks below every drafted one, in the
    order of its first score; a drafted one ranks by its draft's score. Thresholding this at a
    ``verify_threshold`` above -1 defers exactly what ``decide`` then ``check`` defer (routed
    quantities lie in [-1, 10]); lower thresholds trace the first point's own deferrals."""
    import numpy as np

    first, draft = np.asarray(first, float), np.asarray(draft, float)
    return np.where(defers(first, threshold), first - 100.0, draft)


def _show(value: float, route_on: RouteOn, scale_max: int) -> str:
    if route_on == "advantage":
        return f"advantage {value:+.2f}"
    return f"{value:.1f}/{scale_max}" if route_on == "expected" else f"P(pass) {value:.2f}"
