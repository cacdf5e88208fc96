"""Which letter does a device model's multiple-choice answer open with, against the answer keys?

SmolLM2-135M opens 90-98% of its MMLU / CommonsenseQA / OpenBookQA answers with "A" (issue 13,
40 items each), so its accuracy there is mostly the share of keys that are A, and a predictor of
its correctness learns "is the key A?" or nothing. This measures that bias per
suite for any device model: the greedy answers through the runtime (its own prompt, template and
rating slot), the distribution of their first letters and of the keys, and the accuracy.

Two letters are counted per answer: ``opens``, the option letter the answer starts with ("B",
"(B) ...", "**B.**"; anything else is "other"), and ``chosen``, the letter the verifier reads
(``data.chosen_letter``: it also finds "The answer is B" or an option's text), which decides
the accuracy. An answer that starts with a rating line of its own ("Rating: 9"; the runtime's
instructions ask for one, and with the score slot rewound before the answer, Qwen2.5-Coder-0.5B
writes it) is read after that line, and counted in ``rated``.

    .venv/bin/python -m rpra.benchmarks.first_letters --model NAME --suite mmlu --limit 60 [--json]
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Annotated

import typer

from rpra.benchmarks.data import Item, chosen_letter, load_suite, verify
from rpra.config import DEFAULT_MODEL, Settings
from rpra.local import LocalModel
from rpra.runtime import Runtime

OTHER = "other"
# An option letter as the first thing in the answer, on its own: "B", "B)", "(B", "**B.**", "B: ...".
# "A dog" is not an "A": in prose the capital A is the article.
_OPENING = re.compile(r"[\s*_`'\"]*[(\[]?([A-J])(?=$|[\s*_`]*[).:\],]|\s+[-–—]\s)")
_RATING_LINE = re.compile(r"\s*Rating:[^\n]*(?:\n|$)")


def without_rating_line(answer: str) -> tuple[str, bool]:
    """``answer`` without a leading "Rating: ..." line, and whether it had one."""
    match = _RATING_LINE.match(answer)
    return (answer[match.end():], True) if match else (answer, False)


def opening_letter(answer: str, letters: str) -> str:
    """The option letter ``answer`` opens with (one of ``letters``), else ``OTHER``."""
    match = _OPENING.match(answer)
    return match[1] if match and match[1] in letters else OTHER


def answer_items(runtime: Runtime, items: list[Item]) -> list[dict]:
    """The device model's answer to each item, with its opening letter, chosen letter and correctness."""
    rows = []
    for item in items:
        answer = runtime.ask([{"role": "user", "content": item.prompt}]).answer
        text, rated = without_rating_line(answer)
        letters = "".join(item.meta["options"])
        rows.append(dict(id=item.id, suite=item.suite, letters=letters, gold=item.gold, answer=answer, rated=rated,
                         opens=opening_letter(text, letters), chosen=chosen_letter(item, text) or OTHER,
                         correct=verify(item, text) == 1.0))
    return rows


def summarise(rows: list[dict]) -> dict[str, dict]:
    """Per suite: the count, the accuracy, how many answers opened with a rating line, and the
    distributions (counts) of the keys, the opening letters and the chosen letters."""
    suites: dict[str, dict] = {}
    for suite in dict.fromkeys(row["suite"] for row in rows):
        mine = [row for row in rows if row["suite"] == suite]
        order = [*sorted(set("".join(row["letters"] for row in mine))), OTHER]
        counts = {key: Counter(row[key] for row in mine) for key in ("gold", "opens", "chosen")}
        suites[suite] = dict(n=len(mine), accuracy=sum(row["correct"] for row in mine) / len(mine),
                             rated=sum(row["rated"] for row in mine),
                             **{key: {letter: found[letter] for letter in order} for key, found in counts.items()})
    return suites


def main(
    model: Annotated[str, typer.Option(help="Device model (registered name or .gguf path).")] = DEFAULT_MODEL,
    suite: Annotated[list[str], typer.Option(help="Multiple-choice suite; repeat for several.")] = ["mmlu", "commonsenseqa", "openbookqa"],  # noqa: B006
    limit: Annotated[int, typer.Option(help="Items per suite (a seeded sample).")] = 40,
    seed: Annotated[int, typer.Option(help="Seed of the sample.")] = 0,
    threads: Annotated[int | None, typer.Option(help="llama.cpp threads (default: one per core); on a machine busy "
                                                 "with other jobs 1 is far faster.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary and every answer as JSON.")] = False,
) -> None:
    items = {name: load_suite(name, limit=limit, seed=seed) for name in suite}
    if not_choice := [name for name, found in items.items() if any(item.kind != "choice" for item in found)]:
        raise typer.BadParameter(f"{', '.join(not_choice)} is not a multiple-choice suite.", param_hint="--suite")
    settings = Settings(model=model, temperature=0, max_tokens=16, log=False, mode="local-only", n_threads=threads)
    local = LocalModel.from_settings(settings)
    try:
        rows = answer_items(Runtime(settings, local=local), [item for found in items.values() for item in found])
    finally:
        local.close()
    summary = summarise(rows)
    if json_out:
        print(json.dumps(dict(model=model, limit=limit, seed=seed, suites=summary, answers=rows), indent=2, ensure_ascii=False))
        return
    print(f"{model}: greedy answers (16 tokens), shares of each letter")
    for name, row in summary.items():
        rated = f", {row['rated']} opened with a rating line" if row["rated"] else ""
        print(f"\n{name}: {row['n']} items, accuracy {row['accuracy']:.2f}{rated}")
        for key, label in (("gold", "keys"), ("opens", "opens with"), ("chosen", "chosen")):
            shares = " ".join(f"{letter} {100 * count / row['n']:3.0f}%" for letter, count in row[key].items())
            print(f"  {label:<11} {shares}")


if __name__ == "__main__":
    typer.run(main)
