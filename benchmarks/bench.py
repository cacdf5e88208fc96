"""Wiring for `rpra collect`, `rpra bench`, `rpra report-card` and `rpra calibrate`.

Which items, where collections live, which endpoints answer and judge. When no remote is
configured the stand-in (Qwen2.5-Coder-1.5B via llama-cpp-python's server on 127.0.0.1) is
started for the duration of the command; its identity in the call cache is its GGUF's sha256,
so cached calls survive the server's changing port.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np

from rpra import prompts
from rpra.benchmarks.cache import CallCache, cached
from rpra.benchmarks.collect import Collector, collect, predict_only, provenance_for
from rpra.benchmarks.collection import Collection, collection_dir, label_differences
from rpra.benchmarks.data import SUITES, DataError, Item, load_file, load_hf, load_suite, sample, split
from rpra.benchmarks.judge import Judge
from rpra.config import Settings
from rpra.local import LocalModel
from rpra.models import file_sha256, resolve
from rpra.predictors import DraftVerifier, Predictor, ProbePredictor, ReportCardPredictor, ZeroShotPredictor
from rpra.remote import RemoteModel
from rpra.runtime import Runtime

STAND_IN = "qwen2.5-coder-1.5b-instruct"


@dataclass
class Endpoints:
    remote: RemoteModel
    remote_id: str
    judge: RemoteModel
    judge_id: str
    judge_is_stand_in: bool  # a llama-cpp-python server we started: its GBNF grammar field is safe


@contextmanager
def endpoints(settings: Settings, *, judge_url: str | None = None, judge_model: str = "default") -> Iterator[Endpoints]:
    """The remote and the judge: configured ones, or the local stand-in started for the duration."""
    if settings.remote_url:
        remote = RemoteModel.from_settings(settings)
        remote_id = f"{remote.base_url}|{remote.model}"
        server = None
    else:
        from rpra.remote_server import RemoteServer

        path = resolve(STAND_IN)
        # llama-cpp-python's server defaults to half the cores; the stand-in has the machine to itself.
        server = RemoteServer(path, port=0, n_ctx=4096, n_threads=settings.n_threads or os.cpu_count(), model_alias="stand-in").start()
        remote = RemoteModel(server.url, model="stand-in", timeout=600.0, retries=1)
        remote_id = f"gguf:{file_sha256(path)}"
    try:
        if judge_url:
            judge = RemoteModel(judge_url, model=judge_model, api_key=settings.remote_api_key, timeout=600.0)
            judge_id = f"{judge.base_url}|{judge_model}"
        else:
            judge, judge_id = remote, remote_id
        yield Endpoints(remote, remote_id, judge, judge_id, judge_is_stand_in=server is not None and not judge_url)
    finally:
        remote.close()
        if server is not None:
            server.stop()


def load_items(suite: str, *, limit: int | None = None, seed: int = 0, report=print) -> list[Item]:
    """A built-in suite, a user's JSONL/CSV file, or ``hf:NAME[:SPLIT]`` (a Hugging Face dataset).

    Malformed rows in user data are reported (with their line numbers) and skipped.
    """
    if suite in SUITES:
        return load_suite(suite, limit=limit, seed=seed)
    if suite.startswith("hf:"):
        name, _, hf_split = suite[3:].partition(":")
        items, problems = load_hf(name, split=hf_split or "test")
    elif Path(suite).expanduser().is_file():
        items, problems = load_file(Path(suite).expanduser())
    else:
        raise DataError(f"Unknown suite {suite!r}: use one of {', '.join(SUITES)}, a .jsonl/.csv file, or hf:NAME[:SPLIT].")
    for problem in problems:
        report(f"skipped: {problem}")
    if not items:
        raise DataError(f"No usable rows in {suite} ({len(problems)} skipped).")
    return items


def items_for(suite: str, which: str, *, limit: int | None, seed: int = 0, keyed: bool = False) -> list[Item]:
    """The first ``limit`` items of a split (``keyed``: of those with an answer key), in the
    suite's sample order (``data.sample``: the levels in turn where a suite has them, so a
    ``--limit 40`` sample of arithmetic holds every level, not the first levels of the source
    order). Splits hash item ids, so an item's split never changes."""
    pool = load_items(suite, limit=None if limit is None else max(4 * limit, 40), seed=seed, report=_warn)
    chosen = split(pool, seed=seed)[which]
    if keyed:
        chosen = [item for item in chosen if item.gold is not None]
    return chosen if limit is None else sample(chosen, limit, seed, suite=suite)


def _warn(message: str) -> None:
    import sys

    print(message, file=sys.stderr)


def bench_settings(settings: Settings) -> Settings:
    """Deterministic device settings for collection: the base model (no adapter) answering
    greedily with the zero-shot predictor, nothing logged. Other predictors are added to the
    records afterwards (``add_predictions``)."""
    return replace(settings, temperature=0.0, log=False, mode="local-only", adapter=None, predictor="zero-shot", sources={})


def run_collect(settings: Settings, *, suite: str, which: str, limit: int | None, seed: int = 0, judge_url: str | None = None,
                judge_grammar: bool | None = None, remote_max_tokens: int = 256, progress: bool = True,
                remote_answers: bool = True, verified: bool = False, permute: bool = True,
                in_flight: int | None = None) -> tuple[list[dict], Path]:  # fmt: skip
    """Collect (or extend) the collection for ``suite``/``which``; returns its records and folder.

    ``judge_grammar`` forces the judge's reply format with llama-cpp-python's GBNF extension (only
    for such servers; a cloud API rejects the field). Default: on for the stand-in we start.

    ``verified``: only the items with an answer key, labelled by the verifier: no judge, no RPRA
    reasoning. Without ``remote_answers`` the device side only: what a predictor trains on, at
    device speed. With them, the remote's answers too, checked by the same verifier: a test split
    for routing under quality = exact, at the cost of the remote's answers alone.

    ``permute``: multiple-choice items are also answered with their options rotated, and labelled
    correct only when both answers are (``Collector``).

    ``in_flight``: items whose remote and judge calls may run at once, overlapping the device's
    work (``collect``). Default: 4 for a configured endpoint, 1 for the stand-in we start (one
    llama.cpp server on the same cores gains nothing from a queue, and its callers' timeouts would).
    """
    settings = bench_settings(settings)
    items = items_for(suite, which, limit=limit, seed=seed, keyed=verified)
    local = LocalModel.from_settings(settings)
    cache = CallCache.default()
    collection = Collection.open(collection_dir(settings.model, suite, which))
    wanted = {item.id for item in items}
    pa = Runtime(replace(settings, protocol="pa"), local=local)
    if verified and not remote_answers:  # the device side only: no endpoint to start
        collector = Collector(
            pa=pa, rpra=None, remote=None, judge=None, cache=cache, permute=permute,
            provenance=provenance_for(settings, local, suite=suite, split=which, remote_id="none", judge_id="verifier"),
        )  # fmt: skip
        records = collect(items, collector, collection, progress=progress)
        return [r for r in records if r["id"] in wanted], collection.folder
    with endpoints(settings, judge_url=judge_url) as ep:
        # verified: the remote's answers are checked by the verifier too (quality = exact), no judge
        judge = None if verified else Judge(ep.judge, cache=cache, scale_max=settings.scale_max, model_id=ep.judge_id,
                                            grammar=ep.judge_is_stand_in if judge_grammar is None else judge_grammar)  # fmt: skip
        collector = Collector(
            pa=pa, rpra=None if verified else Runtime(replace(settings, protocol="rpra"), local=local),
            remote=ep.remote if remote_answers else None, judge=judge, cache=cache,
            provenance=provenance_for(settings, local, suite=suite, split=which, remote_id=ep.remote_id,
                                      judge_id="verifier" if verified else ep.judge_id),
            remote_max_tokens=remote_max_tokens, permute=permute,
        )  # fmt: skip
        in_flight = in_flight or (1 if ep.judge_is_stand_in else 4)
        records = collect(items, collector, collection, progress=progress, in_flight=in_flight)
    return [r for r in records if r["id"] in wanted], collection.folder


def add_predictions(records: list[dict], settings: Settings, *, field: str, predictor: Predictor | None = None,
                    adapter: Path | None = None, protocol: str = "pa", progress: bool = True) -> list[dict]:  # fmt: skip
    """One more predictor's predictions for each record, as ``record[field]`` (device calls only, cached).

    The cache key holds what shapes the prediction: the instructions, the prompt, the adapter's
    file hash, the probe's fingerprint, and for RPRA the reasoning settings.
    """
    settings = replace(bench_settings(settings), protocol=protocol, adapter=str(adapter) if adapter else None)
    predictor = predictor or ZeroShotPredictor()
    local = LocalModel.from_settings(settings, capture_layers=predictor.capture_layers or None)
    runtime = Runtime(settings, local=local, predictor=predictor)
    cache, sha = CallCache.default(), file_sha256(local.path)
    system = runtime.predictor.system_prompt(protocol, settings.scale_max)
    identity: dict = {}
    if adapter is not None:
        identity["adapter"] = file_sha256(adapter)
    if isinstance(predictor, ProbePredictor):
        identity["probe"] = predictor.probe.fingerprint()
    if protocol == "rpra":
        identity["rpra"] = {"reason_tokens": settings.reason_tokens, "temperature": settings.temperature, "repeat_penalty": settings.repeat_penalty}
    from rich.progress import track

    for r in track(records, description=f"predicting: {field}", disable=not progress, transient=True):
        messages = [{"role": "user", "content": r["prompt"]}]
        out = cached(cache, "device-predict", sha, {"system": system, "messages": messages, **identity},
                     partial(predict_only, runtime, messages))  # fmt: skip
        r[field], r[f"{field}_decision_ms"] = out["prediction"], out["decision_ms"]
        if protocol == "rpra":
            r[f"{field}_reasoning_tokens"] = out["reasoning_tokens"]
    return records


def add_configured_predictions(records: list[dict], settings: Settings) -> str:
    """The field of ``records`` holding the prediction of the predictor ``settings`` configure:
    the collected zero-shot one (``settings.protocol``) for the zero-shot predictor, else that
    predictor's, added as ``record["configured"]`` (device calls, cached). A threshold is only
    meaningful on the predictor that will be thresholded: `rpra calibrate` uses this."""
    from rpra.runtime import predictor_from_settings

    if settings.predictor == "zero-shot" and not settings.adapter:
        return settings.protocol
    adapter = None
    if settings.adapter:
        from rpra.adapters import resolve_adapter

        adapter = resolve_adapter(settings.adapter, model=resolve(settings.model))
    add_predictions(records, settings, field="configured", predictor=predictor_from_settings(settings), adapter=adapter,
                    protocol=settings.protocol)  # fmt: skip
    return "configured"


def add_card_predictions(records: list[dict], settings: Settings, card_text: str, *, field: str = "card_pa") -> list[dict]:
    """The report-card predictor's PA prediction for each record (device calls only, cached)."""
    return add_predictions(records, settings, field=field, predictor=ReportCardPredictor(card_text))


def add_trained_predictions(records: list[dict], settings: Settings, *, log: Callable[[str], None] = print) -> list[str]:
    """Every trained predictor the device model has, added to ``records``: the report card (its
    latest), SFT PA and RPRA (the configured adapter, else the newest trained on this model) and
    the probe (the configured one, else the one next to the model). Returns the fields added;
    ``log`` says what is missing and how to make it."""
    from rpra.benchmarks.report_cards import latest_card
    from rpra.adapters import list_adapters, resolve_adapter
    from rpra.predictors import FineTunedPredictor
    from rpra.probe import Probe, default_probe_path

    added = []
    card = latest_card(settings.model)
    if card is not None:
        add_card_predictions(records, settings, card.text)
        added.append("card_pa")
    else:
        log("no report card for this model yet (`rpra report-card build`): no report-card predictor")
    model = resolve(settings.model)
    sha = file_sha256(model)
    adapter = resolve_adapter(settings.adapter, model=model) if settings.adapter else next(
        (a.path for a in list_adapters() if a.meta.get("base_sha256") == sha), None)  # fmt: skip
    if adapter is not None:
        log(f"SFT predictor: adapter {adapter}")
        for protocol in ("pa", "rpra"):
            add_predictions(records, settings, field=f"sft_{protocol}", predictor=FineTunedPredictor(), adapter=adapter, protocol=protocol)
            added.append(f"sft_{protocol}")
    else:
        log("no adapter for this model yet (`rpra train sft`): no SFT predictor")
    probe_path = Path(settings.probe).expanduser() if settings.probe else default_probe_path(model)
    if probe_path.exists():
        probe = Probe.load(probe_path)
        probe.check_model(sha, settings.model)
        add_predictions(records, settings, field="probe_pa", predictor=ProbePredictor(probe))
        added.append("probe_pa")
    else:
        log("no probe for this model yet (`rpra train probe`): no probe predictor")
    verifier_path = Path(settings.verifier).expanduser() if settings.verifier else default_probe_path(model, "draft")
    if verifier_path.exists() and all(r.get("local_answer") is not None for r in records):
        verifier = Probe.load(verifier_path)
        verifier.check_model(sha, settings.model)
        add_verifier_predictions(records, settings, DraftVerifier(verifier))
        added.append("verifier")
    elif not verifier_path.exists():
        log("no draft verifier for this model yet (`rpra train verifier`): no verifier or cascade")
    return added


def draft_reads(records: list[dict], settings: Settings, layer: int, *, progress: bool = True, what: str = "reading drafts"
                ) -> list[dict]:  # fmt: skip
    """Per record, the device model's state at the PA slot and its mean over the recorded local
    answer at ``layer`` (``Runtime.read_draft``: one prefill of the prompt and the answer), and
    that read's time: ``{"slot", "draft", "ms"}``. Cached by model file, layer, prompt and answer,
    so the verifier's predictions and the pool's shared feature cost one read between them; the
    model is loaded only on a miss."""
    from rich.progress import track

    settings = bench_settings(settings)
    cache, sha = CallCache.default(), file_sha256(resolve(settings.model))
    runtime = None
    out = []
    for r in track(records, description=what, disable=not progress, transient=True):
        answer = r.get("local_answer") or ""

        def read(r=r, answer=answer) -> dict:
            nonlocal runtime
            if runtime is None:
                runtime = Runtime(settings, local=LocalModel.from_settings(settings, capture_layers=[layer]))
            started = time.perf_counter()
            slot, draft = runtime.read_draft([{"role": "user", "content": r["prompt"]}], answer, layers=[layer])
            return {"slot": [round(float(v), 5) for v in slot[layer]], "draft": [round(float(v), 5) for v in draft[layer]],
                    "ms": (time.perf_counter() - started) * 1000}  # fmt: skip

        out.append(cached(cache, "draft-read", sha, {"layer": layer, "prompt": r["prompt"], "answer": answer}, read))
    return out


def add_verifier_predictions(records: list[dict], settings: Settings, verifier: DraftVerifier, *, field: str = "verifier",
                             remote_from: str = "probe_pa", progress: bool = True) -> list[dict]:  # fmt: skip
    """The draft verifier's prediction for each record's recorded local answer, as ``record[field]``,
    carrying the P(remote passes) of ``record[remote_from]`` (the pre-answer probe's remote head)
    where there is one, as the runtime's second point does. The states come from ``draft_reads``;
    ``<field>_read_ms`` is that read's time (the runtime watches the states while drafting
    instead, at no extra prefill)."""
    from rpra.benchmarks.baselines import as_prediction

    reads = draft_reads(records, settings, verifier.layer, progress=progress, what=f"reading drafts: {field}")
    for r, out in zip(records, reads):
        stats = {**(r.get("local_logprobs") or {}), "tokens": r.get("local_tokens") or 0}
        p_remote = (r.get(remote_from) or {}).get("p_remote")
        verdict = verifier.verify(np.asarray(out["slot"]), np.asarray(out["draft"]), stats, pass_mark=settings.pass_mark)
        r[field] = as_prediction(verdict.p_pass, predictor="verifier", scale_max=settings.scale_max, p_remote=p_remote)
        r[f"{field}_read_ms"] = out["ms"]
    return records


def add_self_verification(records: list[dict], settings: Settings, *, progress: bool = True) -> list[dict]:
    """AutoMix-style self-verification of each record's local answer, as ``record["self_check"]``
    (one device prefill per record, cached by the model file, prompt and answer)."""
    from rpra.benchmarks.baselines import as_prediction, self_verification

    settings = bench_settings(settings)
    local = LocalModel.from_settings(settings)
    cache, sha = CallCache.default(), file_sha256(local.path)
    from rich.progress import track

    for r in track(records, description="self-verification", disable=not progress, transient=True):
        def check(r=r) -> dict:
            started = time.perf_counter()
            return {"p_yes": self_verification(local, r["prompt"], r.get("local_answer") or ""),
                    "ms": (time.perf_counter() - started) * 1000}  # fmt: skip

        out = cached(cache, "self-check", sha, {"shots": prompts.SELF_CHECK_SHOTS, "prompt": r["prompt"], "answer": r.get("local_answer")}, check)
        r["self_check"] = as_prediction(out["p_yes"], predictor="self-verification", scale_max=settings.scale_max)
        r["self_check_decision_ms"] = out["ms"]
    return records


def _ladder_entry(row: dict, record: dict) -> dict:
    """One item's ladder outcomes from a ``best_of_n`` row: each action's answer right or not
    and the seconds it took the device (the record's own turn for the greedy draft)."""
    from rpra.ladder import choose

    kept = choose(row["answers"], row["scores"], rule="weighted")
    decide_s = (record.get("probe_pa_decision_ms") or record.get("pa_decision_ms") or 0.0) / 1000  # the probe's, where measured
    draft_s = (record.get("local_ms") or 0.0) / 1000
    revision = row.get("revision") or {}
    return {"greedy": bool(row["right"][0]), "greedy_score": float(row["scores"][0]), "kept": bool(row["right"][kept]),
            "kept_score": float(row["scores"][kept]), "revised": bool(row["revised"]), "decide_s": decide_s, "draft_s": draft_s,
            "best_s": float(row.get("batched_s") or (row.get("timing") or {}).get("batched_s") or 0.0),
            "revise_s": float(revision.get("s", 0.0)), "n": len(row["answers"])}  # fmt: skip


def ladder_rows(model: str, split: str = "test", results: Path | None = None) -> dict[str, dict]:
    """The committed ``best_of_n`` rows of ``model`` on ``split`` (``python -m rpra.benchmarks.best_of_n``),
    by item id; empty without them."""
    import json

    from rpra.benchmarks.collection import SEEDS, model_name

    path = (results or SEEDS.parent) / (f"best_of_n-{model_name(model)}" + ("" if split == "test" else f"--{split}") + ".json")
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    if saved.get("model_sha256") not in (None, file_sha256(resolve(model))):
        return {}  # rows of another file of that name
    return {r["id"]: r for r in saved.get("rows", [])}


def add_ladder_outcomes(records: list[dict], settings: Settings, *, log: Callable[[str], None] = print, results: Path | None = None) -> bool:
    """Each record's ladder outcomes (``_ladder_entry``) as ``record["ladder"]``, from the model's
    committed best-of-N rows on the test split; True when every record has them."""
    rows = ladder_rows(settings.model, "test", results)
    held = [r for r in records if r["id"] in rows]
    for r in held:
        r["ladder"] = _ladder_entry(rows[r["id"]], r)
    if len(held) < len(records):
        log(f"best-of-N outcomes for {len(held)} of {len(records)} records (`python -m rpra.benchmarks.best_of_n`): "
            + ("no ladder rows" if not held else "the ladder rows need them all"))  # fmt: skip
    return bool(records) and len(held) == len(records)


def ladder_calibration(settings: Settings, *, results: Path | None = None) -> dict | None:
    """The allocation's calibration split: the train items with best-of-N rows (``best_of_n
    --split train``: those whose records hold the remote's verdict), each action's quality
    (``report.exact_quality``) and device seconds, and the pre-answer probe's P(pass) as a probe
    fitted without the item gives it (``training.probe.out_of_fold_p_pass``, on the slot reads of
    every labelled train record of the probe's suites: cached, and read once where missing). None
    without rows or a probe."""
    from rpra.benchmarks.report import exact_quality as quality_of
    from rpra.probe import Probe, default_probe_path
    from rpra.training.pool import shared_states
    from rpra.training.probe import out_of_fold_p_pass

    rows = ladder_rows(settings.model, "train", results)
    probe_path = Path(settings.probe).expanduser() if settings.probe else default_probe_path(resolve(settings.model))
    if not rows or not probe_path.exists():
        return None
    probe = Probe.load(probe_path)
    suites = [Path(c).name.split("--")[1] for c in probe.meta.get("collections", [])]
    train = [r for suite in suites for r in Collection.load(settings.model, suite, "train").records
             if (r.get("label") or {}).get("pass") is not None]  # fmt: skip
    states = shared_states(settings.model, train, probe.layer, threads=settings.n_threads)
    calibration = [r for r in train if r["id"] in rows and r.get("exact_remote") is not None]
    if not calibration:
        return None
    x = np.stack([states[r["id"]] for r in train])
    y = np.asarray([bool(r["label"]["pass"]) for r in train], int)
    p_pass = dict(zip((r["id"] for r in train), out_of_fold_p_pass(x, y, c=float(probe.meta.get("c", 1.0)))))
    entries = [_ladder_entry(rows[r["id"]], r) for r in calibration]
    best = f"best-of-{len(next(iter(rows.values()))['answers'])}"
    q = {"answer": [quality_of(e["greedy"]) for e in entries], best: [quality_of(e["kept"]) for e in entries],
         "revise": [quality_of(e["revised"]) for e in entries], "defer": [quality_of(bool(r["exact_remote"])) for r in calibration]}  # fmt: skip
    seconds = {"answer": [e["draft_s"] for e in entries], best: [e["decide_s"] + e["best_s"] for e in entries],
               "revise": [e["draft_s"] + e["revise_s"] for e in entries], "defer": [e["decide_s"] for e in entries]}  # fmt: skip
    return {"p_pass": [float(p_pass[r["id"]]) for r in calibration], "outcomes": q, "seconds": seconds, "items": len(calibration),
            "suites": {s: sum(r.get("suite") == s for r in calibration) for s in sorted({r.get("suite") for r in calibration})},
            "fit_on": len(train)}  # fmt: skip


def label_mismatches(evaluated: dict | None, train: list[Collection]) -> list[str]:
    """Where the train collections were collected with other label-shaping settings than the
    evaluated records (``provenance["settings"]``): one line per setting and suite."""
    if not evaluated:
        return []
    return [f"{c.folder.name}: {name}={c.settings[name]}, the evaluated records {name}={evaluated[name]}"
            for c in train for name in label_differences(c.settings, evaluated)]


def add_baselines(records: list[dict], settings: Settings, *, log: Callable[[str], None] = print,
                  provenance: dict | None = None) -> list[str]:  # fmt: skip
    """The baselines every predictor must beat (``benchmarks.baselines``), added to ``records``:
    the category prior from the model's train collections of the records' suites, the local
    answer's confidence where the records hold its log-probabilities, and the device model's
    self-verification of its answer (one prefill per record, cached). With the evaluated
    collection's ``provenance``, train collections whose labels were made differently are named
    (``label_mismatches``).
    Returns the fields added."""
    from rpra.benchmarks.baselines import answer_confidence, as_prediction, category_prior
    from rpra.benchmarks.collection import remote_passed

    added = []
    collections = [Collection.open(collection_dir(settings.model, suite, "train"))
                   for suite in sorted({r.get("suite") for r in records} | {"rpra-mix"}) if suite]  # fmt: skip
    collections = [c for c in collections if c.records]
    for line in label_mismatches((provenance or {}).get("settings"), collections):
        log(f"warning: labels not comparable: {line} (the prior and the probe learn labels of another answer budget)")
    train = [r for c in collections for r in c.records]
    if train:
        prior = category_prior(train)
        # The remote's pass rate by category too, where train records hold remote answers: the
        # category-level expected gain, the bar for a predictor of the advantage.
        remote_pass = partial(remote_passed, pass_mark=settings.pass_mark)
        remote_prior = category_prior(train, outcome=remote_pass) if any(remote_pass(r) is not None for r in train) else None
        for r in records:
            r["prior"] = as_prediction(prior(r), predictor="category prior", scale_max=settings.scale_max,
                                       p_remote=None if remote_prior is None else remote_prior(r))  # fmt: skip
        added.append("prior")
    else:
        log("no train collection for this model: no category prior (`rpra collect --split train --verified`)")
    for which in ("mean", "min"):
        scores = [answer_confidence(r, which=which) for r in records]
        if all(s is not None for s in scores):
            for r, score in zip(records, scores):
                r[f"confidence_{which}"] = as_prediction(score, predictor=f"answer confidence ({which})", scale_max=settings.scale_max)
            added.append(f"confidence_{which}")
    if records and all(r.get("local_answer") is not None for r in records):
        add_self_verification(records, settings)
        added.append("self_check")
    return added


def report(records: list[dict], settings: Settings, out_dir: Path, *, quality: str = "llm", seed: int = 0,
           log: Callable[[str], None] = print, provenance: dict | None = None) -> tuple[dict, dict | None, dict[str, Path]]:  # fmt: skip
    """Evaluate every predictor on ``records`` (adding the trained ones first) with the settings'
    routing rule; write results.json, the plot and report.md under ``out_dir``.

    Returns the results, the judge's agreement with the exact verifiers (None without any) and
    the written files.
    """
    from rpra.benchmarks.judge import agreement
    from rpra.benchmarks.report import evaluate, write_reports

    add_trained_predictions(records, settings, log=log)
    add_baselines(records, settings, log=log, provenance=provenance)
    calibration = None
    if quality == "exact" and add_ladder_outcomes(records, settings, log=log):
        calibration = ladder_calibration(settings)
        if calibration is None:
            log("no best-of-N rows on the calibration split (`python -m rpra.benchmarks.best_of_n --split train`): no allocation row")
    results = evaluate(records, quality=quality, pass_mark=settings.pass_mark, threshold=settings.threshold, route_on=settings.route_on,
                       verify_threshold=settings.verify_threshold, calibration=calibration, seed=seed)  # fmt: skip
    # The judge against the verifiers, where both scored an answer (a verified collection has no judge).
    pairs = [((r.get(f"judge_{side}") or {}).get("score"), r[f"exact_{side}"]) for r in records for side in ("local", "remote")]
    pairs = [p for p in pairs if p[0] is not None and p[1] is not None]
    agree = agreement([p[0] for p in pairs], [p[1] for p in pairs], settings.pass_mark) if pairs else None
    paths = write_reports(results, out_dir / f"report-{quality}", agreement=agree)
    return results, agree, paths
