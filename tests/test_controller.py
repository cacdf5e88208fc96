import pytest

from rpra.controller import Controller
from rpra.prediction import Prediction


def point(score: int, scale: int = 10, pass_mark: int = 7) -> Prediction:
    """A prediction certain of one score."""
    return Prediction(tuple(1.0 if i + 1 == score else 0.0 for i in range(scale)), pass_mark)


def test_defers_below_threshold_on_expected_score():
    d = Controller(threshold=5.0).decide(point(3))
    assert d.route == "remote"
    assert d.score == 3.0 and d.threshold == 5.0 and d.mode == "auto"
    assert d.reason == "predicted 3.0/10 < 5.0/10"


def test_answers_locally_at_or_above_threshold():
    assert Controller(threshold=5.0).decide(point(5)).route == "local"
    assert Controller(threshold=5.0).decide(point(9)).route == "local"


def test_routes_on_p_pass_when_configured():
    # Half the mass on 10, half on 1: expected 5.5 would pass a 5.0 threshold, P(pass) 0.5 fails 0.6.
    split = Prediction((0.5,) + (0.0,) * 8 + (0.5,), pass_mark=7)
    assert Controller(threshold=5.0, route_on="expected").decide(split).route == "local"
    d = Controller(threshold=0.6, route_on="p_pass").decide(split)
    assert d.route == "remote" and d.reason == "predicted P(pass) 0.50 < P(pass) 0.60"


def test_local_only_ignores_a_low_prediction_but_reports_it():
    d = Controller(threshold=5.0, mode="local-only").decide(point(1))
    assert d.route == "local" and "local-only" in d.reason and d.score == 1.0


def test_remote_only_needs_no_prediction():
    c = Controller(mode="remote-only")
    assert not c.needs_prediction()
    d = c.decide(None)
    assert d.route == "remote" and d.reason == "mode remote-only" and d.score is None


def test_per_request_mode_overrides_the_default():
    c = Controller(threshold=5.0, mode="auto")
    assert c.decide(point(1), mode="local-only").route == "local"
    assert c.decide(None, mode="remote-only").route == "remote"
    assert c.decide(point(1)).route == "remote"


def test_auto_without_prediction_is_a_programming_error():
    with pytest.raises(ValueError):
        Controller().decide(None)


def test_routes_on_the_advantage_over_the_remote_when_the_prediction_has_one():
    from rpra.errors import ConfigError

    with_remote = Prediction(point(8).probs, pass_mark=7, predictor="probe", p_remote=0.9)  # P(pass) 1, the remote's 0.9
    assert with_remote.advantage == pytest.approx(0.1) and with_remote.to_dict()["p_remote"] == 0.9
    d = Controller(threshold=0.2, route_on="advantage").decide(with_remote)
    assert d.route == "remote" and d.reason == "predicted advantage +0.10 < advantage +0.20"
    assert Controller(threshold=0.0, route_on="advantage").decide(with_remote).route == "local"
    with pytest.raises(ConfigError, match="zero-shot predictor gives none"):
        Controller(threshold=0.0, route_on="advantage").decide(point(8))
    with pytest.raises(ValueError, match="p_remote must be a probability"):
        Prediction(point(8).probs, pass_mark=7, p_remote=1.5)
