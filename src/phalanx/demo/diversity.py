"""The demo stage of the diversity-training methods: fine-tune a copy of the demo's baseline
with DVERGE and show both ensembles' within-ensemble transferability matrices side by side."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from phalanx.attacks import pgd
from phalanx.reports.plots import _plt, save_figure
from phalanx.training.base import create_method
from phalanx.training.loop import TrainConfig, fit

if TYPE_CHECKING:  # pragma: no cover
    from phalanx.demo.context import DemoContext

log = logging.getLogger(__name__)

DEMO_TRANSFER = {"eps": 0.1, "steps": 20, "restarts": 1, "limit": 200}
DEMO_DVERGE_EPOCHS = 6
DEMO_DVERGE_EPS = 0.2  # distillation radius scaled to 8x8 digits (0.07 is DVERGE's CIFAR-10 value)


def mean_off_diagonal(matrix: Tensor | Sequence[Sequence[float]]) -> float:
    """Mean of the off-diagonal entries of the M x M member block of an M x (M + 1) matrix."""
    t = torch.as_tensor(matrix, dtype=torch.float64)
    m = t.shape[0]
    block = t[:, :m]
    return float((block.sum() - block.diagonal().sum()) / max(m * (m - 1), 1))


def plot_transfer_side_by_side(matrices: dict[str, Tensor], path: str | Path, *, eps: float) -> Path:
    """Heat maps of several M x (M + 1) transfer matrices in one figure (matplotlib, Agg)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.2 * len(matrices), 3.6), dpi=120, squeeze=False)
    for ax, (title, mat) in zip(axes[0], matrices.items()):
        data = 100 * mat.numpy()
        ax.imshow(data, vmin=0, vmax=100, cmap="Reds")
        m = data.shape[0]
        for i in range(m):
            for j in range(m + 1):
                ax.text(j, i, f"{data[i, j]:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if data[i, j] > 60 else "black")
        ax.set_xticks(range(m + 1), [*(f"m{j}" for j in range(m)), "ens"])
        ax.set_yticks(range(m), [f"m{i}" for i in range(m)])
        ax.set_xlabel("target")
        ax.set_ylabel("source (PGD on one member)")
        ax.set_title(f"{title}: off-diag {mean_off_diagonal(mat) * 100:.0f}%", fontsize=9)
    fig.suptitle(f"Attack success rate (%), PGD eps={eps:g}", fontsize=10)
    return save_figure(fig, path)


def stage_diversity_training(ctx: DemoContext) -> None:
    """Fine-tune a copy of the baseline with DVERGE; compare within-ensemble transferability."""
    from phalanx.reports import pct, table

    base = ctx.ensembles["baseline"]
    dverge = copy.deepcopy(base)
    quick = ctx.config.train.epochs <= 2
    epochs = 1 if quick else DEMO_DVERGE_EPOCHS
    cfg = TrainConfig(epochs=epochs, batch_size=64, lr=0.02, seed=ctx.config.train.seed, device="cpu",
                      schedule="constant")
    method = create_method("dverge", eps=DEMO_DVERGE_EPS, step_size=DEMO_DVERGE_EPS / 10)
    fit_result = fit(dverge, method, ctx.data, cfg, progress=ctx.progress)
    ctx.ensembles["dverge"] = dverge.eval()
    base.eval()
    from phalanx.data import Split
    from phalanx.evaluation import correct_by_all, transferability_matrix

    limit = min(int(ctx.config.eval.limit or DEMO_TRANSFER["limit"]), int(DEMO_TRANSFER["limit"]))
    # the same images for both: those every member of both ensembles classifies correctly
    both = correct_by_all(base, correct_by_all(dverge, ctx.data.test))
    pool = Split(both.x[:limit], both.y[:limit])
    eps = float(DEMO_TRANSFER["eps"])
    steps = 5 if quick else int(DEMO_TRANSFER["steps"])
    results = {name: transferability_matrix(ens, pool, eps, attack=pgd(steps=steps, step_size=0.2),
                                            restarts=int(DEMO_TRANSFER["restarts"]), limit=None,
                                            generator=torch.Generator().manual_seed(0))
               for name, ens in (("baseline", base), ("DVERGE", dverge))}
    mats = {name: torch.tensor(r["matrix"]) for name, r in results.items()}
    x = pool.x
    plot_transfer_side_by_side(mats, ctx.out_dir / "transferability.png", eps=eps)
    with torch.no_grad():
        acc = {n: float((e(ctx.data.test.x).argmax(-1) == ctx.data.test.y).float().mean())
               for n, e in (("baseline", base), ("DVERGE", dverge))}
    ctx.results["dverge"] = {
        "history": fit_result.history, "method": method.describe(), "clean_accuracy": acc,
        "transferability": {n: mat.tolist() for n, mat in mats.items()},
        "protocol": {"eps": eps, "steps": steps, "n": int(x.shape[0])},
    }
    rows: list[list[Any]] = [[n, pct(acc[n]), pct(mean_off_diagonal(mat)), pct(float(mat[:, -1].mean()))]
                             for n, mat in mats.items()]
    ctx.sections += [
        "## Diversity training: DVERGE", "",
        f"A copy of the baseline fine-tuned with DVERGE (feature distillation eps {DEMO_DVERGE_EPS:g}, random layer per "
        f"epoch) for {epochs} epochs. Each member is attacked alone (PGD-{steps}, eps {eps:g}) on "
        f"{int(x.shape[0])} test images every member of both ensembles classifies correctly; the "
        "matrices give how often the example fools each member (diagonal: white-box) and the ensemble.", "",
        table(["ensemble", "clean accuracy", "mean off-diagonal transfer", "fools the ensemble"], rows), "",
        "![transferability](transferability.png)", "",
    ]
