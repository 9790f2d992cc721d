"""PGD, AutoAttack, MORA and transfer accuracy side by side for each diversity method's
ensemble (the table MORA's authors say the field is missing), via the robustness card.

The method line-up of ``benchmarks/training_methods.py`` (baseline, ADP, GAL with leaky-ReLU
members, SMD from scratch; DVERGE and SMD+ fine-tuned from the baseline; iGAT on top of ADP), at a
**reduced budget** so that it runs on 2 shared CPU cores: 3 small CNNs on the digits data
(1437 training images), ``--epochs`` from scratch and ``--finetune-epochs`` for the fine-tuned
methods, bogun2022's optimiser. Each ensemble gets the card at its published attack budgets
(PGD-50 step eps/5, AutoAttack standard, MORA standard-t-pre 100 iterations) plus AutoAttack/MORA
examples transferred from an independent standard ensemble of the same architecture; the
worst case is per example over all of them.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/ensemble_attacks_table.py
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch

from phalanx import Ensemble, create_model, load_dataset
from phalanx.evaluation.card import robustness_card
from phalanx.training import TrainConfig, create_method, fit
from phalanx.workflows.evaluation import standard_ensemble

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import loadavg, write_out

COLUMNS = ("pgd", "autoattack", "mora", "transfer-autoattack", "transfer-mora")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--finetune-epochs", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="reduced attack budgets (smoke test)")
    ap.add_argument("--methods", default="baseline,adp,gal,smd,dverge,smd+,igat(adp)")
    ap.add_argument("--out-name", default="ensemble_attacks_table.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    load0 = loadavg()
    data = load_dataset("digits", seed=0)

    def members(seed: int, activation: str | None = None) -> Ensemble:
        torch.manual_seed(seed)
        kw = {"activation": activation} if activation else {}
        return Ensemble([create_model("small-cnn", data.in_shape, data.num_classes, mean=data.mean, std=data.std,
                                      **kw) for _ in range(3)])

    def cfg(epochs: int) -> TrainConfig:
        return TrainConfig(epochs=epochs, batch_size=128, optimizer="adam", lr=1e-3, weight_decay=1e-4,
                           schedule="constant", seed=0, device="cpu")

    ens: dict[str, Ensemble] = {}
    opts: dict[str, dict[str, Any]] = {"dverge": {"eps": 0.2, "step_size": 0.02},  # digits' scale (the demo's)
                                       "igat": {"base": "adp", "eps": args.eps, "steps": 10, "step_size": args.eps / 4}}
    t0 = time.perf_counter()
    for name in args.methods.split(","):
        if name in ("dverge", "smd+"):
            e = copy.deepcopy(ens["baseline"])
            fit(e, create_method(name, **opts.get(name, {})), data, cfg(args.finetune_epochs), progress=False)
        elif name == "igat(adp)":
            e = copy.deepcopy(ens["adp"])
            fit(e, create_method("igat", **opts["igat"]), data, cfg(args.finetune_epochs), progress=False)
        else:
            e = members(0, "leaky_relu" if name == "gal" else None)
            fit(e, create_method(name), data, cfg(args.epochs), progress=False)
        ens[name] = e.eval()
        print(f"trained {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
    source = standard_ensemble(ens["baseline"], data, epochs=args.epochs, seed=1000)
    split = data.test.subset(args.n)
    rows: dict[str, Any] = {}
    for name, e in ens.items():
        t1 = time.perf_counter()
        card = robustness_card(e, split, [0.0, args.eps], source=source, quick=args.quick, sanity=False,
                               generator=torch.Generator().manual_seed(0))
        rows[name] = {"clean": card["curves"]["pgd"][0]["accuracy"],
                      **{c: card["curves"][c][-1]["accuracy"] for c in COLUMNS},
                      "worst": card["worst_case"][-1]["accuracy"], "found_by": card["found_by"][-1],
                      "flags": [f for f in card["flags"] if not f["passed"]], "card_s": round(time.perf_counter() - t1, 1)}
        r = rows[name]
        print(f"| {name} | " + " | ".join(f"{100 * r[k]:.1f}" for k in ("clean", *COLUMNS, "worst"))
              + f" | {len(r['flags'])} | ({r['card_s']} s)", flush=True)
    out = {"benchmark": "ensemble_attacks_table", "args": vars(args), "loadavg_start": load0,
           "loadavg_end": loadavg(), "rows": rows, "wall_s": round(time.perf_counter() - t0, 1)}
    path = write_out(args.out_name, out)
    print("| method | clean | PGD | AutoAttack | MORA | transfer AA | transfer MORA | worst case | flags |")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{100 * r[k]:.1f}" for k in ("clean", *COLUMNS, "worst"))
              + f" | {len(r['flags'])} |")
    print(f"loadavg {load0} -> {out['loadavg_end']}; written {path}")


if __name__ == "__main__":
    main()
