"""The demo's shared state: each stage reads and extends one :class:`DemoContext`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phalanx.config import RunConfig
from phalanx.data import DatasetSplits
from phalanx.ensembles import Ensemble


@dataclass
class DemoContext:
    out_dir: Path
    config: RunConfig
    data: DatasetSplits
    progress: bool = True
    ensembles: dict[str, Ensemble] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    sections: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


Stage = Callable[[DemoContext], None]
