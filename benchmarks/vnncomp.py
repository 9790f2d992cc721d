"""VNN-COMP 2022 ``mnist_fc`` with phalanx's verifier, against the published results.

Needs the public benchmark and results repositories checked out (or extracted) somewhere
outside the project (never commit their files):

    git clone https://github.com/ChristopherBrix/vnncomp2022_benchmarks BENCH
    git clone https://github.com/ChristopherBrix/vnncomp2022_results RESULTS
    python benchmarks/vnncomp.py --benchmarks-dir BENCH --results-dir RESULTS --networks 256x2 --out results.json

The onnx/vnnlib files may stay gzipped. Every instance runs with the competition's timeout
(``instances.csv``: 120 s for 256x2, 300 s for 256x4/256x6) times ``--timeout-scale``, one
process, one thread. Each counterexample is checked once more the way VNN-COMP's scorer does
(onnxruntime output within 1e-4 of the written Y, the property violated within 1e-4), and every
verdict is compared with alpha-beta-CROWN's, Marabou's and nnenum's published ones: a
``sat``/``unsat`` that contradicts a published ``unsat``/``sat`` is a contradiction. Writes per
instance: result, seconds, deciding stage, stage times, published verdicts and times; totals per
network; ``/proc/loadavg`` before and after. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
import torch

TOOLS = ("alpha_beta_crown", "marabou", "nnenum")
CE_TOL = 1e-4  # VNN-COMP 2022 SCORING/settings.py COUNTEREXAMPLE_TOL


def _load() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def _key(onnx: str, vnnlib: str) -> tuple[str, str]:
    def stem(s: str) -> str:
        n = Path(s).name
        for suf in (".gz", ".onnx", ".vnnlib"):
            n = n.removesuffix(suf)
        return n
    return stem(onnx), stem(vnnlib)


def published(results_dir: Path, benchmark: str) -> dict[tuple[str, str], dict[str, dict[str, Any]]]:
    """(network, property) -> tool -> {result, seconds} from each tool's results.csv."""
    out: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for tool in TOOLS:
        f = results_dir / tool / benchmark / "results.csv"
        if not f.is_file():
            print(f"note: no published results for {tool} at {f}", file=sys.stderr)
            continue
        for row in csv.reader(f.open()):
            if len(row) < 6:
                continue
            res = {"holds": "unsat", "violated": "sat"}.get(row[4].strip(), row[4].strip())
            out.setdefault(_key(row[1], row[2]), {})[tool] = {"result": res, "seconds": float(row[5])}
    return out


def check_counterexample(nets: list[Any], prop: Any, text: str) -> dict[str, Any]:
    """VNN-COMP's scorer on our result file: parse ``((X_i v) ... (Y_j v) ...)``, run onnxruntime
    on X, require |ort - Y| <= tol and the property violated within tol."""
    body = text.split("\n", 1)[1]
    xs = [float(v) for v in re.findall(r"\(X_\d+ ([^)\s]+)\)", body)]
    ys = [float(v) for v in re.findall(r"\(Y_\d+ ([^)\s]+)\)", body)]
    x, y = np.asarray(xs), np.asarray(ys)
    y_ort = np.concatenate([n.run_onnxruntime(x[None])[0] for n in nets])
    diff = float(np.max(np.abs(y_ort - y)))
    ok = diff <= CE_TOL and prop.holds(x, y, tol=CE_TOL)
    return {"ort_diff": diff, "valid": bool(ok), "holds_exact": bool(prop.holds(x, y_ort))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmarks-dir", required=True, type=Path, help="vnncomp2022_benchmarks checkout")
    ap.add_argument("--results-dir", required=True, type=Path, help="vnncomp2022_results checkout")
    ap.add_argument("--benchmark", default="mnist_fc")
    ap.add_argument("--networks", default="256x2,256x4,256x6", help="comma-separated network suffixes")
    ap.add_argument("--instances", default=None, help="regex on the property name (e.g. 'prop_(0|1)_0.03')")
    ap.add_argument("--limit", type=int, default=None, help="only the first N selected instances")
    ap.add_argument("--timeout-scale", type=float, default=1.0, help="multiply the competition timeouts")
    ap.add_argument("--backend", default="portfolio", help="phalanx verifier (default: the portfolio)")
    ap.add_argument("--out", type=Path, default=Path("vnncomp-results.json"))
    args = ap.parse_args(argv)

    from phalanx.verification.interchange import load_instance, verify_instance
    from phalanx.verification.vnnlib import read_vnnlib  # noqa: F401  (import errors early)

    torch.set_num_threads(1)
    bdir = args.benchmarks_dir / "benchmarks" / args.benchmark
    if not (bdir / "instances.csv").is_file():
        ap.error(f"{bdir / 'instances.csv'} not found; --benchmarks-dir is the vnncomp2022_benchmarks root")
    pub = published(args.results_dir, args.benchmark)
    nets_wanted = [n.strip() for n in args.networks.split(",") if n.strip()]
    rows = []
    for onnx, vnnlib, timeout in csv.reader((bdir / "instances.csv").open()):
        net, prop = _key(onnx, vnnlib)
        if not any(net.endswith(n) for n in nets_wanted):
            continue
        if args.instances and not re.search(args.instances, prop):
            continue
        rows.append((net, prop, bdir / onnx.strip(), bdir / vnnlib.strip(), float(timeout)))
    rows = rows[:args.limit] if args.limit else rows
    if not rows:
        ap.error("no instance selected")

    def existing(p: Path) -> Path:
        return p if p.exists() else p.with_name(p.name + ".gz")

    load_before = _load()
    t_all = time.perf_counter()
    out_rows = []
    for k, (net, prop, onnx_p, vnn_p, timeout) in enumerate(rows):
        limit = timeout * args.timeout_scale
        res = verify_instance(existing(onnx_p), existing(vnn_p), timeout_s=limit, verifier=args.backend)
        row: dict[str, Any] = {"network": net, "property": prop, "timeout_s": limit, "result": res.result,
                               "seconds": round(res.seconds, 3), "stage": res.stage, "message": res.message,
                               "stages": [q.get("stages", {}) for q in res.details.get("queries", [])],
                               "published": pub.get((net, prop), {})}
        if res.result == "sat":
            nets, p = load_instance(existing(onnx_p), existing(vnn_p))
            row["counterexample_check"] = check_counterexample(nets, p, res.vnncomp_text())
        theirs = {t: v["result"] for t, v in row["published"].items()}
        row["contradicts"] = sorted(t for t, v in theirs.items()
                                    if {res.result, v} == {"sat", "unsat"})
        if res.result == "sat" and not row["counterexample_check"]["valid"]:
            row["contradicts"].append("vnncomp-checker")
        out_rows.append(row)
        pubs = " ".join(f"{t[:5]}={v['result']}/{v['seconds']:.1f}s" for t, v in row["published"].items())
        print(f"[{k + 1}/{len(rows)}] {net} {prop}: {res.result} {res.seconds:.1f}s ({res.stage}) | {pubs}"
              + (f" CONTRADICTS {row['contradicts']}" if row["contradicts"] else ""), flush=True)
        _write(args, out_rows, load_before, t_all, final=False)
    _write(args, out_rows, load_before, t_all, final=True)
    print(markdown(out_rows))
    return 0


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_net: dict[str, dict[str, Any]] = {}
    for r in rows:
        t = by_net.setdefault(r["network"], {"instances": 0, "decided": 0, "sat": 0, "unsat": 0, "timeout": 0,
                                             "unknown": 0, "error": 0, "contradictions": 0, "by_stage": {},
                                             "published_decided": {}})
        t["instances"] += 1
        t[r["result"]] += 1
        t["decided"] += r["result"] in ("sat", "unsat")
        t["contradictions"] += bool(r["contradicts"])
        if r["result"] in ("sat", "unsat"):
            t["by_stage"][r["stage"]] = t["by_stage"].get(r["stage"], 0) + 1
        for tool, v in r["published"].items():
            t["published_decided"][tool] = t["published_decided"].get(tool, 0) + (v["result"] in ("sat", "unsat"))
    return by_net


def _write(args: argparse.Namespace, rows: list[dict[str, Any]], load_before: float, t0: float, final: bool) -> None:
    payload = {"benchmark": args.benchmark, "backend": args.backend, "timeout_scale": args.timeout_scale,
               "complete": final, "wall_s": round(time.perf_counter() - t0, 1),
               "loadavg_before": load_before, "loadavg_after": _load(), "machine": platform.platform(),
               "cpus": os.cpu_count(), "threads": 1, "totals": totals(rows), "instances": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(args.out)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| network | property | phalanx | time (s) | stage | alpha-beta-CROWN | Marabou | nnenum |",
             "|---|---|---|---:|---|---|---|---|"]
    for r in rows:
        pub = [r["published"].get(t) for t in TOOLS]
        cells = [f"{p['result']} {p['seconds']:.1f}" if p else "-" for p in pub]
        flag = " **contradiction**" if r["contradicts"] else ""
        lines.append(f"| {r['network']} | {r['property']} | {r['result']}{flag} | {r['seconds']:.1f} | {r['stage']} | "
                     + " | ".join(cells) + " |")
    for net, t in totals(rows).items():
        pubs = ", ".join(f"{k} {v}" for k, v in t["published_decided"].items())
        lines.append(f"\n{net}: decided {t['decided']}/{t['instances']} (sat {t['sat']}, unsat {t['unsat']}, "
                     f"timeout {t['timeout']}, unknown {t['unknown']}, error {t['error']}), contradictions "
                     f"{t['contradictions']}; by stage {t['by_stage']}; published decided: {pubs}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
