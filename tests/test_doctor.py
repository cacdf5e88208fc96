"""Device profiles and `rpra doctor`'s report: offline, with fake probes where a machine is imagined."""

from __future__ import annotations

import json

import pytest

from rpra import doctor
from rpra.config import Settings, load_settings
from rpra.errors import ConfigError

SHIPPED = {"arm-board-4gb", "arm-board-8gb", "laptop", "workstation"}
GIB = 1 << 30


def fake_machine(monkeypatch, *, machine="x86_64", system="Linux", flags=("avx", "avx2", "fma", "f16c"),
                 features=("AVX", "AVX2", "FMA", "F16C"), logical=8, physical=4, total_gib=16.0, vm=False):  # fmt: skip
    """Replace the probes that read this machine with a machine of our choosing."""
    monkeypatch.setattr(doctor, "_platform", lambda: {"system": system, "release": "x", "machine": machine, "python": "3.12"})
    monkeypatch.setattr(doctor, "_cpu", lambda: {"model": "fake", "logical_cores": logical, "physical_cores": physical,
                                                 "flags": sorted(flags), "virtual_machine": vm})  # fmt: skip
    monkeypatch.setattr(doctor, "_memory", lambda: {"total_bytes": int(total_gib * GIB), "available_bytes": int(total_gib * GIB * 0.8)})
    monkeypatch.setattr(doctor, "_llama_cpp", lambda: {"llama_cpp_python": "0.3.36", "report": "", "mmap": True, "mlock": True,
                                                       "gpu_offload": False, "features": {f: "1" for f in features}})  # fmt: skip


def check(report: dict, name: str) -> dict:
    found = [c for c in report["checks"] if c["name"] == name]
    assert len(found) == 1, report["checks"]
    return found[0]


# --- Profiles ------------------------------------------------------------------------------------


def test_the_shipped_profiles_are_listed_with_a_description():
    profiles = doctor.list_profiles()
    assert {p["name"] for p in profiles} == SHIPPED
    for profile in profiles:
        assert len(profile["description"]) > 40, profile["name"]
        assert profile["settings"]["model"] == "smollm2-135m-instruct"


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_a_shipped_profile_loads_into_settings_with_its_values(name):
    values = next(p["settings"] for p in doctor.list_profiles() if p["name"] == name)
    settings = load_settings(overrides={"profile": name})
    for key, value in values.items():
        assert getattr(settings, key) == value, key
        assert settings.sources[key] == f"profile {name}", key


def test_a_flag_beats_the_profile_and_the_rest_of_the_profile_stays():
    settings = load_settings(overrides={"profile": "arm-board-4gb", "n_ctx": 4096})
    assert (settings.n_ctx, settings.sources["n_ctx"]) == (4096, "flag")
    assert (settings.n_threads, settings.sources["n_threads"]) == (4, "profile arm-board-4gb")


def test_a_config_file_names_the_profile_and_an_env_var_beats_it(tmp_path, monkeypatch):
    path = tmp_path / "config.toml"
    path.write_text('profile = "arm-board-8gb"\nmax_queue = 1\n')
    monkeypatch.setenv("RPRA_N_BATCH", "32")
    settings = load_settings(path)
    assert settings.n_ctx == 2048  # from the profile
    assert settings.max_queue == 1 and settings.sources["max_queue"] == f"file {path}"
    assert settings.n_batch == 32 and settings.sources["n_batch"] == "env RPRA_N_BATCH"


def test_an_unknown_profile_names_the_shipped_ones():
    with pytest.raises(ConfigError) as exc:
        load_settings(overrides={"profile": "raspberry"})
    for name in SHIPPED:
        assert name in str(exc.value)


def test_a_profile_can_be_a_toml_path(tmp_path):
    path = tmp_path / "my-board.toml"
    path.write_text("# mine\nn_ctx = 777\nn_threads = 3\n")
    settings = load_settings(overrides={"profile": str(path)})
    assert (settings.n_ctx, settings.n_threads) == (777, 3)
    assert settings.sources["n_ctx"] == "profile my-board"


# --- Recommending a profile ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "system, machine, cores, gib, expected",
    [
        ("Linux", "aarch64", 4, 3.7, "arm-board-4gb"),  # a 4 GB Raspberry Pi reports ~3.7 GiB
        ("Linux", "armv7l", 4, 1.8, "arm-board-4gb"),
        ("Linux", "aarch64", 4, None, "arm-board-4gb"),  # RAM unknown: the smallest profile
        ("Linux", "aarch64", 4, 7.6, "arm-board-8gb"),
        ("Linux", "aarch64", 64, 128, "workstation"),  # an ARM server is no board
        ("Darwin", "arm64", 8, 16, "laptop"),  # Apple silicon is a laptop
        ("Linux", "x86_64", 4, 16, "laptop"),
        ("Linux", "x86_64", 16, 64, "workstation"),
        ("Windows", "AMD64", 8, 16, "laptop"),
    ],
)
def test_recommend_profile(system, machine, cores, gib, expected):
    report = {
        "platform": {"system": system, "machine": machine},
        "cpu": {"physical_cores": cores, "logical_cores": cores},
        "memory": {"total_bytes": int(gib * GIB)} if gib else None,
    }
    name, why = doctor.recommend_profile(report)
    assert name == expected
    assert machine.lower() in why and f"{cores} cores" in why
    assert name in SHIPPED


def test_recommend_profile_survives_an_empty_report():
    assert doctor.recommend_profile({})[0] == "laptop"


# --- The machine report --------------------------------------------------------------------------


def test_machine_report_on_this_machine():
    report = doctor.machine_report(Settings())
    assert {"platform", "cpu", "memory", "disk", "llama_cpp", "models", "model", "settings", "checks",
            "status", "recommended_profile"} <= report.keys()  # fmt: skip
    json.dumps(report)  # the CLI prints it with --json
    assert report["cpu"]["logical_cores"] >= 1 and report["memory"]["total_bytes"] > 0
    assert report["llama_cpp"]["llama_cpp_python"] == "0.3.36"
    assert report["recommended_profile"]["name"] in SHIPPED
    assert all(c["status"] in ("ok", "warn", "fail") and c["message"] for c in report["checks"])
    # The isolated RPRA_HOME holds no model: a failed check that says how to get it.
    assert report["model"] is None
    assert check(report, "model")["status"] == "fail" and "rpra models pull" in check(report, "model")["message"]
    assert report["status"] == "fail"


def test_a_failing_probe_becomes_a_warning_and_the_rest_is_reported(monkeypatch):
    def broken():
        raise OSError("no /proc here")

    monkeypatch.setattr(doctor, "_memory", broken)
    report = doctor.machine_report(Settings())
    assert report["memory"] is None
    memory = check(report, "memory")
    assert memory["status"] == "warn" and "no /proc here" in memory["message"]
    assert report["cpu"] is not None and report["disk"] is not None


def test_a_missing_llama_cpp_fails_with_the_install_step(monkeypatch):
    def missing():
        raise ImportError("No module named 'llama_cpp'")

    monkeypatch.setattr(doctor, "_llama_cpp", missing)
    build = check(doctor.machine_report(Settings()), "llama.cpp build")
    assert build["status"] == "fail" and "make setup" in build["message"]


def test_a_build_using_avx512_on_a_cpu_without_it_fails(monkeypatch):
    fake_machine(monkeypatch, flags=("avx", "avx2", "fma", "f16c"), features=("AVX", "AVX2", "AVX512", "FMA"))
    build = check(doctor.machine_report(Settings()), "llama.cpp build")
    assert build["status"] == "fail"
    assert "AVX512" in build["message"] and "-DGGML_AVX512=OFF" in build["message"]


def test_a_build_without_avx2_on_an_avx2_cpu_warns_it_is_slow(monkeypatch):
    fake_machine(monkeypatch, flags=("avx", "avx2", "fma"), features=("AVX", "FMA"))
    build = check(doctor.machine_report(Settings()), "llama.cpp build")
    assert build["status"] == "warn" and "AVX2" in build["message"]


def test_an_avx512_build_in_a_vm_warns(monkeypatch):
    fake_machine(monkeypatch, flags=("avx", "avx2", "avx512f"), features=("AVX", "AVX2", "AVX512"), vm=True)
    build = check(doctor.machine_report(Settings()), "llama.cpp build")
    assert build["status"] == "warn" and "virtual machine" in build["message"]


def test_a_matching_build_is_ok(monkeypatch):
    fake_machine(monkeypatch, machine="aarch64", flags=("neon", "fma", "dotprod"), features=("NEON", "ARM_FMA", "DOTPROD"))
    assert check(doctor.machine_report(Settings()), "llama.cpp build")["status"] == "ok"


def test_parse_cpuinfo_reads_arm_and_x86():
    pi = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid asimddp\n\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n"
    assert doctor.parse_cpuinfo(pi) == ("Raspberry Pi 5 Model B Rev 1.0", ["dotprod", "fma", "neon"])
    x86 = "model name\t: Intel Xeon\nflags\t\t: fpu pni avx2 avx512f hypervisor\n"
    assert doctor.parse_cpuinfo(x86) == ("Intel Xeon", ["avx2", "avx512f", "hypervisor", "sse3"])


def test_the_default_threads_use_every_physical_core(monkeypatch):
    fake_machine(monkeypatch, machine="aarch64", logical=4, physical=4, flags=("neon", "fma"), features=("NEON", "ARM_FMA"))
    threads = check(doctor.machine_report(Settings()), "threads")
    assert threads["status"] == "ok" and threads["message"].startswith("4 llama.cpp threads")
    board = load_settings(overrides={"profile": "arm-board-4gb"})
    assert check(doctor.machine_report(board), "threads")["status"] == "ok"


def test_default_threads_is_one_per_physical_core_within_the_affinity_mask(monkeypatch):
    import psutil

    from rpra.config import default_threads

    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 16 if logical else 8)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert default_threads() == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert default_threads() == 8


def test_more_threads_than_physical_cores_warns(monkeypatch):
    fake_machine(monkeypatch, logical=8, physical=4)
    threads = check(doctor.machine_report(Settings(n_threads=8)), "threads")
    assert threads["status"] == "warn" and "n_threads = 4" in threads["message"]


def test_mlock_under_a_low_memlock_limit_warns(monkeypatch):
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda which: (64 * 1024, 64 * 1024))
    mlock = check(doctor.machine_report(Settings(use_mlock=True)), "mlock")
    assert mlock["status"] == "warn" and "LimitMEMLOCK" in mlock["message"]


def test_low_memory_fails(monkeypatch):
    fake_machine(monkeypatch, total_gib=0.1)  # 80 MiB available: less than the 94 MiB model
    assert check(doctor.machine_report(Settings()), "memory")["status"] == "fail"


def test_binding_off_loopback_without_a_key_fails():
    server = check(doctor.machine_report(Settings(host="0.0.0.0")), "server")
    assert server["status"] == "fail" and "RPRA_SERVER_API_KEY" in server["message"]
    assert check(doctor.machine_report(Settings(host="0.0.0.0", server_api_key="k")), "server")["status"] == "ok"


def test_an_unreachable_remote_warns():
    # Port 9 (discard) on loopback: refused at once, no network needed.
    remote = check(doctor.machine_report(Settings(remote_url="http://127.0.0.1:9/v1", remote_retries=0)), "remote")
    assert remote["status"] == "warn" and "remote_url" in remote["message"]


def test_no_remote_is_a_note_not_an_error():
    assert check(doctor.machine_report(Settings()), "remote")["status"] == "ok"
    assert check(doctor.machine_report(Settings(mode="remote-only")), "remote")["status"] == "fail"


def test_the_report_never_contains_the_keys():
    settings = Settings(remote_url="http://127.0.0.1:9", remote_api_key="sk-secret-1", server_api_key="srv-secret-2",
                        privacy="never-defer")  # fmt: skip
    text = json.dumps(doctor.machine_report(settings))
    assert "sk-secret-1" not in text and "srv-secret-2" not in text
    assert '"remote_api_key": "***"' in text


def test_the_report_never_contains_credentials_in_urls():
    # The remote is used (privacy allow), so its URL appears in the remote check's message too.
    settings = Settings(remote_url="http://user:pa55w0rd@127.0.0.1:9/v1", remote_retries=0,
                        model="https://dl:t0ken@example.com/m.gguf")  # fmt: skip
    report = doctor.machine_report(settings)
    text = json.dumps(report)
    assert "pa55w0rd" not in text and "t0ken" not in text
    assert report["settings"]["remote_url"] == "http://***@127.0.0.1:9/v1"
    assert "http://***@127.0.0.1:9/v1" in check(report, "remote")["message"]


def test_a_home_that_is_not_a_directory_fails_with_what_to_do(tmp_path, monkeypatch):
    # A file where RPRA_HOME should be: nothing can be written under it, even by root.
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("RPRA_HOME", str(blocker / "home"))
    home = check(doctor.machine_report(Settings()), "home")
    assert home["status"] == "fail" and str(blocker) in home["message"]
    assert "RPRA_HOME" in home["message"] and "log=false" in home["message"]


def test_a_writable_home_is_ok(isolated_home):
    assert check(doctor.machine_report(Settings()), "home")["status"] == "ok"
    assert not isolated_home.exists()  # the doctor looks, it does not create


def test_a_missing_probe_file_fails(tmp_path):
    settings = Settings(predictor="probe", probe=str(tmp_path / "none.npz"))
    probe = check(doctor.machine_report(settings), "probe")
    assert probe["status"] == "fail" and "rpra train probe" in probe["message"]



@pytest.mark.slow
def test_doctor_command_prints_json_and_lists_profiles(isolated_home):
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    rpra = shutil.which("rpra", path=str(Path(sys.executable).parent)) or "rpra"
    done = subprocess.run([rpra, "doctor", "--json", "--set", "model=/nonexistent/model.gguf"], capture_output=True, text=True, timeout=120)
    report = json.loads(done.stdout)
    assert done.returncode == 1 and report["status"] == "fail"  # the model is missing: a failing check, exit 1
    assert any(c["name"] == "model" and c["status"] == "fail" for c in report["checks"])
    listed = subprocess.run([rpra, "doctor", "--profiles", "--json"], capture_output=True, text=True, timeout=60)
    assert {p["name"] for p in json.loads(listed.stdout)} >= {"arm-board-4gb", "laptop"}


def test_doctor_counts_threads_within_the_affinity_mask_as_the_runtime_does(monkeypatch):
    # 8 physical cores, but this process may run on 2 of them (taskset, a container's cpuset).
    fake_machine(monkeypatch, logical=16, physical=8)
    real_cpu = doctor._cpu
    monkeypatch.setattr(doctor, "_cpu", lambda: {**real_cpu(), "allowed_cores": 2})
    threads = check(doctor.machine_report(Settings()), "threads")
    assert threads["status"] == "ok" and threads["message"].startswith("2 llama.cpp threads") and "affinity mask" in threads["message"]
    over = check(doctor.machine_report(Settings(n_threads=8)), "threads")
    assert over["status"] == "warn" and "n_threads = 2" in over["message"]
