"""Routing over a pool of models: expected-reward routing against every single target, two-model
threshold routing, random and the oracle, on the same test items.

For each keyed rpra-mix test item, each target's answer is known from the collections (the
device model's own answers, another model's collected on the same items, the remote answers
collected beside the device's), checked by the exact verifier (right as asked), and each costs
its target's prices on the item's tokens (the prompt's, counted by the encoder's tokenizer, and
the answer's). The pool's heads (``rpra train pool``, fitted on train records only) predict each
target's P(right) from the device model's slot state; the policies then choose:

- ``tolerance`` (llm-router's rule): the cheapest target within a tolerance of the best
  predicted reward, swept over ``TOLERANCES``;
- ``net`` (ERP's): the best predicted reward minus a weight x cost, swept over the weights;
- **two-model threshold routing**: the device unless its head's P(right) is under a threshold,
  then the dearest target, swept over the thresholds;
- **random** (each target with equal chance, in expectation) and the **oracle** (the cheapest
  right target, else the cheapest).

Reported: each policy's curve of share right against cost per request; the share of the gap
from the best single target to the oracle it closes (at the pool file's own rule and setting,
fixed before the run, and the curve's best, which is read off the test items and said so); and
the cost it saves against always the dearest target at equal quality (the cheapest point at or
above that target's quality).

    python -m rpra.benchmarks.pool --pool benchmarks/pool.toml
    python -m rpra.benchmarks.pool --pool benchmarks/pool.toml --compare-encoders qwen2.5-coder-0.5b-instruct,smollm2-135m-instruct --limit 100

Results: benchmarks/results/pool-<encoder>.{json,md,png}, pool_encoders-<a>-vs-<b>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from rpra.benchmarks.collection import SEEDS, Collection, collection_dir, model_name
from rpra.config import Settings
from rpra.pool import Pool, PoolHeads, load_pool, pick

RESULTS = SEEDS.parent
TOLERANCES = tuple(float(t) for t in np.round(np.concatenate([[0.0], np.geomspace(0.002, 1.0, 40)]), 4))
THRESHOLDS = tuple(float(t) for t in np.round(np.linspace(0.0, 1.0, 101), 3))


def test_items(pool: Pool, encoder: str) -> tuple[list[dict], int]:
    """The test items every target has a verified answer for: per item its prompt, the encoder's
    recorded answer (for the feature read) and per target right / tokens out. Returns them and
    how many were dropped for a missing answer."""
    from rpra.training.pool import records_source

    opened: dict[str, dict[str, dict]] = {}

    def collection(model: str) -> dict[str, dict]:
        if model not in opened:
            opened[model] = {r["id"]: r for r in Collection.open(collection_dir(model, "rpra-mix", "test")).records}
        return opened[model]

    sources = {t.name: (collection(records_source(t, encoder)[0]), records_source(t, encoder)[1]) for t in pool.targets}
    # The items: the device target's test collection (else the first target's).
    lead = next((t for t in pool.targets if t.is_device), pool.targets[0])
    device = sources[lead.name][0]
    items, dropped = [], 0
    for item_id, r in device.items():
        outcome = {}
        for name, (records, side) in sources.items():
            other = records.get(item_id)
            right = None if other is None else other.get(f"exact_{side}")
            if right is None:
                break
            outcome[name] = {"right": bool(right >= 0.5), "tokens_out": int(other.get(f"{side}_tokens") or 0)}
        else:
            items.append({"id": item_id, "suite": r.get("suite"), "prompt": r["prompt"], "local_answer": r.get("local_answer"), "targets": outcome})
            continue
        dropped += 1
    return items, dropped


def prompt_tokens(encoder: str, prompts: list[str]) -> list[int]:
    """Each prompt's length in the encoder's tokens (the vocabulary only is loaded)."""
    import llama_cpp

    from rpra.models import resolve

    llm = llama_cpp.Llama(str(resolve(encoder)), vocab_only=True, verbose=False)
    return [len(llm.tokenize(p.encode(), add_bos=False)) for p in prompts]


def evaluate(items: list[dict], pool: Pool, rewards: list[dict[str, float]], tokens_in: list[int]) -> dict:
    """Every policy's operating points, the single targets, random and the oracle; the gap
    closed and the cost saved (the module's docstring says how)."""
    names = pool.names
    right = {n: np.array([it["targets"][n]["right"] for it in items], float) for n in names}
    cost = {n: np.array([pool.target(n).cost(ti, it["targets"][n]["tokens_out"]) for it, ti in zip(items, tokens_in)]) for n in names}
    singles = {n: {"quality": float(right[n].mean()), "cost": float(cost[n].mean())} for n in names}
    dearest = max(names, key=lambda n: singles[n]["cost"])
    best_single = max(names, key=lambda n: (singles[n]["quality"], -singles[n]["cost"]))
    per_item_cost = [{n: float(cost[n][i]) for n in names} for i in range(len(items))]

    def run(chooser) -> dict:
        chosen = [chooser(i) for i in range(len(items))]
        q = np.array([right[c][i] for i, c in enumerate(chosen)])
        c = np.array([cost[ch][i] for i, ch in enumerate(chosen)])
        return {"quality": float(q.mean()), "cost": float(c.mean()), "shares": {n: float(np.mean([ch == n for ch in chosen])) for n in names}}

    def sweep(make_pool, values) -> list[dict]:
        points = []
        for v in values:
            p = make_pool(v)
            points.append({"value": v, **run(lambda i, p=p: pick(p, rewards[i], per_item_cost[i]))})
        return points

    from dataclasses import replace

    policies = {
        "pool: tolerance": sweep(lambda t: replace(pool, rule="tolerance", tolerance=t), TOLERANCES),
        "pool: net": sweep(lambda w: replace(pool, rule="net", cost_weight=w),
                           [0.0, *np.geomspace(1e-2, 1e6, 49).tolist()]),  # fmt: skip
    }
    device = next((t.name for t in pool.targets if t.is_device), min(names, key=lambda n: singles[n]["cost"]))
    policies["two-model threshold (device head)"] = [
        {"value": th, **run(lambda i, th=th: device if rewards[i][device] >= th else dearest)} for th in THRESHOLDS]  # fmt: skip
    configured = run(lambda i: pick(pool, rewards[i], per_item_cost[i]))
    oracle = run(lambda i: min((n for n in names if right[n][i]), key=lambda n: (cost[n][i], names.index(n)), default=None)
                 or min(names, key=lambda n: (cost[n][i], names.index(n))))  # fmt: skip
    random = {"quality": float(np.mean([singles[n]["quality"] for n in names])), "cost": float(np.mean([singles[n]["cost"] for n in names]))}
    gap = oracle["quality"] - singles[best_single]["quality"]

    def closed(q: float) -> float | None:
        return None if gap <= 0 else (q - singles[best_single]["quality"]) / gap

    def saved(points: list[dict]) -> dict | None:
        at = [p for p in points if p["quality"] >= singles[dearest]["quality"] - 1e-12]
        if not at or singles[dearest]["cost"] <= 0:
            return None
        p = min(at, key=lambda p: p["cost"])
        return {"cost": p["cost"], "quality": p["quality"], "value": p.get("value"), "saved": 1 - p["cost"] / singles[dearest]["cost"]}

    summary = {}
    for name, points in policies.items():
        top = max(points, key=lambda p: (p["quality"], -p["cost"]))
        summary[name] = {"best_point": {**top, "gap_closed": closed(top["quality"])}, "at_equal_quality": saved(points)}
    return {"items": len(items), "targets": singles, "best_single": best_single, "dearest": dearest, "oracle": {**oracle, "gap_closed": 1.0},
            "random": random, "configured": {**configured, "rule": pool.rule, "tolerance": pool.tolerance, "cost_weight": pool.cost_weight,
                                             "gap_closed": closed(configured["quality"])},
            "policies": policies, "summary": summary}  # fmt: skip


def calibrated_setting(pool: Pool, encoder: str, heads: PoolHeads) -> dict | None:
    """Each rule's setting chosen on train items, not on the test: the train items every target
    has a verified answer for, each target's P(right) out of fold (its head refitted without the
    item, ``training.probe.out_of_fold_p_pass``), and per rule the cheapest setting whose quality
    there reaches the dearest target's. None without such items."""
    from rpra.training.pool import shared_states, target_records
    from rpra.training.probe import out_of_fold_p_pass

    per_target = {t.name: target_records(t, encoder) for t in pool.targets}
    states = shared_states(encoder, [r for rs in per_target.values() for r in rs], heads.layer)
    oof = {}
    for name, rs in per_target.items():
        x = np.stack([states[r["id"]] for r in rs])
        y = np.asarray([r["right"] for r in rs], int)
        c = float((heads.meta.get("targets", {}).get(name) or {}).get("c", 0.003))  # the strength its head was fitted at
        oof[name] = dict(zip((r["id"] for r in rs), out_of_fold_p_pass(x, y, c=c)))
    by_id = {n: {r["id"]: r for r in rs} for n, rs in per_target.items()}
    ids = sorted(set.intersection(*(set(v) for v in by_id.values())))
    if len(ids) < 20:
        return None
    first = pool.names[0]
    items = [{"id": i, "targets": {n: {"right": by_id[n][i]["right"], "tokens_out": int(by_id[n][i].get("tokens_out") or 0)} for n in pool.names}}
             for i in ids]  # fmt: skip
    tokens_in = prompt_tokens(encoder, [by_id[first][i]["prompt"] for i in ids])
    result = evaluate(items, pool, [{n: float(oof[n][i]) for n in pool.names} for i in ids], tokens_in)
    target = result["targets"][result["dearest"]]["quality"]
    chosen = {}
    for rule, key in (("tolerance", "pool: tolerance"), ("net", "pool: net")):
        reached = [p for p in result["policies"][key] if p["quality"] >= target - 1e-12]
        if reached:
            chosen[rule] = min(reached, key=lambda p: p["cost"])["value"]
    return {"items": len(ids), "suites": sorted({i.split(":")[0] for i in ids}), "dearest_quality": target, "chosen": chosen}


def markdown(result: dict) -> str:
    s, t = result["summary"], result["targets"]
    lines = [f"# Routing over a pool: encoder {result['encoder']}", "",
             f"{result['items']} keyed rpra-mix test items ({result['dropped']} dropped: a target without a verified answer). "
             "Share right as asked; cost per request at the pool file's prices.", "",
             "| target | share right | cost / request | head CV AUROC (train) | head records | head fit s |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name, v in t.items():
        head = result["heads"].get(name, {})
        lines.append(f"| {name} | {v['quality']:.1%} | {v['cost']:.2e} | {head.get('cv_auroc', float('nan')):.3f} | {head.get('records', '-')} | "
                     f"{head.get('fit_s', float('nan')):.2f} |")  # fmt: skip
    c = result["configured"]
    setting = f"tolerance {c['tolerance']}" if c["rule"] == "tolerance" else f"cost weight {c['cost_weight']}"
    lines += ["", f"Best single target: {result['best_single']}; dearest: {result['dearest']}; oracle {result['oracle']['quality']:.1%} "
                  f"at {result['oracle']['cost']:.2e}; random {result['random']['quality']:.1%}.", "",
              f"**The pool file's own setting** ({c['rule']}, {setting}; fixed before the run): {c['quality']:.1%} right at "
              f"{c['cost']:.2e} per request; gap closed {_pct(c['gap_closed'])}; sent: "
              + ", ".join(f"{n} {v:.0%}" for n, v in c["shares"].items()) + ".", "",
              "| policy | best point: share right | its cost | gap closed (read off the test curve) | at the dearest's quality: cost | cost saved |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for name, v in s.items():
        b, e = v["best_point"], v["at_equal_quality"]
        lines.append(f"| {name} | {b['quality']:.1%} | {b['cost']:.2e} | {_pct(b['gap_closed'])} | "
                     f"{'-' if e is None else format(e['cost'], '.2e')} | {'-' if e is None else _pct(e['saved'])} |")  # fmt: skip
    cal = result.get("calibrated")
    if cal and cal.get("test"):
        lines += ["", f"**Settings chosen on train** ({cal['items']} train items every target has an answer for, each head's P(right) "
                      f"out of fold; the cheapest setting reaching the dearest target's quality there, {cal['dearest_quality']:.1%}), "
                      "run on the test items:", "",
                  "| rule | setting | share right | of the dearest's quality | cost / request | cost saved | gap closed |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for rule, v in cal["test"].items():
            lines.append(f"| {rule} | {v['value']:g} | {v['quality']:.1%} | {_pct(v['quality_of_dearest'])} | {v['cost']:.2e} | "
                         f"{_pct(v['cost_saved'])} | {_pct(v['gap_closed'])} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def figure(result: dict):
    """Share right against cost per request: each policy's sweep, each single target, the oracle."""
    from matplotlib.figure import Figure

    from rpra.benchmarks.report import finish_axes

    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    for name, points in result["policies"].items():
        pts = sorted(points, key=lambda p: p["cost"])
        ax.plot([p["cost"] for p in pts], [100 * p["quality"] for p in pts], "-", marker=".", ms=3, label=name)
    for name, v in result["targets"].items():
        ax.scatter([v["cost"]], [100 * v["quality"]], s=60, zorder=5, marker="s", label=f"always {name}")
    ax.scatter([result["oracle"]["cost"]], [100 * result["oracle"]["quality"]], s=80, marker="*", color="k", zorder=6, label="oracle")
    return finish_axes(fig, ax, xlabel="cost per request (pool prices)", ylabel="share right (%)", legend_size=7,
                       title=f"Routing over a pool: {result['items']} test items")


def run(pool_path: Path, *, encoder: str | None = None, heads_path: Path | None = None, progress: bool = True) -> dict:
    from rpra.benchmarks.bench import draft_reads
    from rpra.models import resolve
    from rpra.pool import default_pool_path
    from rpra.training.pool import records_source, shared_states

    pool = load_pool(pool_path)
    encoder = encoder or Settings().model
    heads = PoolHeads.load(heads_path or default_pool_path(resolve(encoder)))
    missing = [n for n in pool.names if n not in heads.names]
    if missing:
        raise SystemExit(f"The pool heads have no head for {', '.join(missing)}: `rpra train pool --pool {pool_path}`.")
    items, dropped = test_items(pool, encoder)
    lead = next((t for t in pool.targets if t.is_device), pool.targets[0])
    if records_source(lead, encoder)[0] == encoder:  # the encoder's own answers: the verifier's cached reads hold its slot
        states = [np.asarray(r["slot"]) for r in draft_reads(items, Settings(model=encoder), heads.layer, progress=progress,
                                                             what="reading the encoder's slot")]  # fmt: skip
    else:  # another encoder: a read of each prompt (cached by item id)
        found = shared_states(encoder, items, heads.layer)
        states = [found[it["id"]] for it in items]
    rewards = [heads.rewards(state) for state in states]
    tokens_in = prompt_tokens(encoder, [it["prompt"] for it in items])
    result = evaluate(items, pool, rewards, tokens_in)
    calibration = calibrated_setting(pool, encoder, heads)
    if calibration:  # the settings chosen on train, run on the test items
        from dataclasses import replace

        dearest = result["targets"][result["dearest"]]
        for rule, value in calibration["chosen"].items():
            setting = {"tolerance": value} if rule == "tolerance" else {"cost_weight": value}
            at = evaluate(items, replace(pool, rule=rule, **setting), rewards, tokens_in)["configured"]
            calibration.setdefault("test", {})[rule] = {
                "value": value, "quality": at["quality"], "cost": at["cost"], "gap_closed": at["gap_closed"],
                "cost_saved": 1 - at["cost"] / dearest["cost"] if dearest["cost"] else None,
                "quality_of_dearest": at["quality"] / dearest["quality"] if dearest["quality"] else None}  # fmt: skip
    result["calibrated"] = calibration
    result.update({"encoder": encoder, "dropped": dropped, "layer": heads.layer, "heads": heads.meta.get("targets", {}),
                   "pool": {"rule": pool.rule, "tolerance": pool.tolerance, "cost_weight": pool.cost_weight,
                            "targets": [t.__dict__ for t in pool.targets]}})  # fmt: skip
    return result


def compare_encoders(pool_path: Path, encoders: list[str], *, limit: int | None = None, threads: int | None = None,
                     progress: bool = True) -> dict:  # fmt: skip
    """SharedTrunkNet's question, measured: do the reward heads need the target's own encoder?
    For each encoder (the device model, another small model), a head per target fitted on the
    same train records (``limit``: at most that many per target and suite, a seeded sample), at
    each encoder's layer-sweep layer; their CV AUROC side by side, each encoder's read time per
    record (its layer sweep's), and the pool policies on the test items with each encoder's
    heads. Slot reads are cached; those missing are read once."""
    import hashlib

    from rpra.benchmarks.bench import draft_reads
    from rpra.training.pool import fit_heads, records_source, shared_states, target_records
    from rpra.training.probe import sweep_layer

    pool = load_pool(pool_path)
    lead = next((t for t in pool.targets if t.is_device), pool.targets[0])
    device = records_source(lead, encoders[0])[0]

    def sample(rs: list[dict]) -> list[dict]:
        if limit is None:
            return rs
        by_suite: dict[str, list[dict]] = {}
        for r in rs:
            by_suite.setdefault(r["suite"], []).append(r)
        return [r for group in by_suite.values() for r in sorted(group, key=lambda r: hashlib.sha256(f"0:{r['id']}".encode()).digest())[:limit]]

    per_target = {t.name: sample(target_records(t, device)) for t in pool.targets}
    unique = list({r["id"]: r for rs in per_target.values() for r in rs}.values())
    layers = {e: sweep_layer(e) for e in encoders}
    states = {e: shared_states(e, unique, layers[e], threads=threads) for e in encoders}
    common = set.intersection(*(set(found) for found in states.values()))
    items, dropped = test_items(pool, device)
    tokens_in = prompt_tokens(device, [it["prompt"] for it in items])
    out = {"common_records": len(common), "encoders": {}}
    for e in encoders:
        sweep = json.loads((RESULTS / f"layer_sweep-{model_name(e)}.json").read_text())
        heads, fits = fit_heads({n: [r for r in rs if r["id"] in common] for n, rs in per_target.items()}, states[e], layers[e])
        if e == device:
            test_states = [np.asarray(r["slot"]) for r in draft_reads(items, Settings(model=e), layers[e], progress=progress)]
        else:
            found = shared_states(e, items, layers[e], threads=threads)
            test_states = [found[it["id"]] for it in items]
        result = evaluate(items, pool, [heads.rewards(v) for v in test_states], tokens_in)
        out["encoders"][e] = {"layer": layers[e], "heads": fits, "read_s_per_record": sweep["feature_seconds"] / sweep["records"],
                              "configured": result["configured"], "summary": result["summary"], "targets": result["targets"],
                              "oracle": result["oracle"], "best_single": result["best_single"]}  # fmt: skip
    out.update({"test_items": len(items), "dropped": dropped, "limit_per_suite": limit})
    return out


def comparison_markdown(result: dict) -> str:
    encoders = list(result["encoders"])
    targets = list(next(iter(result["encoders"].values()))["heads"])
    lines = [f"# Pool heads by encoder: {', '.join(encoders)}", "",
             f"Heads fitted on the same {result['common_records']} train records (cached for every encoder), each encoder at its "
             f"layer sweep's layer; the policies on {result['test_items']} test items.", "",
             "| encoder | layer | read s / record (its sweep) | " + " | ".join(f"CV AUROC: {t}" for t in targets)
             + " | configured: right | gap closed | pool: net, cost saved at equal quality |",
             "|---|---|---|" + "---|" * len(targets) + "---|---|---|"]  # fmt: skip
    for e, v in result["encoders"].items():
        saved = v["summary"]["pool: net"]["at_equal_quality"]
        lines.append(f"| {e} | {v['layer']} | {v['read_s_per_record']:.2f} | " + " | ".join(f"{v['heads'][t]['cv_auroc']:.3f}" for t in targets)
                     + f" | {v['configured']['quality']:.1%} | {_pct(v['configured']['gap_closed'])} | {'-' if saved is None else _pct(saved['saved'])} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def write(result: dict, out: Path) -> dict[str, Path]:
    """The result as ``pool-<encoder>.{json,md,png}`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    stem = f"pool-{model_name(result['encoder'])}"  # a model name holds dots: no with_suffix
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md", "plot": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps(result, indent=1))
    paths["markdown"].write_text(markdown(result))
    figure(result).savefig(paths["plot"], dpi=120)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", type=Path, required=True, help="The pool file (TOML; see rpra.pool).")
    parser.add_argument("--encoder", default=None, help="The device model whose slot state feeds the heads (default: the configured model).")
    parser.add_argument("--heads", type=Path, default=None, help="Default: next to the encoder (`rpra train pool`).")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--compare-encoders", default=None, metavar="A,B",
                        help="Instead: heads fed by each of these encoders (the device model first) on the same records, side by side.")
    parser.add_argument("--limit", type=int, default=None, help="--compare-encoders: at most this many train records per target and suite.")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="Print the results as JSON.")
    args = parser.parse_args(argv)
    if args.compare_encoders:
        result = compare_encoders(args.pool, [e.strip() for e in args.compare_encoders.split(",")], limit=args.limit, threads=args.threads)
        stem = "pool_encoders-" + "-vs-".join(model_name(e) for e in result["encoders"])
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
        (args.out / f"{stem}.md").write_text(comparison_markdown(result))
        print(json.dumps(result, indent=1) if args.json else comparison_markdown(result))
        return
    result = run(args.pool, encoder=args.encoder, heads_path=args.heads)
    write(result, args.out)
    print(json.dumps({k: v for k, v in result.items() if k != "policies"}, indent=1) if args.json else markdown(result))


if __name__ == "__main__":
    main()
