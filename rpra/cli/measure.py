"""Measuring the predictors: `rpra collect`, `rpra bench`, `rpra report-card` and `rpra calibrate`.

These need the bench extra; `benchmarks/` imports rpra and is imported here only, inside the
commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from rpra.cli.common import ConfigOpt, SetOpt, bench_module, err, load, out, settings_command
from rpra.errors import RpraError

# The suites are named here, not imported: the bench extra is imported inside the commands only
# (tests/test_cli.py keeps this list equal to benchmarks.data.SUITES).
SUITE_NAMES = ("mmlu", "commonsenseqa", "openbookqa", "medqa", "logiqa", "mtbench", "arithmetic", "gsm", "arithmetic-graded",
               "letter-counting", "gcd", "simple-equations", "rpra-mix")
SuiteOpt = Annotated[str, typer.Option(help=f"{', '.join(SUITE_NAMES)}; or a .jsonl/.csv file with a prompt column; "
                                             "or hf:NAME[:SPLIT].")]  # fmt: skip
LimitOpt = Annotated[Optional[int], typer.Option(help="Items from the split (default: all).")]
JudgeOpt = Annotated[Optional[str], typer.Option("--judge-url", help="OpenAI-compatible judge (default: the remote model).")]
GrammarOpt = Annotated[Optional[bool], typer.Option("--judge-grammar/--no-judge-grammar",
                       help="Force the judge's reply format with a GBNF grammar (llama-cpp-python servers only). Default: on for the stand-in.")]  # fmt: skip
QualityOpt = Annotated[str, typer.Option(help="llm (judge scores) or exact (verifiers, items with gold answers).")]
BenchJsonOpt = Annotated[bool, typer.Option("--json", help="Print the results as JSON.")]


@settings_command()
def collect(
    settings,
    suite: SuiteOpt = "rpra-mix",
    split: Annotated[str, typer.Option(help="calibration, train or test.")] = "test",
    limit: LimitOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of the suite's sampling and splits.")] = 0,
    judge_url: JudgeOpt = None,
    judge_grammar: GrammarOpt = None,
    remote: Annotated[Optional[bool], typer.Option("--remote/--no-remote", help="Also collect the remote's answers (judged, or with --verified checked by the verifier). Default: on, off with --verified.", show_default=False)] = None,
    verified: Annotated[bool, typer.Option("--verified", help="Items with an answer key only, labelled by the verifier (no judge, no RPRA reasoning): fast training data, device side only. With --remote also the remote's answers: a test split for quality = exact. Bound answers with --set max_tokens=96.")] = False,
    permute: Annotated[bool, typer.Option("--permute/--no-permute", help="Also answer each multiple-choice item with its options rotated; the label counts it right only when both answers are (a right letter in one order only is position, not knowledge).")] = True,
    remote_max_tokens: Annotated[int, typer.Option(help="Longest remote answer, in tokens (a cap on the remote's cost; it is part of the cache key).", min=1)] = 256,
    in_flight: Annotated[Optional[int], typer.Option(help="Items whose remote and judge calls may run at once, overlapping the device (default: 4, or 1 for the local stand-in).", min=1)] = None,
    export: Annotated[bool, typer.Option("--export", help="Then write the collection to benchmarks/results/collections/ (gzipped, with provenance) to commit it.")] = False,
) -> None:
    """Run items through the device model, the remote and the judge; resumable, every call cached.

    An empty collection starts from its committed export, if there is one, so only new items cost calls.
    """
    from datetime import datetime, timezone

    bench = bench_module()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    records, out_dir = bench.run_collect(settings, suite=suite, which=split, limit=limit, seed=seed, judge_url=judge_url,
                                         judge_grammar=judge_grammar, remote_answers=(not verified) if remote is None else remote, verified=verified,
                                         permute=permute, in_flight=in_flight, remote_max_tokens=remote_max_tokens)  # fmt: skip
    from rpra.benchmarks.collection import Collection

    collection = Collection.open(out_dir)
    rate = (collection.runs() or [{}])[-1]
    rate = rate if rate.get("finished", "") >= started else {}  # a run with nothing to collect logs none: no stale rate
    passed = [r["label"]["pass"] for r in records if r.get("label", {}).get("pass") is not None]
    err.print(f"{len(records)} records in {out_dir}" + (f" · this run: {rate['new_records']} new, {rate['items_per_hour']} items/hour" if rate.get("items_per_hour") else "")
              + (f" · pass rate {sum(passed) / len(passed):.1%} of {len(passed)} labelled" if passed else ""))  # fmt: skip
    if export:
        err.print(f"exported {collection.export()} ({len(collection.records)} records)")


@settings_command()
def bench_run(
    settings,
    suite: SuiteOpt = "rpra-mix",
    split: Annotated[str, typer.Option(help="The split to evaluate on.")] = "test",
    limit: LimitOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of sampling, splits and bootstrap.")] = 0,
    quality: QualityOpt = "llm",
    judge_url: JudgeOpt = None,
    judge_grammar: GrammarOpt = None,
    json_out: BenchJsonOpt = False,
) -> None:
    """Collect what is missing, then evaluate every predictor and baseline (table, JSON, plot, report)."""
    records, out_dir = bench_module().run_collect(settings, suite=suite, which=split, limit=limit, seed=seed,
                                                  judge_url=judge_url, judge_grammar=judge_grammar)  # fmt: skip
    _report(settings, records, out_dir, quality=quality, seed=seed, json_out=json_out)


@settings_command()
def bench_report(
    settings,
    suite: SuiteOpt = "rpra-mix",
    split: Annotated[str, typer.Option(help="The split to evaluate on.")] = "test",
    quality: QualityOpt = "llm",
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    json_out: BenchJsonOpt = False,
) -> None:
    """Evaluate an existing collection (no remote or judge calls)."""
    bench_module()
    from rpra.benchmarks.collection import Collection

    collection = Collection.load(settings.model, suite, split)
    _report(settings, collection.records, collection.folder, quality=quality, seed=seed, json_out=json_out)


@settings_command()
def bench_pool(
    settings,
    pool: Annotated[Path, typer.Option("--pool", help="The pool file (TOML): its targets, prices and rule (see `rpra.pool`).")],
    heads: Annotated[Optional[Path], typer.Option("--heads", help="The pool's heads (default: next to the model, `rpra train pool`).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Where the report goes (default: benchmarks/results).")] = None,
    json_out: BenchJsonOpt = False,
) -> None:
    """Evaluate routing over a pool on the rpra-mix test split: the pool's rules (its own setting, the settings chosen on
    train items, and each rule swept) against always each target, two-model threshold routing, random and the oracle.
    Needs each target's verified test records and the pool's heads (`rpra train pool`); the device model is the encoder."""
    bench_module()
    from rpra.benchmarks import pool as bench_pool_module

    result = bench_pool_module.run(pool, encoder=settings.model, heads_path=heads)
    paths = bench_pool_module.write(result, out_dir or bench_pool_module.RESULTS)
    if json_out:
        print(json.dumps({k: v for k, v in result.items() if k != "policies"} | {"files": {k: str(v) for k, v in paths.items()}}, indent=1))
        return
    out.print(bench_pool_module.markdown(result))
    out.print(f"[dim]report {paths['markdown']} · plot {paths['plot']} · json {paths['json']}[/]")


def _report(settings, records, out_dir, *, quality: str, seed: int, json_out: bool) -> None:
    from rpra.benchmarks.collection import Collection
    from rpra.benchmarks.report import TERMINAL_COLUMNS, table_rows

    results, agree, paths = bench_module().report(records, settings, out_dir, quality=quality, seed=seed,
                                                  log=lambda line: err.print(f"[dim]{escape(line)}[/]"),
                                                  provenance=Collection.open(out_dir).provenance)  # fmt: skip
    if json_out:
        print(json.dumps({"results": results, "agreement": agree, "files": {k: str(v) for k, v in paths.items()}}, indent=2))
        return
    table = Table("router", *[c for c, _ in TERMINAL_COLUMNS], title=f"{results['items']} items · quality: {quality} judge · routed on {settings.route_on}")
    for row in table_rows(results, TERMINAL_COLUMNS, short=True):
        table.add_row(*row)
    out.print(table)
    if agree:
        from rpra.benchmarks.report import agreement_line

        out.print(agreement_line(agree))
    out.print(f"[dim]report {paths['markdown']} · plot {paths['plot']} · json {paths['json']}[/]")


@settings_command()
def card_build(
    settings,
    suite: Annotated[str, typer.Option(help="A suite, or several comma-separated (with --verified: e.g. arithmetic,gsm,mmlu).")] = "rpra-mix",
    limit: Annotated[int, typer.Option(help="Items to learn from (per suite).")] = 48,
    split: Annotated[str, typer.Option(help="calibration, or train for more evidence (never test: the card would have seen it).")] = "calibration",
    verified: Annotated[bool, typer.Option("--verified", help="Learn from answer-key verdicts (`rpra collect --verified`): no judge, device calls only, and none at all for committed records.")] = False,
    batch_size: Annotated[int, typer.Option(help="Examples per update (PRESS).", min=1)] = 8,
    max_words: Annotated[int, typer.Option(help="Length budget of the card.")] = 250,
    example_chars: Annotated[int, typer.Option(help="Each example's question and answer, cut to this many characters for the writer (bounds its context).", min=20)] = 300,
    seed: Annotated[int, typer.Option(help="Seed of the order the writer sees the examples in.")] = 0,
    judge_url: JudgeOpt = None,
    judge_grammar: GrammarOpt = None,
    journal: Annotated[bool, typer.Option("--journal", help="Also append each writer call to benchmarks/results/calls/ (commit it): a build stopped on one machine resumes on another. A committed journal is always replayed.")] = False,
) -> None:
    """Write a new version of the device model's report card from checked calibration or train records.

    The writer (the remote model) rewrites the card batch by batch (suites interleaved), shown the
    measured per-topic statistics so far; a card that contradicts them is sent back once and what
    stays wrong is cut; the final card ends with those statistics. Every writer call is cached, so
    a re-run after an interruption or an error resumes where it stopped (on another machine too,
    from a committed --journal).
    """
    if split not in ("calibration", "train"):
        raise RpraError(f"--split must be calibration or train, not {split!r}: a card built from the test split would have seen the answers it is scored on.")
    bench = bench_module()
    import hashlib

    from rpra.benchmarks.report_cards import build_card, journal_path, save_card

    path = journal_path(settings.model)
    if path is None and journal:
        raise RpraError("--journal needs a folder of committed results, and RPRA_SEEDS is set empty (nothing committed is read or written).")

    suites = [s.strip() for s in suite.split(",") if s.strip()]
    records, folders = [], []
    for name in suites:
        rs, folder = bench.run_collect(settings, suite=name, which=split, limit=limit, judge_url=judge_url, judge_grammar=judge_grammar,
                                       remote_answers=not verified and split != "train", verified=verified)  # fmt: skip
        records += rs
        folders.append(str(folder))
    records.sort(key=lambda r: hashlib.sha256(f"{seed}:{r['id']}".encode()).digest())  # every batch sees several suites
    from rich.progress import Progress

    from rpra.benchmarks.cache import CallCache, Journal

    calls = CallCache.default() if path is None else Journal(CallCache.default(), path, write=journal)
    if getattr(calls, "loaded", 0):
        err.print(f"[dim]{calls.loaded} writer calls replayed from {calls.path}[/]")
    with bench.endpoints(settings, judge_url=judge_url) as ep, Progress(console=err, transient=True) as bar:
        task = bar.add_task("writing the card", total=len(records))
        text, history = build_card(records, ep.remote, batch_size=batch_size, max_words=max_words, pass_mark=settings.pass_mark,
                                   example_chars=example_chars, cache=calls, writer_id=ep.remote_id,
                                   progress=lambda n: bar.advance(task, n), log=lambda line: bar.console.print(f"[dim]{escape(line)}[/]"))  # fmt: skip
    card = save_card(text, device_model=settings.model, meta={"suite": suite, "split": split, "verified": verified, "records": len(records),
                                                              "collections": folders, "writer": ep.remote_id, "batch_size": batch_size,
                                                              "updates": len(history), "example_chars": example_chars})  # fmt: skip
    out.print(card.text)
    err.print(f"[dim]saved {card.path} (version {card.version}, {card.meta['words']} words)[/]")


@settings_command()
def card_show(settings) -> None:
    """Print the latest report card of the device model."""
    bench_module()
    from rpra.benchmarks.report_cards import latest_card

    card = latest_card(settings.model)
    if card is None:
        raise RpraError(f"No report card for {settings.model} yet. Build one with `rpra report-card build`.")
    out.print(card.text)
    err.print(f"[dim]{card.path} (version {card.version})[/]")


def calibrate(
    target_share: Annotated[Optional[float], typer.Option(help="Send this share of requests to the remote (0..1).")] = None,
    max_fail: Annotated[Optional[float], typer.Option(help="Allow at most this share of failing local answers (0..1).")] = None,
    suite: SuiteOpt = "rpra-mix",
    limit: Annotated[int, typer.Option(help="Calibration items.")] = 48,
    write: Annotated[bool, typer.Option(help="Write the threshold into the config file.")] = True,
    judge_url: JudgeOpt = None,
    judge_grammar: GrammarOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Choose the routing threshold on the calibration split and write it to the config file."""
    from rpra.config import default_config_path, write_settings

    settings = load(config, set_)  # not settings_command: the threshold is written to this config file
    if (target_share is None) == (max_fail is None):
        raise RpraError("Give exactly one of --target-share or --max-fail.")
    bench = bench_module()
    from rpra.benchmarks.calibrate import calibrate as choose

    records, _ = bench.run_collect(settings, suite=suite, which="calibration", limit=limit, judge_url=judge_url, judge_grammar=judge_grammar)
    field = bench.add_configured_predictions(records, settings)  # the threshold is for the predictor that will use it
    try:
        result = choose(records, protocol=field, route_on=settings.route_on, pass_mark=settings.pass_mark,
                        target_share=target_share, max_fail=max_fail)  # fmt: skip
    except ValueError as exc:
        raise RpraError(str(exc)) from None
    out.print(f"threshold {result['threshold']} ({settings.predictor}, {settings.route_on}, {settings.protocol}): remote share {result['remote_share']:.1%}, "
              f"local answers failing {result['local_fail_rate']:.1%} on {result['items']} calibration items")  # fmt: skip
    if write:
        path = write_settings(config or default_config_path(), {"threshold": result["threshold"]})
        out.print(f"[dim]wrote threshold = {result['threshold']} to {path}[/]")
