"""Collect judged records for the deferral benchmark: one row per item.

For each item: the device model's predictions (PA and RPRA: distribution, expected score,
P(pass)), its local answer, the remote answer, the judge's verdict on both, the exact verifier's
score where the item has a gold answer, token counts and timings.

Resumable: every finished record is appended (and fsynced) to the collection's journal
(``benchmarks.collection``) before the next item starts; a re-run skips the ids already there.
Every model call is also cached by content hash (benchmarks/cache.py), so re-running with a new
predictor costs no new remote or judge call. At the end the records are also saved as a
``datasets`` dataset (parquet) next to their provenance.
"""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from rpra.benchmarks.cache import CallCache, cached
from rpra.benchmarks.collection import Collection, Provenance, label
from rpra.benchmarks.data import Item, permuted, verify
from rpra.benchmarks.judge import Judge
from rpra import prompts
from rpra.config import Settings
from rpra.errors import InputError
from rpra.local import LocalModel
from rpra.models import file_sha256
from rpra.remote import RemoteModel
from rpra.runtime import Runtime


def predict_only(runtime: Runtime, messages: list[dict]) -> dict:
    """The device model's prediction for ``messages`` as a record stores it (no answer)."""
    decided = runtime.predict(messages)
    return {
        "prediction": decided.prediction.to_dict(),
        "reasoning": decided.reasoning,
        "reasoning_tokens": decided.reasoning_tokens,
        "decision_ms": decided.decision_ms,
    }


def device_record(pa: Runtime, rpra: Runtime | None, item: Item) -> dict:
    """PA prediction and the local answer (one turn, as the device runs it), then the RPRA
    prediction unless ``rpra`` is None (a verified collection skips it: it costs a reasoning decode).

    ``pa`` and ``rpra`` share one LocalModel; they differ only in the protocol setting.
    """
    messages = [{"role": "user", "content": item.prompt}]
    result = pa.ask(messages, mode="local-only")
    record = {
        "pa": result.prediction.to_dict(),
        "pa_decision_ms": result.timings_ms["decision"],
        "local_answer": result.answer,
        "local_tokens": result.tokens.get("local_answer", 0),
        "local_ms": result.timings_ms["total"],
        "local_finish": result.finish_reason,
        "local_logprobs": result.local_logprobs,
    }
    if rpra is not None:
        reasoned = predict_only(rpra, messages)
        record.update({
            "rpra": reasoned["prediction"],
            "rpra_reasoning": reasoned["reasoning"],
            "rpra_reasoning_tokens": reasoned["reasoning_tokens"],
            "rpra_decision_ms": reasoned["decision_ms"],
        })  # fmt: skip
    return record


def remote_record(remote: RemoteModel, item: Item, max_tokens: int) -> dict:
    started = time.perf_counter()
    answer = remote.complete([{"role": "user", "content": item.prompt}], max_tokens=max_tokens, temperature=0.0)
    usage = remote.last_usage
    return {
        "remote_answer": answer.strip(),
        "remote_tokens": usage.completion_tokens if usage else None,
        "remote_ms": (time.perf_counter() - started) * 1000,
    }


class Collector:
    """Runs items through the device model, the remote and the judge, caching every call.

    Without a ``remote`` only the device side is collected (enough to train on). Without a
    ``judge`` (a verified collection) only items with an answer key are collected, and the
    verifier alone labels them: fast, and no weak judge's opinion where a key decides.

    With ``permute`` the device also answers each multiple-choice item with its options rotated
    (``data.permuted``), and the label counts the answer correct only when both orderings are
    right: one more device answer per such item, and a label that measures knowledge, not the
    model's favourite letter.
    """

    def __init__(
        self,
        *,
        pa: Runtime,
        rpra: Runtime | None,
        remote: RemoteModel | None,
        judge: Judge | None,
        cache: CallCache,
        provenance: Provenance,
        remote_max_tokens: int = 256,
        permute: bool = True,
    ):
        self.pa, self.rpra, self.remote, self.judge, self.cache = pa, rpra, remote, judge, cache
        self.provenance = provenance
        self.remote_max_tokens = remote_max_tokens
        self.permute = permute

    def _device(self, item: Item, rpra: Runtime | None) -> dict:
        p = self.provenance
        key = {"prompt": item.prompt, "prompts": p.prompts_version, "settings": p.settings}
        if rpra is None:
            key["rpra"] = False  # such records hold no RPRA prediction: cached apart
        return cached(self.cache, "device", p.device_sha256, key, lambda: device_record(self.pa, rpra, item))

    def has_all(self, record: dict) -> bool:
        """Whether ``record`` already holds everything this collector would collect (a record
        collected without a remote or judge is collected again by one that has them)."""
        if self.remote is not None and record.get("remote_answer") is None:
            return False
        if self.judge is not None and record.get("judge_local") is None:
            return False
        return self.rpra is None or record.get("rpra") is not None

    def record(self, item: Item) -> dict:
        """The item's whole record: its device part, then the remote's and the judge's."""
        return self.finish(item, self.device_part(item))

    def device_part(self, item: Item) -> dict:
        """What the device model contributes (the caller's thread: the device runs one request at
        a time): the prediction and answer, and the answer to the rotated options if asked."""
        if self.judge is None and item.gold is None:
            raise InputError(f"{item.id} has no answer key, and a verified collection has no judge to label it.")
        rotated = permuted(item) if self.permute else None
        return {"device": self._device(item, self.rpra), "rotated": rotated,
                "other": None if rotated is None else self._device(rotated, None)}  # fmt: skip

    def finish(self, item: Item, part: dict) -> dict:
        """The record from the device part plus the remote's answer and the judge's verdicts:
        network calls only, safe to run in another thread while the device works on the next item."""
        p = self.provenance
        device, rotated, other = part["device"], part["rotated"], part["other"]
        judged_local = None if self.judge is None else self.judge.score(item.prompt, device["local_answer"], reference=item.reference).to_dict()
        remote, judged_remote = {"remote_answer": None, "remote_tokens": None, "remote_ms": None}, None
        if self.remote is not None:
            remote_key = {"prompt": item.prompt, "max_tokens": self.remote_max_tokens}
            remote = cached(self.cache, "remote", p.remote_id, remote_key, lambda: remote_record(self.remote, item, self.remote_max_tokens))
            if self.judge is not None:
                judged_remote = self.judge.score(item.prompt, remote["remote_answer"], reference=item.reference).to_dict()
        record = {
            "id": item.id, "suite": item.suite, "category": item.category, "kind": item.kind,
            "prompt": item.prompt, "reference": item.reference, "gold": item.gold,
            **device, **remote,
            "judge_local": judged_local,
            "judge_remote": judged_remote,
            "exact_local": verify(item, device["local_answer"]),
            "exact_remote": None if remote["remote_answer"] is None else verify(item, remote["remote_answer"]),
            "permuted_gold": None if rotated is None else rotated.gold,
            "permuted_answer": None if other is None else other["local_answer"],
            "exact_permuted": None if other is None else verify(rotated, other["local_answer"]),
        }  # fmt: skip
        record["label"] = label(record, pass_mark=p.settings.get("pass_mark", 7))
        return record


def collect(items: list[Item], collector: Collector, collection: Collection, *, progress: bool = True,
            in_flight: int = 4) -> list[dict]:  # fmt: skip
    """Collect every item not yet in ``collection``; return all its records (old and new).

    The device works through the items one at a time on this thread; each item's remote answer
    and judge calls go to a pool of ``in_flight`` threads, so they overlap the device's work on
    the next items and each other (at most ``in_flight`` items wait on the network; a cloud judge
    is not called one request at a time). A record is journalled as soon as it is whole, so
    records land in completion order. An interruption drops the items whose calls had not
    started, lets the running calls finish (the pool would wait for them anyway) and keeps every
    record that is whole; device answers and finished calls are in the call cache, so a re-run
    makes only the calls that had not finished.

    Each run's throughput is appended to the collection's ``runs.jsonl`` (items per hour). A
    second process collecting into the same collection meanwhile gets a clear error.
    """
    with collection.writing():  # one writer per collection; its records as they are on disk now
        return _collect(items, collector, collection, progress=progress, in_flight=in_flight)


def _collect(items: list[Item], collector: Collector, collection: Collection, *, progress: bool, in_flight: int) -> list[dict]:
    done = {r["id"] for r in collection.records if collector.has_all(r)}
    todo = [item for item in items if item.id not in done]
    if not todo:  # nothing to collect: the collection and its provenance stay as they are
        return collection.records
    collection.set_provenance(collector.provenance)
    skipped = []
    started, before = time.perf_counter(), len(collection.records)
    network = collector.remote is not None or collector.judge is not None
    with collection.appender() as add, _progress(len(todo), len(done), progress) as advance, \
            ThreadPoolExecutor(max(1, in_flight), thread_name_prefix="collect") as pool:  # fmt: skip
        pending: dict[Future, Item] = {}

        def land(futures) -> None:
            for future in futures:
                item = pending.pop(future)
                try:
                    add(future.result())
                except InputError as exc:
                    skipped.append({"id": item.id, "reason": str(exc)})
                advance()

        try:
            for item in todo:
                try:
                    part = collector.device_part(item)
                except InputError as exc:  # e.g. longer than the device's context, or no key to verify
                    skipped.append({"id": item.id, "reason": str(exc)})
                    advance()
                    continue
                if not network:
                    add(collector.finish(item, part))
                    advance()
                    continue
                pending[pool.submit(collector.finish, item, part)] = item
                finished = [f for f in pending if f.done()]
                if len(pending) - len(finished) >= in_flight:  # the network is the bottleneck: wait for it
                    finished = wait(pending, return_when=FIRST_COMPLETED).done
                land(finished)
            land(list(pending))  # in submission order; each waits for its result
        except BaseException:  # Ctrl-C or a failing remote: drop what has not started, keep what is whole
            running = [f for f in pending if not f.cancel()]
            wait(running)  # the pool's shutdown would wait for these anyway; their records are worth keeping
            for future in running:
                if future.exception() is None:
                    add(future.result())
            raise
    collection.write_skipped(skipped)
    collection.log_run(new=len(collection.records) - before, seconds=time.perf_counter() - started)
    collection.save_dataset()
    return collection.records


class _progress:
    """A rich progress bar with ETA (quiet when disabled)."""

    def __init__(self, total: int, already: int, enabled: bool):
        self.total, self.already, self.enabled = total, already, enabled

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn(f"collecting ({self.already} already done)"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=Console(stderr=True),  # stdout may carry --json output
        )  # fmt: skip
        self._bar.start()
        task = self._bar.add_task("items", total=self.total)
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc):
        if self.enabled:
            self._bar.stop()


def provenance_for(settings: Settings, local: LocalModel, *, suite: str, split: str, remote_id: str, judge_id: str) -> Provenance:
    keep = ("temperature", "max_tokens", "reason_tokens", "repeat_penalty", "scale_max", "pass_mark", "n_ctx", "seed", "answer_after_score")
    return Provenance(
        suite=suite,
        split=split,
        device_model=settings.model,
        device_sha256=file_sha256(local.path),
        remote_id=remote_id,
        judge_id=judge_id,
        prompts_version=prompts.PROMPT_VERSION,
        settings={k: getattr(settings, k) for k in keep},
    )

