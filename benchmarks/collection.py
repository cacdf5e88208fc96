"""A collection of judged records: the record format, where a collection lives, reading and writing.

One collection per (device model, suite, split), in ``RPRA_HOME/collections/<model>--<suite>--<split>/``:

    records.jsonl     the journal: one JSON record per line, appended and fsynced as each item
                      finishes, so an interrupted collection loses nothing and resumes
    provenance.json   what produced it (``Provenance``), including ``record_version``
    records.parquet   the same records as a ``datasets`` dataset, rewritten at the end of a run
    skipped.json      items that could not be scored this run (e.g. too long for the context)

A collection can be exported (``Collection.export``) as one gzipped JSON Lines file with its
provenance under ``benchmarks/results/collections/``, where it is committed: an empty collection
is seeded from it, so a fresh machine re-evaluates or trains without redoing hours of calls.

``benchmarks.collect`` fills a collection; the benchmark, the report cards and ``training/``
read it through ``Collection.load`` here and nowhere else.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from rpra.config import home
from rpra.errors import ConfigError

# Bump when a field changes meaning; readers can then tell old records from new.
# 2: every record has a ``label`` (below); judge_local may be null where a key decides.
RECORD_VERSION = 2

# Committed collections that seed empty ones (a few MB of gzipped JSON Lines, with provenance).
SEEDS = Path(__file__).parent / "results" / "collections"


def seeds_dir() -> Path | None:
    """Where seeds are read from: ``SEEDS``, or ``RPRA_SEEDS`` if set (empty: no seeding, as in
    tests that must start from nothing)."""
    value = os.environ.get("RPRA_SEEDS")
    if value is None:
        return SEEDS
    return Path(value).expanduser() if value.strip() else None

# Collection settings that change what a label means: an answer cut at 24 tokens names no letter
# where one of 48 does, so records made with one are not the same label as records made with the other.
LABEL_SETTINGS = ("max_tokens", "scale_max", "pass_mark", "answer_after_score", "temperature")


def label_differences(a: dict, b: dict) -> list[str]:
    """The ``LABEL_SETTINGS`` that two collections' settings both name and set differently."""
    return [k for k in LABEL_SETTINGS if k in a and k in b and a[k] != b[k]]


# The judge's three-level label, as the RPRA paper's report cards use: scores 1-3, 4-6, 7-10.
LEVELS = {"bad": (1, 3), "ok": (4, 6), "great": (7, 10)}

# Every field of a record and what it means. A prediction is ``Prediction.to_dict()``:
# {"distribution", "expected", "p_pass", "mode", "pass_mark", "scale_max", "predictor"}.
FIELDS = {
    "id": "the item's stable id (its split is a hash of it, so it never changes split)",
    "suite": "the suite the item comes from (mmlu, arithmetic, ...)",
    "category": "a finer group within the suite (an MMLU subject, an arithmetic level, ...)",
    "kind": "the item's kind of answer (multiple-choice, number, open)",
    "prompt": "the user message the device model saw",
    "reference": "a reference answer shown to the judge, or null",
    "gold": "the answer key the exact verifier checks, or null",
    "pa": "the zero-shot PA prediction (a Prediction dict)",
    "pa_decision_ms": "time from the request to the PA decision",
    "rpra": "the zero-shot RPRA prediction, after the short reasoning",
    "rpra_reasoning": "that reasoning", "rpra_reasoning_tokens": "its length in tokens",
    "rpra_decision_ms": "time from the request to the RPRA decision",
    "local_answer": "the device model's greedy answer (PA layout, as the device answers)",
    "local_tokens": "its length in tokens", "local_ms": "the whole local turn's time",
    "remote_answer": "the remote model's answer, or null (collected with --no-remote)",
    "remote_tokens": "its length in tokens", "remote_ms": "its time",
    "judge_local": "the judge's verdict on the local answer: {score, raw, ...}",
    "judge_remote": "the judge's verdict on the remote answer, or null",
    "exact_local": "the exact verifier's 1 / 0 for the local answer, or null (no answer key)",
    "exact_remote": "the same for the remote answer",
    "local_logprobs": "mean and min log-probability of the local answer's tokens, or null",
    "permuted_gold": "multiple choice: the key's letter with the options rotated (data.permuted), or null",
    "permuted_answer": "the device model's answer to the rotated options, or null",
    "exact_permuted": "the exact verifier's 1 / 0 for that answer, or null (not asked)",
    "label": "what the predictors learn and are scored on (``label()``): {pass, source, level, remote_better, orderings, remote_pass}",
}  # fmt: skip
# Predictors added later by the benchmark (``benchmarks.bench.add_predictions``) store
# ``<field>``, ``<field>_decision_ms`` and for RPRA ``<field>_reasoning_tokens``.


def label(record: dict, *, pass_mark: int = 7) -> dict:
    """The quality label of a record's local answer, and where it comes from.

    - ``pass``: the exact verifier's verdict where the item has an answer key (``source``
      "verified": no judge is needed and none is trusted over the key), else the judge's score
      at or above ``pass_mark`` (``source`` "judge"); None when neither exists. Where the device
      also answered the options rotated (``exact_permuted``), both answers must be right
      (``orderings`` 2): a right letter in one order only is position, not knowledge.
    - ``level``: the judge's three-level label (``LEVELS``: bad / ok / great), or None.
    - ``remote_better``: whether the remote's answer is better than the local one, the pairwise
      label APGR rewards: by the verifier where both answers have one, else by the judge; None
      without a remote answer. Ties are not better.
    - ``remote_pass``: whether the remote's answer passes (``remote_passed``), what a probe's
      remote head learns; None without a remote answer.
    """
    exact_local, exact_remote = record.get("exact_local"), record.get("exact_remote")
    rotated = record.get("exact_permuted")
    if exact_local is not None and rotated is not None:
        exact_local = min(exact_local, rotated)
    local = (record.get("judge_local") or {}).get("score")
    remote = (record.get("judge_remote") or {}).get("score")
    if exact_local is not None:
        passed, source = bool(exact_local >= 0.5), "verified"
    elif local is not None:
        passed, source = bool(local >= pass_mark), "judge"
    else:
        passed, source = None, None
    level = None if local is None else next(name for name, (lo, hi) in LEVELS.items() if lo <= min(max(round(local), 1), 10) <= hi)
    if exact_local is not None and exact_remote is not None:
        remote_better = bool(exact_remote > exact_local)
    elif local is not None and remote is not None:
        remote_better = bool(remote > local)
    else:
        remote_better = None
    orderings = 2 if rotated is not None else 1
    return {"pass": passed, "source": source, "level": level, "remote_better": remote_better, "orderings": orderings,
            "remote_pass": remote_passed(record, pass_mark=pass_mark)}  # fmt: skip


def remote_passed(record: dict, *, pass_mark: int = 7) -> bool | None:
    """Whether the remote's answer passes: the exact verifier's verdict where the item has a key
    (the options as asked: the remote answers once), else the judge's score at the pass mark;
    None without a remote answer. Computed from the record, so records collected before the
    label carried it have it too."""
    if record.get("exact_remote") is not None:
        return bool(record["exact_remote"] >= 0.5)
    score = (record.get("judge_remote") or {}).get("score")
    return None if score is None else bool(score >= pass_mark)


def upgrade(record: dict, *, pass_mark: int = 7) -> dict:
    """A record of any version in the current format (older ones gain their ``label``)."""
    if "label" not in record:
        record["label"] = label(record, pass_mark=pass_mark)
    return record


@dataclass(frozen=True)
class Provenance:
    """What produced a collection: enough to tell whether two collections are comparable."""

    suite: str
    split: str
    device_model: str
    device_sha256: str
    remote_id: str
    judge_id: str
    prompts_version: str
    settings: dict
    record_version: int = RECORD_VERSION


def model_name(model: str) -> str:
    """A file-name-safe name for ``model`` (a registered name, or a path or URL to a .gguf file)."""
    name = Path(model).name
    name = name[: -len(".gguf")] if name.endswith(".gguf") else name  # not .stem: "qwen2.5-coder-0.5b-instruct"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def collection_dir(model: str, suite: str, split: str) -> Path:
    """Where the collection of ``model`` (a registered name or a path) on ``suite``/``split`` lives.

    A larger ``--limit`` extends the same collection; nothing is redone.
    """
    from rpra.benchmarks.data import SUITES

    model_part = model_name(model)
    suite_part = re.sub(r"[^A-Za-z0-9._-]+", "_", suite if suite in SUITES else Path(suite).name)
    return home() / "collections" / f"{model_part}--{suite_part}--{split}"


@dataclass
class Collection:
    """A collection's records, in journal order, and its provenance (empty if never written)."""

    folder: Path
    records: list[dict] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    last_run: dict | None = None  # this process's last collection run (``log_run``)

    @property
    def journal(self) -> Path:
        return self.folder / "records.jsonl"

    @property
    def settings(self) -> dict:
        """The device settings the records were collected with (scale_max, reason_tokens, ...)."""
        return self.provenance.get("settings", {})

    @property
    def ids(self) -> set[str]:
        return {r["id"] for r in self.records}

    @classmethod
    def open(cls, folder: Path) -> Collection:
        """The collection in ``folder`` as it is on disk (possibly empty).

        A torn last line (killed mid-write) is dropped and the journal rewritten without it, so
        the next append starts on a clean line. A record appended again under the same id (a
        judged run completing a record collected without a judge) supersedes the earlier one.
        """
        _seed(folder)
        records, torn = _read_journal(folder / "records.jsonl")
        records = list({r["id"]: r for r in records}.values())  # the last of each id, in first-seen order
        if torn and not _busy(folder):  # a collector's line may be half-written right now: only repair an idle journal
            _atomic_write(folder / "records.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        try:
            provenance = json.loads((folder / "provenance.json").read_text())
        except (OSError, ValueError):
            provenance = {}
        pass_mark = provenance.get("settings", {}).get("pass_mark", 7)
        return cls(folder, [upgrade(r, pass_mark=pass_mark) for r in records], provenance)

    @classmethod
    def load(cls, model: str, suite: str, split: str) -> Collection:
        """The collected records of ``model`` on ``suite``/``split``; a clear error if there are none."""
        collection = cls.open(collection_dir(model, suite, split))
        if not collection.records:
            extra = " --no-remote" if split == "train" else ""
            raise ConfigError(
                f"No collected {split} split for {model} on {suite} ({collection.folder}). "
                f"Collect it first: `rpra collect --suite {suite} --split {split}{extra}`."
            )
        return collection

    def set_provenance(self, provenance: Provenance) -> None:
        """Record what produces this collection; refuses one made with another device model file,
        or with other label-shaping settings (``LABEL_SETTINGS``), so records of two models or two
        answer budgets are never mixed."""
        had = self.provenance.get("device_sha256")
        if self.records and had and had != provenance.device_sha256:
            raise ConfigError(
                f"{self.folder} holds records of another device model file (sha256 {had[:12]}…, not "
                f"{provenance.device_sha256[:12]}…). Move that folder away to collect for this model."
            )
        differ = [f"{k}={self.settings[k]} (this run: {provenance.settings[k]})"
                  for k in label_differences(self.settings, provenance.settings)] if self.records else []  # fmt: skip
        if differ:
            raise ConfigError(f"{self.folder} was collected with {', '.join(differ)}: its labels would mean two things. "
                              "Collect with the same settings, or move that folder away.")  # fmt: skip
        if provenance.remote_id == "none" and self.records and self.provenance.get("remote_id", "none") != "none":
            provenance = replace(provenance, remote_id=self.provenance["remote_id"])  # a device-only run keeps who wrote the remote answers
        self.folder.mkdir(parents=True, exist_ok=True)
        self.provenance = asdict(provenance)
        _atomic_write(self.folder / "provenance.json", json.dumps(self.provenance, indent=2))

    def export(self, dest: Path = SEEDS) -> Path:
        """The records as ``dest/<folder name>.jsonl.gz`` and the provenance beside it, written
        reproducibly (no timestamp in the gzip header) so an unchanged export is byte-identical."""
        dest.mkdir(parents=True, exist_ok=True)
        path = dest / f"{self.folder.name}.jsonl.gz"
        body = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in self.records).encode()
        tmp = path.with_name(path.name + ".part")
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
            f.write(body)
        os.replace(tmp, path)
        _atomic_write(dest / f"{self.folder.name}.provenance.json", json.dumps(self.provenance, indent=2, sort_keys=True) + "\n")
        return path

    @contextmanager
    def writing(self):
        """Hold this collection for one writer: a second ``rpra collect`` into the same folder
        gets a clear error instead of appending to a journal the first one may be rewriting. The
        records are re-read once held, so the writer starts from what is on disk now."""
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = _try_lock(self.folder)
        if lock is None:
            raise ConfigError(f"Another process is collecting into {self.folder}. Wait for it to finish (or stop it: "
                              "its finished records are kept) and run this again.") from None  # fmt: skip
        try:
            self.records = Collection.open(self.folder).records
            yield self
        finally:
            lock.release()

    def appender(self) -> _Appender:
        """``with collection.appender() as add: add(record)``: each record is on disk (fsynced)
        before ``add`` returns."""
        self.folder.mkdir(parents=True, exist_ok=True)
        return _Appender(self)

    def save_dataset(self) -> Path:
        """Write the records as a parquet ``datasets`` dataset (nested fields as JSON strings)."""
        from datasets import Dataset, disable_progress_bars

        disable_progress_bars()  # the collection has its own progress bar
        flat = [{k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()} for r in self.records]
        path, tmp = self.folder / "records.parquet", self.folder / "records.parquet.part"
        Dataset.from_list(flat).to_parquet(str(tmp))
        os.replace(tmp, path)
        return path

    def log_run(self, *, new: int, seconds: float) -> dict:
        """Append one run's throughput to ``runs.jsonl``; returns it."""
        from datetime import datetime, timezone

        run = {"finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "new_records": new,
               "seconds": round(seconds, 1), "items_per_hour": round(3600 * new / seconds) if seconds > 0 and new else None}  # fmt: skip
        with open(self.folder / "runs.jsonl", "a") as f:
            f.write(json.dumps(run) + "\n")
        self.last_run = run
        return run

    def runs(self) -> list[dict]:
        """Every run's throughput, oldest first (``log_run``)."""
        path = self.folder / "runs.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def write_skipped(self, skipped: list[dict]) -> None:
        """Items that could not be scored this run; they are not in the journal, so a re-run
        (e.g. with a larger n_ctx) tries them again."""
        _atomic_write(self.folder / "skipped.json", json.dumps(skipped, indent=2))


class _Appender:
    def __init__(self, collection: Collection):
        self.collection = collection

    def __enter__(self):
        self._file = open(self.collection.journal, "a")
        return self.add

    def add(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        records = self.collection.records
        at = next((i for i, r in enumerate(records) if r["id"] == record["id"]), None)
        if at is None:
            records.append(record)
        else:
            records[at] = record  # supersedes the earlier record of this id, as on the next open

    def __exit__(self, *exc) -> None:
        self._file.close()


def _seed(folder: Path) -> bool:
    """Fill an empty collection from its committed export, if there is one; True if it did."""
    seeds = seeds_dir()
    if seeds is None:
        return False
    journal, seed = folder / "records.jsonl", seeds / f"{folder.name}.jsonl.gz"
    if (journal.exists() and journal.stat().st_size) or not seed.exists():
        return False
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(seed, "rt") as f:
        _atomic_write(journal, f.read())
    provenance = seeds / f"{folder.name}.provenance.json"
    if provenance.exists():
        shutil.copyfile(provenance, folder / "provenance.json")
    return True


def _try_lock(folder: Path):
    """``folder``'s collector lock, acquired; None if another process holds it."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(folder / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock


def _busy(folder: Path) -> bool:
    """Whether a collector holds ``folder`` (``Collection.writing``)."""
    if not (folder / ".lock").exists():
        return False
    lock = _try_lock(folder)
    if lock is None:
        return True
    lock.release()
    return False


def _read_journal(path: Path) -> tuple[list[dict], int]:
    """The records in a journal, and how many lines were torn (not valid JSON)."""
    if not path.exists():
        return [], 0
    records, torn = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            torn += 1
    return records, torn


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)
