"""What each device profile costs when served by `rpra serve` on this machine.

For each profile (default: every one shipped in rpra/profiles; or --profiles a,b) this starts
`rpra serve --profile P --set threshold=0` as a subprocess with a temporary RPRA_HOME and no remote.
Threshold 0 makes auto mode (model "rpra") predict a score for every request and then always
answer locally, so one streamed request gives the decision time, the first token and the decode
speed. All servers run at once and the requests take turns across them, the order rotated each
round, so machine noise hits every profile alike. Per profile:

  startup_s        launch until GET /health answers (the model load included)
  idle_rss_mib     the server's resident memory after startup, before any request
  peak_rss_mib     the most during the requests (psutil, every 50 ms)
  ttft_ms          request sent -> first answer token (the decision included)
  tokens_per_s     local decode: (completion tokens - 1) / (last token - first token)
  decision_ms      rpra.timings_ms.decision: prefill and the score slot, system prompt cached
  decision_cold_ms the same for the warm-up request, whose system prompt met an empty cache

The medians are over --repeats distinct prompts per profile (so no question is a cache hit), after
one warm-up request. A profile whose model is not downloaded is skipped unless --pull is given.
The numbers are THIS machine's (its core count and each profile's settings go into the JSON), not
the target board's: a profile may ask for more threads than this machine has cores.

    .venv/bin/python benchmarks/serve_profiles.py                          # every profile, 5 prompts
    .venv/bin/python benchmarks/serve_profiles.py --profiles laptop,arm-board-4gb --repeats 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from rpra.benchmarks.serve_load import RESULTS, RssSampler, ServeProcess, table
from rpra.config import Settings, profile_path, profiles_dir, read_toml
from rpra.errors import ConfigError, ModelNotFoundError
from rpra.models import list_models, pull, resolve

# Requests that draw answers of a few sentences, so the decode speed has tokens to go on.
PROMPTS = [
    "Explain how a bicycle works to a ten-year-old.",
    "Give me three tips for sleeping better.",
    "Describe the water cycle in a few sentences.",
    "Write a short story about a robot who learns to paint.",
    "Explain in two sentences why the sky is blue.",
    "What are the main differences between cats and dogs as pets?",
    "Describe how to make a cup of tea, step by step.",
    "Why do leaves change colour in autumn?",
    "Write a short letter inviting a friend to a picnic.",
    "Explain what a computer program is to someone who has never used one.",
]


def model_file(name: str, *, fetch: bool) -> tuple[Path | None, str]:
    """The profile model's file, or None and why not (a registered model is pulled if ``fetch``)."""
    present = {m["name"]: m["present"] for m in list_models()}
    if name in present and not present[name]:
        if not fetch:
            return None, f"model {name} is not downloaded: run `rpra models pull {name}`, or pass --pull"
        print(f"pulling {name} ...", file=sys.stderr)
        return pull(name), ""
    try:
        return resolve(name), ""
    except ModelNotFoundError as exc:
        return None, str(exc)


def stream_once(client, prompt: str, max_tokens: int) -> dict:
    """One streamed auto-mode request: decision, first token and decode speed."""
    start = time.perf_counter()
    first = last = final = tokens = None
    stream = client.chat.completions.create(model="rpra", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                            stream=True, stream_options={"include_usage": True})  # fmt: skip
    for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        extra = (chunk.model_extra or {}).get("rpra") or {}
        if "turn_id" in extra:
            final = extra
        if chunk.choices and chunk.choices[0].delta.content:
            first, last = first or now, now
    if final is None or final["answered_by"] != "local":
        raise SystemExit(f"Expected a local answer with threshold 0; got {final}.")
    # n tokens arrive over n - 1 decode steps after the first one, which the TTFT already counts.
    speed = (tokens - 1) / (last - first) if tokens and tokens > 1 and last > first else None
    return {"prompt": prompt, "ttft_ms": (first - start) * 1000 if first else None, "completion_tokens": tokens,
            "tokens_per_s": speed, "decision_ms": final["timings_ms"]["decision"], "timings_ms": final["timings_ms"]}  # fmt: skip


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def start_servers(args, tmp: Path, servers: dict, samplers: dict) -> tuple[dict, dict]:
    """One `rpra serve` per profile whose model is at hand, into ``servers``: (rows, skipped).

    The caller owns ``servers`` and ``samplers``, so it stops those started before a failure."""
    rows, skipped = {}, {}
    for name in args.profiles.split(","):
        try:
            settings = read_toml(profile_path(name), "Profile")
        except ConfigError as exc:
            raise SystemExit(str(exc)) from None
        path, why = model_file(settings.get("model", Settings().model), fetch=args.pull)
        if path is None:
            skipped[name] = why
            print(f"skipping profile {name}: {why}", file=sys.stderr)
            continue
        # --model PATH: the profile's own model, from the real RPRA_HOME rather than the temporary one.
        servers[name] = ServeProcess(tmp / Path(name).stem, ["--profile", name, "--model", str(path), "--set", "threshold=0"]).start()
        time.sleep(1.0)  # let the freshly loaded process settle before reading its idle memory
        samplers[name] = RssSampler(servers[name].proc.pid)
        rows[name] = {"profile": name, "profile_settings": settings, "model_path": str(path), "startup_s": servers[name].startup_s,
                      "idle_rss_mib": samplers[name].now_mib(), "requests": []}  # fmt: skip
        print(f"{name}: up after {servers[name].startup_s:.1f} s, idle RSS {rows[name]['idle_rss_mib']:.0f} MiB", file=sys.stderr)
    return rows, skipped


def measure(args, openai, rows: dict, servers: dict, samplers: dict) -> None:
    """A warm-up, then --repeats rounds of one request per profile, the order rotated each round."""
    clients = {n: openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=600) for n, s in servers.items()}
    names = list(rows)
    for name in names:  # fills the empty cache with the system prompt, as a server's first request does
        rows[name]["decision_cold_ms"] = stream_once(clients[name], "Hello!", 4)["decision_ms"]
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            rec = stream_once(clients[name], PROMPTS[r], args.max_tokens)
            rows[name]["requests"].append(rec)
            print(f"[{r + 1}/{args.repeats}] {name:16s} ttft {rec['ttft_ms'] or float('nan'):7.1f} ms  decision {rec['decision_ms']:7.1f} ms  "
                  f"{rec['completion_tokens']} tokens at {rec['tokens_per_s'] or 0:5.1f}/s", file=sys.stderr)  # fmt: skip
    for name, row in rows.items():
        row["health"] = httpx.get(f"{servers[name].url}/health").json()
        row["peak_rss_mib"] = samplers[name].take_peak_mib()
        for key in ("ttft_ms", "tokens_per_s", "decision_ms", "completion_tokens"):
            row[f"{key}_p50"] = median([q[key] for q in row["requests"]])


def report(rows: dict, skipped: dict, args) -> None:
    cpus, names = os.cpu_count(), list(rows)
    print(f"\nrpra serve per device profile: {len(rows)} side by side, {args.repeats} prompts each, max_tokens {args.max_tokens}. "
          "Medians; ttft and decision in ms.")  # fmt: skip
    print(table(["profile", "model", "threads", "n_ctx", "n_batch", "startup s", "idle RSS MiB", "peak RSS MiB", "ttft", "tokens/s",
                 "decision", "decision cold"],
                [[n, Path(r["model_path"]).stem, r["profile_settings"].get("n_threads", "auto"), r["profile_settings"].get("n_ctx"),
                  r["profile_settings"].get("n_batch"), r["startup_s"], r["idle_rss_mib"], r["peak_rss_mib"], r["ttft_ms_p50"],
                  r["tokens_per_s_p50"], r["decision_ms_p50"], r["decision_cold_ms"]] for n, r in rows.items()]))  # fmt: skip
    base, keys = rows[names[0]], ["ttft_ms_p50", "tokens_per_s_p50", "decision_ms_p50", "peak_rss_mib"]
    print(f"\nratios to {names[0]}, measured side by side in this run:")
    print(table(["profile", "ttft", "tokens/s", "decision", "peak RSS"],
                [[n, *(f"x{r[k] / base[k]:.2f}" if r[k] and base[k] else None for k in keys)] for n, r in rows.items()]))  # fmt: skip
    over = [n for n, r in rows.items() if (r["profile_settings"].get("n_threads") or 0) > (cpus or 0)]
    print(f"\ncaveat: measured on THIS machine ({cpus} logical CPUs, {platform.machine()}, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM), not on the target boards"
          + (f"; oversubscribed here, asking for more threads than it has cores: {', '.join(over)}." if over else "."))
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")


def main() -> None:
    shipped = sorted(p.stem for p in profiles_dir().glob("*.toml"))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profiles", default=",".join(shipped), help=f"Comma-separated profile names or .toml paths (default: {','.join(shipped)}).")
    p.add_argument("--repeats", type=int, default=5, help=f"Measured requests per profile, distinct prompts (default 5, at most {len(PROMPTS)}).")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request (default 64).")
    p.add_argument("--pull", action="store_true", help="Download a profile's model when it is missing, instead of skipping it.")
    p.add_argument("--json", type=Path, default=RESULTS / "serve_profiles.json", help="Results file.")
    args = p.parse_args()
    if not 1 <= args.repeats <= len(PROMPTS):
        raise SystemExit(f"--repeats must be 1..{len(PROMPTS)}: each measured request of a profile gets its own prompt.")
    try:
        import openai
    except ImportError:
        raise SystemExit("This benchmark drives the server with the openai package: pip install -e '.[dev]'.") from None
    servers, samplers = {}, {}
    with tempfile.TemporaryDirectory(prefix="rpra-serve-profiles-") as tmp:
        try:
            rows, skipped = start_servers(args, Path(tmp), servers, samplers)
            if not rows:
                raise SystemExit("No profile could be measured (see the messages above).")
            measure(args, openai, rows, servers, samplers)
        finally:
            for part in (*samplers.values(), *servers.values()):
                part.stop()
    report(rows, skipped, args)
    machine = {"cpu_count": os.cpu_count(), "machine": platform.machine(), "ram_bytes": psutil.virtual_memory().total}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                                     "profiles": list(rows.values()), "skipped": skipped}, indent=2))  # fmt: skip
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
