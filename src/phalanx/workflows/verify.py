"""End-to-end verification workflows behind the CLI: pairwise scores, ensemble robustness,
selection and export. Each reads a checkpoint and a dataset, writes JSON results, a resumable
query store (``queries.jsonl``) and a Markdown report into a run folder."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from phalanx.errors import PhalanxError
from phalanx.reports import scope_line
from phalanx.verification.report import (
    plot_counterexamples,
    robust_markdown,
    summary_markdown,
    verdict_summary,
)
from phalanx.verification.runner import Candidates, ResultStore, query_engine, run_queries
from phalanx.verification.scores import ScoreTable, agreement_points, pair_specs
from phalanx.verification.selection import (
    SelectionConfig,
    attack_comparison,
    select_members,
    verified_robust_accuracy,
)

log = logging.getLogger(__name__)


def tqdm_progress(desc: str, enabled: bool = True) -> Any:
    """A ``progress(iterator, total)`` callback showing a tqdm bar (CLI only)."""
    if not enabled:
        return None

    def wrap(it: Iterator[Any], total: int) -> Iterator[Any]:
        from tqdm.auto import tqdm

        return iter(tqdm(it, total=total, desc=desc, unit="query", leave=False))

    return wrap


@dataclass
class VerifyConfig:
    eps: tuple[float, ...] = (0.01, 0.02, 0.03)
    points: int = 20
    label: int | None = None
    members: tuple[int, ...] | None = None
    subset_size: int = 2
    backend: str = "portfolio"
    backend_options: dict[str, Any] = field(default_factory=dict)
    time_limit_s: float = 60.0
    workers: int = 1
    engine: str = "local"  # where queries run: local, ray, serial (phalanx.engines)
    engine_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"address": "auto"} for ray
    runner_up: bool = False
    split: str = "val"
    data_dir: str | None = None
    seed: int = 0
    retry_undecided: bool = False  # on resume, solve stored TIMEOUT/ERROR queries again

    def __post_init__(self) -> None:
        from phalanx.types import check_eps, check_fields

        check_fields(self, "verify")
        self.eps = tuple(check_eps(e) for e in self.eps)
        if not self.eps:
            raise PhalanxError("verification needs at least one eps")
        if self.points < 1:
            raise PhalanxError(f"points must be >= 1, got {self.points}")
        if self.split not in ("val", "test"):
            raise PhalanxError(f"split {self.split!r} unknown; accepted: val, test")
        from phalanx.verification import BACKENDS

        BACKENDS.get(self.backend)
        if self.time_limit_s <= 0:
            raise PhalanxError(f"time limit must be > 0 s, got {self.time_limit_s}")
        if self.workers < 1:
            raise PhalanxError(f"workers must be >= 1, got {self.workers}")
        from phalanx.engines import ENGINES

        ENGINES.get(self.engine)

    def open_engine(self) -> Any:
        """The engine the queries of one command run on (a context manager)."""
        return query_engine(self.engine, self.workers, **self.engine_options)


def _store(cfg: VerifyConfig, path: Path) -> ResultStore:
    return ResultStore(path, retry_undecided=cfg.retry_undecided)


def load_candidates(checkpoint: str | Path, data_dir: str | None = None) -> tuple[Any, Candidates, Any]:
    """The checkpoint's ensemble, its members as candidates, and its dataset."""
    from phalanx.data import load_dataset
    from phalanx.ensembles import checkpoint_info, load_ensemble

    info = checkpoint_info(checkpoint)
    ens = load_ensemble(checkpoint)
    data = load_dataset(info.get("dataset") or "digits", data_dir=data_dir, seed=0)
    return ens, Candidates.from_models(list(ens.members)), data


def _members(cfg: VerifyConfig, n: int) -> tuple[int, ...]:
    mem = tuple(cfg.members) if cfg.members is not None else tuple(range(n))
    if len(set(mem)) != len(mem) or any(not 0 <= i < n for i in mem):
        raise PhalanxError(f"members {list(mem)} must be distinct indices in 0..{n - 1}")
    return mem


def _agreement(cands: Candidates, data: Any, cfg: VerifyConfig) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    split = getattr(data, cfg.split)
    idx = agreement_points(cands.models, split.x, split.y, count=cfg.points, label=cfg.label)
    if len(idx) == 0:
        raise PhalanxError("no agreement points (correct for every candidate) in the chosen split/label")
    x, y = split.x[idx], split.y[idx]
    return x, y, x.reshape(len(x), -1).double().numpy()


def verify_pairs(checkpoint: str | Path, run_dir: Path, cfg: VerifyConfig, *, progress: bool = False) -> dict[str, Any]:
    """Mutual-error queries for every subset of the chosen members on agreement points; scores
    (Defs. 3, 4), the G.A. comparison (table III analogue) and a report."""
    from phalanx.runs import write_json

    with cfg.open_engine() as eng:  # first: its workers start while the candidates and points are prepared
        _, cands, data = load_candidates(checkpoint, cfg.data_dir)
        mem = _members(cfg, len(cands))
        _, y, pts = _agreement(cands, data, cfg)
        specs = pair_specs(mem, len(pts), cfg.eps, y.tolist(), subset_size=cfg.subset_size, runner_up=cfg.runner_up)
        store = _store(cfg, run_dir / "queries.jsonl")
        recs = run_queries(cands, pts, specs, backend=cfg.backend, options=cfg.backend_options,
                           time_limit_s=cfg.time_limit_s, store=store, engine=eng,
                           progress=tqdm_progress("mutual-error queries", progress))
    table = ScoreTable.from_records(recs, mem, cfg.eps, len(pts)) if cfg.subset_size == 2 else None
    summary = verdict_summary(recs)
    comparison = attack_comparison(cands, recs, pts)
    out = {"config": asdict(cfg), "checkpoint": str(checkpoint), "agreement_points": len(pts),
           "summary": summary, "scores": table.to_json() if table else None, "attack_comparison": comparison}
    write_json(run_dir / "verify_pairs.json", out)
    lines = [f"# phalanx verify pairs: {checkpoint}", "", scope_line(data.name, len(pts), f"agreement points ({cfg.split} split)"), "",
             f"{len(pts)} agreement points ({cfg.split} split), eps {list(cfg.eps)}, subsets of size "
             f"{cfg.subset_size} of members {list(mem)}, backend {cfg.backend}"
             f"{' (runner-up simplification: SAT only)' if cfg.runner_up else ''}.", "",
             summary_markdown(summary), ""]
    if table:
        lines += [table.markdown(), ""]
    lines += [_comparison_markdown(comparison), ""]
    img = plot_counterexamples(recs, pts, cands.nets[0].in_shape, run_dir / "counterexamples.png",
                               title="mutual errors: clean (top), perturbed (bottom) with member labels")
    if img:
        lines += [f"![counterexamples]({img.name})", ""]
    (run_dir / "report.md").write_text("\n".join(lines))
    return out


def _comparison_markdown(c: dict[str, Any]) -> str:
    from phalanx.reports import table

    cols = [*c["attack_sat"], "verification"]
    return ("SAT queries found by the joint gradient attacks vs verification (paper table III):\n\n"
            + table(cols, [[*c["attack_sat"].values(), c["verification_sat"]]])
            + f"\n\nAttack witnesses on queries proven UNSAT: {c['attack_sat_on_unsat']} (must be 0).")


def verify_ensemble(checkpoint: str | Path, run_dir: Path, cfg: VerifyConfig, *, combiner: str | None = None,
                    progress: bool = False) -> dict[str, Any]:
    """Verified robust accuracy of the (sub-)ensemble on random test points (appendix A)."""
    from phalanx.runs import write_json

    ens, cands, data = load_candidates(checkpoint, cfg.data_dir)
    mem = _members(cfg, len(cands))
    comb = combiner or ens.combiner.value
    gen = torch.Generator().manual_seed(cfg.seed)
    split = data.test
    idx = torch.randperm(len(split), generator=gen)[:cfg.points]
    with cfg.open_engine() as eng:
        val = verified_robust_accuracy(cands, mem, split.x[idx], split.y[idx], cfg.eps, combiner=comb,
                                       backend=cfg.backend, options=cfg.backend_options, time_limit_s=cfg.time_limit_s,
                                       store=_store(cfg, run_dir / "queries.jsonl"), engine=eng,
                                       progress=tqdm_progress("ensemble queries", progress), seed=cfg.seed)
    out = {"config": asdict(cfg), "checkpoint": str(checkpoint), "robustness": val}
    write_json(run_dir / "verify_ensemble.json", out)
    (run_dir / "report.md").write_text(f"# phalanx verify ensemble: {checkpoint}\n\n"
                                       f"{scope_line(data.name, len(idx), 'random test points')} Backend "
                                       f"{cfg.backend}.\n\n{robust_markdown(val)}\n")
    return out


def select(checkpoint: str | Path, run_dir: Path, cfg: VerifyConfig, *, k: int, max_iters: int = 10,
           time_budget_s: float | None = None, initial: Sequence[int] | None = None, validate_points: int = 0,
           combiner: str | None = None, progress: bool = False) -> dict[str, Any]:
    """The iterative selection of section III-C on a checkpoint of n > k candidates, with a
    report of every step, and (``validate_points > 0``) verified robust accuracy before/after.

    ``combiner`` is the rule validated (default: the checkpoint's when it can be encoded, else
    mean-logits, which the report states); ``selected.pt`` keeps the checkpoint's combiner unless
    ``combiner`` names another ensemble combiner."""
    from phalanx.ensembles import save_ensemble
    from phalanx.runs import write_json

    ens, cands, data = load_candidates(checkpoint, cfg.data_dir)
    _, y, pts = _agreement(cands, data, cfg)
    scfg = SelectionConfig(k=k, eps=tuple(cfg.eps), backend=cfg.backend, backend_options=cfg.backend_options,
                           time_limit_s=cfg.time_limit_s, workers=cfg.workers, engine=cfg.engine,
                           engine_options=cfg.engine_options, max_iters=max_iters,
                           time_budget_s=time_budget_s, initial=tuple(initial) if initial is not None else None)
    with cfg.open_engine() as eng:  # one engine (warm workers) for the selection and its validation
        store = _store(cfg, run_dir / "queries.jsonl")
        res = select_members(cands, pts, y.tolist(), scfg, store=store, progress=tqdm_progress("selection", progress),
                             engine=eng)
        out: dict[str, Any] = {"config": asdict(cfg), "k": k, "checkpoint": str(checkpoint),
                               "agreement_points": len(pts), "selection": res.to_json()}
        lines = [f"# phalanx select: {checkpoint}", "", scope_line(data.name, len(pts), "agreement points (val split)"),
                 "", f"{len(cands)} candidates, k = {k}, {len(pts)} agreement "
                 f"points, eps {list(cfg.eps)}, backend {cfg.backend}.", "", res.markdown(), "",
                 "Initial ensemble:", "", res.initial_table.markdown(), "", "Final ensemble:", "",
                 res.final_table.markdown(), ""]
        source = ens.combiner.value
        rule = combiner or "mean-logits"
        if validate_points > 0:
            if rule != source:
                lines += [f"Validation verifies the `{rule}` combination of the members; the checkpoint combines by "
                          f"`{source}`, which cannot be encoded exactly.", ""]
            gen = torch.Generator().manual_seed(cfg.seed)
            idx = torch.randperm(len(data.test), generator=gen)[:validate_points]
            vx, vy = data.test.x[idx], data.test.y[idx]
            vstore = _store(cfg, run_dir / "validation.jsonl")
            before, after = (verified_robust_accuracy(cands, members, vx, vy, cfg.eps, combiner=rule,
                                                      backend=cfg.backend, options=cfg.backend_options,
                                                      time_limit_s=cfg.time_limit_s, store=vstore, seed=cfg.seed,
                                                      engine=eng)
                             for members in (res.initial, res.final))
            out["validation"] = {"combiner": rule, "before": before, "after": after}
            lines += ["## Validation on random test points", "", robust_markdown(before), "", robust_markdown(after),
                      ""]
    from phalanx.ensembles import Ensemble

    keep = combiner if combiner is not None and combiner != "majority" else source
    chosen = Ensemble([ens.members[i] for i in res.final], keep)
    save_ensemble(chosen, run_dir / "selected.pt", dataset=data.name)
    write_json(run_dir / "selection.json", out)
    (run_dir / "report.md").write_text("\n".join(lines))
    return out


def export_vnnlib(checkpoint: str | Path, out_dir: Path, cfg: VerifyConfig, *, index: int = 0,
                  kind: str = "mutual-error") -> dict[str, Any]:
    """Export one query (agreement point ``index``, first eps) as ONNX + VNN-LIB."""
    from phalanx.verification.export import export_query
    from phalanx.verification.query import make_query

    _, cands, data = load_candidates(checkpoint, cfg.data_dir)
    mem = _members(cfg, len(cands))
    _, y, pts = _agreement(cands, data, cfg)
    if not 0 <= index < len(pts):
        raise PhalanxError(f"point index {index} out of range; accepted: 0..{len(pts) - 1}")
    paths = []
    for e in cfg.eps:
        q = make_query([cands.models[i] for i in mem], pts[index], e, int(y[index]), kind=kind,
                       nets=[cands.nets[i] for i in mem], runner_up=cfg.runner_up)
        paths.append(export_query(q, out_dir, name=f"{kind}_p{index}_eps{e:g}"))
    return {"exports": paths}
