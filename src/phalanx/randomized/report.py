"""Report of a randomized-attack run, rendered from result files only: a summary table, each
classifier's 0-1 loss per attack and point, and a picture of the perturbed images."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from phalanx.reports.markdown import table
from phalanx.reports.plots import save_figure


def plot_attacks(doc: Mapping[str, Any], x: np.ndarray, path: str | Path, *,
                 in_shape: Sequence[int] | None = None, labels: Sequence[str] | None = None) -> Path | None:
    """Grid: first row the clean points, then one row per attack (its probability and, per
    image, the classifiers it fools). Only image-shaped inputs (C, H, W) are drawn."""
    from phalanx.reports.plots import _plt

    attacks = np.asarray(doc.get("attacks", []), dtype=np.float64)
    shape = tuple(in_shape) if in_shape is not None else tuple(x.shape[1:])
    if attacks.size == 0 or len(shape) != 3:
        return None
    n = x.shape[0]
    a = attacks.shape[0]
    losses = np.asarray(doc["losses"])
    plt = _plt()
    fig, axes = plt.subplots(a + 1, n, figsize=(1.6 * n + 0.4, 1.7 * (a + 1)), dpi=110, squeeze=False)

    def show(ax: Any, img: np.ndarray, title: str) -> None:
        im = img.reshape(shape)
        ax.imshow(im[0] if shape[0] == 1 else np.moveaxis(im, 0, -1), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])

    for j in range(n):
        show(axes[0][j], x[j], f"x{j} (clean)" + (f", label {labels[j]}" if labels is not None else ""))
    for i in range(a):
        for j in range(n):
            fooled = [str(c) for c in range(losses.shape[1]) if losses[i, c, j]]
            show(axes[i + 1][j], attacks[i, j], f"A{i} p={doc['probabilities'][i]:.2f}\nfools {{{','.join(fooled)}}}")
    return save_figure(fig, path)


def summary_rows(results: Mapping[str, Mapping[str, Any]]) -> list[list[Any]]:
    rows = []
    for name, r in results.items():
        val = r.get("value")
        ub = r.get("upper_bound")
        rows.append([name, r["verdict"], "-" if val is None else f"{val:.4f}", "-" if ub is None else f"{ub:.4f}",
                     r.get("attacks_used", len(r.get("probabilities", []))), r["num_attacks"],
                     r["sufficient_num_attacks"], r["status"], f"{r['wall_time_s']:.2f}"])
    return rows


def render_report(doc: Mapping[str, Any], *, image: str | None = None) -> str:
    """Markdown for a ``results.json`` document written by ``phalanx randomized-attack``."""
    main = doc["result"]
    lines = [
        "# phalanx randomized attack", "",
        f"Dataset `{doc.get('dataset')}` ({doc.get('split')} split). Classifiers: {doc.get('num_classifiers')} ({', '.join(doc.get('classifier_sources', []))}); "
        f"points |X| = {doc.get('num_points')}; eps = {main['eps']:g} ({main['norm']}); alpha = {main['alpha']:g}; "
        f"backend {main['backend']}, objective {main['objective']}.", "",
        "Val(A, P) (Gross et al. eq. 1) is recomputed by the float64 PyTorch models from the returned "
        "attack and probabilities; `upper bound` is proven (bounds, infeasible models or closed gaps "
        "only). `robust` means no eps-bounded randomized attack reaches alpha; "
        "`robust-for-num-attacks` only covers attacks with at most |A| deterministic attacks.", "",
        table(["attacker", "verdict", "Val", "upper bound", "attacks used", "A (asked)", "sufficient A", "status", "time (s)"],
              summary_rows({"optimal (" + main["backend"] + ")": main, **doc.get("comparison", {})})),
        "",
    ]
    losses = np.asarray(main.get("losses", []))
    if losses.size:
        lines += ["## 0-1 loss per attack", "",
                  "Rows: attacks with their probabilities; columns: classifier c on point j (1 = misclassified).", ""]
        a, cn, n = losses.shape
        header = ["attack", "P"] + [f"c{c} x{j}" for c in range(cn) for j in range(n)] + \
                 [f"M_c{c}" for c in range(cn)]
        rows: list[list[Any]] = [[f"A{i}", f"{main['probabilities'][i]:.4f}"] + [int(losses[i, c, j]) for c in range(cn) for j in range(n)]
                + [int(losses[i, c].sum()) for c in range(cn)] for i in range(a)]
        rows.append(["E[loss] per classifier", ""] + [""] * (cn * n) +
                    [f"{v:.4f}" for v in main.get("per_classifier", [])])
        lines += [table(header, rows), ""]
    if image:
        lines += ["## Perturbed images", "", f"![attacks]({image})", ""]
    if main.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in main["notes"]] + [""]
    return "\n".join(lines)
