"""The fine-tuning job's configuration: one dataclass feeds the CLI flags and the YAML file.

Every field becomes a ``rpra train sft --flag`` (``rpra.cli.common.option_parameters``: help text
from the field's metadata) and a key of the YAML file passed with ``--config``. Flags override the file, the file overrides defaults.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rpra.config import DEFAULT_MODEL
from rpra.errors import ConfigError

LossOn = Literal["prediction", "prediction+answer"]
Target = Literal["pass", "llm", "exact"]


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class SFTConfig:
    """What ``rpra train sft`` trains, on what, and how."""

    name: str = _opt("sft", "Adapter name (its folder under RPRA_HOME/adapters; `--adapter NAME` loads it).")
    model: str = _opt(DEFAULT_MODEL, "Base device model: a registered name or a .gguf path (the file the device runs).")
    suite: str = _opt("rpra-mix", "Suite whose collected, judged train split is the training data.")
    split: str = _opt("train", "Collection split to train on (never the test split you report on).")
    protocols: str = _opt("pa,rpra", "Turn layouts to train on, comma-separated: pa, rpra or both.")
    loss_on: LossOn = _opt("prediction", "Tokens with loss: the score only, or the score and the local answer.")
    target: Target = _opt(
        "pass",
        "Score target: pass, the record's label (verified where the item has a key, else the judge at the pass mark) as "
        "10 pass / 1 fail; llm, the judge's score; exact, the verifier alone (10 / 1).",
    )
    eval_fraction: float = _opt(0.1, "Share of the training records held out to report eval loss.")
    lora_r: int = _opt(16, "LoRA rank.")
    lora_alpha: int = _opt(32, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = _opt(0.05, "Dropout on the LoRA path.")
    target_modules: str = _opt("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "Modules that get a LoRA, comma-separated.")
    learning_rate: float = _opt(2e-4, "Peak learning rate (cosine decay, 10% warm-up).")
    epochs: float = _opt(3.0, "Passes over the training data.")
    max_steps: int = _opt(-1, "Stop after this many optimizer steps (-1: run the epochs).")
    batch_size: int = _opt(8, "Sequences per optimizer step (accumulated from micro-batches of micro_batch_size).")
    micro_batch_size: int = _opt(4, "Sequences per forward pass.")
    max_length: int = _opt(768, "Longest training sequence in tokens; longer examples are left out (and counted).")
    save_steps: int = _opt(20, "Checkpoint every this many steps (an interrupted run resumes from the last one).")
    seed: int = _opt(0, "Seed of the held-out split, LoRA init and data order.")
    threads: int = _opt(0, "CPU threads for torch (0: all cores).")
    export: bool = _opt(True, "Convert the adapter to a GGUF LoRA for llama.cpp when training ends.")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        bad = [p for p in self.protocol_list if p not in ("pa", "rpra")]
        if bad or not self.protocol_list:
            raise ConfigError(f"protocols must list pa and/or rpra; got {self.protocols!r}.")
        for name, allowed in (("loss_on", LossOn), ("target", Target)):
            if getattr(self, name) not in typing.get_args(allowed):
                raise ConfigError(f"{name} must be one of {', '.join(typing.get_args(allowed))}; got {getattr(self, name)!r}.")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1); got {self.eval_fraction}.")
        if self.split == "test":
            raise ConfigError("Training on the test split would make its benchmark meaningless; use split = train.")
        for name in ("lora_r", "lora_alpha", "batch_size", "micro_batch_size", "max_length", "save_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive; got {getattr(self, name)}.")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size}).")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"name must be a plain folder name; got {self.name!r}.")

    @property
    def protocol_list(self) -> list[str]:
        return [p.strip() for p in self.protocols.split(",") if p.strip()]

    def fingerprint(self) -> str:
        """A hash of everything that shapes the trained weights (a resumed run must match it)."""
        shaping = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("name", "threads", "export", "save_steps")}
        return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def load_config(path: Path | None, overrides: dict[str, Any]) -> SFTConfig:
    """Defaults < YAML file < ``overrides`` (flags that were given; None means not given)."""
    values: dict[str, Any] = {}
    if path is not None:
        import yaml

        try:
            loaded = yaml.safe_load(Path(path).expanduser().read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"Cannot read the training config {path}: {exc.strerror}.") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must be a mapping of setting: value.")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name: f for f in dataclasses.fields(SFTConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"Unknown training settings: {', '.join(unknown)}. Known: {', '.join(known)}.")
    hints = typing.get_type_hints(SFTConfig)
    for key, value in values.items():
        values[key] = _coerce(key, value, hints[key])
    return SFTConfig(**values)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    kind = type(next(iter(typing.get_args(hint)))) if typing.get_origin(hint) is Literal else hint
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false; got {value!r}.")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a {kind.__name__}; got {value!r}.") from None
