"""The SFT dataset: collected, judged records turned into the runtime's own turns.

Each record becomes one training sequence per protocol: the prompt exactly as the runtime renders
it (its system prompt, the model's chat template, tokenized by llama.cpp with the same
injection-safe tokenizer the device uses) followed by the assistant turn from
``rpra.prompts.turn_pieces`` with the judge's score in the slot. Tokens come from llama.cpp, not
from a Hugging Face tokenizer, so the trained model sees the very token ids the device will feed it.

Labels are -100 everywhere except the score tokens (and, with ``loss_on = prediction+answer``, the
answer and its end-of-turn token).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from rpra.benchmarks.collection import Collection
from rpra import prompts
from rpra.errors import ConfigError
from rpra.local import LocalModel
from rpra.runtime import merge_system

IGNORE = -100


@dataclass
class Built:
    """Examples and what was left out (reported, never silent)."""

    examples: list[dict]
    skipped: Counter = field(default_factory=Counter)


def load_collection(model: str, suite: str, split: str) -> Collection:
    """The collected records of ``suite``/``split`` for ``model`` (``benchmarks.collection``).

    Training on the test split is refused: it would make the benchmark on it meaningless.
    """
    if split == "test":
        raise ConfigError("Training on the test split would make its benchmark meaningless; use the train split.")
    return Collection.load(model, suite, split)


def target_score(record: dict, *, target: str, scale_max: int) -> int | None:
    """The integer score a predictor learns for a record (None: the record has no usable one).

    ``llm``: the judge's score; ``exact``: the verifier's verdict as scale_max / 1; ``pass``: the
    record's label (``benchmarks.collection.label``: verified where keyed, else the judge at the
    pass mark) as scale_max / 1, the target P(pass) is read from.
    """
    if target == "pass":
        passed = (record.get("label") or {}).get("pass")
        return None if passed is None else (scale_max if passed else 1)
    if target == "exact":
        exact = record.get("exact_local")
        return None if exact is None else (scale_max if exact >= 0.5 else 1)
    score = (record.get("judge_local") or {}).get("score")
    return None if score is None else min(scale_max, max(1, round(score)))


def turn_example(
    local: LocalModel, system: str, prompt: str, protocol: str, *, score: int, answer: str,
    reasoning: str = "", reasoning_ended_line: bool = True, loss_on: str = "prediction",
) -> dict:  # fmt: skip
    """``input_ids`` and ``labels`` of one turn, tokenized piece by piece as the runtime does."""
    convo = merge_system({"role": "system", "content": system}, [{"role": "user", "content": prompt}])
    input_ids = local.chat_tokens(convo)
    labels = [IGNORE] * len(input_ids)
    pieces = prompts.turn_pieces(protocol, score=score, answer=answer, reasoning=reasoning, reasoning_ended_line=reasoning_ended_line)
    for kind, text in pieces:
        tokens = local.tokenize(text)
        learn = kind == "score" or (kind == "answer" and loss_on == "prediction+answer")
        input_ids += tokens
        labels += tokens if learn else [IGNORE] * len(tokens)
    end = local.end_of_turn
    input_ids.append(end)
    labels.append(end if loss_on == "prediction+answer" else IGNORE)
    return {"input_ids": input_ids, "labels": labels}


def build_examples(records: list[dict], local: LocalModel, *, protocols: list[str], system_prompt, loss_on: str, target: str,
                   scale_max: int, reason_tokens: int, max_length: int) -> Built:  # fmt: skip
    """One example per (record, protocol). ``system_prompt(protocol)`` is the predictor's instructions."""
    built = Built([])
    for record in records:
        score = target_score(record, target=target, scale_max=scale_max)
        if score is None:
            built.skipped["no score"] += 1
            continue
        for protocol in protocols:
            if protocol == "rpra" and record.get("rpra_reasoning") is None:
                built.skipped["no rpra reasoning"] += 1
                continue
            example = turn_example(
                local, system_prompt(protocol), record["prompt"], protocol, score=score, answer=record["local_answer"],
                reasoning=record.get("rpra_reasoning") or "",
                # A thought shorter than its budget stopped at a newline (or, rarely, at end of turn).
                reasoning_ended_line=record.get("rpra_reasoning_tokens", reason_tokens) < reason_tokens,
                loss_on=loss_on,
            )  # fmt: skip
            if len(example["input_ids"]) > max_length:
                built.skipped[f"longer than max_length ({max_length})"] += 1
                continue
            built.examples.append({**example, "id": record["id"], "protocol": protocol, "score": score})
    return built


def hold_out(examples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split by record id (both protocols of a record land on the same side)."""
    ids = sorted({e["id"] for e in examples})
    random.Random(seed).shuffle(ids)
    held = set(ids[: round(len(ids) * fraction)])
    return [e for e in examples if e["id"] not in held], [e for e in examples if e["id"] in held]
