"""What beam-turbo's import hooks share (``patch.py``'s and ``lazy_torch.py``'s): a module's own
spec, found by the other finders, with its loader wrapped."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

__all__ = ["WrappingLoader", "wrapped_spec"]


class WrappingLoader(importlib.abc.Loader):
    """A module's own loader, wrapped: subclasses override ``exec_module``."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        module: ModuleType | None = self._loader.create_module(spec)
        return module

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)

    def __getattr__(self, name: str) -> Any:
        # get_source, get_filename, is_package...: the original loader's.
        return getattr(self._loader, name)


def wrapped_spec(
    hook: Any,
    fullname: str,
    path: Sequence[str] | None,
    target: ModuleType | None,
    wrap: Callable[[Any], WrappingLoader],
) -> importlib.machinery.ModuleSpec | None:
    """The spec the finders after ``hook`` give ``fullname``, its loader wrapped by ``wrap``."""
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if finder is hook or find is None:
            continue
        spec: importlib.machinery.ModuleSpec | None = find(fullname, path, target)
        if spec is not None:
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = wrap(spec.loader)
            return spec
    return None
