"""phalanx's DVERGE epoch against the authors' DVERGE trainer (github.com/zjysteven/DVERGE).

The reference is *not* part of phalanx: pass the folder of an unpacked snapshot of the authors'
repository (e.g. ``git --git-dir=<mirror> archive HEAD | tar -x -C /tmp/dverge_ref``). Their
code expects CUDA, torchvision, advertorch and tensorboard; on a CPU-only machine this script
shims them in memory (``.cuda()`` becomes a no-op, advertorch's ``NormalizeByChannelMeanStd`` is
``(x - mean) / std``, the tensorboard writer and torchvision are empty stand-ins) and then runs
their ``DVERGE_Trainer.train`` unchanged. Both sides train 3 ResNet-20 members with their own
SGD optimizers (lr 0.1, momentum 0.9, wd 1e-4) on the same synthetic CIFAR-shaped data, batch
size, distillation settings (eps 0.07, 10 steps of 0.007, momentum) and a fixed distillation
layer; epochs alternate between the two implementations (interleaved repeats in one process).

    nice -n 10 .venv/bin/python benchmarks/dverge_reference_speed.py --reference /tmp/dverge_ref

Both sides' matrix-product and convolution FLOPs per epoch (``FlopCounterMode``, one extra
untimed epoch each) go into the JSON, so the speed-up can be split into less work and faster work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common import count_flops, loadavg  # benchmarks/ is on sys.path when a script runs
from phalanx import Ensemble, create_model
from phalanx.data import DatasetSplits, Split
from phalanx.training import DVERGE, TrainConfig, fit

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def _shim_reference_imports() -> None:
    """Stand-ins for the reference's GPU-only and optional imports (in memory only)."""
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]

    class NormalizeByChannelMeanStd(nn.Module):
        def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
            super().__init__()
            self.register_buffer("mean", mean.view(1, -1, 1, 1))
            self.register_buffer("std", std.view(1, -1, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x - self.mean) / self.std

    adv = types.ModuleType("advertorch")
    adv_utils = types.ModuleType("advertorch.utils")
    adv_utils.NormalizeByChannelMeanStd = NormalizeByChannelMeanStd  # type: ignore[attr-defined]
    tv = types.ModuleType("torchvision")
    tv.datasets = types.ModuleType("torchvision.datasets")  # type: ignore[attr-defined]
    tv.transforms = types.ModuleType("torchvision.transforms")  # type: ignore[attr-defined]
    tb = types.ModuleType("torch.utils.tensorboard")

    class SummaryWriter:
        def __init__(self, *a: Any, **k: Any) -> None: ...
        def add_scalar(self, *a: Any, **k: Any) -> None: ...
        def add_scalars(self, *a: Any, **k: Any) -> None: ...

    tb.SummaryWriter = SummaryWriter  # type: ignore[attr-defined]
    sys.modules.update({"advertorch": adv, "advertorch.utils": adv_utils, "torchvision": tv,
                        "torchvision.datasets": tv.datasets, "torchvision.transforms": tv.transforms,  # type: ignore[attr-defined]
                        "torch.utils.tensorboard": tb})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", required=True, help="folder of the unpacked authors' repository")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--layer", type=int, default=20, help="fixed distillation layer (20 = logits)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-nchw", action="store_true", help="skip phalanx with memory_format='contiguous'")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "dverge_reference_speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    ref = Path(args.reference).resolve()
    _shim_reference_imports()
    sys.path.insert(0, str(ref))
    sys.path.insert(0, str(ref / "train"))
    results = {"args": vars(args), "load_before": loadavg(), "batch_sizes": {}}
    for bs in args.batch_sizes:
        results["batch_sizes"][str(bs)] = one_batch_size(args, bs)
    results["load_after"] = loadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\nload average before / after: {results['load_before']} / {results['load_after']}")
    print(f"\n| batch | implementation | epoch wall s (median of {args.repeats}) | epoch CPU s | GFLOP per epoch | "
          "speed-up vs authors' (wall) | (CPU) | (CPU, median of per-round ratios) |")
    print("|---|---|---|---|---|---|---|---|")
    for bs, r in results["batch_sizes"].items():
        for side in r["median_s"]:
            print(f"| {bs} | {side} | {r['median_s'][side]:.2f} | {r['median_cpu_s'][side]:.2f} | "
                  f"{r['gflop_per_epoch'][side]:.0f} | {r['speedup_vs_reference'][side]:.2f} | "
                  f"{r['cpu_speedup_vs_reference'][side]:.2f} | {r['median_cpu_speedup_per_round'][side]:.2f} |")


def one_batch_size(args: argparse.Namespace, batch_size: int) -> dict[str, Any]:
    """Interleaved epochs of the authors' trainer and phalanx (channels-last and, unless
    ``--no-nchw``, NCHW) at one batch size; FLOPs counted in one extra, untimed epoch per side."""
    import utils as ref_utils  # the authors' code
    from train_dverge import DVERGE_Trainer

    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.images, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.images,), generator=g)

    # the authors' side: their ResNet-20 in their ModelWrapper, one SGD per member
    ns = argparse.Namespace(arch="ResNet", depth=20, model_num=args.members)
    torch.manual_seed(0)
    ref_models = ref_utils.get_models(ns, train=True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4) for m in ref_models]
    scheds = [torch.optim.lr_scheduler.MultiStepLR(o, [100, 150], 0.1) for o in opts]
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, num_workers=0)
    trainer = DVERGE_Trainer(ref_models, opts, scheds, loader, None, writer=sys.modules["torch.utils.tensorboard"].SummaryWriter(),  # type: ignore[attr-defined]
                             epochs=1, distill_fixed_layer=True, distill_eps=0.07, distill_alpha=0.007,
                             distill_steps=10, distill_layer=args.layer, distill_rand_start=False,
                             distill_momentum=True, plus_adv=False, dverge_coeff=1.0, depth=20)

    # phalanx's side: resnet20 members, DVERGE with the same settings and layer, SGD via fit()
    data = DatasetSplits("synthetic-cifar", Split(x, y), Split(x[:1], y[:1]), Split(x[:1], y[:1]),
                         tuple(str(i) for i in range(10)), MEAN, STD)
    formats = ["channels_last"] + ([] if args.no_nchw else ["contiguous"])
    ens = {}
    for fmt in formats:
        torch.manual_seed(0)
        ens[fmt] = Ensemble([create_model("resnet20", (3, 32, 32), 10, mean=MEAN, std=STD, memory_format=fmt)
                             for _ in range(args.members)])
    method = DVERGE(layer=args.layer)
    epoch_no = [0]

    def reference() -> None:
        epoch_no[0] += 1
        trainer.train(epoch_no[0])

    def phalanx_side(fmt: str) -> Callable[[], None]:
        def run() -> None:
            fit(ens[fmt], method, data, TrainConfig(epochs=1, batch_size=batch_size, lr=0.1, seed=epoch_no[0],
                                                    schedule="constant", device="cpu"), progress=False)
        return run

    sides: dict[str, Callable[[], None]] = {"reference": reference}
    sides.update({f"phalanx ({fmt})": phalanx_side(fmt) for fmt in formats})
    times: dict[str, list[float]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(args.repeats + 1):  # the first round is a warm-up
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            sides[name]()
            if r > 0:
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        if r > 0:
            print(f"batch {batch_size} round {r}: " + ", ".join(f"{k} {v[-1]:.2f} s (cpu {cpu[k][-1]:.2f} s)"
                                                               for k, v in times.items()), flush=True)
    flops = {name: count_flops(fn) for name, fn in sides.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    # paired: each round's reference epoch over the same round's phalanx epoch (the two ran back to back)
    paired = {k: [r / p for r, p in zip(cpu["reference"], v)] for k, v in cpu.items()}
    return {"times_s": times, "cpu_s": cpu, "median_s": med, "median_cpu_s": med_cpu, "flops_per_epoch": flops,
            "cpu_speedup_per_round": paired,
            "median_cpu_speedup_per_round": {k: statistics.median(v) for k, v in paired.items()},
            "gflop_per_epoch": {k: v / 1e9 for k, v in flops.items()},
            "speedup_vs_reference": {k: med["reference"] / v for k, v in med.items()},
            "cpu_speedup_vs_reference": {k: med_cpu["reference"] / v for k, v in med_cpu.items()}, "load": loadavg()}


if __name__ == "__main__":
    main()
