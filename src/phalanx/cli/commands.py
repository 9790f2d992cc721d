"""Core subcommands: train, demo, info (evaluate and attack live in cli/attack.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from phalanx.cli.common import (
    SEED,
    config_options,
    device_option,
    out_option,
    parse_eps_list,
    progress_option,
    run_dir_for,
    shortcut,
)
from phalanx.config import checkpoint_sections, load_config
from phalanx.errors import PhalanxError


@click.command()
@config_options
@click.option("--dataset", default=None, help="Dataset name (see `phalanx info`); default digits.")
@click.option("--data-dir", default=None, help="Folder with dataset files (or $PHALANX_DATA_DIR).")
@click.option("--limit", type=int, default=None, help="Use at most N examples per split.")
@click.option("--model", default=None, help="Member architecture (see `phalanx info`).")
@click.option("--members", type=int, default=None, help="Number of members.")
@click.option("--method", default=None, help="Training method (see `phalanx info`).")
@click.option("--epochs", type=int, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--seed", type=SEED, default=None)
@click.option("--eps", default=None, help="Comma-separated eps list for the final PGD evaluation.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), default=None,
              help="Continue a killed run from its last checkpoint.")
@click.option("--init", "init_path", type=click.Path(dir_okay=False), default=None,
              help="Start from a trained ensemble checkpoint (e.g. DVERGE or iGAT fine-tuning of a baseline).")
@click.option("--nproc", type=int, default=1, show_default=True,
              help="Data-parallel processes on this machine (torch.distributed: one GPU each with NCCL, or gloo on "
                   "CPU). Across machines launch with torchrun instead.")
@device_option
@out_option
@progress_option
def train(config_path: str | None, overrides: tuple[str, ...], dataset: str | None, data_dir: str | None,
          limit: int | None, model: str | None, members: int | None, method: str | None, epochs: int | None,
          batch_size: int | None, lr: float | None, seed: int | None, eps: str | None, resume_dir: str | None,
          init_path: str | None, nproc: int, device: str | None, out: str | None, overwrite: bool,
          progress: bool) -> None:
    """Train an ensemble; writes a run folder with checkpoints, metrics, results and a report."""
    from phalanx.training import distributed as ddp

    tree: dict[str, dict[str, Any]] = {}
    if resume_dir is not None:
        saved = Path(resume_dir) / "config.json"
        if not saved.is_file():
            raise PhalanxError(f"cannot resume: {saved} does not exist")
        try:
            loaded: Any = json.loads(saved.read_text())
        except ValueError:
            loaded = None
        if not isinstance(loaded, dict) or not all(isinstance(v, dict) for v in loaded.values()):
            raise PhalanxError(f"cannot resume: {saved} is not a phalanx run config (damaged?)")
        tree = loaded
    for sec, key, val in [("data", "dataset", dataset), ("data", "data_dir", data_dir), ("data", "limit", limit),
                          ("model", "name", model), ("model", "members", members), ("method", "name", method),
                          ("train", "epochs", epochs), ("train", "batch_size", batch_size), ("train", "lr", lr),
                          ("train", "seed", seed), ("train", "device", device),
                          ("eval", "eps", parse_eps_list(eps))]:
        shortcut(tree, sec, key, val)
    if init_path is not None:
        from phalanx.ensembles import checkpoint_info

        # the checkpoint decides the architecture; record it in the resolved config
        tree.setdefault("model", {}).update(checkpoint_sections(checkpoint_info(init_path), method=False)["model"])
        tree["model"]["init"] = str(init_path)
    cfg = load_config(config_path, overrides, base=tree)
    if resume_dir is not None and out is not None and Path(out).resolve() != Path(resume_dir).resolve():
        raise PhalanxError(f"--resume {resume_dir} continues that folder; --out {out} names another")
    if resume_dir is not None and overwrite:
        raise PhalanxError("--resume continues a run and --overwrite replaces it; give one")
    if nproc < 1:
        raise PhalanxError(f"--nproc must be >= 1, got {nproc}")
    rank = ddp.init_from_env(cfg.train.device)  # launched by torchrun
    if rank is not None and nproc > 1:
        raise PhalanxError("--nproc starts its own processes; under torchrun leave it out")
    run_dir: Path | None = None
    if rank is None or rank.main:  # the one process that owns (locks) the run folder
        run_dir = run_dir_for(resume_dir if resume_dir is not None else out, "train", overwrite=overwrite,
                              reuse="resume" if resume_dir is not None else "new")
    run_dir = ddp.broadcast_object(run_dir) if rank is not None else run_dir
    assert run_dir is not None
    if nproc > 1:
        ddp.run_local(nproc, train_job, (cfg, run_dir, resume_dir is not None, progress), device=cfg.train.device)
    else:
        train_job(cfg, run_dir, resume_dir is not None, progress)


def train_job(cfg: Any, run_dir: Path, resume: bool, progress: bool) -> None:
    """Train, then (on rank 0 of a distributed run) evaluate and report."""
    from phalanx.training import distributed as ddp
    from phalanx.workflows.experiment import evaluate_ensemble, train_run, write_train_report

    ens, fit_result, data = train_run(cfg, run_dir, resume=resume, progress=progress)
    if not ddp.is_main():
        return
    ev = evaluate_ensemble(ens, data, cfg.eval, seed=cfg.train.seed, progress=progress)
    report = write_train_report(run_dir, cfg, fit_result, ev)
    world = ddp.current()
    click.echo(f"clean accuracy {ev['clean']['accuracy']:.4f}; run folder {run_dir}; report {report}"
               + (f"; trained on {world.world} ranks" if world else ""))


@click.command()
@out_option
@progress_option
@click.option("--quick", is_flag=True, help="Fewer epochs and examples (for smoke tests).")
def demo(out: str | None, overwrite: bool, progress: bool, quick: bool) -> None:
    """Train and evaluate a 3-member ensemble on the embedded digits data; write a report."""
    from phalanx.demo import run_demo

    run_dir = run_dir_for(out, "demo", overwrite=overwrite)
    overrides = {"train": {"epochs": 2}, "eval": {"limit": 60, "steps": 5}} if quick else None
    ctx = run_demo(run_dir, progress=progress, overrides=overrides)
    click.echo(f"demo finished in {ctx.timings['total']:.0f} s; report {run_dir / 'report.md'}")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(as_json: bool) -> None:
    """List datasets, models, training methods and attacks."""
    from phalanx.attacks import ATTACKS
    from phalanx.data import DATASETS
    from phalanx.models import MODELS
    from phalanx.training import METHODS

    regs: dict[str, Any] = {"datasets": DATASETS, "models": MODELS, "methods": METHODS, "attacks": ATTACKS}
    try:
        from phalanx.verification import BACKENDS

        regs["verification backends"] = BACKENDS
    except ImportError:
        pass
    if as_json:
        click.echo(json.dumps({k: r.describe() for k, r in regs.items()}, indent=2))
        return
    for title, reg in regs.items():
        click.echo(f"{title}:")
        for name, doc in reg.describe().items():
            click.echo(f"  {name:<16} {doc}")


def register(group: click.Group) -> None:
    for cmd in (train, demo, info):  # `evaluate` lives in phalanx.cli.attack (all protocols)
        group.add_command(cmd)
