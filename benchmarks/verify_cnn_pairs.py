"""Pairwise mutual-error queries of small CNN members: the portfolio with the MILP as its complete
stage (before) against joint CROWN bounds and branch and bound (after), and how many queries
bounds alone decide (per-member forward bounds vs joint back-substituted bounds).

Members: 3 digits ``small-cnn`` (8x8, conv16-conv32-pool-fc64, the test fixture's recipe) and
2 MNIST ``lenet5`` trained 1 epoch on 12,000 images. Points: validation images every member
classifies correctly. eps: the demo's (0.08, 0.15) on digits; 0.02 and 0.05 on MNIST (at 0.08+
every LeNet-5 pair query is SAT, found by the attack). Every backend runs each query alone, in
one process, with the same time limit; queries are interleaved across backends.

Run:  nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/verify_cnn_pairs.py
Writes benchmarks/out/verify_cnn_pairs.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from phalanx import Ensemble, TrainConfig, create_method, create_model, fit
from phalanx.data import load_dataset
from phalanx.reports import table
from phalanx.verification import Verdict, create_verifier, make_query, to_ir
from phalanx.verification.query import recheck

REPO = Path(__file__).resolve().parents[1]


def train(data: Any, model: str, members: int, epochs: int, seed: int) -> list[torch.nn.Module]:
    torch.manual_seed(seed)
    ens = Ensemble([create_model(model, data.in_shape, data.num_classes, mean=data.mean, std=data.std)
                    for _ in range(members)])
    fit(ens, create_method("baseline"), data, TrainConfig(epochs=epochs, batch_size=64, lr=0.05, seed=seed,
                                                          device="cpu"), progress=False)
    return [m.eval() for m in ens.eval().members]


def queries(models: list[torch.nn.Module], data: Any, points: int, eps: tuple[float, ...]) -> list[Any]:
    nets = [to_ir(m) for m in models]
    with torch.no_grad():
        preds = torch.stack([m(data.val.x) for m in models]).argmax(-1)
    idx = (preds == data.val.y).all(0).nonzero().flatten()[:points]
    out = []
    for i, e, (a, b) in itertools.product(idx.tolist(), eps, itertools.combinations(range(len(models)), 2)):
        out.append(make_query([models[a], models[b]], data.val.x[i], e, int(data.val.y[i]), nets=[nets[a], nets[b]],
                              qid=f"p{i}-e{e}-N{a}N{b}"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "mnist"))
    ap.add_argument("--digits-points", type=int, default=4)
    ap.add_argument("--mnist-points", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--backends", default="portfolio-milp,portfolio-bab")
    ap.add_argument("--skip-mnist", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "verify_cnn_pairs.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    suites: list[tuple[str, list[Any]]] = []
    digits = load_dataset("digits", seed=0)
    suites.append(("digits small-cnn", queries(train(digits, "small-cnn", 3, 6, 1), digits, args.digits_points,
                                               (0.08, 0.15))))
    if not args.skip_mnist:
        mnist = load_dataset("mnist", data_dir=args.data_dir, seed=0, limit=12000)
        suites.append(("mnist lenet5", queries(train(mnist, "lenet5", 2, 1, 0), mnist, args.mnist_points,
                                               (0.02, 0.05))))
    makers = {"portfolio-milp": lambda: create_verifier("portfolio", complete="milp"),
              "portfolio-bab": lambda: create_verifier("portfolio", complete="bab"),
              "bab": lambda: create_verifier("bab"), "milp": lambda: create_verifier("milp")}
    names = args.backends.split(",")
    rows: list[dict[str, Any]] = []
    for suite, qs in suites:
        for q in qs:
            bounds = {b: create_verifier(b).verify(q, time_limit_s=args.timeout).verdict.value
                      for b in ("bounds", "crown")}
            bounds["crown-per-member"] = create_verifier("crown", joint=False).verify(q).verdict.value
            for name in names:
                t0 = time.perf_counter()
                r = makers[name]().verify(q, time_limit_s=args.timeout)
                if r.verdict is Verdict.SAT:
                    assert recheck(q, r.counterexample)[0] is not None
                rows.append({"suite": suite, "qid": q.qid, "eps": q.eps, "backend": name, "verdict": r.verdict.value,
                             "time_s": round(time.perf_counter() - t0, 3), "stage": r.details.get("stage", r.backend),
                             "bounds": bounds})
                print(suite, q.qid, name, r.verdict.value, f"{rows[-1]['time_s']:.2f}s", rows[-1]["stage"],
                      bounds, flush=True)
    summary = []
    for (suite, name), grp in itertools.groupby(sorted(rows, key=lambda r: (r["suite"], r["backend"])),
                                                key=lambda r: (r["suite"], r["backend"])):
        g = list(grp)
        times = [r["time_s"] for r in g]
        v = Counter(r["verdict"] for r in g)
        summary.append([suite, name, len(g), f"{sum(times) / len(g):.2f}", f"{max(times):.2f}",
                        " ".join(f"{k}:{n}" for k, n in sorted(v.items())),
                        " ".join(f"{k}:{n}" for k, n in sorted(Counter(r["stage"] for r in g).items()))])
    decided = []
    for suite in dict.fromkeys(r["suite"] for r in rows):
        g = [r for r in rows if r["suite"] == suite and r["backend"] == names[0]]
        decided.append([suite, len(g)] + [sum(r["bounds"][b] == "unsat" for r in g)
                                          for b in ("bounds", "crown-per-member", "crown")])
    print(table(["suite", "backend", "queries", "mean s", "max s", "verdicts", "decided by"], summary))
    print(table(["suite", "queries", "UNSAT by forward bounds", "by CROWN per member", "by joint CROWN"], decided))
    with open("/proc/loadavg") as f:
        load = f.read().strip()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "timeout_s": args.timeout, "loadavg_end": load,
                               "machine": platform.platform()}, indent=1))


if __name__ == "__main__":
    main()
