"""`rpra config show`, `doctor`, `logs`, `models list` and `serve-remote` as a user runs them: the
installed console script in a subprocess, its output read as the user would."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from rpra.store import LogStore

DEAD_REMOTE = "http://127.0.0.1:9/v1"  # nothing listens on the discard port
_CAP_DAC_OVERRIDE, _PR_CAPBSET_DROP = 1, 24  # <linux/capability.h>, <linux/prctl.h>


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


# --- Secrets --------------------------------------------------------------------------------------

SECRETS = {
    "RPRA_SERVER_API_KEY": "srv-s3cret",
    "RPRA_REMOTE_API_KEY": "sk-s3cret",
    "RPRA_REMOTE_URL": "http://alice:pa55w0rd@127.0.0.1:9/v1",
}


def _assert_no_secret(text: str) -> None:
    for leaked in ("srv-s3cret", "sk-s3cret", "pa55w0rd"):
        assert leaked not in text


def test_config_show_masks_every_secret_in_the_table_and_the_json(rpra, isolated_home):
    env = {**os.environ, **SECRETS}
    table = rpra("config", "show", env={**env, "COLUMNS": "160"})  # wide enough that no value wraps
    assert table.returncode == 0, table.stderr
    _assert_no_secret(table.stdout)
    assert "'***'" in table.stdout and "http://***@127.0.0.1:9/v1" in table.stdout
    shown = rpra("config", "show", "--json", env=env)
    _assert_no_secret(shown.stdout)
    rows = {r["name"]: r["value"] for r in json.loads(shown.stdout)["settings"]}
    assert rows["server_api_key"] == rows["remote_api_key"] == "***"
    assert rows["remote_url"] == "http://***@127.0.0.1:9/v1"


def test_doctor_masks_every_secret_in_text_and_json(rpra, isolated_home):
    env = {**os.environ, **SECRETS, "RPRA_REMOTE_RETRIES": "0", "RPRA_MODEL": "https://dl:t0ken@127.0.0.1:9/m.gguf"}
    for args in (("doctor",), ("doctor", "--json")):
        run = rpra(*args, env=env)
        _assert_no_secret(run.stdout + run.stderr)
        assert "t0ken" not in run.stdout + run.stderr
        assert "http://***@127.0.0.1:9/v1" in run.stdout


# --- A home that cannot be written -----------------------------------------------------------------


def _obey_file_modes() -> None:
    """preexec_fn: drop CAP_DAC_OVERRIDE from the capability bounding set, so that the rpra the
    child execs obeys file modes even when the tests run as root (who otherwise writes anywhere)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_CAPBSET_DROP, _CAP_DAC_OVERRIDE, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE)")


@pytest.fixture
def read_only_home(isolated_home, rpra_bin):
    """RPRA_HOME as a directory without write permission; yields ``run(*args, env=...)``, which
    runs rpra so that the permission holds (see _obey_file_modes)."""
    isolated_home.mkdir(parents=True, exist_ok=True)
    preexec = _obey_file_modes if os.geteuid() == 0 else None

    def chmod(mode: int) -> None:  # the files in it too, as on a read-only disk
        for path in (isolated_home, *isolated_home.iterdir()):
            os.chmod(path, mode)

    def run(*args: str, env: dict) -> subprocess.CompletedProcess:
        chmod(0o555)
        try:
            return subprocess.run([rpra_bin, *args], env=env, capture_output=True, text=True, timeout=120, preexec_fn=preexec)
        finally:
            chmod(0o755)

    chmod(0o555)
    try:
        probe = subprocess.run([sys.executable, "-c", f"open({str(isolated_home / 'probe')!r}, 'w')"],
                               capture_output=True, preexec_fn=preexec)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:  # prctl refused: no CAP_SETPCAP in this container
        pytest.skip(f"cannot make a directory read-only for a root child here: {exc}")
    finally:
        chmod(0o755)
    if probe.returncode == 0:
        pytest.skip("a read-only directory is still writable here (root keeps CAP_DAC_OVERRIDE)")
    yield run


def _assert_one_clear_line(run: subprocess.CompletedProcess, home) -> None:
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Traceback" not in run.stderr and "sqlite3" not in run.stderr
    assert "damaged" not in run.stderr
    (line,) = [line for line in _error_lines(run.stderr) if line.startswith("error:")]
    assert f"{home} is not writable" in line and "RPRA_HOME" in line and "--set log=false" in line
    assert _error_lines(run.stderr)[-1] == line


@pytest.mark.slow
def test_ask_in_a_read_only_home_says_what_to_do(read_only_home, env, isolated_home):
    _assert_one_clear_line(read_only_home("ask", "hi", "--mode", "local-only", env=env), isolated_home)


@pytest.mark.slow
def test_ask_in_a_read_only_home_with_a_log_does_not_call_it_damaged(read_only_home, env, isolated_home):
    LogStore(isolated_home / "logs.db").close()
    _assert_one_clear_line(read_only_home("ask", "hi", "--mode", "local-only", env=env), isolated_home)
    # The advice works: with logging off the same command answers.
    answered = read_only_home("ask", "hi", "--mode", "local-only", "--set", "log=false", env=env)
    assert answered.returncode == 0, answered.stderr


def test_logs_in_a_read_only_home_still_reads_the_log(read_only_home, isolated_home):
    with LogStore(isolated_home / "logs.db") as store:
        conversation = store.new_conversation(source="ask")
        store.start_turn(conversation, prompt="kept prompt", messages=[], model="m", protocol="pa", predictor="zero-shot", mode="auto")
    env = dict(os.environ)
    listed = read_only_home("logs", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert [t["prompt"] for t in json.loads(listed.stdout)] == ["kept prompt"]
    table = read_only_home("logs", env={**env, "COLUMNS": "200"})  # wide enough for the prompt on one line
    assert table.returncode == 0 and "kept prompt" in table.stdout


def test_logs_in_a_read_only_home_without_a_log_is_one_clear_line(read_only_home, isolated_home):
    _assert_one_clear_line(read_only_home("logs", env=dict(os.environ)), isolated_home)


def test_doctor_fails_a_read_only_home(read_only_home, isolated_home):
    run = read_only_home("doctor", "--json", env=dict(os.environ))
    (home,) = [c for c in json.loads(run.stdout)["checks"] if c["name"] == "home"]
    assert run.returncode == 1 and home["status"] == "fail"
    assert f"{isolated_home} is not writable" in home["message"] and "--set log=false" in home["message"]


# --- Tables and lookups ------------------------------------------------------------------------------


def test_logs_of_a_missing_turn_is_an_error(rpra, isolated_home):
    with LogStore(isolated_home / "logs.db") as store:
        store.new_conversation(source="ask")
    run = rpra("logs", "--turn", "999", env=dict(os.environ))
    assert run.returncode == 1 and run.stdout == ""
    assert "No turn 999 in the log" in run.stderr and "rpra logs" in run.stderr


def test_models_list_at_80_columns_shows_whole_names(rpra, isolated_home):
    from rpra.models import REGISTRY

    run = rpra("models", "list", env={**os.environ, "COLUMNS": "80"})
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    for name in REGISTRY:
        assert any(name in line for line in lines), (name, run.stdout)


def test_logs_at_80_columns_shows_whole_ids_and_times(rpra, isolated_home):
    prompt = "A long prompt that must give way to the columns that identify a turn " * 3
    with LogStore(isolated_home / "logs.db") as store:
        conversation = store.new_conversation(source="ask")
        ids = [store.start_turn(conversation, prompt=prompt, messages=[], model="m", protocol="pa", predictor="zero-shot", mode="auto")
               for _ in range(2)]  # fmt: skip
        for turn_id in ids:
            store.finish_turn(turn_id, route="remote", fallback=1, answered_by="local", expected=3.0, total_ms=1234.0)
        turns = store.turns()
        store.log_request(client="127.0.0.1", method="POST", path="/v1/chat/completions", status=200, mode="auto", error="x" * 80)
        requests = store.requests()
    env = {**os.environ, "COLUMNS": "80"}
    for args, rows in ((("logs",), turns), (("logs", "--requests"), requests)):
        run = rpra(*args, env=env)
        lines = run.stdout.splitlines()
        assert max(len(line) for line in lines) <= 80
        for row in rows:
            assert any(f"│ {row['id']} " in line and row["created_at"][:19] in line for line in lines), run.stdout


# --- serve-remote stops its server on every exit ----------------------------------------------------
# (Here because this is the one CLI test module that may grow; rpra/remote_server.py is the code.)


def _start_serve_remote(rpra_bin, model_path, *command: str) -> tuple[subprocess.Popen, queue.Queue]:
    args = [rpra_bin, "serve-remote", "--model", str(model_path), "--port", "0", "--n-ctx", "512", "--n-threads", "1"]
    if command:
        args += ["--", *command]
    # SIGINT as a terminal would deliver it, even when the tests run in the background (where it is ignored).
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    return process, lines


def _wait_for(lines: queue.Queue, text: str, timeout: float = 120) -> None:
    seen = []
    while True:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{text!r} not printed within {timeout} s; got {seen}") from None
        seen.append(line)
        if text in line:
            return


def _stop_and_check_children(process: subprocess.Popen, how: signal.Signals) -> int:
    children = psutil.Process(process.pid).children(recursive=True)
    try:
        assert children, "serve-remote started no server"
        os.kill(process.pid, how)
        code = process.wait(30)
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"left running after {how.name}: {[p.cmdline() for p in alive]}"
        return code
    finally:  # whatever failed above, leave no 100 MB server behind
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        if process.poll() is None:
            process.kill()


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_serve_remote_stops_its_server_on_a_signal(rpra_bin, model_path, how):
    process, lines = _start_serve_remote(rpra_bin, model_path)
    _wait_for(lines, "export RPRA_REMOTE_URL")  # its last line before it waits on the server
    # serve_remote prints that line outside its `try`: a signal there stops the server as well,
    # but exits 130. Give it a moment to reach the wait the exit code is about.
    time.sleep(0.5)
    assert _stop_and_check_children(process, how) == 0  # a requested stop is a clean exit


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.slow
def test_serve_remote_killed_outright_still_takes_its_server_down(rpra_bin, model_path):
    process, lines = _start_serve_remote(rpra_bin, model_path)
    _wait_for(lines, "export RPRA_REMOTE_URL")
    _stop_and_check_children(process, signal.SIGKILL)


@pytest.mark.slow
def test_serve_remote_with_a_command_stops_both_on_sigterm(rpra_bin, model_path):
    script = "import time; print('command running', flush=True); time.sleep(600)"
    process, lines = _start_serve_remote(rpra_bin, model_path, sys.executable, "-c", script)
    _wait_for(lines, "command running")
    assert _stop_and_check_children(process, signal.SIGTERM) == 128 + signal.SIGTERM
