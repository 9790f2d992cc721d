"""Run configuration: TOML files plus ``--set section.key=value`` overrides, validated into
dataclasses. Only the CLI reads config files; the library takes explicit keywords."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phalanx.ensembles.build import ModelConfig
from phalanx.errors import PhalanxError
from phalanx.training import TrainConfig
from phalanx.types import check_eps, check_fields

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"
    data_dir: str | None = None
    limit: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, "data")
        if self.limit is not None and self.limit < 1:
            raise PhalanxError(f"data.limit must be >= 1, got {self.limit}")


@dataclass(frozen=True)
class MethodConfig:
    name: str = "baseline"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fields(self, "method")


@dataclass(frozen=True)
class EvalConfig:
    eps: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3)
    attack: str = "pgd"
    steps: int = 20
    restarts: int = 1
    limit: int | None = 500
    batch_size: int = 500

    def __post_init__(self) -> None:
        check_fields(self, "eval")
        object.__setattr__(self, "eps", tuple(check_eps(e) for e in self.eps))
        if not self.eps:
            raise PhalanxError("eval.eps must list at least one radius")
        if self.limit is not None and self.limit < 1:
            raise PhalanxError(f"eval.limit must be >= 1, got {self.limit}")
        if self.batch_size < 1:
            raise PhalanxError(f"eval.batch_size must be >= 1, got {self.batch_size}")
        if self.steps < 1 or self.restarts < 1:
            raise PhalanxError(f"eval.steps and eval.restarts must be >= 1, got {self.steps}, {self.restarts}")


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """The config as it runs (effective values, e.g. the LR milestones used); loading it
        with :func:`build_config` gives a config that reproduces the run."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            sec = dataclasses.asdict(value.effective() if isinstance(value, TrainConfig) else value)
            opts = sec.pop("options", None)
            if opts:
                sec.update(opts)
            out[f.name] = sec
        return out


def checkpoint_sections(info: dict[str, Any], *, method: bool = True) -> dict[str, dict[str, Any]]:
    """The ``[data]``, ``[model]`` (and ``[method]``) config sections that describe a saved
    ensemble (from :func:`phalanx.ensembles.checkpoint_info`): what a run using the checkpoint
    records instead of the defaults."""
    first = dict(info["members"][0])
    model: dict[str, Any] = {"name": first.pop("name"), "members": len(info["members"]), "combiner": info["combiner"]}
    for k in ("in_shape", "num_classes", "mean", "std"):
        first.pop(k, None)
    model.update(first)
    tree: dict[str, dict[str, Any]] = {"model": model}
    if info.get("dataset"):
        tree["data"] = {"dataset": info["dataset"]}
    described = (info.get("extra") or {}).get("method")
    if method and isinstance(described, dict) and isinstance(described.get("name"), str):
        tree["method"] = dict(described)
    return tree


_OPEN_SECTIONS = {"model", "method"}  # unknown keys go to the builder's options


def parse_value(text: str) -> Any:
    """A TOML value (number, bool, list, quoted string), or the raw text as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise PhalanxError(f"--set expects section.key=value, got {assignment!r}")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2:
        raise PhalanxError(f"--set key must be section.key (e.g. train.epochs), got {key!r}")
    tree.setdefault(parts[0], {})[parts[1]] = parse_value(value.strip())


def load_config(path: str | Path | None = None, overrides: tuple[str, ...] | list[str] = (),
                base: dict[str, Any] | None = None) -> RunConfig:
    """Merge ``base`` < TOML file < overrides, and validate into a :class:`RunConfig`."""
    tree: dict[str, Any] = {k: dict(v) for k, v in (base or {}).items()}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise PhalanxError(f"config file {p} does not exist")
        try:
            loaded = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise PhalanxError(f"config file {p} is not valid TOML: {exc}") from None
        for sec, vals in loaded.items():
            if not isinstance(vals, dict):
                raise PhalanxError(f"config key {sec!r} must be a [section]; sections: data, model, method, train, eval")
            tree.setdefault(sec, {}).update(vals)
    for o in overrides:
        apply_override(tree, o)
    return build_config(tree)


def build_config(tree: dict[str, Any]) -> RunConfig:
    sections = {f.name: f for f in dataclasses.fields(RunConfig)}
    kwargs: dict[str, Any] = {}
    for sec, vals in tree.items():
        if sec not in sections:
            raise PhalanxError(f"unknown config section {sec!r}; known: {', '.join(sections)}")
        cls = {"data": DataConfig, "model": ModelConfig, "method": MethodConfig, "train": TrainConfig,
               "eval": EvalConfig}[sec]
        names = {f.name for f in dataclasses.fields(cls)} - {"options"}
        known = {k: v for k, v in vals.items() if k in names}
        unknown = {k: v for k, v in vals.items() if k not in names}
        if unknown and sec not in _OPEN_SECTIONS:
            bad = next(iter(unknown))
            raise PhalanxError(f"unknown config key {sec}.{bad}; known keys in [{sec}]: {', '.join(sorted(names))}")
        if unknown:
            known["options"] = unknown
        try:
            kwargs[sec] = cls(**known)
        except TypeError as exc:
            raise PhalanxError(f"bad value in [{sec}]: {exc}") from None
    return RunConfig(**kwargs)
