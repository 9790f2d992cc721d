"""fit() with the baseline method against a plain hand-written PyTorch loop.

Same models (3 x LeNet-5), same MNIST batches, same optimizer; the two loops are timed in
alternation (interleaved repeats) within one process, so machine noise hits both alike.
The target is phalanx's training throughput >= 0.95 x the hand-written loop's.

    .venv/bin/python benchmarks/train_throughput.py [--train-size 12000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from phalanx import Ensemble, TrainConfig, create_method, create_model, fit, load_dataset
from phalanx.data import DatasetSplits, Split, iterate_batches
from phalanx.training import epoch_generator

ROOT = Path(__file__).resolve().parents[1]


def hand_loop(members: list[torch.nn.Module], data: Split, cfg: TrainConfig, epoch: int) -> float:
    """The loop a researcher would write by hand: one SGD over all members, summed CE."""
    params = [p for m in members for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    for m in members:
        m.train()
    t0 = time.perf_counter()
    for x, y in iterate_batches(data, cfg.batch_size, shuffle=True, generator=epoch_generator(cfg.seed, epoch)):
        loss = sum(F.cross_entropy(m(x), y) for m in members)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--train-size", type=int, default=12000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "train_throughput.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    full = load_dataset("mnist", data_dir=args.data_dir, download=False)
    train = full.train.subset(args.train_size)
    empty = Split(full.val.x[:0], full.val.y[:0])
    data = DatasetSplits("mnist", train, empty, empty, full.class_names, full.mean, full.std)
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, lr=0.01, seed=0, device="cpu", schedule="constant")
    torch.manual_seed(0)
    init = [create_model("lenet5", data.in_shape, 10, mean=data.mean, std=data.std) for _ in range(3)]
    n_steps = -(-len(train) // args.batch_size)

    t_fit, t_fit_total, t_hand = [], [], []
    for r in range(args.repeats):
        order = ("fit", "hand") if r % 2 == 0 else ("hand", "fit")
        for which in order:
            members = [copy.deepcopy(m) for m in init]
            if which == "fit":
                ens = Ensemble(members)
                t0 = time.perf_counter()
                res = fit(ens, create_method("baseline"), data, cfg, progress=False)
                t_fit_total.append(time.perf_counter() - t0)
                t_fit.append(res.history[-1]["train_time_s"])
            else:
                t_hand.append(hand_loop(members, train, cfg, 0))
    med_fit, med_hand, med_total = statistics.median(t_fit), statistics.median(t_hand), statistics.median(t_fit_total)
    result = {
        "benchmark": "train_throughput", "model": "3 x lenet5", "dataset": f"mnist train subset {len(train)}",
        "batch_size": args.batch_size, "steps_per_epoch": n_steps, "repeats": args.repeats, "threads": args.threads,
        "fit_train_loop_s": t_fit, "fit_total_s": t_fit_total, "hand_loop_s": t_hand,
        "median_fit_train_loop_s": med_fit, "median_hand_loop_s": med_hand, "median_fit_total_s": med_total,
        "throughput_ratio": med_hand / med_fit, "throughput_ratio_total": med_hand / med_total,
        "images_per_s_fit": len(train) / med_fit, "images_per_s_hand": len(train) / med_hand,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("| loop | median epoch time (s) | images/s | ratio vs hand loop |")
    print("|---|---|---|---|")
    print(f"| hand-written PyTorch | {med_hand:.2f} | {len(train) / med_hand:.0f} | 1.000 |")
    print(f"| phalanx fit (training steps) | {med_fit:.2f} | {len(train) / med_fit:.0f} | {med_hand / med_fit:.3f} |")
    print(f"| phalanx fit (whole call, incl. setup) | {med_total:.2f} | {len(train) / med_total:.0f} | "
          f"{med_hand / med_total:.3f} |")


if __name__ == "__main__":
    main()
