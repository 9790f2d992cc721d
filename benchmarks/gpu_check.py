"""One prepared GPU check, under 10 minutes on one GPU, writing JSON:

1. the CUDA-marked tests (``pytest -m cuda tests/gpu``);
2. one epoch of every training method on 3 x ResNet-20 with CIFAR-shaped synthetic data
   (3 x 32 x 32, 10 classes; the paper's method defaults), wall time per method;
3. PGD-50 and AutoAttack (standard) throughput on that ensemble beside the bare forward+backward
   time of the same ensemble on the same batch (PGD-50 ideally costs 50 such passes);
4. data-parallel training on 2 GPUs (``phalanx.training.distributed``, NCCL) against 1 GPU, when
   two are present.

``--tiny --device cpu`` runs the same code on tiny sizes (2 gloo ranks for step 4); a test runs it
in CI so that the script cannot rot.

Run on a GPU machine:  OMP_NUM_THREADS=1 python benchmarks/gpu_check.py
Writes benchmarks/out/gpu_check.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]

#: per-method options in --tiny mode (fewer inner steps; the full run uses the paper defaults)
TINY_OPTIONS: dict[str, dict[str, Any]] = {
    "dverge": {"steps": 1}, "dverge+advt": {"steps": 1, "adv_steps": 1}, "smd+": {"steps": 1},
    "trs": {"steps": 1}, "advt": {"steps": 1}, "eat": {"steps": 1}, "igat": {"steps": 1},
}


def synthetic_cifar(n_train: int, n_test: int, seed: int = 0) -> Any:
    """CIFAR-shaped random images (values in [0, 1]) with random labels."""
    from phalanx.data import DatasetSplits, Split

    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        return Split(torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))

    return DatasetSplits("synthetic-cifar", split(n_train), split(max(2, n_test // 4)), split(n_test),
                         tuple(str(i) for i in range(10)), (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))


def ensemble(data: Any, members: int = 3, seed: int = 0) -> Any:
    from phalanx import Ensemble, create_model

    torch.manual_seed(seed)
    return Ensemble([create_model("resnet20", data.in_shape, 10, mean=data.mean, std=data.std)
                     for _ in range(members)])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def run_tests(tiny: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", str(REPO / "tests" / "gpu"), "-q", "-p", "no:cacheprovider"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", tail[0])}
    return {"returncode": proc.returncode, "summary": tail[0], "counts": counts,
            "wall_s": time.perf_counter() - t0}


def train_methods(data: Any, device: torch.device, batch: int, tiny: bool, tmp: Path) -> dict[str, Any]:
    from phalanx.ensembles import save_ensemble
    from phalanx.training import METHODS, TrainConfig, create_method, fit

    held_out = tmp / "eat_source.pt"  # EAT's static source: another (untrained) 3 x ResNet-20 ensemble
    save_ensemble(ensemble(data, seed=1), held_out, dataset=data.name)
    out: dict[str, Any] = {}
    for name in METHODS.names():
        ens = ensemble(data)
        opts = dict(TINY_OPTIONS.get(name, {})) if tiny else {}
        if name == "eat":
            opts["sources"] = [str(held_out)]
        cfg = TrainConfig(epochs=1, batch_size=batch, lr=0.01, seed=0, device=str(device), eval_batch_size=batch)
        try:
            res, wall = timed(lambda ens=ens, name=name, opts=opts, cfg=cfg:
                              fit(ens, create_method(name, **opts), data, cfg, progress=False), device)
            rec = res.history[-1]
            out[name] = {"ok": True, "epoch_s": wall, "images_per_s": len(data.train) / wall,
                         "train_loss": rec["train_loss"], "options": opts}
        except Exception as exc:  # record and go on: one broken method must not hide the others
            out[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        print(f"  train {name}: {out[name]}", flush=True)
    return out


def attack_throughput(data: Any, device: torch.device, n_pgd: int, n_aa: int, tiny: bool) -> dict[str, Any]:
    from phalanx.attacks import create_attack
    from phalanx.types import Norm, ThreatModel

    ens = ensemble(data).to(device).eval()
    threat = ThreatModel(Norm.LINF, 8 / 255)
    res: dict[str, Any] = {}
    for label, n, attack in [
        ("pgd50", n_pgd, create_attack("pgd", steps=50)),
        ("autoattack", n_aa, create_attack("autoattack", **({"n_iter": 2, "n_queries": 10, "fab_iter": 2}
                                                             if tiny else {}))),
    ]:
        x, y = data.test.x[:n].to(device), data.test.y[:n].to(device)

        def bare(x: torch.Tensor = x, y: torch.Tensor = y) -> None:
            xi = x.clone().requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(ens(xi), y)
            torch.autograd.grad(loss, xi)

        bare()  # warm-up (cuDNN autotuning, allocator)
        _, t_pass = timed(lambda bare=bare: [bare() for _ in range(5)], device)
        t_pass /= 5
        gen = torch.Generator(device="cpu").manual_seed(0)
        adv, t_attack = timed(lambda attack=attack, x=x, y=y, gen=gen: attack(ens, x, y, threat, generator=gen), device)
        inside = float((adv - x).abs().max()) <= threat.eps + 1e-6
        with torch.no_grad():
            robust = float((ens(adv).argmax(-1) == y).float().mean())
        res[label] = {"images": n, "attack_s": t_attack, "images_per_s": n / t_attack,
                      "bare_forward_backward_s": t_pass, "equivalent_passes": t_attack / t_pass,
                      "perturbation_inside_ball": inside, "robust_accuracy": robust}
        if label == "pgd50":
            res[label]["time_vs_50_bare_passes"] = t_attack / (50 * t_pass)
        print(f"  {label}: {res[label]}", flush=True)
    return res


def _ddp_job(n_train: int, batch: int, device: str, out_path: str) -> None:
    from phalanx.training import TrainConfig, create_method, fit
    from phalanx.training import distributed as ddp

    data = synthetic_cifar(n_train, 8)
    ens = ensemble(data)
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    cfg = TrainConfig(epochs=1, batch_size=batch, lr=0.01, seed=0, device=str(dev), eval_batch_size=batch)
    _, wall = timed(lambda: fit(ens, create_method("baseline"), data, cfg, progress=False), dev)
    if ddp.is_main():
        Path(out_path).write_text(json.dumps({"epoch_s": wall, "ranks": ddp.current().world if ddp.current() else 1}))


def ddp_check(device: torch.device, n_train: int, batch: int, tmp: Path) -> dict[str, Any]:
    from phalanx.training import distributed as ddp

    kind = device.type
    if kind == "cuda" and torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU visible; data-parallel check needs 2"}
    res: dict[str, Any] = {"backend": "nccl" if kind == "cuda" else "gloo"}
    one, two = tmp / "ddp1.json", tmp / "ddp2.json"
    t0 = time.perf_counter()
    _ddp_job(n_train, batch, kind, str(one))
    res["one_process_wall_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ddp.run_local(2, _ddp_job, (n_train, batch, kind, str(two)), device=kind, timeout_s=600)
    res["two_process_wall_s"] = time.perf_counter() - t0  # includes process start and group set-up
    res["one_process_epoch_s"] = json.loads(one.read_text())["epoch_s"]
    res["two_process_epoch_s"] = json.loads(two.read_text())["epoch_s"]
    res["epoch_speedup"] = res["one_process_epoch_s"] / res["two_process_epoch_s"]
    print(f"  ddp: {res}", flush=True)
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto, cuda or cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (the CI path)")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "gpu_check.json"))
    args = ap.parse_args(argv)
    from phalanx.training import resolve_device

    device = resolve_device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    torch.set_num_threads(1 if device.type == "cpu" else max(1, torch.get_num_threads()))
    n_train, batch, n_pgd, n_aa = (8, 8, 4, 2) if args.tiny else (2048, 128, 512, 128)
    t_start = time.perf_counter()
    res: dict[str, Any] = {
        "device": str(device), "tiny": args.tiny, "torch": torch.__version__, "python": platform.python_version(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "loadavg_start": open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else None,
        "sizes": {"train_images": n_train, "batch": batch, "pgd_images": n_pgd, "autoattack_images": n_aa},
    }
    if not args.skip_tests:
        print("CUDA-marked tests", flush=True)
        res["tests"] = run_tests(args.tiny)
    data = synthetic_cifar(n_train, max(n_pgd, n_aa))
    print("one epoch of every training method on 3 x ResNet-20", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res["training"] = train_methods(data, device, batch, args.tiny, out.parent)
    print("attack throughput", flush=True)
    res["attacks"] = attack_throughput(data, device, n_pgd, n_aa, args.tiny)
    print("data-parallel training", flush=True)
    res["ddp"] = ddp_check(device, n_train if not args.tiny else 12, batch, out.parent)
    res["total_s"] = time.perf_counter() - t_start
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out} ({res['total_s']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
