"""The pool's reward heads: one logistic head per target on the device model's own prefill.

The shared feature is the encoder's residual stream at the PA slot, at the layer its layer sweep
picked (the probe's), read from the feature cache the sweep and the verifier keep (a record not
in it is read once and added). Each target's head learns whether *that target's* answer to the
item was right (the exact verifier on the answer as given), from its own records:

- the device target: the device model's collected answers;
- another model run through `rpra collect` (e.g. SmolLM2, "served locally"): its own records,
  on the same items (item ids are the same for every model), read through the encoder;
- a remote: the remote answers collected beside the device's (``rpra collect --remote``).

Adding a target therefore costs its records and one head fit (timed in the report). Nothing here
reads a test split.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rpra.config import Settings
from rpra.errors import ConfigError, RpraError
from rpra.pool import Pool, PoolHeads, Target, default_pool_path


def records_source(target: Target, encoder: str) -> tuple[str, str]:
    """(model, side) of a target's records: ``Target.records`` parsed, or the encoder's own
    answers for the device target."""
    source = target.records or (encoder if target.is_device else None)
    if not source:
        raise ConfigError(f"Target {target.name} names no records: set records = \"<model>\" (its own answers) or "
                          "\"<model>:remote\" (the remote answers collected beside that model's) in the pool file.")  # fmt: skip
    model, _, side = source.partition(":")
    side = side or "local"
    if side not in ("local", "remote"):
        raise ConfigError(f"Target {target.name}: records = {source!r}; the part after ':' can only be 'remote'.")
    return model, side


def target_records(target: Target, encoder: str, *, split: str = "train", suites: tuple[str, ...] | None = None) -> list[dict]:
    """A target's records on ``split`` with its reward: ``{"id", "prompt", "suite", "right", "tokens_out"}``."""
    from rpra.benchmarks.collection import Collection, collection_dir, model_name

    model, side = records_source(target, encoder)
    if suites is None:
        from rpra.training.layer_sweep import DEFAULT_SUITES

        suites = DEFAULT_SUITES
    out = []
    for suite in suites:
        for r in Collection.open(collection_dir(model, suite, split)).records:  # seeded from its committed export
            right = r.get(f"exact_{side}")
            if right is not None:
                out.append({"id": r["id"], "prompt": r["prompt"], "suite": r.get("suite") or suite, "right": bool(right >= 0.5),
                            "tokens_out": r.get(f"{side}_tokens")})  # fmt: skip
    if not out:
        raise RpraError(f"No {split} record of {model_name(model)} holds a verified {side} answer for target {target.name}: "
                        f"collect some (`rpra collect --split {split} --verified{' --remote' if side == 'remote' else ''} "
                        f"--set model={model}`).")  # fmt: skip
    return out


def shared_states(encoder: str, records: list[dict], layer: int, *, threads: int | None = None,
                  progress: Callable[[], None] | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """The encoder's slot state at ``layer`` for each record's prompt, by id: cached reads, and a
    prefill (``layer_sweep.features``, cached too) for those missing."""
    from rpra.training.layer_sweep import cached_slot_states, features

    unique = list({r["id"]: r for r in records}.values())
    found = cached_slot_states(encoder, unique, layer)
    for _ in found:
        if progress:
            progress()
    missing = [r for r in unique if r["id"] not in found]
    if missing:
        slot, _, _ = features(encoder, missing, progress=progress, threads=threads, self_check=False)
        found.update(zip((r["id"] for r in missing), slot[layer]))
    return found


def train_pool(settings: Settings, pool: Pool, *, output: Path | None = None, only: list[str] | None = None, folds: int = 5,
               layer: int | None = None, progress: Callable[[int], Callable[[], None]] = lambda total: lambda: None
               ) -> tuple[Path, dict]:  # fmt: skip
    """Fit (or refit) the pool's heads on the device model (``settings.model``, the encoder) and
    save them, by default next to the model (``<model>.pool.npz``). ``only``: refit these targets'
    heads and keep the others of an existing file (adding a target to a pool). Returns the path
    and a report per target: records, right share, CV AUROC, seconds to fit."""
    from rpra.models import file_sha256, resolve
    from rpra.training.probe import sweep_layer

    encoder = settings.model
    model_path = resolve(encoder)
    output = output or default_pool_path(model_path)
    layer = sweep_layer(encoder) if layer is None else layer
    if layer is None:
        raise RpraError(f"No layer sweep for {encoder}: run `python -m rpra.training.layer_sweep --model {encoder}` first.")
    names = only or pool.names
    unknown = [n for n in names if n not in pool.names]
    if unknown:
        raise ConfigError(f"No target {', '.join(unknown)} in the pool ({', '.join(pool.names)}).")
    heads = None
    if only and output.exists():
        heads = PoolHeads.load(output)
        if heads.meta.get("encoder_sha256") != file_sha256(model_path) or heads.layer != layer:
            raise ConfigError(f"{output} was fitted on another encoder or layer; refit every head (leave out --only).")
    per_target = {n: target_records(pool.target(n), encoder) for n in names}
    every = [r for rs in per_target.values() for r in rs]
    states = shared_states(encoder, every, layer, threads=settings.n_threads, progress=progress(len({r["id"] for r in every})))
    heads, report = fit_heads(per_target, states, layer, heads=heads, folds=folds,
                              meta={"encoder": encoder, "encoder_sha256": file_sha256(model_path), "targets": {}})  # fmt: skip
    return heads.save(output), report


def fit_heads(per_target: dict[str, list[dict]], states: dict[str, np.ndarray], layer: int, *, heads: PoolHeads | None = None,
              folds: int = 5, meta: dict | None = None) -> tuple[PoolHeads, dict]:  # fmt: skip
    """One logistic head per target (``training.probe.fit_logistic``) on its records' ``states``
    (by record id), added to ``heads`` (or to new ones with ``meta``), each re-expressed on the
    shared standardisation. Returns the heads and per target: records, right share, CV AUROC,
    strength, seconds to fit, mean answer length."""
    from rpra.training.probe import fit_logistic

    report = {}
    for name, rs in per_target.items():
        started = time.perf_counter()
        x = np.stack([states[r["id"]] for r in rs])
        y = np.asarray([r["right"] for r in rs], int)
        head, fit = fit_logistic(x, y, folds=folds, layer=layer)
        if heads is None:
            heads = PoolHeads([], head.mean, head.std, np.zeros((0, len(head.mean))), np.zeros(0), layer, dict(meta or {}))
        heads = heads.with_head(name, head.mean, head.std, head.weights, head.bias)
        tokens = [r["tokens_out"] for r in rs if r.get("tokens_out")]
        report[name] = {"records": len(rs), "right_share": float(y.mean()), "cv_auroc": fit["cv_auroc_pass"], "c": fit["c"],
                        "fit_s": round(time.perf_counter() - started, 3), "tokens_out_mean": float(np.mean(tokens)) if tokens else None,
                        "suites": sorted({r["suite"] for r in rs})}  # fmt: skip
        heads.meta.setdefault("targets", {})[name] = {k: v for k, v in report[name].items() if k != "suites"}
    return heads, report
