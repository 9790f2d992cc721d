"""Old import paths of modules moved in the 0.2 layout (issue 9), kept for one release.

Importing an old path warns with a :class:`DeprecationWarning` and gives a module holding the new module's
names (the same objects). Installed once by ``phalanx/__init__.py``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

MOVED: dict[str, str] = {
    "phalanx.cli.config": "phalanx.config",
    "phalanx.experiment": "phalanx.workflows.experiment",
    "phalanx.evaluation.protocols": "phalanx.workflows.evaluation",
    "phalanx.verification.workflows": "phalanx.workflows.verify",
    "phalanx.verification.randomized": "phalanx.randomized.attack",
    "phalanx.verification.randomized_math": "phalanx.randomized.objectives",
    "phalanx.evaluation.demo_stage": "phalanx.demo.attacks",
    "phalanx.training.demo_stage": "phalanx.demo.diversity",
    "phalanx.verification.demo_stage": "phalanx.demo.selection",
    **{f"phalanx.verification.randomized_{m}": f"phalanx.randomized.{m}"
       for m in ("problem", "patterns", "encoding", "milp", "smt", "digits", "report")},
}
REMOVED_IN = "0.3"


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # a fresh module, filled by exec_module

    def exec_module(self, module: ModuleType) -> None:
        new = MOVED[module.__name__]
        warnings.warn(f"{module.__name__} moved to {new}; the old path will be removed in phalanx {REMOVED_IN}",
                      DeprecationWarning, stacklevel=2)
        target = importlib.import_module(new)
        module.__dict__.update({k: v for k, v in vars(target).items()
                                if not (k.startswith("__") and k.endswith("__"))})
        if hasattr(target, "__all__"):
            module.__dict__["__all__"] = list(target.__all__)


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
