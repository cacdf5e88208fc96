"""Training the predictors: `rpra train sft`, `probe`, `verifier`, `list` and `export`.

`sft` and `export` need the train extra (torch, transformers, peft, trl), imported only when they
run; `list` needs nothing beyond the runtime.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from rpra.cli.common import JsonOpt, bench_module, err, option_parameters, out, require_training, settings_command, with_parameters
from rpra.cli.measure import SuiteOpt

YamlOpt = Annotated[Optional[Path], typer.Option("--config", help="YAML file of training settings (flags override it).")]
# The options every head fitted on collections shares (`train probe`, `train verifier`).
FitSuiteOpt = Annotated[str, typer.Option(help="Collection(s) to fit on: a suite, or several comma-separated (e.g. arithmetic,gsm,mmlu).")]
FitSplitOpt = Annotated[str, typer.Option(help="Collection split to fit on (not the test split).")]
FoldsOpt = Annotated[int, typer.Option(help="Cross-validation folds for choosing the head's strength.")]


def _log(line: str) -> None:
    err.print(f"[dim]{escape(line)}[/]")


@contextmanager
def _progress(description: str):
    """A progress bar for reading records: yields ``progress(total)``, which adds the task and
    returns the callback advanced once per record (what the fitting functions take)."""
    from rich.progress import Progress

    with Progress(console=err, transient=True) as bar:

        def progress(total: int):
            task = bar.add_task(description, total=total)
            return lambda: bar.advance(task)

        yield progress


def _sft(config: YamlOpt = None) -> None:
    """Train a LoRA adapter that makes the device model predict its own judge score (peft + trl on CPU).

    Trains on the collected, judged train split (`rpra collect --split train --no-remote`), in the runtime's own turn layout; resumes an interrupted run from its last checkpoint; exports a GGUF LoRA that `--adapter NAME` loads. Settings come from --config FILE (YAML) and the flags below, flags winning.
    """


def _run_sft(kwargs: dict) -> None:
    from rpra.training.config import load_config

    cfg = load_config(kwargs.pop("config"), kwargs)
    require_training()
    from rpra.training.sft import train_sft

    out.print(json.dumps(train_sft(cfg, log=_log), indent=2))


def sft_command():
    """`rpra train sft`: one flag per field of ``training.config.SFTConfig``."""
    from rpra.training.config import SFTConfig

    return with_parameters(_sft, option_parameters(SFTConfig), _run_sft)


def train_list(json_out: JsonOpt = False) -> None:
    """Trained adapters (newest first), and the probes and draft verifiers next to pulled models."""
    from rpra.adapters import list_adapters
    from rpra.probe import list_probes

    keys = ("base_model", "created", "records", "steps", "train_loss", "eval_loss", "train_wall_s", "gguf_bytes")
    adapters = [{"name": a.name, "path": str(a.path), **{k: a.meta.get(k) for k in keys}} for a in list_adapters()]
    probes = list_probes()
    if json_out:
        print(json.dumps({"adapters": adapters, "probes": probes}, indent=2))
        return
    table = Table("adapter", "base", "records", "steps", "train loss", "eval loss", "wall s", "GGUF MB", "created")
    for a in adapters:
        fmt = lambda v, f="{:.3f}": "-" if v is None else f.format(v)  # noqa: E731
        table.add_row(a["name"], str(a["base_model"]), str(a["records"]), str(a["steps"]), fmt(a["train_loss"]), fmt(a["eval_loss"]),
                      fmt(a["train_wall_s"], "{:.0f}"), fmt(a["gguf_bytes"] and a["gguf_bytes"] / 1e6, "{:.1f}"), str(a["created"]))  # fmt: skip
    out.print(table if adapters else "[dim]no adapters yet: `rpra train sft`[/]")
    for p in probes:
        where = "final state" if p["layer"] is None else f"layer {p['layer']}"
        if p["reads"] == "draft":
            out.print(f"verifier for {p['model']}: {p['path']} (logistic on {where} over the draft; {p['examples']} drafts, {p['passing']} right; "
                      f"CV AUROC {p['cv_auroc_pass']:.3f})")  # fmt: skip
        elif p["head"] == "logistic":
            out.print(f"probe for {p['model']}: {p['path']} (logistic on {where}; {p['examples']} examples, {p['passing']} pass; "
                      f"CV AUROC {p['cv_auroc_pass']:.3f})")  # fmt: skip
        else:
            out.print(f"probe for {p['model']}: {p['path']} (ridge on {where}; {p['examples']} examples, CV RMSE {p['cv_rmse']:.2f} vs "
                      f"{p['mean_baseline_rmse']:.2f} for the mean, CV Spearman {p['cv_spearman']:.2f})")  # fmt: skip


def train_export(
    name: Annotated[str, typer.Argument(help="Adapter name (see `rpra train list`).")],
    merge: Annotated[bool, typer.Option(help="Also write a standalone GGUF with the LoRA merged in.")] = False,
    quant: Annotated[str, typer.Option(help="Quantisation of the merged GGUF: f16, q8_0, q4_0, q4_1, q4_k_m, q5_k_m.")] = "q8_0",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Merged GGUF path (default: in the adapter's folder).")] = None,
) -> None:
    """(Re)convert an adapter to a GGUF LoRA, and optionally merge it into a standalone quantised model."""
    from rpra.adapters import trained_folder

    folder = trained_folder(name)  # a wrong name is reported before the training stack is needed
    require_training()
    from rpra.training.sft import reexport

    merged = reexport(folder, merge=merge, quant=quant, output=output, log=_log)
    if merged is not None:
        out.print(f"merged model: {merged} ({merged.stat().st_size / 1e6:.1f} MB); run it with --model {merged}")


@settings_command()
def train_probe(
    settings,
    suite: FitSuiteOpt = "rpra-mix",
    split: FitSplitOpt = "train",
    layer: Annotated[str, typer.Option(help="The state the probe reads at the slot: a layer number, 'final' (the final hidden state), "
                                            "or 'auto' (the best slot layer of the model's layer sweep, else final).")] = "auto",
    head: Annotated[str, typer.Option(help="logistic: calibrated P(pass) (needs the train extra); ridge: a regressed score (format 1).")] = "logistic",
    folds: FoldsOpt = 5,
    remote: Annotated[bool, typer.Option(help="Also fit a remote head, P(the remote's answer passes), on the records that hold one "
                                              "(`rpra collect --verified --remote`): then --set route_on=advantage routes on the expected gain.")] = False,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Probe file (default: next to the model).")] = None,
) -> None:
    """Fit the activation probe: a linear head from a hidden state at the PA slot to the pass label (verified where keyed, else the judge)."""
    bench_module()  # the probe reads a benchmark collection
    from rpra.training.probe import train_probe as fit

    if layer not in ("auto", "final") and not layer.isdigit():
        raise typer.BadParameter(f"{layer!r} is not a layer number, 'final' or 'auto'.", param_hint="--layer")
    chosen = "auto" if layer == "auto" else None if layer == "final" else int(layer)
    with _progress("reading hidden states") as progress:
        path, report = fit(settings, suite=suite, split=split, folds=folds, output=output, layer=chosen, head=head, remote=remote, progress=progress)
    where = "the final state" if report.get("layer") is None else f"layer {report['layer']}"
    if report.get("head") == "logistic":
        out.print(f"probe: {path} ({path.stat().st_size / 1e3:.0f} kB) · {where} · {report['examples']} examples, {report['passing']} pass · "
                  f"logistic C {report['c']:g} · CV AUROC (pass) {report['cv_auroc_pass']:.3f} · CV Brier {report['cv_brier']:.3f} "
                  f"(base rate: {report['base_rate_brier']:.3f})")  # fmt: skip
        if "remote" in report:
            r = report["remote"]
            out.print(f"remote head: {r['examples']} records with a remote answer, {r['passing']} pass · logistic C {r['c']:g} · "
                      f"CV AUROC {r['cv_auroc_pass']:.3f} · CV Brier {r['cv_brier']:.3f} (base rate: {r['base_rate_brier']:.3f})")  # fmt: skip
    else:
        out.print(f"probe: {path} ({path.stat().st_size / 1e3:.0f} kB) · {where} · {report['examples']} examples · ridge alpha {report['alpha']:g} · "
                  f"CV RMSE {report['cv_rmse']:.2f} (always-the-mean: {report['mean_baseline_rmse']:.2f}) · CV Spearman {report['cv_spearman']:.2f}"
                  + (f" · CV AUROC (pass) {report['cv_auroc_pass']:.2f}" if report.get("cv_auroc_pass") is not None else ""))  # fmt: skip
    out.print("[dim]use it with --set predictor=probe" + (" (and --set route_on=advantage --set threshold=0)" if "remote" in report else "") + "[/]")


@settings_command()
def train_verifier(
    settings,
    suite: FitSuiteOpt = "rpra-mix",
    split: FitSplitOpt = "train",
    layer: Annotated[str, typer.Option(help="The layer whose states it reads: a number, or 'auto' (the pre-answer probe's layer "
                                            "from the model's layer sweep).")] = "auto",
    limit: Annotated[Optional[int], typer.Option(help="At most this many records per suite (a seeded sample); default all.")] = None,
    folds: FoldsOpt = 5,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Verifier file (default: next to the model).")] = None,
) -> None:
    """Fit the draft verifier: a logistic head from the device model's states over its own answer (and the answer's token
    log-probabilities) to whether that answer is right. The cascade's second decision point (--set verifier=FILE)."""
    bench_module()  # the verifier reads a benchmark collection
    from rpra.training.verifier import train_verifier as fit

    if layer != "auto" and not layer.isdigit():
        raise typer.BadParameter(f"{layer!r} is not a layer number or 'auto'.", param_hint="--layer")
    with _progress("reading drafts") as progress:
        path, report = fit(settings, suite=suite, split=split, layer="auto" if layer == "auto" else int(layer), limit=limit,
                           folds=folds, output=output, progress=progress)  # fmt: skip
    out.print(f"verifier: {path} ({path.stat().st_size / 1e3:.0f} kB) · layer {report['layer']} · {report['examples']} drafts, "
              f"{report['passing']} right · logistic C {report['c']:g} · CV AUROC {report['cv_auroc_pass']:.3f} "
              f"(the draft's log-probabilities alone: {report['logprobs_only']['cv_auroc_pass']:.3f}) · CV Brier {report['cv_brier']:.3f} "
              f"(base rate: {report['base_rate_brier']:.3f})")  # fmt: skip
    out.print("[dim]use it with --set verifier=" + str(path) + "[/]")


@settings_command()
def train_pool(
    settings,
    pool: Annotated[Path, typer.Option("--pool", help="The pool file (TOML): its targets, prices and rule (see `rpra.pool`).")],
    only: Annotated[Optional[list[str]], typer.Option("--only", help="Refit only this target's head (repeat for several), keeping "
                                                                     "the others: adding a target to a pool.")] = None,
    layer: Annotated[Optional[int], typer.Option(help="The encoder layer the heads read (default: the probe's, from the layer sweep).")] = None,
    folds: FoldsOpt = 5,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Heads file (default: next to the model).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Fit the pool's reward heads: for each target, a logistic head from the device model's slot state to whether that
    target's answer is right, on the target's own train records. The device model is the encoder (--set model=...)."""
    bench_module()  # the heads read benchmark collections
    from rpra.pool import load_pool
    from rpra.training.pool import train_pool as fit

    with _progress("reading the encoder's slot") as progress:
        path, report = fit(settings, load_pool(pool), output=output, only=only, folds=folds, layer=layer, progress=progress)
    if json_out:
        out.print_json(json.dumps({"path": str(path), "targets": report}))
        return
    table = Table("target", "records", "right", "CV AUROC", "fit s", title=f"pool heads: {path}")
    for name, r in report.items():
        table.add_row(escape(name), str(r["records"]), f"{r['right_share']:.1%}", f"{r['cv_auroc']:.3f}", f"{r['fit_s']:.2f}")
    out.print(table)


@settings_command()
def train_ladder(
    settings,
    remote_share: Annotated[Optional[float], typer.Option(help="Defer at most this share of the calibration split: the lowest "
                                                               "remote price that keeps under it (default 0.4).")] = None,
    price: Annotated[Optional[float], typer.Option(help="A remote call's price in quality points (a right answer is 9 more "
                                                        "than a wrong one), instead of --remote-share.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Allocation file (default: next to the model).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Calibrate the ladder's compute-optimal allocation: per difficulty bin of the probe's P(pass), the rung (answer,
    best-of-N, revise, defer) with the best quality for its device time and remote price, on train items. Use it with
    --set allocation=FILE (and predictor = probe, a verifier)."""
    bench_module()  # the calibration reads benchmark collections
    from rpra.training.ladder import fit_allocation

    if remote_share is not None and price is not None:
        raise typer.BadParameter("give --remote-share or --price, not both.", param_hint="--price")
    if remote_share is not None and not 0.0 <= remote_share <= 1.0:
        raise typer.BadParameter(f"{remote_share} is not a share in [0, 1].", param_hint="--remote-share")
    path, allocation = fit_allocation(settings, remote_share=remote_share, price=price, output=output)
    if json_out:
        out.print_json(json.dumps({"path": str(path), "edges": allocation.edges, "actions": allocation.actions, "meta": allocation.meta}))
        return
    edges = allocation.edges
    spans = [f"under {edges[0]:.3f}", *[f"{a:.3f} to {b:.3f}" for a, b in zip(edges, edges[1:])], f"{edges[-1]:.3f} and up"] if edges else ["any"]
    table = Table("P(pass)", "rung", title=f"allocation: {path}")
    for span, action in zip(spans, allocation.actions):
        table.add_row(span, action)
    out.print(table)
    m = allocation.meta
    out.print(f"[dim]remote price {m['remote_price']} · {m['calibration_share']:.0%} of {m['calibration_items']} calibration items deferred · "
              f"use it with --set allocation={path} --set predictor=probe --set verifier=...[/]")
