"""Data-parallel training of one ensemble over several processes (``torch.distributed``).

How :func:`phalanx.training.fit` trains when a process group of ``world > 1`` ranks is up
(``phalanx train --nproc N``, or ``torchrun --nproc_per_node N -m phalanx.cli.main train ...``):

- **Global batches are the single-process batches.** Every rank draws the same shuffled batch
  (and DVERGE's target batch, and any augmentation) from the epoch's generator, exactly as one
  process would, and keeps its contiguous shard (:func:`shard_bounds`; sizes differ by at most 1).
  Per-epoch choices (DVERGE's distillation layer) are drawn before the first batch from that same
  generator, so every rank makes the same choice.
- **Gradients are those of the global batch.** Each rank back-propagates its shard's loss scaled
  by ``shard size / global batch size`` and the gradients are summed over ranks
  (:func:`all_reduce_grads`, one flattened ``all_reduce``). For a loss that is a batch mean of
  per-example terms (every phalanx method) this is exactly the single-process gradient, also for
  a last batch that does not split evenly. DDP's module wrapper is not used: DVERGE, GAL, TRS and
  iGAT run extra forward passes and input-gradient computations inside a step, which DDP's
  reducer does not expect; the averaging it would do is done here explicitly.
- **Per-step randomness** (PGD random starts, iGAT's roulette, GAL's noise) comes from a
  rank-specific generator (stream ``1000 + rank`` of the epoch), so ranks do not repeat each
  other's draws; such methods are then equal in distribution, not bit for bit, to one process.
- **BatchNorm**: in train mode each rank normalises with its shard's statistics (as DDP without
  SyncBatchNorm); running statistics are averaged over ranks at the end of every epoch. Members
  without BatchNorm (MLP, LeNet-5, small-cnn) therefore train exactly as in one process.
- **Rank 0 alone** writes checkpoints, metrics and reports and runs validation; every rank
  resumes from rank 0's ``checkpoints/last.pt``; parameters are broadcast from rank 0 at start.
- Backend: NCCL for CUDA devices (rank r uses ``cuda:r``), gloo on CPU.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from phalanx.errors import PhalanxError


@dataclass(frozen=True)
class Rank:
    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def current() -> Rank | None:
    """This process's place in a process group of more than one rank, else None."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return Rank(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def is_main() -> bool:
    """True in a single process and on rank 0 of a group: the one process that writes files."""
    r = current()
    return r is None or r.main


def init_from_env(device: str = "auto") -> Rank | None:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) when ``WORLD_SIZE > 1``; NCCL when
    ``device`` is CUDA, gloo otherwise. Returns None for a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    if not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if cuda:
            if local >= torch.cuda.device_count():
                raise PhalanxError(f"rank with LOCAL_RANK {local} has no GPU: {torch.cuda.device_count()} visible; "
                                   "use at most that many processes per node")
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
    return current()


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous slice ``[start, stop)`` of a global batch of ``n`` that ``rank`` trains on."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy ``src``'s parameters and buffers to every rank."""
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src)


def all_reduce_grads(params: Sequence[nn.Parameter]) -> None:
    """Sum every parameter's gradient over ranks (one flattened all_reduce). A parameter with no
    gradient on any rank keeps ``grad = None``, as in one process (so SGD leaves it alone)."""
    if not params:
        return
    ref = params[0]
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=ref.device)
    dist.all_reduce(present)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p, has in zip(params, present.tolist()):
        n = p.numel()
        if has:
            p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def average_buffers(module: nn.Module) -> None:
    """Floating buffers (BatchNorm running statistics) become their mean over ranks; other
    buffers (``num_batches_tracked``) are taken from rank 0."""
    world = dist.get_world_size()
    with torch.no_grad():
        for b in module.buffers():
            if b.is_floating_point():
                dist.all_reduce(b)
                b.div_(world)
            else:
                dist.broadcast(b, 0)


def all_reduce_sums(sums: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Sum per-key scalars over ranks (keys are rank 0's; a key a rank never saw counts 0)."""
    keys = broadcast_object(sorted(sums))
    vec = torch.stack([torch.as_tensor(sums.get(k, 0.0), dtype=torch.float64, device=device) for k in keys])
    dist.all_reduce(vec)
    return dict(zip(keys, vec))


def barrier() -> None:
    dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, world: int, port: int, device: str, fn: Callable[..., Any], args: tuple[Any, ...],
               driver: Any = None) -> None:
    if driver is not None:  # a killed driver (the run folder's lock holder) leaves no rank writing there
        from phalanx.engines.local import _exit_with_driver

        _exit_with_driver(driver)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    init_from_env(device)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def run_local(nproc: int, fn: Callable[..., Any], args: Iterable[Any] = (), *, device: str = "auto",
              timeout_s: float | None = None) -> None:
    """Run ``fn(*args)`` in ``nproc`` processes on this machine that form one process group
    (what ``phalanx train --nproc N`` does; ``torchrun`` does the same across machines).
    ``fn`` must be a module-level function. Raises :class:`PhalanxError` naming the first rank
    that failed; the other ranks are then stopped."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    if not isinstance(nproc, int) or nproc < 1:
        raise PhalanxError(f"nproc must be a positive integer, got {nproc!r}")
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda and nproc > torch.cuda.device_count():
        raise PhalanxError(f"--nproc {nproc} needs {nproc} GPUs; {torch.cuda.device_count()} visible")
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    port = _free_port()
    alive_r, alive_w = ctx.Pipe(duplex=False)  # the driver holds the write end for its whole life
    procs = [ctx.Process(target=_rank_main, args=(r, nproc, port, device, fn, tuple(args), alive_r),  # type: ignore[attr-defined]
                         name=f"phalanx-rank{r}")
             for r in range(nproc)]
    try:
        for p in procs:
            p.start()
        alive_r.close()
        pending = {p.sentinel: (r, p) for r, p in enumerate(procs)}
        while pending:
            ready = wait(list(pending), timeout=timeout_s)
            if not ready:
                raise PhalanxError(f"distributed run exceeded {timeout_s} s")
            for s in ready:
                r, p = pending.pop(s)  # type: ignore[call-overload]
                p.join()
                if p.exitcode != 0:
                    raise PhalanxError(f"rank {r} of {nproc} failed (exit code {p.exitcode}); see its output above")
    finally:
        for p in procs:
            if p.pid is not None and p.is_alive():
                p.kill()
            if p.pid is not None:
                p.join(timeout=10)
        alive_w.close()
