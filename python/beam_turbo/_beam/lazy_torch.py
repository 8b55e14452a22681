"""Beam's inference module without torch, until torch is needed.

Beam 2.77's ``apache_beam.ml.inference.base`` imports its ``model_manager`` module, which
imports torch where torch is installed, in a ``try`` whose ``except ImportError`` sets
``ModelManager = None``; the one place that needs it (``RunInference(use_model_manager=True)``)
imports it again when the model loads. So every pipeline that scores with Beam's or
beam-turbo's handlers paid for torch (some 500 MiB resident, seconds of start-up) in a process
that never uses it: a scikit-learn table job peaked at 1 GiB where the same job without
``RunInference`` peaked at 0.4 GiB.

:func:`install` (run by ``import beam_turbo``) puts a one-shot import hook in place: when
Beam's base module is first imported and torch is not, ``model_manager`` is unimportable while
the base module runs, so Beam takes its own ``except ImportError`` branch, and importable again
right after, so that ``use_model_manager=True`` imports it (and torch) when it is used. The
``resource`` module, which Beam's same ``except`` branch sets to None, is put back. Only where
the base module's source has that ``except`` (``ModelManager = None``): another Beam imports
as it does. A process that imported torch, or Beam's base module, before beam-turbo keeps
Beam's behaviour.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from beam_turbo._beam.hooks import WrappingLoader, wrapped_spec

__all__ = ["install", "uninstall"]

BASE = "apache_beam.ml.inference.base"
MODEL_MANAGER = "apache_beam.ml.inference.model_manager"
#: What Beam's base module's source holds where the model manager is optional.
_OPTIONAL_MARK = "ModelManager = None"

_LOCK = threading.Lock()


class _DeferModelManager(importlib.abc.MetaPathFinder):
    """Finds Beam's base module through the other finders, once, and wraps its loader."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != BASE:
            return None
        with _LOCK:
            if self in sys.meta_path:
                sys.meta_path.remove(self)  # one-shot
        return wrapped_spec(self, fullname, path, target, _DeferringLoader)


class _DeferringLoader(WrappingLoader):
    """Beam's base module's own loader, run while the model manager cannot be imported."""

    def exec_module(self, module: ModuleType) -> None:
        if not _defers(self._loader, module.__name__):
            self._loader.exec_module(module)
            return
        sys.modules[MODEL_MANAGER] = None  # type: ignore[assignment]  # import -> ImportError
        try:
            self._loader.exec_module(module)
        finally:
            if MODEL_MANAGER in sys.modules and sys.modules[MODEL_MANAGER] is None:
                del sys.modules[MODEL_MANAGER]
        import resource

        if getattr(module, "resource", resource) is None:
            module.__dict__["resource"] = resource  # None from the except branch, as the manager


def _defers(loader: Any, name: str) -> bool:
    """Whether to import Beam's base module without its model manager: torch not imported yet,
    the manager not either, and the base module's source treats it as optional."""
    if "torch" in sys.modules or MODEL_MANAGER in sys.modules:
        return False
    try:
        source = loader.get_source(name)
    except Exception:  # no source (a compiled-only install): import as Beam does
        return False
    return isinstance(source, str) and _OPTIONAL_MARK in source


_HOOK = _DeferModelManager()


def install() -> None:
    """Put the hook in place, unless Beam's base module is already imported. Idempotent."""
    with _LOCK:
        if BASE not in sys.modules and _HOOK not in sys.meta_path:
            sys.meta_path.insert(0, _HOOK)


def uninstall() -> None:
    """Take the hook away (Beam's base module, imported after, imports torch as Beam does)."""
    with _LOCK:
        if _HOOK in sys.meta_path:
            sys.meta_path.remove(_HOOK)
