"""Real training steps on the real SmolLM2: peft + trl on CPU, resumable, exported to llama.cpp."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("torch", reason="the training extra is not installed")

from rpra.errors import ConfigError  # noqa: E402
from rpra.local import LocalModel  # noqa: E402
from rpra.predictors import ZeroShotPredictor, make_slot  # noqa: E402
from rpra.training.config import SFTConfig  # noqa: E402
from rpra.training.data import turn_example  # noqa: E402

pytestmark = pytest.mark.slow

PROMPTS = ["What is 2 + 2?", "Name the largest planet.", "What colour is the sky?", "What is 10 - 3?", "Who wrote Hamlet?", "Spell 'cat'."]
TARGET = 9  # every training record gets this score: the adapter must move the slot towards it


def _write_collection(model_path, n: int = 6) -> None:
    from rpra.benchmarks.collection import collection_dir

    folder = collection_dir(str(model_path), "rpra-mix", "train")
    folder.mkdir(parents=True)
    with open(folder / "records.jsonl", "w") as f:
        for i, prompt in enumerate(PROMPTS[:n]):
            f.write(json.dumps({"id": f"t:{i}", "prompt": prompt, "local_answer": "An answer.", "judge_local": {"score": TARGET},
                                "rpra_reasoning": "Easy.", "rpra_reasoning_tokens": 3}) + "\n")  # fmt: skip


def _tiny(model_path, **overrides) -> SFTConfig:
    values = dict(name="tiny", model=str(model_path), max_steps=4, learning_rate=3e-3, batch_size=1, micro_batch_size=1,
                  eval_fraction=0.0, lora_r=8, threads=2, save_steps=2, protocols="pa", target="llm")  # fmt: skip
    values.update(overrides)
    return SFTConfig(**values)


def _slot_probs(local: LocalModel, prompt: str) -> np.ndarray:
    system = ZeroShotPredictor().system_prompt("pa", 10)
    tokens = local.chat_tokens([{"role": "system", "content": system}, {"role": "user", "content": prompt}]) + local.tokenize("Rating: [[")
    with local.lock:
        logprobs = np.asarray(local.session(tokens).score(make_slot(local, 10)))
    p = np.exp(logprobs - logprobs.max())
    return p / p.sum()


def test_a_lora_step_trains_the_adapter_and_leaves_the_base_frozen(model_path, local_model, tmp_path):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig as TrlConfig
    from trl import SFTTrainer

    from transformers import AutoTokenizer

    from rpra.training.export import load_base_model

    torch.manual_seed(0)
    model = load_base_model(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path.parent, gguf_file=model_path.name)
    system = ZeroShotPredictor().system_prompt("pa", 10)
    rows = [turn_example(local_model, system, p, "pa", score=TARGET, answer="Fine.") for p in PROMPTS[:2]]
    args = TrlConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-3,
                     use_cpu=True, report_to="none", save_strategy="no", max_length=None)  # fmt: skip
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))  # fmt: skip
    params = dict(trainer.model.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    trainable = {name for name, p in params.items() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name].detach())}
    assert changed and changed <= trainable  # only LoRA weights moved
    assert any("lora_B" in name for name in changed)  # B starts at zero: the adapter now does something
    frozen = [name for name in before if "lora_" not in name]
    assert frozen and all(torch.equal(before[n], after[n].detach()) for n in frozen)


def test_an_interrupted_tiny_sft_run_resumes_and_gives_an_adapter_that_llama_cpp_loads_and_that_moves_the_prediction(
        rpra, model_path, local_model, isolated_home, monkeypatch):  # fmt: skip
    """One training run, interrupted and resumed (a run is the suite's dearest step: one, not two)."""
    import transformers

    from rpra.training.sft import train_sft

    _write_collection(model_path)
    real_save = transformers.Trainer._save_checkpoint

    def save_then_die(self, *args, **kwargs):
        real_save(self, *args, **kwargs)
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C right after the first checkpoint

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_sft(_tiny(model_path), log=lambda _: None)
    assert (isolated_home / "adapters" / "tiny" / "checkpoints" / "checkpoint-2").exists()
    assert not (isolated_home / "adapters" / "tiny" / "adapter.gguf").exists()

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", real_save)
    lines: list[str] = []
    meta = train_sft(_tiny(model_path), log=lines.append)
    assert any("resuming from" in line and "checkpoint-2" in line for line in lines)
    assert meta["steps"] == 4 and meta["resumed_from"].endswith("checkpoint-2")
    assert not (isolated_home / "adapters" / "tiny" / "checkpoints").exists()
    gguf = isolated_home / "adapters" / "tiny" / "adapter.gguf"
    assert gguf.exists() and meta["gguf_bytes"] == gguf.stat().st_size
    assert meta["train_sequences"] == 6 and meta["base_sha256"] and meta["train_wall_s"] > 0
    tuned = LocalModel(model_path, n_ctx=512, n_threads=2, adapter=gguf)
    base_p, tuned_p = _slot_probs(local_model, PROMPTS[0]), _slot_probs(tuned, PROMPTS[0])
    assert tuned_p[TARGET - 1] > base_p[TARGET - 1] + 0.1, (base_p.round(3), tuned_p.round(3))

    # A finished run is not redone; the same name with other settings is refused.
    again: list[str] = []
    assert train_sft(_tiny(model_path), log=again.append)["created"] == meta["created"]
    assert any("already trained" in line for line in again)
    with pytest.raises(ConfigError, match="other settings"):
        train_sft(_tiny(model_path, lora_r=4), log=lambda _: None)

    # --adapter NAME finds it, checked against the base model; `rpra train list` shows it.
    env = {**os.environ, "RPRA_MODEL": str(model_path), "RPRA_N_CTX": "1024", "RPRA_MAX_TOKENS": "8"}
    asked = rpra("ask", "What is 2 + 2?", "--adapter", "tiny", "--mode", "local-only", "--json", env=env)
    assert asked.returncode == 0, asked.stderr
    prediction = json.loads(asked.stdout)["prediction"]
    assert prediction["predictor"] == "fine-tuned" and prediction["distribution"][str(TARGET)] > base_p[TARGET - 1]
    listed = json.loads(rpra("train", "list", "--json", env=env).stdout)
    assert [(a["name"], a["steps"], a["gguf_bytes"]) for a in listed["adapters"]] == [("tiny", 4, gguf.stat().st_size)]


def test_training_without_a_collection_says_how_to_make_one(model_path):
    from rpra.training.sft import train_sft

    with pytest.raises(ConfigError, match="rpra collect --suite rpra-mix --split train --no-remote"):
        train_sft(_tiny(model_path), log=lambda _: None)
