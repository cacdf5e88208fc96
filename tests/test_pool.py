"""The pool: its file, the rule that picks a target, the shared-feature heads, and the benchmark's policies."""

from __future__ import annotations

import numpy as np
import pytest

from rpra.errors import ConfigError
from rpra.pool import Pool, PoolHeads, Target, load_pool, pick

POOL = """
rule = "tolerance"
tolerance = 0.05
budget_day = 1.5

[[target]]
name = "device"

[[target]]
name = "big"
url = "http://127.0.0.1:9/v1"
price_in = 1.0
price_out = 3.0
latency_s = 12
records = "m:remote"
"""


def test_a_pool_file_describes_its_targets_and_rule(tmp_path):
    path = tmp_path / "pool.toml"
    path.write_text(POOL)
    pool = load_pool(path)
    assert pool.names == ["device", "big"] and pool.budget_day == 1.5 and pool.target("device").is_device
    assert pool.target("big").cost(1_000_000, 1_000_000) == pytest.approx(4.0)


@pytest.mark.parametrize("text, message", [
    ("[[target]]\nname = 'a'\nprice = 1\n", "unknown key"),
    ("[[target]]\nname = 'a'\n[[target]]\nname = 'a'\nurl = 'http://x'\n", "must differ"),
    ("[[target]]\nname = 'a'\n[[target]]\nname = 'b'\n", "At most one target is the device"),
    ("[[target]]\nname = 'a'\nurl = 'ftp://x'\n", "http"),
    ("[[target]]\nname = 'a'\nprice_in = -1\n", ">= 0"),
    ("rule = 'cheapest'\n[[target]]\nname = 'a'\n", "Unknown pool rule"),
    ("budget = 3\n[[target]]\nname = 'a'\n", "unknown key"),
    ("", "at least one"),
    ("[[target]\n", "not valid TOML"),
])  # fmt: skip
def test_a_bad_pool_file_gets_a_clear_error(tmp_path, text, message):
    path = tmp_path / "pool.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_pool(path)
    with pytest.raises(ConfigError, match="No pool file"):
        load_pool(tmp_path / "absent.toml")


def test_the_rules_pick_the_cheapest_near_the_best_or_the_best_net_reward():
    pool = Pool((Target("device"), Target("mid", url="http://m"), Target("big", url="http://b")), tolerance=0.05)
    rewards, costs = {"device": 0.50, "mid": 0.72, "big": 0.75}, {"device": 0.0, "mid": 1.0, "big": 5.0}
    assert pick(pool, rewards, costs) == "mid"  # within 0.05 of the best, and cheaper
    assert pick(Pool(pool.targets, tolerance=0.0), rewards, costs) == "big"
    assert pick(Pool(pool.targets, tolerance=0.3), rewards, costs) == "device"
    assert pick(Pool(pool.targets, rule="net", cost_weight=0.0), rewards, costs) == "big"
    assert pick(Pool(pool.targets, rule="net", cost_weight=0.01), rewards, costs) == "mid"  # 0.71 > 0.70 > 0.50
    assert pick(Pool(pool.targets, rule="net", cost_weight=1.0), rewards, costs) == "device"
    # The budget leaves out what it cannot pay for; the cheapest stays when nothing is affordable.
    assert pick(Pool(pool.targets, tolerance=0.0), rewards, costs, spendable=2.0) == "mid"
    assert pick(pool, {"mid": 0.9, "big": 0.9}, {"mid": 1.0, "big": 5.0}, spendable=0.5) == "mid"


def test_a_head_fitted_on_its_own_scale_gives_the_same_logit_on_the_shared_one(tmp_path):
    rng = np.random.default_rng(0)
    width = 6
    base = PoolHeads([], rng.normal(size=width), rng.uniform(0.5, 2, width), np.zeros((0, width)), np.zeros(0), layer=3)
    own_mean, own_std, w, b = rng.normal(size=width), rng.uniform(0.5, 2, width), rng.normal(size=width), 0.3
    heads = base.with_head("a", own_mean, own_std, w, b).with_head("b", own_mean, own_std, -w, -b)
    for _ in range(5):
        h = rng.normal(size=width) * 2
        p = 1 / (1 + np.exp(-(w @ ((h - own_mean) / own_std) + b)))
        assert heads.rewards(h)["a"] == pytest.approx(p) and heads.rewards(h)["b"] == pytest.approx(1 - p)
    refit = heads.with_head("a", own_mean, own_std, 2 * w, b)  # a head refitted replaces the old one
    assert refit.names == ["b", "a"]
    path = heads.save(tmp_path / "m.pool.npz")
    again = PoolHeads.load(path)
    assert again.names == ["a", "b"] and again.layer == 3 and again.rewards(h) == pytest.approx(heads.rewards(h))
    (tmp_path / "bad.npz").write_bytes(b"not a file")
    with pytest.raises(ConfigError, match="not a pool heads file"):
        PoolHeads.load(tmp_path / "bad.npz")


def test_pool_routing_on_heads_that_know_the_targets_closes_the_gap_to_the_oracle():
    from rpra.benchmarks.pool import evaluate

    # 90 items: the device is right on the first 30, the mid target on the first 60 and 5 more, the
    # big one on the first 80. Perfect heads: routing reaches the oracle at a fraction of the cost.
    pool = Pool((Target("device"), Target("mid", url="http://m", price_in=1.0), Target("big", url="http://b", price_in=10.0)), tolerance=0.05)
    items, rewards = [], []
    for i in range(90):
        right = {"device": i < 30, "mid": i < 60 or 80 <= i < 85, "big": i < 80}
        items.append({"id": str(i), "targets": {n: {"right": r, "tokens_out": 0} for n, r in right.items()}})
        rewards.append({n: 0.95 if r else 0.05 for n, r in right.items()})
    result = evaluate(items, pool, rewards, [1_000_000] * 90)
    assert result["best_single"] == "big" and result["dearest"] == "big"
    assert result["oracle"]["quality"] == pytest.approx(85 / 90)
    assert result["configured"]["quality"] == pytest.approx(85 / 90) and result["configured"]["gap_closed"] == pytest.approx(1.0)
    assert result["configured"]["cost"] == pytest.approx((35 * 1.0 + 20 * 10.0) / 90)  # the big one only where it alone is right
    assert result["configured"]["shares"]["device"] == pytest.approx(35 / 90)  # the last 5: every target wrong, the cheapest
    saved = result["summary"]["pool: tolerance"]["at_equal_quality"]["saved"]
    assert saved == pytest.approx(1 - ((35 * 1.0 + 20 * 10.0) / 90) / 10.0)
    assert result["summary"]["two-model threshold (device head)"]["best_point"]["gap_closed"] == pytest.approx(0.0)


def test_budget_left_is_the_tighter_of_the_day_and_the_month():
    from datetime import datetime, timezone

    from rpra.pool import budget_left, period_starts

    pool = Pool((Target("device"),), budget_day=1.0, budget_month=10.0)
    assert budget_left(pool, spent_day=0.25, spent_month=2.0) == pytest.approx(0.75)
    assert budget_left(pool, spent_day=0.25, spent_month=9.5) == pytest.approx(0.5)
    assert budget_left(pool, spent_day=3.0, spent_month=3.0) == 0.0
    assert budget_left(Pool((Target("device"),)), spent_day=5.0, spent_month=5.0) is None
    day, month = period_starts(datetime(2026, 12, 2, 17, 5, tzinfo=timezone.utc))
    assert day == "2026-12-02T00:00:00.000+00:00" and month == "2026-12-01T00:00:00.000+00:00"


@pytest.mark.slow
def test_a_turn_over_the_pool_goes_to_the_chosen_target_and_its_cost_counts_against_the_budget(greedy_settings, model_path,
                                                                                              remote_server, tmp_path):  # fmt: skip
    """The real SmolLM2 as the device and its encoder, a real OpenAI-compatible remote on 127.0.0.1:
    heads that expect the remote to be right send the turn there; the turn's cost is logged, and
    once it has used the day's budget the next turn stays on the device."""
    from rpra.local import LocalModel
    from rpra.remote import RemoteModel
    from rpra.runtime import Runtime
    from rpra.store import LogStore

    layer = 10
    local = LocalModel(model_path, n_ctx=1024, n_threads=2, capture_layers=[layer])
    n = local.n_embd
    remote = RemoteModel(remote_server.url, model="stand-in")
    pool = Pool((Target("device"), Target("big", url=remote_server.url, price_out=2_000.0)), tolerance=0.05, budget_day=0.01)
    heads = PoolHeads(["device", "big"], np.zeros(n), np.ones(n), np.zeros((2, n)), np.array([-1.5, 2.0]), layer,
                      {"encoder_sha256": None, "targets": {"big": {"tokens_out_mean": 4.0}}})  # fmt: skip
    store = LogStore(tmp_path / "logs.db")
    question = [{"role": "user", "content": "What is the capital of France?"}]
    try:
        runtime = Runtime(greedy_settings(route_on="p_pass", threshold=0.5, max_tokens=8, log=True), local=local, store=store,
                          pool=pool, pool_heads=heads, pool_remotes={"big": remote})  # fmt: skip
        first = runtime.ask(question)
        assert first.pool["target"] == "big" and first.answered_by == "remote" and first.decision.route == "remote"
        assert first.pool["rewards"]["big"] == pytest.approx(1 / (1 + np.exp(-2.0)), abs=1e-4)
        assert first.pool["expected_cost"]["big"] == pytest.approx(4.0 * 2_000.0 / 1e6)  # within the budget: 0.008 <= 0.01
        assert first.pool["cost"] == pytest.approx(first.tokens["remote_completion"] * 2_000.0 / 1e6) and first.pool["cost"] > 0
        assert store.get_turn(first.turn_id)["target"] == "big" and store.get_turn(first.turn_id)["cost"] == pytest.approx(first.pool["cost"])
        assert runtime.budget_left() == pytest.approx(max(0.0, 0.01 - first.pool["cost"]))
        second = runtime.ask(question)  # the day's budget no longer pays for the remote: the device answers
        assert second.pool["target"] == "device" and second.answered_by == "local" and second.pool["budget_left"] < 0.008
        assert "pool (within 0.05 of the best, the cheapest): device" in second.decision.reason
        with pytest.raises(ConfigError, match="reward head each"):
            Runtime(greedy_settings(), local=local, pool=pool, pool_heads=PoolHeads(["device"], heads.mean, heads.std, heads.weights[:1],
                                                                                     heads.biases[:1], layer), pool_remotes={"big": remote})  # fmt: skip
    finally:
        local.close()
        store.close()


def test_the_pools_settings_are_chosen_on_train_items_with_out_of_fold_heads(isolated_home, model_path):
    """Train records where the device is right when the slot state's first value is positive and
    the dear target nearly always: the setting chosen is the cheapest that reaches the dear
    target's quality on those items, and it sends the items the device gets right to the device."""
    from rpra.benchmarks.pool import calibrated_setting, evaluate, prompt_tokens
    from rpra.training.pool import target_records

    encoder = str(model_path)
    records, features = _train_records(isolated_home, model_path, np.random.default_rng(0).normal(size=(80, 4)),
                                       lambda i, state: {"exact_local": float(state[0] > 0), "exact_remote": float(i % 10 != 0),
                                                         "local_tokens": 5, "remote_tokens": 5})  # fmt: skip
    pool = Pool((Target("device"), Target("big", url="http://127.0.0.1:9/v1", price_in=1.0, price_out=1.0, records=f"{encoder}:remote")))
    heads = PoolHeads(["device", "big"], np.zeros(4), np.ones(4), np.zeros((2, 4)), np.zeros(2), layer=0,
                      meta={"targets": {"device": {"c": 1.0}, "big": {"c": 1.0}}})  # fmt: skip
    cal = calibrated_setting(pool, encoder, heads)
    assert cal["items"] == 80 and cal["dearest_quality"] == pytest.approx(0.9)
    assert set(cal["chosen"]) == {"tolerance", "net"}
    # What the chosen net weight gets on those items: the dear target's quality, for less than its cost.
    from rpra.training.probe import out_of_fold_p_pass

    rs = {t.name: target_records(t, encoder) for t in pool.targets}
    x = np.stack([np.load(features / f"arithmetic_{i}.npz")["slot"][0] for i in range(80)])
    oof = {n: out_of_fold_p_pass(x, np.array([r["right"] for r in rs[n]], int), c=1.0) for n in pool.names}
    items = [{"id": r["id"], "targets": {n: {"right": rs[n][i]["right"], "tokens_out": 5} for n in pool.names}} for i, r in enumerate(rs["device"])]
    rewards = [{n: float(oof[n][i]) for n in pool.names} for i in range(80)]
    result = evaluate(items, Pool(pool.targets, rule="net", cost_weight=cal["chosen"]["net"]), rewards, prompt_tokens(encoder, [r["prompt"] for r in records]))
    assert result["configured"]["quality"] >= 0.9 - 1e-9 and result["configured"]["shares"]["device"] > 0.2


@pytest.mark.slow
def test_rpra_ask_routes_over_a_pool_file_as_a_user_runs_it(rpra, model_path, isolated_home, tmp_path, remote_server):
    """`rpra ask --json --set pool=FILE`: the pool file and heads are read, the remote target's
    client made from the file, and the JSON shows the choice; under never-defer the pool keeps its
    device target only."""
    import json
    import os

    from rpra.local import LocalModel

    width = LocalModel(model_path, n_ctx=64, n_threads=1).n_embd
    heads = PoolHeads(["device", "big"], np.zeros(width), np.ones(width), np.zeros((2, width)), np.array([-2.0, 2.0]), 10,
                      {"targets": {"big": {"tokens_out_mean": 6.0}}})  # fmt: skip
    heads_path = heads.save(tmp_path / "heads.pool.npz")
    pool_file = tmp_path / "pool.toml"
    pool_file.write_text(f'[[target]]\nname = "device"\n\n[[target]]\nname = "big"\nurl = "{remote_server.url}"\nmodel = "stand-in"\n'
                         'price_out = 1.0\n')  # fmt: skip
    env = {**os.environ, "RPRA_MODEL": str(model_path), "RPRA_N_CTX": "1024", "RPRA_N_THREADS": "2", "RPRA_MAX_TOKENS": "8"}
    asked = rpra("ask", "What is the capital of France?", "--json", "--set", f"pool={pool_file}", "--set", f"pool_heads={heads_path}", env=env)
    assert asked.returncode == 0, asked.stderr
    answer = json.loads(asked.stdout)
    assert answer["pool"]["target"] == "big" and answer["answered_by"] == "remote" and answer["pool"]["cost"] > 0
    assert "pool (within 0.05 of the best, the cheapest): big" in answer["decision"]["reason"]
    offline = rpra("ask", "What is the capital of France?", "--json", "--set", f"pool={pool_file}", "--set", f"pool_heads={heads_path}",
                   "--set", "privacy=never-defer", env=env)  # fmt: skip
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout)["pool"]["target"] == "device" and json.loads(offline.stdout)["answered_by"] == "local"


def test_train_pool_fits_a_head_per_target_and_only_refits_the_one_asked(isolated_home, model_path):
    """`rpra train pool`'s fit on the feature cache: one head per target on its own records; with
    ``only`` one head is refitted and the others are kept as they were (adding a target)."""
    from rpra.config import Settings
    from rpra.training.pool import train_pool

    encoder = str(model_path)
    _train_records(isolated_home, model_path, np.random.default_rng(1).normal(size=(60, 3)),
                   lambda i, state: {"exact_local": float(state[0] > 0), "exact_remote": float(state[1] > 0),
                                     "local_tokens": 3, "remote_tokens": 7})  # fmt: skip
    pool = Pool((Target("device"), Target("big", url="http://127.0.0.1:9/v1", records=f"{encoder}:remote")))
    out = isolated_home / "m.pool.npz"
    path, report = train_pool(Settings(model=encoder), pool, output=out, layer=0, folds=3)
    heads = PoolHeads.load(path)
    assert heads.names == ["device", "big"] and report["device"]["records"] == 60 and report["big"]["tokens_out_mean"] == 7.0
    assert report["device"]["cv_auroc"] > 0.8 and report["big"]["cv_auroc"] > 0.8  # each head learns its own target
    up = heads.rewards(np.array([3.0, -3.0, 0.0]))
    assert up["device"] > 0.8 and up["big"] < 0.2
    device_weights = heads.weights[heads.names.index("device")].copy()
    _, again = train_pool(Settings(model=encoder), pool, output=out, only=["big"], layer=0, folds=3)
    refit = PoolHeads.load(out)
    assert list(again) == ["big"] and np.allclose(refit.weights[refit.names.index("device")], device_weights)
    with pytest.raises(ConfigError, match="another encoder or layer"):
        train_pool(Settings(model=encoder), pool, output=out, only=["big"], layer=1, folds=3)


def _train_records(home, model_path, states, rows) -> tuple[list[dict], Path]:
    """A train collection of arithmetic records (``rows(i, state)`` gives each one's fields) and
    the encoder's cached slot read of each (``states``: one row per record), in ``home``."""
    import json

    from rpra.benchmarks.collection import model_name
    from rpra.models import file_sha256

    folder = home / "collections" / f"{model_name(str(model_path))}--arithmetic--train"
    folder.mkdir(parents=True)
    features = home / "features" / file_sha256(model_path)[:16]
    features.mkdir(parents=True)
    records = []
    for i, state in enumerate(states):
        records.append({"id": f"arithmetic:{i}", "suite": "arithmetic", "prompt": f"What is {i} + 1?", **rows(i, state)})
        np.savez(features / f"arithmetic_{i}.npz", slot=state[None, :].astype(np.float32))
    folder.joinpath("records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records, features
