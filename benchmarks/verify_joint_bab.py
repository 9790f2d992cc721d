"""Pairwise mutual-error queries: the portfolio before (forward linear bounds, MILP) and after
(joint alpha-CROWN bounds, branch and bound) on the same queries, and how many queries bounds
alone decide (forward bounds per member, back-substituted bounds per member, joint bounds).

Suites: 5 MNIST 784-30-10 MLPs (Amir et al.'s architecture, the verify_mnist.py recipe on 12,000
training images); 3 digits ``small-cnn`` (8x8, conv16-conv32-pool-fc64, the test fixture's
recipe) at the demo's eps (0.08, 0.15); 2 MNIST ``lenet5`` trained 1 epoch on 12,000 images.
Points: validation images every member classifies correctly. Each backend runs each query alone
in one process with the same time limit, interleaved query by query; each portfolio keeps its
own member-robustness cache.

Run:  nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/verify_joint_bab.py
Writes benchmarks/out/verify_joint_bab.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
import weakref
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


def train_mlps(data: Any, n: int) -> list[torch.nn.Module]:
    models = []
    for s in range(n):
        torch.manual_seed(1000 + s)
        m = create_model("mlp", data.in_shape, data.num_classes, mean=data.mean, std=data.std, widths=[30])
        fit(Ensemble([m], "mean-logits"), create_method("baseline"), data,
            TrainConfig(epochs=2, batch_size=128, lr=0.05, seed=1000 + s, device="cpu"), progress=False)
        models.append(m.eval())
    return models


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
    ap.add_argument("--suites", default="mlp,small-cnn,lenet5")
    ap.add_argument("--mlp-points", type=int, default=1)
    ap.add_argument("--digits-points", type=int, default=2)
    ap.add_argument("--mnist-points", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "verify_joint_bab.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    chosen = args.suites.split(",")
    suites: list[tuple[str, list[Any]]] = []
    mnist = None
    if "mlp" in chosen or "lenet5" in chosen:
        mnist = load_dataset("mnist", data_dir=args.data_dir, seed=0, limit=12000)
    if "mlp" in chosen:
        suites.append(("mnist mlp 784-30-10", queries(train_mlps(mnist, 5), mnist, args.mlp_points,
                                                      (0.01, 0.02, 0.03, 0.04, 0.05, 0.06))))
    if "small-cnn" in chosen:
        digits = load_dataset("digits", seed=0)
        suites.append(("digits small-cnn", queries(train(digits, "small-cnn", 3, 6, 1), digits, args.digits_points,
                                                   (0.08, 0.15))))
    if "lenet5" in chosen:
        suites.append(("mnist lenet5", queries(train(mnist, "lenet5", 2, 1, 0), mnist, args.mnist_points,
                                               (0.02, 0.05))))
    from phalanx.verification import portfolio

    makers = {"before (linear bounds, milp)": lambda: create_verifier("portfolio", complete="milp", bounds="linear"),
              "after (joint crown, bab)": lambda: create_verifier("portfolio")}
    caches: dict[str, dict[Any, Any]] = {name: {} for name in makers}
    facts: dict[str, Any] = {name: weakref.WeakKeyDictionary() for name in makers}
    rows: list[dict[str, Any]] = []
    for suite, qs in suites:
        for n, q in enumerate(qs):
            bounds = {b: create_verifier(b).verify(q, time_limit_s=args.timeout).verdict.value
                      for b in ("bounds", "crown")}
            bounds["crown-per-member"] = create_verifier("crown", joint=False).verify(q).verdict.value
            order = list(makers) if n % 2 == 0 else list(reversed(makers))
            for name in order:
                portfolio._MEMBER_CACHE, portfolio._MEMBER_FACTS = caches[name], facts[name]
                t0 = time.perf_counter()
                r = makers[name]().verify(q, time_limit_s=args.timeout)
                if r.verdict is Verdict.SAT:
                    assert recheck(q, r.counterexample)[0] is not None
                rows.append({"suite": suite, "qid": q.qid, "eps": q.eps, "backend": name, "verdict": r.verdict.value,
                             "time_s": round(time.perf_counter() - t0, 3), "stage": r.details.get("stage", r.backend),
                             "bounds": bounds, "details": {k: v for k, v in r.details.items() if k != "stages"}})
                print(suite, q.qid, name, r.verdict.value, f"{rows[-1]['time_s']:.2f}s", rows[-1]["stage"],
                      bounds, flush=True)
    summary = []
    for (suite, name), grp in itertools.groupby(sorted(rows, key=lambda r: (r["suite"], r["backend"])),
                                                key=lambda r: (r["suite"], r["backend"])):
        g = list(grp)
        times = sorted(r["time_s"] for r in g)
        v = Counter(r["verdict"] for r in g)
        summary.append([suite, name, len(g), f"{sum(times) / len(g):.3f}", f"{times[len(times) // 2]:.3f}",
                        f"{max(times):.2f}", " ".join(f"{k}:{c}" for k, c in sorted(v.items())),
                        " ".join(f"{k}:{c}" for k, c in sorted(Counter(r["stage"] for r in g).items()))])
    decided = []
    disagree = 0
    for suite in dict.fromkeys(r["suite"] for r in rows):
        g = [r for r in rows if r["suite"] == suite and r["backend"] == next(iter(makers))]
        decided.append([suite, len(g)] + [sum(r["bounds"][b] == "unsat" for r in g)
                                          for b in ("bounds", "crown-per-member", "crown")])
    by_q: dict[str, set[str]] = {}
    for r in rows:
        if r["verdict"] in ("sat", "unsat"):
            by_q.setdefault(r["suite"] + r["qid"], set()).add(r["verdict"])
    disagree = sum(len(v) > 1 for v in by_q.values())
    print(table(["suite", "portfolio", "queries", "mean s", "median s", "max s", "verdicts", "decided by"], summary))
    print(table(["suite", "queries", "UNSAT by forward bounds", "by CROWN per member", "by joint CROWN"], decided))
    print(f"disagreements between decided verdicts: {disagree}")
    with open("/proc/loadavg") as f:
        load = f.read().strip()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "summary": summary, "bounds_decided": decided, "disagreements": disagree,
                               "timeout_s": args.timeout, "loadavg_end": load, "machine": platform.platform()},
                              indent=1))


if __name__ == "__main__":
    main()
