"""Attack throughput: phalanx's PGD and APGD-CE against ART, foolbox and torchattacks and against a
bare PyTorch loop doing the same forward/backward passes, on 3-member LeNet-5 (MNIST-shaped) and
ResNet-20 (CIFAR-shaped) ensembles.

Every side attacks the *same* ensemble module (mean of member probabilities; its log output is
what the libraries treat as logits, so cross-entropy on it is the ensemble's NLL) on the same
inputs, with labels set to the ensemble's clean predictions so that every example is attacked
by every side (APGD implementations skip examples that are already misclassified). phalanx's
attacks differentiate the module's inference view (eval-mode BatchNorm folded, activations after
max-pooling: the same function with fewer passes, ``phalanx.models.inference``); "bare loop, view"
is the bare loop over that view, i.e. the same passes as phalanx, so that ratio is phalanx's loop
overhead, and "bare loop" over the module as given is what a user's own loop costs. Untrained
members are enough: the work per step does not depend on the weights. Sides alternate within
each repeat (order reversed every other repeat); medians over repeats; ratios within one run.

None of the three libraries is a phalanx dependency: install them into a scratch folder only,

    pip install --no-deps --target /tmp/atklibs adversarial-robustness-toolbox foolbox eagerpy \\
        torchattacks==3.5.1 six GitPython gitdb smmap
    PYTHONPATH=/tmp/atklibs OMP_NUM_THREADS=1 .venv/bin/python benchmarks/attack_throughput.py

A library that cannot be imported is skipped (its column says so).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common import loadavg, write_out  # benchmarks/ is on sys.path when a script runs
from phalanx.attacks import create_attack
from phalanx.ensembles import Ensemble
from phalanx.models import create_model
from phalanx.models.inference import inference_view
from phalanx.types import Norm, ThreatModel

ROOT = Path(__file__).resolve().parents[1]
SETUPS = {"lenet5": ((1, 28, 28), 0.1), "resnet20": ((3, 32, 32), 8 / 255)}

Runner = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def bare_pgd(model: nn.Module, eps: float, alpha: float, steps: int) -> Runner:
    """The minimal PGD: uniform start, ``steps`` x (forward, input gradient, signed step, projection)."""
    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
        for _ in range(steps):
            adv.requires_grad_(True)
            loss = nn.functional.cross_entropy(model(adv), y)
            g, = torch.autograd.grad(loss, adv)
            adv = torch.min(torch.max(adv.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
        return adv
    return run


def phalanx_attack(model: nn.Module, eps: float, name: str, **kw: Any) -> Runner:
    atk = create_attack(name, **kw)
    threat = ThreatModel(Norm.LINF, eps, (0.0, 1.0))
    return lambda x, y: atk(model, x, y, threat)


def library_runners(model: nn.Module, eps: float, alpha: float, steps: int, n_classes: int,
                    shape: tuple[int, ...], batch: int) -> tuple[dict[str, dict[str, Runner]], dict[str, str]]:
    """PGD / APGD-CE runners of each importable library, and the versions found."""
    runners: dict[str, dict[str, Runner]] = {"pgd": {}, "apgd-ce": {}}
    versions: dict[str, str] = {}
    try:
        import art
        from art.attacks.evasion import AutoProjectedGradientDescent, ProjectedGradientDescentPyTorch
        from art.estimators.classification import PyTorchClassifier

        clf = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=shape, nb_classes=n_classes,
                                clip_values=(0.0, 1.0), device_type="cpu")
        art_pgd = ProjectedGradientDescentPyTorch(clf, norm=np.inf, eps=eps, eps_step=alpha, max_iter=steps,
                                                  num_random_init=1, batch_size=batch, verbose=False)
        art_apgd = AutoProjectedGradientDescent(clf, norm=np.inf, eps=eps, eps_step=2 * eps, max_iter=steps,
                                                nb_random_init=1, batch_size=batch, loss_type="cross_entropy",
                                                verbose=False)
        runners["pgd"]["art"] = lambda x, y: torch.from_numpy(art_pgd.generate(x.numpy(), y.numpy()))
        runners["apgd-ce"]["art"] = lambda x, y: torch.from_numpy(art_apgd.generate(x.numpy(), y.numpy()))
        versions["art"] = art.__version__
    except ImportError as exc:
        versions["art"] = f"not installed ({exc})"
    try:
        import foolbox as fb

        fmodel = fb.PyTorchModel(model, bounds=(0.0, 1.0))
        fb_pgd = fb.attacks.LinfPGD(abs_stepsize=alpha, steps=steps, random_start=True)
        runners["pgd"]["foolbox"] = lambda x, y: fb_pgd(fmodel, x, y, epsilons=eps)[1]
        versions["foolbox"] = fb.__version__
    except ImportError as exc:
        versions["foolbox"] = f"not installed ({exc})"
    try:
        import torchattacks

        ta_pgd = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
        ta_apgd = torchattacks.APGD(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, loss="ce", seed=0)
        runners["pgd"]["torchattacks"] = lambda x, y: ta_pgd(x, y)
        runners["apgd-ce"]["torchattacks"] = lambda x, y: ta_apgd(x, y)
        versions["torchattacks"] = torchattacks.__version__
    except ImportError as exc:
        versions["torchattacks"] = f"not installed ({exc})"
    return runners, versions


def _spread(ratios: list[float]) -> dict[str, float]:
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def one_setup(arch: str, args: argparse.Namespace) -> dict[str, Any]:
    shape, eps = SETUPS[arch]
    n = args.n[arch]
    torch.manual_seed(0)
    ens = Ensemble([create_model(arch, shape, 10) for _ in range(3)]).eval()
    for p in ens.parameters():
        p.requires_grad_(False)  # no side needs parameter gradients
    x = torch.rand(n, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = ens(x).argmax(-1)  # every example starts correctly classified
    alpha = eps / 4
    libs, versions = library_runners(ens, eps, alpha, args.steps, 10, shape, n)
    sides: dict[str, dict[str, Runner]] = {
        "pgd": {"phalanx": phalanx_attack(ens, eps, "pgd", steps=args.steps, step_size=alpha / eps),
                "bare loop": bare_pgd(ens, eps, alpha, args.steps),
                "bare loop, view": bare_pgd(inference_view(ens), eps, alpha, args.steps), **libs["pgd"]},
        "apgd-ce": {"phalanx": phalanx_attack(ens, eps, "apgd-ce", n_iter=args.steps), **libs["apgd-ce"]},
    }
    out: dict[str, Any] = {"images": n, "eps": eps, "steps": args.steps, "versions": versions, "attacks": {}}
    for attack, runners in sides.items():
        times: dict[str, list[float]] = {k: [] for k in runners}
        cpu: dict[str, list[float]] = {k: [] for k in runners}
        for r in range(args.repeats + 1):  # round 0 warms up
            for name in (list(runners) if r % 2 == 0 else list(reversed(runners))):
                t0, c0 = time.perf_counter(), time.process_time()
                adv = runners[name](x, y)
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                assert float((adv.detach() - x).abs().max()) <= eps + 1e-5, f"{name} left the eps-ball"
                if r > 0:
                    times[name].append(dt)
                    cpu[name].append(dc)
        med = {k: statistics.median(v) for k, v in times.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
        out["attacks"][attack] = {"times_s": times, "cpu_s": cpu, "median_s": med, "median_cpu_s": med_cpu,
                                  "images_per_s": {k: n / v for k, v in med.items()},
                                  "phalanx_speed_ratio": {k: v / med["phalanx"] for k, v in med.items()},
                                  "phalanx_cpu_ratio": {k: v / med_cpu["phalanx"] for k, v in med_cpu.items()},
                                  "paired_cpu_ratio": {k: _spread([a / b for a, b in zip(v, cpu["phalanx"], strict=True)])
                                                       for k, v in cpu.items()}}
        print(f"{arch} {attack}: " + ", ".join(f"{k} {v:.3f} s (cpu {med_cpu[k]:.3f})" for k, v in med.items()),
              flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument("--n-lenet5", type=int, default=256)
    ap.add_argument("--n-resnet20", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    args.n = {"lenet5": args.n_lenet5, "resnet20": args.n_resnet20}
    torch.set_num_threads(1)
    doc: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "n"}, "load_before": loadavg(),
                           "setups": {}}
    for arch in args.archs:
        doc["setups"][arch] = one_setup(arch, args)
    doc["load_after"] = loadavg()
    write_out("attack_throughput.json", doc, indent=1)
    print(f"\nload average before / after: {doc['load_before']} / {doc['load_after']}")
    print("\n| ensemble | attack | side | median wall s | median CPU s | phalanx speed ratio, wall (side / phalanx) "
          "| CPU | per-repeat CPU ratios: median [min-max] |")
    print("|---|---|---|---|---|---|---|---|")
    for arch, s in doc["setups"].items():
        for attack, a in s["attacks"].items():
            for side, t in a["median_s"].items():
                print(f"| 3 x {arch} | {attack} | {side} | {t:.3f} | {a['median_cpu_s'][side]:.3f} | "
                      f"{a['phalanx_speed_ratio'][side]:.3f} | {a['phalanx_cpu_ratio'][side]:.3f} | "
                      "{median:.3f} [{min:.2f}-{max:.2f}] |".format(**a["paired_cpu_ratio"][side]))


if __name__ == "__main__":
    main()
