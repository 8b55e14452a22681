"""beam-turbo's exceptions.

Every exception beam-turbo raises on purpose derives from :class:`BeamTurboError` and also from
the standard exception users already catch, so ``except ValueError`` keeps working::

    try:
        beam_turbo.stack([np.zeros(3), np.zeros(4)])
    except ValueError as err:  # also a beam_turbo.errors.InvalidInputError
        print(err)
"""

from __future__ import annotations

__all__ = [
    "BeamTurboError",
    "InvalidInputError",
    "InvalidTypeError",
    "MissingColumnError",
    "ModelLoadError",
    "ModelNotFoundError",
    "OutOfMemoryError",
]


class BeamTurboError(Exception):
    """Root of beam-turbo's exceptions."""


class InvalidInputError(BeamTurboError, ValueError):
    """A value is wrong: a shape, a size, a pad value, an argument."""


class InvalidTypeError(BeamTurboError, TypeError):
    """A type is wrong: a dtype, or an object that exposes no memory."""


class MissingColumnError(BeamTurboError, KeyError):
    """A table lacks a column that was asked for; the message names it and the columns there are."""

    def __str__(self) -> str:
        # KeyError's own str() shows the repr of its argument, quotes and escapes included.
        return str(self.args[0]) if self.args else ""


class OutOfMemoryError(BeamTurboError, MemoryError):
    """Memory could not be had for a batch."""


class ModelLoadError(BeamTurboError, RuntimeError):
    """A model file could not be turned into a model: corrupt, or not fitting the model class.

    Retrying does not help; the message names the file.
    """


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """A model file does not exist; the message names the path."""
