"""Error types. Every user mistake raises a :class:`PhalanxError` with a one-line message
naming the bad value and what is accepted; the CLI turns it into exit code 2."""

from __future__ import annotations


class PhalanxError(ValueError):
    """A user-facing error: bad input, missing files, incompatible checkpoint."""


class DataNotFoundError(PhalanxError, FileNotFoundError):
    """Dataset files are missing and could not be downloaded."""


class CheckpointError(PhalanxError):
    """A checkpoint is corrupted, foreign, or does not match the requested architecture."""
