"""The `rpra` command line: parse, build objects, call the library, print.

Every command that runs the model takes ``--config FILE``, ``--set KEY=VALUE`` and a few common
flags; flags beat ``RPRA_*`` environment variables, which beat the config file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rpra.errors import RpraError

app = typer.Typer(
    help="rpra: a small local model predicts its own judge score and defers to a remote model when it would do badly.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="List, download and locate models.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect the effective configuration.", no_args_is_help=True)
bench_app = typer.Typer(help="The deferral benchmark: how much quality is kept for how many remote calls.", no_args_is_help=True)
card_app = typer.Typer(help="Report cards: the larger model's summary of the device model's strengths and weaknesses.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(config_app, name="config")
app.add_typer(bench_app, name="bench")
app.add_typer(card_app, name="report-card")
train_app = typer.Typer(help="Fine-tuned predictors: a LoRA adapter (SFT) and an activation probe, trained on judged records.", no_args_is_help=True)
app.add_typer(train_app, name="train")

# soft_wrap: never break lines (error messages hold commands to copy; scripts parse verdicts)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML config file (default: $RPRA_HOME/config.toml).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override any setting: --set threshold=6 (repeatable).")]
ModeOpt = Annotated[Optional[str], typer.Option("--mode", "-m", help="auto | local-only | remote-only.")]
ProtocolOpt = Annotated[Optional[str], typer.Option("--protocol", "-p", help="pa (predict first) | rpra (reason, predict, answer).")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", help="Device model: registered name, .gguf path or URL.")]
ThresholdOpt = Annotated[Optional[float], typer.Option("--threshold", "-t", help="Defer below this predicted score.")]
RemoteOpt = Annotated[Optional[str], typer.Option("--remote-url", help="OpenAI-compatible base URL of the remote model.")]
AdapterOpt = Annotated[Optional[str], typer.Option("--adapter", help="LoRA adapter for the device model: a name from `rpra train list` or a .gguf path.")]
ProfileOpt = Annotated[Optional[str], typer.Option("--profile", help="Device profile (threads, context, model...): a name from `rpra doctor --profiles` or a TOML path.")]
PrivacyOpt = Annotated[Optional[str], typer.Option("--privacy", help="allow | ask (confirm each deferral) | never-defer (fully offline).")]


def _settings(config: Path | None, sets: list[str] | None, **flags):
    from rpra.config import load_settings, parse_assignments

    overrides = parse_assignments(sets or [])
    overrides.update({k: v for k, v in flags.items() if v is not None})
    return load_settings(config, overrides)


def _runtime(settings, *, need_local: bool = True):
    from rpra.runtime import Runtime

    return Runtime.from_settings(settings, need_local=need_local)


# -- ask / chat ---------------------------------------------------------------------------------


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="The question; '-' reads it from standard input.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the whole turn as JSON (prediction, decision, timings, tokens).")] = False,
    mode: ModeOpt = None,
    protocol: ProtocolOpt = None,
    model: ModelOpt = None,
    threshold: ThresholdOpt = None,
    remote_url: RemoteOpt = None,
    adapter: AdapterOpt = None,
    profile: ProfileOpt = None,
    privacy: PrivacyOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Answer one question: the answer on stdout, the verdict on stderr (or everything with --json).

    With --privacy ask a deferral needs a yes on the terminal; without one the turn stays local.
    """
    from rpra.runtime import Finished, Notice, Text

    if question == "-":
        question = sys.stdin.read()
    settings = _settings(config, set_, mode=mode, protocol=protocol, model=model, threshold=threshold, remote_url=remote_url,
                         adapter=adapter, profile=profile, privacy=privacy)  # fmt: skip
    runtime = _runtime(settings, need_local=settings.mode != "remote-only")
    try:
        confirm = None
        if settings.privacy == "ask" and sys.stdin.isatty():
            confirm = lambda sent: _confirm_deferral(sent, settings, True)  # noqa: E731
        for event in runtime.turn([{"role": "user", "content": question}], source="ask", confirm=confirm):
            if json_out:
                if isinstance(event, Finished):
                    print(json.dumps(event.result.to_dict(), indent=2))
            elif isinstance(event, Text):
                sys.stdout.write(event.text)
                sys.stdout.flush()
            elif isinstance(event, Notice):
                err.print(f"[yellow]! {escape(event.message)}[/]")
            elif isinstance(event, Finished):
                sys.stdout.write("\n")
                err.print(f"[dim]{escape(_verdict_line(event.result))}[/]")
    finally:
        runtime.close()


CHAT_HELP = "/local, /remote, /auto switch mode · /new starts over · /quit (or Ctrl-D) leaves"


@app.command()
def chat(
    mode: ModeOpt = None,
    protocol: ProtocolOpt = None,
    model: ModelOpt = None,
    threshold: ThresholdOpt = None,
    remote_url: RemoteOpt = None,
    adapter: AdapterOpt = None,
    profile: ProfileOpt = None,
    privacy: PrivacyOpt = None,
    show_reasoning: Annotated[bool, typer.Option(help="Print the model's short reasoning (rpra protocol).")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Chat with the device model; each turn ends with a verdict line (local or deferred, and why).

    When standard input is not a terminal, each line is one message, so chats can be scripted
    (with --privacy ask, the line after a message answers the question whether to send it).
    """
    from rpra.runtime import Decided, Finished, Notice, Text

    settings = _settings(config, set_, mode=mode, protocol=protocol, model=model, threshold=threshold, remote_url=remote_url,
                         adapter=adapter, profile=profile, privacy=privacy)  # fmt: skip
    runtime = _runtime(settings)
    interactive = sys.stdin.isatty()
    current_mode = settings.mode
    messages: list[dict] = []
    conversation = runtime.store.new_conversation(source="chat") if runtime.store else None
    if interactive:
        remote = settings.remote_url or "none configured"
        out.print(f"[bold]rpra chat[/] · device {escape(settings.model)} · remote {escape(remote)} · mode {current_mode}")
        out.print(f"[dim]{CHAT_HELP}[/]")
    try:
        while True:
            line = _read_line(interactive)
            if line is None:
                break
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                command = text.lower()
                if command in ("/quit", "/exit"):
                    break
                if command in ("/local", "/remote", "/auto"):
                    current_mode = {"/local": "local-only", "/remote": "remote-only", "/auto": "auto"}[command]
                    out.print(f"[dim]mode: {current_mode}[/]")
                elif command == "/new":
                    messages = []
                    conversation = runtime.store.new_conversation(source="chat") if runtime.store else None
                    out.print("[dim]new conversation[/]")
                else:
                    out.print(f"[dim]{CHAT_HELP}[/]")
                continue
            if not interactive:
                out.print(f"[bold]> {escape(text)}[/]")
            messages.append({"role": "user", "content": text})
            try:
                confirm = (lambda sent: _confirm_deferral(sent, settings, interactive)) if settings.privacy == "ask" else None
                for event in runtime.turn(messages, mode=current_mode, conversation_id=conversation, source="chat", confirm=confirm):
                    if isinstance(event, Decided) and show_reasoning and event.reasoning:
                        out.print(f"[dim italic]thinking: {escape(event.reasoning)}[/]")
                    elif isinstance(event, Text):
                        out.file.write(event.text)
                        out.file.flush()
                    elif isinstance(event, Notice):
                        out.print(f"\n[yellow]! {escape(event.message)}[/]")
                    elif isinstance(event, Finished):
                        result = event.result
                        out.print()
                        out.print(f"[dim]\\[{escape(_verdict_line(result))}][/]")
                        rating = result.prediction.mode if result.prediction else None
                        messages.append({"role": "assistant", "content": result.answer, "rating": rating})
            except RpraError as exc:
                messages.pop()  # the failed message does not stay in the conversation
                out.print(f"[red]error:[/] {escape(str(exc))}")
    except KeyboardInterrupt:
        out.print()
    finally:
        runtime.close()


def _confirm_deferral(sent: list[dict], settings, interactive: bool) -> bool:
    """privacy = ask: show exactly what would leave the device, and ask."""
    out.print(f"\n[yellow]The device model would defer this to {escape(settings.remote_url or '?')} ({escape(settings.remote_model)}). It would send:[/]")
    for message in sent:
        out.print(f"[dim]  {message['role']}:[/] {escape(_short(message['content'], 200))}")
    if interactive:
        return typer.confirm("Send it?", default=False)
    answer = (sys.stdin.readline() or "").strip().lower()
    out.print(f"[dim]send it? {escape(answer or '(no answer)')}[/]")
    return answer in ("y", "yes")


def _read_line(interactive: bool) -> str | None:
    try:
        return input(">>> ") if interactive else sys.stdin.readline() or None
    except EOFError:
        return None


def _verdict_line(result) -> str:
    t = result.timings_ms
    secs = t.get("total", 0) / 1000
    return f"{result.verdict} · {secs:.1f} s"


# -- models -------------------------------------------------------------------------------------


@models_app.command("list")
def models_list(json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the registered models and whether each is downloaded."""
    from rpra.models import list_models

    rows = list_models()
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    table = Table("name", "present", "size", "source", "description")
    for row in rows:
        size = f"{row['size'] / 1e6:,.0f} MB" if row.get("size") else "?"
        table.add_row(row["name"], "yes" if row["present"] else "no", size, row["source"], row.get("description", ""))
    out.print(table)


@models_app.command("pull")
def models_pull(
    name: Annotated[str, typer.Argument(help="Registered name, http(s) URL (optionally #sha256=HEX) or hf:OWNER/REPO/FILE.gguf.")],
    force: Annotated[bool, typer.Option("--force", help="Download again even if a verified copy exists.")] = False,
) -> None:
    """Download a model into the cache under RPRA_HOME and verify it."""
    from rpra.models import pull

    print(pull(name, force=force))


@models_app.command("path")
def models_path(name: Annotated[str, typer.Argument(help="Registered name, path or pulled URL.")]) -> None:
    """Print the local path of a downloaded model (no download)."""
    from rpra.models import resolve

    print(resolve(name))


# -- serve-remote -------------------------------------------------------------------------------


@app.command(
    "serve-remote",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def serve_remote(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="Model to serve: registered name or .gguf path.")] = "qwen2.5-coder-1.5b-instruct",
    host: Annotated[str, typer.Option(help="Address to bind; loopback by default.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0 picks a free one).")] = 8088,
    n_ctx: Annotated[int, typer.Option(help="Context window of the served model.")] = 4096,
    n_threads: Annotated[Optional[int], typer.Option(help="CPU threads.")] = None,
    alias: Annotated[str, typer.Option(help="Model name the server answers to.")] = "default",
) -> None:
    """Serve a larger model as an OpenAI-compatible API: the offline stand-in for a cloud model.

    With a command after `--` (e.g. `rpra serve-remote -- rpra chat`), the server runs only while
    that command does, with RPRA_REMOTE_URL and RPRA_REMOTE_MODEL set for it.
    """
    from rpra.models import resolve
    from rpra.remote_server import RemoteServer, run_with_server

    server = RemoteServer(resolve(model), host=host, port=port, n_ctx=n_ctx, n_threads=n_threads, model_alias=alias)
    if ctx.args:
        raise typer.Exit(run_with_server(server, list(ctx.args)))
    err.print(f"[dim]starting {escape(model)} ...[/]")
    with server.start():
        err.print(f"serving {escape(model)} at [bold]{server.url}[/] (model name {alias!r}); Ctrl-C stops")
        err.print(f"[dim]point rpra at it: export RPRA_REMOTE_URL={server.url}[/]")
        try:
            server.wait()
        except KeyboardInterrupt:
            pass


# -- serve --------------------------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="Address to bind (default 127.0.0.1); any other needs RPRA_SERVER_API_KEY.")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (default 8080; 0 picks a free one).")] = None,
    mode: ModeOpt = None,
    protocol: ProtocolOpt = None,
    model: ModelOpt = None,
    threshold: ThresholdOpt = None,
    remote_url: RemoteOpt = None,
    adapter: AdapterOpt = None,
    profile: ProfileOpt = None,
    privacy: PrivacyOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Serve the self-deferral runtime as an OpenAI-compatible API (chat completions, streaming or not).

    Any OpenAI client works: base URL http://HOST:PORT/v1, model "rpra" (auto), "rpra-local" or
    "rpra-remote". Each response carries the routing decision in X-RPRA-* headers and an "rpra"
    field. GET /health and /metrics (Prometheus) watch it; every request is logged to the SQLite
    store (`rpra logs --requests`). Set the key with RPRA_SERVER_API_KEY, not a flag: flags show in `ps`.
    """
    from rpra.server import check_bind, serve as run_server

    settings = _settings(config, set_, host=host, port=port, mode=mode, protocol=protocol, model=model, threshold=threshold,
                         remote_url=remote_url, adapter=adapter, profile=profile, privacy=privacy)  # fmt: skip
    check_bind(settings)  # before loading a model for nothing
    runtime = _runtime(settings, need_local=settings.mode != "remote-only")

    def ready(url: str) -> None:
        remote = settings.remote_url if runtime.remote else f"none ({'never-defer' if settings.privacy == 'never-defer' else 'set RPRA_REMOTE_URL'})"
        err.print(f"rpra serve: [bold]{url}[/] · device {escape(settings.model)} · remote {escape(remote)} · "
                  f"privacy {settings.privacy}{' + redaction' if settings.redact else ''} · key {'required' if settings.server_api_key else 'off (loopback)'}")  # fmt: skip
        err.print("[dim]Ctrl-C stops[/]")

    try:
        run_server(runtime, ready=ready)
    except KeyboardInterrupt:  # uvicorn has shut down gracefully and re-raises the signal
        err.print("[dim]stopped[/]")
    finally:
        runtime.close()


# -- doctor -------------------------------------------------------------------------------------


@app.command()
def doctor(
    json_out: Annotated[bool, typer.Option("--json", help="Print the whole report as JSON.")] = False,
    profiles: Annotated[bool, typer.Option("--profiles", help="List the shipped device profiles instead.")] = False,
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Check this machine for rpra: CPU features against the llama.cpp build, memory, disk, models,
    the remote; recommend a device profile. Exits 1 when a check fails."""
    from rpra.doctor import list_profiles, machine_report

    if profiles:
        rows = list_profiles()
        if json_out:
            print(json.dumps(rows, indent=2))
            return
        table = Table("profile", "target", "settings")
        for row in rows:
            table.add_row(row["name"], row["description"], ", ".join(f"{k}={v}" for k, v in row["settings"].items()))
        out.print(table)
        out.print("[dim]use one with --profile NAME, RPRA_PROFILE or profile = NAME in the config[/]")
        return
    report = machine_report(_settings(config, set_, profile=profile))
    if json_out:
        print(json.dumps(report, indent=2, default=str))
    else:
        cpu, mem = report.get("cpu", {}), report.get("memory", {})
        out.print(f"[bold]{escape(str(cpu.get('model') or 'unknown CPU'))}[/] · {cpu.get('physical_cores', '?')} cores "
                  f"({cpu.get('logical_cores', '?')} threads) · {mem.get('total_bytes', 0) / 2**30:.1f} GiB RAM, "
                  f"{mem.get('available_bytes', 0) / 2**30:.1f} GiB free")  # fmt: skip
        colour = {"ok": "green", "warn": "yellow", "fail": "red"}
        for check in report["checks"]:
            out.print(f"[{colour[check['status']]}]{check['status']:>4}[/]  {escape(check['name'])}: {escape(check['message'])}")
        rec = report["recommended_profile"]
        out.print(f"recommended profile: [bold]{rec['name']}[/] ({escape(rec['why'])}) · rpra serve --profile {rec['name']}")
    if report["status"] == "fail":
        raise typer.Exit(1)


# -- logs ---------------------------------------------------------------------------------------


@app.command()
def logs(
    query: Annotated[Optional[str], typer.Option("--query", "-q", help="Search prompts and answers.")] = None,
    conversation: Annotated[Optional[str], typer.Option(help="Only this conversation id.")] = None,
    route: Annotated[Optional[str], typer.Option(help="Only turns routed 'local' or 'remote'.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="Most turns to show.")] = 20,
    turn: Annotated[Optional[int], typer.Option("--turn", help="Show one turn in full.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    requests: Annotated[bool, typer.Option("--requests", help="List the HTTP requests `rpra serve` received instead (refused ones too).")] = False,
) -> None:
    """List and search the logged turns (newest first)."""
    from rpra.store import LogStore

    if requests:
        with LogStore.default() as store:
            rows = store.requests(limit=limit)
        if json_out:
            print(json.dumps(rows, indent=2))
            return
        table = Table("id", "time", "client", "status", "mode", "turn", "ms", "error")
        for r in rows:
            ms = f"{r['duration_ms']:.0f}" if r.get("duration_ms") is not None else "-"
            table.add_row(str(r["id"]), r["created_at"][:19], r.get("client") or "-", str(r["status"]), r.get("mode") or "-",
                          str(r.get("turn_id") or "-"), ms, _short(r.get("error") or "", 50))  # fmt: skip
        out.print(table)
        return
    with LogStore.default() as store:
        rows = [store.get_turn(turn)] if turn is not None else store.turns(query=query, conversation=conversation, route=route, limit=limit)
    rows = [r for r in rows if r]
    if json_out or turn is not None:
        print(json.dumps(rows if turn is None else rows[:1], indent=2, default=str))
        return
    table = Table("id", "time", "route", "predicted", "answered by", "ms", "prompt")
    for r in rows:
        predicted = f"{r['expected']:.1f}" if r.get("expected") is not None else "-"
        route_text = (r.get("route") or r["status"]) + (" (fallback)" if r.get("fallback") else "")
        ms = f"{r['total_ms']:.0f}" if r.get("total_ms") is not None else "-"
        table.add_row(str(r["id"]), r["created_at"][:19], route_text, predicted, r.get("answered_by") or "-", ms, _short(r["prompt"]))
    out.print(table)


def _short(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


# -- config -------------------------------------------------------------------------------------


@config_app.command("show")
def config_show(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print every effective setting and where its value came from."""
    from rpra.config import default_config_path, home, setting_help, setting_names

    settings = _settings(config, set_)
    rows = []
    for name in setting_names():
        value = getattr(settings, name)
        if name == "remote_api_key" and value:
            value = "***"  # never print secrets
        rows.append({"name": name, "value": value, "source": settings.sources[name], "help": setting_help(name)})
    if json_out:
        print(json.dumps({"home": str(home()), "config_file": str(config or default_config_path()), "settings": rows}, indent=2))
        return
    out.print(f"[dim]RPRA_HOME {home()} · config file {config or default_config_path()}[/]")
    table = Table("setting", "value", "from")
    for row in rows:
        table.add_row(row["name"], escape(repr(row["value"])), row["source"])
    out.print(table)


# -- evaluation (the `bench` extra; benchmarks/ imports rpra, and is imported only here) ---------

SuiteOpt = Annotated[str, typer.Option(help="mmlu, commonsenseqa, openbookqa, mtbench, arithmetic, gsm, rpra-mix; "
                                             "or a .jsonl/.csv file with a prompt column; or hf:NAME[:SPLIT].")]  # fmt: skip
LimitOpt = Annotated[Optional[int], typer.Option(help="Items from the split (default: all).")]
JudgeOpt = Annotated[Optional[str], typer.Option("--judge-url", help="OpenAI-compatible judge (default: the remote model).")]
GrammarOpt = Annotated[Optional[bool], typer.Option("--judge-grammar/--no-judge-grammar",
                       help="Force the judge's reply format with a GBNF grammar (llama-cpp-python servers only). Default: on for the stand-in.")]  # fmt: skip


def _bench():
    try:
        import benchmarks.bench as bench
    except ImportError as exc:
        raise RpraError(f"The benchmark needs the bench extra ({exc.name} is missing): pip install 'rpra[bench]'.") from None
    return bench


@app.command()
def collect(
    suite: SuiteOpt = "rpra-mix",
    split: Annotated[str, typer.Option(help="calibration, train or test.")] = "test",
    limit: LimitOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of the suite's sampling and splits.")] = 0,
    judge_url: JudgeOpt = None,
    judge_grammar: GrammarOpt = None,
    remote: Annotated[bool, typer.Option("--remote/--no-remote", help="Also collect and judge the remote's answers (not needed to train).")] = True,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run items through the device model, the remote and the judge; resumable, every call cached."""
    bench = _bench()
    records, out_dir = bench.run_collect(_settings(config, set_), suite=suite, which=split, limit=limit, seed=seed,
                                         judge_url=judge_url, judge_grammar=judge_grammar, remote_answers=remote)  # fmt: skip
    err.print(f"{len(records)} records in {out_dir}")


@bench_app.command("run")
def bench_run(
    suite: SuiteOpt = "rpra-mix",
    split: Annotated[str, typer.Option(help="The split to evaluate on.")] = "test",
    limit: LimitOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of sampling, splits and bootstrap.")] = 0,
    quality: Annotated[str, typer.Option(help="llm (judge scores) or exact (verifiers, items with gold answers).")] = "llm",
    judge_url: JudgeOpt = None,
    judge_grammar: GrammarOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Collect what is missing, then evaluate every predictor and baseline (table, JSON, plot, report)."""
    bench = _bench()
    settings = _settings(config, set_)
    records, out_dir = bench.run_collect(settings, suite=suite, which=split, limit=limit, seed=seed,
                                         judge_url=judge_url, judge_grammar=judge_grammar)  # fmt: skip
    _bench_report(bench, settings, records, out_dir, quality=quality, seed=seed, json_out=json_out)


@bench_app.command("report")
def bench_report(
    suite: SuiteOpt = "rpra-mix",
    split: Annotated[str, typer.Option(help="The split to evaluate on.")] = "test",
    quality: Annotated[str, typer.Option(help="llm or exact.")] = "llm",
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Evaluate an existing collection (no remote or judge calls)."""
    bench = _bench()
    settings = _settings(config, set_)
    out_dir = bench.collection_dir(settings, suite, split)
    _bench_report(bench, settings, bench.load_collection(out_dir), out_dir, quality=quality, seed=seed, json_out=json_out)


def _bench_report(bench, settings, records, out_dir: Path, *, quality: str, seed: int, json_out: bool) -> None:
    from benchmarks.judge import agreement
    from benchmarks.report import TERMINAL_COLUMNS, evaluate, table_rows, write_reports
    from benchmarks.report_cards import latest_card

    card = latest_card(settings.model)
    if card is not None:
        bench.add_card_predictions(records, settings, card.text)
    else:
        err.print("[dim]no report card for this model yet (`rpra report-card build`): no report-card predictor[/]")
    _add_trained_predictions(bench, settings, records)
    results = evaluate(records, quality=quality, pass_mark=settings.pass_mark, threshold=settings.threshold, seed=seed)
    pairs = [(r[f"judge_{side}"]["score"], r[f"exact_{side}"]) for r in records for side in ("local", "remote")
             if r.get(f"exact_{side}") is not None and r[f"judge_{side}"]["score"] is not None]  # fmt: skip
    agree = agreement([p[0] for p in pairs], [p[1] for p in pairs], settings.pass_mark) if pairs else None
    paths = write_reports(results, out_dir / f"report-{quality}", agreement=agree)
    if json_out:
        print(json.dumps({"results": results, "agreement": agree, "files": {k: str(v) for k, v in paths.items()}}, indent=2))
        return
    table = Table("router", *[c for c, _ in TERMINAL_COLUMNS], title=f"{results['items']} items · quality: {quality} judge")
    for row in table_rows(results, TERMINAL_COLUMNS, short=True):
        table.add_row(*row)
    out.print(table)
    if agree:
        out.print(f"LLM judge vs exact verifiers: {agree['accuracy']:.1%} agreement on {agree['n']} answers (κ {agree['kappa']:.2f})")
    out.print(f"[dim]report {paths['markdown']} · plot {paths['plot']} · json {paths['json']}[/]")


def _add_trained_predictions(bench, settings, records) -> None:
    """SFT (PA and RPRA) with the configured or newest adapter of the model, and its probe, if there are any."""
    from rpra.adapters import list_adapters, resolve_adapter
    from rpra.models import file_sha256, resolve
    from rpra.predictors import FineTunedPredictor, ProbePredictor
    from rpra.probe import Probe, default_probe_path

    model = resolve(settings.model)
    sha = file_sha256(model)
    adapter = resolve_adapter(settings.adapter, model=model) if settings.adapter else next(
        (a.path for a in list_adapters() if a.meta.get("base_sha256") == sha), None)  # fmt: skip
    if adapter is not None:
        err.print(f"[dim]SFT predictor: adapter {adapter}[/]")
        for protocol in ("pa", "rpra"):
            bench.add_predictions(records, settings, field=f"sft_{protocol}", predictor=FineTunedPredictor(), adapter=adapter, protocol=protocol)
    else:
        err.print("[dim]no adapter for this model yet (`rpra train sft`): no SFT predictor[/]")
    probe_path = Path(settings.probe).expanduser() if settings.probe else default_probe_path(model)
    if probe_path.exists():
        bench.add_predictions(records, settings, field="probe_pa", predictor=ProbePredictor(Probe.load(probe_path)))
    else:
        err.print("[dim]no probe for this model yet (`rpra train probe`): no probe predictor[/]")


@card_app.command("build")
def card_build(
    suite: SuiteOpt = "rpra-mix",
    limit: Annotated[int, typer.Option(help="Items to learn from.")] = 48,
    split: Annotated[str, typer.Option(help="calibration, or train for more evidence (never test: the card would have seen it).")] = "calibration",
    batch_size: Annotated[int, typer.Option(help="Judged examples per update (PRESS).")] = 8,
    max_words: Annotated[int, typer.Option(help="Length budget of the card.")] = 250,
    judge_url: JudgeOpt = None,
    judge_grammar: GrammarOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Write a new version of the device model's report card from judged calibration records.

    The writer (the remote model) rewrites the card batch by batch, shown the measured per-topic
    statistics so far; the final card ends with those statistics.
    """
    from benchmarks.report_cards import build_card, save_card

    if split not in ("calibration", "train"):
        raise RpraError(f"--split must be calibration or train, not {split!r}: a card built from the test split would have seen the answers it is scored on.")
    bench = _bench()
    settings = _settings(config, set_)
    records, out_dir = bench.run_collect(settings, suite=suite, which=split, limit=limit, judge_url=judge_url,
                                         judge_grammar=judge_grammar, remote_answers=split != "train")  # fmt: skip
    with bench.endpoints(settings, judge_url=judge_url) as ep:
        text, history = build_card(records, ep.remote, batch_size=batch_size, max_words=max_words, pass_mark=settings.pass_mark)
    card = save_card(text, device_model=settings.model, meta={"suite": suite, "split": split, "records": len(records), "collection": str(out_dir),
                                                              "writer": ep.remote_id, "batch_size": batch_size, "updates": len(history)})  # fmt: skip
    out.print(card.text)
    err.print(f"[dim]saved {card.path} (version {card.version}, {card.meta['words']} words)[/]")


@card_app.command("show")
def card_show(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the latest report card of the device model."""
    from benchmarks.report_cards import latest_card

    settings = _settings(config, set_)
    card = latest_card(settings.model)
    if card is None:
        raise RpraError(f"No report card for {settings.model} yet. Build one with `rpra report-card build`.")
    out.print(card.text)
    err.print(f"[dim]{card.path} (version {card.version})[/]")


@app.command()
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
    import numpy as np

    from benchmarks.calibrate import describe, threshold_for_failure, threshold_for_share
    from rpra.config import default_config_path, write_settings

    if (target_share is None) == (max_fail is None):
        raise RpraError("Give exactly one of --target-share or --max-fail.")
    bench = _bench()
    settings = _settings(config, set_)
    records, _ = bench.run_collect(settings, suite=suite, which="calibration", limit=limit, judge_url=judge_url,
                                   judge_grammar=judge_grammar)  # fmt: skip
    # A target share needs only the predictions; a failure limit needs judged local answers too.
    if max_fail is not None:
        records = [r for r in records if r["judge_local"]["score"] is not None]
    if not records:
        raise RpraError("No calibration records with a judged local answer: check the judge (--judge-url, --judge-grammar).")
    key = "expected" if settings.route_on == "expected" else "p_pass"
    pred = np.array([r[settings.protocol][key] for r in records])
    passed = np.array([r["judge_local"]["score"] is not None and r["judge_local"]["score"] >= settings.pass_mark for r in records])
    t = threshold_for_share(pred, target_share) if target_share is not None else threshold_for_failure(pred, passed, max_fail)
    result = describe(pred, passed, round(t, 4))
    out.print(f"threshold {result['threshold']} ({settings.route_on}, {settings.protocol}): remote share {result['remote_share']:.1%}, "
              f"local answers failing {result['local_fail_rate']:.1%} on {result['items']} calibration items")  # fmt: skip
    if write:
        path = write_settings(config or default_config_path(), {"threshold": result["threshold"]})
        out.print(f"[dim]wrote threshold = {result['threshold']} to {path}[/]")


def _training():
    """The training modules; they need the train extra (torch, transformers, peft, trl)."""
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
        import trl  # noqa: F401
    except ImportError as exc:
        raise RpraError(f"Training needs the train extra ({exc.name} is missing): pip install 'rpra[train]'.") from None


def _train_sft(config: Optional[Path], flags: dict) -> None:
    from training.config import load_config

    cfg = load_config(config, flags)
    _training()
    from training.sft import train_sft

    meta = train_sft(cfg, log=lambda line: err.print(f"[dim]{escape(line)}[/]"))
    out.print(json.dumps(meta, indent=2))


def _register_train_sft() -> None:
    from training.config import command_from_config

    doc = (
        "Train a LoRA adapter that makes the device model predict its own judge score (peft + trl on CPU).\n\n"
        "Trains on the collected, judged train split (`rpra collect --split train --no-remote`), in the runtime's own "
        "turn layout; resumes an interrupted run from its last checkpoint; exports a GGUF LoRA that `--adapter NAME` loads. "
        "Settings come from --config FILE (YAML) and the flags below, flags winning."
    )
    train_app.command("sft")(command_from_config(_train_sft, doc))


_register_train_sft()


@train_app.command("list")
def train_list(json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Trained adapters (newest first) and the probes next to pulled models."""
    from rpra.adapters import list_adapters
    from rpra.models import list_models
    from rpra.probe import Probe, default_probe_path

    adapters = [{"name": a.name, "path": str(a.path), **{k: a.meta.get(k) for k in ("base_model", "created", "records", "steps", "train_loss", "eval_loss", "train_wall_s", "gguf_bytes")}}
                for a in list_adapters()]  # fmt: skip
    probes = []
    for m in list_models():
        path = default_probe_path(Path(m["path"])) if m.get("path") else None
        if path and path.exists():
            meta = Probe.load(path).meta
            probes.append({"model": m["name"], "path": str(path), **{k: meta.get(k) for k in ("examples", "cv_rmse", "mean_baseline_rmse", "cv_spearman", "created")}})
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
        out.print(f"probe for {p['model']}: {p['path']} ({p['examples']} examples, CV RMSE {p['cv_rmse']:.2f} vs {p['mean_baseline_rmse']:.2f} "
                  f"for the mean, CV Spearman {p['cv_spearman']:.2f})")  # fmt: skip


@train_app.command("export")
def train_export(
    name: Annotated[str, typer.Argument(help="Adapter name (see `rpra train list`).")],
    merge: Annotated[bool, typer.Option(help="Also write a standalone GGUF with the LoRA merged in.")] = False,
    quant: Annotated[str, typer.Option(help="Quantisation of the merged GGUF: f16, q8_0, q4_0, q4_1, q4_k_m, q5_k_m.")] = "q8_0",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Merged GGUF path (default: in the adapter's folder).")] = None,
) -> None:
    """(Re)convert an adapter to a GGUF LoRA, and optionally merge it into a standalone quantised model."""
    from rpra.adapters import adapters_dir
    from rpra.models import resolve

    folder = adapters_dir() / name
    if not (folder / "peft").exists() or not (folder / "meta.json").exists():
        raise RpraError(f"No trained adapter {name!r} in {adapters_dir()} (see `rpra train list`).")
    _training()
    from training.export import merge_to_gguf
    from training.sft import export_adapter

    meta = json.loads((folder / "meta.json").read_text())
    base = resolve(meta["base_model"])
    export_adapter(folder, base, meta, log=lambda line: err.print(f"[dim]{escape(line)}[/]"))
    if merge:
        target = output or folder / f"{base.stem}+{name}.{quant}.gguf"
        merged = merge_to_gguf(base, folder / "peft", target, quant=quant)
        out.print(f"merged model: {merged} ({merged.stat().st_size / 1e6:.1f} MB); run it with --model {merged}")


@train_app.command("probe")
def train_probe(
    suite: SuiteOpt = "rpra-mix",
    split: Annotated[str, typer.Option(help="Collection split to fit on (not the test split).")] = "train",
    folds: Annotated[int, typer.Option(help="Cross-validation folds for choosing the ridge strength.")] = 5,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Probe file (default: next to the model).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Fit the activation probe: a ridge regression from the hidden state at the PA slot to the judge score."""
    _bench()  # the probe reads a benchmark collection
    from rich.progress import Progress

    from training.probe import train_probe

    with Progress(console=err, transient=True) as bar:
        def progress(total: int):
            task = bar.add_task("reading hidden states", total=total)
            return lambda: bar.advance(task)

        path, report = train_probe(_settings(config, set_), suite=suite, split=split, folds=folds, output=output, progress=progress)
    out.print(f"probe: {path} ({path.stat().st_size / 1e3:.0f} kB) · {report['examples']} examples · ridge alpha {report['alpha']:g} · "
              f"CV RMSE {report['cv_rmse']:.2f} (always-the-mean: {report['mean_baseline_rmse']:.2f}) · CV Spearman {report['cv_spearman']:.2f}")  # fmt: skip
    out.print("[dim]use it with --set predictor=probe[/]")


def main() -> None:
    """Console entry point: project errors become one red line and exit code 1, not a traceback."""
    try:
        app()
    except RpraError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        sys.exit(1)


if __name__ == "__main__":
    main()
