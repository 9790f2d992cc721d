"""Shared CLI options and helpers."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from phalanx.errors import PhalanxError

F = TypeVar("F", bound=Callable[..., Any])


#: seeds are integers in [0, 2**63) (what torch and numpy generators accept)
SEED = click.IntRange(0, 2**63 - 1)


def config_options(f: F) -> F:
    """--config FILE and repeatable --set section.key=value."""
    f = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                     help="Override a config value (repeatable), e.g. --set train.epochs=5.")(f)
    f = click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                     help="TOML config file with [data] [model] [method] [train] [eval] sections.")(f)
    return f


def out_option(f: F) -> F:
    """--out DIR and --overwrite (see :func:`phalanx.runs.open_run` for the reuse policy)."""
    f = click.option("--overwrite", is_flag=True,
                     help="Reuse an --out folder that holds another run (its results and report are replaced).")(f)
    return click.option("--out", "out", type=click.Path(file_okay=False), default=None,
                        help="Run folder (default: runs/<timestamp>-<command>); never silently reused.")(f)


def device_option(f: F) -> F:
    return click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
                        help="Where to run (default auto: CUDA when available).")(f)


mismatch_option = click.option("--allow-dataset-mismatch", is_flag=True,
                               help="Use checkpoints on another dataset than the one they were trained on.")


def progress_option(f: F) -> F:
    """--progress/--no-progress; by default bars are shown only when stderr is a terminal, so
    logs and pipes do not fill with bar redraws."""
    return click.option("--progress/--no-progress", default=None, callback=_progress_default,
                        help="Show progress bars (default: when stderr is a terminal).")(f)


def _progress_default(ctx: click.Context, param: click.Parameter, value: bool | None) -> bool:
    return sys.stderr.isatty() if value is None else value


def shortcut(tree: dict[str, dict[str, Any]], section: str, key: str, value: Any) -> None:
    """Put a CLI flag's value into the config tree when the flag was given."""
    if value is not None and value != ():
        tree.setdefault(section, {})[key] = value


def parse_eps_list(text: str | None) -> list[float] | None:
    if text is None:
        return None
    from phalanx.types import check_eps

    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise PhalanxError(f"--eps expects comma-separated numbers in [0, 1], got {text!r}") from None
    if not values:
        raise PhalanxError(f"--eps expects at least one number in [0, 1], got {text!r}")
    return [check_eps(v) for v in values]


def run_dir_for(out: str | None, command: str, *, overwrite: bool = False, reuse: str = "new") -> Path:
    """Own the run folder for this command (lock + reuse policy, :func:`phalanx.runs.open_run`)
    until the command ends; ``.phalanx/run.json`` then records how it ended."""
    from phalanx.runs import Reuse, open_run

    run = open_run(out, command, reuse=Reuse.OVERWRITE if overwrite else Reuse(reuse))
    click.get_current_context().with_resource(run)
    return run.path
