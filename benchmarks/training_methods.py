"""Quality and cost of the diversity-training methods on MNIST with 3 LeNet-5 members.

Trains baseline, ADP, GAL (leaky ReLU members), SMD from scratch; DVERGE and SMD+ from the
trained baseline (the papers' setting); iGAT on top of the trained ADP and DVERGE ensembles
(fine-tuning, as deng2023 sec. 5.3). Then measures, on the same test images:

- white-box accuracy at bogun2022's table-1 setting: eps 0.3, FGSM, R-FGSM (alpha eps/2), PGD,
  BIM, MIM with 10 iterations of eps/10 (bogun2022 sec. 4.2), printed beside the paper's numbers;
- within-ensemble transferability (DVERGE eval_transferability: PGD-50, step eps/5, 5 restarts,
  each member attacked alone, on images all members classify correctly) at eps 0.03 and 0.1;
- per-epoch training cost of every registered method relative to the baseline, one epoch each,
  in one process on the same subset.

Reduced settings on CPU (state them in BENCHMARKS.md): ``--train-size`` images, ``--epochs``.

    nice -n 10 .venv/bin/python benchmarks/training_methods.py [--train-size 10000] [--test-size 500]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from phalanx import Ensemble, create_model, load_dataset
from phalanx.attacks import bim, fgsm, mim, pgd, rfgsm
from phalanx.data import DatasetSplits, Split
from phalanx.ensembles import load_ensemble, save_ensemble
from phalanx.evaluation import transferability_matrix
from phalanx.training import METHODS, TrainConfig, create_method, fit
from phalanx.types import Norm, ThreatModel

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"

# bogun2022 table 1, MNIST, 3 x LeNet-5, white-box eps 0.3 (clean, FGSM, R-FGSM, PGD, BIM, MIM)
PAPER = {
    "baseline": [99.3, 20.3, 73.5, 2.9, 4.2, 5.5],
    "adp": [98.8, 43.8, 89.6, 10.4, 19.6, 14.8],
    "gal": [99.3, 72.7, 89.0, 14.4, 28.2, 38.9],
    "dverge": [99.4, 44.2, 85.5, 10.6, 16.0, 20.6],
    "smd": [99.3, 70.7, 91.3, 21.4, 34.3, 43.8],
    "smd+": [99.4, 83.4, 93.8, 54.7, 68.0, 71.0],
}
ATTACKS = {  # bogun2022 sec. 4.2: 10 iterations of eps/10; R-FGSM random step eps/2
    "FGSM": fgsm(), "R-FGSM": rfgsm(), "PGD": pgd(steps=10, step_size=0.1, restarts=1),
    "BIM": bim(steps=10), "MIM": mim(steps=10),
}


def members(data: DatasetSplits, m: int, seed: int, activation: str = "relu") -> Ensemble:
    torch.manual_seed(seed)
    return Ensemble([create_model("lenet5", data.in_shape, data.num_classes, mean=data.mean, std=data.std,
                                  activation=activation) for _ in range(m)])


def accuracy_under(ens: Ensemble, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int) -> dict[str, float]:
    ens.eval()
    out: dict[str, float] = {}
    with torch.no_grad():
        out["Clean"] = float((ens(x).argmax(-1) == y).float().mean())
    threat = ThreatModel(Norm.LINF, eps)
    for name, attack in ATTACKS.items():
        adv = attack(ens, x, y, threat, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            out[name] = float((ens(adv).argmax(-1) == y).float().mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-size", type=int, default=10000)
    ap.add_argument("--test-size", type=int, default=500)
    ap.add_argument("--transfer-size", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=5, help="epochs for models trained from scratch")
    ap.add_argument("--finetune-epochs", type=int, default=3, help="epochs for DVERGE / SMD+ from the baseline")
    ap.add_argument("--igat-epochs", type=int, default=2)
    ap.add_argument("--igat-eps", type=float, default=0.3)
    ap.add_argument("--cost-size", type=int, default=2000, help="training images for the per-epoch cost run")
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    ap.add_argument("--dverge-eps", type=float, default=None,
                    help="only: DVERGE with this distillation eps from the saved baseline of a full run")
    args = ap.parse_args()
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)

    full = load_dataset("mnist", data_dir=Path(args.data_dir), seed=args.seed)
    data = dataclasses.replace(full, train=full.train.subset(args.train_size), val=full.val.subset(500))
    if args.dverge_eps is not None:
        dverge_eps_run(full, data, args)
        return
    x_test, y_test = full.test.x[: args.test_size], full.test.y[: args.test_size]
    # bogun2022 sec. 4.2: Adam, lr 1e-3, weight decay 1e-4, batch 128 for every method
    def cfg(epochs: int) -> TrainConfig:
        return TrainConfig(epochs=epochs, batch_size=128, optimizer="adam", lr=1e-3, weight_decay=1e-4,
                           schedule="constant", seed=args.seed, device="cpu")

    ensembles: dict[str, Ensemble] = {}
    train_log: dict[str, Any] = {}

    def train(name: str, method: str, ens: Ensemble, epochs: int, **opts: Any) -> None:
        t0 = time.perf_counter()
        res = fit(ens, create_method(method, **opts), data, cfg(epochs), progress=False)
        ensembles[name] = ens.eval()
        train_log[name] = {"method": method, "options": opts, "epochs": epochs,
                           "wall_s": round(time.perf_counter() - t0, 1), "history": res.history}
        print(f"trained {name}: {train_log[name]['wall_s']} s, val {res.history[-1].get('val_accuracy')}", flush=True)

    m = args.members
    train("baseline", "baseline", members(data, m, args.seed), args.epochs)
    train("adp", "adp", members(data, m, args.seed), args.epochs)
    train("gal", "gal", members(data, m, args.seed, "leaky_relu"), args.epochs)
    train("smd", "smd", members(data, m, args.seed), args.epochs)
    train("dverge", "dverge", copy.deepcopy(ensembles["baseline"]), args.finetune_epochs)
    train("smd+", "smd+", copy.deepcopy(ensembles["baseline"]), args.finetune_epochs)
    igat_opts = {"eps": args.igat_eps, "steps": 10, "step_size": args.igat_eps / 4}
    train("igat(adp)", "igat", copy.deepcopy(ensembles["adp"]), args.igat_epochs, base="adp", **igat_opts)
    train("igat(dverge)", "igat", copy.deepcopy(ensembles["dverge"]), args.igat_epochs, base="dverge", **igat_opts)
    # the base methods fine-tuned for the same extra epochs without iGAT (a fair reference)
    train("adp (+ft)", "adp", copy.deepcopy(ensembles["adp"]), args.igat_epochs)
    train("dverge (+ft)", "dverge", copy.deepcopy(ensembles["dverge"]), args.igat_epochs)

    whitebox = {n: accuracy_under(e, x_test, y_test, 0.3, args.seed) for n, e in ensembles.items()}
    pgd_small = {}
    for n, e in ensembles.items():
        adv = pgd(steps=10, step_size=0.1)(e, x_test, y_test, ThreatModel(Norm.LINF, 0.1),
                                            generator=torch.Generator().manual_seed(args.seed))
        with torch.no_grad():
            pgd_small[n] = float((e(adv).argmax(-1) == y_test).float().mean())

    transfer: dict[str, Any] = {}
    pool = Split(full.test.x[: args.transfer_size * 2], full.test.y[: args.transfer_size * 2])
    for n in ("baseline", "dverge", "smd", "smd+"):
        transfer[n] = {}
        for eps in (0.03, 0.1):  # DVERGE's protocol (eps 0.03) and a larger MNIST-scale eps
            transfer[n][str(eps)] = transferability_matrix(ensembles[n], pool, eps, restarts=5,
                                                           limit=args.transfer_size,
                                                           generator=torch.Generator().manual_seed(args.seed))
        print(f"transfer {n}: " + ", ".join(f"eps {k}: {v['mean_pairwise']:.3f}" for k, v in transfer[n].items()),
              flush=True)
    (OUT / "training_methods").mkdir(exist_ok=True)
    for n, e in ensembles.items():
        save_ensemble(e, OUT / "training_methods" / f"{n.replace('(', '_').replace(')', '').replace(' ', '')}.pt",
                      dataset="mnist")

    cost: dict[str, Any] = {}
    if not args.skip_cost:
        cost = per_epoch_cost(full, args, m)

    payload = {"args": vars(args), "machine": platform.processor() or platform.machine(),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "train": train_log,
               "whitebox_eps0.3": whitebox, "pgd_eps0.1": pgd_small, "transfer": transfer, "cost": cost}
    (OUT / "training_methods.json").write_text(json.dumps(payload, indent=1))
    print_tables(payload)


def dverge_eps_run(full: DatasetSplits, data: DatasetSplits, args: argparse.Namespace) -> None:
    """DVERGE at another distillation eps, fine-tuned from the full run's saved baseline."""
    base = load_ensemble(OUT / "training_methods" / "baseline.pt")
    ens = copy.deepcopy(base)
    eps, step = args.dverge_eps, args.dverge_eps / 10  # 10 steps of eps/10, as the default 0.07 / 0.007
    cfg = TrainConfig(epochs=args.finetune_epochs, batch_size=128, optimizer="adam", lr=1e-3, weight_decay=1e-4,
                      schedule="constant", seed=args.seed, device="cpu")
    t0 = time.perf_counter()
    res = fit(ens, create_method("dverge", eps=eps, step_size=step), data, cfg, progress=False)
    ens.eval()
    pool = Split(full.test.x[: args.transfer_size * 2], full.test.y[: args.transfer_size * 2])
    out: dict[str, Any] = {"dverge_eps": eps, "wall_s": round(time.perf_counter() - t0, 1), "history": res.history,
                           "whitebox_eps0.3": accuracy_under(ens, full.test.x[: args.test_size],
                                                             full.test.y[: args.test_size], 0.3, args.seed),
                           "transfer": {}}
    for name, e in (("baseline", base), (f"dverge(eps={eps:g})", ens)):
        out["transfer"][name] = {str(t): transferability_matrix(e, pool, t, restarts=5, limit=args.transfer_size,
                                                                generator=torch.Generator().manual_seed(args.seed))
                                 for t in (0.03, 0.1, 0.2)}
    (OUT / f"training_methods_dverge_eps{eps:g}.json").write_text(json.dumps(out, indent=1))
    print("| ensemble | eps 0.03 | eps 0.1 | eps 0.2 |\n|---|---|---|---|")
    for name, t in out["transfer"].items():
        print(f"| {name} | " + " | ".join(f"{100 * v['mean_pairwise']:.1f}" for v in t.values()) + " |")
    print("white-box eps 0.3:", {k: round(100 * v, 1) for k, v in out["whitebox_eps0.3"].items()})


def per_epoch_cost(full: DatasetSplits, args: argparse.Namespace, m: int) -> dict[str, Any]:
    """One epoch of every registered method on the same subset, in one process."""
    data = dataclasses.replace(full, train=full.train.subset(args.cost_size), val=full.val.subset(1))
    src = OUT / "eat_source.pt"
    save_ensemble(members(data, m, 123).eval(), src, dataset="mnist")
    opts: dict[str, dict[str, Any]] = {
        "eat": {"sources": [str(src)]}, "advt": {"eps": 0.3, "step_size": 0.3 / 4},
        "igat": {"base": "adp", "eps": 0.3, "step_size": 0.3 / 4},
        "dverge+advt": {"adv_eps": 0.3, "adv_step_size": 0.3 / 4},
    }
    out: dict[str, Any] = {}
    cfg = TrainConfig(epochs=1, batch_size=128, optimizer="adam", lr=1e-3, schedule="constant", device="cpu")
    for name in ["baseline", *[n for n in METHODS.names() if n != "baseline"], "igat(dverge)"]:
        method = (create_method("igat", base="dverge", eps=0.3, step_size=0.3 / 4) if name == "igat(dverge)"
                  else create_method(name, **opts.get(name, {})))
        act = "leaky_relu" if name == "gal" else "relu"
        res = fit(members(data, m, 1, act), method, data, cfg, progress=False)
        out[name] = {"epoch_s": res.history[0]["train_time_s"]}
        print(f"cost {name}: {out[name]['epoch_s']} s", flush=True)
    base = out["baseline"]["epoch_s"]
    for v in out.values():
        v["relative"] = round(v["epoch_s"] / base, 2)
    return out


def print_tables(p: dict[str, Any]) -> None:
    cols = ["Clean", "FGSM", "R-FGSM", "PGD", "BIM", "MIM"]
    print("\n### White-box accuracy (%), eps 0.3 (phalanx / paper table 1)\n")
    print("| method | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for n, r in p["whitebox_eps0.3"].items():
        paper = PAPER.get(n)
        cells = [f"{100 * r[c]:.1f}" + (f" / {paper[i]:.1f}" if paper else "") for i, c in enumerate(cols)]
        print(f"| {n} | " + " | ".join(cells) + " |")
    print("\n### PGD-10 accuracy (%) at eps 0.1\n")
    print("| method | accuracy |\n|---|---|")
    for n, v in p["pgd_eps0.1"].items():
        print(f"| {n} | {100 * v:.1f} |")
    print("\n### Within-ensemble transferability: mean off-diagonal attack success (%)\n")
    print("| ensemble | eps 0.03 | eps 0.1 | n |\n|---|---|---|---|")
    for n, t in p["transfer"].items():
        print(f"| {n} | {100 * t['0.03']['mean_pairwise']:.1f} | {100 * t['0.1']['mean_pairwise']:.1f} | "
              f"{t['0.03']['n']} |")
    for n, t in p["transfer"].items():
        for eps, v in t.items():
            rows = [" ".join(f"{100 * a:5.1f}" for a in row) for row in v["matrix"]]
            print(f"\n{n}, eps {eps} (rows: source member; columns: members, ensemble):\n    " + "\n    ".join(rows))
    if p["cost"]:
        print("\n### Per-epoch cost relative to the baseline\n")
        print("| method | epoch (s) | relative |\n|---|---|---|")
        for n, v in p["cost"].items():
            print(f"| {n} | {v['epoch_s']:.1f} | {v['relative']:.2f} |")


if __name__ == "__main__":
    main()
