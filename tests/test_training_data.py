"""The SFT data is the runtime's own turn; the training config; the probe; adapters by name.

None of these need the training stack (torch): they run on the device runtime alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rpra import prompts
from rpra.adapters import list_adapters, resolve_adapter
from rpra.errors import ConfigError, RpraError
from rpra.predictors import ProbePredictor, ZeroShotPredictor
from rpra.probe import Probe
from rpra.runtime import Runtime
from rpra.training.config import SFTConfig, load_config
from rpra.training.data import IGNORE, build_examples, hold_out, target_score, turn_example
from rpra.training.probe import fit_logistic, fit_probe, slot_states, sweep_layer, with_remote_head

PROMPT = "What is the capital of France?"


def _context(local) -> list[int]:
    """The tokens llama.cpp holds for the last request."""
    return list(local._llm.input_ids[: local._llm.n_tokens])


@pytest.mark.slow
def test_pa_training_example_is_token_for_token_the_runtime_turn(greedy_settings, local_model):
    # Training sequences put the answer after the score (what the adapter learns is the score; the
    # answer is context, without loss), as the runtime's turn does with answer_after_score.
    settings = greedy_settings(protocol="pa", answer_after_score=True)
    result = Runtime(settings, local=local_model).ask([{"role": "user", "content": PROMPT}], mode="local-only")
    held = _context(local_model)
    system = ZeroShotPredictor().system_prompt("pa", settings.scale_max)
    example = turn_example(local_model, system, PROMPT, "pa", score=result.prediction.mode, answer=result.answer)
    # Up to the end of the slot the runtime writes every token itself: identical ids.
    upto = len(local_model.chat_tokens([{"role": "system", "content": system}, {"role": "user", "content": PROMPT}]))
    upto += sum(len(local_model.tokenize(t)) for t in (prompts.SLOT_OPEN["pa"], str(result.prediction.mode), prompts.SCORE_CLOSE))
    assert example["input_ids"][:upto] == held[:upto]
    # The answer was sampled token by token; retokenised, it is the same text.
    assert local_model.detokenize(example["input_ids"][upto:-1]).strip() == local_model.detokenize(held[upto:]).strip()
    # It is in the sequence, without loss (only the score is learned by default).
    assert len(example["input_ids"]) > upto + 1 and set(example["labels"][upto:]) == {IGNORE}


@pytest.mark.slow
def test_rpra_training_example_is_the_runtime_turn_as_text(greedy_settings, local_model):
    settings = greedy_settings(protocol="rpra", reason_tokens=24)
    result = Runtime(settings, local=local_model).ask([{"role": "user", "content": PROMPT}], mode="local-only")
    held = local_model.detokenize(_context(local_model))
    system = ZeroShotPredictor().system_prompt("rpra", settings.scale_max)
    example = turn_example(local_model, system, PROMPT, "rpra", score=result.prediction.mode, answer=result.answer,
                           reasoning=result.reasoning, reasoning_ended_line=result.tokens["reasoning"] < 24)  # fmt: skip
    text = local_model.detokenize(example["input_ids"][:-1])
    # The runtime's thought keeps its own spacing; compare up to the end of the slot, whitespace-normalised.
    cut = lambda s: " ".join(s[: s.index(prompts.SLOT_CLOSE) + 2].split())  # noqa: E731
    assert cut(text) == cut(held)
    assert "Thinking: " in text and f"Rating: [[{result.prediction.mode}]]" in text


@pytest.mark.slow
def test_labels_cover_only_the_score_unless_the_answer_is_asked_for(local_model):
    system = ZeroShotPredictor().system_prompt("pa", 10)
    only = turn_example(local_model, system, PROMPT, "pa", score=7, answer="Paris.")
    assert [t for t in only["labels"] if t != IGNORE] == local_model.tokenize("7")
    both = turn_example(local_model, system, PROMPT, "pa", score=10, answer="Paris.", loss_on="prediction+answer")
    learned = [t for t in both["labels"] if t != IGNORE]
    assert learned == local_model.tokenize("10") + local_model.tokenize("Paris.") + [local_model.end_of_turn]
    assert len(only["input_ids"]) == len(only["labels"])


def _record(i: int, score: float | None, **extra) -> dict:
    return {"id": f"t:{i}", "prompt": f"What is {i} + {i}?", "local_answer": str(2 * i), "judge_local": {"score": score},
            "exact_local": 1.0 if i % 2 else 0.0, "rpra_reasoning": "Adding.", "rpra_reasoning_tokens": 3, **extra}  # fmt: skip


@pytest.mark.slow
def test_build_examples_reports_what_it_leaves_out(local_model):
    records = [_record(1, 6.6), _record(2, None), _record(3, 2.2, prompt="long " * 900)]
    built = build_examples(records, local_model, protocols=["pa", "rpra"], system_prompt=lambda p: "Be brief.", loss_on="prediction",
                           target="llm", scale_max=10, reason_tokens=48, max_length=256)  # fmt: skip
    assert [(e["id"], e["protocol"], e["score"]) for e in built.examples] == [("t:1", "pa", 7), ("t:1", "rpra", 7)]
    assert built.skipped == {"no score": 1, "longer than max_length (256)": 2}


def test_target_scores():
    assert target_score({"label": {"pass": True}}, target="pass", scale_max=10) == 10
    assert target_score({"label": {"pass": False}}, target="pass", scale_max=10) == 1
    assert target_score({"label": {"pass": None}}, target="pass", scale_max=10) is None
    assert target_score(_record(1, 9.6), target="llm", scale_max=10) == 10
    assert target_score(_record(1, 0.2), target="llm", scale_max=10) == 1
    assert target_score(_record(1, None), target="llm", scale_max=10) is None
    assert target_score(_record(1, 3.0), target="exact", scale_max=10) == 10
    assert target_score(_record(2, 3.0), target="exact", scale_max=10) == 1


def test_hold_out_keeps_both_protocols_of_a_record_together():
    examples = [{"id": f"r{i}", "protocol": p} for i in range(20) for p in ("pa", "rpra")]
    train, held = hold_out(examples, 0.25, seed=0)
    assert len(held) == 10 and len(train) == 30
    assert not {e["id"] for e in train} & {e["id"] for e in held}
    assert hold_out(examples, 0.25, seed=0) == (train, held)


# --- config -----------------------------------------------------------------------------------


def test_config_flags_beat_the_yaml_file(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("name: mine\nlora_r: 8\nlearning_rate: 1.0e-3\nprotocols: pa\n")
    cfg = load_config(path, {"lora_r": 4, "epochs": None})
    assert (cfg.name, cfg.lora_r, cfg.learning_rate, cfg.protocol_list, cfg.epochs) == ("mine", 4, 1e-3, ["pa"], 3.0)


@pytest.mark.parametrize(
    "text, message",
    [
        ("lora_rank: 8\n", "Unknown training settings: lora_rank"),
        ("lora_r: many\n", "lora_r must be a int"),
        ("split: test\n", "Training on the test split"),
        ("protocols: pa,cot\n", "protocols must list pa and/or rpra"),
        ("batch_size: 6\nmicro_batch_size: 4\n", "must be a multiple"),
        ("- a list\n", "must be a mapping"),
        ("name: [unclosed\n", "not valid YAML"),
        ("export: maybe\n", "export must be true or false"),
    ],
)
def test_bad_training_configs_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "train.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, {})


def test_fingerprint_ignores_what_does_not_shape_the_weights():
    assert SFTConfig(name="a", threads=1).fingerprint() == SFTConfig(name="b", threads=2, export=False).fingerprint()
    assert SFTConfig(lora_r=8).fingerprint() != SFTConfig(lora_r=16).fingerprint()


def test_train_sft_help_lists_every_setting(tmp_path):
    from typer.testing import CliRunner

    from rpra.cli import app

    result = CliRunner().invoke(app, ["train", "sft", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for flag in ("--config", "--lora-r", "--learning-rate", "--loss-on", "--no-export", "--max-steps"):
        assert flag in result.output


# --- probe ------------------------------------------------------------------------------------


def test_probe_fit_recovers_a_linear_signal_and_finds_none_in_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 40))
    y = np.clip(5 + 1.5 * x[:, 0] - x[:, 1] + rng.normal(scale=0.5, size=120), 1, 10)
    probe, report = fit_probe(x, y, scale_max=10)
    assert report["cv_spearman"] > 0.8 and report["cv_rmse"] < 0.6 * report["mean_baseline_rmse"]
    _, noise = fit_probe(x, rng.permutation(y), scale_max=10)
    assert abs(noise["cv_spearman"]) < 0.3 and noise["cv_rmse"] > 0.9 * noise["mean_baseline_rmse"]


def test_probe_prediction_is_a_distribution_centred_on_its_score(tmp_path):
    probe = Probe(np.zeros(3), np.ones(3), np.array([1.0, 0.0, 0.0]), bias=5.0, sigma=0.8, scale_max=10)
    p = probe.prediction(np.array([1.5, 9.0, 9.0]), pass_mark=7)
    assert p.predictor == "probe" and abs(sum(p.probs) - 1) < 1e-9
    assert abs(p.expected - 6.5) < 0.05 and p.mode in (6, 7)
    assert probe.prediction(np.array([40.0, 0, 0]), pass_mark=7).probs[-1] > 0.99  # far off the scale: all at 10
    loaded = Probe.load(probe.save(tmp_path / "m.probe.npz"))
    assert loaded.prediction(np.array([1.5, 9.0, 9.0]), 7) == p


def test_probe_file_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="No probe at"):
        Probe.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="not a readable rpra probe"):
        Probe.load(tmp_path / "junk.npz")
    probe = Probe(np.zeros(3), np.ones(3), np.ones(3), 5.0, 1.0, 10)
    with pytest.raises(ConfigError, match="fitted on another model"):
        probe.score(np.zeros(4))


def test_logistic_probe_ranks_a_linear_signal_calibrated_and_finds_none_in_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 30))
    y = (x[:, 0] - 0.5 * x[:, 1] + rng.normal(scale=0.3, size=300) > 0.8).astype(int)
    probe, report = fit_logistic(x, y, layer=7)
    assert report["cv_auroc_pass"] > 0.9 and report["cv_brier"] < 0.7 * report["base_rate_brier"]
    assert probe.head == "logistic" and probe.layer == 7 and report["passing"] == int(y.sum())
    p = np.array([probe.prediction(row, pass_mark=7).p_pass for row in x])
    assert abs(p.mean() - y.mean()) < 0.05  # calibrated: as many passes predicted as there are
    _, noise = fit_logistic(x, rng.permutation(y))
    assert abs(noise["cv_auroc_pass"] - 0.5) < 0.12
    with pytest.raises(RpraError, match="at least 5 passing"):
        fit_logistic(x[:40], np.r_[np.ones(3, int), np.zeros(37, int)])


def test_a_logistic_prediction_puts_p_pass_at_and_above_the_pass_mark_and_round_trips(tmp_path):
    probe = Probe(np.zeros(2), np.ones(2), np.array([2.0, 0.0]), 0.0, 0.0, 10, {"model_sha256": "a" * 64}, layer=4, head="logistic")
    p = probe.prediction(np.array([0.5, 3.0]), pass_mark=7)
    assert p.p_pass == pytest.approx(1 / (1 + np.exp(-1.0))) and abs(sum(p.probs) - 1) < 1e-9
    assert probe.prediction(np.array([1.0, 0.0]), 7).expected > p.expected  # monotone in P(pass)
    loaded = Probe.load(probe.save(tmp_path / "m.probe.npz"))
    assert (loaded.layer, loaded.head, loaded.capture_layers) == (4, "logistic", [4])
    assert loaded.prediction(np.array([0.5, 3.0]), 7) == p
    loaded.check_model("a" * 64)
    with pytest.raises(ConfigError, match="fitted on .* not on"):
        loaded.check_model("b" * 64, "other-model")


def test_a_remote_head_fitted_on_a_subset_keeps_its_logits_on_the_probes_standardisation(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(loc=3.0, scale=2.0, size=(200, 6))
    local, _ = fit_logistic(x, (x[:, 0] > 3).astype(int), layer=4, meta={"model_sha256": "a" * 64})
    held = np.arange(0, 200, 2)  # the remote answered half the records: its own mean and spread
    remote, report = fit_logistic(x[held], (x[held, 1] > 2.5).astype(int), layer=4)
    both = Probe.load(with_remote_head(local, remote, report).save(tmp_path / "two.probe.npz"))
    assert both.predicts_remote and both.meta["remote_head"]["examples"] == 100
    for row in x[:20]:
        p = both.prediction(row, pass_mark=7)
        assert p.p_remote == pytest.approx(1 / (1 + np.exp(-remote.score(row))), abs=1e-9)  # the subset fit's own logit
        assert p.p_pass == pytest.approx(local.prediction(row, 7).p_pass) and p.advantage == pytest.approx(p.p_pass - p.p_remote)
        assert p.to_dict()["advantage"] == round(p.advantage, 4)
    plain = Probe(local.mean, local.std, local.weights, local.bias, 0.0, 10, head="logistic", layer=4)
    assert not plain.predicts_remote and plain.prediction(x[0], 7).p_remote is None and plain.fingerprint() != both.fingerprint()


def test_a_format_1_probe_still_loads_as_a_ridge_on_the_final_state(tmp_path):
    path = tmp_path / "old.npz"
    np.savez(path, mean=np.zeros(3), std=np.ones(3), weights=np.ones(3), scalars=np.array([5.0, 1.0, 10]),
             meta=np.array(json.dumps({"format": "rpra-probe/1"})))  # fmt: skip
    old = Probe.load(path)
    assert (old.layer, old.head, old.capture_layers) == (None, "ridge", [])
    np.savez(path, mean=np.zeros(3), std=np.ones(3), weights=np.ones(3), scalars=np.array([5.0, 1.0, 10]),
             meta=np.array(json.dumps({"format": "rpra-probe/9"})))  # fmt: skip
    with pytest.raises(ConfigError, match="format 'rpra-probe/9'"):
        Probe.load(path)


def test_the_sweeps_best_slot_layer_is_the_default_layer(tmp_path, model_path):
    from rpra.models import file_sha256

    rows = [{"layer": i, "cv_auroc": auc} for i, auc in enumerate([0.6, 0.8, 0.7])]
    sweep = {"model_sha256": file_sha256(model_path), "layers": {"slot": rows, "mean": [{"layer": 0, "cv_auroc": 0.99}]}}
    (tmp_path / f"layer_sweep-{model_path.stem}.json").write_text(json.dumps(sweep))
    assert sweep_layer(str(model_path), tmp_path) == 1  # the slot's best: the mean needs the whole prompt evaluated
    (tmp_path / f"layer_sweep-{model_path.stem}.json").write_text(json.dumps({**sweep, "model_sha256": "0" * 64}))
    assert sweep_layer(str(model_path), tmp_path) is None  # a sweep of another file
    assert sweep_layer("nothing-swept", tmp_path) is None


@pytest.mark.slow
def test_a_middle_layer_probe_routes_real_turns_and_needs_its_layer_captured(greedy_settings, model_path, local_model):
    from rpra.local import LocalModel

    settings = greedy_settings(protocol="pa")
    capturing = LocalModel(model_path, name="smollm2-135m-instruct", n_ctx=1024, n_threads=2, seed=0, capture_layers=[12])
    prompts_ = [f"What is {a} + {a}?" for a in range(1, 6)] + [f"What is {a}7 * {a}9 - 3{a}1?" for a in range(1, 6)]
    x = slot_states(capturing, prompts_, settings, layer=12)
    assert x.shape == (10, capturing.n_embd) and not np.allclose(x, slot_states(local_model, prompts_, settings))
    probe, _ = fit_logistic(x, np.array([1] * 5 + [0] * 5), folds=2, layer=12)
    runtime = Runtime(settings, local=capturing, predictor=ProbePredictor(probe))
    result = runtime.ask([{"role": "user", "content": prompts_[-1]}], mode="local-only")
    assert result.prediction.predictor == "probe" and result.answer
    assert result.prediction.p_pass == pytest.approx(probe.prediction(x[-1], settings.pass_mark).p_pass, abs=1e-3)
    with pytest.raises(ConfigError, match="does not capture"):
        Runtime(settings, local=local_model, predictor=ProbePredictor(probe))


@pytest.mark.slow
def test_train_probe_reuses_the_states_the_layer_sweep_cached_and_reads_only_the_rest(greedy_settings, model_path, isolated_home):
    from rpra.local import LocalModel
    from rpra.models import file_sha256
    from rpra.training.probe import _states

    settings = greedy_settings(protocol="pa", model=str(model_path))
    capturing = LocalModel(model_path, name="smollm2-135m-instruct", n_ctx=1024, n_threads=2, seed=0, capture_layers=[12])
    folder = isolated_home / "features" / file_sha256(model_path)[:16]
    folder.mkdir(parents=True)
    np.savez(folder / "mmlu_1.npz", slot=np.full((capturing.n_layer, capturing.n_embd), 7, np.float16))  # as the sweep saves it
    records = [{"id": "mmlu:1", "prompt": "What is 2 + 2?"}, {"id": "mmlu:2", "prompt": "What is 3 + 3?"}]
    x = _states(capturing, records, settings, 12, lambda: None)
    assert (x[0] == 7).all()  # from the cache: no prefill
    again = slot_states(capturing, [records[1]["prompt"]], settings, layer=12)[0]
    assert np.corrcoef(x[1], again)[0, 1] > 0.99  # read by a prefill (the cached prefix differs: kernels round differently)
    with np.load(folder / "mmlu_2.npz") as added:  # and added to the cache, every layer: a refit reads nothing
        assert added["slot"].shape == (capturing.n_layer, capturing.n_embd)
    np.testing.assert_array_equal(_states(capturing, records, settings, 3, lambda: None)[1], np.load(folder / "mmlu_2.npz")["slot"][3].astype(np.float32))


@pytest.mark.slow
def test_reading_the_hidden_state_changes_nothing_the_runtime_does_next(local_model):
    from rpra.predictors import make_slot

    slot = make_slot(local_model, 10)
    tokens = local_model.chat_tokens([{"role": "user", "content": PROMPT}]) + local_model.tokenize("Rating: [[")
    with local_model.lock:
        session = local_model.session(tokens)
        before = session.score(slot)
        h = session.hidden_state()
        after = session.score(slot)
        assert h.shape == (local_model.n_embd,) and np.isfinite(h).all() and np.linalg.norm(h) > 0
        # Batched and single-token kernels round differently (measured: up to ~0.1): same ranking.
        np.testing.assert_allclose(before, after, atol=0.2)
        assert np.argmax(before) == np.argmax(after) and session.tokens == tokens
        again = local_model.session(tokens)  # the cache still holds exactly the prompt
        assert again.reused_tokens == len(tokens) - 1
        np.testing.assert_allclose(again.hidden_state(), h, atol=1e-4)


@pytest.mark.slow
def test_a_fitted_probe_routes_real_turns(greedy_settings, local_model, tmp_path):
    settings = greedy_settings(protocol="pa")
    prompts_ = [f"What is {a} times {b}?" for a, b in [(2, 3), (17, 23), (5, 5), (123, 456), (9, 8), (71, 13)]] + [
        "Name a colour.", "Write a haiku about rain.", "Who wrote Hamlet?", "Explain entropy in one line.",
    ]  # fmt: skip
    x = slot_states(local_model, prompts_, settings)
    assert x.shape == (10, local_model.n_embd)
    y = np.array([8, 3, 8, 2, 8, 3, 7, 5, 6, 4], float)
    probe, _ = fit_probe(x, y, scale_max=10, folds=2)
    runtime = Runtime(settings, local=local_model, predictor=ProbePredictor(Probe.load(probe.save(tmp_path / "p.npz"))))
    result = runtime.ask([{"role": "user", "content": prompts_[0]}], mode="local-only")
    assert result.prediction.predictor == "probe"
    # The runtime's prediction is the probe applied to the very state slot_states read.
    assert abs(result.prediction.expected - probe.prediction(x[0], settings.pass_mark).expected) < 1e-3
    assert result.answer


# --- adapters by name -------------------------------------------------------------------------


def _fake_adapter(home: Path, name: str, base_sha: str, created: str) -> Path:
    folder = home / "adapters" / name
    folder.mkdir(parents=True)
    (folder / "adapter.gguf").write_bytes(b"GGUF")
    (folder / "meta.json").write_text(json.dumps({"base_sha256": base_sha, "base_model": "m", "created": created}))
    return folder / "adapter.gguf"


def test_adapters_resolve_by_name_and_refuse_another_base(isolated_home, model_path):
    from rpra.models import file_sha256

    good = _fake_adapter(isolated_home, "mine", file_sha256(model_path), "2026-11-02")
    _fake_adapter(isolated_home, "other", "0" * 64, "2026-11-01")
    (isolated_home / "adapters" / "unfinished").mkdir()
    assert [a.name for a in list_adapters()] == ["mine", "other"]
    assert resolve_adapter("mine", model=model_path) == good
    assert resolve_adapter(str(good)) == good
    with pytest.raises(ConfigError, match="trained on another base model"):
        resolve_adapter("other", model=model_path)
    with pytest.raises(ConfigError, match="No adapter named 'nope'. Adapters: mine, other"):
        resolve_adapter("nope")
    with pytest.raises(ConfigError, match="No adapter file"):
        resolve_adapter(str(isolated_home / "gone.gguf"))


@pytest.mark.slow
def test_the_probe_commands_as_a_user_runs_them(rpra, model_path, isolated_home, tmp_path):
    """`rpra train probe` on a collected train split, then `rpra ask --set predictor=probe`."""
    import os

    env = {**os.environ, "RPRA_MODEL": str(model_path), "RPRA_N_CTX": "1024", "RPRA_N_THREADS": "2", "RPRA_MAX_TOKENS": "8"}
    folder = isolated_home / "collections" / "smollm2-135m-instruct--rpra-mix--train"
    folder.mkdir(parents=True)
    scores = [8, 3, 8, 2, 8, 3, 7, 5, 6, 4]
    # The remote answered 8 of the 10 (right on the even ones): the remote head learns from those 8.
    remote = [{"exact_remote": float(i % 2 == 0), "remote_answer": str(2 * i)} if i < 8 else {} for i in range(10)]
    folder.joinpath("records.jsonl").write_text("".join(json.dumps(_record(i, s, **remote[i])) + "\n" for i, s in enumerate(scores)))
    probe_file = tmp_path / "smollm2.probe.npz"
    fit = rpra("train", "probe", "--folds", "2", "--layer", "9", "--remote", "--output", str(probe_file), env=env)
    assert fit.returncode == 0, fit.stderr
    assert f"probe: {probe_file}" in fit.stdout and "layer 9 · 10 examples, 5 pass" in fit.stdout and "CV AUROC" in fit.stdout
    assert "remote head: 8 records with a remote answer, 4 pass" in fit.stdout and "route_on=advantage" in fit.stdout
    asked = rpra("ask", "What is 2 + 2?", "--mode", "local-only", "--json", "--set", "predictor=probe", "--set", f"probe={probe_file}",
                 "--set", "route_on=advantage", "--set", "threshold=0", env=env)  # fmt: skip
    assert asked.returncode == 0, asked.stderr
    answer = json.loads(asked.stdout)
    assert answer["prediction"]["predictor"] == "probe" and 0 <= answer["prediction"]["p_remote"] <= 1
    assert "advantage" in answer["decision"]["reason"] and answer["decision"]["route_on"] == "advantage"
    zero_shot = rpra("ask", "Hi", "--mode", "local-only", "--set", "route_on=advantage", "--set", "threshold=0", env=env)
    assert zero_shot.returncode != 0 and "does not predict the remote" in zero_shot.stderr
    refused = rpra("train", "probe", "--split", "test", env=env)
    assert refused.returncode == 1 and "test split" in refused.stderr
    other = rpra("ask", "Hi", "--mode", "local-only", "--set", "predictor=probe", "--set", f"probe={probe_file}",
                 "--set", f"model={_other_model(tmp_path, model_path)}", env=env)  # fmt: skip
    assert other.returncode != 0 and "fitted on" in other.stderr  # a probe is for the model file it was fitted on


def _other_model(tmp_path: Path, model_path: Path) -> Path:
    """A copy of the model file with one byte of padding: the same model, another file (sha256)."""
    other = tmp_path / "other.gguf"
    other.write_bytes(model_path.read_bytes() + b"\0")
    return other


@pytest.mark.slow
def test_hidden_states_reads_every_position_and_its_last_is_the_probes_state(model_path):
    from rpra.local import LocalModel

    model = LocalModel(model_path, name="smollm2", n_ctx=1024, n_batch=1024, n_threads=2, seed=0)
    tokens = model.chat_tokens([{"role": "user", "content": PROMPT}]) + model.tokenize("Rating: [[")
    with model.lock:
        h = model.session(tokens).hidden_state()
        every = model.hidden_states(tokens)
    assert every.shape == (len(tokens), model.n_embd) and np.isfinite(every).all()
    assert np.corrcoef(every[-1], h)[0, 1] > 0.999  # the same position, batched vs single-token kernels
    assert np.corrcoef(every[0], h)[0, 1] < 0.99  # and other positions really differ
