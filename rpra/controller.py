"""The controller: a pure function from (prediction, policy) to a routing decision.

No I/O and no model here, so it can be tested exhaustively and reused by the benchmark, which
replays recorded predictions through the same code the runtime runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar

from rpra.config import Mode, RouteOn
from rpra.errors import ConfigError
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

    def to_dict(self) -> dict:
        return {
            "route": self.route,
            "mode": self.mode,
            "reason": self.reason,
            "score": None if self.score is None else round(self.score, 4),
            "threshold": self.threshold,
            "route_on": self.route_on,
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
        if defers(score, self.threshold):
            return Decision("remote", reason=f"predicted {shown} < {limit}", **common)
        return Decision("local", reason=f"predicted {shown} >= {limit}", **common)


def _show(value: float, route_on: RouteOn, scale_max: int) -> str:
    if route_on == "advantage":
        return f"advantage {value:+.2f}"
    return f"{value:.1f}/{scale_max}" if route_on == "expected" else f"P(pass) {value:.2f}"
