"""``beam_turbo.patch()`` / ``beam_turbo.unpatch()``: beam-turbo's transforms and handlers in
place of Beam's, for pipelines that cannot be edited.

``patch()`` replaces these names in the ``apache_beam`` modules (the frameworks' modules only
where the framework is installed):

=====================================================  =========================================
``apache_beam.ml.inference.base.RunInference``         ``beam_turbo.RunInference``
``apache_beam.ml.inference.RunInference``              ``beam_turbo.RunInference``
``apache_beam.BatchElements`` (and ``transforms``,     ``beam_turbo.BatchElements``
``transforms.util``)
``...pytorch_inference.PytorchModelHandlerTensor``,    ``beam_turbo.pytorch.*``
``PytorchModelHandlerKeyedTensor``
``...sklearn_inference.SklearnModelHandlerNumpy``,     ``beam_turbo.sklearn.*``
``SklearnModelHandlerPandas``
``...tensorflow_inference.TFModelHandlerNumpy``,       ``beam_turbo.tensorflow.*``
``TFModelHandlerTensor``
=====================================================  =========================================

Code that looks names up through the module (``beam.BatchElements``,
``base.RunInference``) after ``patch()`` gets beam-turbo's; a name imported with
``from ... import`` before ``patch()`` keeps Beam's, so call ``patch()`` first. ``unpatch()``
puts back exactly what was there.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

__all__ = ["is_patched", "patch", "unpatch"]

# (module, attribute) -> (beam-turbo module, attribute); frameworks are optional.
_REPLACEMENTS: list[tuple[str, str, str, str]] = [
    ("apache_beam.ml.inference.base", "RunInference", "beam_turbo.inference", "RunInference"),
    ("apache_beam.ml.inference", "RunInference", "beam_turbo.inference", "RunInference"),
    ("apache_beam", "BatchElements", "beam_turbo.batching", "BatchElements"),
    ("apache_beam.transforms", "BatchElements", "beam_turbo.batching", "BatchElements"),
    ("apache_beam.transforms.util", "BatchElements", "beam_turbo.batching", "BatchElements"),
    *[
        (f"apache_beam.ml.inference.{beam_module}", name, f"beam_turbo.{ours}", name)
        for beam_module, ours, names in [
            (
                "pytorch_inference",
                "pytorch",
                ["PytorchModelHandlerTensor", "PytorchModelHandlerKeyedTensor"],
            ),
            (
                "sklearn_inference",
                "sklearn",
                ["SklearnModelHandlerNumpy", "SklearnModelHandlerPandas"],
            ),
            ("tensorflow_inference", "tensorflow", ["TFModelHandlerNumpy", "TFModelHandlerTensor"]),
        ]
        for name in names
    ],
]

_LOCK = threading.Lock()
_ORIGINALS: dict[tuple[str, str], Any] = {}


def patch() -> list[str]:
    """Put beam-turbo's transforms and handlers in place of Beam's; returns what was replaced.

    Idempotent. A framework that is not installed is skipped.

    Example:
        >>> import apache_beam as beam, beam_turbo
        >>> _ = beam_turbo.patch()
        >>> beam.BatchElements is beam_turbo.BatchElements
        True
        >>> beam_turbo.unpatch()
        >>> beam.BatchElements is beam_turbo.BatchElements
        False
    """
    replaced = []
    with _LOCK:
        for module_name, name, our_module, our_name in _REPLACEMENTS:
            try:
                module = importlib.import_module(module_name)
                ours = getattr(importlib.import_module(our_module), our_name)
            except ImportError:
                continue  # the framework (torch, tensorflow, sklearn) is not installed
            key = (module_name, name)
            if key not in _ORIGINALS:
                _ORIGINALS[key] = getattr(module, name)
            setattr(module, name, ours)
            replaced.append(f"{module_name}.{name}")
    return replaced


def unpatch() -> None:
    """Undo :func:`patch` exactly; a no-op when nothing is patched."""
    with _LOCK:
        for (module_name, name), original in _ORIGINALS.items():
            setattr(importlib.import_module(module_name), name, original)
        _ORIGINALS.clear()


def is_patched() -> bool:
    """Whether :func:`patch` is in effect."""
    return bool(_ORIGINALS)
