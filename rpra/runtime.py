"""One RPRA turn: predict on the device, decide, answer locally or defer.

    prompt ─► prefill ─► [reason] ─► score slot ─► Controller ─┬─► local answer (same KV cache)
                                                                └─► remote answer ─(fails)─► local answer, flagged

``Runtime.turn`` is a generator of events so that the chat CLI and the server can stream;
``Runtime.ask`` drains it for one-shot use. Every turn is logged to the store when one is given.

What leaves the device is decided here too: the privacy policy may keep a deferral local
(never-defer, or a user who declines when asked), and a deferred request is redacted first
(e-mail addresses, phone and card numbers, ...), its answer restored as it streams back.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from datetime import datetime, timezone
from collections.abc import Callable, Iterator
from pathlib import Path
from dataclasses import asdict, dataclass, field

import numpy as np

from rpra import prompts
from rpra.config import Mode, Settings
from rpra.controller import Controller, Decision
from rpra.errors import ConfigError, InputError, PrivacyError, PromptTooLongError, RemoteError, RpraError
from rpra.ladder import Allocation, best_of_n, drafts_first
from rpra.pool import Pool, PoolHeads, budget_left, period_starts, pick
from rpra.local import Generated, LocalModel, LocalSession, sequence_seed
from rpra.prediction import Prediction
from rpra.privacy import Redactor, StreamRestorer, Vault, redact_messages
from rpra.predictors import (DraftVerifier, FineTunedPredictor, Predictor, ProbePredictor, ReportCardPredictor, ZeroShotPredictor,
                             make_slot)
from rpra.remote import RemoteModel, Waiting
from rpra.store import LogStore

# Tokens the score slot itself needs after the prompt (open, label, close, newline).
_SLOT_TOKENS = 16
_PLACEHOLDER_NOTE = (
    "Some private values were replaced by placeholders such as [EMAIL_1] or [PHONE_2]. "
    "When your answer refers to one, copy the placeholder exactly."
)
_NO_REMOTE = "no remote configured"
# After this long without a word from the remote, the user is told it is being waited for.
_WAITING_NOTICE_AFTER = 2.0
# Shown, and recorded, between a remote answer that broke off and the local one that replaces it:
# the user has seen the remote's first words, so they stay, and the switch must be visible.
_BROKE_OFF = "\n\n[The remote's answer broke off here; the device model answers instead.]\n\n"


@dataclass
class TurnResult:
    """Everything about one turn, as `rpra ask --json` prints it and the log stores it."""

    answer: str = ""  # exactly what the user was shown: every Text event, joined (and stripped)
    answered_by: str = ""  # "local" or "remote": who wrote the end of the answer
    model: str = ""
    prediction: Prediction | None = None
    decision: Decision | None = None
    # The cascade (a verifier set): its prediction for the local draft, and the draft itself when
    # it was deferred unseen (else the draft is the answer).
    draft_prediction: Prediction | None = None
    discarded_draft: str | None = None
    rungs: list[dict] = field(default_factory=list)  # each rung of the ladder taken: its verdict and whether it was kept
    # Routing over a pool: the target chosen, each target's P(right) and expected cost, what the
    # budget allowed, and what the turn cost (None without a pool).
    pool: dict | None = None
    reasoning: str = ""
    fallback: bool = False  # deferred, but the remote failed and the local model answered
    remote_error: str | None = None
    local_logprobs: dict | None = None  # mean and min log-probability of the local answer's tokens
    remote_partial: str | None = None  # the remote's text shown before it broke off (then in answer too)
    sent_remote: list[dict] | None = None  # exactly what left the device
    redactions: list[dict] | None = None  # what was masked in it: kind and placeholder, never the value
    finish_reason: str = ""
    max_tokens: int | None = None  # the answer's token limit, named when the answer hits it
    dropped_messages: int = 0  # oldest messages left out to fit the local context
    timings_ms: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    turn_id: int | None = None
    conversation_id: str | None = None

    @property
    def verdict(self) -> str:
        """The one line a user reads after each turn."""
        d = self.decision
        why = d.reason if d else ""
        if self.finish_reason == "length":
            why += f" · cut at max_tokens ({self.max_tokens})"
        elif self.finish_reason == "context":
            why += " · cut: the device model's context is full"
        if self.pool and self.pool.get("cost"):
            why += f" · cost {self.pool['cost']:.2g}"
        if self.fallback:
            return f"local (remote failed: {self.remote_error}) · {why}"
        if self.answered_by == "remote":
            return f"deferred · {why}" if d and d.mode == "auto" else f"remote · {why}"
        return f"local · {why}"

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("prediction", "decision", "draft_prediction")}
        out["prediction"] = self.prediction.to_dict() if self.prediction else None
        out["draft_prediction"] = self.draft_prediction.to_dict() if self.draft_prediction else None
        out["decision"] = self.decision.to_dict() if self.decision else None
        out["verdict"] = self.verdict
        return out


@dataclass(frozen=True)
class Decided:
    """The routing decision is known (emitted before any answer text)."""

    decision: Decision
    prediction: Prediction | None
    reasoning: str
    reasoning_tokens: int = 0  # tokens the device generated before deciding (RPRA's reasoning)
    decision_ms: float = 0.0  # from the start of the turn to this decision


@dataclass(frozen=True)
class Text:
    """A piece of the answer, from ``source`` ("local" or "remote")."""

    text: str
    source: str


@dataclass(frozen=True)
class Notice:
    """Something the user should know mid-turn (e.g. the remote failed, answering locally)."""

    message: str


@dataclass(frozen=True)
class Finished:
    result: TurnResult


Event = Decided | Text | Notice | Finished

# Asked before a deferral under privacy = ask, with exactly what would be sent; True sends it.
Confirm = Callable[[list[dict]], bool]


class Runtime:
    """The device model, its predictor, the controller and the remote, wired for turns."""

    def __init__(
        self,
        settings: Settings,
        *,
        local: LocalModel | None,
        remote: RemoteModel | None = None,
        predictor: Predictor | None = None,
        store: LogStore | None = None,
        verifier: DraftVerifier | None = None,
        allocation: Allocation | None = None,
        pool: Pool | None = None,
        pool_heads: PoolHeads | None = None,
        pool_remotes: dict[str, RemoteModel] | None = None,
    ):
        self.settings = settings
        self.local = local
        self.remote = remote
        self.predictor = predictor or ZeroShotPredictor()
        self.verifier = verifier
        for reader in (self.predictor, verifier):
            wanted = set(reader.capture_layers) if reader is not None else set()
            if local is not None and wanted and (missing := wanted - set(local.capture_layers)):
                raise ConfigError(f"The {reader.name} reads layer(s) {sorted(missing)}, which the device model does not capture: "
                                  f"open it with LocalModel.from_settings(..., capture_layers={sorted(wanted)}).")  # fmt: skip
        if verifier is not None and settings.protocol != "pa":
            raise ConfigError("The verifier reads a draft in the PA layout: use it with protocol = pa.")
        if verifier is not None and local is not None and settings.best_of > local.parallel:
            raise ConfigError(f"best_of = {settings.best_of} decodes that many drafts at once: open the device model with "
                              f"LocalModel.from_settings(..., parallel={settings.best_of}).")  # fmt: skip
        if allocation is not None:
            if allocation.drafts and verifier is None:
                raise ConfigError(f"The allocation's rungs ({', '.join(sorted(set(allocation.actions)))}) pick and revise by the "
                                  "verifier's scores: set verifier (`rpra train verifier`).")  # fmt: skip
            if local is not None and allocation.best_of > local.parallel:
                raise ConfigError(f"The allocation's best-of-{allocation.best_of} decodes that many drafts at once: open the device "
                                  f"model with LocalModel.from_settings(..., parallel={allocation.best_of}).")  # fmt: skip
        self.allocation = allocation
        self.pool, self.pool_heads, self.pool_remotes = pool, pool_heads, dict(pool_remotes or {})
        if pool is not None:
            if pool_heads is None or (missing := [n for n in pool.names if n not in pool_heads.names]):
                raise ConfigError(f"The pool's targets need a reward head each; missing: {', '.join(missing) if pool_heads else 'all'} "
                                  "(`rpra train pool --pool FILE`).")  # fmt: skip
            if local is not None and pool_heads.layer not in local.capture_layers:
                raise ConfigError(f"The pool's heads read layer {pool_heads.layer}: open the device model with "
                                  f"LocalModel.from_settings(..., capture_layers=[{pool_heads.layer}]).")  # fmt: skip
            absent = [t.name for t in pool.targets if not t.is_device and t.name not in self.pool_remotes]
            if absent:
                raise ConfigError(f"No client for the pool's remote target(s) {', '.join(absent)}.")
            if self.remote is None:  # the privacy checks ask whether anything could leave the device
                self.remote = next(iter(self.pool_remotes.values()), None)
        self._spent_in_process = 0.0  # a pool's spend when nothing is logged (log = false)
        if settings.route_on == "advantage" and settings.mode != "remote-only" and not self.predictor.predicts_remote:
            raise ConfigError(f"route_on = advantage routes on P(local passes) - P(remote passes), and the {self.predictor.name} "
                              "predictor does not predict the remote: use a probe with a remote head "
                              "(`rpra train probe --remote`, then predictor = probe), or route_on = p_pass.")  # fmt: skip
        self.store = store
        self.controller = Controller(threshold=settings.threshold, route_on=settings.route_on, mode=settings.mode,
                                     verify_threshold=settings.verify_threshold, allocation=allocation)
        self._slot = make_slot(local, settings.scale_max) if local else None
        self.redactor = Redactor(phone_region=settings.phone_region) if settings.redact else None

    @classmethod
    def from_settings(cls, settings: Settings, *, need_local: bool = True) -> Runtime:
        """Load what ``settings`` name: the device model (unless not needed), the remote, the log."""
        predictor = predictor_from_settings(settings)
        verifier = verifier_from_settings(settings)
        allocation = Allocation.load(settings.allocation) if settings.allocation else None
        pool, heads, remotes = pool_from_settings(settings)
        layers = sorted(set(predictor.capture_layers) | set(verifier.capture_layers if verifier else ()) | ({heads.layer} if heads else set()))
        # best-of-N's drafts decode as parallel sequences
        parallel = max(settings.best_of, allocation.best_of if allocation else 1) if verifier else 1
        local = LocalModel.from_settings(settings, capture_layers=layers or None, parallel=parallel) if need_local else None
        # never-defer is fully offline: no remote client exists to send anything with.
        remote = RemoteModel.from_settings(settings) if settings.remote_url and settings.privacy != "never-defer" else None
        store = LogStore.default() if settings.log else None
        return cls(settings, local=local, remote=remote, predictor=predictor, store=store, verifier=verifier, allocation=allocation,
                   pool=pool, pool_heads=heads, pool_remotes=remotes)  # fmt: skip

    def configured(self, **changes) -> Runtime:
        """This runtime with some settings changed for one request (e.g. ``max_tokens``), sharing
        its models, predictor and store. Settings the controller reads cannot change this way."""
        fixed = sorted(set(changes) & {"threshold", "route_on", "mode", "model", "adapter", "protocol", "predictor", "verifier",
                                       "verify_threshold", "best_of", "allocation", "pool", "pool_heads"})
        if fixed:
            raise ValueError(f"{', '.join(fixed)} cannot change per request; build another Runtime.")
        view = copy.copy(self)
        view.settings = dataclasses.replace(self.settings, **changes)
        return view

    def close(self) -> None:
        for remote in {id(r): r for r in [self.remote, *self.pool_remotes.values()] if r is not None}.values():
            remote.close()
        if self.store:
            self.store.close()

    def new_conversation(self, *, source: str) -> str | None:
        """Start a conversation in the log (None when this runtime logs nothing); pass its id to
        ``turn`` so the turns are grouped."""
        return self.store.new_conversation(source=source) if self.store else None

    def predict(self, messages: list[dict], *, mode: Mode = "local-only") -> Decided:
        """The device model's prediction and the controller's decision for ``messages``, without
        answering: the turn stops at its decision (nothing is generated after the slot, nothing is
        sent, nothing is logged) and the model is released.

        What the benchmark and training read for each record; ``mode`` only changes the
        decision's route, not the prediction.
        """
        _check_messages(messages)
        events = self._turn(messages, mode, TurnResult(model=self.settings.model), confirm=None)
        try:
            for event in events:
                if isinstance(event, Decided):
                    return event
        finally:
            events.close()  # runs the turn's cleanup: the model's lock is released
        raise AssertionError("a turn always decides before it answers")

    def read_draft(self, messages: list[dict], answer: str, *, layers: list[int] | None = None
                   ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:  # fmt: skip
        """The captured layers' states a verifier reads when ``answer`` is this turn's local draft:
        at the PA slot, and the mean over the draft in the layout the device answers in (the slot
        rewound, the answer after the assistant turn's start). The answer is committed in one
        batch, not generated; ``LocalSession.watched_states`` makes the two the same. For
        training and the benchmark, on recorded answers: nothing is generated, sent or logged."""
        _check_messages(messages)
        if self.local is None or not self.local.capture_layers:
            raise ConfigError("Reading a draft needs a device model that captures layers (LocalModel(..., capture_layers=...)).")
        with self.local.lock:
            session = self._open_session(messages, TurnResult(model=self.settings.model), opening=prompts.SLOT_OPEN["pa"])
            slot = session.layer_states("last")
            session.rewind(session.slot_at)
            session.watch_states()
            session.commit(self.local.tokenize(answer) or [self.local.end_of_turn])
            draft = session.watched_states()
        keep = set(layers) if layers is not None else set(slot)
        return {k: v for k, v in slot.items() if k in keep}, {k: v for k, v in draft.items() if k in keep}

    def drafts(self, messages: list[dict], n: int, *, temperature: float, max_tokens: int | None = None, batched: bool = True,
               seed: int | None = None) -> tuple[dict[int, np.ndarray], list[Generated]]:  # fmt: skip
        """``n`` local answers to ``messages`` in the layout the device answers in, with the captured
        layers' states at the PA slot and over each answer (for the verifier): the first greedy,
        the others sampled at ``temperature``. ``batched``: as parallel sequences in one llama.cpp
        batch per step (``LocalSession.sample_many``; the model opened with ``parallel >= n``);
        else one after another, each from the same cached prompt: the baseline it is measured
        against. Best-of-N's rung of the ladder (``rpra.ladder``); nothing is sent or logged."""
        _check_messages(messages)
        if self.local is None or not self.local.capture_layers:
            raise ConfigError("Drafts for the verifier need a device model that captures layers (LocalModel(..., capture_layers=...)).")
        s = self.settings
        budget = max_tokens or s.max_tokens
        with self.local.lock:
            session = self._open_session(messages, TurnResult(model=s.model), opening=prompts.SLOT_OPEN["pa"])
            slot = session.layer_states("last")
            session.rewind(session.slot_at)
            if batched:
                return slot, session.sample_many(n, budget, temperature=temperature, repeat_penalty=s.repeat_penalty, watch=True, seed=seed)
            outs = []
            for i in range(n):
                session.rewind(session.slot_at)
                session.watch_states()
                out = Generated()
                for _ in session.generate(budget, temperature=0.0 if i == 0 else temperature, repeat_penalty=s.repeat_penalty, out=out,
                                          seed=sequence_seed(self.local.seed if seed is None else seed, i)):  # fmt: skip
                    pass
                out.states = session.watched_states()
                outs.append(out)
            return slot, outs

    def revise(self, messages: list[dict], draft: str, *, max_tokens: int | None = None
               ) -> tuple[Generated, dict[int, np.ndarray], dict[int, np.ndarray]]:  # fmt: skip
        """The ladder's revision rung: the device model, shown its ``draft`` (``prompts.revision_messages``),
        answers again, greedily; then the revision is read as an answer to ``messages`` itself
        (``read_draft``), so the verifier scores it as it scores a draft. Returns the revision and
        those states (at the slot, over the answer); the log-probabilities are the revision's own,
        under the revision prompt. Nothing is sent or logged."""
        _check_messages(messages)
        s = self.settings
        question = messages[-1]["content"]
        with self.local.lock:
            session = self._open_session([*messages[:-1], *prompts.revision_messages(question, draft)], TurnResult(model=s.model),
                                         opening=prompts.SLOT_OPEN["pa"])  # fmt: skip
            session.rewind(session.slot_at)
            out = Generated()
            for _ in session.generate(max_tokens or s.max_tokens, temperature=0.0, repeat_penalty=s.repeat_penalty, out=out):
                pass
        out.text = _as_shown(out.text, answer_after_score=False).strip()  # the slot was rewound, as for a local answer
        slot, states = self.read_draft(messages, out.text)
        return out, slot, states

    def ask(self, messages: list[dict], *, mode: Mode | None = None, conversation_id: str | None = None) -> TurnResult:
        """Run one turn to completion and return its result."""
        for event in self.turn(messages, mode=mode, conversation_id=conversation_id):
            if isinstance(event, Finished):
                return event.result
        raise AssertionError("a turn always finishes with a Finished event")

    def turn(
        self,
        messages: list[dict],
        *,
        mode: Mode | None = None,
        conversation_id: str | None = None,
        source: str = "ask",
        confirm: Confirm | None = None,
    ) -> Iterator[Event]:
        """Run one turn over ``messages`` (the conversation so far, ending with the user's message).

        ``confirm`` is asked before a deferral when ``privacy = ask``; without one, such a turn
        stays local. A deferral kept on the device (declined, never-defer, no remote configured)
        is answered locally, or fails with a PrivacyError / ConfigError when no device model is
        loaded (mode remote-only). Closing the generator mid-turn logs what was decided and
        shown, as interrupted.
        """
        _check_messages(messages)
        mode = mode or self.settings.mode
        result = TurnResult(model=self.settings.model, max_tokens=self.settings.max_tokens)
        turn_id = None
        if self.store:
            result.conversation_id = conversation_id or self.store.new_conversation(source=source)
            turn_id = result.turn_id = self.store.start_turn(
                result.conversation_id,
                prompt=messages[-1]["content"],
                messages=messages,
                model=self.settings.model,
                protocol=self.settings.protocol,
                predictor=self.predictor.name,
                mode=mode,
            )
        shown: list[str] = []
        events = self._turn(messages, mode, result, confirm)
        try:
            for event in events:
                if isinstance(event, Text):
                    shown.append(event.text)
                yield event
        except BaseException as exc:  # noqa: BLE001 - logged, then re-raised untouched
            events.close()  # its cleanup first: the model's lock is released
            result.answer = "".join(shown).strip()
            if self.store and turn_id is not None:
                # Whatever is known (the decision, the text already shown) is kept with the error.
                reason = "interrupted" if isinstance(exc, (GeneratorExit, KeyboardInterrupt)) else str(exc)
                self.store.finish_turn(turn_id, **_log_fields(result, self.settings), status="error", error=reason)
            raise
        result.answer = "".join(shown).strip()
        if self.store and turn_id is not None:
            self.store.finish_turn(turn_id, **_log_fields(result, self.settings))
        yield Finished(result)

    # -- the turn itself ----------------------------------------------------------------------

    def _turn(self, messages: list[dict], mode: Mode, result: TurnResult, confirm: Confirm | None) -> Iterator[Event]:
        s = self.settings
        start = time.perf_counter()
        if mode == "remote-only" and s.privacy == "never-defer":
            raise PrivacyError("This device never defers (privacy = never-defer): mode remote-only is refused.")
        session = None
        holding = False  # whether this turn holds the local model's lock
        try:
            if self.controller.needs_prediction(mode):
                if self.local is None:
                    raise ConfigError("This runtime has no local model; use mode remote-only.")
                self.local.lock.acquire(urgent=True)  # a prediction goes before answers in progress
                holding = True
                try:
                    if s.protocol == "rpra":
                        session = self._open_session(messages, result, opening=prompts.REASONING_OPEN)
                        result.reasoning = self._reason(session, result)
                        session.slot_at = len(session.tokens)  # the answer follows the reasoning, not the score
                        session.extend(prompts.SLOT_OPEN["rpra"])  # evaluated with the last reasoning token
                    else:
                        session = self._open_session(messages, result, opening=prompts.SLOT_OPEN["pa"])
                    result.prediction = self.predictor.predict(session, self._slot, pass_mark=s.pass_mark)
                    result.decision = self.controller.decide(result.prediction, mode)
                    if self.pool is not None and mode == "auto":
                        result.decision = self._pick_target(session, result)
                except PromptTooLongError as exc:
                    if mode == "local-only" or self.remote is None:
                        raise
                    result.decision = Decision("remote", mode, f"prompt does not fit the local context: {exc}")
            else:
                result.decision = self.controller.decide(None, mode)

            outgoing, vault, kept = None, None, None
            if result.decision.route == "remote":
                outgoing, vault = self._outgoing(messages, result)
                kept = self._kept_on_device(outgoing, confirm)
                if kept:
                    result.decision = dataclasses.replace(
                        result.decision, route="local", reason=f"{result.decision.reason}; kept on the device: {kept}"
                    )
                    if self.local is None:  # mode remote-only, with no device model loaded
                        raise _cannot_answer(kept)
                    if not holding:
                        self.local.lock.acquire()
                        holding = True
                    if session is None:
                        session = self._open_session(messages, result, opening=prompts.SLOT_OPEN["pa"])
            if result.decision.route == "remote" and holding:
                self.local.lock.release()  # deferred requests do not hold the local model
                holding = False
        except BaseException:
            if holding:
                self.local.lock.release()
            raise
        result.timings_ms["decision"] = _ms(start)

        if result.decision.route == "local" and kept is None and drafts_first(result.decision.action):
            yield from self._allocated_rung(messages, session, result)
        elif result.decision.route == "local" and self._checks_draft(mode, kept, result):
            yield from self._draft_and_check(messages, session, result, confirm)
        elif result.decision.route == "local":
            try:  # the lock is still held: release it even if the consumer stops listening here
                yield self._decided(result)
                if kept == _NO_REMOTE:
                    yield Notice(f"{_NO_REMOTE} (set RPRA_REMOTE_URL to defer); answering on the device")
                yield from self._answer_locally(session, result)
            finally:
                self.local.lock.release()
        else:
            yield self._decided(result)
            yield from self._answer_remotely(messages, outgoing, vault, session, result)
        result.timings_ms["total"] = _ms(start)

    def _checks_draft(self, mode: Mode, kept: str | None, result: TurnResult) -> bool:
        """Whether this local turn drafts unseen for the verifier: a verifier is set, the controller
        decides (mode auto) by the threshold (not an allocation's rung), the prediction kept it
        local, and a deferral could leave the device (a remote, and privacy not never-defer):
        otherwise the check could change nothing."""
        return (self.verifier is not None and mode == "auto" and kept is None and result.prediction is not None
                and result.decision.action is None  # an allocation has decided already
                and self.remote is not None and self.settings.privacy != "never-defer")

    def _draft_and_check(self, messages: list[dict], session: LocalSession, result: TurnResult, confirm: Confirm | None) -> Iterator[Event]:
        """The cascade's second point: draft the answer without showing it, let the verifier
        score it, then show it, or defer it unseen (``Controller.check``)."""
        started = time.perf_counter()
        try:  # the lock is held from the first decision: release it even if the consumer stops listening here
            yield Notice("checking the local draft before showing it")
            shown = [e for e in self._answer_locally(session, result, watch=True)]
            slot = session.layer_states("last")[self.verifier.layer]
            draft = session.watched_states()[self.verifier.layer]
            stats = {**(result.local_logprobs or {}), "tokens": result.tokens.get("local_answer", 0)}
            p_remote = result.prediction.p_remote
            result.draft_prediction = self.verifier.verify(slot, draft, stats, pass_mark=self.settings.pass_mark, p_remote=p_remote)
            checked = self.controller.check(result.decision, result.draft_prediction)
            result.rungs.append({"rung": "draft", "p_pass": round(result.draft_prediction.p_pass, 4), "kept": checked.route == "local"})
            if checked.route == "remote" and self.settings.best_of > 1:  # the ladder's next rung before deferring
                yield Notice(f"the draft was doubted; drawing {self.settings.best_of} more in one batch")
                text, verdict = self._best_of(session, result, slot, self.settings.best_of, p_remote=result.draft_prediction.p_remote,
                                              first=("".join(e.text for e in shown), result.draft_prediction))  # fmt: skip
                result.draft_prediction = verdict
                checked = self.controller.check(result.decision, verdict)
                result.rungs.append({"rung": f"best-of-{self.settings.best_of}", "p_pass": round(verdict.p_pass, 4), "kept": checked.route == "local"})
                shown = [Text(text, "local")]
            result.timings_ms["draft_check"] = _ms(started)
            outgoing = vault = None
            if checked.route == "remote":
                outgoing, vault = self._outgoing(messages, result)
                if kept := self._kept_on_device(outgoing, confirm):
                    checked = dataclasses.replace(checked, route="local", reason=f"{checked.reason}; kept on the device: {kept}")
            result.decision = checked
            yield self._decided(result)
            if checked.route == "local":
                yield from shown
                return
            result.discarded_draft = "".join(e.text for e in shown if isinstance(e, Text))
            result.answered_by = ""
        finally:
            self.local.lock.release()
        yield from self._answer_remotely(messages, outgoing, vault, session, result)

    def _pick_target(self, session: LocalSession, result: TurnResult) -> Decision:
        """Routing over a pool: each target's P(right) from the device model's slot state (one head
        each), its expected cost at its prices (this prompt's tokens, its mean answer length on
        train), and the pool's rule within what the budget still allows (``rpra.pool.pick``)."""
        heads, pool = self.pool_heads, self.pool
        rewards = heads.rewards(session.layer_states("last")[heads.layer])
        tokens_in = len(session.tokens)
        expected_out = {n: (heads.meta.get("targets", {}).get(n, {}).get("tokens_out_mean") or self.settings.max_tokens) for n in pool.names}
        costs = {t.name: t.cost(tokens_in, expected_out[t.name]) for t in pool.targets}
        spendable = self.budget_left()
        name = pick(pool, rewards, costs, spendable=spendable)
        result.pool = {"target": name, "rewards": {n: round(v, 4) for n, v in rewards.items()},
                       "expected_cost": {n: round(c, 8) for n, c in costs.items()}, "latency_s": pool.target(name).latency_s,
                       "budget_left": spendable, "cost": 0.0}  # fmt: skip
        rule = f"within {pool.tolerance:g} of the best, the cheapest" if pool.rule == "tolerance" else f"best reward - {pool.cost_weight:g} x cost"
        budget = "" if spendable is None else f"; budget left {spendable:.4g}"
        reason = f"pool ({rule}): {name}, P(right) {rewards[name]:.2f}, expected cost {costs[name]:.2g}{budget}"
        target = pool.target(name)
        return Decision("local" if target.is_device else "remote", "auto", reason, score=rewards[name], route_on="p_pass")

    def budget_left(self) -> float | None:
        """What the pool may still spend today and this month (the tighter), from the turns logged
        (their ``cost``), or this process's own spend when nothing is logged; None without a budget."""
        if self.pool is None or (self.pool.budget_day is None and self.pool.budget_month is None):
            return None
        if self.store is None:
            return budget_left(self.pool, spent_day=self._spent_in_process, spent_month=self._spent_in_process)
        day, month = period_starts(datetime.now(timezone.utc))
        return budget_left(self.pool, spent_day=self.store.spent(day), spent_month=self.store.spent(month))

    def _allocated_rung(self, messages: list[dict], session: LocalSession, result: TurnResult) -> Iterator[Event]:
        """The allocation's local rungs, drafted unseen, then shown (the allocation has decided
        the route; nothing defers here). best-of-N: N drafts in one batch (the first greedy), the
        verifier's weighted best shown. revise: a draft, and where the verifier doubts it
        (``ladder.REVISE_BELOW``) the device's revision, shown if the verifier scores it higher."""
        from rpra.ladder import REVISE_BELOW

        s, action = self.settings, result.decision.action
        started = time.perf_counter()
        layer = self.verifier.layer
        p_remote = result.prediction.p_remote
        holding = True
        try:  # the lock is held from the first decision: release it even if the consumer stops listening here
            slot = session.layer_states("last")[layer]
            if n := best_of_n(action):
                yield Notice(f"drawing {n} drafts in one batch (the allocation's rung for this request)")
                text, result.draft_prediction = self._best_of(session, result, slot, n, p_remote=p_remote)
                result.rungs.append({"rung": action, "p_pass": round(result.draft_prediction.p_pass, 4), "kept": True})
            else:  # revise
                yield Notice("checking the local draft, to revise it if the verifier doubts it (the allocation's rung)")
                text = "".join(e.text for e in self._answer_locally(session, result, watch=True) if isinstance(e, Text))
                stats = {**(result.local_logprobs or {}), "tokens": result.tokens.get("local_answer", 0)}
                verdict = self.verifier.verify(slot, session.watched_states()[layer], stats, pass_mark=s.pass_mark, p_remote=p_remote)
                result.draft_prediction = verdict
                result.rungs.append({"rung": "draft", "p_pass": round(verdict.p_pass, 4), "kept": verdict.p_pass >= REVISE_BELOW})
                if verdict.p_pass < REVISE_BELOW:
                    self.local.lock.release()  # revise opens its own session under the lock
                    holding = False
                    revision, slot_r, states_r = self.revise(messages, text)
                    revised = self.verifier.verify(slot_r[layer], states_r[layer], revision.logprobs, pass_mark=s.pass_mark, p_remote=p_remote)
                    better = revised.p_pass > verdict.p_pass
                    result.rungs.append({"rung": "revise", "p_pass": round(revised.p_pass, 4), "kept": better})
                    if better:
                        text, result.draft_prediction = revision.text, revised
                        result.tokens["local_answer"] += revision.tokens
            result.timings_ms["draft_check"] = _ms(started)
            yield self._decided(result)
        finally:
            if holding:
                self.local.lock.release()
        if text:
            yield Text(text, "local")

    def _best_of(self, session: LocalSession, result: TurnResult, slot: np.ndarray, n: int, *, p_remote: float | None,
                 first: tuple[str, Prediction] | None = None) -> tuple[str, Prediction]:  # fmt: skip
        """Best-of-N: ``n`` drafts sampled as parallel sequences in one batch (``LocalSession.sample_many``),
        scored by the verifier, the weighted best kept (``ladder.choose``). ``first``: a draft
        already made and its verdict (the cascade's doubted one), which competes with the ``n``
        samples; without one the first sequence is the greedy draft. Returns the kept text, as it
        would be shown, and its verdict."""
        from rpra.ladder import choose

        s = self.settings
        session.rewind(session.slot_at)
        drafts = session.sample_many(n, s.max_tokens, temperature=s.sample_temperature, repeat_penalty=s.repeat_penalty,
                                     greedy_first=first is None, watch=True)  # fmt: skip
        texts, verdicts = ([first[0]], [first[1]]) if first else ([], [])
        for d in drafts:
            texts.append(_as_shown(d.text, s.answer_after_score))
            verdicts.append(self.verifier.verify(slot, d.states[self.verifier.layer], d.logprobs, pass_mark=s.pass_mark, p_remote=p_remote))
        result.answered_by = "local"
        result.tokens["local_answer"] = result.tokens.get("local_answer", 0) + sum(d.tokens for d in drafts)
        best = choose(texts, [v.p_pass for v in verdicts], rule="weighted")
        if best >= len(texts) - len(drafts):  # one of the samples, not the draft passed in
            result.finish_reason = drafts[best - (len(texts) - len(drafts))].finish_reason
        return texts[best], verdicts[best]

    @staticmethod
    def _decided(result: TurnResult) -> Decided:
        return Decided(result.decision, result.prediction, result.reasoning, result.tokens.get("reasoning", 0), result.timings_ms["decision"])

    def _outgoing(self, messages: list[dict], result: TurnResult) -> tuple[list[dict], Vault]:
        """Exactly what a deferral would send: the conversation (roles and text, nothing else),
        the reasoning if configured, redacted if configured (else the vault stays empty)."""
        sent = [{"role": m["role"], "content": m["content"]} for m in messages]
        if self.settings.send_reasoning and result.reasoning:
            sent.append({"role": "system", "content": f"An on-device assistant's first thoughts (may be wrong): {result.reasoning}"})
        if self.redactor is None:
            return sent, Vault()
        sent, vault = redact_messages(sent, self.redactor)
        if len(vault):  # restoring needs the placeholders back verbatim
            # First, where instructions go: sent after the user's turn, the note competed with the
            # request, and the stand-in remote (Qwen2.5-Coder-1.5B) answered with the note itself.
            sent = merge_system({"role": "system", "content": _PLACEHOLDER_NOTE}, sent)
        return sent, vault

    def _kept_on_device(self, outgoing: list[dict], confirm: Confirm | None) -> str | None:
        """Why a deferral stays on the device, or None when it may leave."""
        policy = self.settings.privacy
        if policy == "never-defer":
            return "privacy = never-defer"
        if self.remote is None:  # an intended set-up, not a failure: no one is asked, nothing fails
            return _NO_REMOTE
        if policy == "ask":
            if confirm is None:
                return "privacy = ask, and no one to ask"
            if not confirm(outgoing):
                return "the user declined to send it"
        return None

    def _open_session(self, messages: list[dict], result: TurnResult, *, opening: str) -> LocalSession:
        """Prefill the conversation and the assistant turn's ``opening`` text in one batch.

        Runtime-written text goes into the prompt's batch rather than a decode of its own: a small
        decode costs about as much as a generated token. The oldest messages are left out if the
        conversation outgrows the context.
        """
        system = {"role": "system", "content": self.predictor.system_prompt(self.settings.protocol, self.settings.scale_max)}
        reserve = _SLOT_TOKENS + (self.settings.reason_tokens if self.settings.protocol == "rpra" else 0)
        convo = merge_system(system, [self._as_seen_locally(m) for m in messages])
        while True:
            tokens = self.local.chat_tokens(convo)
            if len(tokens) + reserve <= self.local.n_ctx or len(convo) <= 2:
                break
            convo = [convo[0], *convo[2:]]  # keep our system prompt, drop the oldest message
            result.dropped_messages += 1
        started = time.perf_counter()
        session = self.local.session(tokens + self.local.tokenize(opening), reserve=reserve)
        session.slot_at = len(tokens)  # where the assistant's turn starts: a local answer starts there too
        result.timings_ms["prefill"] = _ms(started)
        result.tokens["prompt"] = session.prompt_tokens
        result.tokens["prompt_reused"] = session.reused_tokens
        return session

    def _as_seen_locally(self, message: dict) -> dict:
        """Earlier assistant turns in the turn layout: as generated, or with the score the runtime
        wrote then (``answer_after_score``).

        A turn without a recorded ``rating`` (e.g. history from another client) gets the scale's
        midpoint: some rating keeps the layout consistent, and the midpoint anchors the least.
        Rating-like text in any message is neutralised first (``prompts.neutralise_ratings``): the
        model imitates a score it reads, so a request ending in "Rating: [[10]]" would steer it.
        """
        message = {**message, "content": prompts.neutralise_ratings(message["content"])}
        if message["role"] != "assistant" or not self.settings.answer_after_score:
            # Answers are generated without the score before them (answer_after_score off), so an
            # earlier one is shown as it was generated, and the cache is reused through it.
            return {"role": message["role"], "content": message["content"]}
        score = message.get("rating") or (self.settings.scale_max + 1) // 2
        return {"role": "assistant", "content": prompts.past_answer(message["content"], score)}

    def _reason(self, session: LocalSession, result: TurnResult) -> str:
        """The short, bounded reasoning before the prediction (RPRA): one line at most."""
        out = Generated()
        for _ in session.generate(self.settings.reason_tokens, temperature=self.settings.temperature, stop="\n", out=out, repeat_penalty=self.settings.repeat_penalty):
            pass
        result.tokens["reasoning"] = out.tokens
        return out.text.strip()

    def _answer_locally(self, session: LocalSession, result: TurnResult, *, watch: bool = False) -> Iterator[Event]:
        """Generate the local answer, streamed as Text events; ``watch``: keep the captured layers'
        states over it, for the verifier (``LocalSession.watch_states``)."""
        s = self.settings
        started = time.perf_counter()
        result.answered_by = "local"
        if self.local.lock.contended():  # answers queued before this one go first
            self._step_aside(session)
        if s.answer_after_score:
            score = result.prediction.mode if result.prediction else s.scale_max
            session.commit(self.local.tokenize(str(score)) + self.local.tokenize(prompts.SCORE_CLOSE))
        else:
            # The slot goes: a small model's answer copies the score it reads ("[[1]]" ... "The
            # answer is 1."). Its KV cells are dropped, so this costs one token's decode.
            session.rewind(session.slot_at)
        if watch:
            session.watch_states()
        out = Generated()
        started_text = False
        rating_line = None if s.answer_after_score else prompts.LeadingRatingFilter()  # a score the model writes itself

        def shown(piece: str) -> str:
            nonlocal started_text
            if not started_text:  # the answer follows "\n"; models often lead with a space
                piece = piece.lstrip()
                started_text = bool(piece)
            return piece

        for piece in session.generate(s.max_tokens, temperature=s.temperature, repeat_penalty=s.repeat_penalty, out=out):
            if piece := shown(rating_line.feed(piece) if rating_line else piece):
                yield Text(piece, "local")
            if self.local.lock.urgent_waiting():  # a new request waits to predict: let it
                self._step_aside(session)
        if rating_line and (tail := shown(rating_line.flush())):
            yield Text(tail, "local")
        result.finish_reason = out.finish_reason
        result.tokens["local_answer"] = out.tokens
        if out.logprobs:  # the answer's own confidence: a signal for decisions after the draft
            result.local_logprobs = {"mean": sum(out.logprobs) / len(out.logprobs), "min": min(out.logprobs)}
        result.timings_ms["local_answer"] = _ms(started)

    def _step_aside(self, session: LocalSession) -> None:
        """Let waiting requests use the model, then carry on exactly where this answer was.

        Called with the lock held, between two tokens: the session's KV cells are copied out (a
        few milliseconds), the lock goes to the waiters (predictions first), and the cells come
        back before the next token is evaluated, so the answer is the one it would have been.
        """
        saved = session.suspend()
        self.local.lock.release()
        self.local.lock.acquire()
        session.resume(saved)

    def _answer_remotely(
        self, messages: list[dict], sent: list[dict], vault: Vault, session: LocalSession | None, result: TurnResult
    ) -> Iterator[Event]:
        s = self.settings
        started = time.perf_counter()
        result.sent_remote = sent
        result.redactions = vault.entries
        shown: list[str] = []  # the answer as the user sees it: placeholders restored
        restorer = StreamRestorer(vault)
        remote = self.pool_remotes.get((result.pool or {}).get("target"), self.remote)  # a pool's chosen target, else the remote
        pieces = remote.stream(
            sent, max_tokens=s.max_tokens, temperature=s.temperature, waiting_after=_WAITING_NOTICE_AFTER
        )
        try:
            for piece in pieces:
                if isinstance(piece, Waiting):
                    yield Notice(
                        f"waiting for the remote ({remote.base_url}): no answer after {piece.seconds:g} s; "
                        f"giving up at {remote.first_token_timeout:g} s"
                    )
                elif text := restorer.feed(piece):
                    result.answered_by = "remote"
                    shown.append(text)
                    yield Text(text, "remote")
            if tail := restorer.flush():
                shown.append(tail)
                yield Text(tail, "remote")
        except RemoteError as error:
            result.timings_ms["remote"] = _ms(started)
            yield from self._fall_back(messages, session, result, error, "".join(shown))
            return
        finally:
            pieces.close()  # a consumer that walks away mid-answer closes the connection now
        result.timings_ms["remote"] = _ms(started)
        result.answered_by = "remote"
        result.finish_reason = remote.last_finish_reason or "stop"
        usage = remote.last_usage
        result.tokens["remote_prompt"] = usage.prompt_tokens or 0
        result.tokens["remote_completion"] = usage.completion_tokens
        if result.pool is not None:  # what the turn cost at the chosen target's prices: the budget's spend
            cost = self.pool.target(result.pool["target"]).cost(usage.prompt_tokens or 0, usage.completion_tokens or 0)
            result.pool["cost"] = cost
            self._spent_in_process += cost

    def _fall_back(
        self, messages: list[dict], session: LocalSession | None, result: TurnResult, error: RemoteError, partial: str
    ) -> Iterator[Event]:
        """The remote could not answer: the device model does, clearly flagged.

        Text the remote already streamed stays on screen, so it stays in the answer too, and a
        marker shows where the local answer starts: what is recorded is what the user saw.
        """
        result.fallback = True
        result.remote_error = str(error)
        result.remote_partial = partial or None
        if self.local is None:
            raise error
        if result.discarded_draft is not None:  # the draft is already made: show it, flagged
            yield Notice(f"remote failed ({error}); showing the local draft the verifier had set aside")
            if partial:
                yield Text(_BROKE_OFF, "local")
            result.answered_by = "local"
            yield Text(result.discarded_draft, "local")
            result.discarded_draft = None
            return
        with self.local.lock:
            try:
                session = self._resume_session(messages, session, result)
            except PromptTooLongError as exc:
                raise RemoteError(f"{error} No local fallback either: {exc}") from exc
            if partial:
                yield Notice(f"the remote failed mid-answer ({error}); answering locally")
                yield Text(_BROKE_OFF, "local")
            else:
                yield Notice(f"remote failed ({error}); answering locally")
            yield from self._answer_locally(session, result)

    def _resume_session(self, messages: list[dict], session: LocalSession | None, result: TurnResult) -> LocalSession:
        """Reopen the local sequence after a failed deferral.

        Prefix reuse makes this free when nothing else used the model meanwhile: the cache still
        holds the prompt, the reasoning and the slot, and only the last token is evaluated again.
        """
        if session is not None:
            resumed = self.local.session(session.tokens)
            resumed.slot_at = session.slot_at
            return resumed
        # remote-only mode: no prediction was made, so answer in the PA layout without one.
        return self._open_session(messages, result, opening=prompts.SLOT_OPEN["pa"])


def _as_shown(text: str, answer_after_score: bool) -> str:
    """A generated answer as ``_answer_locally`` shows it: no leading space, and without the
    answer-after-score layout, no rating line the model wrote itself."""
    if not answer_after_score:
        rating = prompts.LeadingRatingFilter()
        text = rating.feed(text) + rating.flush()
    return text.lstrip()


def pool_from_settings(settings: Settings) -> tuple[Pool | None, PoolHeads | None, dict[str, RemoteModel]]:
    """The pool the settings name, its reward heads (checked against the device model) and a
    client for each remote target; (None, None, {}) without one. Under privacy = never-defer the
    pool keeps only its device target and no client is made: nothing may leave the device."""
    if not settings.pool:
        return None, None, {}
    import os

    from rpra.models import file_sha256, resolve
    from rpra.pool import default_pool_path, load_pool

    pool = load_pool(settings.pool)
    model = resolve(settings.model)
    heads = PoolHeads.load(Path(settings.pool_heads).expanduser() if settings.pool_heads else default_pool_path(model))
    if heads.meta.get("encoder_sha256") not in (None, file_sha256(model)):
        raise ConfigError(f"The pool heads were fitted on another model than {settings.model}: refit them (`rpra train pool`).")
    if settings.privacy == "never-defer":  # nothing may leave the device: the pool is its device target, if any
        device = tuple(t for t in pool.targets if t.is_device)
        return (dataclasses.replace(pool, targets=device) if device else None), (heads if device else None), {}
    remotes = {}
    for t in pool.targets:
        if not t.is_device:
            key = os.environ.get(t.api_key_env) if t.api_key_env else None
            remotes[t.name] = RemoteModel(t.url, model=t.model, api_key=key, timeout=settings.remote_timeout,
                                          connect_timeout=min(5.0, settings.remote_timeout), retries=settings.remote_retries,
                                          first_token_timeout=settings.remote_first_token_timeout)  # fmt: skip
    return pool, heads, remotes


def verifier_from_settings(settings: Settings) -> DraftVerifier | None:
    """The cascade's verifier the settings name (``verifier``), checked against the model; None unset."""
    if not settings.verifier:
        return None
    from rpra.models import file_sha256, resolve
    from rpra.probe import Probe

    probe = Probe.load(settings.verifier)
    probe.check_model(file_sha256(resolve(settings.model)), settings.model)
    try:
        return DraftVerifier(probe)
    except ValueError as exc:
        raise ConfigError(f"{settings.verifier}: {exc}") from None


def predictor_from_settings(settings: Settings) -> Predictor:
    """The predictor the settings name; a report card or a probe is read from its file."""
    if settings.predictor == "report-card":
        path = Path(settings.report_card).expanduser()
        try:
            return ReportCardPredictor(path.read_text())
        except OSError as exc:
            raise ConfigError(f"Cannot read the report card {path}: {exc.strerror}. Build one with `rpra report-card build`.") from None
        except ValueError:
            raise ConfigError(f"The report card {path} is empty. Rebuild it with `rpra report-card build`.") from None
    if settings.predictor == "probe":
        from rpra.models import file_sha256, resolve
        from rpra.probe import Probe, default_probe_path

        model = resolve(settings.model)
        probe = Probe.load(settings.probe or default_probe_path(model))
        probe.check_model(file_sha256(model), settings.model)
        return ProbePredictor(probe)
    if settings.predictor == "fine-tuned" or settings.adapter:
        return FineTunedPredictor()
    return ZeroShotPredictor()


def _check_messages(messages: list[dict]) -> None:
    if not messages:
        raise InputError("The conversation is empty: send at least one user message.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise InputError(f"Message {i} needs a role (system, user or assistant) and text content.")
        rating = m.get("rating")
        if rating is not None and (m["role"] != "assistant" or not isinstance(rating, int) or rating < 1):
            raise InputError(f"Message {i}: 'rating' is the score of an earlier assistant turn, a positive integer.")
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputError(
                f"Message {i} is not valid text (character {exc.start} cannot be encoded as UTF-8); send UTF-8 text."
            ) from None
    if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise InputError("The prompt is empty: the last message must be a non-blank user message.")


def _cannot_answer(kept: str) -> RpraError:
    """The error for a deferral kept on the device when no device model is loaded to answer it."""
    if kept == _NO_REMOTE:
        return ConfigError(
            "Mode remote-only needs a remote: set RPRA_REMOTE_URL (and RPRA_REMOTE_MODEL), or run "
            "`rpra serve-remote` for a local stand-in."
        )
    return PrivacyError(
        f"Nothing was sent to the remote ({kept}), and in mode remote-only no device model is loaded to "
        "answer instead. Answer yes when asked (in a terminal), use privacy allow (--privacy allow), or "
        "leave mode remote-only so the device model answers."
    )


def merge_system(system: dict, messages: list[dict]) -> list[dict]:
    """Our instructions first; a user's own system messages are kept after them."""
    if messages and messages[0]["role"] == "system":
        merged = {"role": "system", "content": f"{system['content']}\n\n{messages[0]['content']}"}
        return [merged, *messages[1:]]
    return [system, *messages]


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 2)


def _log_fields(r: TurnResult, s: Settings) -> dict:
    t, n = r.timings_ms, r.tokens
    return dict(
        prediction_json=(r.prediction.to_dict() | ({"draft_check": r.draft_prediction.to_dict()} if r.draft_prediction else {})
                         if r.prediction else None),
        expected=r.prediction.expected if r.prediction else None,
        p_pass=r.prediction.p_pass if r.prediction else None,
        route=r.decision.route if r.decision else None,
        reason=r.decision.reason if r.decision else None,
        answered_by={"local": f"local:{s.model}", "remote": f"remote:{s.remote_model}"}.get(r.answered_by),
        fallback=int(r.fallback),
        remote_error=r.remote_error,
        remote_partial=r.remote_partial,
        reasoning=r.reasoning or None,
        answer=r.answer,
        sent_remote_json=r.sent_remote,
        redactions_json=r.redactions,
        decision_ms=t.get("decision"),
        local_ms=(t.get("decision", 0) + t.get("local_answer", 0)) if r.prediction else t.get("local_answer"),
        remote_ms=t.get("remote"),
        total_ms=t.get("total"),
        prompt_tokens=n.get("prompt"),
        local_tokens=n.get("reasoning", 0) + n.get("local_answer", 0),
        remote_tokens=n.get("remote_completion"),
        target=(r.pool or {}).get("target"),
        cost=(r.pool or {}).get("cost"),
    )
