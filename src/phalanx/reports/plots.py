"""Plots rendered from result dictionaries only (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, *, title: str = "") -> Path:
    """Optional suptitle, tight layout, save, close: the end of every plot function."""
    plt = _plt()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_accuracy_curves(curves: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path, *,
                         title: str = "Robust accuracy", xlabel: str = "eps (L-inf)") -> Path:
    """One line per named curve of ``[{eps, accuracy}, ...]`` points."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for label, pts in curves.items():
        ax.plot([p["eps"] for p in pts], [100 * p["accuracy"] for p in pts], marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_training_history(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=120)
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if any("val_accuracy" in h for h in history):
        ax2 = ax.twinx()
        ax2.plot(epochs, [100 * h.get("val_accuracy", float("nan")) for h in history], color="C1", label="val acc")
        ax2.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
