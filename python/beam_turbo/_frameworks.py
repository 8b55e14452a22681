"""The frameworks a pipeline has imported, looked up without importing any."""

from __future__ import annotations

import sys
from types import ModuleType

__all__ = ["imported"]


def imported(name: str) -> ModuleType | None:
    """The module ``name`` if it is imported and done initializing, else None.

    beam-turbo never imports a framework the user did not: a torch tensor in hand means torch
    is imported. But ``sys.modules`` holds a module from the moment its import starts, so
    while another thread imports torch (an SDK worker loading a torch model for one bundle
    while it stacks a scikit-learn batch for another) it holds a torch that has no ``Tensor``
    yet. Such a module is not looked into: nothing of it can be in hand before its import ends.
    """
    module = sys.modules.get(name)
    if module is None or getattr(getattr(module, "__spec__", None), "_initializing", False):
        return None
    return module
