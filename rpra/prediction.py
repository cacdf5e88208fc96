"""A predicted judge score: a probability distribution over the scale 1..N, not a sampled digit.

The device model's prediction is read from its token probabilities at a grammar-forced slot
(see ``rpra.slot``); this module holds the result and the quantities the controller routes on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Prediction:
    """``probs[i]`` is P(judge score = i + 1). Probabilities sum to 1.

    ``p_remote``, where the predictor has one (a probe with a remote head), is P(the remote
    model's answer to the same request passes): with it the controller can route on the expected
    gain of keeping the answer local, ``advantage``, instead of on the local answer alone.
    """

    probs: tuple[float, ...]
    pass_mark: int
    predictor: str = "zero-shot"
    p_remote: float | None = None

    def __post_init__(self) -> None:
        if len(self.probs) < 2:
            raise ValueError("A prediction needs a scale of at least two scores.")
        if any(p < 0 or math.isnan(p) for p in self.probs) or not math.isclose(sum(self.probs), 1.0, abs_tol=1e-6):
            raise ValueError(f"Not a probability distribution: {self.probs}")
        if not 1 <= self.pass_mark <= len(self.probs):
            raise ValueError(f"pass_mark {self.pass_mark} is off the scale 1..{len(self.probs)}")
        if self.p_remote is not None and not 0.0 <= self.p_remote <= 1.0:
            raise ValueError(f"p_remote must be a probability; got {self.p_remote}")

    @classmethod
    def from_logprobs(cls, logprobs: list[float], pass_mark: int, predictor: str = "zero-shot") -> Prediction:
        """Normalise log-probabilities of the scores 1..N (any constant offset) into a Prediction."""
        top = max(logprobs)
        weights = [math.exp(lp - top) for lp in logprobs]
        total = sum(weights)
        return cls(tuple(w / total for w in weights), pass_mark, predictor)

    @property
    def scale_max(self) -> int:
        return len(self.probs)

    @property
    def expected(self) -> float:
        """The expected judge score, E[score]."""
        return sum((i + 1) * p for i, p in enumerate(self.probs))

    @property
    def p_pass(self) -> float:
        """P(score >= pass_mark)."""
        return sum(self.probs[self.pass_mark - 1 :])

    @property
    def advantage(self) -> float | None:
        """P(local passes) - P(remote passes): the expected gain, in passes, of keeping the answer
        local (negative: the remote is expected to do better). None without a ``p_remote``."""
        return None if self.p_remote is None else self.p_pass - self.p_remote

    @property
    def mode(self) -> int:
        """The single most likely score (what the runtime writes into the slot)."""
        return max(range(len(self.probs)), key=self.probs.__getitem__) + 1

    def to_dict(self) -> dict:
        remote = {} if self.p_remote is None else {"p_remote": round(self.p_remote, 4), "advantage": round(self.advantage, 4)}
        return {
            "predictor": self.predictor,
            "distribution": {str(i + 1): round(p, 6) for i, p in enumerate(self.probs)},
            "expected": round(self.expected, 4),
            "p_pass": round(self.p_pass, 4),
            "mode": self.mode,
            "pass_mark": self.pass_mark,
            "scale_max": self.scale_max,
            **remote,
        }
