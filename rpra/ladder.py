"""The test-time compute ladder: more local compute before deferring (pure: no model here).

Between "answer now" and "defer" the device can spend more of its own compute where it pays
(Snell et al. 2024). The first rung here is **best-of-N**: N answers sampled in one llama.cpp
batch (``LocalSession.sample_many``), each scored by the draft verifier, and one kept:

- ``weighted``: answers that agree pool their scores, and the best-scored member of the best
  pool is kept (search-and-learn's weighted best-of-N: a right answer reached several ways
  outweighs one lucky high score);
- ``best``: the single highest score;
- ``majority``: the most frequent answer, no verifier (self-consistency), for comparison.

Answers agree when their ``answer_key`` is equal: the final number where there is one, else the
normalised text.

**Allocation** (``allocate``): which rung each request gets, by difficulty. The pre-answer
prediction sorts calibration requests into bins; each bin gets the action (answer, best-of-N,
revise, defer) with the best mean quality minus its priced cost there.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rpra.errors import ConfigError

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_WORD = re.compile(r"[^\w]+")
RULES = ("weighted", "best", "majority")
REVISE_BELOW = 0.5  # the revision rung revises a draft the verifier gives P(pass) under this (set before any run)
_ACTION = re.compile(r"answer|revise|defer|best-of-([2-9]|[1-9]\d)")


def answer_key(text: str) -> str:
    """What two answers must share to count as the same answer: the final number (commas and a
    trailing ".0" dropped), else the lower-cased words of the first line."""
    numbers = _NUMBER.findall(text or "")
    if numbers:
        value = numbers[-1].replace(",", "")
        if "." in value:
            value = value.rstrip("0").rstrip(".")
        return f"number:{value}"
    first = (text or "").strip().split("\n", 1)[0]
    return "text:" + _WORD.sub(" ", first.lower()).strip()


def choose(answers: Sequence[str], scores: Sequence[float], *, rule: str = "weighted",
           key: Callable[[str], str] = answer_key) -> int:  # fmt: skip
    """The index of the answer best-of-N keeps under ``rule`` (``RULES``); ties go to the earlier
    answer (sequence 0 is the greedy one)."""
    if rule not in RULES:
        raise ValueError(f"Unknown best-of-N rule {rule!r}; use one of {', '.join(RULES)}.")
    if not answers or len(answers) != len(scores):
        raise ValueError(f"best-of-N needs one score per answer; got {len(answers)} answers and {len(scores)} scores.")
    indices = range(len(answers))
    if rule == "best":
        return max(indices, key=lambda i: (scores[i], -i))
    keys = [key(a) for a in answers]
    pooled: dict[str, float] = defaultdict(float)
    for k, score in zip(keys, scores):
        pooled[k] += score if rule == "weighted" else 1.0
    first_seen = {k: keys.index(k) for k in pooled}
    winner = max(pooled, key=lambda k: (pooled[k], -first_seen[k]))
    return max((i for i in indices if keys[i] == winner), key=lambda i: (scores[i], -i))


def allocate(scores: Sequence[float], outcomes: dict[str, Sequence[float]], costs: dict[str, float], *, bins: int = 4,
             price: float = 1.0) -> tuple[list[float], list[str]]:  # fmt: skip
    """Compute-optimal allocation (Snell et al. 2024) on a calibration split: sort requests into
    ``bins`` difficulty bins by their pre-answer score (quantiles), and give each bin the action
    with the best mean quality minus ``price`` x cost there.

    ``outcomes[action][i]``: the quality request ``i`` gets under ``action`` (e.g. "answer",
    "best-of-4", "revise", "defer"); ``costs[action]``: what the action costs, in the caller's
    unit (remote price, local seconds, or both weighed). Returns the bin edges (``bins - 1``
    inner quantiles of ``scores``) and each bin's action; ``policy_action`` applies them.
    """
    import numpy as np

    if bins < 1:
        raise ValueError(f"bins is {bins}; use 1 or more.")
    missing = set(outcomes) - set(costs)
    if missing:
        raise ValueError(f"No cost for {', '.join(sorted(missing))}.")
    x = np.asarray(scores, float)
    if not len(x) or any(len(v) != len(x) for v in outcomes.values()):
        raise ValueError("Each action needs one outcome per scored request.")
    edges = [float(e) for e in np.quantile(x, np.linspace(0, 1, bins + 1)[1:-1])]
    which = np.searchsorted(edges, x, side="right")
    actions = []
    for b in range(bins):
        held = which == b
        if not held.any():  # an empty bin (tied scores) takes its lower neighbour's action
            actions.append(actions[-1] if actions else min(costs, key=costs.get))
            continue
        value = {a: float(np.mean(np.asarray(q, float)[held])) - price * costs[a] for a, q in outcomes.items()}
        actions.append(max(value, key=lambda a: (value[a], -costs[a])))
    return edges, actions


def policy_action(score: float, edges: Sequence[float], actions: Sequence[str]) -> str:
    """The action ``allocate``'s policy takes for a request with pre-answer ``score``."""
    import bisect

    return actions[bisect.bisect_right(list(edges), score)]


def best_of_n(action: str | None) -> int:
    """N of an allocation's "best-of-N" action; 0 for any other action."""
    match = _ACTION.fullmatch(action or "")
    return int(match.group(1)) if match and match.group(1) else 0


def drafts_first(action: str | None) -> bool:
    """Whether an allocation's action drafts unseen before an answer is shown (best-of-N, revise)."""
    return action == "revise" or best_of_n(action) > 0


@dataclass(frozen=True)
class Allocation:
    """``allocate``'s policy, as the device runs it (``--set allocation=FILE``): bin edges on the
    pre-answer P(pass) and each bin's action: "answer", "best-of-N", "revise" or "defer".
    ``meta``: how it was calibrated (model, prices, the calibration split's share deferred)."""

    edges: tuple[float, ...]
    actions: tuple[str, ...]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.actions) != len(self.edges) + 1:
            raise ConfigError(f"An allocation needs one action per bin: {len(self.edges)} edges make {len(self.edges) + 1} bins, "
                              f"and it has {len(self.actions)} actions.")  # fmt: skip
        if list(self.edges) != sorted(self.edges):
            raise ConfigError(f"An allocation's bin edges must be in increasing order; got {list(self.edges)}.")
        bad = [a for a in self.actions if not _ACTION.fullmatch(a)]
        if bad:
            raise ConfigError(f"Unknown allocation action(s) {', '.join(map(repr, bad))}; use answer, best-of-N (N from 2), revise or defer.")

    def action(self, p_pass: float) -> str:
        return policy_action(p_pass, self.edges, self.actions)

    @property
    def best_of(self) -> int:
        """The largest N of its best-of-N actions (1 without one): the sequences the model must decode at once."""
        return max([best_of_n(a) for a in self.actions] + [1])

    @property
    def drafts(self) -> bool:
        """Whether an action reads the verifier (best-of-N picks by it; revise revises what it doubts)."""
        return any(drafts_first(a) for a in self.actions)

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        tmp.write_text(json.dumps({"edges": list(self.edges), "actions": list(self.actions), "meta": self.meta}, indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path | str) -> Allocation:
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text())
            return cls(tuple(float(e) for e in data["edges"]), tuple(str(a) for a in data["actions"]), dict(data.get("meta") or {}))
        except FileNotFoundError as exc:
            raise ConfigError(f"No allocation file at {path} (`rpra train ladder` writes one).") from exc
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is not an allocation file (`rpra train ladder` writes one): {exc}") from exc


def default_allocation_path(model_path: Path) -> Path:
    """Where a device model's allocation lives: beside it, ``<model>.ladder.json``."""
    return model_path.with_name(model_path.stem + ".ladder.json")
