"""Markdown building blocks for run reports."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def scope_line(dataset: str, n: int, what: str = "test examples") -> str:
    """The sentence every report opens with: which data, how many examples."""
    return f"Dataset `{dataset}`, {n} {what}."


def pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def curves_table(curves: dict[str, Sequence[dict[str, float]]]) -> str:
    eps = sorted({p["eps"] for pts in curves.values() for p in pts})
    rows = []
    for name, pts in curves.items():
        by = {p["eps"]: p["accuracy"] for p in pts}
        rows.append([name] + [pct(by[e]) if e in by else "" for e in eps])
    return table(["model \\ eps"] + [f"{e:g}" for e in eps], rows)
