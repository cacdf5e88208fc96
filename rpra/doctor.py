"""`rpra doctor`: what this machine is, whether rpra will run well on it, and which profile fits.

``machine_report`` gathers facts (OS, CPU and its instruction sets, memory, disk, the llama.cpp
build, the models) and turns them into checks, each ``{"name", "status", "message"}`` with status
"ok", "warn" or "fail" and a message that says what to do. Every probe is guarded: a probe that
fails becomes a "warn" check and the checks that needed its facts are skipped, because a doctor that
crashes diagnoses nothing. Nothing here prints; the report is a JSON-serialisable dict.
"""

from __future__ import annotations

import platform
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rpra import __version__, config
from rpra.config import Settings
from rpra.errors import RpraError

_STATUSES = ("ok", "warn", "fail")
_GIB = 1 << 30
_MIB = 1 << 20

# /proc/cpuinfo names -> the names this report uses. aarch64 lists "asimd" for NEON (which
# includes fused multiply-add); armv7 lists "neon" and "vfpv4" (its FMA).
_CPUINFO_ALIASES = {"pni": "sse3", "asimd": "neon", "asimddp": "dotprod", "asimdhp": "fp16", "vfpv4": "fma"}
_RELEVANT_FLAGS = {
    "sse3", "ssse3", "avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni", "avx512f", "avx512vbmi",
    "avx512_vnni", "avx512_bf16", "amx_int8", "amx_tile", "neon", "dotprod", "fp16", "i8mm", "sve", "sve2", "sme",
}  # fmt: skip
# llama.cpp's feature names (llama_print_system_info) -> the CPU flag each one needs. A feature is
# listed only when the build was compiled with it, so its code runs unconditionally.
_BUILD_NEEDS = {
    "SSE3": "sse3", "SSSE3": "ssse3", "AVX": "avx", "AVX2": "avx2", "FMA": "fma", "F16C": "f16c",
    "BMI2": "bmi2", "AVX_VNNI": "avx_vnni", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi",
    "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8",
    "NEON": "neon", "ARM_FMA": "fma", "FP16_VA": "fp16", "MATMUL_INT8": "i8mm", "SVE": "sve", "DOTPROD": "dotprod",
}  # fmt: skip
# The Makefile's x86 default: runs on every x86-64 CPU with AVX2, VMs included.
_SAFE_X86_FLAGS = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF"
_REBUILD = "Rebuild llama.cpp for this CPU: `make setup LLAMA_CMAKE_ARGS=\"{flags}\"` (see edge/README.md)."


def _check(name: str, status: str, message: str) -> dict:
    assert status in _STATUSES, status
    return {"name": name, "status": status, "message": message}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


# --- Probes: facts about the machine, each free to raise ----------------------------------------


def _platform() -> dict:
    return {
        "system": platform.system(),
        "release": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


def parse_cpuinfo(text: str) -> tuple[str | None, list[str]]:
    """(CPU or board model, relevant instruction-set flags) from the text of /proc/cpuinfo."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())  # the first CPU speaks for all
    # x86 lists "flags", ARM "Features"; Raspberry Pi kernels name the board in "Model".
    raw = (fields.get("flags") or fields.get("Features") or "").split()
    flags = {_CPUINFO_ALIASES.get(f, f) for f in raw}
    if "asimd" in raw:
        flags.add("fma")
    model = fields.get("Model") or fields.get("model name") or fields.get("Hardware")
    return model, sorted(flags & (_RELEVANT_FLAGS | {"hypervisor"}))


def _cpu() -> dict:
    import psutil

    model, flags = None, None
    if platform.system() == "Linux":
        model, flags = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    elif platform.system() == "Darwin":
        import subprocess

        done = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5)
        model = done.stdout.strip() or None
    return {
        "model": model or platform.processor() or None,
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "allowed_cores": config.allowed_cpus(),  # the affinity mask (taskset, a container's cpuset)
        # Read from /proc/cpuinfo, so Linux only; None elsewhere means "not known", not "none".
        "flags": None if flags is None else [f for f in flags if f != "hypervisor"],
        "virtual_machine": None if flags is None else "hypervisor" in flags,
    }


def _memory() -> dict:
    import psutil

    vm = psutil.virtual_memory()
    return {"total_bytes": vm.total, "available_bytes": vm.available}


def _disk() -> dict:
    where = config.home()
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent  # RPRA_HOME is created on first use: measure the disk it will be on
    usage = shutil.disk_usage(probe)
    return {"path": str(where), "free_bytes": usage.free, "total_bytes": usage.total}


def _llama_cpp() -> dict:
    from rpra.local import system_info

    return system_info()


def _models() -> list[dict]:
    from rpra.models import list_models

    return list_models()


def _model(settings: Settings) -> dict:
    """The configured device model's file; raises (with what to do) when it is missing or damaged."""
    from rpra.models import resolve

    path = resolve(settings.model)
    return {"name": settings.model, "path": str(path), "size_bytes": path.stat().st_size}


# --- Checks: judgements on the facts -----------------------------------------------------------


def _check_build(report: dict) -> list[dict]:
    build, cpu = report["llama_cpp"], report["cpu"]
    if build is None:
        return []
    features = {k for k, v in build["features"].items() if v not in ("0", "")}
    summary = ", ".join(sorted(features & set(_BUILD_NEEDS))) or "no SIMD features"
    name = "llama.cpp build"
    if not cpu or cpu["flags"] is None:
        return [_check(name, "ok", f"llama-cpp-python {build['llama_cpp_python']} built with {summary}; "
                                   "the CPU's flags are read on Linux only, so they were not compared.")]  # fmt: skip
    flags = set(cpu["flags"])
    x86 = report["platform"] and report["platform"]["machine"].lower() in ("x86_64", "amd64", "i686", "i386")
    safe = _SAFE_X86_FLAGS if x86 else "-DGGML_NATIVE=ON"
    missing = sorted(f for f in features & set(_BUILD_NEEDS) if _BUILD_NEEDS[f] not in flags)
    if missing:
        return [_check(name, "fail",
                       f"llama.cpp was built with {', '.join(missing)}, which this CPU lacks: it will crash "
                       f"(illegal instruction) on the first model call. {_REBUILD.format(flags=safe)}")]  # fmt: skip
    if cpu["virtual_machine"] and features & {"AVX512", "AMX_INT8"}:
        return [_check(name, "warn",
                       "llama.cpp was built with AVX-512/AMX and this is a virtual machine: such builds have "
                       f"crashed in decode on VMs whose CPU advertises them. If rpra crashes: {_REBUILD.format(flags=_SAFE_X86_FLAGS)}")]  # fmt: skip
    unused = [f for f, flag in (("AVX2", "avx2"), ("NEON", "neon"), ("DOTPROD", "dotprod")) if flag in flags and f not in features]
    if unused:
        return [_check(name, "warn",
                       f"This CPU has {', '.join(unused)} but llama.cpp was built without: the model runs slower "
                       f"than it could. {_REBUILD.format(flags=safe)}")]  # fmt: skip
    return [_check(name, "ok", f"llama-cpp-python {build['llama_cpp_python']} built with {summary}; the CPU has them all.")]


def _check_threads(report: dict, settings: Settings) -> list[dict]:
    cpu = report["cpu"]
    if not cpu or not cpu["logical_cores"]:
        return []
    logical, physical, allowed = cpu["logical_cores"], cpu["physical_cores"], cpu.get("allowed_cores")
    # What the runtime will use: the setting, else the same default llama.cpp gets (config.default_threads).
    threads = settings.n_threads or config.default_threads(physical=physical or logical, allowed=allowed or logical)
    where = "rpra's default: one per physical core" if settings.n_threads is None else "n_threads"
    if allowed and threads > allowed:
        return [_check("threads", "warn",
                       f"{where} gives {_count(threads, 'thread')} but this process may run on {allowed} CPUs only (its "
                       f"affinity mask): the threads would share them. Set n_threads = {allowed}.")]  # fmt: skip
    if physical and threads > physical:
        return [_check("threads", "warn",
                       f"{where} gives {_count(threads, 'thread')} but this machine has {physical} physical cores: decode is "
                       f"memory-bound and threads sharing a core slow it down. Set n_threads = {physical}.")]  # fmt: skip
    if physical and threads < min(physical, allowed or physical):
        return [_check("threads", "warn",
                       f"{where} gives {_count(threads, 'thread')}, but this process may use {min(physical, allowed or physical)} "
                       f"physical cores, so some stay idle. Remove n_threads to use them all.")]  # fmt: skip
    mask = f", {allowed} allowed by the affinity mask" if allowed and allowed < logical else ""
    return [_check("threads", "ok", f"{_count(threads, 'llama.cpp thread')} ({where}) on {physical or '?'} physical / {logical} logical cores{mask}.")]


def _model_bytes(report: dict, settings: Settings) -> int | None:
    from rpra.models import REGISTRY

    if report["model"]:
        return report["model"]["size_bytes"]
    spec = REGISTRY.get(settings.model)
    return spec.size if spec else None


def _check_memory(report: dict, settings: Settings) -> list[dict]:
    memory, build, checks = report["memory"], report["llama_cpp"], []
    need = _model_bytes(report, settings)
    if memory and need:
        # Rough on purpose: beside the weights, the KV cache and compute buffer measured 35-346 MiB
        # for the shipped profiles with the default model, 530 MiB with the 1.5B one at n_ctx 8192.
        available = memory["available_bytes"]
        have = f"{available / _GIB:.1f} GiB of {memory['total_bytes'] / _GIB:.1f} GiB RAM available"
        if available < need:
            checks.append(_check("memory", "fail", f"{have}, less than the model alone ({need / _MIB:.0f} MiB): it would "
                                                   "swap or be killed. Free memory or choose a smaller model."))  # fmt: skip
        elif available < need + 512 * _MIB:
            checks.append(_check("memory", "warn", f"{have}, close to the model's {need / _MIB:.0f} MiB plus its buffers: "
                                                   "lower n_ctx and n_batch (see the arm-board profiles) or free memory."))  # fmt: skip
        else:
            checks.append(_check("memory", "ok", f"{have}; the model takes {need / _MIB:.0f} MiB plus its buffers."))
    if build and settings.use_mmap and not build["mmap"]:
        checks.append(_check("mmap", "warn", "use_mmap is on but this llama.cpp build cannot map files; it reads the "
                                             "model into memory instead. Set use_mmap = false to make that explicit."))  # fmt: skip
    return checks


def _check_mlock(report: dict, settings: Settings) -> list[dict]:
    if not settings.use_mlock:
        return []
    build, need = report["llama_cpp"], _model_bytes(report, settings)
    if build and not build["mlock"]:
        return [_check("mlock", "warn", "use_mlock is on but this llama.cpp build cannot lock memory. Set use_mlock = false.")]
    import resource  # Unix only; on other systems the probe guard turns the ImportError into a warn

    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != resource.RLIM_INFINITY and need and soft < need:
        return [_check("mlock", "warn",
                       f"use_mlock is on but the locked-memory limit is {soft / _MIB:.0f} MiB, less than the model "
                       f"({need / _MIB:.0f} MiB): llama.cpp silently runs unlocked. Raise it: `ulimit -l unlimited`, "
                       "LimitMEMLOCK=infinity in the systemd unit, `--ulimit memlock=-1` for a container; or set use_mlock = false.")]  # fmt: skip
    return [_check("mlock", "ok", "use_mlock is on and the locked-memory limit allows the whole model.")]


def _check_disk(report: dict) -> list[dict]:
    disk = report["disk"]
    if not disk:
        return []
    free = f"{disk['free_bytes'] / _GIB:.1f} GiB free under {disk['path']}"
    if disk["free_bytes"] < _GIB:
        return [_check("disk", "warn", f"Only {free}: models and the turn log live there. Free space or point RPRA_HOME at a larger disk.")]
    return [_check("disk", "ok", f"{free} (models and the turn log).")]


def _check_home() -> list[dict]:
    from rpra.store import write_problem  # one home for "can the log be written"

    where = config.home()
    problem = write_problem(where / "logs.db")
    if problem:
        return [_check("home", "fail", problem)]
    return [_check("home", "ok", f"RPRA_HOME {where} is writable (models, the turn log, the config file).")]


def _check_model(report: dict) -> list[dict]:
    model = report["model"]
    if not model:
        return []  # the probe's own "fail" check says what is wrong and what to do
    return [_check("model", "ok", f"{model['name']}: {model['path']} ({model['size_bytes'] / _MIB:.0f} MiB).")]


def _check_files(settings: Settings, report: dict) -> list[dict]:
    """The adapter, probe and report card the settings name, if any."""
    checks = []
    if settings.adapter:
        from rpra.adapters import resolve_adapter

        model = Path(report["model"]["path"]) if report["model"] else None
        try:
            path = resolve_adapter(settings.adapter, model=model)
            checks.append(_check("adapter", "ok", f"Adapter {settings.adapter} found at {path}."))
        except RpraError as exc:
            checks.append(_check("adapter", "fail", str(exc)))
    if settings.predictor == "probe" or settings.probe:
        from rpra.probe import default_probe_path

        if settings.probe:
            path = Path(settings.probe).expanduser()
        elif report["model"]:
            path = default_probe_path(Path(report["model"]["path"]))
        else:
            path = None  # no model file, so no default probe beside it: the model check already failed
        if path and path.is_file():
            from rpra.models import file_sha256
            from rpra.probe import Probe

            try:
                probe = Probe.load(path)
                if report["model"]:
                    probe.check_model(file_sha256(Path(report["model"]["path"])), settings.model)
                where = "the final state" if probe.layer is None else f"layer {probe.layer}"
                checks.append(_check("probe", "ok", f"Probe at {path} ({probe.head} head on {where})."))
            except RpraError as exc:
                checks.append(_check("probe", "fail", str(exc)))
        elif path:
            checks.append(_check("probe", "fail", f"No probe at {path}. Fit one with `rpra train probe`, or set probe to its file."))
    if settings.predictor == "report-card" and settings.report_card:
        path = Path(settings.report_card).expanduser()
        if path.is_file():
            checks.append(_check("report card", "ok", f"Report card found at {path}."))
        else:
            checks.append(_check("report card", "fail", f"No report card at {path}. Build one with `rpra report-card build`."))
    return checks


def _check_remote(settings: Settings) -> list[dict]:
    if settings.privacy == "never-defer":
        return [_check("remote", "ok", "privacy = never-defer: nothing leaves the device, so no remote is used.")]
    if settings.mode == "local-only":
        return [_check("remote", "ok", "mode = local-only: the remote is not used.")]
    if not settings.remote_url:
        if settings.mode == "remote-only":
            return [_check("remote", "fail", "mode = remote-only needs a remote: set remote_url (RPRA_REMOTE_URL).")]
        return [_check("remote", "ok", "No remote configured: every request is answered on the device. "
                                       "Set remote_url (RPRA_REMOTE_URL) to defer the hard ones.")]  # fmt: skip
    from rpra.remote import RemoteModel

    try:
        remote = RemoteModel.from_settings(settings)
    except RpraError as exc:
        return [_check("remote", "fail", str(exc))]
    try:
        reachable = remote.health()
    finally:
        remote.close()
    if reachable:
        return [_check("remote", "ok", f"{remote.base_url} answers.")]
    status = "fail" if settings.mode == "remote-only" else "warn"
    return [_check("remote", status,
                   f"{remote.base_url}/models did not answer 200 within 2 s: deferred requests will be answered on "
                   "the device (flagged as fallbacks) until it does. Check remote_url, the network and remote_api_key.")]  # fmt: skip


def _check_server(settings: Settings) -> list[dict]:
    from rpra.server import check_bind, is_loopback  # one home for the bind rule

    try:
        check_bind(settings)
    except RpraError as exc:
        return [_check("server", "fail", f"`rpra serve` will refuse to start: {exc}")]
    if is_loopback(settings.host):
        return [_check("server", "ok", f"`rpra serve` listens on {settings.host}:{settings.port}, reachable from this machine only.")]
    return [_check("server", "ok", f"`rpra serve` listens on {settings.host}:{settings.port}; clients must send server_api_key as a Bearer token.")]


def _check_profile(settings: Settings, recommended: tuple[str, str]) -> list[dict]:
    name, why = recommended
    if not settings.profile:
        return [_check("profile", "ok", f"No device profile set. Suggested: `--profile {name}` ({why}).")]
    if Path(settings.profile).stem == name:
        return [_check("profile", "ok", f"Profile {settings.profile} in use, the one suggested for this machine.")]
    return [_check("profile", "ok", f"Profile {settings.profile} in use; the one suggested for this machine is {name} ({why}).")]


# --- The report ----------------------------------------------------------------------------------


def _public_settings(settings: Settings) -> dict[str, Any]:
    return {name: config.masked(name, getattr(settings, name)) for name in config.setting_names()}


def machine_report(settings: Settings) -> dict:
    """Facts about this machine and rpra's setup on it, checks on them and a suggested profile.

    Keys: rpra, platform, cpu, memory, disk, llama_cpp, models, model, settings, checks
    (``[{"name", "status", "message"}]``), status (the worst check's) and recommended_profile
    (``{"name", "why"}``). A fact a probe could not read is None, with a "warn" check saying so.
    Contacts the remote (one GET, 2 s at most) when one is configured and may be used.
    """
    checks: list[dict] = []

    def guarded(name: str, probe: Callable[..., Any], *args: Any, status: str = "warn", fix: str = "") -> Any:
        try:
            return probe(*args)
        except RpraError as exc:
            checks.append(_check(name, status, str(exc)))  # rpra's own errors already say what to do
        except Exception as exc:  # a doctor that crashes diagnoses nothing: report it and go on
            fix = fix or "The checks that need it were skipped; if this persists, include `rpra doctor --json` in a bug report."
            checks.append(_check(name, status, f"Could not check {name} ({type(exc).__name__}: {exc}). {fix}"))
        return None

    report: dict[str, Any] = {"rpra": __version__}
    report["platform"] = guarded("platform", _platform)
    report["cpu"] = guarded("cpu", _cpu)
    report["memory"] = guarded("memory", _memory)
    report["disk"] = guarded("disk", _disk)
    report["llama_cpp"] = guarded(
        "llama.cpp build", _llama_cpp, status="fail",
        fix="Install it with `make setup`, which builds llama.cpp with CPU-safe flags (edge/README.md).",
    )  # fmt: skip
    report["models"] = guarded("models", _models)
    # A missing or damaged model raises a ModelError whose message already says what to do.
    report["model"] = guarded("model", _model, settings, status="fail")
    report["settings"] = _public_settings(settings)
    recommended = recommend_profile(report)
    report["recommended_profile"] = {"name": recommended[0], "why": recommended[1]}

    for name, judge, args in (
        ("llama.cpp build", _check_build, (report,)),
        ("threads", _check_threads, (report, settings)),
        ("memory", _check_memory, (report, settings)),
        ("mlock", _check_mlock, (report, settings)),
        ("disk", _check_disk, (report,)),
        ("home", _check_home, ()),
        ("model", _check_model, (report,)),
        ("files", _check_files, (settings, report)),
        ("remote", _check_remote, (settings,)),
        ("server", _check_server, (settings,)),
        ("profile", _check_profile, (settings, recommended)),
    ):
        checks.extend(guarded(name, judge, *args) or [])
    # A report gets pasted into bug reports, and messages quote URLs and what servers answered.
    report["checks"] = [{**c, "message": config.mask_text(c["message"], settings)} for c in checks]
    report["status"] = max((c["status"] for c in checks), key=_STATUSES.index, default="ok")
    return report


def recommend_profile(report: dict) -> tuple[str, str]:
    """The shipped profile that fits the machine in ``report`` (from ``machine_report``), and why, in one line."""
    plat, cpu, memory = report.get("platform") or {}, report.get("cpu") or {}, report.get("memory") or {}
    system, machine = plat.get("system") or "", (plat.get("machine") or "").lower()
    cores = cpu.get("physical_cores") or cpu.get("logical_cores")
    total = memory.get("total_bytes")
    gib = total / _GIB if total else None
    facts = ", ".join(filter(None, (
        f"{system} {machine}".strip() or None,
        f"{cores} cores" if cores else "cores unknown",
        f"{gib:.1f} GiB RAM" if gib else "RAM unknown",
    )))  # fmt: skip
    board = machine.startswith(("arm", "aarch64")) and system != "Darwin"  # Apple silicon is a laptop
    big = bool(cores and cores >= 8 and gib and gib >= 32)
    if board and not big:
        if gib is None:
            return "arm-board-4gb", f"{facts}: an ARM board of unknown RAM, so the smallest profile"
        if gib < 6:
            return "arm-board-4gb", f"{facts}: an ARM board with about 4 GB or less"
        return "arm-board-8gb", f"{facts}: an ARM board with 6 GB or more"
    if big:
        return "workstation", f"{facts}: 8+ physical cores and 32+ GiB, room for a long context and locked weights"
    return "laptop", f"{facts}: a laptop or desktop"


def list_profiles() -> list[dict]:
    """The profiles that ship with rpra: name, path, description (their first comment paragraph), settings."""
    profiles = []
    for path in sorted(config.profiles_dir().glob("*.toml")):
        lines = []
        for line in path.read_text().splitlines():
            text = line.strip()
            if not text.startswith("#") or not text.lstrip("#").strip():
                break  # the description is the first paragraph of the leading comment
            lines.append(text.lstrip("#").strip())
        profiles.append({"name": path.stem, "path": str(path), "description": " ".join(lines),
                         "settings": config.read_toml(path, "Profile")})  # fmt: skip
    return profiles
