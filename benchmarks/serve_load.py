"""Load test of `rpra serve` on loopback: throughput, latency and integrity under concurrent clients.

Starts the remote stand-in (llama.cpp's server on --remote-model, or uses the loopback --remote-url)
and `rpra serve` as a subprocess on 127.0.0.1 with a temporary RPRA_HOME (a fresh log database),
sends one warm-up request per route, then for each N in --concurrency runs N client threads (the
`openai` package, streaming) that share --requests requests. Prompts alternate between ones the
device model keeps and ones it defers, so auto mode takes both routes. Per level:

  throughput     completed requests per second of the level's wall time
  latency, TTFT  p50/p95 of the whole answer and of its first token (TTFT by who answered),
                 timed from the first send: a 429's back-off counts, as a client feels it
  decision       p50/p95 of rpra.timings_ms.decision (waiting for the local model included)
  deferred share, 429s, errors, the server's peak RSS (psutil, every 50 ms)
  integrity      against the server's SQLite log: turn_ids unique, logged prompt = sent prompt,
                 logged answer = streamed text; lost = sent without a complete logged answer

and ratios to the first level, all from this one run. A 429 is retried after its Retry-After, at
most --retries times; no request starts after --max-seconds. The server gets only the settings
given here (the caller's RPRA_* variables are dropped); --set adds any (--set max_queue=1 provokes 429s).

    .venv/bin/python benchmarks/serve_load.py                      # 1, 2, 4 clients x 12 requests
    .venv/bin/python benchmarks/serve_load.py --concurrency 1,2,4,8 --requests 24 --mode mix
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import psutil

from rpra.config import DEFAULT_MODEL
from rpra.models import resolve
from rpra.remote_server import RemoteServer
from rpra.server import is_loopback
from rpra.store import LogStore

RESULTS = Path(__file__).parent / "results"
# Alternating: SmolLM2-135M's zero-shot PA predicts 5.3-5.6 for the first kind (kept at the default
# threshold 5) and 2.7-4.5 for the second (deferred), as measured when this list was written.
PROMPTS = [
    "Describe a forest in one sentence.",
    "What is 4817 * 2963? Show your working.",
    "Describe a sunset in one sentence.",
    "Prove that the square root of 2 is irrational.",
    "Suggest a name for a friendly robot.",
    "Write a Python function that returns the n-th prime number, with tests.",
    "Tell me a fun fact about dolphins.",
    "Explain the difference between TCP and UDP congestion control.",
    "Describe a rainy day in one sentence.",
    "A train leaves at 14:35 and arrives at 17:10. How long is the journey in minutes?",
    "Tell me something interesting about penguins.",
    "Summarise the causes of the First World War in three bullet points.",
]
MODELS = {"auto": ["rpra"], "mix": ["rpra", "rpra-local", "rpra-remote"]}


class ServeProcess:
    """`rpra serve ARGS` in a subprocess on a free loopback port, with its own RPRA_HOME and log."""

    def __init__(self, home: Path, args: list[str]):
        with socket.socket() as s:  # racy in theory; a lost race shows as "cannot listen" in the log
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.home, self.url = home, f"http://127.0.0.1:{port}"
        self.command = [sys.executable, "-m", "rpra.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
        self.log_path = home / "serve.log"
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    def start(self, timeout: float = 300.0) -> ServeProcess:
        """Launch and wait until GET /health answers; SystemExit with the log's tail otherwise."""
        self.home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RPRA_")} | {"RPRA_HOME": str(self.home)}
        started = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"rpra serve exited with code {self.proc.returncode}; its log ends with:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass  # not listening yet
            if time.perf_counter() - started > timeout:
                self.stop()
                raise SystemExit(f"rpra serve was not ready after {timeout:g} s; its log ends with:\n{self.log_tail()}")
            time.sleep(0.1)
        self.startup_s = time.perf_counter() - started
        return self

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGINT (the graceful shutdown of Ctrl-C), then SIGKILL after 30 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class RssSampler:
    """The peak resident memory of a process, sampled every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.process, self.interval, self.peak = psutil.Process(pid), interval, 0
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return  # the process has ended

    def now_mib(self) -> float:
        return self.process.memory_info().rss / 2**20

    def take_peak_mib(self) -> float:
        """The peak since the last call, in MiB; the next peak starts from the current RSS."""
        peak, self.peak = self.peak, 0
        return max(peak / 2**20, self.now_mib())

    def stop(self) -> None:
        self._stop.set()


def pct(values: list[float], q: float) -> float | None:
    """The q-quantile, interpolated linearly (numpy's default); None for no values."""
    if not values:
        return None
    s, k = sorted(values), (len(values) - 1) * q
    lo = int(k)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (k - lo)


def table(headers: list[str], rows: list[list]) -> str:
    """A right-aligned text table: floats to 3 significant digits (whole from 100 up), None as '-'."""
    def cell(v) -> str:
        return "-" if v is None else (f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}") if isinstance(v, float) else str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in [headers, *cells])


def send(client, openai, prompt: str, model: str, max_tokens: int, retries: int) -> dict:
    """One streamed request, retried after a 429's Retry-After: what came back, and when."""
    rec: dict = {"prompt": prompt, "model": model, "http_429": 0, "error": None}
    start = time.perf_counter()
    try:
        for _ in range(retries + 1):
            try:
                stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                        max_tokens=max_tokens, stream=True)  # fmt: skip
                break
            except openai.RateLimitError as exc:
                rec["http_429"] += 1
                time.sleep(float(exc.response.headers.get("retry-after", "1")))
        else:
            rec["error"] = f"still 429 after {retries} retries"
            return rec
        parts, final = [], None
        for chunk in stream:
            extra = (chunk.model_extra or {}).get("rpra") or {}
            if "turn_id" in extra:  # the finish chunk carries the finished turn
                final = extra
            if chunk.choices and chunk.choices[0].delta.content:
                rec.setdefault("ttft_s", time.perf_counter() - start)
                parts.append(chunk.choices[0].delta.content)
    except openai.OpenAIError as exc:  # also an error event in the middle of the stream
        rec["error"] = f"{type(exc).__name__}: {exc}"
        return rec
    rec.update(latency_s=time.perf_counter() - start, text="".join(parts))
    if final is None:
        rec["error"] = "the stream ended without its final rpra record"
        return rec
    rec.update(turn_id=final["turn_id"], route=final["decision"]["route"], answered_by=final["answered_by"],
               fallback=final["fallback"], decision_ms=final["timings_ms"].get("decision"),
               expected=(final["prediction"] or {}).get("expected"))  # fmt: skip
    return rec


def run_level(client, openai, n: int, args, deadline: float) -> tuple[list[dict], float]:
    """N threads share --requests requests; none starts after ``deadline`` (time.monotonic)."""
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    for i in range(args.requests):
        jobs.put(i)
    models, records, lock = MODELS[args.mode], [], threading.Lock()

    def worker() -> None:
        while time.monotonic() < deadline:
            try:
                i = jobs.get_nowait()
            except queue.Empty:
                return
            rec = send(client, openai, PROMPTS[i % len(PROMPTS)], models[i % len(models)], args.max_tokens, args.retries)
            with lock:
                records.append(rec)
                what = rec["error"] or f"{rec['answered_by']:6s} {rec['latency_s']:6.2f}s  ttft {rec.get('ttft_s', float('nan')):5.2f}s"
                print(f"[N={n} {len(records)}/{args.requests}] {rec['model']:11s} {what}  {rec['prompt'][:40]}", file=sys.stderr)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records, time.perf_counter() - started


def check_log(db: Path, records: list[dict], after_id: int) -> dict:
    """What the clients got against what the server logged (turns with id > after_id)."""
    done = [r for r in records if not r["error"]]
    ids = [r["turn_id"] for r in done]
    with LogStore(db) as store:
        turns = {t["id"]: t for t in store.turns(limit=1_000_000) if t["id"] > after_id}
    unlogged = prompt_mismatches = answer_mismatches = 0
    for r in done:
        turn = turns.get(r["turn_id"])
        if turn is None or turn["status"] != "done":
            unlogged += 1
            continue
        prompt_mismatches += turn["prompt"].strip() != r["prompt"].strip()
        answer_mismatches += (turn["answer"] or "").strip() != r["text"].strip()
    return {
        "lost": len(records) - len(done) + unlogged, "duplicate_turn_ids": len(ids) - len(set(ids)),
        "prompt_mismatches": prompt_mismatches, "answer_mismatches": answer_mismatches, "unlogged": unlogged,
        "orphan_turns": len(set(turns) - set(ids)),  # logged turns no client received (e.g. after an error)
        "last_turn_id": max(turns, default=after_id),
    }  # fmt: skip


def summarise(n: int, records: list[dict], wall_s: float, args) -> dict:
    done = [r for r in records if not r["error"]]
    lat, dec = [r["latency_s"] for r in done], [r["decision_ms"] for r in done if r["decision_ms"] is not None]
    out = {
        "concurrency": n, "sent": len(records), "completed": len(done), "not_started": args.requests - len(records),
        "wall_s": wall_s, "throughput_rps": len(done) / wall_s if wall_s > 0 else None,
        "latency_p50_s": pct(lat, 0.5), "latency_p95_s": pct(lat, 0.95),
        "decision_p50_ms": pct(dec, 0.5), "decision_p95_ms": pct(dec, 0.95),
        "deferred_share": sum(r["route"] == "remote" for r in done) / len(done) if done else None,
        "fallbacks": sum(bool(r["fallback"]) for r in done), "http_429": sum(r["http_429"] for r in records),
        "errors": len(records) - len(done),
    }  # fmt: skip
    for who in ("local", "remote"):
        ttft = [r["ttft_s"] for r in done if r["answered_by"] == who and "ttft_s" in r]
        out |= {f"ttft_{who}_n": len(ttft), f"ttft_{who}_p50_s": pct(ttft, 0.5), f"ttft_{who}_p95_s": pct(ttft, 0.95)}
    return out


def plot(levels: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [lv["concurrency"] for lv in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for color, (key, label) in enumerate((("latency", "whole answer"), ("ttft_local", "first token, local"), ("ttft_remote", "first token, remote"))):
        for q, style in (("p50", "-o"), ("p95", "--^")):
            ys = [lv[f"{key}_{q}_s"] for lv in levels]
            if any(y is not None for y in ys):
                left.plot(ns, [float("nan") if y is None else y for y in ys], style, color=f"C{color}", label=f"{label} {q}")
    left.set(xlabel="concurrent clients", ylabel="seconds", title="Latency percentiles", xticks=ns, ylim=(0, None))
    left.legend(fontsize=8)
    right.plot(ns, [lv["throughput_rps"] or 0 for lv in levels], "-o")
    right.set(xlabel="concurrent clients", ylabel="completed requests / s", title="Throughput", xticks=ns, ylim=(0, None))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(args, openai, home: Path) -> tuple[list[dict], list[dict], dict]:
    """Start the stand-in and the server, run every level; (summaries, requests, config)."""
    remote = server = sampler = None
    try:
        sets = args.set  # with --remote-url, --set remote_model=NAME names the model to ask for
        if not args.remote_url:
            print(f"starting the remote stand-in ({args.remote_model}) ...", file=sys.stderr)
            remote = RemoteServer(resolve(args.remote_model), port=0).start(timeout=300)
            sets = [f"remote_model={remote.model_alias}", *args.set]
        local_path = resolve(args.model)
        server = ServeProcess(home, ["--model", str(local_path), "--remote-url", args.remote_url or remote.url,
                                     *[a for s in sets for a in ("--set", s)]]).start()  # fmt: skip
        print(f"rpra serve up at {server.url} after {server.startup_s:.1f} s", file=sys.stderr)
        sampler = RssSampler(server.proc.pid)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)
        for model in ("rpra-local", "rpra-remote"):  # warm-up: the first request of a route pays cold caches
            if error := send(client, openai, "Hello!", model, 4, args.retries)["error"]:
                raise SystemExit(f"The warm-up request to {model} failed: {error}. The server log ends with:\n{server.log_tail()}")
        with LogStore(home / "logs.db") as store:
            last_id = max((t["id"] for t in store.turns(limit=10)), default=0)
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        config |= {"cpu_count": os.cpu_count(), "local_model_path": str(local_path), "server_command": server.command[1:],
                   "server_health": httpx.get(f"{server.url}/health").json()}  # fmt: skip
        sampler.take_peak_mib()
        deadline, summaries, all_records = time.monotonic() + args.max_seconds, [], []
        for n in [int(n) for n in args.concurrency.split(",")]:
            records, wall = run_level(client, openai, n, args, deadline)
            summary = summarise(n, records, wall, args) | check_log(home / "logs.db", records, last_id)
            summary["peak_rss_mib"] = sampler.take_peak_mib()
            last_id = summary["last_turn_id"]
            summaries.append(summary)
            all_records += [r | {"concurrency": n} for r in records]
        return summaries, all_records, config
    finally:
        for part in (sampler, server, remote):
            if part is not None:
                part.stop()


def report(summaries: list[dict], args) -> None:
    print(f"\nrpra serve under load: device {args.model}, remote {args.remote_url or args.remote_model}, mode {args.mode}, "
          f"max_tokens {args.max_tokens}, {os.cpu_count()} CPUs here. Times in s, decision in ms.")  # fmt: skip
    cols = ["throughput_rps", "latency_p50_s", "latency_p95_s", "ttft_local_p50_s", "ttft_local_p95_s", "ttft_remote_p50_s",
            "ttft_remote_p95_s", "decision_p50_ms", "decision_p95_ms", "deferred_share", "http_429", "errors", "peak_rss_mib"]  # fmt: skip
    print(table(["N", "done", "req/s", "lat p50", "lat p95", "ttft loc p50", "ttft loc p95", "ttft rem p50", "ttft rem p95",
                 "dec p50", "dec p95", "deferred", "429s", "errors", "peak RSS MiB"],
                [[s["concurrency"], f"{s['completed']}/{s['sent']}", *(s[c] for c in cols)] for s in summaries]))  # fmt: skip
    keys = ["lost", "duplicate_turn_ids", "prompt_mismatches", "answer_mismatches", "unlogged", "orphan_turns", "not_started"]
    print("\nintegrity (all should be 0):")
    print(table(["N", *keys], [[s["concurrency"], *(s[k] for k in keys)] for s in summaries]))
    base, keys = summaries[0], ["throughput_rps", "latency_p50_s", "ttft_local_p50_s", "ttft_remote_p50_s", "decision_p50_ms"]
    print(f"\nratios to N={base['concurrency']}, measured in this run:")
    print(table(["N", "throughput", "latency p50", "ttft local p50", "ttft remote p50", "decision p50"],
                [[s["concurrency"], *(f"x{s[k] / base[k]:.2f}" if s[k] and base[k] else None for k in keys)] for s in summaries]))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default="1,2,4", help="Client counts, run in this order (default 1,2,4).")
    p.add_argument("--requests", type=int, default=12, help="Requests per level, in all (default 12).")
    p.add_argument("--max-tokens", type=int, default=48, help="max_tokens of each request (default 48).")
    p.add_argument("--mode", choices=sorted(MODELS), default="auto", help="auto: model rpra; mix: rpra, rpra-local, rpra-remote in turn.")
    p.add_argument("--max-seconds", type=float, default=600, help="No request starts after this many seconds (default 600).")
    p.add_argument("--retries", type=int, default=20, help="Retries of a request answered 429 (default 20).")
    p.add_argument("--model", default=DEFAULT_MODEL, help="Device model: registered name or .gguf path.")
    p.add_argument("--remote-model", default="qwen2.5-coder-1.5b-instruct", help="Model of the remote stand-in.")
    p.add_argument("--remote-url", help="A loopback OpenAI-compatible server to use instead of starting a stand-in.")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="A setting of rpra serve (repeatable).")
    p.add_argument("--json", type=Path, default=RESULTS / "serve_load.json", help="Results file; the plot goes next to it (.png).")
    args = p.parse_args()
    try:
        import openai
    except ImportError:
        raise SystemExit("This benchmark drives the server with the openai package: pip install -e '.[dev]'.") from None
    if args.remote_url and not is_loopback(urlparse(args.remote_url).hostname or ""):
        raise SystemExit(f"--remote-url {args.remote_url} is not a loopback address: this load test stays on this machine.")
    with tempfile.TemporaryDirectory(prefix="rpra-serve-load-") as tmp:
        summaries, records, config = run(args, openai, Path(tmp))
    report(summaries, args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"config": config, "levels": summaries, "requests": records}, indent=2))
    plot(summaries, args.json.with_suffix(".png"))
    print(f"\nresults: {args.json}, plot: {args.json.with_suffix('.png')}")


if __name__ == "__main__":
    main()
