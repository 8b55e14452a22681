"""What beam-turbo's PyTorch and HuggingFace handlers add to Beam's: devices (choice, CUDA
probe, CPU fall-back), grad and autocast modes, batches staged onto the device (pinned,
reused buffers for CUDA), true byte sizes, ragged inputs padded per batch. The handlers in
``beam_turbo.pytorch`` and ``beam_turbo.huggingface`` mix in :class:`TorchInference`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from apache_beam.ml.inference.base import PredictionResult

from beam_turbo._arrays.inputs import ByteSizeMemo, beams_conversion, timed_stack
from beam_turbo._arrays.results import prediction_results
from beam_turbo._arrays.stacking import stack
from beam_turbo._running.loading import loading_model
from beam_turbo._running.oom import run_splitting_on_oom
from beam_turbo._torch.padding import count_tokens, pad_batch, padded_results
from beam_turbo.errors import InvalidInputError, InvalidTypeError, ModelLoadError

__all__ = ["TorchInference", "beam_device_name", "cuda_usable", "resolve_device"]

_LOG = logging.getLogger(__name__)
_AUTOCAST_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device a ``device=`` argument asks for (before checking it is usable).

    Example:
        >>> resolve_device("GPU"), resolve_device("cpu"), resolve_device("cuda:1")
        (device(type='cuda'), device(type='cpu'), device(type='cuda', index=1))
    """
    if isinstance(device, torch.device):
        return device
    name = str(device).strip()
    if name.upper() == "CPU":
        return torch.device("cpu")
    if name.upper() == "GPU":
        return torch.device("cuda")
    if name.lower() == "auto":
        return torch.device("cuda") if cuda_usable(torch.device("cuda")) else torch.device("cpu")
    try:
        found = torch.device(name.lower())
    except RuntimeError as error:
        raise InvalidInputError(
            f"device={device!r} is not a device; expected 'auto', 'cpu', 'cuda', 'cuda:N', "
            "'CPU' or 'GPU'"
        ) from error
    if found.type not in ("cpu", "cuda"):
        raise InvalidInputError(
            f"device={device!r}: beam-turbo runs PyTorch models on 'cpu' or 'cuda' devices"
        )
    return found


def cuda_usable(device: torch.device) -> bool:
    """Whether CUDA can allocate on ``device`` (Beam's probe, for any index)."""
    if not torch.cuda.is_available():
        return False
    if device.index is not None and device.index >= torch.cuda.device_count():
        return False
    try:
        torch.empty(1, device=device)
    except Exception:  # a driver that is missing or inaccessible fails at first real use
        _LOG.warning("CUDA probe failed", exc_info=True)
        return False
    return True


def _usable_device(device: torch.device) -> torch.device:
    if device.type == "cuda" and not cuda_usable(device):
        # Beam's words, on the root logger as Beam logs them: users filter on both.
        logging.warning(
            "Model handler specified a 'GPU' device, but GPUs are not available. Switching to CPU."
        )
        return torch.device("cpu")
    return device


def _autocast_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or dtype in _AUTOCAST_DTYPES.values():
        return dtype  # type: ignore[return-value]
    found = _AUTOCAST_DTYPES.get(str(dtype).removeprefix("torch."))
    if found is None:
        raise InvalidInputError(
            f"autocast_dtype={dtype!r}: expected torch.float16 or torch.bfloat16 (or None)"
        )
    return found


class _Staging:
    """Per-thread staging of batches: pinned, reused host buffers for CUDA devices.

    Two buffers alternate, so one can be filled while the other's copy to the device is in
    flight; a buffer is reused only after the event recorded behind its copy has completed.
    Copies run on a side stream of the thread's, overlapping the model's kernels on the
    compute stream, which waits for each copy on the device (not the host).
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._local = threading.local()

    def to_device(self, batch: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
        """The batch stacked onto ``device``: one copy on the fast path (CPU tensors of one
        dtype and shape); anything else exactly as Beam builds it, by ``torch.stack``."""
        try:
            return self._stack_to_device(batch, device)
        except (InvalidInputError, InvalidTypeError) as error:
            refused = error  # outside this block, Beam's error does not chain onto it
        # Beam's conversion: it promotes mixed dtypes, and raises Beam's own errors.
        stacked: torch.Tensor = beams_conversion(torch.stack, list(batch), refused)
        return stacked.to(device)

    def _stack_to_device(self, batch: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
        first = batch[0]
        if not isinstance(first, torch.Tensor):
            raise InvalidTypeError(f"element 0 is {type(first).__name__}, not a torch tensor")
        if first.device.type != "cpu":
            # Already on an accelerator: stack there, as Beam does.
            on_device: torch.Tensor = timed_stack(torch.stack, list(batch)).to(device)
            return on_device
        if device.type != "cuda":
            # The one copy: straight into the tensor the model reads.
            out = torch.empty((len(batch), *first.shape), dtype=first.dtype)
            stacked: torch.Tensor = timed_stack(stack, batch, out=out)
            return stacked
        slots = getattr(self._local, "slots", None)
        if slots is None:
            slots = self._local.slots = [[None, None], [None, None]]  # [buffer, event] x 2
        self._local.turn = turn = 1 - getattr(self._local, "turn", 1)
        buffer, event = slots[turn]
        if event is not None:
            event.synchronize()
        if (
            buffer is None
            or buffer.dtype != first.dtype
            or buffer.shape[1:] != first.shape
            or buffer.shape[0] < len(batch)
        ):
            buffer = torch.empty((len(batch), *first.shape), dtype=first.dtype, pin_memory=True)
        staged = buffer[: len(batch)]
        timed_stack(stack, batch, out=staged)
        # The copy runs on a side stream, so that it overlaps the kernels of the batch before
        # (queued on the compute stream); the compute stream waits for it on the device.
        copies = getattr(self._local, "copies", None)
        if copies is None or copies.device != device:
            copies = self._local.copies = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        compute = torch.cuda.current_stream(device)
        with torch.cuda.stream(copies):  # the staged rows were written by the host already
            on_device = staged.to(device, non_blocking=True)
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(copies)
        compute.wait_event(event)
        on_device.record_stream(compute)  # its memory is not reused before the model is done
        slots[turn] = [buffer, event]
        return on_device


class TorchInference:
    """What both handlers add to Beam's: device choice, grad mode, autocast, staging.

    Every attribute of beam-turbo's own has a default here, so that a subclass whose
    ``__init__`` sets only Beam's attributes (as Beam's tests and users' handlers do) works.
    """

    _device: torch.device
    _requested_device: torch.device | None = None
    _inference_mode = False
    _autocast: torch.dtype | None = None

    @functools.cached_property
    def _staging(self) -> _Staging:
        return _Staging()

    @functools.cached_property
    def _byte_sizes(self) -> ByteSizeMemo:
        return ByteSizeMemo()

    def _setup(self, device: str | torch.device, inference_mode: bool, autocast_dtype: Any) -> None:
        self._requested_device = resolve_device(device)
        self._device = self._requested_device
        self._inference_mode = inference_mode
        self._autocast = _autocast_dtype(autocast_dtype)

    @contextlib.contextmanager
    def _modes(self) -> Any:
        grad = torch.inference_mode() if self._inference_mode else torch.no_grad()
        with grad:
            if self._autocast is None:
                yield
            else:
                with torch.autocast(device_type=self._device.type, dtype=self._autocast):
                    yield

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        """The batch's true size in bytes, over every key of keyed elements (Beam's figure is
        only right for one-dimensional tensors)."""
        known = self._byte_sizes.recall(batch)
        return known if known is not None else _nbytes_of(batch)

    def _run_user_fn(
        self,
        batch: Sequence[Any],
        model: torch.nn.Module,
        args: dict[str, Any],
        model_id: str | None,
    ) -> list[PredictionResult]:
        """A user's ``inference_fn`` on exactly what Beam gives it, with the grad and autocast
        modes and the out-of-memory splitting."""

        def run(part: Sequence[Any]) -> list[PredictionResult]:
            with self._modes():
                inference_fn: Any = self._inference_fn  # type: ignore[attr-defined]
                return list(inference_fn(part, model, self._user_fn_device(), args, model_id))

        return run_splitting_on_oom(run, batch)

    def _run_stacked(
        self,
        batch: Sequence[torch.Tensor],
        model: torch.nn.Module,
        args: dict[str, Any],
        model_id: str | None,
    ) -> list[PredictionResult]:
        """The default inference on tensors: one stacked batch, the model called with it."""

        def run(part: Sequence[torch.Tensor]) -> list[PredictionResult]:
            with self._modes():
                inputs = self._staging.to_device(part, self._device)
                predictions = model(inputs, **args)
            self._byte_sizes.remember(part, inputs.nbytes)
            return prediction_results(part, predictions, model_id)

        return run_splitting_on_oom(run, batch)

    _pad_values: dict[str, int | float] | None = None

    def _run_keyed(
        self,
        batch: Sequence[Mapping[str, torch.Tensor]],
        model: torch.nn.Module,
        args: dict[str, Any],
        model_id: str | None,
    ) -> list[PredictionResult]:
        """The default inference on dicts of tensors: one batch per key (padded per batch for
        the keys in ``pad_values``), the model called with them as keyword arguments."""
        if self._pad_values is not None:
            return run_splitting_on_oom(
                lambda part: self._run_padded(part, model, args, model_id), batch
            )

        def run(part: Sequence[Mapping[str, torch.Tensor]]) -> list[PredictionResult]:
            columns = _keyed_columns(part)
            with self._modes():
                inputs = {
                    key: self._staging.to_device(column, self._device)
                    for key, column in columns.items()
                }
                predictions = model(**inputs, **args)
            self._byte_sizes.remember(part, sum(int(t.nbytes) for t in inputs.values()))
            return prediction_results(part, predictions, model_id)

        return run_splitting_on_oom(run, batch)

    def _run_padded(
        self,
        batch: Sequence[Mapping[str, torch.Tensor]],
        model: torch.nn.Module,
        args: dict[str, Any],
        model_id: str | None,
    ) -> list[PredictionResult]:
        """A ragged batch: padded per key, run, each element's outputs trimmed to its length."""
        assert self._pad_values is not None
        with self._modes():
            padded = pad_batch(
                batch,
                self._pad_values,
                lambda column: self._staging.to_device(column, self._device),
                model,
            )
            inputs = {key: tensor.to(self._device) for key, tensor in padded.inputs.items()}
            predictions = model(**inputs, **args)
        self._byte_sizes.remember(batch, sum(int(t.nbytes) for t in inputs.values()))
        count_tokens(self.get_metrics_namespace(), padded)  # type: ignore[attr-defined]
        return padded_results(batch, predictions, padded, model_id)

    def _user_fn_device(self) -> Any:
        """The device argument a user's ``inference_fn`` gets (Beam's handler's)."""
        return self._device

    def _model_id(self) -> str | None:
        path: str | None = self._torch_script_model_path or self._state_dict_path  # type: ignore[attr-defined]
        return path

    def load_model(self) -> torch.nn.Module:
        """Load the model onto the chosen device (the CPU, with a warning, if CUDA is unusable)."""
        self._device = _usable_device(self._requested_device or resolve_device(self._device))
        path = self._model_id()
        with loading_model(path, "PyTorch model"):
            try:
                return super().load_model()  # type: ignore[misc, no-any-return]
            except RuntimeError as error:
                if "state_dict" not in str(error):
                    raise
                name = getattr(self._model_class, "__name__", self._model_class)  # type: ignore[attr-defined]
                raise ModelLoadError(
                    f"the state dict in {path} does not fit {name}: {error}"
                ) from error


def beam_device_name(device: str | torch.device) -> str:
    """What to give Beam's constructor, so that it logs Beam's "Device is set to ..." line."""
    return "GPU" if resolve_device(device).type == "cuda" else "CPU"


def _nbytes_of(batch: Sequence[Any]) -> int:
    """True bytes of a batch of tensors (or of dicts of tensors)."""
    total = 0
    for element in batch:
        if isinstance(element, dict):
            total += sum(int(t.nbytes) for t in element.values())
        else:
            total += int(element.nbytes)
    return total


def _keyed_columns(batch: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Each key's tensors in element order; every element must be a dict of element 0's keys.

    Beam stacks whatever tensors each key has, so an element with a key more or less than the
    others shifts that key's rows onto other elements: here it is an error naming the element.
    """
    failure: Exception | None = None
    if all(issubclass(kind, Mapping) for kind in set(map(type, batch))):
        try:
            keys = list(batch[0].keys())
            columns = {key: [example[key] for example in batch] for key in keys}
            if set(map(len, batch)) == {len(keys)}:
                return columns
        except KeyError as error:
            failure = error  # the element is named below, off the common path
    for index, example in enumerate(batch):
        if not isinstance(example, Mapping):
            # AttributeError, as Beam's handler raises (it calls the element's .items()).
            raise AttributeError(
                f"element {index} is {type(example).__name__}, not a dict of tensors: "
                "a keyed handler takes dicts of input name to tensor"
            )
    expected = list(batch[0])
    for index, example in enumerate(batch):
        if set(example) != set(expected):
            raise InvalidInputError(
                f"element {index} has keys {sorted(example)}, element 0 has {sorted(expected)}: "
                "every element of a batch needs the same keys"
            )
    assert failure is not None  # dicts of one key set always give columns
    raise failure
