"""The ``phalanx`` command line. Subcommands are thin: parse -> config -> library call -> files.

:func:`main` is the one error boundary: every user-caused failure prints one ``error:`` line
and exits with code 2 (no traceback). User-caused means a :class:`PhalanxError` (bad value,
missing or foreign file, busy run folder) or an :class:`OSError` from the file system the user
controls (a path that cannot be read or written, a read-only or full disk; see
:func:`user_os_error`). Anything else is a bug and keeps its traceback."""

from __future__ import annotations

import errno
import importlib
import logging
import sys
from typing import Any

import click

from phalanx.errors import PhalanxError

#: modules under phalanx.cli that define ``register(group)``; each adds its subcommands
COMMAND_MODULES = ("commands", "attack", "randomized", "verify", "sweep")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="phalanx")
def cli(verbose: int) -> None:
    """phalanx: adversarially robust deep ensembles (train, attack, verify)."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


for _mod in COMMAND_MODULES:
    importlib.import_module(f"phalanx.cli.{_mod}").register(cli)


#: errno values that describe the user's file system, not a phalanx bug
USER_ERRNOS = frozenset(getattr(errno, n) for n in (
    "EACCES", "EPERM", "EROFS", "ENOSPC", "EDQUOT", "ENOENT", "ENOTDIR", "EISDIR", "EEXIST", "ENAMETOOLONG",
    "ELOOP", "EFBIG", "EMFILE", "ENFILE", "EIO", "EBUSY", "ETXTBSY", "EXDEV") if hasattr(errno, n))


def user_os_error(exc: OSError) -> str | None:
    """The one-line message for an OS error on a user's path or disk, or None (a bug)."""
    if exc.errno not in USER_ERRNOS and exc.filename is None:
        return None
    where = f" {exc.filename}" if exc.filename is not None else ""
    if exc.filename2 is not None:
        where += f" -> {exc.filename2}"
    return f"cannot access{where}: {exc.strerror or exc}"


def main(argv: list[str] | None = None) -> Any:
    """Entry point: runs the CLI; user-caused failures become one ``error: ...`` line and exit 2."""
    try:
        rc = cli.main(args=argv, standalone_mode=False)
        if isinstance(rc, int) and rc != 0:
            sys.exit(rc)
        return rc
    except PhalanxError as exc:
        _fail(str(exc))
    except OSError as exc:
        msg = user_os_error(exc)
        if msg is None:
            raise
        _fail(msg)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


def _fail(message: str) -> None:
    lines = message.strip().splitlines() or ["failed"]
    click.echo(f"error: {lines[0]}", err=True)
    sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
