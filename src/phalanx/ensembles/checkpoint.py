"""One checkpoint format for ensembles: each member's architecture config and weights, the
combiner, the dataset and normalization. Written atomically; read with ``weights_only=True``."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from phalanx.ensembles.ensemble import Combiner, Ensemble
from phalanx.errors import CheckpointError, PhalanxError

FORMAT = "phalanx-ensemble"
VERSION = 1


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temp file in the same folder, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def safe_load(path: str | Path, what: str = "checkpoint",
              hint: str = "phalanx reads files written by save_ensemble / phalanx train") -> Any:
    """``torch.load(weights_only=True)`` with clear errors for missing or unreadable files: the
    one reader of ``.pt`` files from users (``SECURITY.md``). torch's own message is left out
    (it suggests ``weights_only=False``, which would run code from the file)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a readable phalanx {what}: corrupted, truncated, or not written by phalanx "
            f"({type(exc).__name__}); {hint}"
        ) from None


def ensemble_state(ensemble: Ensemble, *, dataset: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    members = []
    for i, m in enumerate(ensemble.members):
        cfg = getattr(m, "config", None)
        if not isinstance(cfg, dict):
            raise PhalanxError(f"member {i} ({type(m).__name__}) has no model config; build members with phalanx.models")
        members.append({"config": json.dumps(cfg), "state_dict": {k: v.detach().cpu() for k, v in m.state_dict().items()}})
    first = getattr(ensemble.members[0], "config", {})
    return {
        "format": FORMAT,
        "version": VERSION,
        "combiner": ensemble.combiner.value,
        "weights": json.dumps([float(w) for w in ensemble.weights]) if ensemble.randomized else None,
        "dataset": dataset,
        "normalization": json.dumps({"mean": first.get("mean"), "std": first.get("std")}),
        "members": members,
        "extra": json.dumps(extra or {}),
    }


def save_ensemble(ensemble: Ensemble, path: str | Path, *, dataset: str | None = None,
                  extra: dict[str, Any] | None = None) -> Path:
    """Write ``ensemble`` to ``path`` atomically (temp file + rename)."""
    atomic_save(ensemble_state(ensemble, dataset=dataset, extra=extra), path)
    return Path(path)


def check_finite(state_dict: Any, source: str) -> None:
    """Refuse weights with NaN or inf (a diverged or damaged model would give meaningless results)."""
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{source}: weights are not a state dict")
    for name, t in state_dict.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{source}: weight {name!r} holds NaN or inf values; the checkpoint is "
                                  "damaged or its training diverged")


def check_dataset(stored: str | None, requested: str, source: str, *, allow: bool = False) -> None:
    """Refuse to use a checkpoint trained on ``stored`` with data of another dataset (same
    shapes would otherwise give a silently meaningless result), unless ``allow``."""
    if stored is not None and stored != requested and not allow:
        raise CheckpointError(f"{source} was trained on dataset {stored!r}, not {requested!r}; use {stored!r} "
                              "or pass --allow-dataset-mismatch")


def ensemble_from_state(state: Any, source: str = "checkpoint") -> Ensemble:
    from phalanx.models import build_model

    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{source} is not a phalanx ensemble checkpoint (missing format tag {FORMAT!r})")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{source} has checkpoint version {state.get('version')}; this phalanx reads {VERSION}")
    members = []
    for i, entry in enumerate(state["members"]):
        cfg = json.loads(entry["config"])
        model = build_model(cfg)
        check_finite(entry["state_dict"], f"{source}: member {i}")
        try:
            model.load_state_dict(entry["state_dict"], strict=True)
        except RuntimeError as exc:
            msg = str(exc).strip().splitlines()[0]
            raise CheckpointError(f"{source}: member {i} weights do not match architecture {cfg.get('name')!r}: {msg}") from None
        members.append(model)
    weights = state.get("weights")
    return Ensemble(members, Combiner.parse(state["combiner"]), json.loads(weights) if weights else None)


def load_ensemble(path: str | Path, *, map_location: str | torch.device = "cpu") -> Ensemble:
    """Read an ensemble written by :func:`save_ensemble`; members are returned in eval mode."""
    ens = ensemble_from_state(safe_load(path, "ensemble checkpoint"), str(path)).to(map_location)
    return ens.eval()


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """Metadata of a checkpoint (dataset, combiner, member architectures, extra)."""
    state = safe_load(path, "ensemble checkpoint")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a phalanx ensemble checkpoint")
    return {"dataset": state.get("dataset"), "combiner": state["combiner"],
            "weights": json.loads(state["weights"]) if state.get("weights") else None,
            "normalization": json.loads(state["normalization"]),
            "members": [json.loads(m["config"]) for m in state["members"]],
            "extra": json.loads(state.get("extra", "{}"))}
