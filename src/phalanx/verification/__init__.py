"""Formal verification of ensembles (Amir et al. 2022): exact encodings of trained members,
sound bounds, MILP / Marabou / SMT backends and a portfolio, mutual-error and uniqueness scores,
and verification-aided member selection.

Importable without z3 or maraboupy: the optional backends import them lazily and raise a
:class:`~phalanx.errors.PhalanxError` with an install hint when they are missing.
"""

from __future__ import annotations

from collections.abc import Callable

from phalanx.registry import Registry
from phalanx.verification.backends import BoundsVerifier, MilpVerifier, QueryBounds, Verifier, query_bounds
from phalanx.verification.bounds import NetworkBounds, ball, interval_bounds, linear_bounds
from phalanx.verification.crown import crown_bounds
from phalanx.verification.ir import NetworkIR, to_ir
from phalanx.verification.milp import MilpModel, MilpOutcome, encode_network
from phalanx.verification.query import (
    MARGIN,
    Query,
    QueryKind,
    Verdict,
    VerificationResult,
    make_query,
    recheck,
)

#: verification backends: name -> factory(**options) -> Verifier
BACKENDS: Registry[Callable[..., Verifier]] = Registry("verification backend")
BACKENDS.add("bounds", BoundsVerifier, "incomplete: symbolic linear bounds prove easy UNSAT queries")
BACKENDS.add("milp", MilpVerifier, "exact big-M MILP solved by HiGHS (gap 0)")


def _smt(**kw: object) -> Verifier:
    from phalanx.verification.smt import SmtVerifier

    return SmtVerifier(**kw)  # type: ignore[arg-type]


def _marabou(**kw: object) -> Verifier:
    from phalanx.verification.marabou import MarabouVerifier

    return MarabouVerifier(**kw)  # type: ignore[arg-type]


def _attack(**kw: object) -> Verifier:
    from phalanx.verification.portfolio import AttackVerifier

    return AttackVerifier(**kw)  # type: ignore[arg-type]


def _crown(**kw: object) -> Verifier:
    from phalanx.verification.bab import CrownVerifier

    return CrownVerifier(**kw)  # type: ignore[arg-type]


def _bab(**kw: object) -> Verifier:
    from phalanx.verification.bab import BabVerifier

    return BabVerifier(**kw)  # type: ignore[arg-type]


def _portfolio(**kw: object) -> Verifier:
    from phalanx.verification.portfolio import Portfolio

    return Portfolio(**kw)  # type: ignore[arg-type]


BACKENDS.add("smt", _smt, "z3 SMT over exact rationals (small networks); pip install 'phalanx[smt]'")
BACKENDS.add("marabou", _marabou, "Marabou 2.0, one process per query; pip install 'phalanx[marabou]'")
BACKENDS.add("attack", _attack, "incomplete: joint gradient attack (G.A. 3 / PGD), SAT only")
BACKENDS.add("crown", _crown, "incomplete: joint back-substituted (alpha-)CROWN bounds over all members, UNSAT only")
BACKENDS.add("bab", _bab, "complete: branch and bound over ReLU splits with joint CROWN bounds, MILP at the leaves")
BACKENDS.add("portfolio", _portfolio, "forward and joint CROWN bounds, attack, member proofs, then a complete backend (default bab)")


def create_verifier(name: str, **options: object) -> Verifier:
    """A verifier by registry name (see ``phalanx info``)."""
    return BACKENDS.get(name)(**options)


__all__ = ["BACKENDS", "MARGIN", "BoundsVerifier", "MilpModel", "MilpOutcome", "MilpVerifier", "NetworkBounds",
           "NetworkIR", "Query", "QueryBounds", "QueryKind", "VerificationResult", "Verdict", "Verifier", "ball",
           "create_verifier", "crown_bounds", "encode_network", "interval_bounds", "linear_bounds", "make_query", "query_bounds",
           "recheck", "to_ir"]
