"""Black-box transfer protocol (DVERGE sec. 4.3 and eval_bbox.py, REFERENCE-FACTS).

1. Held-out *surrogate* ensembles (baselines of 3, 5 and 8 members) are trained or loaded.
2. :func:`generate_transfer_sets` attacks every surrogate with {ce, cw} x (momentum PGD x
   restarts + M-DI2-FGSM + SGM) at every eps and saves the adversarial sets to disk, so that many
   defenses are scored on the very same examples (DVERGE never released this script).
3. :func:`score_transfer_sets` scores a defense all-or-nothing: an example counts as robust at
   an eps only if it is classified correctly on *every* set (denominator: all examples; the rate
   among clean-correct examples is reported too).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from phalanx.attacks import Attack, create_attack
from phalanx.data import Split, iterate_batches
from phalanx.data.files import file_digest
from phalanx.ensembles import expected_correct, load_ensemble, safe_load
from phalanx.errors import PhalanxError
from phalanx.evaluation.clean import model_device
from phalanx.types import Norm, ThreatModel, check_eps

log = logging.getLogger(__name__)

TRANSFER_FORMAT = "phalanx-transfer-sets"
TRANSFER_VERSION = 1


def transfer_attacks(*, steps: int = 100, restarts: int = 3, losses: Sequence[str] = ("ce", "cw"),
                     kinds: Sequence[str] = ("mpgd", "mdi2fgsm", "sgm"), step_size: float = 0.2) -> dict[str, Attack]:
    """DVERGE's transfer attacks: per loss, momentum PGD once per random start (named
    ``mpgd-ce-r0`` ...), M-DI2-FGSM (p = 0.5) and SGM (gamma = 0.2), all ``steps`` steps of
    ``step_size * eps`` (DVERGE sec. 4.3: "100 iterations with the step size of eps/5")."""
    out: dict[str, Attack] = {}
    for loss in losses:
        for kind in kinds:
            if kind == "mpgd":
                for r in range(restarts):
                    out[f"mpgd-{loss}-r{r}"] = create_attack("mpgd", steps=steps, step_size=step_size, loss=loss)
            else:
                out[f"{kind}-{loss}"] = create_attack(kind, steps=steps, step_size=step_size, loss=loss)
    return out


def source_labels(paths: Sequence[str | Path]) -> list[str]:
    """Readable, unique labels for checkpoint paths: each path's shortest trailing part that no
    other path ends with (``A/ensemble.pt``, ``B/ensemble.pt``; just ``ensemble.pt`` when alone).

    Two labels can never coincide: equal strings have as many parts, and a label is taken only
    when it differs from every other path's suffix of that length."""
    parts = [Path(p).resolve().parts for p in paths]
    if len(set(parts)) != len(parts):
        raise PhalanxError(f"the same checkpoint path is given twice among {[str(p) for p in paths]}")
    out = []
    for i, pi in enumerate(parts):
        k = 1
        while any(pj[-k:] == pi[-k:] for j, pj in enumerate(parts) if j != i):
            k += 1
        out.append("/".join(pi[-k:]))
    return out


def load_surrogates(paths: Sequence[str | Path], map_location: torch.device | str = "cpu",
                    ) -> tuple[dict[str, nn.Module], dict[str, dict[str, Any]]]:
    """Load surrogate checkpoints for the transfer sets under unique identities (one place for
    ``attack --transfer-sets`` and ``evaluate --surrogates``).

    A source is identified by the SHA-256 of its checkpoint file, so copies of one checkpoint
    are one source (listed with all their paths) and different checkpoints are always different
    sources, whatever their file names (every run writes ``ensemble.pt``). Each gets a readable
    label from :func:`source_labels`. Returns ``(label -> model in eval mode, label ->
    {"paths", "sha256"})``; the identities go into the manifest, the sets and the report."""
    if not paths:
        raise PhalanxError("no surrogate checkpoints given")
    by_hash: dict[str, list[str]] = {}
    for p in paths:
        if not Path(p).is_file():
            raise PhalanxError(f"surrogate checkpoint {p} not found")
        by_hash.setdefault(file_digest(Path(p), "sha256"), []).append(str(p))
    for digest, same in by_hash.items():
        if len(same) > 1:
            log.warning("surrogates %s are the same checkpoint (sha256 %s...): one source", ", ".join(same), digest[:12])
    labels = source_labels([same[0] for same in by_hash.values()])
    models: dict[str, nn.Module] = {}
    identities: dict[str, dict[str, Any]] = {}
    for label, (digest, same) in zip(labels, by_hash.items(), strict=True):
        models[label] = load_ensemble(same[0], map_location=map_location).eval()
        identities[label] = {"paths": [str(Path(q).resolve()) for q in same], "sha256": digest}
    return models, identities


def generate_transfer_sets(sources: Mapping[str, nn.Module], split: Split, eps_list: Sequence[float],
                           out_dir: str | Path, *, attacks: Mapping[str, Attack] | None = None,
                           batch_size: int = 500, generator: torch.Generator | None = None,
                           progress: bool = False, identities: Mapping[str, Mapping[str, Any]] | None = None,
                           ) -> Path:
    """Attack each source with each attack at each eps and save ``sets.pt`` (clean ``x``, ``y``,
    ``adv[eps][source/attack]`` and ``sources``: each source's identity from
    :func:`load_surrogates`, loadable with ``weights_only=True``) plus ``manifest.json``.
    Returns the folder."""
    if not sources:
        raise PhalanxError("generate_transfer_sets needs at least one surrogate")
    atks = dict(attacks) if attacks is not None else transfer_attacks()
    if bad := [a for a in atks if "/" in a]:
        raise PhalanxError(f"transfer attack names may not contain '/': {bad}")
    ids = {name: dict((identities or {}).get(name, {})) for name in sources}
    eps_checked = [check_eps(e) for e in eps_list]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    adv: dict[str, dict[str, Tensor]] = {}
    jobs = [(e, s, a) for e in eps_checked for s in sources for a in atks]
    it: Any = jobs
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(jobs, desc="transfer sets")
    for eps, sname, aname in it:
        src = sources[sname]
        device = model_device(src)
        parts = []
        for x, y in iterate_batches(split, batch_size):
            parts.append(atks[aname](src, x.to(device), y.to(device), ThreatModel(Norm.LINF, eps),
                                     generator=generator).cpu())
        adv.setdefault(f"{eps:g}", {})[f"{sname}/{aname}"] = torch.cat(parts)
    payload = {"format": TRANSFER_FORMAT, "version": TRANSFER_VERSION, "x": split.x.cpu(), "y": split.y.cpu(),
               "adv": adv, "sources": ids}
    tmp = out / ".sets.pt.tmp"
    torch.save(payload, tmp)
    tmp.replace(out / "sets.pt")
    from phalanx.evaluation.whitebox import describe_attack
    from phalanx.runs import write_json

    write_json(out / "manifest.json", {"format": TRANSFER_FORMAT, "version": TRANSFER_VERSION, "n": len(split),
                                       "eps": eps_checked, "sources": ids,
                                       "attacks": {k: describe_attack(a) for k, a in atks.items()}})
    return out


def source_of(set_name: str) -> str:
    """The source label of a transfer set named ``source/attack`` (labels may hold '/')."""
    return set_name.rsplit("/", 1)[0]


def load_transfer_sets(path: str | Path) -> dict[str, Any]:
    """Load a folder (or ``sets.pt``) written by :func:`generate_transfer_sets`."""
    p = Path(path)
    f = p / "sets.pt" if p.is_dir() else p
    if not f.is_file():
        raise PhalanxError(f"no transfer sets at {f}; create them with `phalanx attack --transfer-sets`")
    data = safe_load(f, "transfer-set file", "create transfer sets with `phalanx attack --transfer-sets`")
    if not isinstance(data, dict) or data.get("format") != TRANSFER_FORMAT:
        raise PhalanxError(f"{f} is not a phalanx transfer-set file")
    return data


def score_transfer_sets(model: nn.Module, sets: Mapping[str, Any] | str | Path, *,
                        batch_size: int = 500) -> dict[str, Any]:
    """All-or-nothing black-box accuracy per eps and per source (DVERGE eval_bbox): an example
    counts only if it is classified correctly on every set. For a randomized ensemble each
    example counts with its exact probability of being correct over the draw, the lowest over
    the sets (:func:`phalanx.ensembles.expected_correct`)."""
    data = load_transfer_sets(sets) if isinstance(sets, (str, Path)) else sets
    device = model_device(model)
    y = data["y"]
    if tuple(getattr(model, "in_shape", ()) or data["x"].shape[1:]) != tuple(data["x"].shape[1:]):
        raise PhalanxError(f"the model expects inputs {tuple(getattr(model, 'in_shape', ()))}, "
                           f"the transfer sets hold {tuple(data['x'].shape[1:])}")

    def correct(x: Tensor) -> Tensor:
        return torch.cat([expected_correct(model, xb.to(device), yb.to(device)).cpu()
                          for xb, yb in iterate_batches(Split(x, y), batch_size)])

    clean = correct(data["x"])
    n, n_clean = len(y), float(clean.sum())
    rows: list[dict[str, Any]] = []
    for eps, by_set in data["adv"].items():
        every = clean.clone()
        per_source: dict[str, Tensor] = {}
        per_set = {}
        for name, adv in by_set.items():
            ok = correct(adv)
            per_set[name] = float(ok.mean())
            src = source_of(name)
            per_source[src] = torch.minimum(per_source.get(src, ok), ok)
            every = torch.minimum(every, ok)
        rows.append({"eps": float(eps), "accuracy": float(every.mean()), "n": n,
                     "accuracy_among_clean_correct": float(every.sum()) / n_clean if n_clean > 0 else 0.0,
                     "per_source": {k: float(v.mean()) for k, v in per_source.items()},
                     "per_set": per_set})
    rows.sort(key=lambda r: float(r["eps"]))
    stored = data.get("sources") or {}
    names = dict.fromkeys(source_of(k) for by_set in data["adv"].values() for k in by_set)
    sources = [{"label": s, **stored.get(s, {})} for s in names]
    return {"protocol": "blackbox", "n": n, "clean_accuracy": float(clean.mean()), "sources": sources,
            "curve": [{"eps": r["eps"], "accuracy": r["accuracy"], "n": n} for r in rows], "per_eps": rows}


def save_manifest_note(out_dir: str | Path, note: Mapping[str, Any]) -> None:
    """Add ``note`` (e.g. the surrogates' checkpoint paths) to an existing manifest."""
    path = Path(out_dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(note)
    from phalanx.runs import write_json

    write_json(path, manifest)


__all__ = ["generate_transfer_sets", "load_surrogates", "load_transfer_sets", "save_manifest_note",
           "score_transfer_sets", "source_labels", "source_of", "transfer_attacks"]
