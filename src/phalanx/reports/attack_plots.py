"""Plots for the attack and evaluation protocols, rendered from result dictionaries only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from phalanx.reports.plots import _plt, save_figure


def plot_heatmap(matrix: Sequence[Sequence[float]], rows: Sequence[str], columns: Sequence[str],
                 path: str | Path, *, title: str = "Transferability (attack success rate)",
                 percent: bool = True, cmap: str = "Reds") -> Path:
    """A labelled heat map with the value written in each cell (transferability: M x (M+1))."""
    plt = _plt()
    import numpy as np

    arr = np.asarray(matrix, dtype=float) * (100.0 if percent else 1.0)
    fig, ax = plt.subplots(figsize=(1.1 * len(columns) + 2.0, 0.9 * len(rows) + 1.6), dpi=120)
    im = ax.imshow(arr, cmap=cmap, vmin=0.0, vmax=100.0 if percent else max(float(arr.max()), 1e-9))
    ax.set_xticks(range(len(columns)), labels=list(columns), rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), labels=list(rows), fontsize=8)
    ax.set_xlabel("target")
    ax.set_ylabel("source (attacked)")
    hi = float(arr.max()) if arr.size else 1.0
    for i in range(arr.shape[0]):
        for j in range(arr.shape[1]):
            ax.text(j, i, f"{arr[i, j]:.0f}" if percent else f"{arr[i, j]:.2f}", ha="center", va="center",
                    fontsize=8, color="white" if arr[i, j] > 0.6 * hi else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def plot_adversarial_grid(clean: Any, adversarial: Any, labels: Sequence[int], clean_pred: Sequence[int],
                          adv_pred: Sequence[int], path: str | Path, *, title: str = "") -> Path:
    """Two rows of images (clean above, adversarial below) with true / predicted labels.
    ``clean`` and ``adversarial`` are (N, C, H, W) arrays or tensors in [0, 1]."""
    plt = _plt()
    import numpy as np

    c = np.asarray(clean, dtype=float)
    a = np.asarray(adversarial, dtype=float)
    n = c.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(1.2 * n + 0.4, 2.9), dpi=120, squeeze=False)
    for k in range(n):
        for r, (img, pred) in enumerate(((c[k], clean_pred[k]), (a[k], adv_pred[k]))):
            ax = axes[r][k]
            im = img.transpose(1, 2, 0) if img.shape[0] == 3 else img[0]
            ax.imshow(np.clip(im, 0, 1), cmap=None if img.shape[0] == 3 else "gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ok = int(pred) == int(labels[k])
            ax.set_title(f"{'y' if r == 0 else 'adv'}={int(labels[k]) if r == 0 else int(pred)}"
                         + ("" if r == 0 else ("" if ok else " x")), fontsize=7, color="black" if ok else "red")
    return save_figure(fig, path, title=title)


def plot_decision_regions(result: Mapping[str, Any], path: str | Path, *, title: str = "") -> Path:
    """One panel per model of :func:`phalanx.evaluation.decision_regions` output; same colour =
    same predicted label; the star is the test point."""
    plt = _plt()
    import numpy as np

    grids = result["grids"]
    eps = float(result["eps"])
    fig, axes = plt.subplots(1, len(grids), figsize=(2.6 * len(grids) + 0.4, 2.9), dpi=120, squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, (name, grid) in zip(axes[0], grids.items(), strict=True):
        arr = np.asarray(grid)
        ax.imshow(arr, cmap=cmap, vmin=0, vmax=9, origin="lower", extent=(-eps, eps, -eps, eps),
                  interpolation="nearest")
        ax.plot([0], [0], marker="*", color="white", markeredgecolor="black", markersize=9)
        ax.set_title(f"{name} (label {result['label']})", fontsize=8)
        ax.set_xlabel("random direction", fontsize=7)
        ax.set_ylabel("adversarial direction", fontsize=7)
        ax.tick_params(labelsize=6)
    return save_figure(fig, path, title=title)


__all__ = ["plot_adversarial_grid", "plot_decision_regions", "plot_heatmap"]
