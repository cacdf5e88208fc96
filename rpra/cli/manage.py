"""Managing the device: `rpra models`, `rpra doctor`, `rpra logs` and `rpra config`."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Column, Table

from rpra.cli.common import ConfigOpt, JsonOpt, SetOpt, load, out, settings_command, short


def models_list(json_out: JsonOpt = False) -> None:
    """List the registered models and whether each is downloaded."""
    from rpra.models import list_models

    rows = list_models()
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    # The name is what other commands take.
    table = Table(_keep("name"), _keep("present"), _keep("size"), _fold("source"), _fold("description"))
    for row in rows:
        size = f"{row['size'] / 1e6:,.0f} MB" if row.get("size") else "?"
        table.add_row(row["name"], "yes" if row["present"] else "no", size, row["source"], row.get("description", ""))
    out.print(table)


def models_pull(
    name: Annotated[str, typer.Argument(help="Registered name, http(s) URL (optionally #sha256=HEX) or hf:OWNER/REPO/FILE.gguf.")],
    force: Annotated[bool, typer.Option("--force", help="Download again even if a verified copy exists.")] = False,
) -> None:
    """Download a model into the cache under RPRA_HOME and verify it."""
    from rpra.models import pull

    print(pull(name, force=force))


def models_path(name: Annotated[str, typer.Argument(help="Registered name, path or pulled URL.")]) -> None:
    """Print the local path of a downloaded model (no download)."""
    from rpra.models import resolve

    print(resolve(name))


@settings_command("profile")
def doctor(
    settings,
    json_out: Annotated[bool, typer.Option("--json", help="Print the whole report as JSON.")] = False,
    profiles: Annotated[bool, typer.Option("--profiles", help="List the shipped device profiles instead.")] = False,
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
    report = machine_report(settings)
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


def logs(
    query: Annotated[Optional[str], typer.Option("--query", "-q", help="Search prompts and answers.")] = None,
    conversation: Annotated[Optional[str], typer.Option(help="Only this conversation id.")] = None,
    route: Annotated[Optional[str], typer.Option(help="Only turns routed 'local' or 'remote'.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="Most turns to show.")] = 20,
    turn: Annotated[Optional[int], typer.Option("--turn", help="Show one turn in full.")] = None,
    json_out: JsonOpt = False,
    requests: Annotated[bool, typer.Option("--requests", help="List the HTTP requests `rpra serve` received instead (refused ones too).")] = False,
) -> None:
    """List and search the logged turns (newest first)."""
    from rpra.errors import RpraError
    from rpra.store import LogStore

    if requests:
        with LogStore.default(for_reading=True) as store:
            rows = store.requests(limit=limit)
        if json_out:
            print(json.dumps(rows, indent=2))
            return
        table = Table(_keep("id"), _keep("time"), *map(_fold, ("client", "status", "mode", "turn", "ms", "error")))
        for r in rows:
            ms = f"{r['duration_ms']:.0f}" if r.get("duration_ms") is not None else "-"
            table.add_row(str(r["id"]), r["created_at"][:19], r.get("client") or "-", str(r["status"]), r.get("mode") or "-",
                          str(r.get("turn_id") or "-"), ms, short(r.get("error") or "", 50))  # fmt: skip
        out.print(table)
        return
    with LogStore.default(for_reading=True) as store:
        if turn is not None:
            found = store.get_turn(turn)
            if found is None:
                raise RpraError(f"No turn {turn} in the log {store.path}. `rpra logs` lists the turns with their ids.")
            print(json.dumps([found], indent=2, default=str))
            return
        rows = store.turns(query=query, conversation=conversation, route=route, limit=limit)
    if json_out:
        print(json.dumps(rows, indent=2, default=str))
        return
    table = Table(_keep("id"), _keep("time"), *map(_fold, ("route", "score", "by", "ms", "prompt")))  # short headers: room for the prompt at 80 columns
    for r in rows:
        predicted = f"{r['expected']:.1f}" if r.get("expected") is not None else "-"
        route_text = (r.get("route") or r["status"]) + (" (fallback)" if r.get("fallback") else "")
        ms = f"{r['total_ms']:.0f}" if r.get("total_ms") is not None else "-"
        table.add_row(str(r["id"]), r["created_at"][:19], route_text, predicted, _who(r.get("answered_by")), ms, short(r["prompt"]))
    out.print(table)


def _keep(header: str) -> Column:
    """A column whose cells are never cut or wrapped (names, ids, times: what a user copies or
    scans for); the ``_fold`` columns give way instead when the terminal is narrow."""
    return Column(header, no_wrap=True)


def _fold(header: str) -> Column:
    """A column that wraps to fit, breaking a word too long for it rather than cutting it short."""
    return Column(header, overflow="fold")


def _who(answered_by: str | None) -> str:
    """Who answered, without the model: at 80 columns the prompt needs the room, and the model is
    in `rpra logs --turn ID` and --json."""
    return (answered_by or "-").partition(":")[0]


def config_show(config: ConfigOpt = None, set_: SetOpt = None, json_out: JsonOpt = False) -> None:
    """Print every effective setting and where its value came from."""
    from rpra.config import default_config_path, home, masked, setting_help, setting_names

    settings = load(config, set_)
    rows = [{"name": name, "value": masked(name, getattr(settings, name)), "source": settings.sources[name], "help": setting_help(name)}
            for name in setting_names()]  # fmt: skip
    where = config or default_config_path()
    if json_out:
        print(json.dumps({"home": str(home()), "config_file": str(where), "settings": rows}, indent=2))
        return
    out.print(f"[dim]RPRA_HOME {home()} · config file {where}[/]")
    table = Table("setting", "value", "from")
    for row in rows:
        table.add_row(row["name"], escape(repr(row["value"])), row["source"])
    out.print(table)
