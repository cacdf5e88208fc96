import pytest

from rpra.config import DEFAULT_MODEL, load_settings, parse_assignments
from rpra.errors import ConfigError


def write(path, text):
    path.write_text(text)
    return path


def test_defaults_when_nothing_is_set(isolated_home):
    s = load_settings()
    assert s.model == DEFAULT_MODEL == "qwen2.5-coder-0.5b-instruct" and s.mode == "auto" and s.threshold == 5.0
    assert set(s.sources.values()) == {"default"}


def test_flag_beats_env_beats_file(tmp_path, monkeypatch):
    cfg = write(tmp_path / "c.toml", 'threshold = 4.0\nmode = "local-only"\nmax_tokens = 100\n')
    monkeypatch.setenv("RPRA_THRESHOLD", "6.5")
    monkeypatch.setenv("RPRA_MODE", "remote-only")
    s = load_settings(cfg, {"threshold": "7", "mode": None})
    assert s.threshold == 7.0 and s.sources["threshold"] == "flag"
    assert s.mode == "remote-only" and s.sources["mode"] == "env RPRA_MODE"  # a None flag is "not given"
    assert s.max_tokens == 100 and s.sources["max_tokens"] == f"file {cfg}"


def test_default_config_file_lives_in_rpra_home(isolated_home):
    isolated_home.mkdir(parents=True)
    write(isolated_home / "config.toml", "n_ctx = 4096\n")
    s = load_settings()
    assert s.n_ctx == 4096 and s.sources["n_ctx"].startswith("file ")


def test_env_values_are_typed(monkeypatch):
    monkeypatch.setenv("RPRA_SEND_REASONING", "yes")
    monkeypatch.setenv("RPRA_N_THREADS", "none")
    monkeypatch.setenv("RPRA_REMOTE_RETRIES", "5")
    s = load_settings()
    assert s.send_reasoning is True and s.n_threads is None and s.remote_retries == 5


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"threshold": "high"}, "threshold must be of type float"),
        ({"mode": "sometimes"}, "mode must be one of auto, local-only, remote-only"),
        ({"route_on": "p_pass", "threshold": "5"}, "a probability in [0, 1]"),
        ({"route_on": "advantage", "threshold": "2"}, "a difference of probabilities in [-1, 1]"),
        ({"pass_mark": "11"}, "pass_mark must lie on the scale 1..10"),
        ({"max_tokens": "1.5"}, "max_tokens must be of type int"),
        ({"colour": "blue"}, "Unknown setting 'colour'"),
    ],
)
def test_bad_values_get_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        load_settings(None, overrides)


def test_bad_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path / "bad.toml", "threshold = = 3"))
    with pytest.raises(ConfigError, match="Unknown setting 'tresh'"):
        load_settings(write(tmp_path / "typo.toml", "tresh = 3"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")


def test_set_flags_parse_key_value_pairs():
    assert parse_assignments(["threshold=6", "remote-url=http://x/v1"]) == {"threshold": "6", "remote_url": "http://x/v1"}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_assignments(["threshold"])


def test_write_settings_updates_one_key_and_keeps_the_rest(tmp_path):
    from rpra.config import write_settings

    cfg = tmp_path / "c.toml"
    cfg.write_text('mode = "local-only"\nmax_tokens = 99\n')
    write_settings(cfg, {"threshold": 4.25, "remote_url": 'http://x/"v1"', "send_reasoning": True})
    s = load_settings(cfg)
    assert (s.threshold, s.mode, s.max_tokens, s.remote_url, s.send_reasoning) == (4.25, "local-only", 99, 'http://x/"v1"', True)
    with pytest.raises(ConfigError):
        write_settings(cfg, {"threshold": "high"})
    assert load_settings(cfg).threshold == 4.25  # a bad value leaves the file as it was


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"temperature": "-1"}, "temperature must be in [0, 2]"),
        ({"temperature": "2.5"}, "temperature must be in [0, 2]"),
        ({"repeat_penalty": "0"}, "repeat_penalty must be positive"),
        ({"remote_timeout": "0"}, "remote_timeout must be positive"),
        ({"n_threads": "0"}, "n_threads must be at least 1"),
        ({"threshold": "-1"}, "threshold must be in [0, 11]"),
        ({"threshold": "12"}, "threshold must be in [0, 11]"),
        ({"remote_retries": "-1"}, "remote_retries cannot be negative"),
    ],
)
def test_out_of_range_values_are_refused_wherever_they_come_from(overrides, message, monkeypatch):
    pattern = message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")
    with pytest.raises(ConfigError, match=pattern):
        load_settings(None, overrides)  # a flag or --set
    for name, value in overrides.items():
        monkeypatch.setenv(f"RPRA_{name.upper()}", value)
    with pytest.raises(ConfigError, match=pattern):
        load_settings()  # an environment variable


def test_the_edges_of_the_ranges_are_allowed():
    s = load_settings(None, {"temperature": "0", "threshold": "11", "n_threads": "1"})
    assert (s.temperature, s.threshold, s.n_threads) == (0.0, 11.0, 1)
    assert load_settings(None, {"temperature": "2", "threshold": "0"}).temperature == 2.0


def test_the_secrets_are_marked_on_their_fields():
    from rpra.config import secret_names

    assert set(secret_names()) == {"remote_api_key", "server_api_key"}


@pytest.mark.parametrize(
    "name, value, shown",
    [
        ("server_api_key", "srv-secret", "***"),
        ("remote_api_key", "sk-secret", "***"),
        ("remote_api_key", None, None),  # unset stays visibly unset
        ("remote_url", "https://user:pa55@api.example.com/v1", "https://***@api.example.com/v1"),
        ("remote_url", "https://ghp_token@api.example.com/v1", "https://***@api.example.com/v1"),
        ("remote_url", "https://api.example.com/v1/a@b", "https://api.example.com/v1/a@b"),  # an @ in the path is no credential
        ("model", "https://u:p@host/m.gguf", "https://***@host/m.gguf"),
        ("threshold", 5.0, 5.0),
    ],
)
def test_masked_hides_secrets_and_credentials_in_urls(name, value, shown):
    from rpra.config import masked

    assert masked(name, value) == shown


def test_mask_text_hides_secret_values_and_url_credentials_in_a_message():
    from rpra.config import Settings, mask_text

    s = Settings(remote_url="https://user:pa55@h/v1", remote_api_key="sk-secret", server_api_key="srv-secret")
    text = mask_text("sk-secret failed at https://user:pa55@h/v1 (key srv-secret)", s)
    assert "sk-secret" not in text and "pa55" not in text and "srv-secret" not in text
    assert "https://***@h/v1" in text
