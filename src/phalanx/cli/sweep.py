"""``phalanx sweep`` (run or resume a grid of training runs plus evaluations) and
``phalanx table`` (paper-style tables and plots from their results)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from phalanx.cli.common import progress_option
from phalanx.errors import PhalanxError


def _default_engine() -> str:
    from phalanx.engines import ENGINES

    return "local" if "local" in ENGINES.names() else "serial"


def _fmt_eta(s: float | None) -> str:
    if s is None:
        return "unknown (no finished cell yet)"
    h, rem = divmod(int(s), 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def _print_status(folder: Path) -> dict[str, Any]:
    from phalanx.workflows.sweep import sweep_status

    st = sweep_status(folder)
    c = st["counts"]
    click.echo(f"{folder}: {c['done']}/{st['total']} done, {c['running']} running, {c['pending']} pending, "
               f"{c['failed']} failed, {c['skipped']} skipped; ETA {_fmt_eta(st['eta_s'])}")
    for key, err in st["failed"].items():
        click.echo(f"  failed  {key}: {err}")
    for key, err in st["skipped"].items():
        click.echo(f"  skipped {key}: {err}")
    return st


@click.command()
@click.argument("spec", type=click.Path(exists=True))
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Sweep folder (default runs/<sweep name>); re-running the command resumes it.")
@click.option("--engine", default=None, help="serial, local (default when available) or ray.")
@click.option("--workers", type=int, default=1, show_default=True, help="Cells run at once.")
@click.option("--address", default=None, help="Ray cluster address (auto or HOST:PORT); --engine ray only.")
@click.option("--retry-failed", is_flag=True, help="Run failed cells (and those skipped because of them) again.")
@click.option("--rerun", multiple=True, metavar="CELL",
              help="Recompute this cell from scratch (repeatable), and the cells that start from it.")
@click.option("--status", "status_only", is_flag=True, help="Print the sweep folder's progress and ETA; run nothing.")
@click.option("--dry-run", is_flag=True, help="Validate the spec and list its cells; run nothing.")
@progress_option
def sweep(spec: str, out: str | None, engine: str | None, workers: int, address: str | None, retry_failed: bool,
          rerun: tuple[str, ...], status_only: bool, dry_run: bool, progress: bool) -> None:
    """Train and evaluate every cell of a sweep SPEC (TOML; see examples/sweeps/), or resume a
    sweep folder (SPEC may be the folder). Finished cells are never recomputed."""
    from phalanx.workflows.sweep import run_sweep
    from phalanx.workflows.sweep_spec import load_sweep_spec, parse_sweep_spec

    path = Path(spec)
    if path.is_dir():
        if status_only:
            _print_status(path)
            return
        saved = path / "spec.json"
        if not saved.is_file():
            raise PhalanxError(f"{path} is not a sweep folder (no spec.json); give a spec file")
        parsed = parse_sweep_spec(json.loads(saved.read_text())["spec"], name=path.name)
        folder = Path(out) if out is not None else path
    else:
        parsed = load_sweep_spec(path)
        folder = Path(out) if out is not None else Path("runs") / parsed.name
    if status_only:
        _print_status(folder)
        return
    cells = parsed.cells()
    if dry_run:
        click.echo(f"sweep {parsed.name}: {len(cells)} cells, evaluations: "
                   f"{', '.join(e.name for e in parsed.evaluations) or 'none'}")
        for c in cells:
            dep = f" (init from {c.depends_on})" if c.depends_on else ""
            click.echo(f"  {c.key}: {c.epochs} epochs, evaluated after {list(c.eval_epochs)}{dep}")
        return
    options: dict[str, Any] = {}
    if address is not None:
        if (engine or _default_engine()) != "ray":
            raise PhalanxError("--address applies to --engine ray only")
        options["address"] = address
    result = run_sweep(parsed, folder, engine=engine or _default_engine(), workers=workers,
                       retry_failed=retry_failed, rerun=rerun, progress=progress, engine_options=options)
    st = _print_status(folder)
    click.echo(f"results: {folder / 'results.json'}; table: phalanx table {folder}")
    if st["counts"]["failed"] or st["counts"]["skipped"]:
        if not result.ran:
            click.echo("failed cells are kept as they are; rerun with --retry-failed to run them again")
        raise SystemExit(1)


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--eval", "evaluation", default=None, help="White-box evaluation to tabulate (default: the first).")
@click.option("--eps", type=float, default=None, help="Attack strength of the columns (default: the largest).")
@click.option("--epoch", default="final", show_default=True,
              help="final (each cell's last epoch), an epoch count, or all (one table per evaluated epoch count).")
@click.option("--format", "fmt", type=click.Choice(["markdown", "csv", "latex"]), default="markdown",
              show_default=True, help="Printed format (--out writes all three).")
@click.option("--digits", type=int, default=1, show_default=True, help="Decimals of the percentages.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Also write table.md/.csv/.tex and the plots into this folder.")
def table(paths: tuple[str, ...], evaluation: str | None, eps: float | None, epoch: str, fmt: str, digits: int,
          out: str | None) -> None:
    """Paper-style table (methods x clean and attacks, mean ± std over seeds, best marked) from
    sweep folders or sweep cells' run folders; plots with --out."""
    from phalanx.reports import tables as T

    records = T.collect(paths)
    name = evaluation or T.default_evaluation(records)
    if epoch == "final":
        epochs: list[int | None] = [None]
    elif epoch == "all":
        counts = T.common_epochs(records, name)
        same_final = len({r.final_epoch for r in records}) == 1
        epochs = [*counts] if same_final and records[0].final_epoch in counts else [*counts, None]
    else:
        try:
            epochs = [int(epoch)]
        except ValueError:
            raise PhalanxError(f"--epoch expects final, all or an integer, got {epoch!r}") from None
    built = [T.method_table(records, evaluation=name, eps=eps, epoch=e) for e in epochs]
    for t in built:
        click.echo(f"{t.title}\n\n{T.render(t, fmt, digits)}\n")
    if out is None:
        return
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for ext, f in (("md", "markdown"), ("csv", "csv"), ("tex", "latex")):
        text = "\n\n".join((f"{t.title}\n\n" if ext == "md" else "") + T.render(t, f, digits) for t in built)
        (folder / f"table.{ext}").write_text(text + "\n")
    written = [folder / "table.md", folder / "table.csv", folder / "table.tex"]
    written.append(T.plot_eps_curves(records, folder / "robust_accuracy_vs_eps.png", evaluation=_curve_eval(records)))
    if len(T.common_epochs(records, name)) > 1:
        written.append(T.plot_learning_curves(records, folder / "learning_curves.png", evaluation=name, eps=eps))
    try:
        written.append(T.plot_transfer_matrices(records, folder / "transferability.png"))
    except PhalanxError:
        pass  # no transferability evaluation in these cells
    click.echo("wrote " + ", ".join(str(p) for p in written))


def _curve_eval(records: Any) -> str:
    """The white-box evaluation with the most eps values (the eps-curve plot's source)."""
    best, n = None, 0
    for r in records:
        for name, ev in r.evaluations.get(r.final_epoch, {}).items():
            if ev.get("protocol") == "whitebox" and len(ev["whitebox"]["eps"]) > n:
                best, n = name, len(ev["whitebox"]["eps"])
    if best is None:
        raise PhalanxError("the cells hold no white-box evaluation")
    return best


def register(group: click.Group) -> None:
    group.add_command(sweep)
    group.add_command(table)
