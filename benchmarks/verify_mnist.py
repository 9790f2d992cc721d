"""Verification on MNIST 784-30-10 MLPs (Amir et al. 2022, section IV): solver time per
mutual-error query for Marabou alone, MILP alone and the portfolio, agreement of their verdicts,
uniqueness scores of a 5-member ensemble and one selection step.

Setup: 10 candidate MLPs (784-30-10, ReLU, the paper's architecture) trained a few epochs each
with different seeds; agreement points: validation images every candidate classifies correctly
(any label); eps 0.01-0.06; pairwise mutual-error queries of E1 = {N0..N4}.

- Timing: every pair of E1 on the first ``--timing-points`` agreement points and every eps,
  solved by each backend alone (one process, sequential, same machine state); per-query wall time
  includes everything the backend needs (for Marabou: its own process per query).
- Scores: uniqueness scores of E1 on ``--points`` agreement points with the portfolio (tables
  IV/V), the G.A. 1/2/3 SAT counts on the same queries (table III) and one selection step over the
  five fresh candidates.

- Width sweep (``--widths 30 64 128 256``): per hidden width, MILP alone and the portfolio (its
  defaults, what a user gets) on the same pairwise queries, alternating query by query (same
  machine state); mean / median time per query, verdicts, the stage that decided, and the
  queries that MILP alone decides but the portfolio leaves undecided.
  ``--sweep-only`` runs just the sweep.

Run:  nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/verify_mnist.py
Writes benchmarks/out/verify_mnist.json (the sweep: verify_mnist_widths.json) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from phalanx import Ensemble, TrainConfig, create_method, create_model, fit
from phalanx.data import load_dataset
from phalanx.reports import table
from phalanx.verification.runner import Candidates, ResultStore, query_engine, run_queries
from phalanx.verification.scores import ScoreTable, agreement_points, pair_specs
from phalanx.verification.selection import SelectionConfig, attack_comparison, select_members

REPO = Path(__file__).resolve().parents[1]
EPS = (0.01, 0.02, 0.03, 0.04, 0.05, 0.06)


def train_candidates(data: Any, n: int, epochs: int, width: int = 30) -> tuple[list[torch.nn.Module], list[float]]:
    models: list[torch.nn.Module] = []
    accs: list[float] = []
    for s in range(n):
        torch.manual_seed(1000 + s)
        m = create_model("mlp", data.in_shape, data.num_classes, mean=data.mean, std=data.std, widths=[width])
        ens = Ensemble([m], "mean-logits")
        fit(ens, create_method("baseline"), data, TrainConfig(epochs=epochs, batch_size=128, lr=0.05, seed=1000 + s,
                                                              device="cpu"), progress=False)
        m.eval()
        with torch.no_grad():
            accs.append(float((m(data.test.x).argmax(-1) == data.test.y).float().mean()))
        models.append(m)
    return models, accs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "mnist"))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--points", type=int, default=10, help="agreement points for the scores and selection")
    ap.add_argument("--timing-points", type=int, default=3, help="agreement points for the backend timing")
    ap.add_argument("--timeout", type=float, default=60.0, help="per-query time limit (s)")
    ap.add_argument("--marabou-budget", type=float, default=600.0,
                    help="stop Marabou-alone after this many seconds; all backends are compared on that prefix")
    ap.add_argument("--marabou-retry-timeout", type=float, default=120.0,
                    help="re-run Marabou's timed-out timing queries with this limit (s), so its mean is less censored")
    ap.add_argument("--marabou-retry-budget", type=float, default=480.0,
                    help="stop the re-runs after this many seconds (the rest stay at the first limit)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "verify_mnist.json"))
    ap.add_argument("--widths", type=int, nargs="*", default=[], help="hidden widths of the MILP-vs-portfolio sweep")
    ap.add_argument("--sweep-only", action="store_true", help="run only the width sweep")
    ap.add_argument("--sweep-members", type=int, default=4, help="candidates per width (all pairs are queried)")
    ap.add_argument("--sweep-points", type=int, default=2, help="agreement points per width")
    ap.add_argument("--sweep-budget", type=float, default=600.0,
                    help="per width, stop after this many seconds (both backends compared on the same prefix)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_all = time.perf_counter()
    data = load_dataset("mnist", data_dir=args.data_dir, seed=0)
    if args.widths:
        width_sweep(args, data)
    if args.sweep_only:
        return
    t0 = time.perf_counter()
    models, accs = train_candidates(data, 10, args.epochs)
    train_s = time.perf_counter() - t0
    cands = Candidates.from_models(models)
    idx = agreement_points(cands.models, data.val.x, data.val.y, count=args.points)
    x, y = data.val.x[idx], data.val.y[idx]
    pts = x.reshape(len(x), -1).double().numpy()
    labels = y.tolist()
    e1 = (0, 1, 2, 3, 4)

    # -- timing: Marabou alone, MILP alone, portfolio, on the same queries --------------------
    tp = min(args.timing_points, len(pts))
    specs = pair_specs(e1, tp, EPS, labels)
    random.Random(0).shuffle(specs)  # a budget-limited prefix still covers every eps and pair
    timing: dict[str, Any] = {}
    verdicts: dict[str, list[str]] = {}
    marabou_recs: list[Any] = []
    runs: tuple[tuple[str, dict[str, Any]], ...] = (("marabou", {}), ("milp", {}), ("portfolio", {}))
    for backend, opts in runs:
        t0 = time.perf_counter()
        recs = []
        for s in specs:  # Marabou alone may exhaust its budget: the others then run the same prefix
            if backend == "marabou" and time.perf_counter() - t0 > args.marabou_budget:
                break
            recs += run_queries(cands, pts, [s], backend=backend, options=opts, time_limit_s=args.timeout)
        specs = specs[:len(recs)]
        if backend == "marabou":
            marabou_recs = recs
        wall = time.perf_counter() - t0
        times = [r.result.wall_time_s for r in recs]
        verdicts[backend] = [r.result.verdict.value for r in recs]
        by_stage: dict[str, int] = {}
        for r in recs:
            by_stage[r.result.backend] = by_stage.get(r.result.backend, 0) + 1
        timing[backend] = {"queries": len(recs), "total_s": wall, "mean_s": statistics.mean(times),
                           "median_s": statistics.median(times), "max_s": max(times),
                           "verdicts": {v: verdicts[backend].count(v) for v in sorted(set(verdicts[backend]))},
                           "decided_by": by_stage}
        print(f"{backend}: {timing[backend]}", flush=True)
    # Marabou's timeouts again with a longer limit: its time per query is otherwise censored at
    # --timeout; a re-run's time replaces the first attempt's (which is not added on top)
    retried: list[dict[str, Any]] = []
    m_times = [r.result.wall_time_s for r in marabou_recs]
    m_verdicts = list(verdicts["marabou"])
    t0 = time.perf_counter()
    for i, r in enumerate(marabou_recs):
        if r.result.verdict.value != "timeout":
            continue
        s = specs[i]
        entry: dict[str, Any] = {"index": i, "members": list(s.members), "point": s.point, "eps": s.eps}
        if time.perf_counter() - t0 < args.marabou_retry_budget:
            rr = run_queries(cands, pts, [s], backend="marabou", time_limit_s=args.marabou_retry_timeout)[0].result
            m_times[i], m_verdicts[i] = rr.wall_time_s, rr.verdict.value
            entry.update(retry_verdict=rr.verdict.value, retry_s=rr.wall_time_s)
        retried.append(entry)
    key = f"marabou, timeouts re-run at {args.marabou_retry_timeout:g} s"
    if retried:
        timing[key] = {"queries": len(m_times), "total_s": sum(m_times), "mean_s": statistics.mean(m_times),
                       "median_s": statistics.median(m_times), "max_s": max(m_times),
                       "verdicts": {v: m_verdicts.count(v) for v in sorted(set(m_verdicts))},
                       "decided_by": {"marabou": len(m_times)}, "retried": retried}
        verdicts[key] = m_verdicts
        print(f"{key}: {timing[key]}", flush=True)
    names = list(verdicts)
    agreement = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = [(u, v) for u, v in zip(verdicts[a], verdicts[b], strict=True)
                    if u in ("sat", "unsat") and v in ("sat", "unsat")]
            agreement[f"{a} vs {b}"] = {"both_decided": len(both), "disagree": sum(u != v for u, v in both)}

    # -- scores of E1 (portfolio), G.A. comparison, one selection step -----------------------
    store = ResultStore()
    t0 = time.perf_counter()
    recs = run_queries(cands, pts, pair_specs(e1, len(pts), EPS, labels), backend="portfolio",
                       time_limit_s=args.timeout, store=store)
    scores_s = time.perf_counter() - t0
    tab = ScoreTable.from_records(recs, e1, EPS, len(pts))
    comparison = attack_comparison(cands, recs, pts)
    t0 = time.perf_counter()
    sel = select_members(cands, pts, labels, SelectionConfig(k=5, eps=EPS, time_limit_s=args.timeout, max_iters=1,
                                                             initial=e1), store=store)
    select_s = time.perf_counter() - t0

    result = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__},
        "setup": {"candidates": 10, "architecture": "784-30-10 ReLU MLP", "epochs": args.epochs,
                  "test_accuracy": accs, "agreement_points": len(pts), "timing_points": tp, "eps": list(EPS),
                  "timeout_s": args.timeout, "train_s": train_s},
        "timing": timing, "agreement": agreement,
        "speedup_portfolio_vs_marabou": timing["marabou"]["mean_s"] / timing["portfolio"]["mean_s"],
        "speedup_portfolio_vs_milp": timing["milp"]["mean_s"] / timing["portfolio"]["mean_s"],
        "speedup_portfolio_vs_marabou_median": timing["marabou"]["median_s"] / timing["portfolio"]["median_s"],
        "speedup_portfolio_vs_marabou_retried": (timing[key]["mean_s"] / timing["portfolio"]["mean_s"]
                                                 if retried else None),
        "scores": tab.to_json(), "scores_s": scores_s, "attack_comparison": comparison,
        "selection": sel.to_json(), "selection_s": select_s, "total_s": time.perf_counter() - t_all,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))

    print(f"\n10 candidates 784-30-10 (test accuracy {min(accs):.4f}-{max(accs):.4f}), {len(pts)} agreement "
          f"points, eps {list(EPS)}; timing on {len(specs)} of {tp} points x 10 pairs x 6 eps, "
          f"timeout {args.timeout:g} s\n")
    print(table(["backend", "queries", "mean s/query", "median s", "max s", "total s", "verdicts", "decided by"],
                [[b, t["queries"], f"{t['mean_s']:.3f}", f"{t['median_s']:.3f}", f"{t['max_s']:.2f}",
                  f"{t['total_s']:.1f}", " ".join(f"{k}:{v}" for k, v in t["verdicts"].items()),
                  " ".join(f"{k}:{v}" for k, v in t["decided_by"].items())] for b, t in timing.items()]))
    print()
    print(table(["pair of backends", "both decided", "disagreements"],
                [[k, v["both_decided"], v["disagree"]] for k, v in agreement.items()]))
    print(f"\nportfolio speed-up: {result['speedup_portfolio_vs_marabou']:.1f}x vs Marabou alone, "
          f"{result['speedup_portfolio_vs_milp']:.1f}x vs MILP alone (mean time per query); "
          f"{result['speedup_portfolio_vs_marabou_median']:.1f}x vs Marabou by median")
    if retried:
        print(f"with Marabou's timeouts re-run at {args.marabou_retry_timeout:g} s: "
              f"{result['speedup_portfolio_vs_marabou_retried']:.1f}x vs Marabou alone (mean)")
        print(table(["query", "members", "point", "eps", f"re-run at {args.marabou_retry_timeout:g} s", "time s"],
                    [[e["index"], " ".join(f"N{i}" for i in e["members"]), e["point"], e["eps"],
                      e.get("retry_verdict", "not re-run (budget)"), f"{e['retry_s']:.1f}" if "retry_s" in e else "-"]
                     for e in retried]))
    print()
    print(tab.markdown([f"N{i}" for i in e1]))
    c = comparison
    print(table(["G.A. 1", "G.A. 2", "G.A. 3", "verification SAT", "verification UNSAT", "attack SAT on UNSAT"],
                [[c["attack_sat"]["ga1"], c["attack_sat"]["ga2"], c["attack_sat"]["ga3"], c["verification_sat"],
                  c["verification_unsat"], c["attack_sat_on_unsat"]]]))
    print()
    print(sel.markdown())
    print(f"total {result['total_s']:.0f} s (training {train_s:.0f} s, scores {scores_s:.0f} s, "
          f"selection {select_s:.0f} s)")


def width_sweep(args: argparse.Namespace, data: Any) -> dict[str, Any]:
    """MILP alone vs the portfolio per hidden width, on the same queries, alternating per query."""
    from common import loadavg

    out: dict[str, Any] = {"args": {k: v for k, v in vars(args).items()}, "load_before": loadavg(), "widths": {}}
    rows = []
    for width in args.widths:
        models, accs = train_candidates(data, args.sweep_members, args.epochs, width)
        cands = Candidates.from_models(models)
        idx = agreement_points(cands.models, data.val.x, data.val.y, count=args.sweep_points)
        pts = data.val.x[idx].reshape(len(idx), -1).double().numpy()
        labels = data.val.y[idx].tolist()
        specs = pair_specs(tuple(range(args.sweep_members)), len(pts), EPS, labels)
        random.Random(0).shuffle(specs)
        res: dict[str, list[Any]] = {"milp": [], "portfolio": []}
        # one warm worker per backend for the whole width, as in a user's run of all the queries
        # (the portfolio's caches across queries live in its worker)
        engines = {b: query_engine("local") for b in res}
        t0 = time.perf_counter()
        try:
            for i, s in enumerate(specs):
                if time.perf_counter() - t0 > args.sweep_budget:
                    break
                for backend in (("milp", "portfolio") if i % 2 == 0 else ("portfolio", "milp")):
                    res[backend].append(run_queries(cands, pts, [s], backend=backend, time_limit_s=args.timeout,
                                                    engine=engines[backend])[0].result)
        finally:
            for e in engines.values():
                e.close()
        n = len(res["milp"])
        lost = [i for i in range(n) if res["milp"][i].verdict.decided and not res["portfolio"][i].verdict.decided]
        disagree = [i for i in range(n) if res["milp"][i].verdict.decided and res["portfolio"][i].verdict.decided
                    and res["milp"][i].verdict is not res["portfolio"][i].verdict]
        entry: dict[str, Any] = {"queries": n, "of": len(specs), "test_accuracy": accs, "load": loadavg(),
                                 "left_undecided_by_portfolio": lost, "disagreements": disagree,
                                 "per_query": [{"members": list(s.members), "point": s.point, "eps": s.eps,
                                                **{b: {"verdict": rs[i].verdict.value, "s": rs[i].wall_time_s,
                                                       "by": rs[i].backend,
                                                       "stages": rs[i].details.get("stages")} for b, rs in res.items()}}
                                               for i, s in enumerate(specs[:n])]}
        for b, rs in res.items():
            times = [r.wall_time_s for r in rs]
            verdicts = [r.verdict.value for r in rs]
            stages: dict[str, int] = {}
            for r in rs:
                stages[r.backend] = stages.get(r.backend, 0) + 1
            entry[b] = {"mean_s": statistics.mean(times), "median_s": statistics.median(times), "max_s": max(times),
                        "total_s": sum(times), "verdicts": {v: verdicts.count(v) for v in sorted(set(verdicts))},
                        "decided_by": stages}
        out["widths"][str(width)] = entry
        rows.append([f"784-{width}-10", f"{n}/{len(specs)}", f"{entry['milp']['mean_s']:.4g}",
                     f"{entry['portfolio']['mean_s']:.4g}", f"{entry['milp']['median_s']:.4g}",
                     f"{entry['portfolio']['median_s']:.4g}",
                     " ".join(f"{k}:{v}" for k, v in entry["milp"]["verdicts"].items()),
                     " ".join(f"{k}:{v}" for k, v in entry["portfolio"]["verdicts"].items()),
                     " ".join(f"{k.split('/')[-1]}:{v}" for k, v in entry["portfolio"]["decided_by"].items()),
                     len(lost), len(disagree)])
        print(f"width {width}: {entry}", flush=True)
    out["load_after"] = loadavg()
    path = Path(args.out).with_name(Path(args.out).stem + "_widths.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"\nload average before / after: {out['load_before']} / {out['load_after']}\n")
    print(table(["network", "queries", "MILP mean s", "portfolio mean s", "MILP median s", "portfolio median s",
                 "MILP verdicts", "portfolio verdicts", "portfolio decided by", "MILP-decided left undecided",
                 "disagreements"], rows))
    return out


if __name__ == "__main__":
    main()
