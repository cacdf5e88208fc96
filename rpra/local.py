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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rpra.errors import CorruptModelError, ModelError, PromptTooLongError
from rpra.slot import ScoreSlot

# llama-cpp-python's default sampling chain; temperature and repeat penalty are settings.
_SAMPLING = dict(top_k=40, top_p=0.95, min_p=0.05)


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
    ):
        from rpra.config import default_threads
        from rpra.models import check_gguf

        path = Path(path)
        check_gguf(path)
        if adapter is not None:
            check_gguf(Path(adapter))
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        try:
            self._llm = llama_cpp.Llama(
                model_path=str(path),
                lora_path=str(adapter) if adapter else None,
                n_ctx=n_ctx,
                n_threads=n_threads or default_threads(),
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

    @classmethod
    def from_settings(cls, settings) -> LocalModel:
        """The device model as ``settings`` name it: the model and adapter (resolved and checked
        against each other), context, threads, batch, seed, mmap / mlock.

        The one way the runtime, the benchmark and training open it; a caller that needs
        something else changes the settings (``dataclasses.replace``), not this call.
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
        )

    @property
    def n_ctx(self) -> int:
        return self._llm.n_ctx()

    @property
    def n_embd(self) -> int:
        """Width of the model's hidden state (what ``LocalSession.hidden_state`` returns)."""
        return self._lib.llama_model_n_embd(self._llm.model)

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

    def _prefill(self, tokens: list[int]) -> int:
        """Make the KV cache hold exactly ``tokens`` with fresh logits; return how many were reused."""
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
        if llm._is_recurrent or llm._is_hybrid:
            reuse = 0  # their state cannot be rolled back to an arbitrary position
        if reuse == 0:
            llm.reset()
        llm.n_tokens = reuse
        llm.eval(tokens[reuse:])
        return reuse

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
        self.reused_tokens = model._prefill(prompt)
        self.tokens = prompt
        # The last sampled token of a generate() is evaluated lazily, together with whatever comes
        # next, so stopping a generation never costs a wasted decode.
        self._pending: list[int] = []

    def _flush(self, extra: Sequence[int] = ()) -> None:
        todo = self._pending + list(extra)
        self._pending = []
        if not todo:
            return
        llm = self.model._llm
        if llm.n_tokens + len(todo) > self.model.n_ctx:
            raise PromptTooLongError(f"The turn outgrew the device model's context ({self.model.n_ctx} tokens).")
        llm.eval(todo)
        self.tokens += list(extra)

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

    def generate(
        self,
        max_tokens: int,
        *,
        temperature: float,
        repeat_penalty: float = 1.0,
        stop: str | None = None,
        out: Generated | None = None,
    ) -> Iterator[str]:
        """Sample up to ``max_tokens`` tokens, yielding text as it becomes valid UTF-8.

        Stops at the model's end-of-turn token, at ``stop`` (which is not yielded), or when the
        context is full. ``out`` receives the full text, token count and finish reason.
        """
        out = out if out is not None else Generated()
        model, llm = self.model, self.model._llm
        # The same sampler chain llama-cpp-python's own generate() builds (pinned version).
        sampler = llm._init_sampler(temp=temperature, repeat_penalty=repeat_penalty, **_SAMPLING)
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
