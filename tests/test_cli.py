"""The `rpra` command as a user runs it: the installed console script, in a subprocess."""

from __future__ import annotations

import json
import os

import pytest

from rpra.store import LogStore

DEAD_REMOTE = "http://127.0.0.1:9/v1"  # nothing listens on the discard port


@pytest.mark.slow
def test_chat_through_a_pipe_streams_turns_with_verdicts_and_switches_modes(rpra, env, remote_server, isolated_home):
    env |= {"RPRA_REMOTE_URL": remote_server.url, "RPRA_REMOTE_MODEL": "stand-in", "RPRA_THRESHOLD": "0"}
    run = rpra("chat", env=env, stdin="What is the capital of France?\n/remote\nName a color.\n/local\nThanks!\n")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    verdicts = [line for line in lines if line.startswith("[")]
    assert len(verdicts) == 3
    assert verdicts[0].startswith("[local · predicted ") and ">= 0.0/10" in verdicts[0]
    assert verdicts[1].startswith("[remote · mode remote-only")
    assert verdicts[2].startswith("[local · mode local-only (predicted ")
    assert "> Name a color." in lines and "mode: remote-only" in lines
    turns = LogStore(isolated_home / "logs.db").turns()
    assert [t["route"] for t in reversed(turns)] == ["local", "remote", "local"]
    assert len({t["conversation_id"] for t in turns}) == 1 and all(t["status"] == "done" for t in turns)
    assert turns[1]["answered_by"] == "remote:stand-in"


@pytest.mark.slow
def test_chat_defers_a_low_prediction_and_says_why(rpra, env, remote_server):
    env |= {"RPRA_REMOTE_URL": remote_server.url, "RPRA_REMOTE_MODEL": "stand-in"}
    run = rpra("chat", "--threshold", "11", env=env, stdin="Prove the Riemann hypothesis.\n")
    (verdict,) = [line for line in run.stdout.splitlines() if line.startswith("[")]
    assert verdict.startswith("[deferred · predicted ") and "< 11.0/10" in verdict


@pytest.mark.slow
def test_ask_json_reports_distribution_decision_timings_and_tokens(rpra, env):
    run = rpra("ask", "What is 2 + 2?", "--json", "--mode", "local-only", env=env)
    assert run.returncode == 0, run.stderr
    turn = json.loads(run.stdout)
    assert set(turn["prediction"]["distribution"]) == {str(i) for i in range(1, 11)}
    assert sum(turn["prediction"]["distribution"].values()) == pytest.approx(1.0, abs=1e-4)
    assert turn["decision"]["route"] == "local" and turn["decision"]["mode"] == "local-only"
    assert turn["answered_by"] == "local" and turn["answer"]
    assert {"decision", "total", "local_answer"} <= set(turn["timings_ms"])
    assert turn["tokens"]["prompt"] > 0 and turn["tokens"]["local_answer"] > 0


@pytest.mark.slow
def test_ask_with_the_remote_down_prints_a_flagged_local_answer(rpra, env):
    env |= {"RPRA_REMOTE_URL": DEAD_REMOTE, "RPRA_REMOTE_RETRIES": "0"}
    run = rpra("ask", "Hello", "--threshold", "11", env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()  # the local answer
    assert "remote failed" in run.stderr and "local (remote failed" in run.stderr


@pytest.mark.slow
def test_logs_lists_and_searches_turns(rpra, env):
    rpra("ask", "What is the capital of Peru?", "--mode", "local-only", env=env)
    rpra("ask", "Name a bird.", "--mode", "local-only", env=env)
    every = json.loads(rpra("logs", "--json", env=env).stdout)
    assert [t["prompt"] for t in every] == ["Name a bird.", "What is the capital of Peru?"]
    found = json.loads(rpra("logs", "--query", "peru", "--json", env=env).stdout)
    assert [t["prompt"] for t in found] == ["What is the capital of Peru?"]
    table = rpra("logs", env=env).stdout
    assert "Name a bird." in table and "local" in table


@pytest.mark.slow
def test_serve_remote_runs_a_command_against_the_stand_in_and_stops(rpra, rpra_bin, env, model_path):
    run = rpra(
        "serve-remote", "--model", str(model_path), "--port", "0", "--n-ctx", "1024",
        "--", rpra_bin, "ask", "Hi", "--json", "--mode", "remote-only", env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    turn = json.loads(run.stdout)
    assert turn["answered_by"] == "remote" and turn["answer"]
    assert turn["sent_remote"] == [{"role": "user", "content": "Hi"}]


def test_config_show_reports_values_and_their_sources(rpra, tmp_path, isolated_home):
    cfg = tmp_path / "rpra.toml"
    cfg.write_text("threshold = 4.0\nmax_tokens = 99\n")
    env = {**os.environ, "RPRA_THRESHOLD": "6", "RPRA_REMOTE_API_KEY": "sk-secret"}
    run = rpra("config", "show", "--json", "--config", str(cfg), "--set", "mode=local-only", env=env)
    rows = {r["name"]: r for r in json.loads(run.stdout)["settings"]}
    assert rows["threshold"]["value"] == 6.0 and rows["threshold"]["source"] == "env RPRA_THRESHOLD"
    assert rows["max_tokens"]["value"] == 99 and rows["max_tokens"]["source"] == f"file {cfg}"
    assert rows["mode"]["value"] == "local-only" and rows["mode"]["source"] == "flag"
    assert rows["remote_api_key"]["value"] == "***" and "sk-secret" not in run.stdout


def test_logs_requests_lists_what_the_server_logged(rpra, isolated_home):
    with LogStore(isolated_home / "logs.db") as store:
        store.log_request(client="127.0.0.1", method="POST", path="/v1/chat/completions", status=200, mode="auto", duration_ms=812.0)
        store.log_request(client="10.0.0.7", method="POST", path="/v1/chat/completions", status=429, error="busy")
    rows = json.loads(rpra("logs", "--requests", "--json", env=dict(os.environ)).stdout)
    assert [(r["status"], r["client"]) for r in rows] == [(429, "10.0.0.7"), (200, "127.0.0.1")]
    table = rpra("logs", "--requests", env=dict(os.environ)).stdout
    assert "busy" in table and "812" in table


def test_a_profile_is_taken_from_the_flag_and_shows_as_the_source(rpra, isolated_home):
    unknown = rpra("ask", "--profile", "no-such-board", "hi", env=dict(os.environ))
    assert unknown.returncode == 1 and "No device profile 'no-such-board'" in unknown.stderr and "arm-board-4gb" in unknown.stderr
    shown = rpra("config", "show", "--json", "--set", "profile=arm-board-4gb", "--set", "n_ctx=777", env=dict(os.environ))
    rows = {r["name"]: r for r in json.loads(shown.stdout)["settings"]}
    assert (rows["n_threads"]["value"], rows["n_threads"]["source"]) == (4, "profile arm-board-4gb")
    assert (rows["n_ctx"]["value"], rows["n_ctx"]["source"]) == (777, "flag")  # the user beats the profile


def test_errors_are_one_clear_line_not_a_traceback(rpra, isolated_home):
    run = rpra("models", "path", "smollm2-135m-instruct", env=dict(os.environ))
    assert run.returncode == 1
    assert run.stderr.startswith("error:") and "rpra models pull smollm2-135m-instruct" in run.stderr
    assert "Traceback" not in run.stderr


def test_help_explains_the_commands(rpra):
    run = rpra("--help", env=dict(os.environ))
    for command in ("ask", "chat", "models", "serve-remote", "serve", "doctor", "logs", "config"):
        assert command in run.stdout
    chat_help = rpra("chat", "--help", env=dict(os.environ)).stdout
    assert "verdict" in chat_help and "--threshold" in chat_help and "--set" in chat_help


def test_models_list_shows_the_registry_and_what_is_downloaded(rpra, isolated_home):
    rows = json.loads(rpra("models", "list", "--json", env=dict(os.environ)).stdout)
    by_name = {r["name"]: r for r in rows}
    assert {"smollm2-135m-instruct", "qwen2.5-coder-1.5b-instruct"} <= set(by_name)
    assert not by_name["smollm2-135m-instruct"]["present"]  # a fresh RPRA_HOME has nothing yet


@pytest.mark.slow
def test_ask_remote_only_with_a_failing_remote_answers_locally_and_flags_it(rpra, env):
    # The same rule as the chat's /remote and the server's rpra-remote: a local answer, flagged.
    env |= {"RPRA_REMOTE_URL": DEAD_REMOTE, "RPRA_REMOTE_RETRIES": "0"}
    run = rpra("ask", "Name a color.", "--mode", "remote-only", "--json", env=env)
    assert run.returncode == 0, run.stderr
    turn = json.loads(run.stdout)
    assert turn["answered_by"] == "local" and turn["fallback"] and turn["answer"] and turn["remote_error"]


def test_the_suite_option_names_every_suite_the_data_module_serves():
    from rpra.benchmarks.data import SUITES
    from rpra.cli.measure import SUITE_NAMES

    assert SUITE_NAMES == SUITES
