"""Helpers shared by the benchmark scripts: machine load and FLOP counting."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "out"


def write_out(name: str, payload: dict[str, Any], indent: int = 2) -> Path:
    """Write a benchmark's JSON result to ``benchmarks/out/NAME`` and return the path."""
    path = OUT / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=indent) + "\n")
    return path


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages (``/proc/loadavg``), or [] where there is none."""
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matrix products and convolutions (forward and backward) that ``fn`` runs,
    counted per dispatched operator with ``torch.utils.flop_counter``'s formulas (elementwise
    work is not counted). A plain dispatch mode, because ``FlopCounterMode``'s module tracker
    does not support ``torch.autograd.grad``."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            count = flop_registry.get(func._overloadpacket)
            if count is not None:
                Count.total += int(count(*args, **(kwargs or {}), out_val=out))
            return out

    with Count():
        fn()
    return Count.total
