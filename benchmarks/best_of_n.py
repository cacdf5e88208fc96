"""Best-of-N with the draft verifier: accuracy over greedy, and batched against sequential decoding.

For the keyed test items of the chosen suites (the rpra-mix test split's arithmetic and GSM by
default), the device model draws N answers (the first greedy, the others sampled) as parallel
sequences in one llama.cpp batch per step (``Runtime.drafts``); the draft verifier scores each
(``DraftVerifier``, fitted on the train split only), and ``rpra.ladder.choose`` keeps one by each
rule (weighted, best, majority). Every kept answer is checked by the suite's exact verifier.
Reported: the share right for greedy (sequence 0), each rule, and "any of N" (the ceiling); and
the revision rung: a greedy draft the verifier doubts (under ``REVISE_BELOW``) is revised by the
device model (``Runtime.revise``), and the revision kept where the verifier scores it higher.

Speed, side by side in one run: on the first ``--timed`` items the same N drafts are also
decoded one after another (each from the cached prompt), the order of the two alternating per
item; the ratio of the batched time to the sequential one, per item (median and interval), and
of time per generated token.

    python -m rpra.benchmarks.best_of_n --model qwen2.5-coder-0.5b-instruct --n 4 --threads 1

Results: benchmarks/results/best_of_n-<model>.{json,md,png} (the plot: accuracy against local
seconds per item). Nothing here reads a train split except
the verifier's fit, and nothing is tuned on the test items.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from rpra.benchmarks.collection import SEEDS, model_name
from rpra.config import Settings
from rpra.ladder import REVISE_BELOW

RESULTS = SEEDS.parent


def run_key(*, sha: str, verifier_sha: str, n: int, temperature: float, max_tokens: int, seed: int, revise: bool) -> str:
    """What a row's outcome depends on: rows with another key are never mixed into a run."""
    return hashlib.sha256(json.dumps([sha, verifier_sha, n, temperature, max_tokens, seed, revise]).encode()).hexdigest()[:16]


def calibration_items(model: str, suites: tuple[str, ...]) -> list:
    """The ladder's calibration split: the keyed train items whose collected records carry the
    remote's verdict too (``rpra collect --remote``), so every action's outcome is known there."""
    from rpra.benchmarks.bench import items_for
    from rpra.benchmarks.collection import Collection

    chosen = []
    for suite in suites:
        with_remote = {r["id"] for r in Collection.load(model, suite, "train").records if r.get("exact_remote") is not None}
        chosen += [i for i in items_for(suite, "train", limit=None, keyed=True) if i.id in with_remote]
    return chosen


def run(model: str, *, suites: tuple[str, ...], n: int, temperature: float, max_tokens: int, threads: int | None, timed: int,
        verifier_path: Path | None, limit: int | None, revise: bool = True, seed: int = 0, progress: bool = True,
        split: str = "test", resume_from: Path | None = None, reverse: bool = False, retime: int = 0) -> dict:  # fmt: skip
    """Best-of-``n`` on the keyed items of ``suites``: the rpra-mix test split, or (``split="train"``)
    the calibration split (``calibration_items``). Each finished item is appended to a journal under
    RPRA_HOME/cache (keyed by ``run_key``), so an interrupted run resumes where it stopped; the
    rows of a committed result at ``resume_from`` made with the same key count as finished.
    (Rows are drawn with per-sequence seeds, so a resumed run gets the rows a whole one would.)
    ``reverse``: take the items from the last, so that a second run on the same journal shares
    the work with the first on another core (each skips what the other has written).
    ``retime``: measure batched against sequential again on the first that many items (e.g. on
    a quiet machine, or at another thread count), instead of the rows' own timings."""
    from rich.progress import track

    from rpra.benchmarks.bench import items_for
    from rpra.config import home
    from rpra.local import LocalModel
    from rpra.models import file_sha256, resolve
    from rpra.predictors import DraftVerifier
    from rpra.probe import Probe, default_probe_path
    from rpra.runtime import Runtime, _as_shown

    path = resolve(model)
    probe_path = verifier_path or default_probe_path(path, "draft")
    probe = Probe.load(probe_path)
    sha = file_sha256(path)
    probe.check_model(sha, model)
    key = run_key(sha=sha, verifier_sha=file_sha256(probe_path), n=n, temperature=temperature, max_tokens=max_tokens, seed=seed, revise=revise)
    if split == "train":
        items = calibration_items(model, suites)
    else:
        items = [i for i in items_for("rpra-mix", "test", limit=None, keyed=True) if i.suite in suites]
    items = items[:limit] if limit else items
    journal = home() / "cache" / f"best_of_n-{model_name(model)}-{split}-{key}.jsonl"
    journal.parent.mkdir(parents=True, exist_ok=True)
    seeded = committed_rows(resume_from, key, sha=sha, n=n, temperature=temperature, max_tokens=max_tokens, verifier=probe) if resume_from else []
    done = {r["id"]: r for r in seeded}
    read_to = _read_journal(journal, done, 0)
    todo = [i for i in items if i.id not in done]
    todo = todo[::-1] if reverse else todo
    timed_so_far = sum("timing" in done[i.id] for i in items if i.id in done)
    verifier = DraftVerifier(probe)
    layer = verifier.layer
    runtime = None
    for item in track(todo, description=f"best-of-{n} ({split})", disable=not progress or not todo, transient=True):
        read_to = _read_journal(journal, done, read_to)  # another run on the same journal (--reverse) may have drawn it
        if item.id in done:
            continue
        if runtime is None:
            settings = Settings(model=model, temperature=0.0, log=False, mode="local-only", n_threads=threads, max_tokens=max_tokens, seed=seed)
            runtime = Runtime(settings, local=LocalModel.from_settings(settings, capture_layers=verifier.capture_layers, parallel=n))
        messages = [{"role": "user", "content": item.prompt}]
        runs = {}
        order = (True, False) if timed_so_far % 2 == 0 else (False, True)
        for batched in order if timed_so_far < timed else (True,):
            started = time.perf_counter()
            slot, drafts = runtime.drafts(messages, n, temperature=temperature, max_tokens=max_tokens, batched=batched, seed=seed)
            runs[batched] = (time.perf_counter() - started, slot, drafts)
        _, slot, drafts = runs[True]
        answers = [_as_shown(d.text, settings.answer_after_score) for d in drafts]
        scores = [verifier.verify(slot[layer], d.states[layer], d.logprobs, pass_mark=7).p_pass for d in drafts]
        row = {"id": item.id, "suite": item.suite, "scores": [round(s, 4) for s in scores], "answers": answers,
               "tokens": [d.tokens for d in drafts], "batched_s": round(runs[True][0], 3)}  # fmt: skip
        if len(runs) == 2:
            (tb, _, db), (ts, _, ds) = runs[True], runs[False]
            row["timing"] = {"batched_s": tb, "sequential_s": ts, "batched_tokens": sum(d.tokens for d in db),
                             "sequential_tokens": sum(d.tokens for d in ds)}  # fmt: skip
            timed_so_far += 1
        if revise and scores[0] < REVISE_BELOW:  # the greedy draft is doubted: ask for a revision
            started = time.perf_counter()
            revision, slot_r, states_r = runtime.revise(messages, answers[0], max_tokens=max_tokens)
            score_r = verifier.verify(slot_r[layer], states_r[layer], revision.logprobs, pass_mark=7).p_pass
            row["revision"] = {"answer": _as_shown(revision.text, settings.answer_after_score), "score": round(score_r, 4),
                               "tokens": revision.tokens, "s": round(time.perf_counter() - started, 3)}  # fmt: skip
        with journal.open("a") as f:  # one write per row: two runs appending do not interleave lines
            f.write(json.dumps(row) + "\n")
        done[item.id] = row
    by_id = {i.id: i for i in items}
    rows = [judged(done[i.id], by_id[i.id]) for i in items if i.id in done]
    timings = [r["timing"] for r in rows if "timing" in r]
    if retime:
        settings = Settings(model=model, temperature=0.0, log=False, mode="local-only", n_threads=threads, max_tokens=max_tokens, seed=seed)
        runtime = Runtime(settings, local=LocalModel.from_settings(settings, capture_layers=verifier.capture_layers, parallel=n))
        timings = []
        for k, item in enumerate(track(items[:retime], description="timing", disable=not progress, transient=True)):
            messages = [{"role": "user", "content": item.prompt}]
            runs = {}
            for batched in (True, False) if k % 2 == 0 else (False, True):
                started = time.perf_counter()
                _, drafts = runtime.drafts(messages, n, temperature=temperature, max_tokens=max_tokens, batched=batched, seed=seed)
                runs[batched] = (time.perf_counter() - started, sum(d.tokens for d in drafts))
            timings.append({"batched_s": runs[True][0], "sequential_s": runs[False][0], "batched_tokens": runs[True][1],
                            "sequential_tokens": runs[False][1]})  # fmt: skip
    result = summarise(rows, timings, model=model, sha=sha, n=n, temperature=temperature, max_tokens=max_tokens, threads=threads,
                       verifier=probe)  # fmt: skip
    result.update({"split": split, "key": key, "seed": seed, "revise": revise, "timed_threads": threads})
    return result


def judged(row: dict, item) -> dict:
    """``row`` with its verdicts, from its answers as the user would see them (``runtime._as_shown``:
    without a rating line the model wrote itself, as ``answer_after_score`` is off by default):
    each draft right or not, each rule's pick, and the revision rung's answer. Recomputed on
    every run, so a row's verdicts always follow the current verifier of the suite."""
    from rpra.benchmarks.data import verify
    from rpra.ladder import RULES, choose
    from rpra.runtime import _as_shown

    answers = [_as_shown(a, False) for a in row["answers"]]
    right = [bool(verify(item, a)) for a in answers]
    out = {**row, "answers": answers, "right": right, **{rule: right[choose(answers, row["scores"], rule=rule)] for rule in RULES}}
    if row.get("revision"):
        revision = {**row["revision"], "answer": _as_shown(row["revision"]["answer"], False)}
        revision["right"] = bool(verify(item, revision["answer"]))
        out["revision"] = revision
        out["revised"] = revision["right"] if revision["score"] > row["scores"][0] else right[0]
    else:
        out["revised"] = right[0]
    return out


def _read_journal(journal: Path, done: dict[str, dict], offset: int) -> int:
    """Add the journal's rows from byte ``offset`` on to ``done``; returns the offset read to.
    A line cut by an interruption is skipped (that item is drawn again)."""
    if not journal.exists():
        return offset
    with journal.open("rb") as f:
        f.seek(offset)
        chunk = f.read()
    end = chunk.rfind(b"\n") + 1  # a line still being written is read next time
    for line in chunk[:end].splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        done[row["id"]] = row
    return offset + end


def committed_rows(path: Path, key: str, *, sha: str, n: int, temperature: float, max_tokens: int, verifier) -> list[dict]:
    """The rows of a committed result made with the same ``run_key``, to resume from (none if
    the file is absent or of another key). A result from before results carried their key must
    match on every setting it records (the verifier by its CV AUROC and example count), and gets
    its ``speed.timings`` back on its first rows, in the order they were timed."""
    if not path.exists():
        return []
    saved = json.loads(path.read_text())
    if "key" in saved:
        if saved["key"] != key:
            return []
    elif (saved.get("model_sha256"), saved.get("n"), saved.get("temperature"), saved.get("max_tokens"),
          (saved.get("verifier") or {}).get("cv_auroc"), (saved.get("verifier") or {}).get("examples")) != (
          sha, n, temperature, max_tokens, verifier.meta.get("cv_auroc_pass"), verifier.meta.get("examples")):  # fmt: skip
        return []
    rows = saved.get("rows", [])
    if rows and not any("timing" in r for r in rows):
        for row, timing in zip(rows, (saved.get("speed") or {}).get("timings", [])):
            row["timing"] = timing
    return rows


def summarise(rows: list[dict], timings: list[dict], *, model: str, sha: str, n: int, temperature: float, max_tokens: int,
              threads: int | None, verifier) -> dict:  # fmt: skip
    from rpra.benchmarks import metrics as M
    from rpra.ladder import RULES

    def accuracy(subset: list[dict]) -> dict:
        out = {"items": len(subset), "greedy": float(np.mean([r["right"][0] for r in subset]))}
        out.update({rule: float(np.mean([r[rule] for r in subset])) for rule in RULES})
        out["revised"] = float(np.mean([r["revised"] for r in subset]))
        out["revisions"] = sum("revision" in r for r in subset)
        out[f"any of {n}"] = float(np.mean([any(r["right"]) for r in subset]))
        out["relative_gain_weighted"] = (out["weighted"] - out["greedy"]) / out["greedy"] if out["greedy"] else None
        return out

    suites = sorted({r["suite"] for r in rows})
    result = {
        "model": model, "model_sha256": sha, "n": n, "temperature": temperature, "max_tokens": max_tokens, "threads": threads,
        "verifier": {"layer": verifier.layer, "cv_auroc": verifier.meta.get("cv_auroc_pass"), "examples": verifier.meta.get("examples")},
        "all": accuracy(rows), "by_suite": {s: accuracy([r for r in rows if r["suite"] == s]) for s in suites}, "rows": rows,
    }  # fmt: skip
    if timings:
        ratio = np.array([t["batched_s"] / t["sequential_s"] for t in timings])
        per_token = np.array([(t["batched_s"] / max(t["batched_tokens"], 1)) / (t["sequential_s"] / max(t["sequential_tokens"], 1)) for t in timings])
        point, lo, hi = M.bootstrap(np.median, ratio, n_boot=1000, seed=0)
        result["speed"] = {"items": len(timings), "median_ratio": float(np.median(ratio)), "ratio_ci": [lo, hi],
                           "median_ratio_per_token": float(np.median(per_token)),
                           "batched_s_median": float(np.median([t["batched_s"] for t in timings])),
                           "sequential_s_median": float(np.median([t["sequential_s"] for t in timings])), "timings": timings}  # fmt: skip
    return result


def markdown(result: dict) -> str:
    n = result["n"]
    cols = ["greedy", "weighted", "best", "majority", f"any of {n}", "revised"]
    lines = [f"# Best-of-{n} with the draft verifier: {result['model']}", "",
             f"Temperature {result['temperature']}, answers up to {result['max_tokens']} tokens, sequence 0 greedy; the verifier reads "
             f"layer {result['verifier']['layer']} (train CV AUROC {result['verifier']['cv_auroc']:.3f}). \"revised\": the greedy draft, "
             f"revised where the verifier gives it under {REVISE_BELOW}, the revision kept where it scores higher. Share of kept answers right:", "",
             "| items | n | " + " | ".join(cols) + " | weighted vs greedy |", "|---|---|" + "---|" * (len(cols) + 1)]  # fmt: skip
    for name, acc in [("all", result["all"]), *result["by_suite"].items()]:
        gain = acc["relative_gain_weighted"]
        lines.append(f"| {name} | {acc['items']} | " + " | ".join(f"{acc[c]:.1%}" for c in cols) + f" | {'-' if gain is None else f'{gain:+.0%}'} |")
    if "speed" in result:
        s = result["speed"]
        lines += ["", f"Batched against sequential ({s['items']} items, the order alternating): median time ratio **{s['median_ratio']:.2f}** "
                      f"[{s['ratio_ci'][0]:.2f}, {s['ratio_ci'][1]:.2f}], per generated token {s['median_ratio_per_token']:.2f}; "
                      f"median {s['batched_s_median']:.2f} s batched, {s['sequential_s_median']:.2f} s sequential per item."]  # fmt: skip
    return "\n".join(lines) + "\n"


def compute_figure(result: dict):
    """Share right against local seconds per item, as Snell et al. draw test-time compute: greedy
    (one draft: the sequential time over N), best-of-N decoded one after another, and in one batch."""
    from matplotlib.figure import Figure

    from rpra.benchmarks.report import finish_axes

    s, acc, n = result["speed"], result["all"], result["n"]
    points = [("greedy", s["sequential_s_median"] / n, acc["greedy"]),
              (f"best-of-{n}, one after another", s["sequential_s_median"], acc["weighted"]),
              (f"best-of-{n}, one batch", s["batched_s_median"], acc["weighted"])]  # fmt: skip
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name, x, y in points:
        ax.scatter([x], [100 * y], s=60, zorder=5)
        ax.annotate(name, (x, 100 * y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.axhline(100 * acc[f"any of {n}"], color="k", ls=":", lw=1, label=f"any of {n} right (the ceiling)")
    return finish_axes(fig, ax, xlabel="local seconds per item (median)", ylabel="share of kept answers right (%)",
                       title=f"Local compute vs accuracy: {result['model']}, {acc['items']} items")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--suites", default="arithmetic,gsm", help="Suites of the rpra-mix (keyed items).")
    parser.add_argument("--split", default="test", choices=("test", "train"),
                        help="test: the rpra-mix test items; train: the calibration split (train items with the remote's verdict).")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-tokens", type=int, default=48, help="The test collection's answer budget.")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--timed", type=int, default=24, help="Items also decoded sequentially, for the speed ratio.")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--verifier", type=Path, default=None, help="Default: next to the model (`rpra train verifier`).")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-revise", action="store_true", help="Skip the revision rung.")
    parser.add_argument("--retime", type=int, default=0, metavar="K",
                        help="Measure batched against sequential again on the first K items (the rows stay as they are).")
    parser.add_argument("--reverse", action="store_true",
                        help="Take the items from the last: a second run beside the first shares its journal and its work.")
    parser.add_argument("--json", action="store_true", help="Print the results as JSON.")
    args = parser.parse_args(argv)
    stem = f"best_of_n-{model_name(args.model)}" + ("" if args.split == "test" else f"--{args.split}")
    result = run(args.model, suites=tuple(s.strip() for s in args.suites.split(",")), n=args.n, temperature=args.temperature,
                 max_tokens=args.max_tokens, threads=args.threads, timed=args.timed, verifier_path=args.verifier, limit=args.limit,
                 revise=not args.no_revise, split=args.split, resume_from=args.out / f"{stem}.json", reverse=args.reverse,
                 retime=args.retime)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{stem}.md").write_text(markdown(result))
    if "speed" in result:
        compute_figure(result).savefig(args.out / f"{stem}.png", dpi=120)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1) if args.json else markdown(result))


if __name__ == "__main__":
    main()
