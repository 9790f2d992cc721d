"""Shared CLI options and helpers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from phalanx.errors import PhalanxError

F = TypeVar("F", bound=Callable[..., Any])


def config_options(f: F) -> F:
    """--config FILE and repeatable --set section.key=value."""
    f = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                     help="Override a config value (repeatable), e.g. --set train.epochs=5.")(f)
    f = click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                     help="TOML config file with [data] [model] [method] [train] [eval] sections.")(f)
    return f


def out_option(f: F) -> F:
    return click.option("--out", "out", type=click.Path(file_okay=False), default=None,
                        help="Run folder (default: runs/<timestamp>-<command>).")(f)


def device_option(f: F) -> F:
    return click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
                        help="Where to run (default auto: CUDA when available).")(f)


def progress_option(f: F) -> F:
    return click.option("--progress/--no-progress", default=True, help="Show progress bars.")(f)


def shortcut(tree: dict[str, dict[str, Any]], section: str, key: str, value: Any) -> None:
    """Put a CLI flag's value into the config tree when the flag was given."""
    if value is not None and value != ():
        tree.setdefault(section, {})[key] = value


def parse_eps_list(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise PhalanxError(f"--eps expects comma-separated numbers, got {text!r}") from None


def run_dir_for(out: str | None, command: str) -> Path:
    from phalanx.runs import new_run_dir

    if out is not None:
        p = Path(out)
        p.mkdir(parents=True, exist_ok=True)
        return p
    return new_run_dir("runs", command)
