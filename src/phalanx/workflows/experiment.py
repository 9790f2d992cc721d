"""Compositions of library calls used by the CLI and the demo: build an ensemble from a
config, train it into a run folder, evaluate it, and write results and a report."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from phalanx.attacks import create_attack
from phalanx.config import DataConfig, EvalConfig, RunConfig
from phalanx.data import DatasetSplits, load_dataset
from phalanx.ensembles import Ensemble, load_ensemble
from phalanx.ensembles.build import build_ensemble
from phalanx.errors import PhalanxError
from phalanx.evaluation import evaluate_clean, robust_accuracy_curve
from phalanx.reports import curves_table, pct, plot_accuracy_curves, plot_training_history, table
from phalanx.runs import environment, write_json, write_results
from phalanx.training import FitResult, create_method, fit, resolve_device
from phalanx.training.distributed import is_main
from phalanx.training.loop import Callback

log = logging.getLogger(__name__)


def load_data(cfg: DataConfig) -> DatasetSplits:
    return load_dataset(cfg.dataset, data_dir=cfg.data_dir, seed=cfg.seed, limit=cfg.limit)


def train_run(cfg: RunConfig, run_dir: Path, *, resume: bool = False, progress: bool = True,
              init: Ensemble | None = None, data: DatasetSplits | None = None,
              callback: Callback | None = None) -> tuple[Ensemble, FitResult, DatasetSplits]:
    """Train per ``cfg`` into ``run_dir`` (config.json, environment.json, checkpoints, metrics);
    ``callback`` is passed to :func:`~phalanx.training.fit` (e.g. evaluations at chosen epochs)."""
    data = data if data is not None else load_data(cfg.data)
    resolved = cfg.to_dict()
    if resume:
        saved = run_dir / "config.json"
        if not saved.is_file():
            raise PhalanxError(f"cannot resume: {saved} does not exist")
        prev = json.loads(saved.read_text())
        for sec in ("data", "model", "method"):
            if prev.get(sec) != resolved[sec]:
                raise PhalanxError(f"cannot resume {run_dir}: [{sec}] differs from the saved config "
                                   f"({prev.get(sec)} vs {resolved[sec]})")
    if is_main():  # in a distributed run, rank 0 alone writes
        write_json(run_dir / "config.json", resolved)
        write_json(run_dir / "environment.json", environment(cfg.train.seed, str(resolve_device(cfg.train.device))))
    if init is None and cfg.model.init is not None:
        from phalanx.ensembles import Combiner

        init = load_ensemble(cfg.model.init)
        init.combiner = Combiner.parse(cfg.model.combiner)
        if len(init) != cfg.model.members:
            raise PhalanxError(f"model.init {cfg.model.init} has {len(init)} members, model.members is {cfg.model.members}")
    ensemble = init if init is not None else build_ensemble(cfg.model, data, seed=cfg.train.seed)
    if tuple(ensemble.in_shape) != tuple(data.in_shape) or ensemble.num_classes != data.num_classes:
        raise PhalanxError(f"ensemble expects inputs {ensemble.in_shape} with {ensemble.num_classes} classes; "
                           f"dataset {data.name!r} has {data.in_shape} with {data.num_classes}")
    method = create_method(cfg.method.name, **cfg.method.options)
    result = fit(ensemble, method, data, cfg.train, run_dir=run_dir, resume=resume, progress=progress,
                 callback=callback)
    return ensemble, result, data


def evaluate_ensemble(ensemble: Ensemble, data: DatasetSplits, cfg: EvalConfig, *, seed: int = 0,
                      progress: bool = True, split: str = "test") -> dict[str, Any]:
    """Clean metrics and an accuracy-vs-eps curve of the whole ensemble under ``cfg.attack``."""
    ensemble.eval()
    part = data.split(split).subset(cfg.limit)
    clean = evaluate_clean(ensemble, part, cfg.batch_size)
    params: dict[str, Any] = {}
    if cfg.attack in ("pgd", "bim", "mim"):
        params["steps"] = cfg.steps
    if cfg.attack == "pgd":
        params["restarts"] = cfg.restarts
    attack = create_attack(cfg.attack, **params)
    gen = torch.Generator().manual_seed(seed)
    curve = robust_accuracy_curve(ensemble, part, cfg.eps, attack=attack, batch_size=cfg.batch_size,
                                  generator=gen, progress=progress)
    return {"split": split, "n": len(part), "clean": clean,
            "attack": {"name": cfg.attack, **params},
            "curve": [p.to_dict() for p in curve]}


def write_train_report(run_dir: Path, cfg: RunConfig, fit_result: FitResult | None,
                       evaluation: dict[str, Any], title: str = "phalanx training run") -> Path:
    """results.json, plots and report.md for a train (or evaluate) run."""
    curves = {f"ensemble ({evaluation['attack']['name']})": evaluation["curve"]}
    plot_accuracy_curves(curves, run_dir / "robust_accuracy.png")
    payload: dict[str, Any] = {"config": cfg.to_dict(), "evaluation": evaluation}
    if fit_result is not None:
        payload["history"] = fit_result.history
        if fit_result.history:
            plot_training_history(fit_result.history, run_dir / "training.png")
    write_results(run_dir, "train" if fit_result is not None else "evaluate", payload)
    clean = evaluation["clean"]
    lines = [f"# {title}", "",
             f"Dataset `{cfg.data.dataset}`, {cfg.model.members} x `{cfg.model.name}`, combiner "
             f"`{cfg.model.combiner}`, method `{cfg.method.name}`.", "",
             "## Clean accuracy", "",
             table(["model", "accuracy"], [["ensemble", pct(clean["accuracy"])]] +
                   [[f"member {i}", pct(a)] for i, a in enumerate(clean["member_accuracy"])]),
             "", f"All members agree on {pct(clean['agreement'])} of {clean['n']} {evaluation['split']} examples.", "",
             f"## Robust accuracy ({evaluation['attack']})", "", curves_table(curves), "",
             "![robust accuracy](robust_accuracy.png)", ""]
    if fit_result is not None and fit_result.history:
        lines += ["## Training", "", "![training](training.png)", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def load_for_eval(path: str | Path, device: str = "auto") -> Ensemble:
    return load_ensemble(path, map_location=resolve_device(device))
