"""The Marabou 2.0 backend: each query is solved by ``marabou_worker.py`` in its own process with
a hard timeout (Marabou's options are a global singleton; REFERENCE-FACTS).

Marabou has no strict inequalities, so "label ``l`` is not the argmax" is ``c . Y >= 1e-3``
(``MARGIN``; with ``>= 0`` it returns exact ties that PyTorch does not count as errors). Hence
Marabou's UNSAT means "no input with a margin of at least 1e-3"; the test suite cross-checks it
against the MILP's exact UNSAT. Every SAT is re-checked in float64 PyTorch; an unconfirmed SAT is
ERROR (Marabou 2.0 has open reports of wrong answers on two-network queries).
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from phalanx.errors import PhalanxError
from phalanx.verification.backends import Verifier, query_bounds
from phalanx.verification.ir import Affine, LeakyRelu, MaxPool, Op, Relu, Residual
from phalanx.verification.query import MARGIN, Query, QueryKind, Verdict, VerificationResult

WORKER = Path(__file__).with_name("marabou_worker.py")


def marabou_available() -> bool:
    try:
        import maraboupy  # noqa: F401
    except ImportError:
        return False
    return True


def plain_ops(ops: tuple[Op, ...]) -> list[Any]:
    """The IR as plain tuples and arrays (picklable without phalanx)."""
    out: list[Any] = []
    for op in ops:
        if isinstance(op, Affine):
            out.append(("affine", op.weight, op.bias))
        elif isinstance(op, Relu):
            out.append(("relu",))
        elif isinstance(op, LeakyRelu):
            out.append(("leaky", op.slope))
        elif isinstance(op, MaxPool):
            out.append(("maxpool", [np.asarray(g) for g in op.groups]))
        elif isinstance(op, Residual):
            out.append(("residual", plain_ops(op.branch), plain_ops(op.shortcut)))
    return out


class MarabouVerifier(Verifier):
    """maraboupy 2.0, one subprocess per query, margin 1e-3 for "not the argmax"."""

    name = "marabou"

    def __init__(self, margin: float = MARGIN, use_bounds: bool = False, grace_s: float = 5.0) -> None:
        if margin <= 0:
            raise PhalanxError(f"marabou margin must be > 0 (no strict inequalities), got {margin}")
        self.margin, self.use_bounds, self.grace_s = margin, use_bounds, grace_s

    def verify(self, query: Query, *, time_limit_s: float) -> VerificationResult:
        t0 = time.perf_counter()
        if not marabou_available():
            raise PhalanxError("the marabou backend needs maraboupy: pip install 'phalanx[marabou]' "
                               "(wheels exist for Python 3.10/3.11)")
        if self.use_bounds and query_bounds(query, per_network=False, stop_at_unsat=True).proves_unsat(query):
            return self._result(Verdict.UNSAT, t0, message="bounds prove UNSAT (no solver call)")
        lo, hi = query.box()
        payload = {"nets": [plain_ops(n.ops) for n in query.nets], "lo": lo, "hi": hi,
                   "groups": query.groups(), "required": query.required, "margin": self.margin,
                   "timeout": max(1.0, time_limit_s)}
        with tempfile.TemporaryDirectory(prefix="phalanx-marabou-") as tmp:
            qp, ap = Path(tmp) / "q.pkl", Path(tmp) / "a.json"
            with open(qp, "wb") as f:
                pickle.dump(payload, f)
            try:
                proc = subprocess.run([sys.executable, str(WORKER), str(qp), str(ap)], capture_output=True,
                                      timeout=time_limit_s + self.grace_s, check=False)
            except subprocess.TimeoutExpired:
                return self._result(Verdict.TIMEOUT, t0, message="marabou process killed at the time limit")
            if not ap.is_file():
                err = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no answer"]
                return self._result(Verdict.ERROR, t0, message=f"marabou worker failed: {err[0]}")
            try:
                ans = json.loads(ap.read_text())
            except ValueError:  # a worker killed while writing: no answer
                ans = None
            if not isinstance(ans, dict):
                return self._result(Verdict.ERROR, t0, message="marabou worker wrote an unreadable answer")
        code = ans.get("code", "ERROR")
        det = {"code": code, "margin": self.margin, "solve_s": ans.get("solve_s")}
        if code == "sat":
            x = ans.get("x")
            return self._sat_or_error(query, None if x is None else np.asarray(x, dtype=np.float64), t0, **det)
        if code == "unsat":
            if not query.complete:
                return self._result(Verdict.TIMEOUT, t0, message="runner-up query UNSAT proves nothing", details=det)
            if query.kind is QueryKind.PROPERTY:  # VNN-LIB's >= 0 admits margins below Marabou's
                return self._result(Verdict.TIMEOUT, t0, message=f"marabou unsat at margin {self.margin:g} proves "
                                    "nothing for a non-strict VNN-LIB property", details=det)
            return self._result(Verdict.UNSAT, t0, message=f"marabou unsat (margin {self.margin:g})", details=det)
        if code == "TIMEOUT":
            return self._result(Verdict.TIMEOUT, t0, message="marabou timeout", details=det)
        return self._result(Verdict.ERROR, t0, message=f"marabou: {ans.get('message', code)}", details=det)
