"""``fit``: the one training loop. Optimizer, LR schedule, validation and a checkpoint each
epoch, exact resume, JSON-lines metrics and a progress bar; methods only define their loss."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from phalanx.data import DatasetSplits, iterate_batches, num_batches
from phalanx.ensembles import Ensemble, atomic_save, check_finite, ensemble_state, safe_load, save_ensemble
from phalanx.errors import CheckpointError, PhalanxError
from phalanx.evaluation.clean import evaluate_clean
from phalanx.training import distributed as ddp
from phalanx.training.base import Batch, StepContext, TrainingMethod

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("multistep", "cosine", "constant")
STATE_FORMAT = "phalanx-train-state"


#: runs of at least this many epochs get the papers' automatic LR decay (x gamma at 50% and 75%)
AUTO_DECAY_MIN_EPOCHS = 10


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. Defaults follow DVERGE's reference (SGD 0.1, momentum 0.9,
    weight decay 1e-4, LR x0.1 at 50% and 75% of the epochs).

    ``milestones`` are the epochs after which the LR is multiplied by ``gamma`` (schedule
    ``multistep``); ``None`` (the default) means automatic: 50% and 75% of ``epochs`` for runs
    of at least :data:`AUTO_DECAY_MIN_EPOCHS` epochs (DVERGE's 200 epochs: 100 and 150) and no
    decay for shorter runs, which keep the LR they ask for (a 3-epoch run would otherwise spend
    two epochs at 1/10 and 1/100 of it; a 2-epoch fine-tune one). ``()`` turns decay off;
    ``schedule = "constant"`` too.
    :meth:`effective` is the config with the milestones actually used, as runs record it."""

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "multistep"
    milestones: tuple[int, ...] | None = None
    gamma: float = 0.1
    seed: int = 0
    device: str = "auto"
    eval_batch_size: int = 500
    drop_last: bool = False

    def __post_init__(self) -> None:
        from phalanx.types import check_fields

        check_fields(self, "train")
        if self.epochs < 1:
            raise PhalanxError(f"train.epochs must be a positive integer, got {self.epochs!r}")
        if self.batch_size < 1:
            raise PhalanxError(f"train.batch_size must be a positive integer, got {self.batch_size!r}")
        if self.eval_batch_size < 1:
            raise PhalanxError(f"train.eval_batch_size must be positive, got {self.eval_batch_size!r}")
        if self.optimizer not in OPTIMIZERS:
            raise PhalanxError(f"unknown optimizer {self.optimizer!r}; accepted: {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise PhalanxError(f"unknown schedule {self.schedule!r}; accepted: {', '.join(SCHEDULES)}")
        if not self.lr > 0:
            raise PhalanxError(f"train.lr must be positive, got {self.lr!r}")
        if self.weight_decay < 0 or self.momentum < 0:
            raise PhalanxError(f"train.weight_decay and train.momentum must be >= 0, got {self.weight_decay!r}, "
                               f"{self.momentum!r}")
        if not 0 < self.gamma <= 1:
            raise PhalanxError(f"train.gamma (the LR decay factor) must be in (0, 1], got {self.gamma!r}")
        if self.milestones is not None:
            if any(m < 1 for m in self.milestones) or list(self.milestones) != sorted(set(self.milestones)):
                raise PhalanxError(f"train.milestones must be increasing epochs >= 1, got {list(self.milestones)}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise PhalanxError(f"unknown device {self.device!r}; accepted: auto, cpu, cuda")

    def resolved_milestones(self) -> list[int]:
        """The epochs after which the LR decays (``multistep``); see the class docstring."""
        if self.schedule != "multistep":
            return []
        if self.milestones is not None:
            return list(self.milestones)
        if self.epochs < AUTO_DECAY_MIN_EPOCHS:
            return []
        return sorted({max(1, self.epochs // 2), max(1, (3 * self.epochs) // 4)})

    def effective(self) -> TrainConfig:
        """This config with the milestones it trains with (what a run records)."""
        if self.schedule != "multistep":
            return self
        return replace(self, milestones=tuple(self.resolved_milestones()))


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PhalanxError(f"device {name!r} requested but CUDA is not available; use --device cpu or auto")
    return torch.device(name)


def make_optimizer(params: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, cfg.resolved_milestones(), cfg.gamma)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A generator seeded from (seed, epoch, stream): resumed runs draw identical numbers."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch * 7919 + stream) % (2**63 - 1))
    return g


@dataclass
class FitResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    run_dir: Path | None = None
    resumed_from_epoch: int = 0


Callback = Callable[[str, dict[str, Any]], None]


def _state(ensemble: Ensemble, opt: torch.optim.Optimizer, sched: Any, epoch: int,
           history: list[dict[str, Any]], cfg: TrainConfig, method: TrainingMethod, dataset: str) -> dict[str, Any]:
    return {
        "format": STATE_FORMAT, "version": 1, "epoch": epoch,
        "ensemble": ensemble_state(ensemble, dataset=dataset),
        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "history": json.dumps(history), "config": json.dumps(asdict(cfg.effective())),
        "method": json.dumps(method.describe()),
    }


def fit(
    ensemble: Ensemble,
    method: TrainingMethod,
    data: DatasetSplits,
    config: TrainConfig,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    callback: Callback | None = None,
) -> FitResult:
    """Train ``ensemble`` in place with ``method``.

    With ``run_dir``, writes ``checkpoints/last.pt`` (full training state, atomically) and
    ``ensemble.pt`` after every epoch and appends one JSON line per epoch to ``metrics.jsonl``.
    ``resume=True`` continues from ``checkpoints/last.pt``; a run killed mid-epoch restarts
    that epoch and ends with the same weights as an uninterrupted run (same seed, CPU).

    Inside a process group of several ranks (:mod:`phalanx.training.distributed`) each rank
    trains on its shard of every global batch, gradients are summed over ranks, and rank 0
    alone validates and writes files.
    """
    rank = ddp.current()
    main = rank is None or rank.main
    device = resolve_device(config.device)
    ensemble.to(device)
    params = [p for p in ensemble.parameters() if p.requires_grad]
    if not params:
        raise PhalanxError("the ensemble has no trainable parameters")
    opt = make_optimizer(params, config)
    sched = make_scheduler(opt, config)
    run_path = Path(run_dir) if run_dir is not None else None
    ckpt = run_path / "checkpoints" / "last.pt" if run_path else None
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if rank is not None:  # rank 0 may still be writing the folder this call resumes from
        ddp.barrier()
    if resume:
        if ckpt is None or not ckpt.is_file():
            raise CheckpointError(f"nothing to resume: {ckpt} does not exist")
        start_epoch, history = _restore(ckpt, ensemble, opt, sched, method, device)
        log.info("resuming %s from epoch %d", run_path, start_epoch)
    if run_path is not None and main:
        run_path.mkdir(parents=True, exist_ok=True)
        _write_metrics(run_path / "metrics.jsonl", history)
    if rank is not None:
        ddp.broadcast_module(ensemble)

    steps = num_batches(len(data.train), config.batch_size, config.drop_last)
    bar = _progress(total=config.epochs * steps, initial=start_epoch * steps, enabled=progress and main,
                    desc=f"train {method.name}" + (f" ({rank.world} ranks)" if rank else ""))
    try:
        for epoch in range(start_epoch, config.epochs):
            torch.manual_seed((config.seed * 1_000_003 + epoch) % (2**63 - 1))  # any stray global randomness
            gen = epoch_generator(config.seed, epoch)
            ctx = StepContext(epoch, 0, epoch * steps, steps, config.epochs, gen, device)
            ensemble.train()
            method.start_epoch(ensemble, ctx)
            if rank is not None:  # per-epoch choices above are shared; per-step draws are the rank's own
                ctx.generator = epoch_generator(config.seed, epoch, 1000 + rank.rank)
            batches = iterate_batches(data.train, config.batch_size, shuffle=True, generator=gen,
                                      augment=data.augment, drop_last=config.drop_last)
            targets = (iterate_batches(data.train, config.batch_size, shuffle=True,
                                       generator=epoch_generator(config.seed, epoch, 1),
                                       augment=data.augment, drop_last=config.drop_last)
                       if method.needs_target_batch else None)
            sums: dict[str, Tensor] = {}
            t0 = time.perf_counter()
            for step, (x, y) in enumerate(batches):
                xt, yt = next(targets) if targets is not None else (None, None)
                weight = 1.0  # this process's share of the global batch
                if rank is not None:
                    lo, hi = ddp.shard_bounds(len(x), rank.rank, rank.world)
                    weight = (hi - lo) / len(x)
                    x, y = x[lo:hi], y[lo:hi]
                    xt, yt = (xt[lo:hi], yt[lo:hi]) if xt is not None and yt is not None else (xt, yt)
                ctx.step, ctx.global_step = step, epoch * steps + step
                if not len(x):  # a last global batch smaller than the number of ranks
                    opt.zero_grad(set_to_none=True)
                else:
                    batch = Batch(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
                    if xt is not None and yt is not None:
                        batch.x_target, batch.y_target = xt.to(device), yt.to(device)
                    out = method.loss(ensemble, batch, ctx)
                    opt.zero_grad(set_to_none=True)
                    (out.loss * weight if rank is not None else out.loss).backward()
                    sums["loss"] = sums.get("loss", 0) + out.loss.detach() * weight
                    for k, v in out.metrics.items():
                        sums[k] = sums.get(k, 0) + v.detach() * weight
                if rank is not None:
                    ddp.all_reduce_grads(params)
                opt.step()
                bar.update(1)
                if callback is not None and len(x):
                    callback("step", {"epoch": epoch, "step": step, "loss": out.loss})
            if rank is not None:
                sums = ddp.all_reduce_sums(sums, device)
                ddp.average_buffers(ensemble)
            train_time = time.perf_counter() - t0
            lr = opt.param_groups[0]["lr"]
            sched.step()
            record: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "train_time_s": round(train_time, 3)}
            record.update({f"train_{k}": float(v) / steps for k, v in sums.items()})
            if not math.isfinite(record["train_loss"]):
                raise PhalanxError(f"training diverged at epoch {epoch + 1} (loss {record['train_loss']}); lower the lr")
            if len(data.val) and main:
                val = evaluate_clean(ensemble, data.val, config.eval_batch_size)
                record["val_accuracy"] = val["accuracy"]
                record["val_member_accuracy"] = val["member_accuracy"]
            history.append(record)
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", val=f"{record.get('val_accuracy', float('nan')):.3f}")
            if run_path is not None and ckpt is not None and main:
                atomic_save(_state(ensemble, opt, sched, epoch + 1, history, config, method, data.name), ckpt)
                save_ensemble(ensemble, run_path / "ensemble.pt", dataset=data.name,
                              extra={"method": method.describe(), "epochs": epoch + 1})
                with open(run_path / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            if callback is not None:
                callback("epoch", record)
    finally:
        bar.close()
    if rank is not None:  # every rank returns once rank 0 has written the last checkpoint
        ddp.barrier()
    ensemble.eval()
    return FitResult(history, run_path, start_epoch)


def _restore(ckpt: Path, ensemble: Ensemble, opt: torch.optim.Optimizer, sched: Any,
             method: TrainingMethod, device: torch.device) -> tuple[int, list[dict[str, Any]]]:
    state = safe_load(ckpt, "training checkpoint")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{ckpt} is not a phalanx training checkpoint")
    saved_method = json.loads(state["method"]).get("name")
    if saved_method != method.name:
        raise CheckpointError(f"{ckpt} was written by method {saved_method!r}, not {method.name!r}")
    members = state["ensemble"]["members"]
    if len(members) != len(ensemble):
        raise CheckpointError(f"{ckpt} holds {len(members)} members, the ensemble has {len(ensemble)}")
    for i, (entry, member) in enumerate(zip(members, ensemble.members)):
        cfg = json.loads(entry["config"])
        mine = getattr(member, "config", None)
        if mine is not None and cfg != mine:
            raise CheckpointError(f"{ckpt}: member {i} architecture {cfg.get('name')!r} {cfg} does not match {mine}")
        check_finite(entry["state_dict"], f"{ckpt}: member {i}")
        try:
            member.load_state_dict(entry["state_dict"])
        except RuntimeError as exc:
            raise CheckpointError(f"{ckpt}: member {i} weights do not match: {str(exc).splitlines()[0]}") from None
    ensemble.to(device)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["epoch"]), list(json.loads(state["history"]))


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
    tmp.replace(path)


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...


def _progress(*, total: int, initial: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, leave=False)
