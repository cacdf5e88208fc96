"""Configuration: defaults < TOML file < ``RPRA_*`` environment variables < command-line flags.

One dataclass declares every setting with its help text; the loader fills it layer by layer and
remembers where each value came from, so ``rpra config show`` can explain itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rpra.errors import ConfigError

Mode = Literal["auto", "local-only", "remote-only"]
Protocol = Literal["pa", "rpra"]
RouteOn = Literal["expected", "p_pass", "advantage"]
PredictorName = Literal["zero-shot", "report-card", "fine-tuned", "probe"]
Privacy = Literal["allow", "ask", "never-defer"]


# Sampling temperatures a turn accepts, from the CLI, a config file or an HTTP request alike:
# 0 is greedy; past 2 (OpenAI's own limit) a small model emits gibberish.
TEMPERATURE_RANGE = (0.0, 2.0)
MASK = "***"
# The user-info part of a URL (https://user:pass@host, https://token@host): a credential.
_URL_CREDENTIALS = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#\s@]+@")


def _opt(default: Any, help: str, *, secret: bool = False) -> Any:
    """A setting: its default and help text; ``secret`` ones are never shown (see ``masked``)."""
    return field(default=default, metadata={"help": help, "secret": secret})


# The default device model: the best quality per remote call at an acceptable speed, measured in
# benchmarks/README.md ("Which device model"). Tests run the smallest registered one.
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"

@dataclass
class Settings:
    """Every knob of the runtime. Field names are the TOML keys; ``RPRA_<NAME>`` the env vars."""

    # The device model
    model: str = _opt(DEFAULT_MODEL, "Device model: a registered name, a .gguf path or a URL.")
    adapter: str | None = _opt(None, "LoRA adapter applied to the device model: a name from `rpra train list` or a .gguf path.")
    n_ctx: int = _opt(2048, "Context window of the device model, in tokens.")
    n_threads: int | None = _opt(None, "CPU threads for llama.cpp (default: one per physical core this process may use).")
    n_batch: int = _opt(256, "Prompt tokens evaluated per llama.cpp batch.")
    use_mmap: bool = _opt(True, "Map the model file into memory (pages load on demand and can be shared) instead of reading it all.")
    use_mlock: bool = _opt(False, "Lock the model in RAM so the OS never swaps it out (needs a high enough `ulimit -l`).")
    # The RPRA turn
    # PA by default: SmolLM2-135M's short "first thought" is mostly noise and made its answers
    # worse (docs/architecture.md); RPRA is for models that can reason, or fine-tuned ones.
    protocol: Protocol = _opt("pa", "pa: predict right after the prompt; rpra: reason briefly, then predict.")
    reason_tokens: int = _opt(48, "Token budget of the short reasoning before the prediction (rpra).")
    max_tokens: int = _opt(384, "Most tokens in an answer.")
    temperature: float = _opt(0.2, "Sampling temperature of answers (0 = greedy).")
    repeat_penalty: float = _opt(1.1, "Penalty on repeating recent tokens (1 = none); small models loop without it.")
    seed: int = _opt(0, "Sampling seed, for reproducible answers.")
    answer_after_score: bool = _opt(
        False,
        "Let a local answer continue after the score written into the slot (the RPRA paper's layout). Off: the "
        "answer starts where the turn does, because SmolLM2 copied the score into short answers (level 1-2 "
        "arithmetic: 17.5% right after the slot, 55% without it, 40 train items).",
    )
    predictor: PredictorName = _opt(
        "zero-shot",
        "zero-shot: the prompt alone; report-card: with the card in report_card; fine-tuned: the model with "
        "its adapter (set adapter); probe: a regression on the model's hidden state (see probe).",
    )
    report_card: str | None = _opt(None, "Report card file (markdown) for the report-card predictor.")
    probe: str | None = _opt(None, "Probe file (.npz) for the probe predictor (default: next to the model, from `rpra train probe`).")
    scale_max: int = _opt(10, "The judge scale is 1..scale_max.")
    pass_mark: int = _opt(7, "A judged score at or above this counts as a pass (for P(pass)).")
    # The controller
    mode: Mode = _opt("auto", "auto: defer on a low prediction; local-only; remote-only.")
    route_on: RouteOn = _opt(
        "expected",
        "Threshold the expected score, P(score >= pass_mark), or the advantage P(local passes) - P(remote passes) "
        "(a probe with a remote head only; threshold 0: defer when the remote is expected to do better).",
    )
    threshold: float = _opt(5.0, "Defer when the routed quantity is below this.")
    verifier: str | None = _opt(
        None,
        "Verifier file (.npz, `rpra train verifier`): the cascade's second decision point. A request the prediction "
        "keeps local is drafted first, unseen; the verifier scores the draft, which is shown, or deferred when its "
        "routed quantity is below verify_threshold. Unset: no check, local answers stream at once.",
    )
    verify_threshold: float | None = _opt(
        None,
        "Defer a checked draft whose routed quantity is below this (route_on p_pass: the draft's P(pass); advantage: "
        "it minus P(remote passes); expected: its expected score). Unset: the same as threshold.",
    )
    best_of: int = _opt(
        1,
        "The ladder's best-of-N rung (with a verifier): a draft the verifier doubts gets this many more, sampled in "
        "one llama.cpp batch; the verifier's weighted best is kept if it passes the check, else the request defers. "
        "1: no rung.",
    )
    sample_temperature: float = _opt(0.7, "Sampling temperature of best-of-N's extra drafts.")
    allocation: str | None = _opt(
        None,
        "The ladder's compute-optimal allocation (.json, `rpra train ladder`): in mode auto each request's bin of the "
        "probe's P(pass) picks its rung, answer, best-of-N, revise or defer, instead of the threshold. Needs "
        "predictor = probe (the bins are on its P(pass)) and, for best-of-N or revise, a verifier.",
    )
    pool: str | None = _opt(
        None,
        "A pool of targets (.toml, see `rpra.pool`): in mode auto each request goes to the target with the best "
        "expected reward for its cost (the pool's rule), read from the device model's own slot state by one head per "
        "target (`rpra train pool`), within the pool's day / month budget. Instead of remote_url.",
    )
    pool_heads: str | None = _opt(None, "The pool's reward heads (.npz, `rpra train pool`); default: next to the model.")
    # The remote model
    remote_url: str | None = _opt(None, "Base URL of an OpenAI-compatible API, e.g. https://api.openai.com/v1.")
    remote_model: str = _opt("default", "Model name sent to the remote endpoint.")
    remote_api_key: str | None = _opt(None, "API key for the remote endpoint (sent as a Bearer token).", secret=True)
    remote_timeout: float = _opt(60.0, "Seconds to wait for the remote's next byte before giving up.")
    remote_first_token_timeout: float = _opt(
        20.0,
        "Seconds a streamed remote answer may take to send its first text, all connects and retries together; "
        "gaps after that are bounded by remote_timeout.",
    )
    remote_retries: int = _opt(2, "Retries (with exponential backoff) when the remote fails before answering.")
    send_reasoning: bool = _opt(False, "Send the local model's reasoning along with a deferred request.")
    # Privacy: what may leave the device
    privacy: Privacy = _opt(
        "allow",
        "allow: defer when the controller says so; ask: the chat asks before each deferral (servers answer "
        "locally); never-defer: fully offline, nothing is ever sent.",
    )
    redact: bool = _opt(True, "Mask e-mail addresses, phone numbers, card and account numbers, IP addresses in deferred requests; restore them in the answer.")
    phone_region: str = _opt("US", "Country (ISO 3166 code) whose national phone-number format redaction also recognises.")
    # The server (`rpra serve`)
    host: str = _opt("127.0.0.1", "Address `rpra serve` binds; anything but loopback requires server_api_key.")
    port: int = _opt(8080, "Port `rpra serve` listens on (0 picks a free one).")
    server_api_key: str | None = _opt(None, "Bearer token clients of `rpra serve` must send (required off loopback).", secret=True)
    allowed_origins: str = _opt(
        "",
        "Web pages whose browser requests `rpra serve` answers, with CORS headers: comma-separated origins such "
        "as http://localhost:3000, or * for any. Requests from any other page get 403; clients that are not "
        "browsers send no Origin and are unaffected.",
    )
    max_queue: int = _opt(8, "Requests that may wait for the local model before `rpra serve` answers 429 busy.")
    max_request_bytes: int = _opt(1_000_000, "Largest request body `rpra serve` accepts, in bytes (larger: 413).")
    # Storage
    log: bool = _opt(True, "Log every turn to the SQLite store under RPRA_HOME.")
    profile: str | None = _opt(
        None,
        "Device profile: a name from `rpra doctor --profiles` or a TOML path. Its settings lie under the "
        "config file's, env vars' and flags'.",
    )

    # Where each value came from: "default", "file <path>", "env RPRA_X" or "flag".
    sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for values that would only fail later, far from their cause, or not
        fail at all (a negative temperature samples gibberish). Every layer, and every per-request
        change (``dataclasses.replace``), passes through here."""
        choices = {"mode": Mode, "protocol": Protocol, "route_on": RouteOn, "predictor": PredictorName, "privacy": Privacy}
        for name, literal in choices.items():
            allowed = typing.get_args(literal)
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}.")
        if self.scale_max < 2:
            raise ConfigError(f"scale_max must be at least 2; got {self.scale_max}.")
        if not 1 <= self.pass_mark <= self.scale_max:
            raise ConfigError(f"pass_mark must lie on the scale 1..{self.scale_max}; got {self.pass_mark}.")
        low_t, high_t = TEMPERATURE_RANGE
        for name in ("threshold", "verify_threshold"):  # both points route on the same quantity
            value = getattr(self, name)
            if value is None:
                continue
            if self.route_on == "p_pass" and not 0.0 <= value <= 1.0:
                raise ConfigError(f"With route_on = p_pass the {name} is a probability in [0, 1]; got {value}.")
            if self.route_on == "advantage" and not -1.0 <= value <= 1.0:
                raise ConfigError(
                    f"With route_on = advantage the {name} is a difference of probabilities in [-1, 1] "
                    f"(0: defer when the remote is expected to do better); got {value}."
                )
            # E[score] lies in 1..scale_max: 0 never defers, scale_max + 1 always does; beyond is a typo.
            if self.route_on == "expected" and not 0.0 <= value <= self.scale_max + 1:
                raise ConfigError(
                    f"{name} must be in [0, {self.scale_max + 1}] (the expected score lies on 1..{self.scale_max}; "
                    f"0 never defers, {self.scale_max + 1} always does); got {value}."
                )
        if self.best_of < 1 or not low_t <= self.sample_temperature <= high_t:
            raise ConfigError(f"best_of must be at least 1 and sample_temperature in [{low_t:g}, {high_t:g}]; "
                              f"got {self.best_of} and {self.sample_temperature}.")
        if self.best_of > 1 and not self.verifier:
            raise ConfigError("best_of picks among drafts by the verifier's scores: set verifier (`rpra train verifier`).")
        if self.allocation and self.pool:
            raise ConfigError("allocation and pool both choose where a request goes: set one of them.")
        if self.allocation and self.predictor != "probe":
            raise ConfigError("An allocation's bins lie on the probe's P(pass): use it with predictor = probe.")
        if self.verifier and self.protocol != "pa":
            raise ConfigError("The verifier reads a draft in the PA layout: use it with protocol = pa.")
        low, high = TEMPERATURE_RANGE
        if not low <= self.temperature <= high:
            raise ConfigError(f"temperature must be in [{low:g}, {high:g}] (0 = greedy); got {self.temperature}.")
        for name in ("n_ctx", "max_tokens", "n_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive; got {getattr(self, name)}.")
        for name, what in (("repeat_penalty", "1 = no penalty"), ("remote_timeout", "seconds"), ("remote_first_token_timeout", "seconds")):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive ({what}); got {getattr(self, name)}.")
        if self.n_threads is not None and self.n_threads < 1:
            raise ConfigError(f"n_threads must be at least 1, or unset for one per physical core; got {self.n_threads}.")
        if self.predictor == "report-card" and not self.report_card:
            raise ConfigError("The report-card predictor needs a card: set report_card (see `rpra report-card build`).")
        if self.predictor == "fine-tuned" and not self.adapter:
            raise ConfigError("The fine-tuned predictor needs an adapter: set adapter (see `rpra train sft` and `rpra train list`).")
        if self.predictor == "probe" and self.protocol != "pa":
            raise ConfigError("The probe predicts before any generated token: use it with protocol = pa.")
        if self.privacy == "never-defer" and self.mode == "remote-only":
            raise ConfigError("privacy = never-defer keeps everything on the device; it cannot run in mode remote-only.")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535; got {self.port}.")
        if any(o.strip() != "*" and "://" not in o for o in self.allowed_origins.split(",") if o.strip()):
            raise ConfigError(f"allowed_origins lists origins such as http://localhost:3000 (scheme://host[:port]), or *; got {self.allowed_origins!r}.")
        if self.max_queue < 0 or self.max_request_bytes < 1024:
            raise ConfigError("max_queue cannot be negative and max_request_bytes must be at least 1024.")
        if self.reason_tokens < 0 or self.remote_retries < 0:
            raise ConfigError("reason_tokens and remote_retries cannot be negative.")


def setting_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Settings) if f.name != "sources"]


def setting_help(name: str) -> str:
    return next(f.metadata["help"] for f in dataclasses.fields(Settings) if f.name == name)


def secret_names() -> list[str]:
    """The settings that hold credentials: shown only as ``MASK``."""
    return [f.name for f in dataclasses.fields(Settings) if f.metadata.get("secret")]


def masked(name: str, value: Any) -> Any:
    """Setting ``name``'s ``value`` as it may be shown (tables, JSON, reports that get pasted into
    bug reports): a secret as ``MASK``, credentials inside a URL (``https://user:pass@host``)
    masked; an unset value stays None, so "not set" remains visible."""
    if value is None:
        return None
    if name in secret_names():
        return MASK
    return mask_urls(value) if isinstance(value, str) else value


def mask_text(text: str, settings: Settings) -> str:
    """``text`` (a message, an error) with the values of ``settings``' secrets and any URL
    credentials masked: messages quote URLs, and some quote what a server sent back."""
    for name in secret_names():
        if value := getattr(settings, name):
            text = text.replace(value, MASK)
    return mask_urls(text)


def mask_urls(text: str) -> str:
    """``text`` with the credentials in any URL in it masked: ``https://***@host/...``."""
    return _URL_CREDENTIALS.sub(rf"\1{MASK}@", text)


def home() -> Path:
    """RPRA_HOME: models, logs and the default config file live here."""
    if env := os.environ.get("RPRA_HOME"):
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("rpra", appauthor=False))


def default_config_path() -> Path:
    return Path(os.environ["RPRA_CONFIG"]).expanduser() if "RPRA_CONFIG" in os.environ else home() / "config.toml"


def _convert(name: str, raw: Any, origin: str) -> Any:
    """Coerce a TOML, env or flag value to the declared type of setting ``name``."""
    hint = typing.get_type_hints(Settings)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    base = args[0] if optional and args else hint
    if typing.get_origin(base) is Literal:
        base = str
    if raw is None or (optional and isinstance(raw, str) and raw.strip().lower() in ("", "none", "null")):
        if optional:
            return None
        raise ConfigError(f"{name} cannot be empty ({origin}).")
    try:
        if base is bool:
            if isinstance(raw, bool):
                return raw
            value = str(raw).strip().lower()
            if value in ("1", "true", "yes", "on"):
                return True
            if value in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if base is int and isinstance(raw, float):
            raise ValueError(raw)
        return base(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be of type {base.__name__}; got {raw!r} ({origin}).") from None


def default_threads(*, physical: int | None = None, allowed: int | None = None) -> int:
    """One llama.cpp thread per physical core this process may run on.

    Decode is bound by memory bandwidth, so a second thread on a core (SMT) does not help, and
    llama-cpp-python's own default (half the logical CPUs) leaves cores idle wherever there is no
    SMT: two of a Raspberry Pi's four, one of a 2-vCPU VM's two. A CPU affinity mask (taskset,
    a container's cpuset) caps it. ``physical`` and ``allowed`` (CPUs in the mask) default to
    this machine's; `rpra doctor` passes the ones it reports.
    """
    import psutil

    if physical is None:
        physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    if allowed is None:
        allowed = allowed_cpus() or physical
    return max(1, min(physical, allowed))


def allowed_cpus() -> int | None:
    """CPUs this process may run on (its affinity mask), or None where the OS has no masks (macOS)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def profiles_dir() -> Path:
    """Where the device profiles that ship with rpra live."""
    return Path(__file__).parent / "profiles"


def profile_path(name: str) -> Path:
    """A profile's TOML file: a shipped profile's name, or a path."""
    candidate = Path(name).expanduser()
    if candidate.suffix == ".toml" or candidate.is_file():
        if not candidate.is_file():
            raise ConfigError(f"Profile file {candidate} does not exist.")
        return candidate
    shipped = profiles_dir() / f"{name}.toml"
    if not shipped.is_file():
        known = ", ".join(sorted(p.stem for p in profiles_dir().glob("*.toml")))
        raise ConfigError(f"No device profile {name!r}. Shipped profiles: {known}; or give a .toml path. `rpra doctor` recommends one.")
    return shipped


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A flat TOML file of settings, checked against the known names."""
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {path} is not valid TOML: {exc}.") from None
    names = setting_names()
    for key in data:
        if key not in names:
            raise ConfigError(f"Unknown setting {key!r} in {path}. Known: {', '.join(names)}.")
    return data


def load_settings(config_path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build the effective settings: defaults, then the device profile, then the TOML file, then
    RPRA_* env vars, then ``overrides``.

    ``overrides`` are the command-line flags; ``None`` values mean "flag not given" and are skipped.
    The profile is named by any of the later layers (the highest wins) and sits under all of them,
    so a profile tunes the machine and everything the user sets still wins.
    """
    names = setting_names()
    layers: list[tuple[str, dict[str, Any]]] = []

    path = Path(config_path).expanduser() if config_path else default_config_path()
    if config_path and not path.exists():
        raise ConfigError(f"Config file {path} does not exist.")
    if path.exists():
        layers.append((f"file {path}", read_toml(path, "Config file")))
    for name in names:
        env = f"RPRA_{name.upper()}"
        if env in os.environ:
            layers.append((f"env {env}", {name: os.environ[env]}))
    flags = {name: raw for name, raw in (overrides or {}).items() if raw is not None}
    for name in flags:
        if name not in names:
            raise ConfigError(f"Unknown setting {name!r}. Known: {', '.join(names)}.")
    layers.append(("flag", flags))

    profile = None
    for origin, layer in layers:
        if "profile" in layer:
            profile = _convert("profile", layer["profile"], origin)
    if profile:
        where = profile_path(profile)
        data = read_toml(where, "Profile")
        data.pop("profile", None)  # a profile cannot name another
        layers.insert(0, (f"profile {where.stem}", data))

    values: dict[str, Any] = {}
    sources = {name: "default" for name in names}
    for origin, layer in layers:
        for name, raw in layer.items():
            values[name] = _convert(name, raw, origin)
            sources[name] = origin
    settings = Settings(**values)
    settings.sources = sources
    return settings


def write_settings(path: Path | str, values: dict[str, Any]) -> Path:
    """Set ``values`` in a TOML config file, keeping its other settings (e.g. `rpra calibrate`)."""
    path = Path(path).expanduser()
    data = tomllib.loads(path.read_text()) if path.exists() else {}
    for name, value in values.items():
        if name not in setting_names():
            raise ConfigError(f"Unknown setting {name!r}.")
        _convert(name, value, "write")  # validate before touching the file
        data[name] = value
    # Settings are flat scalars, so TOML is one `key = value` line each; JSON's string escapes
    # are valid TOML basic-string escapes.
    lines = [f"{k} = {str(v).lower() if isinstance(v, bool) else json.dumps(v)}" for k, v in data.items() if v is not None]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".toml.part")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def parse_assignments(pairs: list[str]) -> dict[str, str]:
    """Parse ``--set key=value`` flags."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE; got {pair!r}.")
        out[key.strip().replace("-", "_")] = value
    return out
