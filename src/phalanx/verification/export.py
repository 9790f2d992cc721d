"""Export a query as ONNX networks plus a VNN-LIB property (VNN-COMP conventions), so it can be
handed to external verifiers (Marabou, alpha-beta-CROWN, nnenum, ...), and read back by
:mod:`phalanx.verification.interchange` (``phalanx verify vnnlib``).

The composite network (Amir et al. appendices A/B) takes one input ``X`` of the members' input
shape and outputs the concatenated logits ``Y`` (mutual-error / majority queries) or their mean
(mean-logits ensemble). The VNN-LIB file declares ``X_i`` and ``Y_j``, the input box, and the
*violation* as ``assert`` clauses in disjunctive normal form, so ``sat`` means a counterexample.
Members are also exported one by one, and a query of several members also in the relational
form of VNN-LIB 2.0 (``<name>.v2.vnnlib``: one network declaration per member file, inputs tied
to one shared input). Numbers are written as the shortest decimal that reads back to the same
float64. Strict ``>`` is not part of VNN-LIB; like VNN-COMP's
robustness properties we write ``(>= Y_r Y_l)`` (ties count as violations, a superset).
"""

from __future__ import annotations

import copy
import itertools
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from phalanx.errors import PhalanxError
from phalanx.verification.query import Query, QueryKind
from phalanx.verification.vnnlib import vnn_number


class Composite(nn.Module):
    """The members side by side on one input: concatenated logits or their mean."""

    def __init__(self, members: list[nn.Module], mean: bool) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.mean = mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [m(x) for m in self.members]
        if self.mean:
            return torch.stack(outs).mean(0)
        return torch.cat(outs, dim=-1)


def _onnx(model: nn.Module, in_shape: tuple[int, ...], path: Path) -> Path:
    model = model.eval()
    dummy = torch.zeros(1, *in_shape)
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated but needs no onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (dummy,), str(path), input_names=["X"], output_names=["Y"], dynamo=False,
                          opset_version=13)
    return path


def _groups(query: Query) -> list[list[tuple[int, int]]]:
    """Per group, the ``(r, l)`` output index pairs of its disjuncts ``Y_r >= Y_l``."""
    if query.kind is QueryKind.PROPERTY:
        raise PhalanxError("a property query (read from VNN-LIB) has no label to export; accepted: mutual-error, "
                           "mean-logits or majority queries (the VNN-LIB file itself is the property)")
    k, lab = query.num_classes, query.label
    if query.kind is QueryKind.MEAN_LOGITS:
        return [[(r, lab) for r in range(k) if r != lab]]
    groups = []
    for m in range(len(query.nets)):
        labels = [query.runner_up[m]] if query.runner_up is not None else [r for r in range(k) if r != lab]
        groups.append([(m * k + r, m * k + lab) for r in labels])
    return groups


def _property_lines(query: Query, y: Callable[[int], str]) -> list[str]:
    """The violation as assertions over output variables named by ``y``."""
    groups = _groups(query)
    if query.required == len(groups):  # one assert per group: a conjunction of disjunctions
        return ["(assert (or " + " ".join(f"(and (>= {y(r)} {y(t)}))" for r, t in g) + "))" for g in groups]
    terms = []  # at least `required` groups: expand into one disjunction of conjunctions
    for subset in itertools.combinations(range(len(groups)), query.required):
        for choice in itertools.product(*[groups[i] for i in subset]):
            terms.append("(and " + " ".join(f"(>= {y(r)} {y(t)})" for r, t in choice) + ")")
    if len(terms) > 100_000:
        raise PhalanxError(f"the majority property expands into {len(terms)} disjuncts; too large for VNN-LIB")
    return ["(assert (or " + " ".join(terms) + "))"]


def _header(query: Query) -> list[str]:
    return [f"; phalanx {query.kind.value} query: eps={query.eps!r} label={query.label} members={len(query.nets)} "
            f"quorum={query.required}", "; sat = a counterexample exists"]


def vnnlib_text(query: Query) -> str:
    """The query's violation property in VNN-LIB 1.0 syntax (on the composite network)."""
    lo, hi = query.box()
    k = query.num_classes
    n_out = k if query.kind is QueryKind.MEAN_LOGITS else k * len(query.nets)
    lines = _header(query)
    lines += [f"(declare-const X_{i} Real)" for i in range(lo.size)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(n_out)]
    for i, (a, b) in enumerate(zip(lo, hi, strict=True)):
        lines.append(f"(assert (>= X_{i} {vnn_number(a)}))")
        lines.append(f"(assert (<= X_{i} {vnn_number(b)}))")
    lines += _property_lines(query, lambda j: f"Y_{j}")
    return "\n".join(lines) + "\n"


def vnnlib2_text(query: Query) -> str:
    """The relational (multi-network) form of VNN-LIB 2.0: one ``declare-network`` per member,
    member ``m`` reading ``X{m}`` (tied to ``X0`` element by element: one shared input) and
    writing ``Y{m}``; the same violation as :func:`vnnlib_text` over the members' outputs."""
    if query.kind is QueryKind.MEAN_LOGITS or len(query.nets) < 2:
        raise PhalanxError("the relational VNN-LIB 2.0 form needs a mutual-error or majority query of 2+ members")
    lo, hi = query.box()
    shape = (1, *query.nets[0].in_shape)
    k = query.num_classes

    def x(m: int, i: int) -> str:
        idx = (0, *(int(v) for v in np.unravel_index(i, shape[1:])))
        return f"X{m}[{','.join(str(v) for v in idx)}]"

    lines = [*_header(query), "(vnnlib-version <2.0>)"]
    dims = ",".join(str(d) for d in shape)
    for m in range(len(query.nets)):
        lines += [f"(declare-network member{m}", f"    (declare-input X{m} Real [{dims}])",
                  f"    (declare-output Y{m} Real [1,{k}])", ")"]
    for i, (a, b) in enumerate(zip(lo, hi, strict=True)):
        lines.append(f"(assert (>= {x(0, i)} {vnn_number(a)}))")
        lines.append(f"(assert (<= {x(0, i)} {vnn_number(b)}))")
    for m in range(1, len(query.nets)):
        lines += [f"(assert (== {x(m, i)} {x(0, i)}))" for i in range(lo.size)]
    lines += _property_lines(query, lambda j: f"Y{j // k}[0,{j % k}]")
    return "\n".join(lines) + "\n"


def export_query(query: Query, out_dir: str | Path, *, name: str = "query") -> dict[str, Any]:
    """Write ``<name>.onnx`` (composite), ``<name>.member<i>.onnx``, ``<name>.vnnlib`` and a JSON
    description into ``out_dir``; returns the paths."""
    try:
        import onnx  # noqa: F401  (torch.onnx.export writes through it)
    except ImportError:
        raise PhalanxError("exporting ONNX needs the onnx package: pip install 'phalanx[marabou]'") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = query.nets[0].in_shape
    members = [copy.deepcopy(m).float().eval() for m in query.models]
    comp = Composite(members, mean=query.kind is QueryKind.MEAN_LOGITS)
    paths: dict[str, Any] = {"network": str(_onnx(comp, shape, out / f"{name}.onnx"))}
    paths["members"] = [str(_onnx(m, shape, out / f"{name}.member{i}.onnx")) for i, m in enumerate(members)]
    (out / f"{name}.vnnlib").write_text(vnnlib_text(query))
    paths["property"] = str(out / f"{name}.vnnlib")
    if query.kind is not QueryKind.MEAN_LOGITS and len(query.nets) > 1:
        (out / f"{name}.v2.vnnlib").write_text(vnnlib2_text(query))
        paths["relational_property"] = str(out / f"{name}.v2.vnnlib")
    meta = {**query.describe(), "x0": np.asarray(query.x0).tolist(), "in_shape": list(shape), **paths}
    (out / f"{name}.json").write_text(json.dumps(meta, indent=1))
    paths["description"] = str(out / f"{name}.json")
    return paths
