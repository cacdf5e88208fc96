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

``--decisions-only`` instead times the decisions side by side with a probe for the model
(``--probe``, default: the committed one under benchmarks/results/probes/, else the one next to
the model file), interleaved, cold cache each time:

  pa_decision       zero-shot PA: prefill + score slot
  probe_decision    the probe: the same prefill, reading its layer through the graph callback,
                    then its numpy head (target: no more than zero-shot PA's)
  pa_capturing      zero-shot PA on the model that captures the probe's layer (what the
                    callback alone costs)

    .venv/bin/python benchmarks/latency.py --repeats 3 --out benchmarks/results/latency.json
    .venv/bin/python benchmarks/latency.py --decisions-only --out benchmarks/results/decision_cost.json
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
    probe: Annotated[Path | None, typer.Option(help="Probe to time against zero-shot PA (default: the model's committed probe, if any).")] = None,
    decisions_only: Annotated[bool, typer.Option(help="Time only the decisions (zero-shot PA against the probe), no answers.")] = False,
) -> None:
    settings = Settings(model=model, temperature=0.0, max_tokens=max_tokens, log=False, n_threads=threads, mode="local-only")
    probe = probe or _committed_probe(model)
    if decisions_only:
        if probe is None:
            raise typer.BadParameter(f"No probe for {model}: fit one with `rpra train probe`, or pass --probe.")
        result = decision_cost(settings, probe, repeats)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        _print_decision_cost(result)
        print(f"results: {out}")
        return
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


def decision_cost(settings: Settings, probe_path: Path, repeats: int) -> dict:
    """Zero-shot PA's decision against the probe's, interleaved over PROMPTS, cold cache each time
    (alternating which goes first); and zero-shot PA on the capturing model, for the callback's
    own cost. Milliseconds to the decision, as the runtime reports them."""
    from rpra.models import file_sha256, resolve
    from rpra.predictors import ProbePredictor
    from rpra.probe import Probe

    fitted = Probe.load(probe_path)
    fitted.check_model(file_sha256(resolve(settings.model)), settings.model)
    plain = LocalModel.from_settings(settings)
    capturing = LocalModel.from_settings(settings, capture_layers=fitted.capture_layers or None)
    runtimes = {
        "pa_decision": Runtime(settings, local=plain),
        "probe_decision": Runtime(settings, local=capturing, predictor=ProbePredictor(fitted)),
        "pa_capturing": Runtime(settings, local=capturing),
    }
    rows = []
    for round_ in range(repeats):
        for k, question in enumerate(PROMPTS):
            order = list(runtimes) if (round_ + k) % 2 == 0 else list(reversed(runtimes))
            row = {"prompt": question}
            for name in order:
                runtime = runtimes[name]
                with runtime.local.lock:
                    runtime.local.clear_cache()
                row[f"{name}_ms"] = runtime.predict([{"role": "user", "content": question}]).decision_ms
            rows.append(row)
            print(f"[{len(rows)}/{repeats * len(PROMPTS)}] " + "  ".join(f"{n} {row[f'{n}_ms']:.0f} ms" for n in runtimes), file=sys.stderr)

    def stats(name: str) -> dict:
        values = sorted(r[f"{name}_ms"] for r in rows)
        return {"p50": statistics.median(values), "p95": values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]}

    summary = {name: stats(name) for name in runtimes}
    summary["probe_over_pa_median"] = statistics.median(r["probe_decision_ms"] / r["pa_decision_ms"] for r in rows)
    summary["capturing_over_pa_median"] = statistics.median(r["pa_capturing_ms"] / r["pa_decision_ms"] for r in rows)
    return {"model": settings.model, "threads": settings.n_threads, "probe": str(probe_path), "probe_layer": fitted.layer,
            "requests": len(rows), "summary": summary, "rows": rows}  # fmt: skip


def _print_decision_cost(result: dict) -> None:
    s = result["summary"]
    print(f"\nmodel {result['model']}, {result['threads']} threads, {result['requests']} decisions each, cold cache:")
    print(f"  zero-shot PA                    p50 {s['pa_decision']['p50']:7.1f} ms   p95 {s['pa_decision']['p95']:7.1f} ms")
    print(f"  probe, layer {result['probe_layer']!s:<4}               p50 {s['probe_decision']['p50']:7.1f} ms   p95 {s['probe_decision']['p95']:7.1f} ms")
    print(f"  zero-shot PA, layer captured    p50 {s['pa_capturing']['p50']:7.1f} ms   p95 {s['pa_capturing']['p95']:7.1f} ms")
    print(f"  probe / zero-shot PA (median of per-request ratios): {s['probe_over_pa_median']:.2f}  (target <= 1)")
    print(f"  capturing / not (zero-shot PA): {s['capturing_over_pa_median']:.2f}")


def _committed_probe(model: str) -> Path | None:
    """The probe benchmarks/results documents for this model, else the one next to the model file."""
    from rpra.benchmarks.collection import model_name
    from rpra.probe import default_probe_path

    committed = Path(__file__).parent / "results" / "probes" / f"{model_name(model)}.probe.npz"
    if committed.exists():
        return committed
    from rpra.errors import RpraError
    from rpra.models import resolve

    try:
        path = default_probe_path(resolve(model))
    except RpraError:  # not pulled: the run reports that itself
        return None
    return path if path.exists() else None


def _card_text(model: str) -> str:
    try:
        from rpra.benchmarks.report_cards import latest_card
    except ImportError:  # the bench extra is not installed
        return STAND_IN_CARD
    card = latest_card(model)
    return card.text if card else STAND_IN_CARD


if __name__ == "__main__":
    typer.run(main)
