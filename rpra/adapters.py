"""Trained LoRA adapters of the device model, by name.

``rpra train sft`` writes each adapter into its own folder under ``RPRA_HOME/adapters/NAME/``:
``adapter.gguf`` (what llama.cpp loads), ``meta.json`` (the base model's sha256, the training
config and data, measured loss and wall time) and the peft checkpoint it was exported from. The
runtime only needs the GGUF and the base model's hash, so nothing here imports the training stack.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rpra.config import home
from rpra.errors import ConfigError


@dataclass(frozen=True)
class Adapter:
    name: str
    path: Path  # adapter.gguf
    meta: dict


def adapters_dir(root: Path | None = None) -> Path:
    return (root or home()) / "adapters"


def list_adapters(root: Path | None = None) -> list[Adapter]:
    """Exported adapters, newest first (folders without an adapter.gguf are unfinished runs)."""
    found = []
    for folder in adapters_dir(root).glob("*/"):
        gguf = folder / "adapter.gguf"
        if gguf.exists():
            found.append(Adapter(folder.name, gguf, _meta(folder)))
    return sorted(found, key=lambda a: a.meta.get("created", ""), reverse=True)


def resolve_adapter(name_or_path: str, *, model: Path | None = None, root: Path | None = None) -> Path:
    """The GGUF of a named adapter, or a .gguf path as given.

    With ``model``, a named adapter is checked against the base model it was trained on: a LoRA
    applied to another model loads without complaint in llama.cpp and silently produces garbage.
    """
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf" or path.exists():
        if not path.exists():
            raise ConfigError(f"No adapter file at {path}.")
        return path
    folder = adapters_dir(root) / name_or_path
    gguf = folder / "adapter.gguf"
    if not gguf.exists():
        names = ", ".join(a.name for a in list_adapters(root)) or "none yet (train one with `rpra train sft`)"
        raise ConfigError(f"No adapter named {name_or_path!r}. Adapters: {names}.")
    if model is not None:
        from rpra.models import file_sha256

        meta = _meta(folder)
        trained_on = meta.get("base_sha256")
        if trained_on and trained_on != file_sha256(model):
            raise ConfigError(
                f"Adapter {name_or_path!r} was trained on another base model ({meta.get('base_model')}, "
                f"sha256 {trained_on[:12]}…), not {model.name}. Use it with that model, or train one for this model."
            )
    return gguf


def trained_folder(name: str, root: Path | None = None) -> Path:
    """The folder of the trained adapter ``name`` (its peft checkpoint and meta.json), or a clear error."""
    folder = adapters_dir(root) / name
    if not (folder / "peft").exists() or not (folder / "meta.json").exists():
        raise ConfigError(f"No trained adapter {name!r} in {adapters_dir(root)} (see `rpra train list`).")
    return folder


def _meta(folder: Path) -> dict:
    try:
        return json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return {}
