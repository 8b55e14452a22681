"""``beam_turbo.patch()`` / ``beam_turbo.unpatch()``: beam-turbo's transforms and handlers in
place of Beam's, for pipelines that cannot be edited.

``patch()`` replaces these names in the ``apache_beam`` modules:

=====================================================  =========================================
``apache_beam.ml.inference.base.RunInference``         ``beam_turbo.RunInference``
``apache_beam.ml.inference.RunInference``              ``beam_turbo.RunInference``
``apache_beam.BatchElements`` (and ``transforms``,     ``beam_turbo.BatchElements``
``transforms.util``)
``apache_beam.SortAndBatchElements`` (and              ``beam_turbo.SortAndBatchElements``
``transforms``, ``transforms.util``)
``...pytorch_inference.PytorchModelHandlerTensor``,    ``beam_turbo.pytorch.*``
``PytorchModelHandlerKeyedTensor``
``...sklearn_inference.SklearnModelHandlerNumpy``,     ``beam_turbo.sklearn.*``
``SklearnModelHandlerPandas``
``...tensorflow_inference.TFModelHandlerNumpy``,       ``beam_turbo.tensorflow.*``
``TFModelHandlerTensor``
``...huggingface_inference.HuggingFaceModelHandler``   ``beam_turbo.huggingface.*``
``KeyedTensor``, ``...Tensor``, ``HuggingFacePipeline``
``ModelHandler``
=====================================================  =========================================

A framework's handler module is patched when the pipeline imports it, never before: ``patch()``
imports no framework (importing TensorFlow into a PyTorch pipeline costs seconds, hundreds of
megabytes, and can abort the process when two frameworks' LLVM copies meet). Beam modules
already imported are patched at once; the others by an import hook, right after Beam's module
runs and before the importer reads a name from it, so ``from ... import`` after ``patch()``
gets beam-turbo's class. A name imported with ``from ... import`` before ``patch()`` keeps
Beam's, so call ``patch()`` first. ``unpatch()`` puts back exactly what was there and removes
the hook.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from beam_turbo._beam.hooks import WrappingLoader, wrapped_spec

__all__ = ["is_patched", "patch", "unpatch"]

_FRAMEWORK_HANDLERS = [
    (
        "pytorch_inference",
        "pytorch",
        ["PytorchModelHandlerTensor", "PytorchModelHandlerKeyedTensor"],
    ),
    ("sklearn_inference", "sklearn", ["SklearnModelHandlerNumpy", "SklearnModelHandlerPandas"]),
    ("tensorflow_inference", "tensorflow", ["TFModelHandlerNumpy", "TFModelHandlerTensor"]),
    (
        "huggingface_inference",
        "huggingface",
        [
            "HuggingFaceModelHandlerKeyedTensor",
            "HuggingFaceModelHandlerTensor",
            "HuggingFacePipelineModelHandler",
        ],
    ),
]

#: Beam module -> [(attribute, beam-turbo module, attribute)].
_REPLACEMENTS: dict[str, list[tuple[str, str, str]]] = {
    "apache_beam.ml.inference.base": [("RunInference", "beam_turbo.inference", "RunInference")],
    "apache_beam.ml.inference": [("RunInference", "beam_turbo.inference", "RunInference")],
    **{
        module: [
            ("BatchElements", "beam_turbo.batching", "BatchElements"),
            ("SortAndBatchElements", "beam_turbo.batching", "SortAndBatchElements"),
        ]
        for module in ("apache_beam", "apache_beam.transforms", "apache_beam.transforms.util")
    },
    **{
        f"apache_beam.ml.inference.{beam_module}": [
            (name, f"beam_turbo.{ours}", name) for name in names
        ]
        for beam_module, ours, names in _FRAMEWORK_HANDLERS
    },
}

#: Imported by ``patch()`` itself: what ``import apache_beam`` imports anyway (a hook on them
#: would run beam-turbo's modules while apache_beam is half initialized). The rest, RunInference's
#: modules (whose base imports torch where installed) and the frameworks' handler modules, are
#: patched when the pipeline imports them.
_BEAM_MODULES = ["apache_beam", "apache_beam.transforms", "apache_beam.transforms.util"]

_LOCK = threading.RLock()
_ORIGINALS: dict[tuple[str, str], Any] = {}
#: id(beam-turbo's object) -> the Beam object it replaced.
_ORIGINAL_OF: dict[int, Any] = {}
_active = False


def patch() -> list[str]:
    """Put beam-turbo's transforms and handlers in place of Beam's; returns what was replaced
    now (a framework's handlers are replaced later, when the pipeline imports Beam's module).

    Idempotent. Imports no framework the process has not imported.

    Example:
        >>> import apache_beam as beam, beam_turbo
        >>> _ = beam_turbo.patch()
        >>> beam.BatchElements is beam_turbo.BatchElements
        True
        >>> beam_turbo.unpatch()
        >>> beam.BatchElements is beam_turbo.BatchElements
        False
    """
    global _active
    for module_name in _BEAM_MODULES:
        importlib.import_module(module_name)
    with _LOCK:
        _active = True
        if _HOOK not in sys.meta_path:
            sys.meta_path.insert(0, _HOOK)
        loaded = [name for name in _REPLACEMENTS if name in sys.modules]
    replaced = []
    for module_name in loaded:
        replaced += _replace_in(sys.modules[module_name])
    return replaced


def unpatch() -> None:
    """Undo :func:`patch` exactly; a no-op when nothing is patched."""
    global _active
    with _LOCK:
        _active = False
        if _HOOK in sys.meta_path:
            sys.meta_path.remove(_HOOK)
        for (module_name, name), original in _ORIGINALS.items():
            setattr(sys.modules[module_name], name, original)
        _ORIGINALS.clear()
        _ORIGINAL_OF.clear()


def is_patched() -> bool:
    """Whether :func:`patch` is in effect."""
    return _active


def _replace_in(module: ModuleType) -> list[str]:
    """Replace Beam's names in ``module`` (a Beam module that has run) by beam-turbo's."""
    replaced = []
    for name, our_module, our_name in _REPLACEMENTS[module.__name__]:
        # Imported outside the lock: beam-turbo's module imports Beam's, perhaps in this thread.
        ours = getattr(importlib.import_module(our_module), our_name)
        with _LOCK:
            if not _active:
                break
            key = (module.__name__, name)
            if key not in _ORIGINALS:
                current = getattr(module, name)
                # A package that re-exports a name patched in its submodule while it ran
                # (apache_beam.ml.inference's RunInference) took ours: its original is Beam's.
                _ORIGINALS[key] = _ORIGINAL_OF.get(id(current), current)
                _ORIGINAL_OF.setdefault(id(ours), _ORIGINALS[key])
            setattr(module, name, ours)
        replaced.append(f"{module.__name__}.{name}")
    return replaced


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds Beam's modules that ``patch()`` covers through the other finders, and wraps
    their loaders so that the names are replaced right after the module runs."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _REPLACEMENTS or fullname in _BEAM_MODULES or not _active:
            return None
        return wrapped_spec(self, fullname, path, target, _PatchingLoader)


class _PatchingLoader(WrappingLoader):
    """A module's own loader, which then replaces Beam's names in the module."""

    def exec_module(self, module: ModuleType) -> None:
        if module.__name__ == _HUGGINGFACE and "tensorflow" not in sys.modules:
            from beam_turbo._beam import internals

            if not internals.HUGGINGFACE_FRAMEWORKS_AT_LOAD:  # it imports TensorFlow now
                _import_triton_first()
        self._loader.exec_module(module)
        if _active:
            _replace_in(module)


#: Beam's HuggingFace module imports TensorFlow, then torch and transformers (before 2.78).
_HUGGINGFACE = "apache_beam.ml.inference.huggingface_inference"


def _import_triton_first() -> None:
    """Import torch's ``triton`` before Beam's HuggingFace module imports TensorFlow: with both
    installed (TensorFlow 2.21, torch 2.15), triton imported after TensorFlow aborts the
    process (two LLVM copies register the same options). Beam's module imports torch anyway."""
    try:
        import torch  # noqa: F401
        import triton  # noqa: F401
    except ImportError:
        pass


_HOOK = _PatchOnImport()
