"""One entry point for the evaluation protocols (used by ``phalanx evaluate`` and the demo): an
:class:`EvaluationSpec` plus an ensemble and a test split in, a JSON-ready result out. A workflow: it composes
the evaluation package with transfer sets and surrogate training."""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from phalanx.attacks import Attack, configure_attack, create_attack
from phalanx.data import DatasetSplits, Split
from phalanx.ensembles import Ensemble
from phalanx.ensembles.build import ModelConfig, build_ensemble
from phalanx.errors import PhalanxError
from phalanx.evaluation.card import robustness_card
from phalanx.evaluation.clean import evaluate_clean, model_device
from phalanx.evaluation.decision import decision_regions
from phalanx.evaluation.sanity import check_blackbox_vs_whitebox
from phalanx.evaluation.transfer import (
    generate_transfer_sets,
    load_surrogates,
    load_transfer_sets,
    score_transfer_sets,
    transfer_attacks,
)
from phalanx.evaluation.transferability import diversity_matrix, transferability_matrix
from phalanx.evaluation.whitebox import whitebox_evaluation
from phalanx.training import TrainConfig, create_method, fit
from phalanx.types import check_eps, parse_enum

log = logging.getLogger(__name__)


def train_surrogates(data: DatasetSplits, sizes: Sequence[int] = (3, 5, 8), *, model: str = "small-cnn",
                     epochs: int = 10, lr: float = 0.05, batch_size: int = 64, seed: int = 1000,
                     device: str = "cpu", progress: bool = False) -> dict[str, Ensemble]:
    """Baseline ensembles of each size, seeded apart from the defenses (``seed + size``)."""
    out: dict[str, Ensemble] = {}
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise PhalanxError(f"surrogate sizes must be integers >= 1, got {size!r}")
        ens = build_ensemble(ModelConfig(name=model, members=size), data, seed=seed + size)
        out[f"baseline-{size}"] = _fit_baseline(ens, data, epochs=epochs, lr=lr, batch_size=batch_size,
                                                seed=seed + size, device=device, progress=progress)
    return out


def _fit_baseline(ens: Ensemble, data: DatasetSplits, *, epochs: int, lr: float = 0.05, batch_size: int = 64,
                  seed: int = 1000, device: str = "cpu", progress: bool = False) -> Ensemble:
    fit(ens, create_method("baseline"), data,
        TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device), progress=progress)
    return ens.eval()


def standard_ensemble(ensemble: Ensemble, data: DatasetSplits, *, epochs: int = 10, seed: int = 1000,
                      device: str = "cpu", progress: bool = False) -> Ensemble:
    """A plain (baseline-trained, mean-prob) ensemble of the same member architectures as
    ``ensemble``, freshly initialised with ``seed`` and trained on ``data``: the independent
    source of the card's transfer attacks."""
    from phalanx.models import build_model

    torch.manual_seed(seed)
    members = []
    for i, m in enumerate(ensemble.members):
        cfg = getattr(m, "config", None)
        if not isinstance(cfg, dict):
            raise PhalanxError(f"member {i} has no model config; give a standard ensemble with --surrogates CKPT")
        members.append(build_model(cfg))
    return _fit_baseline(Ensemble(members, "mean-prob"), data, epochs=epochs, seed=seed, device=device,
                         progress=progress)


class Protocol(str, enum.Enum):
    WHITEBOX = "whitebox"
    BLACKBOX = "blackbox"
    TRANSFERABILITY = "transferability"
    DIVERSITY = "diversity"
    CARD = "card"

    @classmethod
    def parse(cls, value: str | Protocol) -> Protocol:
        return parse_enum(cls, value, "protocol")


@dataclass(frozen=True)
class EvaluationSpec:
    """What to evaluate. ``attacks`` are registry names (white-box curves; the first one also
    attacks each member, builds the transferability matrix and the image grid); ``steps``,
    ``restarts`` and ``loss`` go to the attacks that take them; ``attack_params`` to all."""

    protocol: Protocol | str = Protocol.WHITEBOX
    eps: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3)
    attacks: tuple[str, ...] = ("pgd",)
    steps: int | None = 20
    restarts: int | None = 1
    loss: str | None = None
    attack_params: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 500
    seed: int = 0
    members: bool = True
    sanity: bool = True
    # black-box
    transfer_sets: str | None = None
    surrogates: tuple[str, ...] = ()
    train_surrogates: tuple[int, ...] = ()
    surrogate_model: str = "small-cnn"
    surrogate_epochs: int = 10
    transfer_steps: int = 100
    transfer_restarts: int = 3
    # diversity
    diversity_eps: float = 0.07
    # card: reduced attack budgets (evaluation/card.py QUICK) instead of the published ones
    quick: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "protocol", Protocol.parse(self.protocol))
        object.__setattr__(self, "eps", tuple(check_eps(e) for e in self.eps))
        object.__setattr__(self, "attacks", tuple(self.attacks))
        if not self.eps:
            raise PhalanxError("the eps list is empty; give at least one eps (e.g. --eps 0.05,0.1)")
        if not self.attacks:
            raise PhalanxError("give at least one attack name (see `phalanx info`)")
        for key in ("steps", "restarts"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise PhalanxError(f"{key} must be an integer >= 1, got {v!r}")
        for key in ("transfer_steps", "transfer_restarts", "surrogate_epochs", "batch_size"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise PhalanxError(f"{key} must be an integer >= 1, got {v!r}")
        check_eps(self.diversity_eps)
        # the card takes its transfer source from --surrogates; the other transfer options are blackbox-only
        protocol = Protocol.parse(self.protocol)
        accepted = {Protocol.BLACKBOX: {"--transfer-sets", "--surrogates", "--train-surrogates"},
                    Protocol.CARD: {"--surrogates"}}.get(protocol, set())
        wrong = [f for f, v in (("--transfer-sets", self.transfer_sets), ("--surrogates", self.surrogates),
                                ("--train-surrogates", self.train_surrogates)) if v and f not in accepted]
        if wrong:
            raise PhalanxError(f"{', '.join(wrong)} do not apply to the {protocol.value} protocol; "
                               "transfer options apply to blackbox (and --surrogates to card)")
        if protocol is Protocol.CARD and len(self.surrogates) > 1:
            raise PhalanxError("the card transfers from one standard ensemble: give one --surrogates checkpoint, "
                               f"got {len(self.surrogates)}")
        self.build_attacks()  # unknown names or bad settings fail here, before any work

    def build_attacks(self) -> dict[str, Attack]:
        return {name: configure_attack(name, self.attack_params, steps=self.steps, restarts=self.restarts,
                                       loss=self.loss) for name in self.attacks}


def _nonzero(eps: tuple[float, ...]) -> list[float]:
    return [e for e in eps if e > 0]


def run_evaluation(spec: EvaluationSpec, ensemble: Ensemble, data: DatasetSplits, split: Split, *,
                   run_dir: str | Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Run ``spec.protocol`` on ``ensemble`` (put in eval mode) over ``split``; ``run_dir``
    receives generated transfer sets and trained surrogates. Always includes clean metrics and
    sample images/decision regions for the report."""
    ensemble.eval()
    if tuple(data.in_shape) != tuple(ensemble.in_shape) or data.num_classes != ensemble.num_classes:
        raise PhalanxError(f"the ensemble expects inputs {ensemble.in_shape} with {ensemble.num_classes} classes; "
                           f"dataset {data.name!r} has {data.in_shape} with {data.num_classes}")
    gen = torch.Generator().manual_seed(spec.seed)
    attacks = spec.build_attacks()
    first_name, first = next(iter(attacks.items()))
    p = Protocol.parse(spec.protocol)
    out: dict[str, Any] = {"protocol": p.value, "n": len(split), "seed": spec.seed,
                           "clean": evaluate_clean(ensemble, split, spec.batch_size)}
    if p is Protocol.WHITEBOX:
        out["whitebox"] = whitebox_evaluation(ensemble, split, spec.eps, attacks, members=spec.members,
                                              sanity=spec.sanity, batch_size=spec.batch_size, generator=gen,
                                              progress=progress)
    elif p is Protocol.TRANSFERABILITY:
        out["transferability"] = [
            transferability_matrix(ensemble, split, eps, attack=first, restarts=spec.restarts or 1, limit=None,
                                   batch_size=spec.batch_size, generator=gen, progress=progress)
            for eps in _nonzero(spec.eps)]
    elif p is Protocol.DIVERSITY:
        out["diversity"] = diversity_matrix(ensemble, split, eps=spec.diversity_eps, limit=None, generator=gen,
                                            progress=progress)
    elif p is Protocol.CARD:
        source, source_name = _card_source(spec, ensemble, data, run_dir, progress)
        out["card"] = robustness_card(ensemble, split, spec.eps, source=source, source_name=source_name,
                                      quick=spec.quick, sanity=spec.sanity, batch_size=spec.batch_size,
                                      generator=gen, progress=progress)
    surrogate: Any = None
    if p is Protocol.BLACKBOX:
        out["blackbox"], surrogate = _blackbox(spec, ensemble, data, split, attacks, run_dir, gen, progress)
    out["examples"] = example_images(ensemble, split, first_name, first, max(spec.eps), gen, surrogate=surrogate)
    return out


def _card_source(spec: EvaluationSpec, ensemble: Ensemble, data: DatasetSplits, run_dir: str | Path | None,
                 progress: bool) -> tuple[Ensemble, str]:
    """The card's transfer source: the ``--surrogates`` checkpoint, else a standard
    ensemble of the same architecture trained here (saved in the run folder)."""
    device = model_device(ensemble)
    if spec.surrogates:
        models, ids = load_surrogates(spec.surrogates, map_location=device)
        label = next(iter(models))
        return models[label], f"{label} (sha256 {ids[label]['sha256'][:12]})"  # type: ignore[return-value]
    src = standard_ensemble(ensemble, data, epochs=spec.surrogate_epochs, seed=1000 + spec.seed,
                            device=str(device), progress=progress)
    if run_dir is not None:
        from phalanx.ensembles import save_ensemble

        save_ensemble(src, Path(run_dir) / "standard_ensemble.pt", dataset=data.name)
    arch = getattr(ensemble.members[0], "config", {}).get("name", "?")
    return src, f"standard ensemble ({len(src)} x {arch}, {spec.surrogate_epochs} epochs, seed {1000 + spec.seed})"


def _blackbox(spec: EvaluationSpec, ensemble: Ensemble, data: DatasetSplits, split: Split,
              attacks: dict[str, Attack], run_dir: str | Path | None, gen: torch.Generator,
              progress: bool) -> tuple[dict[str, Any], Any]:
    """Score (and first generate, where needed) the transfer sets; also returns the first
    surrogate (None for stored sets) for the decision-region plot's adversarial axis."""
    first_source: Any = None
    if spec.transfer_sets is not None:
        sets_dir = Path(spec.transfer_sets)
        sets = load_transfer_sets(sets_dir)
        if len(sets["y"]) != len(split) or not torch.equal(sets["y"], split.y.cpu()):
            log.info("scoring the %d examples stored with the transfer sets", len(sets["y"]))
    else:
        if run_dir is None:
            raise PhalanxError("black-box evaluation needs transfer sets or a run folder to write them to")
        device = model_device(ensemble)
        sources: dict[str, Any] = {}
        identities: dict[str, dict[str, Any]] = {}
        if spec.surrogates:
            sources, identities = load_surrogates(spec.surrogates, map_location=device)
        if spec.train_surrogates:
            trained = train_surrogates(data, spec.train_surrogates, model=spec.surrogate_model,
                                       epochs=spec.surrogate_epochs, seed=1000 + spec.seed, device=str(device),
                                       progress=progress)
            from phalanx.data.files import file_digest
            from phalanx.ensembles import save_ensemble

            for name, ens in trained.items():
                if name in sources:
                    raise PhalanxError(f"surrogate label {name!r} is both a given checkpoint and a trained surrogate")
                path = Path(run_dir) / "surrogates" / f"{name}.pt"
                save_ensemble(ens, path, dataset=data.name)
                sources[name] = ens
                identities[name] = {"paths": [str(path.resolve())], "sha256": file_digest(path), "trained": True}
        if not sources:
            raise PhalanxError("black-box evaluation needs --transfer-sets DIR, --surrogates CKPT[,CKPT] "
                               "or --train-surrogates SIZES (e.g. 3,5,8)")
        first_source = next(iter(sources.values()))
        sets_dir = generate_transfer_sets(
            sources, split, _nonzero(spec.eps) or list(spec.eps), Path(run_dir) / "transfer_sets",
            attacks=transfer_attacks(steps=spec.transfer_steps, restarts=spec.transfer_restarts),
            batch_size=spec.batch_size, generator=gen, progress=progress, identities=identities)
        sets = load_transfer_sets(sets_dir)
    scored = score_transfer_sets(ensemble, sets, batch_size=spec.batch_size)
    scored["transfer_sets"] = str(sets_dir)
    checks = []
    if spec.sanity:
        from phalanx.data import Split as _Split

        stored = _Split(sets["x"], sets["y"])
        eps_bb = [r["eps"] for r in scored["curve"] if r["eps"] > 0]
        if eps_bb:
            # the alarm means "transfer beats white-box", so the white-box side must be strong:
            # every configured attack and a reference PGD (50 steps of eps/5, 2 restarts; DVERGE eval_wbox)
            reference = {**attacks, "pgd-50x2 (reference)": create_attack("pgd", steps=50, restarts=2)}
            wb = whitebox_evaluation(ensemble, stored, eps_bb, reference,
                                     members=False, sanity=False, batch_size=spec.batch_size, generator=gen)
            scored["whitebox_curve"] = wb["worst_case"]
            for b, w in zip(scored["curve"][-len(eps_bb):], wb["worst_case"], strict=True):
                checks.append(check_blackbox_vs_whitebox(b["accuracy"], w["accuracy"], b["eps"]).to_dict())
    scored["sanity"] = checks
    return scored, first_source


def example_images(ensemble: Ensemble, split: Split, name: str, attack: Attack, eps: float,
              gen: torch.Generator, k: int = 8, surrogate: Any = None) -> dict[str, Any]:
    """A few clean/adversarial images and a decision-region grid for the report; the grid's
    adversarial axis comes from ``surrogate`` (DVERGE fig. 1: a benign surrogate ensemble), or
    from the ensemble itself (white-box direction) when none is given."""
    from phalanx.types import Norm, ThreatModel

    device = model_device(ensemble)
    x, y = split.x[:k].to(device), split.y[:k].to(device)
    if len(x) == 0:
        return {}
    adv = attack(ensemble, x, y, ThreatModel(Norm.LINF, eps), generator=gen)
    with torch.no_grad():
        cp, ap = ensemble(x).argmax(-1), ensemble(adv).argmax(-1)
    models: dict[str, Any] = {"ensemble": ensemble}
    models.update({f"member {i}": m for i, m in enumerate(ensemble.members)})
    regions = decision_regions(models, x[:1], y[:1], surrogate if surrogate is not None else ensemble,
                               eps=max(eps, 1e-3), resolution=41, generator=gen)
    regions["direction_from"] = "surrogate" if surrogate is not None else "the evaluated ensemble (white-box)"
    return {"attack": name, "eps": eps, "clean": x.cpu(), "adversarial": adv.cpu(), "labels": y.cpu(),
            "clean_pred": cp.cpu(), "adv_pred": ap.cpu(), "decision_regions": regions}


__all__ = ["EvaluationSpec", "Protocol", "run_evaluation", "standard_ensemble", "train_surrogates"]
