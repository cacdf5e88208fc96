"""A pool of targets: expected-reward routing among the device model and any number of remotes.

Expected-reward-prediction routing (ERP, arXiv 2603.20217) predicts, per prompt, the reward each
target in a pool would earn and picks the best within a cost budget; SharedTrunkNet (arXiv
2603.20895) reads one encoder's prefill for every target. Here the encoder is the device model
itself: its residual stream at the PA slot (the probe's layer, one read it makes anyway), and one
small logistic head per target on it (``PoolHeads``). Adding a target costs its records and one
head fit (``rpra train pool``).

The pool file (TOML):

    rule = "tolerance"        # or "net": the best expected reward minus cost_weight x cost
    tolerance = 0.05          # "tolerance": the cheapest target within this of the best (llm-router's rule)
    cost_weight = 0.0         # "net": reward points one currency unit is worth giving up
    budget_day = 1.0          # optional spend limits, in the prices' currency
    budget_month = 20.0

    [[target]]
    name = "device"           # no url: the device model
    records = "qwen2.5-coder-0.5b-instruct"

    [[target]]
    name = "qwen-1.5b"
    url = "http://127.0.0.1:8080/v1"
    model = "default"
    price_in = 0.10           # per million input tokens
    price_out = 0.30          # per million output tokens
    latency_s = 15.0
    records = "qwen2.5-coder-0.5b-instruct:remote"   # whose answers the head learns (see ``Target.records``)

Pure: the pool's description, the heads' arithmetic and the rule. No model is loaded here.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from rpra.errors import ConfigError

RULES = ("tolerance", "net")
_TARGET_KEYS = {"name", "url", "model", "price_in", "price_out", "latency_s", "api_key_env", "records"}
_POOL_KEYS = {"rule", "tolerance", "cost_weight", "budget_day", "budget_month", "target"}


@dataclass(frozen=True)
class Target:
    """One model a request may go to."""

    name: str
    url: str | None = None  # an OpenAI-compatible base URL; None: the device model itself
    model: str = "default"  # the model name sent to that endpoint
    price_in: float = 0.0  # per million input tokens, in the pool's currency
    price_out: float = 0.0  # per million output tokens
    latency_s: float = 0.0  # a latency estimate, shown beside the choice
    api_key_env: str | None = None  # the environment variable holding its API key
    # Whose collected answers its head learns: "<device model>" (that model's own answers, as
    # `rpra collect` recorded them) or "<device model>:remote" (the remote answers collected
    # beside that model's). Default: the device's own for the device target.
    records: str | None = None

    @property
    def is_device(self) -> bool:
        return self.url is None

    def cost(self, tokens_in: float, tokens_out: float) -> float:
        """What one request costs at this target's prices."""
        return (self.price_in * tokens_in + self.price_out * tokens_out) / 1e6


@dataclass(frozen=True)
class Pool:
    """The targets and the rule that picks among them."""

    targets: tuple[Target, ...]
    rule: str = "tolerance"
    tolerance: float = 0.05
    cost_weight: float = 0.0
    budget_day: float | None = None
    budget_month: float | None = None

    def __post_init__(self) -> None:
        names = [t.name for t in self.targets]
        if not names:
            raise ConfigError("A pool needs at least one [[target]].")
        if len(set(names)) != len(names):
            raise ConfigError(f"Target names must differ; got {', '.join(names)}.")
        if sum(t.is_device for t in self.targets) > 1:
            raise ConfigError("At most one target is the device model (a target without url).")
        if self.rule not in RULES:
            raise ConfigError(f"Unknown pool rule {self.rule!r}; use one of {', '.join(RULES)}.")
        for name, value in (("tolerance", self.tolerance), ("cost_weight", self.cost_weight), ("budget_day", self.budget_day),
                            ("budget_month", self.budget_month)):  # fmt: skip
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ConfigError(f"{name} must be a finite number >= 0; got {value}.")
        for t in self.targets:
            if any(not math.isfinite(v) or v < 0 for v in (t.price_in, t.price_out, t.latency_s)):
                raise ConfigError(f"Target {t.name}: prices and latency must be finite numbers >= 0.")
            if t.url is not None and not t.url.startswith(("http://", "https://")):
                raise ConfigError(f"Target {t.name}: url must start with http:// or https://; got {t.url!r}.")

    def target(self, name: str) -> Target:
        for t in self.targets:
            if t.name == name:
                return t
        raise ConfigError(f"No target {name!r} in the pool; it has {', '.join(t.name for t in self.targets)}.")

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.targets]


def load_pool(path: Path | str) -> Pool:
    """The pool described by a TOML file (the module's docstring shows one); a clear error for a
    missing file, bad TOML, an unknown key or a bad value."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"No pool file at {path}.")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Pool file {path} is not valid TOML: {exc}") from exc
    unknown = set(data) - _POOL_KEYS
    if unknown:
        raise ConfigError(f"Pool file {path}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(_POOL_KEYS))}.")
    targets = []
    for i, entry in enumerate(data.get("target", [])):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"Pool file {path}: [[target]] {i + 1} needs a name.")
        unknown = set(entry) - _TARGET_KEYS
        if unknown:
            raise ConfigError(f"Pool file {path}: target {entry['name']}: unknown key(s) {', '.join(sorted(unknown))}.")
        try:
            targets.append(Target(**{k: (float(v) if k in ("price_in", "price_out", "latency_s") else v) for k, v in entry.items()}))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"Pool file {path}: target {entry['name']}: {exc}") from exc
    options = {k: data[k] for k in ("rule", "tolerance", "cost_weight", "budget_day", "budget_month") if k in data}
    try:
        return Pool(tuple(targets), **options)
    except TypeError as exc:
        raise ConfigError(f"Pool file {path}: {exc}") from exc


def pick(pool: Pool, rewards: Mapping[str, float], costs: Mapping[str, float], *, spendable: float | None = None) -> str:
    """The target a request goes to, given each target's expected reward (P(its answer is right))
    and expected cost. ``spendable``: what the budget still allows; a target dearer than that is
    left out (the cheapest target stays, so a request always goes somewhere).

    ``tolerance``: the cheapest target whose expected reward is within ``pool.tolerance`` of the
    best (llm-router's rule); ``net``: the best expected reward minus ``cost_weight`` x cost.
    Ties go to the cheaper target, then to the earlier one in the pool."""
    order = {name: i for i, name in enumerate(pool.names)}
    names = [n for n in pool.names if n in rewards]
    if not names:
        raise ValueError("No expected reward for any target of the pool.")
    if spendable is not None:
        affordable = [n for n in names if costs[n] <= spendable + 1e-12]
        names = affordable or [min(names, key=lambda n: (costs[n], order[n]))]
    if pool.rule == "tolerance":
        best = max(rewards[n] for n in names)
        return min((n for n in names if rewards[n] >= best - pool.tolerance - 1e-12), key=lambda n: (costs[n], order[n]))
    return max(names, key=lambda n: (rewards[n] - pool.cost_weight * costs[n], -costs[n], -order[n]))


@dataclass
class PoolHeads:
    """One logistic head per target on one shared feature: the device model's state at the PA
    slot, at ``layer``, standardised once (``mean``, ``std``). ``weights[k] @ z + biases[k]`` is
    target k's calibrated logit of a right answer."""

    names: list[str]
    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray  # (targets, width)
    biases: np.ndarray  # (targets,)
    layer: int
    meta: dict = field(default_factory=dict)

    def rewards(self, state: np.ndarray) -> dict[str, float]:
        """Each target's P(right) for one request's slot state."""
        z = (np.asarray(state, float) - self.mean) / self.std
        logits = self.weights @ z + self.biases
        return {n: float(1 / (1 + np.exp(-v))) for n, v in zip(self.names, logits)}

    def save(self, path: Path) -> Path:
        import json

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".part.npz")
        np.savez(tmp, names=np.array(self.names), mean=self.mean, std=self.std, weights=self.weights, biases=self.biases,
                 layer=np.array(self.layer), meta=np.array(json.dumps(self.meta)))  # fmt: skip
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> PoolHeads:
        import json

        try:
            with np.load(path) as saved:
                return cls([str(n) for n in saved["names"]], saved["mean"], saved["std"], saved["weights"], saved["biases"],
                           int(saved["layer"]), json.loads(str(saved["meta"])))  # fmt: skip
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigError(f"{path} is not a pool heads file (`rpra train pool` writes one): {exc}") from exc

    def with_head(self, name: str, mean: np.ndarray, std: np.ndarray, weights: np.ndarray, bias: float) -> PoolHeads:
        """These heads plus (or with a new) ``name``'s, fitted on its own standardisation and
        re-expressed on the shared one: the same logit for every state."""
        scale = weights / std
        w, b = scale * self.std, float(bias + scale @ (self.mean - mean))
        names = [n for n in self.names if n != name] + [name]
        keep = [i for i, n in enumerate(self.names) if n != name]
        return PoolHeads(names, self.mean, self.std, np.vstack([self.weights[keep], w[None]]), np.append(self.biases[keep], b),
                         self.layer, dict(self.meta))  # fmt: skip


def default_pool_path(model_path: Path) -> Path:
    """Where a device model's pool heads live: beside it, ``<model>.pool.npz``."""
    return model_path.with_name(model_path.stem + ".pool.npz")


def period_starts(now: datetime) -> tuple[str, str]:
    """The ISO timestamps (UTC) where the current day and month began: what a budget counts from."""
    now = now.astimezone(timezone.utc)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return day.isoformat(timespec="milliseconds"), day.replace(day=1).isoformat(timespec="milliseconds")


def budget_left(pool: Pool, *, spent_day: float, spent_month: float) -> float | None:
    """What the pool may still spend now: the tighter of its day and month budgets, less what
    was spent in each (never below 0); None without a budget."""
    left = [b - spent for b, spent in ((pool.budget_day, spent_day), (pool.budget_month, spent_month)) if b is not None]
    return max(0.0, min(left)) if left else None
