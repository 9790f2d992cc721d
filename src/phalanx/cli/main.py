"""The ``phalanx`` command line. Subcommands are thin: parse -> config -> library call -> files.
User mistakes print a one-line error and exit with code 2 (no traceback)."""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import click

from phalanx.errors import PhalanxError

#: modules under phalanx.cli that define ``register(group)``; each adds its subcommands
COMMAND_MODULES = ("commands", "attack", "randomized", "verify")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="phalanx")
def cli(verbose: int) -> None:
    """phalanx: adversarially robust deep ensembles (train, attack, verify)."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


for _mod in COMMAND_MODULES:
    importlib.import_module(f"phalanx.cli.{_mod}").register(cli)


def main(argv: list[str] | None = None) -> Any:
    """Entry point: runs the CLI, turning :class:`PhalanxError` into ``error: ...`` and exit 2."""
    try:
        rc = cli.main(args=argv, standalone_mode=False)
        if isinstance(rc, int) and rc != 0:
            sys.exit(rc)
        return rc
    except PhalanxError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


if __name__ == "__main__":  # pragma: no cover
    main()
