"""The cost of DVERGE's cross-member term (eq. 5) with BatchNorm members, and whether batching it
exactly would pay.

Member i is trained on every other member's distilled batch. In train mode BatchNorm normalises by
the statistics of the batch it sees and updates its running statistics once per forward, so
phalanx (like the authors' code) runs member i once per batch (``cross_member_loss``). Simply
concatenating the M-1 batches would change both. The exact alternative measured here runs the
convolutions on the concatenated batch and every BatchNorm chunk by chunk, in the same order
(identical batch statistics and running-statistics updates; checked below). Both do the same
FLOPs; the question is only whether larger kernels beat the extra copies.

For M members (ResNet-20, batch B): the wall time of one distillation (phalanx's
``feature_distillation``, 10 steps, per member) and of the cross-member term (forward + backward)
per member, separate vs grouped, interleaved repeats, medians.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dverge_cross_member.py --members 3 5 8
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from common import loadavg, write_out
from phalanx.attacks import feature_distillation
from phalanx.models import create_model
from phalanx.training.dverge import cross_member_loss

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def chunked_batchnorm(module: nn.Module, chunks: int) -> Iterator[None]:
    """Every BatchNorm of ``module`` normalises its input chunk by chunk (in order)."""
    bns = [m for m in module.modules() if isinstance(m, _BatchNorm)]

    def make(bn: _BatchNorm) -> Any:
        return lambda x: torch.cat([type(bn).forward(bn, c) for c in x.chunk(chunks)])

    for bn in bns:
        bn.forward = make(bn)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for bn in bns:
            del bn.forward


def grouped_loss(member: nn.Module, others: list[Tensor], y: Tensor) -> Tensor:
    with chunked_batchnorm(member, len(others)):
        z = member(torch.cat(others))
    return nn.functional.cross_entropy(z, y.repeat(len(others))) * len(others)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, nargs="+", default=[3, 5, 8])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    doc: dict[str, Any] = {"args": vars(args), "load_before": loadavg(), "members": {}}
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch_size, 3, 32, 32, generator=g)
    xt = torch.rand(args.batch_size, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch_size,), generator=g)
    torch.manual_seed(0)
    member = create_model("resnet20", (3, 32, 32), 10).train()
    twin = copy.deepcopy(member)
    # exactness: same loss, gradients and running statistics as the separate forwards
    dists = [torch.rand_like(x) for _ in range(3)]
    bystanders = [copy.deepcopy(member) for _ in range(2)]
    la = cross_member_loss([member, *bystanders], dists, y)[0]  # member 0 on dists[1] and dists[2]
    lb = grouped_loss(twin, dists[1:], y)
    ga = torch.autograd.grad(la, list(member.parameters()))
    gb = torch.autograd.grad(lb, list(twin.parameters()))
    doc["check"] = {"loss_diff": float((la - lb).abs()),
                    "max_grad_diff": max(float((a - b).abs().max()) for a, b in zip(ga, gb, strict=True)),
                    "max_running_stat_diff": max(float((a.double() - b.double()).abs().max())
                                                 for a, b in zip(member.buffers(), twin.buffers(), strict=True))}
    for m in args.members:
        others = [torch.rand_like(x) for _ in range(m - 1)]
        times: dict[str, list[float]] = {"distillation (one member)": [], "cross-member, separate": [],
                                         "cross-member, grouped": []}
        for r in range(args.repeats + 1):
            t0 = time.perf_counter()
            feature_distillation(member, x, xt, 20, eps=0.07, steps=10, step_size=0.007, momentum=1.0)
            t1 = time.perf_counter()
            sum(nn.functional.cross_entropy(member(d), y) for d in others).backward()  # type: ignore[union-attr]
            t2 = time.perf_counter()
            grouped_loss(member, others, y).backward()
            t3 = time.perf_counter()
            if r > 0:
                for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                    times[k].append(v)
        med = {k: statistics.median(v) for k, v in times.items()}
        # per member and batch: 1 distillation + 1 cross-member term; the epoch has M of each
        share = med["cross-member, separate"] / (med["cross-member, separate"] + med["distillation (one member)"])
        doc["members"][str(m)] = {"median_s": med, "times_s": times, "cross_member_share": share,
                                  "grouped_over_separate": med["cross-member, grouped"] / med["cross-member, separate"]}
        print(f"M={m}: {med}, cross-member share {share:.2f}", flush=True)
    doc["load_after"] = loadavg()
    write_out("dverge_cross_member.json", doc, indent=1)
    print(f"\nexactness check: {doc['check']}; load {doc['load_before']} / {doc['load_after']}\n")
    print("| M | distillation s (per member) | cross-member s, separate | grouped (exact batching) | grouped / separate "
          "| cross-member share of a member's step |")
    print("|---|---|---|---|---|---|")
    for m, e in doc["members"].items():
        t = e["median_s"]
        print(f"| {m} | {t['distillation (one member)']:.2f} | {t['cross-member, separate']:.2f} | "
              f"{t['cross-member, grouped']:.2f} | {e['grouped_over_separate']:.2f} | {e['cross_member_share']:.2f} |")


if __name__ == "__main__":
    main()
