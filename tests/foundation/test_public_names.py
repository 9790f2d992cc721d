"""A package's public names are the objects they name, never a submodule that shadows them."""

from __future__ import annotations

import importlib
import pkgutil
import types

import phalanx
from phalanx.attacks import ATTACKS, AutoAttack


def test_autoattack_name_is_the_factory() -> None:
    from phalanx.attacks import autoattack

    assert not isinstance(autoattack, types.ModuleType)
    assert autoattack is ATTACKS.get("autoattack")
    atk = autoattack(n_iter=3, n_target_classes=2, n_queries=5, fab_iter=3)
    assert isinstance(atk, AutoAttack)
    # importing every submodule (as tests and tools do) must not rebind the name to a module
    importlib.import_module("phalanx.attacks.parameter_free")
    assert importlib.import_module("phalanx.attacks").autoattack is ATTACKS.get("autoattack")


def test_no_submodule_shadows_a_public_name() -> None:
    clashes = []
    for info in pkgutil.walk_packages(phalanx.__path__, "phalanx."):
        if not info.ispkg:
            continue
        pkg = importlib.import_module(info.name)
        subs = {m.name for m in pkgutil.iter_modules(pkg.__path__)}
        clashes += [f"{info.name}.{n}" for n in set(getattr(pkg, "__all__", ())) & subs]
    assert not clashes, f"submodules named like public names: {clashes}"
