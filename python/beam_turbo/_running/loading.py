"""Loading models: errors that name the model file, retries for passing failures, and the
process's model cache as ``RunInference``'s DoFns use it."""

from __future__ import annotations

import contextlib
import logging
import pickle
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import Metrics

from beam_turbo._beam import internals
from beam_turbo._native import ModelCache
from beam_turbo.errors import ModelLoadError, ModelNotFoundError

if TYPE_CHECKING:  # it imports torch where installed, which BatchElements must not do
    from apache_beam.ml.inference import base

__all__ = ["CachedModels", "RetryingLoad", "SharedModels", "loading_model", "retrying"]

_LOG = logging.getLogger(__name__)

# What deserializers raise for a file that is not a model of the expected kind. Other
# OSErrors (a flaky network file system, a timeout) are left alone: retrying may help those.
_DESERIALIZE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    RuntimeError,
    KeyError,
    AttributeError,
)


@contextlib.contextmanager
def loading_model(
    path: str | None, what: str = "model", also: Sequence[str] = ()
) -> Iterator[None]:
    """Turn what a model loader raises into an error that names the model file.

    The loader always runs: a user's loader, or one replaced in a test, may not read ``path``
    at all. Only after it fails is the path looked up: a path that does not exist (nor any of
    ``also``, such as a checkpoint's ``.index``) gives :class:`ModelNotFoundError`, a file that
    does not deserialize gives :class:`ModelLoadError`; other errors (a flaky network file
    system, a timeout) go through as they are, since retrying may help those.

    Example:
        >>> with loading_model("/nowhere/model.pkl"):
        ...     open("/nowhere/model.pkl", "rb")
        Traceback (most recent call last):
        ...
        beam_turbo.errors.ModelNotFoundError: model file /nowhere/model.pkl does not exist ...
    """
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as error:
        try:
            missing = isinstance(error, FileNotFoundError) or bool(
                path and not _exists(path, *also)
            )
        except Exception as check:  # a file system that cannot tell: an OSError, retried
            raise OSError(
                f"{what} file {path} could not be loaded ({type(error).__name__}: {error}), "
                f"and whether it exists could not be checked ({type(check).__name__}: {check})"
            ) from error
        if missing:
            # The message holds the cause's words: one traceback, not two chained.
            raise ModelNotFoundError(f"{what} file {path} does not exist ({error})") from None
        if isinstance(error, ImportError):
            raise ModelLoadError(
                f"{what} file {path} needs the module {error.name!r}, which this worker cannot "
                f"import: install it where the pipeline runs ({error})"
            ) from error
        if isinstance(error, _DESERIALIZE_ERRORS):
            raise ModelLoadError(f"{what} file {path} could not be loaded: {error}") from error
        raise


def _exists(*paths: str) -> bool:
    """Whether any of ``paths`` exists; True for a scheme no Beam file system knows (a hub
    handle), which only its loader can judge. A file system whose check fails raises."""
    for p in paths:
        try:
            filesystem = FileSystems.get_filesystem(p)
        except ValueError:  # no Beam file system for the scheme
            return True
        if filesystem.exists(p):
            return True
    return False


#: Errors that retrying a load cannot fix: the file is not there, or is not a model, or
#: needs a module this process cannot import.
_PERMANENT_LOAD_ERRORS: tuple[type[BaseException], ...] = (
    ModelLoadError,
    FileNotFoundError,
    pickle.UnpicklingError,
    ImportError,
)


def retrying(load: Callable[[], Any], retries: int, backoff_secs: float) -> Callable[[], Any]:
    """``load``, retried ``retries`` times after passing errors, sleeping ``backoff_secs``,
    then twice that, and so on. Errors that a retry cannot fix are raised at once.

    Example:
        >>> attempts = []
        >>> def flaky():
        ...     attempts.append(1)
        ...     if len(attempts) < 3:
        ...         raise ConnectionError("try again")
        ...     return "model"
        >>> retrying(flaky, retries=2, backoff_secs=0.0)()
        'model'
    """

    def load_with_retries() -> Any:
        for attempt in range(retries + 1):
            try:
                return load()
            except _PERMANENT_LOAD_ERRORS:
                raise
            except Exception as error:
                if attempt == retries:
                    raise
                delay = backoff_secs * 2**attempt
                _LOG.warning(
                    "Loading the model failed (%s: %s); retry %d of %d in %.1f s.",
                    type(error).__name__,
                    error,
                    attempt + 1,
                    retries,
                    delay,
                )
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    return load_with_retries


class RetryingLoad:
    """``handler``'s own ``load_model``, through :func:`retrying`; set as the handler's
    ``load_model`` so that every way Beam loads the model goes through the retries.

    A module-level class rather than a closure, so that the handler still pickles: Beam's
    model manager sends ``handler.load_model`` to a spawned process. It calls the class's
    ``load_model``, not the attribute it replaces, so it never calls itself, pickled or not.
    """

    def __init__(self, handler: base.ModelHandler, retries: int, backoff_secs: float) -> None:
        self._handler = handler
        self._retries = retries
        self._backoff_secs = backoff_secs

    def __call__(self) -> Any:
        handler = self._handler
        load = retrying(
            lambda: type(handler).load_model(handler), self._retries, self._backoff_secs
        )
        return load()


class CachedModels:
    """Models from the process's :class:`ModelCache`, keyed by the transform's model tag; it
    also stands where Beam's DoFn keeps its ``Shared`` handle (``acquire(load, tag)``).

    Answers that needed no load are counted, and reported by :meth:`report_hits` as the
    ``beam_turbo_model_cache_hits`` metric (from a bundle: metrics set in ``setup`` are lost).
    """

    def __init__(self, key: str, namespace: str) -> None:
        self._key = ("beam_turbo.RunInference", key)
        self._namespace = namespace
        self._hits = 0

    def acquire(self, load: Callable[[], Any], tag: Any = None) -> Any:
        loaded = False

        def counted_load() -> Any:
            nonlocal loaded
            loaded = True
            return load()

        model = ModelCache.default().acquire(self._key, counted_load, tag)
        if not loaded:
            self._hits += 1
        return model

    @staticmethod
    def pick(model: Any) -> Any:
        """The model a batch runs on: the one acquired."""
        return model

    def report_hits(self) -> None:
        if self._hits:
            Metrics.counter(self._namespace, "beam_turbo_model_cache_hits").inc(self._hits)
            self._hits = 0


class SharedModels:
    """A model shared by the worker processes of a machine, as Beam's inference DoFn shares a
    handler's whose ``share_model_across_processes()`` is true (``large_model=True``,
    ``model_copies``): Beam's own machinery, not a copy of it.

    ``acquire(load)`` gives Beam's router (``_SharedModelWrapper``) over ``copies`` proxies,
    one per copy tag (``<model tag>0``, ``<model tag>1``, ...): each copy is loaded, by
    ``load``, in the first process on the machine that asks for it, which serves it
    (``MultiProcessShared``, a lock and an address file in the temp folder); every process,
    that one included, calls it through a proxy. :meth:`pick` gives each batch the next copy,
    round-robin (a counter shared by the processes, when there are several copies). A ``load``
    that fails raises here, in the process that tried, and leaves no server: the next acquire
    loads again.
    """

    def __init__(self, key: str, copies: int) -> None:
        self._key = key
        self._copies = copies

    def acquire(self, load: Callable[[], Any], tag: Any = None) -> Any:
        from apache_beam.utils.multi_process_shared import MultiProcessShared

        models = [
            MultiProcessShared(load, tag=copy_tag, always_proxy=True).acquire()
            for copy_tag in internals.tags_for_copies(self._key, self._copies)
        ]
        return internals.SharedModelWrapper(models, self._key)

    @staticmethod
    def pick(router: Any) -> Any:
        """The copy a batch runs on: the next, round-robin."""
        return router.next_model()

    def report_hits(self) -> None:
        """Nothing: the processes share no cache to hit."""
