"""`rpra chat` on a real terminal (a pseudo-terminal): Ctrl-C, line editing and history; and
`rpra --version`."""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import os
import pty
import re
import select
import signal
import struct
import termios
import time

import pytest

from rpra import __version__

UP = "\x1b[A"
CTRL_C = "\x03"
_ESCAPES = re.compile(r"\x1b(?:\[[0-9;?]*[A-Za-z]|[()][0-9A-Za-z]|[=>])")  # colours, cursor, keypad modes


class Terminal:
    """A command on a pseudo-terminal, as a user at a keyboard runs it: keys go in, the screen's
    text (escape sequences removed) comes out."""

    def __init__(self, argv: list[str], env: dict):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal, so Ctrl-C is SIGINT
            try:
                # A user's shell delivers SIGINT; a test run started in the background (nohup, `&`)
                # would pass on an ignored one, and a Ctrl-C test would test nothing.
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
        self.screen = ""
        self._seen = 0  # expect() looks after what the previous expect() matched

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def expect(self, text: str, timeout: float = 120) -> str:
        """Wait until ``text`` appears; return what came before it (since the last match)."""
        deadline = time.monotonic() + timeout
        while (at := self.screen.find(text, self._seen)) < 0:
            if not self._read(deadline - time.monotonic()):
                raise AssertionError(
                    f"{text!r} did not appear (the command ended, or {timeout} s passed); the screen ends:\n{self.screen[-2000:]}"
                )
        before, self._seen = self.screen[self._seen : at], at + len(text)
        return before

    def expect_output(self, timeout: float = 120) -> None:
        """Wait until some text other than blanks appears after the last match."""
        deadline = time.monotonic() + timeout
        while not self.screen[self._seen :].strip():
            if not self._read(deadline - time.monotonic()):
                raise AssertionError(
                    f"nothing appeared (the command ended, or {timeout} s passed); the screen ends:\n{self.screen[-2000:]}"
                )

    def wait(self, timeout: float = 60) -> int:
        """The command's exit status once it ends."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.pid = 0
                return os.waitstatus_to_exitcode(status)
            self._read(0.1)
        raise AssertionError(f"the command did not end within {timeout} s; the screen ends:\n{self.screen[-2000:]}")

    def close(self) -> None:
        if self.pid:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)

    def _read(self, timeout: float) -> bool:
        if timeout <= 0 or not select.select([self.fd], [], [], timeout)[0]:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the command has ended and closed the terminal
            return False
        self.screen += _ESCAPES.sub("", data.decode("utf-8", errors="replace")).replace("\r", "")
        return bool(data)


@pytest.fixture
def terminal(rpra_bin):
    """``terminal(env, "chat")`` runs ``rpra chat`` on a pseudo-terminal; it is killed at the end."""
    opened: list[Terminal] = []

    def start(env: dict, *args: str) -> Terminal:
        opened.append(Terminal([rpra_bin, *args], {**env, "TERM": "xterm"}))
        return opened[-1]

    yield start
    for term in opened:
        term.close()


def _logged_turns(rpra, env) -> list[dict]:
    return list(reversed(json.loads(rpra("logs", "--json", env=env).stdout)))  # oldest first


@pytest.mark.slow
def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(terminal, rpra, env):
    env |= {"RPRA_MAX_TOKENS": "300", "RPRA_MODE": "local-only"}
    term = terminal(env, "chat")
    term.expect(">>> ")
    term.send("Write a long story about a dragon who learns to fly.\r")
    term.expect("fly.\n")  # the line as typed
    term.expect_output()  # the answer has begun
    term.send(CTRL_C)
    term.expect("[interrupted]")
    term.expect(">>> ")
    term.send("What is the capital of France?\r")
    assert "[local · " in term.expect(">>> ")
    term.send("/quit\r")
    assert term.wait() == 0

    first, second = _logged_turns(rpra, env)
    assert first["prompt"].startswith("Write a long story") and (first["status"], first["error"]) == ("error", "interrupted")
    assert second["prompt"] == "What is the capital of France?" and second["status"] == "done" and second["answer"]
    # the interrupted exchange is not part of the conversation the second turn continues
    assert [m["content"] for m in second["messages_json"]] == ["What is the capital of France?"]
    assert first["conversation_id"] == second["conversation_id"]


@pytest.mark.slow
def test_ctrl_c_at_the_prompt_hints_and_a_second_one_leaves(terminal, env):
    term = terminal(env, "chat")
    term.expect(">>> ")
    term.send(CTRL_C)
    term.expect("Ctrl-C again or /quit to leave")
    term.expect(">>> ")
    term.send(CTRL_C)
    assert term.wait() == 0


@pytest.mark.slow
def test_up_arrow_recalls_a_line_from_an_earlier_chat(terminal, rpra, env, isolated_home):
    env |= {"RPRA_MODE": "local-only"}
    term = terminal(env, "chat")
    term.expect(">>> ")
    term.send("Name a color.\r")
    term.expect("[local · ")
    term.expect(">>> ")
    term.send("/quit\r")
    assert term.wait() == 0
    assert (isolated_home / "chat_history").read_text().splitlines()[-2:] == ["Name a color.", "/quit"]

    term = terminal(env, "chat")  # a new chat reads the history: Up twice passes /quit
    term.expect(">>> ")
    term.send(UP + UP + "\r")
    term.expect("[local · ")
    term.expect(">>> ")
    term.send("/quit\r")
    assert term.wait() == 0
    assert [t["prompt"] for t in _logged_turns(rpra, env)] == ["Name a color.", "Name a color."]


def test_version_prints_the_installed_version(rpra):
    run = rpra("--version")
    assert run.returncode == 0
    assert run.stdout == f"rpra {importlib.metadata.version('rpra')}\n"  # pyproject.toml's, as installed
    assert __version__ == importlib.metadata.version("rpra")  # the package says the same
