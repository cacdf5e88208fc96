"""Latency of the RPRA turn on the device model, measured side by side in one run.

For each prompt, interleaved (so machine noise hits every variant alike):

  pa_decision       prefill + score slot -> routing decision (PA), empty KV cache
  pa_decision_warm  the same with the system prompt already cached (the steady state of a chat
                    or a server: every request shares it, so it is prefilled once)
  rpra_decision     prefill + short reasoning + score slot -> routing decision (RPRA), empty cache
  card_decision_warm / card_decision_cold
                    PA decision with a report card in the instructions (the latest card of the
                    model, or a 250-word stand-in), with the card's prefix cached / not cached
  local_answer      the full local turn through the runtime (PA, local-only), empty cache
  direct            llama-cpp-python called directly on the same model for the same tokens: the
                    prompt the runtime evaluated (system prompt, question, slot, score) prefilled,
                    then exactly as many greedy tokens as the runtime generated, empty cache

Reports medians and the two ratios the runtime is held to:
  PA decision / full local answer   (target <= 10%)
  runtime overhead vs direct        (target <= 5%)

    .venv/bin/python benchmarks/latency.py --repeats 3 --out benchmarks/results/latency.json
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from rpra import prompts
from rpra.config import DEFAULT_MODEL, Settings
from rpra.local import LocalModel
from rpra.predictors import ReportCardPredictor
from rpra.runtime import Runtime

# Used when the model has no report card yet: about 250 words, the default card budget.
STAND_IN_CARD = " ".join(
    ["Arithmetic: usually wrong beyond one-digit sums; states a number without working."] * 4
    + ["General knowledge: knows famous capitals and colours; invents details about people and dates."] * 4
    + ["Multiple choice: often picks the last option regardless of the question; rarely explains."] * 4
    + ["Writing: fluent but generic; loses track after a few sentences; ignores length limits."] * 4
    + ["Coding: writes plausible Python for one-line tasks; longer functions have bugs."] * 4
)

# Short factual questions (answers of a few tokens) and requests that draw longer answers.
PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 17 * 23?",
    "Write a Python function that reverses a string.",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for sleeping better.",
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle works to a ten-year-old.",
]


def main(
    model: Annotated[str, typer.Option(help="Device model (name or .gguf path).")] = DEFAULT_MODEL,
    repeats: Annotated[int, typer.Option(help="Rounds over the prompt set.")] = 3,
    threads: Annotated[int, typer.Option(help="llama.cpp threads.")] = 2,
    max_tokens: Annotated[int, typer.Option(help="Answer token budget.")] = 256,
    out: Annotated[Path, typer.Option(help="Where to write the JSON results.")] = Path("benchmarks/results/latency.json"),
) -> None:
    settings = Settings(model=model, temperature=0.0, max_tokens=max_tokens, log=False, n_threads=threads, mode="local-only")
    local = LocalModel.from_settings(settings)
    pa = Runtime(settings, local=local)
    rpra = Runtime(replace(settings, protocol="rpra"), local=local)
    card = _card_text(model)
    carded = Runtime(settings, local=local, predictor=ReportCardPredictor(card))
    card_system = {"role": "system", "content": carded.predictor.system_prompt("pa", settings.scale_max)}
    rows = []
    total = repeats * len(PROMPTS)
    for round_ in range(repeats):
        for question in PROMPTS:
            messages = [{"role": "user", "content": question}]
            system = {"role": "system", "content": prompts.system_prompt("pa", settings.scale_max)}
            # Warm: the cache holds the system prompt (from another request), not this question.
            with local.lock:
                local.clear_cache()
                local.session(local.chat_tokens([system, {"role": "user", "content": "Hello"}]))
            warm = pa.ask(messages)
            with local.lock:
                local.clear_cache()
            reasoned = rpra.ask(messages)
            with local.lock:
                local.clear_cache()
            card_cold = carded.ask(messages)
            with local.lock:  # the card's prefix cached by an earlier request, as in steady state
                local.clear_cache()
                local.session(local.chat_tokens([card_system, {"role": "user", "content": "Hello"}]))
            card_warm = carded.ask(messages)
            # Alternate which of the two compared runs goes first, so order effects cancel out.
            with local.lock:
                local.clear_cache()
            answer = pa.ask(messages) if round_ % 2 == 0 else None
            # The exact tokens the runtime evaluated before answering, then as many answer tokens.
            prefix = local.chat_tokens([system, *messages]) + local.tokenize(prompts.SLOT_OPEN["pa"])
            prefix += local.tokenize(str(warm.prediction.mode)) + local.tokenize(prompts.SCORE_CLOSE)
            n = max(warm.tokens["local_answer"], 1)
            with local.lock:
                direct = local.baseline_generate(prefix, n, repeat_penalty=settings.repeat_penalty)
            if answer is None:
                with local.lock:
                    local.clear_cache()
                answer = pa.ask(messages)
            rows.append({
                "prompt": question,
                "pa_decision_s": answer.timings_ms["decision"] / 1000,
                "pa_decision_warm_s": warm.timings_ms["decision"] / 1000,
                "rpra_decision_s": reasoned.timings_ms["decision"] / 1000,
                "card_decision_warm_s": card_warm.timings_ms["decision"] / 1000,
                "card_decision_cold_s": card_cold.timings_ms["decision"] / 1000,
                "card_tokens": len(local.tokenize(card)),
                "rpra_reasoning_tokens": reasoned.tokens.get("reasoning", 0),
                "local_answer_s": answer.timings_ms["total"] / 1000,
                "direct_s": direct,
                "prompt_tokens": len(prefix),
                "answer_tokens": n,
            })
            print(f"[{len(rows)}/{total}] {question[:40]:40s} pa {rows[-1]['pa_decision_s']:.3f}s  "
                  f"answer {rows[-1]['local_answer_s']:.2f}s  direct {direct:.2f}s  ({n} tokens)", file=sys.stderr)

    keys = ("pa_decision_s", "pa_decision_warm_s", "rpra_decision_s", "card_decision_warm_s", "card_decision_cold_s",
            "local_answer_s", "direct_s")  # fmt: skip
    med = {k: statistics.median(r[k] for r in rows) for k in keys}

    def share(key: str) -> dict:
        """key / full local answer: median over requests, and over the totals (long answers weigh more)."""
        return {
            "median": statistics.median(r[key] / r["local_answer_s"] for r in rows),
            "of_totals": sum(r[key] for r in rows) / sum(r["local_answer_s"] for r in rows),
        }

    overhead = {
        "median": statistics.median(r["local_answer_s"] / r["direct_s"] - 1 for r in rows),
        "of_totals": sum(r["local_answer_s"] for r in rows) / sum(r["direct_s"] for r in rows) - 1,
    }
    summary = {
        "model": model, "threads": threads, "requests": len(rows),
        "median_s": med,
        "pa_decision_over_local_answer": share("pa_decision_s"),
        "pa_decision_warm_over_local_answer": share("pa_decision_warm_s"),
        "rpra_decision_over_local_answer": share("rpra_decision_s"),
        "runtime_overhead_vs_direct": overhead,
        "answer_tokens_median": statistics.median(r["answer_tokens"] for r in rows),
        "card_tokens": rows[0]["card_tokens"],
        # What a cached card adds per request, over the zero-shot decision (both warm).
        "card_added_ms_median": statistics.median((r["card_decision_warm_s"] - r["pa_decision_warm_s"]) * 1000 for r in rows),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))
    print(f"\nmodel {model}, {threads} threads, {len(rows)} requests, "
          f"median answer {summary['answer_tokens_median']:.0f} tokens (medians over requests):")
    print(f"  PA decision, cold cache          {med['pa_decision_s'] * 1000:8.1f} ms")
    print(f"  PA decision, system prompt warm  {med['pa_decision_warm_s'] * 1000:8.1f} ms")
    print(f"  RPRA decision, cold cache        {med['rpra_decision_s'] * 1000:8.1f} ms")
    print(f"  card PA decision, card cached    {med['card_decision_warm_s'] * 1000:8.1f} ms   ({summary['card_tokens']}-token card)")
    print(f"  card PA decision, cold cache     {med['card_decision_cold_s'] * 1000:8.1f} ms")
    print(f"  a cached card adds               {summary['card_added_ms_median']:8.1f} ms per request (median)")
    print(f"  full local answer (runtime)      {med['local_answer_s'] * 1000:8.1f} ms")
    print(f"  same tokens, llama-cpp direct    {med['direct_s'] * 1000:8.1f} ms")
    print("                                      median   of totals")
    for label, key in (("PA decision / local answer (cold)", "pa_decision_over_local_answer"),
                       ("PA decision / local answer (warm)", "pa_decision_warm_over_local_answer"),
                       ("RPRA decision / local answer", "rpra_decision_over_local_answer"),
                       ("runtime overhead vs direct", "runtime_overhead_vs_direct")):
        print(f"  {label:34s} {summary[key]['median']:7.1%}   {summary[key]['of_totals']:7.1%}")
    print("  targets: PA decision <= 10% of a local answer; overhead <= 5%")
    print(f"results: {out}")


def _card_text(model: str) -> str:
    try:
        from rpra.benchmarks.report_cards import latest_card
    except ImportError:  # the bench extra is not installed
        return STAND_IN_CARD
    card = latest_card(model)
    return card.text if card else STAND_IN_CARD


if __name__ == "__main__":
    typer.run(main)
