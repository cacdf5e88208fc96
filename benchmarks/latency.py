"""Latency of the RPRA turn on the device model, measured side by side in one run.

For each prompt, interleaved (so machine noise hits every variant alike):

  pa_decision       prefill + score slot -> routing decision (PA), empty KV cache
  pa_decision_warm  the same with the system prompt already cached (the steady state of a chat
                    or a server: every request shares it, so it is prefilled once)
  rpra_decision     prefill + short reasoning + score slot -> routing decision (RPRA), empty cache
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
import time
from pathlib import Path
from typing import Annotated

import typer

from rpra import prompts
from rpra.config import Settings
from rpra.local import LocalModel
from rpra.models import resolve
from rpra.runtime import Runtime

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


def direct_llama(model: LocalModel, prefix: list[int], n_tokens: int) -> float:
    """Seconds for plain llama-cpp-python to prefill ``prefix`` and generate ``n_tokens`` greedily."""
    llm = model._llm
    llm.reset()
    start = time.perf_counter()
    for i, _ in enumerate(llm.generate(prefix, temp=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1, reset=False)):
        if i + 1 >= n_tokens:
            break
    return time.perf_counter() - start


def main(
    model: Annotated[str, typer.Option(help="Device model (name or .gguf path).")] = "smollm2-135m-instruct",
    repeats: Annotated[int, typer.Option(help="Rounds over the prompt set.")] = 3,
    threads: Annotated[int, typer.Option(help="llama.cpp threads.")] = 2,
    max_tokens: Annotated[int, typer.Option(help="Answer token budget.")] = 256,
    out: Annotated[Path, typer.Option(help="Where to write the JSON results.")] = Path("benchmarks/results/latency.json"),
) -> None:
    settings = Settings(model=model, temperature=0.0, max_tokens=max_tokens, log=False, n_threads=threads, mode="local-only")
    local = LocalModel(resolve(model), name=model, n_ctx=settings.n_ctx, n_threads=threads)
    pa = Runtime(settings, local=local)
    rpra = Runtime(Settings(**{**_fields(settings), "protocol": "rpra"}), local=local)
    rows = []
    total = repeats * len(PROMPTS)
    for round_ in range(repeats):
        for question in PROMPTS:
            messages = [{"role": "user", "content": question}]
            system = {"role": "system", "content": prompts.system_prompt("pa", settings.scale_max)}
            # Warm: the cache holds the system prompt (from another request), not this question.
            with local.lock:
                local._llm.reset()
                local.session(local.chat_tokens([system, {"role": "user", "content": "Hello"}]))
            warm = pa.ask(messages)
            local._llm.reset()
            reasoned = rpra.ask(messages)
            # Alternate which of the two compared runs goes first, so order effects cancel out.
            local._llm.reset()
            answer = pa.ask(messages) if round_ % 2 == 0 else None
            # The exact tokens the runtime evaluated before answering, then as many answer tokens.
            prefix = local.chat_tokens([system, *messages]) + local.tokenize(prompts.SLOT_OPEN["pa"])
            prefix += local.tokenize(str(warm.prediction.mode)) + local.tokenize(prompts.SLOT_CLOSE + prompts.ANSWER_OPEN)
            n = max(warm.tokens["local_answer"], 1)
            direct = direct_llama(local, prefix, n)
            if answer is None:
                local._llm.reset()
                answer = pa.ask(messages)
            rows.append({
                "prompt": question,
                "pa_decision_s": answer.timings_ms["decision"] / 1000,
                "pa_decision_warm_s": warm.timings_ms["decision"] / 1000,
                "rpra_decision_s": reasoned.timings_ms["decision"] / 1000,
                "rpra_reasoning_tokens": reasoned.tokens.get("reasoning", 0),
                "local_answer_s": answer.timings_ms["total"] / 1000,
                "direct_s": direct,
                "prompt_tokens": len(prefix),
                "answer_tokens": n,
            })
            print(f"[{len(rows)}/{total}] {question[:40]:40s} pa {rows[-1]['pa_decision_s']:.3f}s  "
                  f"answer {rows[-1]['local_answer_s']:.2f}s  direct {direct:.2f}s  ({n} tokens)", file=sys.stderr)

    keys = ("pa_decision_s", "pa_decision_warm_s", "rpra_decision_s", "local_answer_s", "direct_s")
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
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))
    print(f"\nmodel {model}, {threads} threads, {len(rows)} requests, "
          f"median answer {summary['answer_tokens_median']:.0f} tokens (medians over requests):")
    print(f"  PA decision, cold cache          {med['pa_decision_s'] * 1000:8.1f} ms")
    print(f"  PA decision, system prompt warm  {med['pa_decision_warm_s'] * 1000:8.1f} ms")
    print(f"  RPRA decision, cold cache        {med['rpra_decision_s'] * 1000:8.1f} ms")
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


def _fields(settings: Settings) -> dict:
    return {k: v for k, v in vars(settings).items() if k != "sources"}


if __name__ == "__main__":
    typer.run(main)
