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

from rpra.config import home

STATS_HEADER = "Measured over all the evidence so far (exact numbers: the card must agree with them):"
UPDATE_PROMPT = """You are assessing a small AI assistant. A judge scored its answers from 1 (wrong or useless) to 10 (perfect).

Current report card:
{card}

{stats_header}
{stats}

New judged examples:
{examples}

Rewrite the report card so it accounts for all the evidence so far. Organise it by topic (for example: arithmetic, word problems, science and general knowledge, commonsense, coding, open-ended writing). Under each topic give the assistant's strengths and weaknesses as short concrete patterns, and say how well it usually scores there. At most {max_words} words. Reply with the report card only."""


class Writer(Protocol):
    """What writes the card: rpra.remote.RemoteModel, or anything with the same ``complete``."""

    def complete(self, messages: list[dict], *, max_tokens: int | None = None, temperature: float | None = None) -> str: ...


@dataclass(frozen=True)
class Card:
    text: str
    version: int
    path: Path
    meta: dict


def format_examples(records: list[dict], *, answer_chars: int = 300) -> str:
    """Judged records as the writer sees them: topic, question, answer, score, reference."""
    blocks = []
    for r in records:
        score = r["judge_local"]["score"]
        lines = [
            f"- Topic: {r.get('category') or r.get('suite')} ({r.get('suite')})",
            f"  Question: {_clip(r['prompt'], 400)}",
            f"  Assistant's answer: {_clip(r['local_answer'], answer_chars)}",
            f"  Judge's score: {score:.1f}/10" if score is not None else "  Judge's score: unavailable",
        ]
        if r.get("reference"):
            lines.append(f"  Reference answer: {_clip(r['reference'], 200)}")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def topic_stats(records: list[dict], *, pass_mark: float = 7, min_items: int = 5) -> list[dict]:
    """Per-topic numbers over judged records: one row per suite, then one per category of that suite
    with at least ``min_items`` records (when the suite has more than one category).

    Each row: ``topic``, ``level`` (0 suite, 1 category), ``n``, ``mean`` judge score, ``passed``
    (judge score >= ``pass_mark``), and ``checked`` / ``correct``: the records with an exact verdict
    (``exact_local``, from an answer key) and how many of those were right.
    """
    suites: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if r["judge_local"]["score"] is not None:
            suites[r.get("suite") or "other"].append(r)

    def row(topic: str, level: int, rs: list[dict]) -> dict:
        scores = [r["judge_local"]["score"] for r in rs]
        exact = [r["exact_local"] for r in rs if r.get("exact_local") is not None]
        return {"topic": topic, "level": level, "n": len(rs), "mean": sum(scores) / len(scores),
                "passed": sum(s >= pass_mark for s in scores), "checked": len(exact), "correct": sum(e >= 1.0 for e in exact)}  # fmt: skip

    rows = []
    for suite, rs in sorted(suites.items()):
        rows.append(row(suite, 0, rs))
        categories: dict[str, list[dict]] = defaultdict(list)
        for r in rs:
            if r.get("category"):
                categories[r["category"]].append(r)
        if len(categories) > 1:
            rows += [row(c, 1, cs) for c, cs in sorted(categories.items()) if len(cs) >= min_items]
    return rows


def format_stats(rows: list[dict], *, pass_mark: float = 7) -> str:
    """The statistics as short lines the writer and the device model can both read."""
    lines = []
    for r in rows:
        text = f"{'  ' * r['level']}- {r['topic']}: {r['n']} answer{'s' * (r['n'] != 1)}, mean score {r['mean']:.1f}/10, {r['passed']} scored {pass_mark:g}+"
        if r["checked"]:
            text += f", {r['correct']} of {r['checked']} correct"
        lines.append(text)
    return "\n".join(lines)


def build_card(records: list[dict], writer: Writer, *, batch_size: int = 8, max_words: int = 250, pass_mark: float = 7,
               progress=None) -> tuple[str, list[str]]:  # fmt: skip
    """Progressively write a card over ``records``; returns the card and each intermediate version.

    The writer's card is kept under ``max_words``; the measured statistics of all records are
    appended to the final card (outside that budget).
    """
    usable = [r for r in records if r["judge_local"]["score"] is not None]
    if not usable:
        raise ValueError("No judged records to write a report card from: run `rpra collect --split calibration` first.")
    def measured(rs: list[dict]) -> str:
        return format_stats(topic_stats(rs, pass_mark=pass_mark), pass_mark=pass_mark)

    card, history = "(empty: no evidence yet)", []
    for start in range(0, len(usable), batch_size):
        batch = usable[start : start + batch_size]
        prompt = UPDATE_PROMPT.format(card=card, stats_header=STATS_HEADER, stats=measured(usable[: start + len(batch)]),
                                      examples=format_examples(batch), max_words=max_words)  # fmt: skip
        reply = writer.complete([{"role": "user", "content": prompt}], max_tokens=int(max_words * 2), temperature=0.0)
        reply = reply.split(STATS_HEADER)[0]  # a writer that copies the statistics block: they go stale, and the card ends with fresh ones
        card = limit_words(reply.strip(), max_words) or card
        history.append(card)
        if progress:
            progress(len(batch))
    return f"{card}\n\nMeasured on {len(usable)} judged answers:\n{measured(usable)}", history


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
