"""Using the model: `rpra ask`, `rpra chat`, `rpra serve` and `rpra serve-remote`."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.markup import escape

from rpra.cli.common import RUNTIME_FLAGS, err, out, settings_command, short
from rpra.config import masked
from rpra.errors import RpraError

if TYPE_CHECKING:
    from rpra.runtime import Event, TurnResult

CHAT_HELP = "/local, /remote, /auto switch mode · /new starts over · Ctrl-C stops an answer · /quit (or Ctrl-D) leaves"
HISTORY_LENGTH = 1000  # lines of $RPRA_HOME/chat_history kept


@settings_command(*RUNTIME_FLAGS)
def ask(
    settings,
    question: Annotated[str, typer.Argument(help="The question; '-' reads it from standard input.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the whole turn as JSON (prediction, decision, timings, tokens).")] = False,
) -> None:
    """Answer one question: the answer on stdout, the verdict on stderr (or everything with --json).

    With --privacy ask a deferral needs a yes on the terminal; without one the turn stays local.
    """
    from rpra.runtime import Finished, Notice, Runtime, Text

    if question == "-":
        question = sys.stdin.read()
    # The device model is loaded even for remote-only: it answers, flagged, when the remote fails.
    runtime = Runtime.from_settings(settings)
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


@settings_command(*RUNTIME_FLAGS)
def chat(
    settings,
    show_reasoning: Annotated[bool, typer.Option(help="Print the model's short reasoning (rpra protocol).")] = False,
) -> None:
    """Chat with the device model; each turn ends with a verdict line (local or deferred, and why).

    Ctrl-C stops the answer in progress and returns to the prompt; Ctrl-C twice at the prompt,
    /quit or Ctrl-D leaves. On a terminal, lines can be edited and earlier ones recalled with the
    Up arrow (readline; the history is kept in $RPRA_HOME/chat_history). When standard input is
    not a terminal, each line is one message, so chats can be scripted (with --privacy ask, the
    line after a message answers the question whether to send it).
    """
    from rpra.config import home
    from rpra.runtime import Runtime

    runtime = Runtime.from_settings(settings)
    interactive = sys.stdin.isatty()
    save_history = _line_editing(home() / "chat_history") if interactive else None
    current_mode = settings.mode
    messages: list[dict] = []
    conversation = runtime.new_conversation(source="chat")
    confirm = (lambda sent: _confirm_deferral(sent, settings, interactive)) if settings.privacy == "ask" else None
    if interactive:
        remote = masked("remote_url", settings.remote_url) or "none configured"
        out.print(f"[bold]rpra chat[/] · device {escape(settings.model)} · remote {escape(remote)} · mode {current_mode}")
        out.print(f"[dim]{CHAT_HELP}[/]")
    interrupted_at_prompt = False  # the last key at the prompt was Ctrl-C: a second one leaves
    try:
        while True:
            try:
                line = _read_line(interactive)
            except KeyboardInterrupt:
                if interrupted_at_prompt or not interactive:
                    out.print()
                    break
                interrupted_at_prompt = True
                out.print("\n[dim]Ctrl-C again or /quit to leave[/]")
                continue
            interrupted_at_prompt = False
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
                    conversation = runtime.new_conversation(source="chat")
                    out.print("[dim]new conversation[/]")
                else:
                    out.print(f"[dim]{CHAT_HELP}[/]")
                continue
            if not interactive:
                out.print(f"[bold]> {escape(text)}[/]")
            messages.append({"role": "user", "content": text})
            try:
                events = runtime.turn(messages, mode=current_mode, conversation_id=conversation, source="chat", confirm=confirm)
                result = _stream_turn(events, show_reasoning=show_reasoning)
            except RpraError as exc:
                result = None
                out.print(f"[red]error:[/] {escape(str(exc))}")
            if result is None:
                # A failed or interrupted exchange leaves the conversation as it was before the
                # message, the same for the device and the remote: a half answer would be read
                # as a finished one, with a rating it never earned. The log keeps the turn.
                messages.pop()
            else:
                rating = result.prediction.mode if result.prediction else None
                messages.append({"role": "assistant", "content": result.answer, "rating": rating})
    except KeyboardInterrupt:  # a second Ctrl-C while the first one was being handled
        out.print()
    finally:
        if save_history:
            save_history()
        runtime.close()


def _stream_turn(events: Iterator[Event], *, show_reasoning: bool) -> TurnResult | None:
    """Print one chat turn as it streams; its ``TurnResult``, or None when Ctrl-C stopped it.

    Ctrl-C may land inside the runtime's generator (which then logs the turn as interrupted and
    ends) or here, between two events; closing the generator makes the second case the first.
    Either way the runtime's cleanup has run, so the model is free for the next turn.
    """
    from rpra.runtime import Decided, Finished, Notice, Text

    result = None
    try:
        for event in events:
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
    except KeyboardInterrupt:
        events.close()
        out.print("\n[dim]\\[interrupted][/]")
        return None
    return result


def _confirm_deferral(sent: list[dict], settings, interactive: bool) -> bool:
    """privacy = ask: show exactly what would leave the device, and ask."""
    out.print(f"\n[yellow]The device model would defer this to {escape(masked('remote_url', settings.remote_url) or '?')} ({escape(settings.remote_model)}). It would send:[/]")
    for message in sent:
        out.print(f"[dim]  {message['role']}:[/] {escape(short(message['content'], 200))}")
    if interactive:
        try:
            return typer.confirm("Send it?", default=False)
        except typer.Abort:  # what click makes of Ctrl-C (and Ctrl-D) at the question
            raise KeyboardInterrupt from None
    answer = (sys.stdin.readline() or "").strip().lower()
    out.print(f"[dim]send it? {escape(answer or '(no answer)')}[/]")
    return answer in ("y", "yes")


def _read_line(interactive: bool) -> str | None:
    try:
        return input(">>> ") if interactive else sys.stdin.readline() or None
    except EOFError:
        return None


def _line_editing(history: Path) -> Callable[[], None] | None:
    """Line editing and a history for ``input()`` (readline), read from ``history``; returns what
    saves the history back, or None on a platform without readline (plain input still works)."""
    try:
        import readline
    except ImportError:  # e.g. Windows without a readline package
        return None
    readline.set_history_length(HISTORY_LENGTH)
    try:
        readline.read_history_file(history)
    except FileNotFoundError:
        pass
    except OSError as exc:
        err.print(f"[yellow]! chat history {escape(str(history))} not read ({escape(exc.strerror or str(exc))}); starting without it[/]")

    def save() -> None:
        try:
            history.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(history)
            history.chmod(0o600)  # it holds the user's messages
        except OSError as exc:
            err.print(f"[yellow]! chat history not saved to {escape(str(history))}: {escape(exc.strerror or str(exc))}[/]")

    return save


def _verdict_line(result) -> str:
    secs = result.timings_ms.get("total", 0) / 1000
    return f"{result.verdict} · {secs:.1f} s"


@settings_command("host", "port", *RUNTIME_FLAGS)
def serve(settings) -> None:
    """Serve the self-deferral runtime as an OpenAI-compatible API (chat completions, streaming or not).

    Any OpenAI client works: base URL http://HOST:PORT/v1, model "rpra" (auto), "rpra-local" or
    "rpra-remote". Each response carries the routing decision in X-RPRA-* headers and an "rpra"
    field. GET /health and /metrics (Prometheus) watch it; every request is logged to the SQLite
    store (`rpra logs --requests`). Set the key with RPRA_SERVER_API_KEY, not a flag: flags show in `ps`.
    """
    from rpra.runtime import Runtime
    from rpra.server import check_bind
    from rpra.server import serve as run_server

    check_bind(settings)  # before loading a model for nothing
    runtime = Runtime.from_settings(settings, need_local=settings.mode != "remote-only")

    def ready(url: str) -> None:
        remote = masked("remote_url", settings.remote_url) if runtime.remote else f"none ({'never-defer' if settings.privacy == 'never-defer' else 'set RPRA_REMOTE_URL'})"
        err.print(f"rpra serve: [bold]{url}[/] · device {escape(settings.model)} · remote {escape(remote)} · "
                  f"privacy {settings.privacy}{' + redaction' if settings.redact else ''} · key {'required' if settings.server_api_key else 'off (loopback)'}")  # fmt: skip
        err.print("[dim]Ctrl-C stops[/]")

    try:
        run_server(runtime, ready=ready)
    except KeyboardInterrupt:  # uvicorn has shut down gracefully and re-raises the signal
        err.print("[dim]stopped[/]")
    finally:
        runtime.close()


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
        try:  # a signal during the prints stops the server too
            err.print(f"serving {escape(model)} at [bold]{server.url}[/] (model name {alias!r}); Ctrl-C stops")
            err.print(f"[dim]point rpra at it: export RPRA_REMOTE_URL={server.url}[/]")
            server.wait()
        except KeyboardInterrupt:
            pass
