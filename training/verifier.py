"""The verifier: whether the device model's *draft* is right, read from its states over the draft.

The pre-answer probe (``training.probe``) decides before a token is generated. Once the device
has drafted, it knows more: the draft's own token probabilities, and its hidden states over the
draft (correctness probes on answer tokens beat logit baselines: Orgad et al. 2024). The
verifier is a logistic head on ``rpra.probe.draft_features`` of the recorded local answer:

- the residual stream at the PA slot and its mean over the draft, at one layer (by default the
  pre-answer probe's layer, which the layer sweep picked), read with the answer committed in
  the layout the device answers in (``Runtime.read_draft``: the same states the device watches
  while it generates, ``LocalSession.watched_states``);
- the draft's mean and minimum token log-probability and its length.

Its target is the draft's own verdict: the exact verifier's on the answer as given (one option
order; the pre-answer label asks for both, because there the answer is not yet known), else
the judge's pass.

Reads are cached under RPRA_HOME/features (by model sha256, record id and a hash of the answer),
every layer's, so a refit or another layer costs no prefill. Nothing here reads a test split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from rpra.config import Settings, home
from rpra.errors import RpraError


def target(record: dict) -> bool | None:
    """Whether the record's draft is right: the exact verifier on the answer as given, else the label's pass."""
    if record.get("exact_local") is not None:
        return bool(record["exact_local"] >= 0.5)
    return (record.get("label") or {}).get("pass")


def _answer_key(answer: str) -> str:
    return hashlib.sha256(answer.encode()).hexdigest()[:16]


def draft_reads(model: str, records: list[dict], *, threads: int | None = None, progress: Callable[[], None] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Per record, every layer's state at the PA slot and its mean over the recorded local answer
    (``Runtime.read_draft``): two arrays of shape (layers, records, width), float32, the model's
    last layer left out (llama.cpp computes it for the output row only). Cached by model file,
    record id and answer; a cached read of another answer is read again."""
    from rpra.local import LocalModel
    from rpra.models import file_sha256, resolve
    from rpra.runtime import Runtime
    from rpra.training.layer_sweep import _safe

    cache = home() / "features" / file_sha256(resolve(model))[:16]
    cache.mkdir(parents=True, exist_ok=True)
    settings = Settings(model=model, temperature=0.0, log=False, mode="local-only", n_ctx=2048, n_threads=threads)
    runtime = None
    slots, drafts = [], []
    for r in records:
        answer = r.get("local_answer") or ""
        file = cache / f"{_safe(r['id'])}.draft.npz"
        saved = dict(np.load(file)) if file.exists() else {}
        if str(saved.get("answer")) != _answer_key(answer):
            if runtime is None:
                n_layer = LocalModel.from_settings(replace(settings, n_ctx=64)).n_layer
                local = LocalModel.from_settings(replace(settings, n_batch=2048), capture_layers=range(n_layer - 1))
                runtime = Runtime(settings, local=local)
            slot, draft = runtime.read_draft([{"role": "user", "content": r["prompt"]}], answer)
            layers = sorted(draft)
            saved = {"slot": np.stack([slot[k] for k in layers]).astype(np.float16), "layers": np.array(layers),
                     "draft": np.stack([draft[k] for k in layers]).astype(np.float16), "answer": np.array(_answer_key(answer))}  # fmt: skip
            tmp = file.with_name(file.stem + ".part.npz")  # whole or absent: another job may read it now
            np.savez(tmp, **saved)
            tmp.replace(file)
        slots.append(np.asarray(saved["slot"], np.float32))
        drafts.append(np.asarray(saved["draft"], np.float32))
        if progress:
            progress()
    return np.stack(slots, axis=1), np.stack(drafts, axis=1)


def feature_matrix(records: list[dict], slot: np.ndarray, draft: np.ndarray, layer: int) -> np.ndarray:
    """``draft_features`` of each record at ``layer``, from ``draft_reads``' arrays and the
    record's answer statistics (``local_logprobs``, ``local_tokens``)."""
    from rpra.probe import draft_features

    rows = [draft_features(slot[layer, i], draft[layer, i], {**(r.get("local_logprobs") or {}), "tokens": r.get("local_tokens") or 0})
            for i, r in enumerate(records)]  # fmt: skip
    return np.stack(rows)


def train_verifier(settings: Settings, *, suite: str, split: str = "train", layer: int | str = "auto", limit: int | None = None,
                   folds: int = 5, output: Path | None = None,
                   progress: Callable[[int], Callable[[], None]] = lambda total: lambda: None) -> tuple[Path, dict]:  # fmt: skip
    """Fit the verifier on collected splits and save it (by default next to the model,
    ``<model>.verifier.npz``).

    ``suite``: one or several comma-separated (their collections are pooled); ``limit``: at most
    that many records per suite, a seeded sample (``layer_sweep.labelled_records``' order).
    ``layer``: a number, or "auto": the pre-answer probe's layer from the model's layer sweep.
    """
    from rpra.benchmarks.bench import bench_settings
    from rpra.models import file_sha256, resolve
    from rpra.probe import default_probe_path
    from rpra.training.data import load_collection
    from rpra.training.probe import fit_logistic, sweep_layer

    settings = bench_settings(settings)
    suites = [s.strip() for s in suite.split(",") if s.strip()]
    collections = [load_collection(settings.model, s, split) for s in suites]
    records = []
    for c in collections:
        held = [r for r in c.records if r.get("local_answer") is not None and target(r) is not None]
        if limit is not None and len(held) > limit:
            held = sorted(held, key=lambda r: hashlib.sha256(f"0:{r['id']}".encode()).digest())[:limit]
        records += held
    if not records:
        raise RpraError(f"No record in {suite} ({split}) has a local answer with a verdict: collect some with "
                        "`rpra collect --split train --verified`.")  # fmt: skip
    slot, draft = draft_reads(settings.model, records, threads=settings.n_threads, progress=progress(len(records)))
    if layer == "auto":
        layer = sweep_layer(settings.model)
        if layer is None:
            layer = slot.shape[0] // 2
    layer = int(layer)
    if not 0 <= layer < slot.shape[0]:
        raise RpraError(f"layer {layer} is not a layer a verifier can read (0 to {slot.shape[0] - 1}).")
    x = feature_matrix(records, slot, draft, layer)
    y = np.asarray([target(r) for r in records], int)
    model_path = resolve(settings.model)
    meta = {"model": settings.model, "model_sha256": file_sha256(model_path), "collections": [str(c.folder) for c in collections],
            "reads": "draft", "target": "the draft is right (exact verifier on the answer as given, else the judge's pass)",
            "feature": f"l_out-{layer} at the PA slot and its mean over the draft; the draft's mean / min token log-probability, log(1 + tokens)"}  # fmt: skip
    verifier, report = fit_logistic(x, y, folds=folds, layer=layer, scale_max=settings.scale_max, meta=meta)
    # The same head without the states: how much the states add to the draft's own confidence.
    stats = x[:, -3:]
    _, report["logprobs_only"] = fit_logistic(stats, y, folds=folds, scale_max=settings.scale_max)
    report["suites"] = {s: sum(r.get("suite") == s for r in records) for s in suites}
    verifier.meta.update({"logprobs_only_cv_auroc": report["logprobs_only"]["cv_auroc_pass"], "suites": report["suites"]})
    return verifier.save(output or default_probe_path(model_path, "draft")), report
