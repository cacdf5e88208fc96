"""An offline stand-in for the cloud model: llama.cpp's OpenAI-compatible server on 127.0.0.1.

It runs as a subprocess (``python -m llama_cpp.server``), so this module never imports llama_cpp
and a crash of the model cannot take rpra down with it. ``rpra serve-remote -- CMD`` wraps
``run_with_server``: CMD sees RPRA_REMOTE_URL / RPRA_REMOTE_MODEL pointing at the stand-in.

The server holds gigabytes, so it must never outlive rpra: while it runs, SIGTERM and SIGHUP
(``systemctl stop``, ``kill``, a closed terminal) raise ``Stopped`` like Ctrl-C raises
KeyboardInterrupt, and every ``finally`` stops it; on Linux the kernel also stops it when rpra
dies by SIGKILL, which no handler can catch.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from rpra.errors import ConfigError, ModelNotFoundError, RemoteError

# llama_cpp.server reads these from the environment and lets them win over its flags (HOST and
# PORT go straight to uvicorn; API_KEY would make the stand-in demand a key nobody sends).
_SERVER_ENV_OVERRIDES = {"HOST", "PORT", "CONFIG_FILE", "API_KEY"}
# Signals that, by default, kill a process without running its `finally` blocks.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived while a server ran. A KeyboardInterrupt, so that whatever handles
    Ctrl-C (stop the server, exit cleanly) handles these too."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def _raise_stopped(signum: int, frame: object) -> None:
    raise Stopped(signum)


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec_fn by which the kernel sends the child SIGTERM when this thread ends, so even
    rpra's SIGKILL stops the server; None off Linux, and off the main thread, whose end alone is
    rpra's end (PR_SET_PDEATHSIG fires when the *thread* that started the child ends)."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()  # looked up before the fork

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # rpra died before prctl: no signal will come
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _end(process: subprocess.Popen, grace: float, signum: int = signal.SIGTERM, *, group: bool = False) -> None:
    """Send ``signum`` to ``process`` (its whole process group with ``group``), SIGKILL it after
    ``grace`` seconds, and reap it. Nothing to do once it has exited."""
    if process.poll() is not None:
        return
    send = (lambda sig: os.killpg(process.pid, sig)) if group else process.send_signal
    try:
        send(signum)
        process.wait(grace)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        process.wait()
    except ProcessLookupError:  # exited between poll() and the signal
        process.wait()


class RemoteServer:
    """``llama_cpp.server`` serving one GGUF model; a context manager that starts and stops it."""

    def __init__(
        self,
        model_path: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        model_alias: str = "default",
        log_path: Path | None = None,
    ):
        self.model_path = Path(model_path)
        self.host = host
        self.port = port  # 0: a free port is picked by start()
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.model_alias = model_alias
        self.log_path = Path(log_path) if log_path else None
        self._process: subprocess.Popen | None = None
        self._handlers: dict[int, object] = {}  # the signal handlers start() replaced, for stop()
        self._log_file = None
        self._own_log = False  # True when the log is a temporary file of ours, deleted by stop()

    @property
    def url(self) -> str:
        """The API base, ``http://host:port/v1``, known once a port is chosen."""
        if not self.port:
            raise RuntimeError("RemoteServer.url is known only after start() picked a port.")
        return f"http://{self.host}:{self.port}/v1"

    def command(self) -> list[str]:
        """The server's command line (flags of llama-cpp-python 0.3.36)."""
        cmd = [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(self.model_path),
            "--host", self.host,
            "--port", str(self.port),
            "--n_ctx", str(self.n_ctx),
            "--model_alias", self.model_alias,
        ]  # fmt: skip
        if self.n_threads:
            cmd += ["--n_threads", str(self.n_threads)]
        return cmd

    def start(self, timeout: float = 120.0) -> RemoteServer:
        """Launch the server and wait until ``GET /v1/models`` answers. Raises RemoteError."""
        if self._process is not None:
            return self
        if not self.model_path.is_file():
            raise ModelNotFoundError(f"No model file at {self.model_path}; pass the path of a .gguf file.")
        try:
            self._launch()
            self._wait_ready(timeout)
        except BaseException as exc:  # Ctrl-C while the model loads must not leave a server behind
            if isinstance(exc, RemoteError):
                self._own_log = False  # keep the log the message points at
            self.stop()
            raise
        return self

    def _launch(self) -> None:
        if not self.port:
            # Racy in theory (another process may take the port before the server binds it), but
            # the server then exits with "address in use" and start() says so.
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind((self.host, 0))
                self.port = probe.getsockname()[1]
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="rpra-remote-", suffix=".log")
            os.close(fd)
            self.log_path, self._own_log = Path(name), True
        self._log_file = open(self.log_path, "ab")
        env = {k: v for k, v in os.environ.items() if k.upper() not in _SERVER_ENV_OVERRIDES}
        if threading.current_thread() is threading.main_thread():  # the only thread that may set handlers
            self._handlers = {sig: signal.signal(sig, _raise_stopped) for sig in _STOP_SIGNALS}
        self._process = subprocess.Popen(
            self.command(), stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            # Its own session: the terminal's Ctrl-C reaches rpra alone, which stops the server in
            # order, and stop() can signal the server's whole process group.
            start_new_session=True, preexec_fn=_parent_death_signal(),
        )  # fmt: skip

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            code = self._process.poll()
            if code is not None:
                raise RemoteError(
                    f"The stand-in server for {self.model_path} exited with code {code} before it was ready. "
                    f"Its log ({self.log_path}) ends with:\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/models", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise RemoteError(
                    f"The stand-in server at {self.url} was not ready after {timeout:g} s. "
                    f"Its log ({self.log_path}) ends with:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the server wrote, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return "(log unreadable)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty)"

    def stop(self, grace: float = 5.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after ``grace`` seconds). Idempotent."""
        # First put the old handlers back: a second SIGTERM while we wait must not abort the
        # wait half-way (it now ends rpra at once, and the parent-death signal ends the server).
        handlers, self._handlers = self._handlers, {}
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        process, self._process = self._process, None
        if process is not None:
            _end(process, grace, group=True)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._own_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path, self._own_log = None, False

    def wait(self) -> int:
        """Block until the server exits (the foreground `rpra serve-remote`); its exit code."""
        if self._process is None:
            raise RuntimeError("the server is not running")
        return self._process.wait()

    def __enter__(self) -> RemoteServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_with_server(server: RemoteServer, command: list[str]) -> int:
    """Start ``server``, run ``command`` with RPRA_REMOTE_URL / RPRA_REMOTE_MODEL pointing at it,
    stop both whatever happens, and return the command's exit code (128 + the signal number when
    a signal stopped it: 130 on Ctrl-C, 143 on SIGTERM)."""
    if not command:
        raise ConfigError("No command given: use `rpra serve-remote -- CMD [ARGS...]`.")
    server.start()
    try:
        env = {**os.environ, "RPRA_REMOTE_URL": server.url, "RPRA_REMOTE_MODEL": server.model_alias}
        try:
            child = subprocess.Popen(command, env=env)
        except OSError as exc:
            raise ConfigError(f"Cannot run {command[0]!r}: {exc.strerror or exc}.") from None
        try:
            return child.wait()
        except Stopped as stop:  # sent to rpra alone: pass it on
            _end(child, 5.0, stop.signum)
            return 128 + stop.signum
        except KeyboardInterrupt:
            # The terminal sent SIGINT to the child as well: give it a moment to exit on its own.
            try:
                child.wait(5.0)
            except subprocess.TimeoutExpired:
                pass  # stopped below
            return 128 + signal.SIGINT
        finally:
            _end(child, 5.0)  # any other way out (an exception, a second signal) stops it too
    finally:
        server.stop()
