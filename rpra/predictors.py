"""Predictors: how the device model's expected judge score is obtained.

A predictor contributes the instructions placed before the conversation and turns the model's
state at the score slot into a ``Prediction``. The controller sees only the ``Prediction``, so the
report-card and fine-tuned predictors plug in without touching it:

- zero-shot (here): instructions only; the slot's token probabilities are the prediction.
- report card: the same, with a card of the model's strengths and weaknesses in the instructions.
- fine-tuned: the zero-shot prompt on a model carrying a LoRA adapter (``Settings.adapter``).
- probe: a linear head on one of the model's hidden states at the slot (``rpra.probe``), PA only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from rpra import prompts
from rpra.config import Protocol
from rpra.prediction import Prediction
from rpra.probe import Probe, draft_features
from rpra.slot import ScoreSlot

if TYPE_CHECKING:
    from rpra.local import LocalModel, LocalSession


class Predictor(ABC):
    """Predicts the score a judge would give the device model's answer to the current request."""

    name: str
    capture_layers: list[int] = []  # layers the device model must capture during the prefill
    predicts_remote: bool = False  # whether its predictions carry P(remote passes) (route_on=advantage)

    def system_prompt(self, protocol: Protocol, scale_max: int) -> str:
        """Instructions placed before the conversation (a stable prefix: cached across requests)."""
        return prompts.system_prompt(protocol, scale_max)

    @abstractmethod
    def predict(self, session: LocalSession, slot: ScoreSlot, *, pass_mark: int) -> Prediction:
        """Predict, with ``session`` positioned right after the slot's opening text."""


class ZeroShotPredictor(Predictor):
    """The prompt alone: read the constrained score distribution at the slot."""

    name = "zero-shot"

    def predict(self, session: LocalSession, slot: ScoreSlot, *, pass_mark: int) -> Prediction:
        return Prediction.from_logprobs(session.score(slot), pass_mark, self.name)


class ReportCardPredictor(ZeroShotPredictor):
    """Zero-shot reading of the slot, with a report card of the model in its instructions.

    The card sits in the system prompt, the prefix every request shares, so llama.cpp evaluates it
    once and reuses its KV cache across requests (LocalModel's prefix reuse): a long card costs
    prefill once, not per request.
    """

    name = "report-card"

    def __init__(self, card: str):
        if not card.strip():
            raise ValueError("A report card needs some text.")
        self.card = card

    def system_prompt(self, protocol: Protocol, scale_max: int) -> str:
        return prompts.system_prompt(protocol, scale_max, report_card=self.card)


class FineTunedPredictor(ZeroShotPredictor):
    """The zero-shot reading, on a device model that carries a LoRA adapter trained to predict its
    judge score (``rpra train sft``). The adapter lives in the model, so only the name differs."""

    name = "fine-tuned"


class ProbePredictor(Predictor):
    """A linear head on a hidden state at the PA slot (``rpra train probe``): the final state, or
    a middle layer's, captured during the prefill (open the model with ``capture_layers``)."""

    name = "probe"

    def __init__(self, probe: Probe):
        self.probe = probe
        self.capture_layers = probe.capture_layers
        self.predicts_remote = probe.predicts_remote

    def predict(self, session: LocalSession, slot: ScoreSlot, *, pass_mark: int) -> Prediction:
        return self.probe.prediction(probe_state(session, self.probe.layer), pass_mark)


class DraftVerifier:
    """The cascade's second decision point: a verifier (``rpra train verifier``) reads the local
    draft (``probe.draft_features``: the slot state, the mean state over the draft, its token
    log-probabilities) and predicts whether *that draft* is right.

    Its prediction carries the pre-answer prediction's P(remote passes), where there is one, so
    the controller routes it on the same quantity as the first point (``route_on``)."""

    name = "verifier"

    def __init__(self, probe: Probe):
        if probe.reads != "draft":
            raise ValueError("This probe reads the PA slot, not a draft: fit a verifier with `rpra train verifier`.")
        if probe.layer is None:
            raise ValueError("A verifier reads a middle layer's states; this one names none.")
        self.probe = probe
        self.layer = probe.layer
        self.capture_layers = [probe.layer]

    def verify(self, slot_state: np.ndarray, draft_state: np.ndarray, logprobs, *, pass_mark: int,
               p_remote: float | None = None) -> Prediction:  # fmt: skip
        prediction = self.probe.prediction(draft_features(slot_state, draft_state, logprobs), pass_mark)
        return replace(prediction, predictor=self.name, p_remote=p_remote)


def probe_state(session: LocalSession, layer: int | None) -> np.ndarray:
    """The state a probe reads at the slot: the final hidden state (``layer`` None), else that
    layer's residual stream at the slot token, captured during the prefill. Training reads
    through this too, so a probe sees at run time what it was fitted on."""
    if layer is None:
        return session.hidden_state()
    states = session.layer_states("last")
    if layer not in states:
        raise ValueError(f"The probe reads layer {layer}; open the device model with capture_layers=[{layer}].")
    return states[layer]


def make_slot(model: LocalModel, scale_max: int) -> ScoreSlot:
    """The score slot for ``model``'s tokenizer: labels "1".."N", closed by the slot's closing text."""
    close = model.tokenize(prompts.SLOT_CLOSE)
    return ScoreSlot([model.tokenize(str(score)) for score in range(1, scale_max + 1)], close[0])
