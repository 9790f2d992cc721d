"""Standalone worker: solve one serialized query with maraboupy and write the answer as JSON.

Run as a script (``python marabou_worker.py query.pkl answer.json``) in its own process, so a
hard timeout can kill it and Marabou's global option singleton never leaks between queries
(REFERENCE-FACTS, Marabou 2.0). It imports only numpy and maraboupy, never phalanx or torch.
The query is plain tuples and arrays: ``ops`` per network are ``("affine", W, b)``,
``("relu",)``, ``("leaky", slope)``, ``("maxpool", groups)``, ``("residual", branch, shortcut)``.
"""

from __future__ import annotations

import itertools
import json
import math
import pickle
import sys
import time
from typing import Any

import numpy as np


def _encode(net: Any, ops: list[Any], h: list[int]) -> list[int]:
    for op in ops:
        kind = op[0]
        if kind == "affine":
            wt, bias = op[1], op[2]
            y = [net.getNewVariable() for _ in range(bias.size)]
            for j in range(bias.size):
                nz = np.nonzero(wt[j])[0]
                net.addEquality([y[j]] + [h[i] for i in nz], [1.0] + [-float(wt[j, i]) for i in nz], float(bias[j]))
            h = y
        elif kind in ("relu", "leaky"):
            y = [net.getNewVariable() for _ in h]
            for u, v in zip(h, y, strict=True):
                if kind == "relu":
                    net.addRelu(u, v)
                else:
                    net.addLeakyRelu(u, v, float(op[1]))
            h = y
        elif kind == "maxpool":
            y = []
            for g in op[1]:
                mv = net.getNewVariable()
                net.addMaxConstraint({h[int(i)] for i in g}, mv)
                y.append(mv)
            h = y
        elif kind == "residual":
            br = _encode(net, op[1], h)
            sc = _encode(net, op[2], h)
            y = [net.getNewVariable() for _ in br]
            for s, u, w in zip(y, br, sc, strict=True):
                net.addEquality([s, u, w], [1.0, -1.0, -1.0], 0.0)
            h = y
        else:
            raise ValueError(f"unknown op {kind!r}")
    return h


def solve(q: dict[str, Any]) -> dict[str, Any]:
    from maraboupy import Marabou, MarabouCore, MarabouNetwork, MarabouUtils

    net = MarabouNetwork.MarabouNetwork()
    lo, hi = q["lo"], q["hi"]
    x = [net.getNewVariable() for _ in range(lo.size)]
    for v, a, b in zip(x, lo, hi):
        net.setLowerBound(v, float(a))
        net.setUpperBound(v, float(b))
    y: list[int] = []
    for ops in q["nets"]:
        y += _encode(net, ops, x)
    net.inputVars = [np.array(x)]
    net.outputVars = [np.array(y)]
    margin = float(q["margin"])

    def eq(c: np.ndarray) -> Any:
        e = MarabouUtils.Equation(MarabouCore.Equation.GE)
        for i in np.nonzero(c)[0]:
            e.addAddend(float(c[i]), y[int(i)])
        e.setScalar(margin)
        return e

    groups, need = q["groups"], int(q["required"])
    if need == len(groups):
        for g in groups:
            if len(g) == 1:
                nz = np.nonzero(g[0])[0]
                net.addInequality([y[int(i)] for i in nz], [-float(g[0][i]) for i in nz], -margin)
            else:
                net.addDisjunctionConstraint([[eq(c)] for c in g])
    else:  # at least `need` of the groups: expand into one disjunction of conjunctions
        disjuncts = []
        for subset in itertools.combinations(range(len(groups)), need):
            for choice in itertools.product(*[groups[i] for i in subset]):
                disjuncts.append([eq(c) for c in choice])
        if len(disjuncts) > int(q.get("max_disjuncts", 5000)):
            return {"code": "ERROR", "message": f"{len(disjuncts)} disjuncts: too many for Marabou"}
        net.addDisjunctionConstraint(disjuncts)
    opts = Marabou.createOptions(verbosity=0, timeoutInSeconds=max(1, math.ceil(q["timeout"])))
    t0 = time.perf_counter()
    code, vals, _stats = net.solve(options=opts, verbose=False)
    out: dict[str, Any] = {"code": str(code), "solve_s": time.perf_counter() - t0}
    if str(code) == "sat":
        out["x"] = [float(vals[v]) for v in x]
    return out


def main(argv: list[str]) -> int:
    with open(argv[1], "rb") as f:
        q = pickle.load(f)
    try:
        ans = solve(q)
    except Exception as exc:  # report, never crash silently
        ans = {"code": "ERROR", "message": f"{type(exc).__name__}: {exc}"}
    with open(argv[2], "w") as f:
        json.dump(ans, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
