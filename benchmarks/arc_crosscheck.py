"""phalanx's ARC and EOT-PGD against the authors' code (``hsndbk4/ARC``, Dbouk and Shanbhag,
ICML 2022) on a randomized ensemble of small models.

Two small CNNs trained on digits (or LeNet-5s on MNIST) form a randomized ensemble with member
probabilities (alpha, 1 - alpha), as the reference's BAT evaluation. On the same test examples,
ARC (20 iterations, eta = eps, no random start: the README's settings) and PGD on the expected
loss (20 iterations of eps/4, no random start: the README's "APGD") run with phalanx and with
the reference, interleaved in one process; both are scored by the exact expected accuracy over
the draw. Targets: expected accuracy within 1 point, phalanx's examples/s at least the
reference's.

The reference is *not* part of phalanx. Clone it into a scratch folder and point ``--ref-dir``
at it; it is imported from there with in-memory shims only (``np.infty`` aliased to ``np.inf``,
removed in NumPy 2; ``Tensor.cuda`` made the identity while the reference runs on CPU):

    git clone https://github.com/hsndbk4/ARC /tmp/arc_ref
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/arc_crosscheck.py --ref-dir /tmp/arc_ref
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from phalanx.attacks import create_attack
from phalanx.ensembles import Ensemble, expected_correct
from phalanx.types import Norm, ThreatModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import loadavg, write_out
from mora_crosscheck import train_ensemble


@contextmanager
def cpu_shims() -> Iterator[None]:
    """The reference calls ``.cuda()`` on fresh tensors; on CPU that is the identity here."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign,assignment]
    if not hasattr(np, "infty"):
        np.infty = np.inf  # type: ignore[attr-defined]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


def reference_attacks(ref_dir: Path) -> tuple[Callable[..., Any], Callable[..., Any]]:
    if str(ref_dir) not in sys.path:
        sys.path.insert(0, str(ref_dir))
    import importlib

    arc_mod = importlib.import_module("attack")
    # eval_robustness_bat_sweep.py holds the reference's PGD on the expected loss; its imports of
    # torchvision-based data and model builders are not needed for attack_pgd: in-memory stubs
    import types

    for name, attrs in (("torchvision", ()), ("architectures", ("get_architecture", "load_params")),
                        ("datasets", ("get_normalize", "get_dataloaders"))):
        stub = types.ModuleType(name)
        for attr in attrs:
            setattr(stub, attr, None)
        sys.modules.setdefault(name, stub)
    bat = importlib.import_module("eval_robustness_bat_sweep")

    def ref_pgd(models: list[torch.nn.Module], alpha: np.ndarray, x: torch.Tensor, y: torch.Tensor, eps: float,
                step: float, iters: int) -> torch.Tensor:
        def criterion(output: torch.Tensor, yy: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
            return F.cross_entropy(output, yy, reduction=reduction)  # the reference main()'s criterion

        return bat.attack_pgd(bat.Parallel(models), x, y, eps, step, iters, 1, "l_inf", normalize=lambda t: t,  # type: ignore[no-any-return]
                              loss_func=bat.expected_loss(criterion, prob=alpha), rand_init=False)

    return arc_mod.attack_arc, ref_pgd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref-dir", type=Path, required=True, help="scratch clone of github.com/hsndbk4/ARC")
    ap.add_argument("--dataset", choices=["digits", "mnist"], default="digits")
    ap.add_argument("--n", type=int, default=360)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--alphas", default="0.9,0.5")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attacks", default="arc,eot-pgd")
    ap.add_argument("--out-name", default="arc_crosscheck.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    load0 = loadavg()
    ens, data = train_ensemble(args.dataset, args.epochs, 0)
    members = list(ens.members)[:2]
    for m in members:
        m.requires_grad_(False)  # as the reference script
    x, y = data.test.x[: args.n], data.test.y[: args.n]
    threat = ThreatModel(Norm.LINF, args.eps)
    ref_arc, ref_pgd = reference_attacks(args.ref_dir)
    rows = []
    for a in (float(v) for v in args.alphas.split(",")):
        alpha = np.array([a, 1 - a])
        target = Ensemble(members, "random", [a, 1 - a]).eval()
        runs: dict[str, Callable[[], torch.Tensor]] = {
            "phalanx-arc": lambda target=target: create_attack("arc", steps=args.iters)(target, x, y, threat),
            "reference-arc": lambda alpha=alpha: x + ref_arc(members, x, y, args.eps, alpha, args.iters, args.eps,
                                                               "l_inf", data.num_classes, normalize=lambda t: t,
                                                               rand_init=False),
            "phalanx-eot-pgd": lambda target=target: create_attack(
                "eot-pgd", steps=args.iters, step_size=0.25, random_start=False)(target, x, y, threat),
            "reference-eot-pgd": lambda alpha=alpha: x + ref_pgd(members, alpha, x, y, args.eps, args.eps / 4,
                                                                 args.iters),
        }
        kinds = args.attacks.split(",")
        runs = {k: v for k, v in runs.items() if k.split("-", 1)[1] in kinds}
        res: dict[str, dict[str, list[float]]] = {k: {"time_s": [], "acc": []} for k in runs}
        for rep in range(args.repeats):
            order = list(runs) if rep % 2 == 0 else list(reversed(runs))
            for name in order:
                with cpu_shims():
                    t0 = time.perf_counter()
                    adv = runs[name]()
                    dt = time.perf_counter() - t0
                acc = float(expected_correct(target, adv.clamp(0, 1), y).mean())
                assert float((adv - x).abs().max()) <= args.eps + 1e-6
                res[name]["time_s"].append(dt)
                res[name]["acc"].append(acc)
                print(f"alpha {a:.2f} {name:18s} rep {rep}: {dt:6.2f} s, expected accuracy {100 * acc:.2f}%", flush=True)
        row: dict[str, Any] = {"alpha": a, "n": len(y), "clean": float(expected_correct(target, x, y).mean()),
                               "raw": res}
        for kind in kinds:
            ph, rf = res[f"phalanx-{kind}"], res[f"reference-{kind}"]
            row[kind] = {"phalanx_acc": statistics.mean(ph["acc"]), "reference_acc": statistics.mean(rf["acc"]),
                         "diff_points": 100 * (statistics.mean(ph["acc"]) - statistics.mean(rf["acc"])),
                         "phalanx_ex_per_s": len(y) / statistics.median(ph["time_s"]),
                         "reference_ex_per_s": len(y) / statistics.median(rf["time_s"]),
                         "speed_ratio": statistics.median(rf["time_s"]) / statistics.median(ph["time_s"])}
        rows.append(row)
    load1 = loadavg()
    path = write_out(args.out_name, {"benchmark": "arc_crosscheck", "dataset": args.dataset, "eps": args.eps,
                                     "iters": args.iters, "repeats": args.repeats, "loadavg_start": load0,
                                     "loadavg_end": load1, "threads": 1, "rows": rows})
    print(f"\n{'alpha':>5s} {'attack':8s} {'phalanx':>8s} {'reference':>9s} {'diff':>6s} {'ph ex/s':>8s} {'ref ex/s':>8s}")
    for r in rows:
        for kind in args.attacks.split(","):
            k = r[kind]
            print(f"{r['alpha']:5.2f} {kind:8s} {100 * k['phalanx_acc']:7.2f}% {100 * k['reference_acc']:8.2f}% "
                  f"{k['diff_points']:+6.2f} {k['phalanx_ex_per_s']:8.1f} {k['reference_ex_per_s']:8.1f}")
    print(f"loadavg {load0} -> {load1}; written {path}")


if __name__ == "__main__":
    main()
