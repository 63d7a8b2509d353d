"""A package's exported names are never shadowed by a submodule of the same name.

Importing ``controlplane.service.apply`` (a module, once) set the package
attribute ``apply`` and replaced the exported function: every later
``service.apply(...)`` in the process failed with "'module' object is not
callable", depending on import order."""

from __future__ import annotations

import importlib
import pkgutil

import controlplane


def _packages() -> list[str]:
    names = ["controlplane"]
    for info in pkgutil.walk_packages(controlplane.__path__, "controlplane."):
        if info.ispkg:
            names.append(info.name)
    return names


def test_no_submodule_is_named_like_an_export() -> None:
    clashes = []
    for name in _packages():
        pkg = importlib.import_module(name)
        exported = set(getattr(pkg, "__all__", ()))
        subs = {info.name for info in pkgutil.iter_modules(pkg.__path__)}
        clashes += [f"{name}.{clash}" for clash in sorted(exported & subs)]
    assert clashes == []
