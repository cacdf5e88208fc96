"""The device model through llama.cpp. This is the only module that imports ``llama_cpp``.

One request is one sequence in one llama.cpp context: the prompt is prefilled once, the score
slot is read from the logits at its position, and the answer (if the model answers locally)
continues from the same KV cache. A new request reuses the longest prefix it shares with what the
cache already holds (the system prompt, earlier turns of the conversation), so that is not
prefilled again either.

Requests take turns on the context through ``ModelLock``, where predictions go first: a local
answer in progress steps aside between two tokens (``LocalSession.suspend`` copies its KV cells
out, ``resume`` puts them back, a few milliseconds) so that a new request's routing decision never
waits for someone else's whole answer.

A model opened with ``capture_layers`` also keeps those layers' residual stream from the prefill
the request needs anyway (``LocalSession.layer_states``), read through llama.cpp's graph
evaluation callback: features for probes on intermediate layers at no extra evaluation.
"""

from __future__ import annotations

import codecs
import ctypes
import itertools
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from rpra.errors import ConfigError, CorruptModelError, ModelError, PromptTooLongError
from rpra.slot import ScoreSlot

# llama-cpp-python's default sampling chain; temperature and repeat penalty are settings.
_SAMPLING = dict(top_k=40, top_p=0.95, min_p=0.05)

Pool = Literal["last", "mean", "last-k"]


class ModelLock:
    """The device model's lock, with two kinds of waiter.

    ``acquire(urgent=True)`` is for a request about to predict: it goes before every other waiter.
    Plain ``acquire()`` waits in FIFO order behind the urgent ones. Whoever holds the lock while
    answering checks ``urgent_waiting()`` between tokens and steps aside (suspend, release,
    acquire, resume). Unlike ``threading.Lock`` it may be released by another thread than the one
    that took it: a streaming turn can be resumed on another thread.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._held = False
        self._urgent = 0
        self._queue: deque[int] = deque()  # tickets of plain waiters, oldest first
        self._tickets = itertools.count()

    def acquire(self, blocking: bool = True, *, urgent: bool = False, timeout: float | None = None) -> bool:
        """Wait for the model (at most ``timeout`` seconds; not at all unless ``blocking``); True once held."""
        if not blocking:
            timeout = 0
        with self._cond:
            if urgent:
                self._urgent += 1
                try:
                    got = self._cond.wait_for(lambda: not self._held, timeout)
                finally:
                    self._urgent -= 1
                    self._cond.notify_all()  # plain waiters re-check once no urgent one is left
            else:
                ticket = next(self._tickets)
                self._queue.append(ticket)
                try:
                    got = self._cond.wait_for(lambda: not self._held and not self._urgent and self._queue[0] == ticket, timeout)
                finally:
                    self._queue.remove(ticket)
                    self._cond.notify_all()
            self._held = self._held or got
            return got

    def release(self) -> None:
        with self._cond:
            if not self._held:
                raise RuntimeError("ModelLock released while not held")
            self._held = False
            self._cond.notify_all()

    def locked(self) -> bool:
        return self._held

    def urgent_waiting(self) -> bool:
        """A request waits to make its prediction."""
        return self._urgent > 0

    def contended(self) -> bool:
        """Anyone waits at all."""
        return self._urgent > 0 or bool(self._queue)

    def __enter__(self) -> ModelLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class _Suspended:
    """A session's KV cells and token history, held outside the context while another request runs."""

    kv: bytes
    n_tokens: int
    input_ids: np.ndarray


@dataclass
class Generated:
    """Bookkeeping of one ``LocalSession.generate`` call, filled in as tokens stream."""

    text: str = ""
    tokens: int = 0
    finish_reason: str = "stop"  # "stop" (end of turn or a stop string), "length" or "context"
    # Per sampled token, its log-probability under the model's own distribution: the full softmax
    # of the raw logits at temperature 1, before repeat penalty and top-k / top-p / min-p. Whatever
    # the sampling settings, that is the model's confidence (mean / min: the answer-confidence baseline).
    logprobs: list[float] = field(default_factory=list)
    # ``LocalSession.sample_many(watch=True)``: the captured layers' mean over the answer.
    states: dict[int, np.ndarray] | None = None


class LocalModel:
    """A GGUF model loaded once; requests take turns on it (``lock``) and each opens a session."""

    def __init__(
        self,
        path: Path | str,
        *,
        name: str | None = None,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_batch: int = 256,
        adapter: Path | str | None = None,
        seed: int = 0,
        use_mmap: bool = True,
        use_mlock: bool = False,
        capture_layers: Sequence[int] | None = None,
        capture_tokens: int | None = 1,
        parallel: int = 1,
    ):
        """``parallel``: how many sequences one context decodes together (llama.cpp's
        ``n_seq_max``, with one KV cache the sequences share): ``LocalSession.sample_many`` draws
        that many answers at once over a prompt evaluated once.
        ``capture_layers``: layers whose residual stream (llama.cpp's ``l_out-<i>``, the output of
        block ``i``; 0-based) every prefill keeps, for ``LocalSession.layer_states``.
        ``capture_tokens``: how many of the prompt's last tokens a capturing prefill always
        evaluates, even where the cache holds them: only evaluated tokens are seen, so pooling over
        the last ``k`` tokens needs ``k`` here, and over the whole prompt ``None`` (which turns prefix
        reuse off). The default, 1, keeps prefix reuse whole and gives the last token's state.
        """
        from rpra.config import default_threads
        from rpra.models import check_gguf

        path = Path(path)
        check_gguf(path)
        if adapter is not None:
            check_gguf(Path(adapter))
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        threads = n_threads or default_threads()
        try:
            self._llm = llama_cpp.Llama(
                model_path=str(path),
                lora_path=str(adapter) if adapter else None,
                n_ctx=n_ctx,
                # The prompt's batches too: llama-cpp-python would give them every CPU, which
                # oversubscribes the cores a profile or the affinity mask left to others.
                n_threads=threads,
                n_threads_batch=threads,
                n_batch=n_batch,
                seed=seed,
                use_mmap=use_mmap,
                use_mlock=use_mlock,
                verbose=False,
            )
        except ValueError as exc:
            raise CorruptModelError(
                f"llama.cpp could not load {path}{f' with adapter {adapter}' if adapter else ''} ({exc}). "
                "The file is probably truncated or corrupt: re-download it with `rpra models pull NAME --force`."
            ) from None
        self._lib = llama_cpp
        self.path = path
        self.name = name or path.stem
        self.adapter = Path(adapter) if adapter else None
        self.seed = seed
        # Requests share one context, so they take turns (see ModelLock).
        self.lock = ModelLock()
        model = self._llm._model
        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ModelError(f"{path} has no chat template in its metadata; rpra needs an instruction-tuned chat model.")
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(model.token_eos()),
            bos_token=model.token_get_text(model.token_bos()),
        )
        self._vocab = model.vocab
        self._bos = model.token_bos() if model.add_bos_token() else None
        self._n_vocab = self._llm.n_vocab()
        self._n_layer = llama_cpp.llama_model_n_layer(self._llm.model)
        self.capture_tokens = capture_tokens
        self._tap: _LayerTap | None = None
        if parallel < 1:
            raise ConfigError(f"parallel is {parallel}; use 1 or more sequences.")
        self.parallel = parallel
        if parallel > 1:  # read by llama.cpp only when a context is made: made again below
            self._llm.context_params.n_seq_max = parallel
            self._llm.context_params.kv_unified = True  # one cache: the prompt's cells are shared, not copied
        if capture_layers is not None:
            if capture_tokens is not None and capture_tokens < 1:
                raise ConfigError(f"capture_tokens is {capture_tokens}; use 1 or more, or None for the whole prompt.")
            layers = sorted(set(capture_layers))
            if not layers or layers[0] < 0 or layers[-1] >= self.n_layer:
                raise ConfigError(
                    f"capture_layers {list(capture_layers)} is not a non-empty set of layers of {path.name}, "
                    f"which has {self.n_layer} (0 to {self.n_layer - 1})."
                )
            self._tap = _LayerTap(layers, self.n_embd)
        if self._tap is not None or parallel > 1:
            _recreate_context(self._llm, self._tap.callback if self._tap else None)

    @classmethod
    def from_settings(
        cls, settings, *, capture_layers: Sequence[int] | None = None, capture_tokens: int | None = 1, parallel: int = 1
    ) -> LocalModel:
        """The device model as ``settings`` name it: the model and adapter (resolved and checked
        against each other), context, threads, batch, seed, mmap / mlock.

        The one way the runtime, the benchmark and training open it; a caller that needs
        something else changes the settings (``dataclasses.replace``), not this call.
        ``capture_layers`` / ``capture_tokens`` / ``parallel``: layer capture and parallel
        sequences, as in ``LocalModel()`` (not settings yet).
        """
        from rpra.adapters import resolve_adapter
        from rpra.models import resolve

        path = resolve(settings.model)
        return cls(
            path,
            name=settings.model,
            n_ctx=settings.n_ctx,
            n_threads=settings.n_threads,
            n_batch=settings.n_batch,
            adapter=resolve_adapter(settings.adapter, model=path) if settings.adapter else None,
            seed=settings.seed,
            use_mmap=settings.use_mmap,
            use_mlock=settings.use_mlock,
            capture_layers=capture_layers,
            capture_tokens=capture_tokens,
            parallel=parallel,
        )

    @property
    def n_ctx(self) -> int:
        return self._llm.n_ctx()

    @property
    def n_embd(self) -> int:
        """Width of the model's hidden state (what ``LocalSession.hidden_state`` returns)."""
        return self._lib.llama_model_n_embd(self._llm.model)

    @property
    def n_layer(self) -> int:
        """Number of transformer blocks (``capture_layers`` are 0 to ``n_layer - 1``)."""
        return self._n_layer

    @property
    def capture_layers(self) -> list[int]:
        """The layers each prefill captures (empty when the model was opened without capture)."""
        return list(self._tap.layers) if self._tap else []

    @property
    def end_of_turn(self) -> int:
        """The token that ends an assistant turn (end-of-turn if the vocabulary has one, else end-of-sequence)."""
        model = self._llm._model
        eot = model.token_eot()
        return eot if eot >= 0 else model.token_eos()

    def tokenize(self, text: str) -> list[int]:
        """Tokens of plain text. Special-token syntax in ``text`` stays plain text."""
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._llm.detokenize(list(tokens)).decode("utf-8", errors="replace")

    def chat_tokens(self, messages: list[dict]) -> list[int]:
        """Render the model's chat template with a generation prompt, tokenized injection-safely.

        Message contents are tokenized with ``special=False`` and the template's own text with
        ``special=True``: a user who types ``<|im_end|><|im_start|>assistant`` gets those
        characters, not the control tokens, and so cannot forge turns or the score slot.
        """
        marker = uuid.uuid4().hex
        placeholders = [f"\ue000{marker}{i}\ue001" for i in range(len(messages))]
        shadow = [{**m, "content": p} for m, p in zip(messages, placeholders)]
        rendered = self._formatter(messages=shadow).prompt
        parts = re.split(f"\ue000{marker}(\\d+)\ue001", rendered)
        if [int(i) for i in parts[1::2]] != list(range(len(messages))):
            raise ModelError("The model's chat template rewrites message contents; rpra cannot render it safely.")
        tokens: list[int] = []
        for i, part in enumerate(parts):
            if i % 2 == 0:
                tokens += self._llm.tokenize(part.encode("utf-8"), add_bos=False, special=True)
            else:
                tokens += self.tokenize(messages[int(part)]["content"])
        if self._bos is not None and tokens[:1] != [self._bos]:
            tokens.insert(0, self._bos)
        return tokens

    def session(self, prompt: Sequence[int], *, reserve: int = 0) -> LocalSession:
        """Prefill ``prompt`` (reusing the cached prefix) and return a session positioned after it.

        The caller holds ``lock`` for as long as it uses the session. ``reserve`` is the number of
        tokens that must still fit after the prompt (reasoning and the score slot).
        """
        if len(prompt) + reserve > self.n_ctx:
            raise PromptTooLongError(
                f"The prompt is {len(prompt)} tokens and the turn needs {reserve} more, but the device model's "
                f"context holds {self.n_ctx}. Shorten the prompt, raise n_ctx (--set n_ctx=...), "
                "or send it to the remote model (--mode remote-only)."
            )
        return LocalSession(self, list(prompt))

    def clear_cache(self) -> None:
        """Forget the cached prefix: the next session prefills from scratch (benchmarks of cold
        requests). The caller holds ``lock``."""
        self._llm.reset()

    def hidden_states(self, tokens: Sequence[int]) -> np.ndarray:
        """Every position's final hidden state for ``tokens`` (shape ``len(tokens) x n_embd``),
        evaluated in one batch from an empty cache, which it leaves empty.

        For experiments on what the probe should read; the runtime reads one position
        (``LocalSession.hidden_state``). ``tokens`` must fit in one batch (``n_batch``). The caller
        holds ``lock``.
        """
        if len(tokens) > self._llm.n_batch:
            raise ValueError(f"{len(tokens)} tokens do not fit one batch of {self._llm.n_batch}: raise n_batch.")
        llm, lib = self._llm, self._lib
        llm.reset()
        lib.llama_memory_seq_rm(lib.llama_get_memory(llm.ctx), -1, -1, -1)
        lib.llama_set_embeddings(llm.ctx, True)
        try:
            llm.eval(list(tokens))  # one batch with embeddings on: every position is output
            rows = [np.ctypeslib.as_array(lib.llama_get_embeddings_ith(llm.ctx, i), shape=(self.n_embd,)).copy() for i in range(len(tokens))]
        finally:
            lib.llama_set_embeddings(llm.ctx, False)
            lib.llama_memory_seq_rm(lib.llama_get_memory(llm.ctx), -1, -1, -1)
            llm.reset()
        return np.stack(rows)

    def baseline_generate(self, prompt: Sequence[int], n_tokens: int, *, repeat_penalty: float = 1.1) -> float:
        """Seconds for llama-cpp-python's own ``generate`` to prefill ``prompt`` from an empty
        cache and sample ``n_tokens`` greedily with the runtime's sampling chain.

        The reference the latency benchmark holds the runtime's overhead against. The caller
        holds ``lock``.
        """
        llm = self._llm
        llm.reset()
        start = time.perf_counter()
        for i, _ in enumerate(llm.generate(list(prompt), temp=0.0, repeat_penalty=repeat_penalty, reset=False, **_SAMPLING)):
            if i + 1 >= n_tokens:
                break
        return time.perf_counter() - start

    def close(self) -> None:
        """Free the llama.cpp model and context now rather than at garbage collection."""
        self._llm.close()

    # -- internals used by LocalSession -------------------------------------------------------

    def _prefill(self, tokens: list[int]) -> tuple[int, dict[int, np.ndarray] | None]:
        """Make the KV cache hold exactly ``tokens`` with fresh logits; return how many were reused
        and, when capturing, each captured layer's rows for the evaluated tokens."""
        llm = self._llm
        cached = llm.input_ids[: llm.n_tokens]
        reuse = 0
        for a, b in zip(cached, tokens):
            if a != b:
                break
            reuse += 1
        # The last token is always evaluated again: we need its logits, and llama.cpp only keeps
        # the logits of the last token of the last batch.
        reuse = min(reuse, len(tokens) - 1)
        if self._tap is not None:  # the capture sees evaluated tokens only: evaluate the last capture_tokens
            reuse = 0 if self.capture_tokens is None else max(0, min(reuse, len(tokens) - self.capture_tokens))
        if llm._is_recurrent or llm._is_hybrid:
            reuse = 0  # their state cannot be rolled back to an arbitrary position
        if reuse == 0:
            llm.reset()
        llm.n_tokens = reuse
        if self._tap is None:
            llm.eval(tokens[reuse:])
            return reuse, None
        return reuse, self._tap.capture(lambda: llm.eval(tokens[reuse:]), keep=self.capture_tokens)

    def _token_logprob(self, token: int, idx: int = -1) -> float:
        """log P(token) at the last evaluated position (or the batch's row ``idx``): log-softmax of
        the raw logits (temperature 1)."""
        logits = np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self._llm.ctx, idx), shape=(self._n_vocab,))
        top = logits.max()
        return float(logits[token] - top - np.log(np.exp(logits - top).sum()))

    def _logits(self) -> np.ndarray:
        ptr = self._lib.llama_get_logits_ith(self._llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self._llm.n_vocab(),)).copy()

    def _is_end(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token))


class LocalSession:
    """One request's sequence. ``tokens`` is everything the request has put in context so far."""

    def __init__(self, model: LocalModel, prompt: list[int]):
        self.model = model
        self.prompt_tokens = len(prompt)
        self.reused_tokens, self._layer_rows = model._prefill(prompt)
        self.tokens = prompt
        # The last sampled token of a generate() is evaluated lazily, together with whatever comes
        # next, so stopping a generation never costs a wasted decode.
        self._pending: list[int] = []
        # Where the runtime wrote its score slot (set by the runtime): a local answer rewinds to it.
        self.slot_at: int | None = None
        # Captured layers' rows of what is evaluated after ``watch_states()``: the draft's states.
        self._watched: dict[int, list[np.ndarray]] | None = None

    def _flush(self, extra: Sequence[int] = ()) -> None:
        todo = self._pending + list(extra)
        self._pending = []
        if not todo:
            return
        llm = self.model._llm
        if llm.n_tokens + len(todo) > self.model.n_ctx:
            raise PromptTooLongError(f"The turn outgrew the device model's context ({self.model.n_ctx} tokens).")
        if self._watched is None:
            llm.eval(todo)
        else:
            for layer, rows in self.model._tap.capture(lambda: llm.eval(todo), keep=None).items():
                self._watched[layer].append(rows)
        self.tokens += list(extra)

    def watch_states(self) -> None:
        """From now on, keep the captured layers' rows of every token this session evaluates:
        the states over a draft answer, for a verifier (``watched_states``). Costs a copy of one
        row per layer and token; the model must capture layers (``capture_layers``)."""
        if self.model._tap is None:
            raise ValueError("This model captures no layers: open it with LocalModel(..., capture_layers=[...]).")
        self._watched = {layer: [] for layer in self.model.capture_layers}

    def watched_states(self) -> dict[int, np.ndarray]:
        """The mean of each captured layer's residual stream over the tokens evaluated since
        ``watch_states()``, the pending last sampled token included (it is evaluated now: one
        single-token decode). After ``rewind`` to the slot and a generated (or committed) answer,
        those are the prompt's last token and every answer token, whether the answer was
        generated token by token or committed in one batch. The model's last layer is left out:
        llama.cpp computes it for the output row only."""
        if self._watched is None:
            raise ValueError("No states are watched: call watch_states() before the answer.")
        self._flush()
        return _mean_rows(self._watched, self.model.n_layer)

    def extend(self, text: str) -> None:
        """Put runtime-written text (not generated) into the context."""
        self._flush(self.model.tokenize(text))

    def score(self, slot: ScoreSlot) -> list[float]:
        """Read the slot's grammar-constrained log-probabilities at the current position.

        Branches of the label trie are evaluated and rolled back; the context ends where it began.
        """
        self._flush()
        llm = self.model._llm
        base = llm.n_tokens
        root = self.model._logits()

        def next_logits(path: Sequence[int]) -> np.ndarray:
            if not path:
                return root
            llm.n_tokens = base + len(path) - 1  # roll back to the parent; eval drops the rest
            llm.eval([path[-1]])
            return self.model._logits()

        logprobs = slot.logprobs(next_logits)
        llm.n_tokens = base
        return logprobs

    def hidden_state(self) -> np.ndarray:
        """The model's final hidden state (after the output norm) at the current position.

        llama.cpp only outputs hidden states for tokens evaluated while embeddings are on, and
        turning them on for a whole prompt batch makes it output every position. So the last token
        is evaluated once more, alone, with embeddings on: one single-token decode. The context is
        unchanged; that position's logits are now the single-token decode's, which differ from the
        batched prefill's by rounding only (up to ~0.1 in log-probability, measured on SmolLM2).
        """
        self._flush()
        llm, lib = self.model._llm, self.model._lib
        last = self.tokens[-1]
        llm.n_tokens -= 1
        lib.llama_set_embeddings(llm.ctx, True)
        try:
            llm.eval([last])
            ptr = lib.llama_get_embeddings_ith(llm.ctx, -1)
            if not ptr:
                raise ModelError("llama.cpp returned no hidden state for this model.")
            return np.ctypeslib.as_array(ptr, shape=(self.model.n_embd,)).copy()
        finally:
            lib.llama_set_embeddings(llm.ctx, False)

    def layer_states(self, pool: Pool = "last", *, k: int = 1) -> dict[int, np.ndarray]:
        """The captured layers' residual stream over this session's prompt: layer -> ``n_embd`` floats.

        ``"last"``: the prompt's last token (in the PA layout the score slot's "[[") for every
        captured layer. ``"last-k"``: the mean over the prompt's last ``k`` tokens; ``"mean"``: over
        the whole prompt. A cached prefix is reused rather than evaluated, and only evaluated tokens
        are seen, so these need the model opened with ``capture_tokens`` >= ``k`` (or ``None``); the
        session keeps that many rows per layer (SmolLM2, all 30 layers: 69 KB a token).
        The pooled ones leave out the model's last layer: llama.cpp computes it for the output row
        only. Read during the prefill alone: what the session evaluates later (reasoning, the
        slot's branches, the answer) neither costs a copy nor changes them.
        """
        rows = self._layer_rows
        if rows is None:
            raise ValueError("This model captures no layers: open it with LocalModel(..., capture_layers=[...]).")
        if pool == "last":
            return {layer: r[-1].copy() for layer, r in rows.items()}
        if pool not in ("mean", "last-k"):
            raise ValueError(f"pool is {pool!r}; use 'last', 'mean' or 'last-k'.")
        if pool == "last-k" and k < 1:
            raise ValueError(f"k is {k}; pool over 1 or more of the prompt's last tokens.")
        needed = None if pool == "mean" else k
        covered = self.model.capture_tokens
        if covered is not None and (needed is None or needed > covered):
            raise ValueError(
                f"pool={pool!r} needs the prefill to evaluate {'the whole prompt' if needed is None else f'its last {needed} tokens'}, "
                f"and this model (capture_tokens={covered}) reuses a cached prefix, unseen, up to the prompt's last {covered}: "
                f"open it with capture_tokens={needed}."
            )
        n = self.prompt_tokens if needed is None else min(needed, self.prompt_tokens)
        last = self.model.n_layer - 1
        return {layer: r[-n:].mean(axis=0) for layer, r in rows.items() if layer != last}

    def suspend(self) -> _Suspended:
        """Copy this session's state out of the context, so another request can use it.

        Only valid when the next step evaluates something (a sampled token still pending, or
        tokens about to be committed): the logits are not saved, and that evaluation renews them.
        """
        llm, lib = self.model._llm, self.model._lib
        size = lib.llama_state_seq_get_size(llm.ctx, 0)
        buffer = (ctypes.c_uint8 * size)()
        written = lib.llama_state_seq_get_data(llm.ctx, buffer, size, 0)
        return _Suspended(bytes(buffer)[:written], llm.n_tokens, llm.input_ids[: llm.n_tokens].copy())

    def resume(self, saved: _Suspended) -> None:
        """Put a suspended session's state back into the context."""
        llm, lib = self.model._llm, self.model._lib
        lib.llama_memory_seq_rm(lib.llama_get_memory(llm.ctx), -1, -1, -1)
        if saved.n_tokens:
            buffer = (ctypes.c_uint8 * len(saved.kv)).from_buffer_copy(saved.kv)
            if lib.llama_state_seq_set_data(llm.ctx, buffer, len(saved.kv), 0) == 0:
                raise ModelError("llama.cpp could not restore a suspended request's state; retry the request.")
        llm.input_ids[: saved.n_tokens] = saved.input_ids
        llm.n_tokens = saved.n_tokens

    def commit(self, tokens: Sequence[int]) -> None:
        """Put chosen tokens (e.g. the score written into the slot) into the context."""
        self._flush(tokens)

    def rewind(self, position: int) -> None:
        """Forget everything after the first ``position`` tokens, e.g. the score slot, so that an
        answer does not read its own predicted score. Nothing before ``position`` is evaluated
        again: its last token is, lazily with whatever comes next, for fresh logits."""
        if not 0 < position <= len(self.tokens):
            raise ValueError(f"Cannot rewind to {position}: the session holds {len(self.tokens)} tokens.")
        self.tokens = self.tokens[:position]
        self.model._llm.n_tokens = min(self.model._llm.n_tokens, position - 1)
        self._pending = [self.tokens[-1]]

    def generate(
        self,
        max_tokens: int,
        *,
        temperature: float,
        repeat_penalty: float = 1.0,
        stop: str | None = None,
        out: Generated | None = None,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Sample up to ``max_tokens`` tokens, yielding text as it becomes valid UTF-8.

        Stops at the model's end-of-turn token, at ``stop`` (which is not yielded), or when the
        context is full. ``out`` receives the full text, token count, finish reason and each
        token's log-probability.
        """
        out = out if out is not None else Generated()
        model, llm = self.model, self.model._llm
        # The same sampler chain llama-cpp-python's own generate() builds (pinned version).
        sampler = _sampler(llm, temperature, repeat_penalty, model.seed if seed is None else seed)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        held = ""  # text withheld while it could still be the start of ``stop``
        out.finish_reason = "length"
        for _ in range(max_tokens):
            self._flush()
            if llm.n_tokens >= model.n_ctx:
                out.finish_reason = "context"
                break
            token = sampler.sample(llm._ctx, -1)
            if model._is_end(token):
                out.finish_reason = "stop"
                break
            self._pending = [token]
            self.tokens.append(token)
            out.tokens += 1
            out.logprobs.append(model._token_logprob(token))
            held += decoder.decode(llm.detokenize([token]))
            if stop and stop in held:
                before = held[: held.index(stop)]
                out.text += before
                if before:
                    yield before
                out.finish_reason = "stop"
                return
            keep = _partial_suffix(held, stop) if stop else 0
            ready, held = held[: len(held) - keep], held[len(held) - keep :]
            if ready:
                out.text += ready
                yield ready
        held += decoder.decode(b"", final=True)
        if held:
            out.text += held
            yield held


    def sample_many(self, n: int, max_tokens: int, *, temperature: float, repeat_penalty: float = 1.0, greedy_first: bool = True,
                    watch: bool = False, seed: int | None = None) -> list[Generated]:  # fmt: skip
        """``n`` answers from the current position, decoded as ``n`` parallel sequences: one
        llama.cpp batch per step holds every unfinished sequence's next token, and the prompt's
        cells in the KV cache are shared, not copied (the model opened with ``parallel >= n``).

        Sequence 0 is greedy when ``greedy_first`` (so the best of them is never chosen from
        worse than the plain answer), the others sample at ``temperature`` with seeds of their
        own. Each ``Generated`` has its text, tokens, finish reason and log-probabilities, and
        with ``watch`` its ``states``: the captured layers' mean over the prompt's last token
        and the answer's tokens, as ``watched_states`` gives for one answer. Afterwards the
        context holds the prompt alone (the answers' cells are dropped): commit the chosen
        answer to keep it.
        """
        model, llm, lib = self.model, self.model._llm, self.model._lib
        if not 1 <= n <= model.parallel:
            raise ValueError(f"{n} sequences asked of a model opened with parallel={model.parallel}.")
        if watch and model._tap is None:
            raise ValueError("This model captures no layers: open it with LocalModel(..., capture_layers=[...]).")
        if llm.n_tokens + len(self._pending) + n * max_tokens > model.n_ctx:
            raise PromptTooLongError(f"{n} answers of {max_tokens} tokens do not fit the device model's context ({model.n_ctx} tokens).")
        rows: list[dict[int, list[np.ndarray]]] = [{layer: [] for layer in model.capture_layers} for _ in range(n)]

        def evaluate(run, owners: list[int]) -> None:
            """Run one decode; with ``watch``, give row j of each layer to sequence ``owners[j]``."""
            if not watch:
                run()
                return
            for layer, got in model._tap.capture(run, keep=None).items():
                for j, owner in enumerate(owners):
                    rows[owner][layer].append(got[j : j + 1])

        from llama_cpp import _internals

        if watch and not self._pending:  # the prompt's last token is watched too: evaluate it again
            llm.n_tokens -= 1
            self._pending = [self.tokens[-1]]
        todo, self._pending = self._pending, []
        if todo:  # the prompt's last token, evaluated once for every sequence
            evaluate(lambda: llm.eval(todo), [0] * len(todo))
            for i in range(1, n):
                for layer in rows[i]:
                    rows[i][layer] = [r.copy() for r in rows[0][layer]]
        start = llm.n_tokens
        memory = lib.llama_get_memory(llm.ctx)
        for i in range(1, n):
            lib.llama_memory_seq_cp(memory, 0, i, -1, -1)
        samplers = [_sampler(llm, 0.0 if greedy_first and i == 0 else temperature, repeat_penalty, sequence_seed(model.seed if seed is None else seed, i))
                    for i in range(n)]  # fmt: skip
        outs = [Generated(finish_reason="length") for _ in range(n)]
        decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(n)]
        rows_of = {i: -1 for i in range(n)}  # each live sequence's logits row in the last batch
        last: dict[int, int] = {}  # each sequence's last sampled token
        batch = _internals.LlamaBatch(n_tokens=n, embd=0, n_seq_max=1, verbose=False)
        try:
            for step in range(max_tokens + 1):
                going = []
                for i, row in rows_of.items():
                    if step == max_tokens:  # evaluated only for its states: its logits are not read
                        going.append((i, last[i]))
                        continue
                    token = samplers[i].sample(llm._ctx, row)
                    if model._is_end(token):
                        outs[i].finish_reason = "stop"
                        continue
                    outs[i].tokens += 1
                    outs[i].logprobs.append(model._token_logprob(token, row))
                    outs[i].text += decoders[i].decode(llm.detokenize([token]))
                    last[i] = token
                    going.append((i, token))
                if step == max_tokens and not watch:
                    break
                if not going:
                    break
                b = batch.batch
                b.n_tokens = len(going)
                for j, (i, token) in enumerate(going):
                    b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = token, start + step, 1, True
                    b.seq_id[j][0] = i
                status = []
                evaluate(lambda: status.append(lib.llama_decode(llm.ctx, b)), [i for i, _ in going])
                if status[0] != 0:
                    raise ModelError(f"llama.cpp could not decode {len(going)} parallel sequences (status {status[0]}).")
                rows_of = {i: j for j, (i, _) in enumerate(going)}
        finally:
            batch.close()
            for i in range(1, n):
                lib.llama_memory_seq_rm(memory, i, -1, -1)
            lib.llama_memory_seq_rm(memory, 0, start, -1)
            # As after ``rewind``: the prompt's last token is evaluated again, lazily, for fresh logits.
            self._pending = [self.tokens[-1]]
            llm.n_tokens = start - 1
        for i, out in enumerate(outs):
            out.text += decoders[i].decode(b"", final=True)
            if watch:
                out.states = _mean_rows(rows[i], model.n_layer)
        return outs


def _mean_rows(rows: dict[int, list[np.ndarray]], n_layer: int) -> dict[int, np.ndarray]:
    """Each layer's mean over the token rows watched (``watched_states``, ``sample_many``); the
    model's last layer is left out: llama.cpp computes it for the output row only."""
    return {layer: np.concatenate(r).mean(axis=0) for layer, r in rows.items() if r and layer != n_layer - 1}


def sequence_seed(seed: int, i: int) -> int:
    """The sampling seed of the ``i``-th of several answers drawn with ``seed``: each its own draws."""
    return seed + 7919 * i


def _sampler(llm, temperature: float, repeat_penalty: float, seed: int):
    """llama-cpp-python's sampler chain (``Llama._init_sampler``, pinned version) with ``seed``:
    it reads the seed from the ``Llama``, so it is set for the call and put back."""
    saved = llm._seed
    llm._seed = seed
    try:
        return llm._init_sampler(temp=temperature, repeat_penalty=repeat_penalty, **_SAMPLING)
    finally:
        llm._seed = saved


class _TensorHead(ctypes.Structure):
    """The first fields of ``struct ggml_tensor`` (ggml.h of llama-cpp-python 0.3.36's llama.cpp):
    ctypes lays them out as the C compiler does, so ``ne`` lands at byte 16 as there."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4)]


_GGML_TYPE_F32 = 0


class _LayerTap:
    """Copies chosen layers' residual stream (``l_out-<i>``) out of llama.cpp's graph as it runs.

    llama.cpp's scheduler asks the callback about every graph node ("ask": do you want this
    one?) and calls it again for each wanted node once computed ("data"). Outside ``capture`` the
    tap wants nothing and answers at once, so the graph runs in one piece as without a callback
    (generation measured no slower). Rows are tokens; a prompt longer than a micro-batch arrives
    in several pieces, appended in order.
    """

    def __init__(self, layers: Sequence[int], n_embd: int):
        import llama_cpp
        from llama_cpp._ctypes_extensions import load_shared_library

        ggml = load_shared_library("ggml-base", Path(llama_cpp.__file__).parent / "lib")
        ggml.ggml_get_name.argtypes, ggml.ggml_get_name.restype = [ctypes.c_void_p], ctypes.c_char_p
        ggml.ggml_nbytes.argtypes, ggml.ggml_nbytes.restype = [ctypes.c_void_p], ctypes.c_size_t
        ggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        ggml.ggml_backend_tensor_get.restype = None
        self._ggml = ggml
        self.layers = list(layers)
        self._n_embd = n_embd
        self._names = {f"l_out-{i}".encode(): i for i in self.layers}
        self._rows: dict[int, list[np.ndarray]] = {}
        self._on = False
        self._error: Exception | None = None
        # The context holds only the C pointer: this object keeps the trampoline alive.
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._eval)

    def capture(self, evaluate, *, keep: int | None) -> dict[int, np.ndarray]:
        """Run ``evaluate()`` with the tap on; each layer's last ``keep`` rows (tokens x n_embd) it
        saw, or all of them (``None``)."""
        self._rows = {layer: [] for layer in self.layers}
        self._error = None
        self._on = True
        try:
            evaluate()
        finally:
            self._on = False
            pieces_by_layer, self._rows = self._rows, {}
        if self._error is not None:
            raise ModelError(f"Reading layer states from llama.cpp failed ({self._error}); open the model without capture_layers.") from self._error
        missing = [layer for layer, pieces in pieces_by_layer.items() if not sum(len(p) for p in pieces)]
        if missing:
            raise ModelError(
                f"llama.cpp's graph for this model has no l_out tensor for layers {missing}: its architecture "
                "names layer outputs differently; open the model without capture_layers."
            )
        return {layer: np.concatenate(pieces)[-keep if keep else None :].copy() for layer, pieces in pieces_by_layer.items()}

    def _eval(self, tensor: int, ask: bool, _user_data) -> bool:
        if not self._on:
            return not ask
        try:
            layer = self._names.get(self._ggml.ggml_get_name(tensor))
            if ask:
                return layer is not None
            if layer is not None:
                self._rows[layer].append(self._read(tensor))
        except Exception as exc:  # noqa: BLE001 -- an exception cannot cross into C: capture() raises it afterwards
            self._error = self._error or exc
        # In the data phase False would stop the rest of the graph (ggml-backend.cpp): never.
        return not ask

    def _read(self, tensor: int) -> np.ndarray:
        head = _TensorHead.from_address(tensor)
        n_embd, n_rows = head.ne[0], head.ne[1]
        nbytes = self._ggml.ggml_nbytes(tensor)
        if head.type != _GGML_TYPE_F32 or n_embd != self._n_embd or head.ne[2] * head.ne[3] != 1 or nbytes != 4 * n_embd * n_rows:
            raise ModelError(f"unexpected layer tensor (type {head.type}, shape {list(head.ne)}, {nbytes} bytes)")
        rows = np.empty((n_rows, n_embd), dtype=np.float32)
        if nbytes:
            self._ggml.ggml_backend_tensor_get(tensor, rows.ctypes.data, 0, nbytes)
        return rows


def _recreate_context(llm, callback) -> None:
    """Give ``llm`` a new context from its (changed) parameters, whose graph evaluation calls
    ``callback`` (or none).

    ``Llama()`` takes no ``cb_eval``, and llama.cpp reads it only while creating a context, so the
    context Llama made is replaced by one made from the same parameters plus the callback (about
    30 ms for SmolLM2). A LoRA adapter is attached to a context, so it is attached again.
    """
    import llama_cpp
    from llama_cpp import _internals

    if callback is not None:
        llm.context_params.cb_eval = callback
    ctx = _internals.LlamaContext(model=llm._model, params=llm.context_params, verbose=False)
    old, llm._ctx = llm._ctx, ctx
    old.close()
    llm._stack.callback(ctx.close)  # freed with the Llama, before its model
    if llm._lora_adapter is not None:
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(llm._lora_adapter)
        scales = (ctypes.c_float * 1)(llm.lora_scale)
        if llama_cpp.llama_set_adapters_lora(ctx.ctx, adapters, 1, scales):
            raise ModelError("llama.cpp could not attach the adapter to the layer-capturing context; open the model without capture_layers.")


def _partial_suffix(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


def system_info() -> dict:
    """What the installed llama.cpp was built with and can use here (for `rpra doctor`).

    ``features``: llama.cpp's own report, e.g. {"AVX2": "1", "AVX512": "0"}; ``mmap`` / ``mlock``:
    whether this build and OS support them; ``gpu_offload``: whether layers can go to a GPU.
    """
    import llama_cpp

    report = llama_cpp.llama_print_system_info().decode("utf-8", errors="replace")
    features: dict[str, str] = {}
    for part in report.replace("|", "\n").splitlines():
        key, sep, value = part.partition("=")
        if sep:
            features[key.strip().split(":")[-1].strip()] = value.strip()
    return {
        "llama_cpp_python": llama_cpp.__version__,
        "report": report.strip(),
        "features": features,
        "mmap": bool(llama_cpp.llama_supports_mmap()),
        "mlock": bool(llama_cpp.llama_supports_mlock()),
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
    }
