"""Report cards: a natural-language summary of the device model's strengths and weaknesses.

Built progressively (the Report Cards paper's PRESS method): the larger model starts from an empty
card and, batch by batch of judged calibration records, rewrites it to account for the new
evidence, organised by topic and kept under a word budget. Saved as versioned markdown files
under ``RPRA_HOME/report-cards/<device model>/``; the report-card predictor puts the card in the
device model's instructions.

The card is grounded in measured numbers. A small writer left to itself wrote a generic,
over-positive card ("Strong: accurate in basic arithmetic" about a model that failed most sums), so
each update also shows the writer the per-topic statistics of all the evidence so far (answers,
mean judge score, share passing, share correct by an answer key), and the finished card ends with
those statistics, computed here rather than written by a model.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from rpra.benchmarks.cache import cached
from rpra.benchmarks.collection import model_name, seeds_dir, upgrade
from rpra.config import home
from rpra.errors import RemoteError

STATS_HEADER = "Measured over all the evidence so far (exact numbers: the card must agree with them):"
UPDATE_PROMPT = """You are assessing a small AI assistant. Its answers were checked: by an answer key where the question has one (correct or incorrect), otherwise by a judge's score from 1 (wrong or useless) to 10 (perfect).

Current report card:
{card}

{stats_header}
{stats}

New examples:
{examples}

Rewrite the report card so it accounts for all the evidence so far. Organise it by topic (for example: arithmetic, word problems, science and general knowledge, commonsense, coding, open-ended writing). Under each topic give the assistant's strengths and weaknesses as short concrete patterns, and say how well it usually does there. At most {max_words} words. Reply with the report card only."""
FIX_PROMPT = """Your report card contradicts the measured numbers:
{problems}

{stats_header}
{stats}

Report card:
{card}

Rewrite the report card so that every statement agrees with the numbers. At most {max_words} words. Reply with the report card only."""

# Words that say a topic goes well or badly: what ``contradictions`` checks against the numbers.
_GOOD = re.compile(r"\b(strong|strength|good|great|accurate|reliable|excellent|excels?|competent|solid|handles? well|mostly correct|usually correct)\b", re.I)
_BAD = re.compile(r"\b(weak|weakness|poor|wrong|fails?|failing|struggles?|unreliable|inaccurate|incorrect|rarely|mistakes?|errors?|not|never|cannot)\b", re.I)
_GENERIC = {"simple", "graded", "counting"}  # parts of suite names too common to name the suite


class Writer(Protocol):
    """What writes the card: rpra.remote.RemoteModel, or anything with the same ``complete``."""

    def complete(self, messages: list[dict], *, max_tokens: int | None = None, temperature: float | None = None) -> str: ...


@dataclass(frozen=True)
class Card:
    text: str
    version: int
    path: Path
    meta: dict


def evidence(record: dict, pass_mark: float = 7) -> dict | None:
    """What a record says about its local answer, or None when nothing checked it: the judge's
    ``score`` (or None), and ``passed``: the answer key's verdict where there is one (in both
    option orders for multiple choice, ``collection.label``), else the judge's score >= ``pass_mark``."""
    label = record.get("label") or upgrade(dict(record))["label"]
    score = (record.get("judge_local") or {}).get("score")
    verified = label.get("source") == "verified"
    if not verified and score is None:
        return None
    return {"score": score, "passed": bool(label["pass"]) if verified else score >= pass_mark, "verified": verified, "level": label.get("level")}


def usable(records: list[dict]) -> list[dict]:
    """The records a card can learn from: judged, or checked by an answer key."""
    return [r for r in records if evidence(r) is not None]


def format_examples(records: list[dict], *, answer_chars: int = 300, question_chars: int = 400) -> str:
    """Checked records as the writer sees them: topic, question, answer, verdict or score, reference."""
    blocks = []
    for r in records:
        seen = evidence(r)
        lines = [
            f"- Topic: {r.get('category') or r.get('suite')} ({r.get('suite')})",
            f"  Question: {_clip(r['prompt'], question_chars)}",
            f"  Assistant's answer: {_clip(r['local_answer'], answer_chars)}",
        ]
        if seen["verified"]:
            lines.append(f"  Answer key says: {'correct' if seen['passed'] else 'incorrect'}")
        else:
            lines.append(f"  Judge's score: {seen['score']:.1f}/10" if seen["score"] is not None else "  Judge's score: unavailable")
        if r.get("reference"):
            lines.append(f"  Reference answer: {_clip(r['reference'], 200)}")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def topic_stats(records: list[dict], *, pass_mark: float = 7, min_items: int = 5, max_categories: int = 12) -> list[dict]:
    """Per-topic numbers over checked records: one row per suite, then one per category of that
    suite with at least ``min_items`` records (when the suite has 2 to ``max_categories``
    categories: arithmetic levels, not MMLU's 57 subjects).

    Each row: ``topic``, ``level`` (0 suite, 1 category), ``n``; ``passed`` (the label: verified
    correct, else judge score >= ``pass_mark``); ``judged``, their ``mean`` judge score (None
    without any) and how many ``scored`` ``pass_mark`` or more; ``checked`` / ``correct``: the records with an exact verdict (``exact_local``,
    from an answer key) and how many of those were right; ``modal``: the most common label, as the
    RPRA paper's cards give it (the judge's bad / ok / great where judged, else correct /
    incorrect; "mixed" on a tie).
    """
    suites: dict[str, list[dict]] = defaultdict(list)
    for r in usable(records):
        suites[r.get("suite") or "other"].append(r)

    def row(topic: str, level: int, rs: list[dict]) -> dict:
        seen = [evidence(r, pass_mark) for r in rs]
        scores = [e["score"] for e in seen if e["score"] is not None]
        exact = [r["exact_local"] for r in rs if r.get("exact_local") is not None]
        labels = [e["level"] or ("correct" if e["passed"] else "incorrect") for e in seen]
        counts = sorted((labels.count(x), x) for x in set(labels))
        modal = "mixed" if len(counts) > 1 and counts[-1][0] == counts[-2][0] else counts[-1][1]
        return {"topic": topic, "level": level, "n": len(rs), "passed": sum(e["passed"] for e in seen), "judged": len(scores),
                "mean": sum(scores) / len(scores) if scores else None, "scored": sum(x >= pass_mark for x in scores),
                "checked": len(exact), "correct": sum(e >= 1.0 for e in exact), "modal": modal}  # fmt: skip

    rows = []
    for suite, rs in sorted(suites.items()):
        rows.append(row(suite, 0, rs))
        categories: dict[str, list[dict]] = defaultdict(list)
        for r in rs:
            if r.get("category"):
                categories[r["category"]].append(r)
        if 1 < len(categories) <= max_categories:
            rows += [row(c, 1, cs) for c, cs in sorted(categories.items()) if len(cs) >= min_items]
    return rows


def format_stats(rows: list[dict], *, pass_mark: float = 7) -> str:
    """The statistics as short lines the writer and the device model can both read."""
    lines = []
    for r in rows:
        text = f"{'  ' * r['level']}- {r['topic']}: {r['n']} answer{'s' * (r['n'] != 1)}"
        if r["judged"]:
            text += f", mean score {r['mean']:.1f}/10, {r['scored']} scored {pass_mark:g}+"
            if r["checked"]:
                text += f", {r['correct']} of {r['checked']} correct"
        else:
            text += f", {r['passed']} correct ({r['passed'] / r['n']:.0%})"
        lines.append(text + ("; mixed" if r["modal"] == "mixed" else f"; mostly {r['modal']}"))
    return "\n".join(lines)


def contradictions(card: str, rows: list[dict], *, low: float = 0.4, high: float = 0.7) -> list[str]:
    """Statements of the card that its numbers refute: a sentence that names a suite and only
    praises it where under ``low`` of its answers pass, or only faults it where ``high`` or more
    pass. A lint, not a reader: sentences that both praise and fault are left alone."""
    problems = []
    suites = [r for r in rows if r["level"] == 0 and r["n"]]
    for sentence in re.split(r"(?<=[.;!?])\s+|\n+", card):
        good, bad = bool(_GOOD.search(sentence)), bool(_BAD.search(sentence))
        if good == bad:
            continue
        for r in suites:
            if not any(re.search(rf"\b{re.escape(name)}", sentence, re.I) for name in _names(r["topic"])):
                continue
            rate = r["passed"] / r["n"]
            if (good and rate < low) or (bad and rate >= high):
                problems.append(f"- \"{sentence.strip()}\": but {r['passed']} of {r['n']} {r['topic']} answers pass ({rate:.0%}).")
    return problems


def _names(suite: str) -> list[str]:
    """How a card may name a suite: ``commonsenseqa`` as "commonsense", ``simple-equations`` as "equations"."""
    names = {suite, suite.replace("-", " ")}
    if suite.endswith("qa") and len(suite) > 4:
        names.add(suite[:-2])
    names |= {part for part in suite.split("-") if len(part) >= 4 and part not in _GENERIC}
    return sorted(names)


def _without(card: str, problems: list[str]) -> str:
    """The card without the sentences ``problems`` quote."""
    for problem in problems:
        quoted = problem.split('"')[1]
        card = card.replace(quoted, "")
    return "\n".join(line for line in card.splitlines() if line.strip(" -*:")).strip()


def build_card(records: list[dict], writer: Writer, *, batch_size: int = 8, max_words: int = 250, pass_mark: float = 7,
               example_chars: int = 300, cache=None, writer_id: str = "writer", progress=None, log=None) -> tuple[str, list[str]]:  # fmt: skip
    """Progressively write a card over ``records`` (judged, or checked by an answer key); returns
    the card and each intermediate version.

    After each update the card is checked against the numbers (``contradictions``): the writer
    is asked once to fix what they refute, and what it leaves is cut. The writer's card is kept
    under ``max_words``; the measured statistics of all records are appended to the final card
    (outside that budget). The writer sees each question and answer cut to ``example_chars``.

    Resumable: with a ``cache`` (``benchmarks.cache.CallCache``) every writer call is stored under
    ``writer_id`` and its prompt, so a re-run after an interruption or an error replays the
    finished updates and calls the writer only from where it stopped. A batch whose prompt the
    writer rejects (HTTP 400 / 413: longer than its context) is halved and retried.
    """
    checked = usable(records)
    if not checked:
        raise ValueError("No judged or verified records to write a report card from: run `rpra collect --split calibration` "
                         "(or `rpra collect --split train --verified`) first.")  # fmt: skip

    def reply(prompt: str) -> str:
        def call() -> dict:
            return {"text": writer.complete([{"role": "user", "content": prompt}], max_tokens=int(max_words * 2), temperature=0.0)}

        text = cached(cache, "card-writer", writer_id, {"prompt": prompt, "max_tokens": int(max_words * 2)}, call)["text"]
        text = text.split(STATS_HEADER)[0]  # a writer that copies the statistics block: they go stale, and the card ends with fresh ones
        return limit_words(text.strip(), max_words)

    card, history, start, size = "(empty: no evidence yet)", [], 0, batch_size
    while start < len(checked):
        batch, rows = checked[start : start + size], topic_stats(checked[: start + size], pass_mark=pass_mark)
        stats = format_stats(rows, pass_mark=pass_mark)
        prompt = UPDATE_PROMPT.format(card=card, stats_header=STATS_HEADER, stats=stats,
                                      examples=format_examples(batch, answer_chars=example_chars, question_chars=example_chars),
                                      max_words=max_words)  # fmt: skip
        try:
            update = reply(prompt) or card
        except RemoteError as exc:
            if size == 1 or not re.search(r"HTTP 4(00|13)", str(exc)):
                raise
            size = max(1, size // 2)
            if log:
                log(f"update {len(history) + 1}: the writer rejected the prompt ({_clip(str(exc), 120)}); {size} examples per update from here")
            continue
        problems = contradictions(update, rows)
        if problems:
            fix = FIX_PROMPT.format(problems="\n".join(problems), stats_header=STATS_HEADER, stats=stats, card=update, max_words=max_words)
            update = reply(fix) or update
            left = contradictions(update, rows)
            if log:
                log(f"update {len(history) + 1}: {len(problems)} statement(s) contradicted the numbers; {len(left)} left after the rewrite, cut")
            update = _without(update, left) if left else update
        card = update or card
        history.append(card)
        start += len(batch)
        if progress:
            progress(len(batch))
    judged = {(r.get("judge_local") or {}).get("score") is not None for r in checked}
    kind = "judged" if judged == {True} else "verified" if judged == {False} else "judged or verified"
    final = format_stats(topic_stats(checked, pass_mark=pass_mark), pass_mark=pass_mark)
    return f"{card}\n\nMeasured on {len(checked)} {kind} answers:\n{final}", history


def limit_words(text: str, max_words: int) -> str:
    """Keep the card under the budget, cutting at a line boundary when the writer overshoots."""
    if len(text.split()) <= max_words:
        return text
    kept, count = [], 0
    for line in text.splitlines():
        n = len(line.split())
        if count + n > max_words:
            break
        kept.append(line)
        count += n
    return "\n".join(kept).strip() or " ".join(text.split()[:max_words])


def cards_dir(device_model: str) -> Path:
    return home() / "report-cards" / re.sub(r"[^A-Za-z0-9._-]+", "_", Path(device_model).name)


def journal_path(device_model: str) -> Path | None:
    """The committed journal of the card writer's calls for ``device_model`` (``cache.Journal``):
    ``benchmarks/results/calls/card-writer--<model>.jsonl.gz``, beside the committed collections
    (``RPRA_SEEDS``'s parent when that is set; None when it is empty: nothing committed is read)."""
    seeds = seeds_dir()
    return None if seeds is None else seeds.parent / "calls" / f"card-writer--{model_name(device_model)}.jsonl.gz"


def save_card(text: str, *, device_model: str, meta: dict) -> Card:
    """Write ``v<N>.md`` (the card) and ``v<N>.json`` (how it was made) with the next version number."""
    folder = cards_dir(device_model)
    folder.mkdir(parents=True, exist_ok=True)
    version = 1 + max((int(p.stem[1:]) for p in folder.glob("v*.md") if p.stem[1:].isdigit()), default=0)
    path = folder / f"v{version}.md"
    meta = {**meta, "version": version, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "words": len(text.split())}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    path.write_text(text.strip() + "\n")
    return Card(text, version, path, meta)


def latest_card(device_model: str) -> Card | None:
    folder = cards_dir(device_model)
    versions = sorted((int(p.stem[1:]), p) for p in folder.glob("v*.md") if p.stem[1:].isdigit()) if folder.exists() else []
    if not versions:
        return None
    version, path = versions[-1]
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return Card(path.read_text(), version, path, meta)


def _clip(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"
