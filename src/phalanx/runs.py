"""Run folders: resolved config, environment, results (versioned schema) and report."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS_SCHEMA_VERSION = 1


def new_run_dir(root: str | Path, command: str) -> Path:
    """``root/<timestamp>-<command>`` (suffix -2, -3 ... if it exists)."""
    base = Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{command}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    path.mkdir(parents=True)
    return path


def git_revision() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(seed: int | None, device: str) -> dict[str, Any]:
    import numpy

    from phalanx import __version__

    return {
        "phalanx": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "numpy": numpy.__version__, "platform": platform.platform(), "processor": platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "device": device, "seed": seed, "git_revision": git_revision(),
        "argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_default) + "\n")
    tmp.replace(path)
    return path


def write_results(run_dir: str | Path, kind: str, payload: dict[str, Any]) -> Path:
    """``results.json`` with a schema version and the kind of result."""
    return write_json(Path(run_dir) / "results.json",
                      {"schema_version": RESULTS_SCHEMA_VERSION, "kind": kind, **payload})


def _default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "value"):
        return o.value
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
