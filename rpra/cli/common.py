"""What every command group shares: the consoles, flags generated from a settings dataclass, and
the guarded imports of the optional extras.

Flags are generated, not declared by hand: ``settings_command("mode", "model", ...)`` gives a
command one flag per named ``Settings`` field (its help text from the field, its type from the
annotation) plus ``--config`` and ``--set``, and hands the command the layered ``Settings``.
``option_parameters`` does the same for any config dataclass (``rpra train sft`` uses it).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional

import typer
from rich.console import Console
from rich.markup import escape

from rpra.errors import RpraError

# soft_wrap: never break lines (error messages hold commands to copy; scripts parse verdicts)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

# The settings `ask`, `chat` and `serve` take as flags; the rest through --set or the config.
RUNTIME_FLAGS = ("mode", "protocol", "model", "threshold", "remote_url", "adapter", "profile", "privacy")
SHORT_FLAGS = {"mode": "-m", "protocol": "-p", "threshold": "-t"}

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML config file (default: $RPRA_HOME/config.toml).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override any setting: --set threshold=6 (repeatable).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def option_parameters(cls: type, names: typing.Iterable[str] | None = None, *, short: dict[str, str] | None = None) -> list[inspect.Parameter]:
    """One keyword-only typer option per field of the dataclass ``cls`` (all, or ``names``).

    Each defaults to None, meaning "not given", so that lower configuration layers (a file, the
    environment) still apply; the help text shows the field's own default.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    params = []
    for name in names if names is not None else [n for n, f in fields.items() if "help" in f.metadata]:
        f = fields[name]
        kind = hints[name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None: the flag's type is X
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if typing.get_origin(kind) is Literal:
            choices = typing.get_args(kind)
            kind, help = str, f"{f.metadata['help']} ({' | '.join(choices)})"
        else:
            help = f.metadata["help"]
        flag = "--" + name.replace("_", "-")
        decls = [f"{flag}/--no-{name.replace('_', '-')}" if kind is bool else flag, *([short[name]] if short and name in short else [])]
        option = typer.Option(*decls, help=escape(f"{help} [default: {f.default}]"))  # help text is rich markup
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[kind], option]))
    return params


def with_parameters(fn: Callable, params: list[inspect.Parameter], call: Callable[[dict], Any]) -> Callable:
    """A typer command whose signature is ``fn``'s own parameters plus ``params``; ``call(kwargs)``
    runs it. (Typer reads the signature, so the generated options show in --help.)"""
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in inspect.signature(fn).parameters.values() if p.name != "settings"]
    hints = typing.get_type_hints(fn, include_extras=True)
    own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in own]

    @functools.wraps(fn)
    def command(**kwargs: Any) -> Any:
        return call(kwargs)

    signature = inspect.Signature([*own, *params])
    command.__signature__ = signature  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
    del command.__wrapped__  # typer must see the generated signature, not fn's
    return command


def settings_command(*names: str) -> Callable[[Callable], Callable]:
    """Decorate ``fn(settings, **own_options)``: the command gets a flag per ``Settings`` field in
    ``names``, ``--config`` and ``--set``; ``fn`` gets the effective settings (defaults < profile
    < config file < RPRA_* variables < flags) and its own options."""
    from rpra.config import Settings

    extra = [
        *option_parameters(Settings, names, short=SHORT_FLAGS),
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ConfigOpt),
        inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=SetOpt),
    ]

    def decorate(fn: Callable) -> Callable:
        def call(kwargs: dict) -> Any:
            flags = {name: kwargs.pop(name) for name in names}
            settings = load(kwargs.pop("config"), kwargs.pop("set_"), **flags)
            return fn(settings, **kwargs)

        return with_parameters(fn, extra, call)

    return decorate


def load(config: Path | None, sets: list[str] | None, **flags: Any):
    """The effective settings for a command: ``--set`` pairs and the flags that were given."""
    from rpra.config import load_settings, parse_assignments

    overrides = parse_assignments(sets or [])
    overrides.update({k: v for k, v in flags.items() if v is not None})
    return load_settings(config, overrides)


def short(text: str, n: int = 60) -> str:
    """One line of at most ``n`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def bench_module():
    """``benchmarks.bench``; it needs the bench extra (datasets, numpy, matplotlib, reasoning-gym)."""
    try:
        import rpra.benchmarks.bench as bench
    except ImportError as exc:
        raise RpraError(f"The benchmark needs the bench extra ({exc.name} is missing): pip install 'rpra[bench]'.") from None
    return bench


def require_training() -> None:
    """The training modules need the train extra (torch, transformers, peft, trl)."""
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
        import trl  # noqa: F401
    except ImportError as exc:
        raise RpraError(f"Training needs the train extra ({exc.name} is missing): pip install 'rpra[train]'.") from None
