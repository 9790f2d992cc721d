"""phalanx's standard AutoAttack against torchattacks' port of the original AutoAttack.

ART (benchmarks/attacks_crosscheck.py) has no FAB-T and no APGD-T, so it cannot run the standard
composition. torchattacks 3.5.1 ports the reference implementation's standard version (APGD-CE,
APGD-T on DLR with 9 targets, FAB-T with 9 targets, Square with 5000 queries). It is *not* a
phalanx dependency and it declares torchvision as a requirement without importing it, so install
it without dependencies into a throwaway folder:

    pip download --no-deps torchattacks==3.5.1 -d /tmp/ta && unzip -q /tmp/ta/*.whl -d /tmp/ta/src
    PYTHONPATH=/tmp/ta/src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/autoattack_crosscheck.py --n 100

Same model and examples as attacks_crosscheck.py (3 x LeNet-5, mean of probabilities, trained
2 epochs on 12 000 MNIST images, seed 0); both libraries attack the ensemble's log-probabilities.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attacks_crosscheck import MNIST_DIR, ROOT, accuracy, phalanx_run, train_ensemble


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--steps", type=int, default=100, choices=[10, 100],
                    help="100: torchattacks components at the published defaults; 10: torchattacks.AutoAttack as shipped")
    args = ap.parse_args()
    try:
        import torchattacks
    except ImportError:
        sys.exit("torchattacks not importable: see the install line in this script's docstring")
    torch.set_num_threads(1)
    ens, data = train_ensemble("mnist" if MNIST_DIR.is_dir() else "digits", 12000, 2, 0)
    x, y = data.test.x[: args.n], data.test.y[: args.n]
    clean = accuracy(ens, x, y)
    t0 = time.perf_counter()
    p_adv = phalanx_run("autoattack", ens, x, y, args.eps, args.batch_size)
    p_s = time.perf_counter() - t0
    # torchattacks.AutoAttack(version="standard") leaves APGD, APGD-T and FAB at torchattacks' own
    # default of 10 steps; the published standard AutoAttack uses 100, so compose it explicitly
    comps = [torchattacks.APGD(ens, norm="Linf", eps=args.eps, steps=100, n_restarts=1, loss="ce", seed=0),
             torchattacks.APGDT(ens, norm="Linf", eps=args.eps, steps=100, n_restarts=1, n_classes=10, seed=0),
             torchattacks.FAB(ens, norm="Linf", eps=args.eps, steps=100, n_restarts=1, multi_targeted=True,
                              n_classes=10, seed=0),
             torchattacks.Square(ens, norm="Linf", eps=args.eps, n_queries=5000, n_restarts=1, seed=0)]
    ta = torchattacks.MultiAttack(comps) if args.steps == 100 else torchattacks.AutoAttack(
        ens, norm="Linf", eps=args.eps, version="standard", n_classes=10, seed=0)
    t0 = time.perf_counter()
    t_adv = torch.cat([ta(x[i:i + args.batch_size], y[i:i + args.batch_size]) for i in range(0, len(x), args.batch_size)])
    t_s = time.perf_counter() - t0
    t_adv = t_adv.detach()
    linf = float((t_adv - x).abs().amax())
    res = {"n": len(x), "eps": args.eps, "clean": clean, "phalanx": accuracy(ens, p_adv, y),
           "torchattacks": accuracy(ens, t_adv, y), "phalanx_s": p_s, "torchattacks_s": t_s,
           "torchattacks_version": torchattacks.__version__, "torchattacks_max_linf": linf,
           "torchattacks_steps": args.steps}
    res["diff_pp"] = 100 * (res["phalanx"] - res["torchattacks"])
    out = ROOT / "benchmarks" / "out" / f"autoattack_crosscheck_steps{args.steps}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print("| AutoAttack (standard) | examples | clean | robust acc. | wall time (s) |")
    print("|---|---|---|---|---|")
    print(f"| phalanx | {res['n']} | {100 * clean:.1f}% | {100 * res['phalanx']:.1f}% | {p_s:.0f} |")
    print(f"| torchattacks {torchattacks.__version__} | {res['n']} | {100 * clean:.1f}% | "
          f"{100 * res['torchattacks']:.1f}% | {t_s:.0f} |")
    print(f"difference {res['diff_pp']:+.1f} pp (max |delta| of torchattacks' examples {linf:.4f})")


if __name__ == "__main__":
    main()
