"""phalanx's MORA against the authors' code (``lafeat/mora``, Yu, Gao and Xu, NeurIPS 2022).

On the same trained ensemble (3 small CNNs on digits, or LeNet-5s on MNIST) and the same test
examples, run the published "standard-t-pre" MORA (five reweighing passes with scale 0.5, 0,
0.25, 0.75, 1 and a targeted pass over 9 classes, 100 iterations each, cosine step decay) in
each ensemble mode (softmax, voting, logits) with phalanx and with the reference, interleaved in
one process, and report robust accuracy and examples/s side by side. Targets: accuracy within 1
point per mode, phalanx's examples/s at least the reference's.

The reference is *not* part of phalanx. Fetch it into a scratch folder outside the project and
point ``--ref-dir`` at it; it is imported from there with in-memory shims only (``np.int``,
removed from NumPy, aliased to ``int``; the ensemble wrappers' hard-coded ``cuda`` device set
to the model's device):

    git clone https://github.com/lafeat/mora /tmp/mora_ref
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mora_crosscheck.py --ref-dir /tmp/mora_ref

Both sets of adversarial examples are scored by the same judges: the reference's own ensemble
output (mean softmax / soft vote with margin 10 / mean logits) and phalanx's combiner
(mean-prob / vote-prob / mean-logits).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common import loadavg, write_out  # benchmarks/ is on sys.path when a script runs
from phalanx.attacks import create_attack
from phalanx.data import load_dataset
from phalanx.ensembles import Ensemble
from phalanx.models import create_model
from phalanx.training import TrainConfig, create_method, fit
from phalanx.types import Norm, ThreatModel

ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"
COMBINER = {"softmax": "mean-prob", "voting": "vote-prob", "logits": "mean-logits"}
FLOAT_DIS = {"softmax": 0.2, "voting": 0.8, "logits": 0.0}  # scripts/evaluation.sh


def train_ensemble(dataset: str, epochs: int, seed: int) -> tuple[Ensemble, Any]:
    if dataset == "mnist":
        data, arch = load_dataset("mnist", data_dir=MNIST_DIR, seed=seed, limit=12000), "lenet5"
    else:
        data, arch = load_dataset("digits", seed=seed), "small-cnn"
    torch.manual_seed(seed)
    ens = Ensemble([create_model(arch, data.in_shape, data.num_classes, mean=data.mean, std=data.std)
                    for _ in range(3)])
    fit(ens, create_method("baseline"), data,
        TrainConfig(epochs=epochs, batch_size=64, lr=0.05, seed=seed, device="cpu"), progress=False)
    return ens.eval(), data


def reference(ref_dir: Path, members: list[nn.Module], mode: str, eps: float, n_iter: int) -> tuple[Any, nn.Module]:
    """The authors' MORA and ensemble wrapper, imported from ``ref_dir`` with in-memory shims."""
    if str(ref_dir) not in sys.path:
        sys.path.insert(0, str(ref_dir))
    if not hasattr(np, "int"):
        np.int = int  # type: ignore[attr-defined]  # removed in NumPy 1.24, used by MORAAttack_targeted
    import importlib

    wrapper = importlib.import_module(f"models.ensemble_{mode}").Ensemble(members)
    wrapper.device = "cpu"
    wrapper.eval()
    mora_mod = importlib.import_module("mora")
    adversary = mora_mod.MORA(wrapper, norm="Linf", eps=eps, version="standard-t-pre", scale=True,
                              decay_step="cosine", n_iter=n_iter, float_dis=FLOAT_DIS[mode], seed=0,
                              ensemble_pattern=mode, device="cpu", verbose=False)
    return adversary, wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref-dir", type=Path, required=True, help="scratch clone of github.com/lafeat/mora")
    ap.add_argument("--dataset", choices=["digits", "mnist"], default="digits")
    ap.add_argument("--n", type=int, default=360)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--n-iter", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--modes", default="softmax,voting,logits")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--out-name", default="mora_crosscheck.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    load0 = loadavg()
    ens, data = train_ensemble(args.dataset, args.epochs, 0)
    x, y = data.test.x[: args.n], data.test.y[: args.n]
    threat = ThreatModel(Norm.LINF, args.eps)
    rows = []
    for mode in args.modes.split(","):
        target = Ensemble(list(ens.members), COMBINER[mode]).eval()
        adversary, wrapper = reference(args.ref_dir, list(ens.members), mode, args.eps, args.n_iter)
        atk = create_attack("mora", mode=mode, n_iter=args.n_iter)

        def judge_ref(a: torch.Tensor, wrapper: nn.Module = wrapper) -> float:
            with torch.no_grad():
                return float((wrapper(a)[-1].argmax(-1) == y).float().mean())

        def judge_phalanx(a: torch.Tensor, target: Ensemble = target) -> float:
            with torch.no_grad():
                return float((target(a).argmax(-1) == y).float().mean())

        res: dict[str, dict[str, list[float]]] = {k: {"time_s": [], "acc_own": [], "acc_phalanx": [], "acc_ref": []}
                                                  for k in ("phalanx", "reference")}
        for rep in range(args.repeats):
            for impl in ("reference", "phalanx") if rep % 2 == 0 else ("phalanx", "reference"):
                t0 = time.perf_counter()
                if impl == "phalanx":
                    adv = atk(target, x, y, threat, generator=torch.Generator().manual_seed(rep))
                else:
                    adversary.seed = rep
                    adv = adversary.run_standard_evaluation(x, y, bs=args.batch_size)
                dt = time.perf_counter() - t0
                r = res[impl]
                r["time_s"].append(dt)
                r["acc_phalanx"].append(judge_phalanx(adv))
                r["acc_ref"].append(judge_ref(adv))
                r["acc_own"].append(r["acc_phalanx" if impl == "phalanx" else "acc_ref"][-1])
                print(f"{mode:8s} {impl:9s} rep {rep}: {dt:7.1f} s, acc (phalanx judge) {100 * r['acc_phalanx'][-1]:.1f}%, "
                      f"(reference judge) {100 * r['acc_ref'][-1]:.1f}%", flush=True)
        med = {k: statistics.median(v["time_s"]) for k, v in res.items()}
        row = {"mode": mode, "combiner": COMBINER[mode], "n": len(y),
               "clean_phalanx": judge_phalanx(x), "clean_ref": judge_ref(x),
               **{f"{k}_{m}": statistics.mean(v[m]) for k, v in res.items() for m in ("acc_phalanx", "acc_ref")},
               "phalanx_ex_per_s": len(y) / med["phalanx"], "reference_ex_per_s": len(y) / med["reference"],
               "speed_ratio": med["reference"] / med["phalanx"], "raw": res}
        row["diff_points_phalanx_judge"] = 100 * (row["phalanx_acc_phalanx"] - row["reference_acc_phalanx"])
        row["diff_points_ref_judge"] = 100 * (row["phalanx_acc_ref"] - row["reference_acc_ref"])
        rows.append(row)
    load1 = loadavg()
    path = write_out(args.out_name, {"benchmark": "mora_crosscheck", "dataset": args.dataset, "eps": args.eps,
                                     "n_iter": args.n_iter, "repeats": args.repeats, "loadavg_start": load0,
                                     "loadavg_end": load1, "threads": 1, "rows": rows})
    print(f"\n{'mode':8s} {'phalanx':>9s} {'reference':>9s} {'diff':>6s} {'ph ex/s':>8s} {'ref ex/s':>8s} {'ratio':>6s}")
    for r in rows:
        print(f"{r['mode']:8s} {100 * r['phalanx_acc_phalanx']:8.1f}% {100 * r['reference_acc_phalanx']:8.1f}% "
              f"{r['diff_points_phalanx_judge']:+6.1f} {r['phalanx_ex_per_s']:8.1f} {r['reference_ex_per_s']:8.1f} "
              f"{r['speed_ratio']:6.2f}")
    print(f"loadavg {load0} -> {load1}; written {path}")


if __name__ == "__main__":
    main()
