"""phalanx's attacks against an independent library: IBM's adversarial-robustness-toolbox (ART).

On the same model (a 3-member LeNet-5 ensemble trained here on MNIST, or on digits with
``--dataset digits`` and small CNNs) and the same test examples, compare robust accuracy under
FGSM, PGD (50 steps of eps/5, random start) and AutoAttack, and PGD throughput (interleaved
repeats in one process, ratio of medians). The target: accuracies within 1 percentage point,
phalanx's PGD throughput at least ART's.

ART is *not* a phalanx dependency. Install it into the benchmark environment only (it does not
change torch; check with ``pip install --dry-run`` first):

    .venv/bin/pip install adversarial-robustness-toolbox
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/attacks_crosscheck.py

ART's AutoAttack runs here as APGD-CE, APGD-DLR (100 iterations, 1 start each) and Square (5000
queries, p_init 0.8, 1 restart): ART has no FAB, and its default composition (5 starts per APGD,
DeepFool, 5 Square restarts) takes over an hour on 2 CPU cores. phalanx's is the standard
composition of Croce & Hein (APGD-CE, APGD-T with 9 targets, FAB-T, Square 5000). Both attack the ensemble's output,
the log of its mean member probabilities (ART treats it as logits).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from phalanx.attacks import create_attack
from phalanx.data import load_dataset
from phalanx.ensembles import Ensemble
from phalanx.models import create_model
from phalanx.training import TrainConfig, create_method, fit
from phalanx.types import Norm, ThreatModel

ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"


def train_ensemble(dataset: str, limit: int, epochs: int, seed: int) -> tuple[Ensemble, Any]:
    if dataset == "mnist":
        data = load_dataset("mnist", data_dir=MNIST_DIR, seed=seed, limit=limit)
        arch = "lenet5"
    else:
        data = load_dataset("digits", seed=seed)
        arch = "small-cnn"
    torch.manual_seed(seed)
    ens = Ensemble([create_model(arch, data.in_shape, data.num_classes, mean=data.mean, std=data.std)
                    for _ in range(3)])
    fit(ens, create_method("baseline"), data, TrainConfig(epochs=epochs, batch_size=64, lr=0.05, seed=seed,
                                                          device="cpu"), progress=False)
    return ens.eval(), data


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def phalanx_run(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, bs: int,
                **kw: Any) -> torch.Tensor:
    atk = create_attack(name, **kw)
    gen = torch.Generator().manual_seed(0)
    return torch.cat([atk(model, x[i:i + bs], y[i:i + bs], ThreatModel(Norm.LINF, eps), generator=gen)
                      for i in range(0, len(x), bs)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=["mnist", "digits"], default="mnist" if MNIST_DIR.is_dir() else "digits")
    ap.add_argument("--n", type=int, default=1000, help="test examples for FGSM / PGD")
    ap.add_argument("--n-autoattack", type=int, default=500)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--train-limit", type=int, default=12000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--skip-autoattack", action="store_true")
    ap.add_argument("--skip-fgsm-pgd", action="store_true")
    ap.add_argument("--phalanx-components", default="apgd-ce,apgd-t,fab-t,square",
                    help="phalanx AutoAttack components; apgd-ce,apgd-dlr,square matches ART's composition here")
    ap.add_argument("--out-name", default="attacks_crosscheck.json")
    args = ap.parse_args()
    try:
        import art
        from art.attacks.evasion import (
            AutoAttack,
            AutoProjectedGradientDescent,
            SquareAttack,
        )
        from art.estimators.classification import PyTorchClassifier
    except ImportError:
        sys.exit("install ART first: .venv/bin/pip install adversarial-robustness-toolbox")

    torch.manual_seed(0)
    t0 = time.perf_counter()
    ens, data = train_ensemble(args.dataset, args.train_limit, args.epochs, seed=0)
    train_s = time.perf_counter() - t0
    test = data.test.subset(args.n)
    x, y = test.x, test.y
    clf = PyTorchClassifier(model=ens, loss=nn.CrossEntropyLoss(), input_shape=tuple(data.in_shape),
                            nb_classes=data.num_classes, clip_values=(0.0, 1.0), device_type="cpu")
    eps, bs = args.eps, args.batch_size
    rows: list[dict[str, Any]] = []
    clean = accuracy(ens, x, y)

    thr_p = thr_a = float("nan")
    p_times: list[float] = []
    a_times: list[float] = []
    if not args.skip_fgsm_pgd:
        thr_p, thr_a = fgsm_pgd(args, ens, clf, x, y, rows, p_times, a_times)
    if not args.skip_autoattack:
        components = tuple(c for c in args.phalanx_components.split(",") if c)
        xa, ya = x[:args.n_autoattack], y[:args.n_autoattack]
        t = time.perf_counter()
        p_aa_adv = phalanx_run("autoattack", ens, xa, ya, eps, bs, components=components)
        p_aa_s = time.perf_counter() - t
        print(f"phalanx AutoAttack {components}: {accuracy(ens, p_aa_adv, ya):.4f} in {p_aa_s:.0f} s", flush=True)
        t = time.perf_counter()
        art_parts = [
            AutoProjectedGradientDescent(clf, norm=np.inf, eps=eps, eps_step=eps / 5, max_iter=100, targeted=False,
                                         nb_random_init=1, batch_size=bs, loss_type=loss, verbose=False)
            for loss in ("cross_entropy", "difference_logits_ratio")]
        art_parts.append(SquareAttack(clf, norm=np.inf, eps=eps, max_iter=5000, p_init=0.8, nb_restarts=1,
                                      batch_size=bs, verbose=False))
        a_aa_adv = AutoAttack(clf, norm=np.inf, eps=eps, eps_step=eps / 5, attacks=art_parts,
                              batch_size=bs).generate(xa.numpy(), ya.numpy())
        a_aa_s = time.perf_counter() - t
        rows.append({"attack": f"AutoAttack (phalanx: {', '.join(components)}; ART: APGD-CE, APGD-DLR, Square)",
                     "n": len(xa), "phalanx": accuracy(ens, p_aa_adv, ya),
                     "art": accuracy(ens, torch.from_numpy(a_aa_adv), ya), "phalanx_s": p_aa_s, "art_s": a_aa_s})
        # phalanx's adversarial examples must be real: inside the ball and the box
        assert float((p_aa_adv - xa).abs().max()) <= eps + 1e-6
    finish(args, ens, x, clean, eps, train_s, rows, thr_p, thr_a, p_times, a_times, art.__version__)


def fgsm_pgd(args: Any, ens: Ensemble, clf: Any, x: torch.Tensor, y: torch.Tensor, rows: list[dict[str, Any]],
             p_times: list[float], a_times: list[float]) -> tuple[float, float]:
    """FGSM (deterministic on both sides) and PGD-50 with interleaved timing repeats."""
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescentPyTorch

    eps, bs = args.eps, args.batch_size
    xn, yn = x.numpy(), y.numpy()
    p_fgsm = accuracy(ens, phalanx_run("fgsm", ens, x, y, eps, bs), y)
    a_adv = FastGradientMethod(clf, norm=np.inf, eps=eps, batch_size=bs).generate(xn, yn)
    a_fgsm = accuracy(ens, torch.from_numpy(a_adv), y)
    rows.append({"attack": "FGSM", "n": len(x), "phalanx": p_fgsm, "art": a_fgsm})
    print(f"FGSM: phalanx {p_fgsm:.4f}, ART {a_fgsm:.4f}", flush=True)

    p_accs, a_accs = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        adv = phalanx_run("pgd", ens, x, y, eps, bs, steps=50, step_size=0.2)
        p_times.append(time.perf_counter() - t)
        p_accs.append(accuracy(ens, adv, y))
        pgd = ProjectedGradientDescentPyTorch(clf, norm=np.inf, eps=eps, eps_step=eps / 5, max_iter=50,
                                              num_random_init=1, batch_size=bs, verbose=False)
        t = time.perf_counter()
        a_adv = pgd.generate(xn, yn)
        a_times.append(time.perf_counter() - t)
        a_accs.append(accuracy(ens, torch.from_numpy(a_adv), y))
    rows.append({"attack": "PGD-50 (eps/5, random start)", "n": len(x), "phalanx": statistics.mean(p_accs),
                 "art": statistics.mean(a_accs), "phalanx_runs": p_accs, "art_runs": a_accs})
    thr_p = len(x) / statistics.median(p_times)
    thr_a = len(x) / statistics.median(a_times)
    print(f"PGD: phalanx {p_accs}, ART {a_accs}; throughput ratio {thr_p / thr_a:.2f}", flush=True)
    return thr_p, thr_a


def finish(args: Any, ens: Ensemble, x: torch.Tensor, clean: float, eps: float, train_s: float,
           rows: list[dict[str, Any]], thr_p: float, thr_a: float, p_times: list[float], a_times: list[float],
           art_version: str) -> None:
    for r in rows:
        r["diff_pp"] = 100 * (r["phalanx"] - r["art"])
        r["within_1pp"] = abs(r["diff_pp"]) <= 1.0
    result = {"dataset": args.dataset, "model": "3 x lenet5" if args.dataset == "mnist" else "3 x small-cnn",
              "eps": eps, "clean_accuracy": clean, "train_s": train_s, "rows": rows,
              "pgd_throughput": {"phalanx_ex_per_s": thr_p, "art_ex_per_s": thr_a, "ratio": thr_p / thr_a,
                                 "phalanx_s": p_times, "art_s": a_times},
              "art_version": art_version, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "argv": sys.argv}
    out = ROOT / "benchmarks" / "out" / args.out_name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['model']} on {args.dataset}, eps {eps} (L-inf), clean accuracy {100 * clean:.1f}%\n")
    print("| attack | examples | phalanx robust acc. | ART robust acc. | difference | within 1 pp |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['attack']} | {r['n']} | {100 * r['phalanx']:.1f}% | {100 * r['art']:.1f}% | "
              f"{r['diff_pp']:+.1f} pp | {'yes' if r['within_1pp'] else 'NO'} |")
    tp = result["pgd_throughput"]
    if p_times:
        print(f"\nPGD-50 throughput ({args.repeats} interleaved repeats, median): phalanx {tp['phalanx_ex_per_s']:.0f} ex/s, "
              f"ART {tp['art_ex_per_s']:.0f} ex/s, ratio {tp['ratio']:.2f}")
    if not args.skip_autoattack:
        aa = rows[-1]
        print(f"AutoAttack wall time: phalanx {aa['phalanx_s']:.0f} s, ART {aa['art_s']:.0f} s")


if __name__ == "__main__":
    main()
