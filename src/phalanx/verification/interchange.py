"""VNN-COMP instances: ONNX network(s) + VNN-LIB property -> queries -> a VNN-COMP result.

An instance is read with :func:`~phalanx.verification.onnx_import.load_onnx` and
:func:`~phalanx.verification.vnnlib.read_vnnlib`; every non-empty region of the property becomes
one ``property`` query (:func:`~phalanx.verification.query.property_query`) on the imported
networks (plus a :class:`~phalanx.verification.query.ConstantNet` when atoms have constant
terms), solved by any registered verifier (the portfolio by default) within the instance's
time limit. The instance is

- ``sat`` when a query is SAT and its witness satisfies the property once more on onnxruntime's
  outputs (the VNN-COMP checker's view) — the float64 PyTorch re-check already happened in the
  verifier; a witness that onnxruntime's float32 rounding loses is ``unknown``, never ``sat``;
- ``unsat`` when every region is proven UNSAT (an empty input box is trivially UNSAT);
- ``timeout`` when the time limit ran out, ``error`` when a backend failed, ``unknown`` when an
  incomplete method gave up with time left or a candidate could not be confirmed.

Result files follow VNN-COMP 2022: the verdict on the first line and, for ``sat``, the
counterexample ``((X_0 v) ... (Y_0 v) ...)`` with the onnxruntime outputs.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phalanx.errors import PhalanxError
from phalanx.verification.onnx_import import OnnxNetwork, load_onnx
from phalanx.verification.query import ConstantNet, Query, Verdict, property_query
from phalanx.verification.vnnlib import Property, read_vnnlib, vnn_number

RESULTS = ("sat", "unsat", "timeout", "error", "unknown")


@dataclass
class InstanceResult:
    """One instance's VNN-COMP result with the time, deciding stage and a re-checked witness."""

    result: str
    seconds: float
    stage: str = ""
    message: str = ""
    x: np.ndarray | None = None
    y: np.ndarray | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.result not in RESULTS:
            raise PhalanxError(f"unknown instance result {self.result!r}; accepted: {', '.join(RESULTS)}")
        if self.result == "sat" and (self.x is None or self.y is None):
            raise PhalanxError("a sat result needs its counterexample")

    def to_json(self) -> dict[str, Any]:
        return {"result": self.result, "seconds": round(self.seconds, 4), "stage": self.stage, "message": self.message,
                "details": self.details, "x": None if self.x is None else self.x.tolist(),
                "y": None if self.y is None else self.y.tolist()}

    def vnncomp_text(self) -> str:
        """The VNN-COMP result file: verdict line, then for ``sat`` the counterexample."""
        if self.result != "sat":
            return self.result + "\n"
        assert self.x is not None and self.y is not None
        lines = ["sat", "("]
        lines += [f"(X_{i} {vnn_number(v)})" for i, v in enumerate(self.x)]
        lines += [f"(Y_{j} {vnn_number(v)})" for j, v in enumerate(self.y)]
        lines.append(")")
        return "\n".join(lines) + "\n"


def load_instance(networks: str | Path | Sequence[str | Path], prop_path: str | Path) -> tuple[list[OnnxNetwork], Property]:
    """Import the network(s) and the property and check that their sizes agree."""
    paths = [networks] if isinstance(networks, (str, Path)) else list(networks)
    nets = [load_onnx(p) for p in paths]
    prop = read_vnnlib(prop_path)
    if len(nets) != len(prop.networks):
        raise PhalanxError(f"{prop_path}: the property declares {len(prop.networks)} network(s), {len(nets)} given")
    for net, decl in zip(nets, prop.networks, strict=True):
        if net.in_dim != decl.n_inputs or net.n_outputs != decl.n_outputs:
            raise PhalanxError(f"{prop_path}: network {net.source} has {net.in_dim} inputs and {net.n_outputs} "
                               f"outputs, the property declares {decl.n_inputs} and {decl.n_outputs}")
    region = prop.regions[0] if prop.regions and len(nets) == 1 else None
    for net in nets:
        check_import(net, region.lower if region is not None else None, region.upper if region is not None else None)
    return nets, prop


IMPORT_TOL = 1e-4  # onnxruntime computes in float32: relative to the outputs' scale


def check_import(net: OnnxNetwork, lower: np.ndarray | None = None, upper: np.ndarray | None = None,
                 samples: int = 16, seed: int = 0) -> float:
    """Refuse a network that phalanx may have misread: the exact IR (what every verifier encodes)
    and onnxruntime must agree on ``samples`` random inputs in ``[lower, upper]`` (default
    ``[0, 1]``) to ``IMPORT_TOL`` relative to the outputs' scale. A wrong import could otherwise
    give a wrong UNSAT (a wrong SAT is already impossible: witnesses are re-checked on onnxruntime).
    Returns the relative difference."""
    rng = np.random.default_rng(seed)
    lo = np.zeros(net.in_dim) if lower is None else np.asarray(lower, dtype=np.float64).reshape(-1)
    hi = np.ones(net.in_dim) if upper is None else np.asarray(upper, dtype=np.float64).reshape(-1)
    x = lo + (hi - lo) * rng.random((samples, net.in_dim))
    y_ort = np.asarray(net.run_onnxruntime(x), dtype=np.float64).reshape(samples, -1)
    y_ir = net.forward_ir(x).reshape(samples, -1)
    rel = float(np.max(np.abs(y_ort - y_ir)) / (1.0 + np.max(np.abs(y_ort))))
    if not rel <= IMPORT_TOL:
        raise PhalanxError(f"{net.source}: the imported network differs from onnxruntime by {rel:.2e} (relative) on "
                           f"random inputs, above {IMPORT_TOL:g}; refusing to verify a network phalanx may have misread")
    return rel


def instance_queries(nets: Sequence[OnnxNetwork], prop: Property, qid: str = "") -> list[Query]:
    """One ``property`` query per non-empty region on every branch of every network; atoms over
    the declared outputs are mapped through the networks' heads onto the branches' outputs, and
    constant terms go through a constant network."""
    models = [m for n in nets for m in n.modules]
    irs = [ir for n in nets for ir in n.irs]
    blocks = [n.head if n.head is not None else np.eye(sum(ir.out_dim for ir in n.irs)) for n in nets]
    head = np.zeros((sum(b.shape[0] for b in blocks), sum(b.shape[1] for b in blocks)))
    r0 = c0 = 0
    for b in blocks:
        head[r0:r0 + b.shape[0], c0:c0 + b.shape[1]] = b
        r0, c0 = r0 + b.shape[0], c0 + b.shape[1]
    need_const = any(a.const != 0.0 for r in prop.regions for g in r.groups for a in g)
    if need_const:
        const = ConstantNet(nets[0].in_shape)
        models.append(const)
        irs.append(const.ir())
    out = []
    for k, r in enumerate(prop.regions):
        if r.empty:
            continue
        groups = [[np.concatenate([a.coef @ head, [a.const]]) if need_const else a.coef @ head for a in g]
                  for g in r.groups]
        out.append(property_query(models, irs, r.lower, r.upper, groups, qid=f"{qid}#{k}"))
    return out


def verify_instance(networks: str | Path | Sequence[str | Path], prop_path: str | Path, *, timeout_s: float,
                    verifier: str = "portfolio", options: dict[str, Any] | None = None) -> InstanceResult:
    """Decide one instance within ``timeout_s`` seconds (loading included). Bad files raise
    :class:`PhalanxError`; see the module docstring for the results."""
    from phalanx.verification import create_verifier

    t0 = time.perf_counter()
    if not timeout_s > 0:
        raise PhalanxError(f"timeout must be > 0 seconds, got {timeout_s!r}")
    nets, prop = load_instance(networks, prop_path)
    queries = instance_queries(nets, prop, qid=Path(prop_path).name)
    if not queries:
        return InstanceResult("unsat", time.perf_counter() - t0, "box", "every input region is empty")
    backend = create_verifier(verifier, **(options or {}))
    verdicts: list[tuple[Verdict, str, str]] = []
    stages: list[dict[str, Any]] = []
    for q in queries:
        left = timeout_s - (time.perf_counter() - t0)
        if left <= 0:
            verdicts.append((Verdict.TIMEOUT, "", "time limit reached before this region"))
            break
        r = backend.verify_guarded(q, time_limit_s=left)
        stage = str(r.details.get("stage", r.backend))
        stages.append({"qid": q.qid, "verdict": r.verdict.value, "stage": stage, "seconds": round(r.wall_time_s, 4),
                       "stages": r.details.get("stages", {})})
        if r.verdict is Verdict.SAT:
            assert r.counterexample is not None
            return _confirm_sat(nets, prop, r.counterexample, t0, stage, stages)
        verdicts.append((r.verdict, stage, r.message))
        if r.verdict is not Verdict.UNSAT:
            break  # the instance cannot be UNSAT any more; VNN-COMP scores no partial answers
    elapsed = time.perf_counter() - t0
    det = {"regions": len(queries), "queries": stages}
    if all(v is Verdict.UNSAT for v, _, _ in verdicts) and len(verdicts) == len(queries):
        stage = ",".join(sorted({s for _, s, _ in verdicts}))
        return InstanceResult("unsat", elapsed, stage, "every region proven UNSAT", details=det)
    v, stage, msg = verdicts[-1]
    if v is Verdict.ERROR:
        undecided = msg.startswith("unconfirmed SAT") or "tie" in msg
        return InstanceResult("unknown" if undecided else "error", elapsed, stage, msg, details=det)
    return InstanceResult("timeout" if elapsed >= 0.98 * timeout_s else "unknown", elapsed, stage, msg, details=det)


def _confirm_sat(nets: Sequence[OnnxNetwork], prop: Property, x: np.ndarray, t0: float, stage: str,
                 stages: list[dict[str, Any]]) -> InstanceResult:
    """The float64 PyTorch re-check passed; check the witness once more on onnxruntime."""
    y_ort = np.concatenate([n.run_onnxruntime(x[None])[0] for n in nets])
    y64 = np.concatenate([n.forward(x[None])[0] for n in nets])
    det = {"queries": stages, "onnxruntime_vs_float64": float(np.max(np.abs(y_ort - y64))),
           "holds_float64": prop.holds(x, y64), "holds_onnxruntime": prop.holds(x, y_ort)}
    elapsed = time.perf_counter() - t0
    if not det["holds_onnxruntime"]:
        return InstanceResult("unknown", elapsed, stage, "witness holds in float64 but not on onnxruntime's outputs "
                              "(float32 rounding)", x=x, details=det)
    return InstanceResult("sat", elapsed, stage, "witness re-checked in float64 PyTorch and onnxruntime", x=x, y=y_ort,
                          details=det)


@dataclass(frozen=True)
class Instance:
    """One row of a VNN-COMP ``instances.csv``: network(s), property, timeout (seconds)."""

    networks: tuple[Path, ...]
    prop: Path
    timeout_s: float

    @property
    def name(self) -> str:
        nets = "+".join(_stem(p) for p in self.networks)
        return f"{nets}__{_stem(self.prop)}"


def _stem(p: Path) -> str:
    n = p.name
    for suf in (".gz", ".onnx", ".vnnlib"):
        n = n.removesuffix(suf)
    return n


def read_instances(csv_path: str | Path) -> list[Instance]:
    """Rows ``onnx,vnnlib,timeout`` relative to the csv's folder; a missing file may be present
    gzipped (``.gz``, as in VNN-COMP's repositories)."""
    p = Path(csv_path)
    if not p.is_file():
        raise PhalanxError(f"instances file {str(p)!r} not found")
    out = []
    with p.open(newline="") as f:
        for k, row in enumerate(csv.reader(f), start=1):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != 3:
                raise PhalanxError(f"{p}:{k}: expected onnx,vnnlib,timeout, got {len(row)} fields")
            try:
                t = float(row[2])
            except ValueError:
                raise PhalanxError(f"{p}:{k}: timeout {row[2]!r} is not a number") from None
            if not t > 0:
                raise PhalanxError(f"{p}:{k}: timeout must be > 0, got {row[2]!r}")
            nets = tuple(_existing(p.parent / n.strip()) for n in row[0].split(";"))
            out.append(Instance(nets, _existing(p.parent / row[1].strip()), t))
    if not out:
        raise PhalanxError(f"instances file {str(p)!r} lists no instances")
    return out


def _existing(p: Path) -> Path:
    if p.exists():
        return p
    gz = p.with_name(p.name + ".gz")
    return gz if gz.exists() else p


def run_instances(instances: Sequence[Instance], out_dir: str | Path, *, verifier: str = "portfolio",
                  options: dict[str, Any] | None = None, timeout_scale: float = 1.0,
                  on_result: Callable[[Instance, InstanceResult], None] | None = None) -> list[dict[str, Any]]:
    """Run instances one after another; write ``<name>.result`` (VNN-COMP format) per instance
    into ``out_dir``. A file that cannot be read gives ``error`` for its instance only."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for inst in instances:
        t0 = time.perf_counter()
        timeout = inst.timeout_s * timeout_scale
        try:
            res = verify_instance(inst.networks, inst.prop, timeout_s=timeout, verifier=verifier, options=options)
        except PhalanxError as exc:
            res = InstanceResult("error", time.perf_counter() - t0, "load", str(exc))
        (out / f"{inst.name}.result").write_text(res.vnncomp_text())
        rows.append({"instance": inst.name, "networks": [str(n) for n in inst.networks], "property": str(inst.prop),
                     "timeout_s": timeout, **res.to_json()})
        if on_result is not None:
            on_result(inst, res)
    return rows


def summary_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """A per-instance table and the totals per result."""
    lines = ["| instance | result | time (s) | stage | timeout (s) |", "|---|---|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['instance']} | {r['result']} | {r['seconds']:.2f} | {r['stage']} | {r['timeout_s']:g} |")
    counts = {k: sum(r["result"] == k for r in rows) for k in RESULTS}
    lines += ["", "totals: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f" (of {len(rows)})"]
    return "\n".join(lines) + "\n"


__all__ = ["RESULTS", "Instance", "InstanceResult", "instance_queries", "load_instance", "read_instances",
           "run_instances", "summary_markdown", "verify_instance"]
