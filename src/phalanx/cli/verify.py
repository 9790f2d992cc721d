"""Verification subcommands: ``verify pairs``, ``verify ensemble``, ``verify vnnlib``, ``verify instances``,
``select``, ``export-vnnlib``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from phalanx.cli.common import SEED, out_option, parse_eps_list, progress_option, run_dir_for
from phalanx.errors import PhalanxError


def _members(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise PhalanxError(f"--members expects comma-separated indices, got {text!r}") from None


def _common(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--eps", default="0.01,0.02,0.03", show_default=True, help="Comma-separated L-inf radii."),
        click.option("--points", type=int, default=20, show_default=True, help="Number of points."),
        click.option("--backend", default="portfolio", show_default=True,
                     help="Verifier: portfolio, milp, marabou, smt, bounds, attack (see `phalanx info`)."),
        click.option("--complete", default=None, help="Complete backend inside the portfolio (default milp)."),
        click.option("--timeout", "time_limit", type=float, default=60.0, show_default=True,
                     help="Time limit per query in seconds."),
        click.option("--workers", type=int, default=1, show_default=True,
                     help="Queries solved at once (worker processes; with --engine ray, tasks in flight)."),
        click.option("--engine", default="local", show_default=True,
                     help="Where queries run: local (process pool with hard timeouts), ray, serial (in-process)."),
        click.option("--address", default=None,
                     help="--engine ray: 'auto' or HOST:PORT of a running cluster (default: a local Ray instance)."),
        click.option("--members", default=None, help="Comma-separated member indices (default all)."),
        click.option("--data-dir", default=None, help="Folder with dataset files."),
        click.option("--seed", type=SEED, default=0, show_default=True),
        click.option("--retry-undecided", is_flag=True,
                     help="When resuming into an existing --out folder, solve stored TIMEOUT/ERROR queries again."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _config(eps: str, points: int, backend: str, complete: str | None, time_limit: float, workers: int,
            engine: str, address: str | None, members: str | None, data_dir: str | None, seed: int,
            retry_undecided: bool = False, **kw: Any) -> Any:
    from phalanx.workflows.verify import VerifyConfig

    opts: dict[str, Any] = {}
    if complete is not None:
        if backend != "portfolio":
            raise PhalanxError("--complete only applies to --backend portfolio")
        opts["complete"] = complete
    if address is not None and engine != "ray":
        raise PhalanxError(f"--address only applies to --engine ray, not {engine!r}")
    return VerifyConfig(eps=tuple(parse_eps_list(eps) or []), points=points, backend=backend, backend_options=opts,
                        time_limit_s=time_limit, workers=workers, engine=engine,
                        engine_options={"address": address} if address is not None else {},
                        members=_members(members), data_dir=data_dir,
                        seed=seed, retry_undecided=retry_undecided, **kw)


@click.group()
def verify() -> None:
    """Formally verify ensembles: mutual errors of members, robustness of the whole ensemble."""


@verify.command("pairs")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@_common
@click.option("--label", type=int, default=None, help="Only agreement points of this label.")
@click.option("--subset-size", type=int, default=2, show_default=True, help="Members per mutual-error query.")
@click.option("--runner-up", is_flag=True, help="Paper's runner-up simplification (fast, can only report SAT).")
@click.option("--split", type=click.Choice(["val", "test"]), default="val", show_default=True)
@out_option
@progress_option
def pairs(checkpoint: str, label: int | None, subset_size: int, runner_up: bool, split: str, out: str | None,
          overwrite: bool, progress: bool, **kw: Any) -> None:
    """Mutual-error queries and uniqueness scores of a checkpoint's members (resumable with --out)."""
    from phalanx.workflows.verify import verify_pairs

    cfg = _config(label=label, subset_size=subset_size, runner_up=runner_up, split=split, **kw)
    run_dir = run_dir_for(out, "verify-pairs", overwrite=overwrite, reuse="continue")
    res = verify_pairs(checkpoint, run_dir, cfg, progress=progress)
    click.echo(f"{res['summary']['queries']} queries {res['summary']['verdicts']}; report {run_dir / 'report.md'}")


@verify.command("ensemble")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@_common
@click.option("--combiner", type=click.Choice(["mean-logits", "majority", "mean-prob", "max-prob"]), default=None,
              help="Combination rule to verify (default: the checkpoint's; only mean-logits and majority encode).")
@out_option
@progress_option
def ensemble(checkpoint: str, combiner: str | None, out: str | None, overwrite: bool, progress: bool,
             **kw: Any) -> None:
    """Verified robust accuracy of the whole ensemble on random test points (PGD alongside)."""
    from phalanx.workflows.verify import verify_ensemble

    cfg = _config(**kw)
    run_dir = run_dir_for(out, "verify-ensemble", overwrite=overwrite, reuse="continue")
    res = verify_ensemble(checkpoint, run_dir, cfg, combiner=combiner, progress=progress)
    rows = res["robustness"]["rows"]
    click.echo("; ".join(f"eps {r['eps']:g}: verified {r['verified_robust_accuracy']:.3f} "
                         f"PGD {r['pgd_robust_accuracy']:.3f}" for r in rows) + f"; report {run_dir / 'report.md'}")


@click.command("select")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@_common
@click.option("-k", "--k", "k", type=int, required=True, help="Ensemble size to select.")
@click.option("--label", type=int, default=None, help="Only agreement points of this label.")
@click.option("--initial", default=None, help="Comma-separated initial members (default 0..k-1).")
@click.option("--max-iters", type=int, default=10, show_default=True)
@click.option("--time-budget", type=float, default=None, help="Stop after this many seconds.")
@click.option("--validate", "validate_points", type=int, default=0, show_default=True,
              help="Random test points for verified robust accuracy before/after.")
@out_option
@progress_option
def select(checkpoint: str, k: int, label: int | None, initial: str | None, max_iters: int,
           time_budget: float | None, validate_points: int, out: str | None, overwrite: bool, progress: bool,
           **kw: Any) -> None:
    """Verification-aided member selection (Amir et al. 2022, section III-C) from n > k candidates."""
    from phalanx.workflows.verify import select as run_select

    cfg = _config(label=label, **kw)
    run_dir = run_dir_for(out, "select", overwrite=overwrite, reuse="continue")
    res = run_select(checkpoint, run_dir, cfg, k=k, max_iters=max_iters, time_budget_s=time_budget,
                     initial=_members(initial), validate_points=validate_points, progress=progress)
    sel = res["selection"]
    click.echo(f"selected members {sel['final']} (from {sel['initial']}, {sel['stop_reason']}); "
               f"checkpoint {run_dir / 'selected.pt'}; report {run_dir / 'report.md'}")


@click.command("export-vnnlib")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--eps", default="0.02", show_default=True, help="Comma-separated radii (one query each).")
@click.option("--index", type=int, default=0, show_default=True, help="Which agreement point.")
@click.option("--members", default=None, help="Comma-separated member indices (default all).")
@click.option("--kind", type=click.Choice(["mutual-error", "mean-logits", "majority"]), default="mutual-error",
              show_default=True)
@click.option("--runner-up", is_flag=True, help="Only each member's runner-up label (SAT-only form).")
@click.option("--data-dir", default=None)
@out_option
def export_vnnlib(checkpoint: str, eps: str, index: int, members: str | None, kind: str, runner_up: bool,
                  data_dir: str | None, out: str | None, overwrite: bool) -> None:
    """Export a query as ONNX networks plus a VNN-LIB property for external verifiers."""
    from phalanx.workflows.verify import VerifyConfig
    from phalanx.workflows.verify import export_vnnlib as run_export

    cfg = VerifyConfig(eps=tuple(parse_eps_list(eps) or []), points=index + 1, members=_members(members),
                       runner_up=runner_up, data_dir=data_dir)
    run_dir = run_dir_for(out, "export-vnnlib", overwrite=overwrite)
    res = run_export(checkpoint, run_dir, cfg, index=index, kind=kind)
    click.echo(f"wrote {len(res['exports'])} queries to {run_dir}")


def _backend_options(backend: str, complete: str | None) -> dict[str, Any]:
    if complete is None:
        return {}
    if backend != "portfolio":
        raise PhalanxError("--complete only applies to --backend portfolio")
    return {"complete": complete}


@verify.command("vnnlib")
@click.argument("network")
@click.argument("prop", metavar="PROPERTY")
@click.option("--timeout", "time_limit", type=float, default=300.0, show_default=True,
              help="Time limit in seconds (loading included).")
@click.option("--backend", default="portfolio", show_default=True, help="Verifier (see `phalanx info`).")
@click.option("--complete", default=None, help="Complete backend inside the portfolio (default milp).")
@click.option("--result-file", default=None, type=click.Path(dir_okay=False),
              help="VNN-COMP result file (default <out>/result.txt).")
@out_option
def vnnlib_cmd(network: str, prop: str, time_limit: float, backend: str, complete: str | None,
               result_file: str | None, out: str | None, overwrite: bool) -> None:
    """Decide a VNN-COMP instance: NETWORK.onnx[.gz] (comma-separated for a multi-network
    VNN-LIB 2.0 property) and PROPERTY.vnnlib[.gz]; writes the result the VNN-COMP way."""
    from pathlib import Path

    from phalanx.runs import write_results
    from phalanx.verification.interchange import verify_instance

    opts = _backend_options(backend, complete)
    run_dir = run_dir_for(out, "verify-vnnlib", overwrite=overwrite)
    res = verify_instance([n for n in network.split(",") if n], prop, timeout_s=time_limit, verifier=backend,
                          options=opts)
    target = Path(result_file) if result_file else run_dir / "result.txt"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(res.vnncomp_text())
    write_results(run_dir, "verify-vnnlib", {"network": network, "property": prop, "timeout_s": time_limit,
                                             "backend": backend, **res.to_json()})
    click.echo(f"{res.result} in {res.seconds:.2f} s ({res.stage or '-'}): {res.message}; result file {target}")


@verify.command("instances")
@click.argument("instances_csv", metavar="INSTANCES.csv", type=click.Path(dir_okay=False))
@click.option("--timeout-scale", type=float, default=1.0, show_default=True,
              help="Multiply every instance's timeout by this factor.")
@click.option("--backend", default="portfolio", show_default=True, help="Verifier (see `phalanx info`).")
@click.option("--complete", default=None, help="Complete backend inside the portfolio (default milp).")
@out_option
@progress_option
def instances_cmd(instances_csv: str, timeout_scale: float, backend: str, complete: str | None, out: str | None,
                  overwrite: bool, progress: bool) -> None:
    """Run every instance of a VNN-COMP instances.csv (onnx,vnnlib,timeout); one result file per
    instance, results.json and a summary table (summary.md)."""
    from tqdm import tqdm

    from phalanx.runs import write_results
    from phalanx.verification.interchange import read_instances, run_instances, summary_markdown

    if not timeout_scale > 0:
        raise PhalanxError(f"--timeout-scale must be > 0, got {timeout_scale!r}")
    insts = read_instances(instances_csv)
    opts = _backend_options(backend, complete)
    run_dir = run_dir_for(out, "verify-instances", overwrite=overwrite)
    bar = tqdm(total=len(insts), disable=not progress, unit="instance")
    rows = run_instances(insts, run_dir, verifier=backend, options=opts, timeout_scale=timeout_scale,
                         on_result=lambda _i, _r: bar.update(1))
    bar.close()
    table = summary_markdown(rows)
    (run_dir / "summary.md").write_text(table)
    write_results(run_dir, "verify-instances", {"instances": rows, "backend": backend, "timeout_scale": timeout_scale})
    click.echo(table.splitlines()[-1] + f"; results {run_dir}")


def register(group: click.Group) -> None:
    group.add_command(verify)
    group.add_command(select)
    group.add_command(export_vnnlib)
