"""Does a local answer read its own predicted score? Measured side by side on the same items.

The PA turn writes ``Rating: [[N]]`` and then, if it answers locally, the model's answer. A small
model copies what it reads: after ``[[1]]`` SmolLM2-135M answered "The answer is 1." to sums it
otherwise gets right. This compares, for each item, the greedy answer generated right after the
written score (``answer_after_score = true``, the RPRA paper's layout) with the answer generated
from the turn's start (the default), and scores both with the exact verifier.

    .venv/bin/python -m rpra.benchmarks.answer_layout --suite arithmetic --limit 40

Items come from the train split (never the test split); the score written is the zero-shot
prediction's mode, as the runtime writes it.
"""

from __future__ import annotations

import argparse
import json

from rpra import prompts
from rpra.benchmarks.bench import items_for
from rpra.benchmarks.data import verify
from rpra.config import DEFAULT_MODEL, Settings
from rpra.local import Generated, LocalModel
from rpra.prediction import Prediction
from rpra.predictors import ZeroShotPredictor, make_slot


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--suite", default="arithmetic")
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    settings = Settings(model=args.model, temperature=0.0, log=False)
    local = LocalModel.from_settings(settings)
    slot = make_slot(local, settings.scale_max)
    system = ZeroShotPredictor().system_prompt("pa", settings.scale_max)
    rows = []
    for item in items_for(args.suite, "train", limit=args.limit, keyed=True):
        base = local.chat_tokens([{"role": "system", "content": system}, {"role": "user", "content": item.prompt}])
        with local.lock:
            session = local.session(base + local.tokenize(prompts.SLOT_OPEN["pa"]))
            score = Prediction.from_logprobs(session.score(slot), settings.pass_mark).mode
        row = {"id": item.id, "category": item.category, "score_written": score}
        for layout, extra in (("after_score", local.tokenize(prompts.SLOT_OPEN["pa"]) + local.tokenize(str(score)) + local.tokenize(prompts.SCORE_CLOSE)), ("from_turn_start", [])):
            out = Generated()
            with local.lock:
                for _ in local.session(base + extra).generate(args.max_tokens, temperature=0.0, repeat_penalty=settings.repeat_penalty, out=out):
                    pass
            row[layout] = verify(item, out.text.strip())
        rows.append(row)
    summary = {layout: sum(r[layout] for r in rows) / len(rows) for layout in ("after_score", "from_turn_start")}
    result = {"model": args.model, "suite": args.suite, "items": len(rows), "correct": summary, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.model} on {len(rows)} {args.suite} train items, greedy, {args.max_tokens}-token answers:")
    print(f"  answer after the written score: {summary['after_score']:.1%} correct")
    print(f"  answer from the turn's start:   {summary['from_turn_start']:.1%} correct")


if __name__ == "__main__":
    main()
