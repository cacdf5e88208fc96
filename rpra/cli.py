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
app.add_typer(models_app, name="models")
app.add_typer(config_app, name="config")

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
AdapterOpt = Annotated[Optional[str], typer.Option("--adapter", help="LoRA adapter (GGUF) for the device model.")]


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
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Answer one question: the answer on stdout, the verdict on stderr (or everything with --json)."""
    from rpra.runtime import Finished, Notice, Text

    if question == "-":
        question = sys.stdin.read()
    settings = _settings(config, set_, mode=mode, protocol=protocol, model=model, threshold=threshold, remote_url=remote_url, adapter=adapter)
    runtime = _runtime(settings, need_local=settings.mode != "remote-only")
    try:
        for event in runtime.turn([{"role": "user", "content": question}], source="ask"):
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
    show_reasoning: Annotated[bool, typer.Option(help="Print the model's short reasoning (rpra protocol).")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Chat with the device model; each turn ends with a verdict line (local or deferred, and why).

    When standard input is not a terminal, each line is one message, so chats can be scripted.
    """
    from rpra.runtime import Decided, Finished, Notice, Text

    settings = _settings(config, set_, mode=mode, protocol=protocol, model=model, threshold=threshold, remote_url=remote_url, adapter=adapter)
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
                for event in runtime.turn(messages, mode=current_mode, conversation_id=conversation, source="chat"):
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


# -- logs ---------------------------------------------------------------------------------------


@app.command()
def logs(
    query: Annotated[Optional[str], typer.Option("--query", "-q", help="Search prompts and answers.")] = None,
    conversation: Annotated[Optional[str], typer.Option(help="Only this conversation id.")] = None,
    route: Annotated[Optional[str], typer.Option(help="Only turns routed 'local' or 'remote'.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="Most turns to show.")] = 20,
    turn: Annotated[Optional[int], typer.Option("--turn", help="Show one turn in full.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List and search the logged turns (newest first)."""
    from rpra.store import LogStore

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


def main() -> None:
    """Console entry point: project errors become one red line and exit code 1, not a traceback."""
    try:
        app()
    except RpraError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        sys.exit(1)
