"""``beam_turbo.stack``: many arrays become one contiguous batch with one copy of their bytes.

numpy arrays go straight to the native kernel. Other objects that expose their memory (torch
tensors, TensorFlow eager tensors, buffer-protocol objects, ``__array_interface__`` and
``__dlpack__`` exporters) are first viewed as numpy arrays without a copy. A list of CPU torch
tensors is handed to ``torch.stack`` writing straight into the batch (reading a tensor's
metadata from Python costs more than ``torch.stack`` spends per tensor).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from beam_turbo import _native
from beam_turbo._frameworks import imported
from beam_turbo.errors import InvalidInputError, InvalidTypeError

if TYPE_CHECKING:
    import torch

__all__ = ["set_pool_limit", "stack"]

Batch = np.ndarray[Any, Any]


@overload
def stack(arrays: Iterable[Any], *, out: Any = ..., pad: None = ...) -> Any: ...
@overload
def stack(arrays: Iterable[Any], *, out: Any = ..., pad: complex) -> tuple[Any, Batch]: ...


def stack(arrays: Iterable[Any], *, out: Any = None, pad: complex | None = None) -> Any:
    """Stack same-shaped arrays into one C-contiguous batch of shape ``(n, *shape)``.

    The bytes are copied exactly once, with the GIL released (on several threads for large
    batches), into a 64-byte-aligned buffer that the returned numpy array owns.
    ``torch.from_numpy(batch)`` and DLPack consumers share that memory without a copy.

    Args:
        arrays: numpy arrays, or objects exposing their memory (CPU torch tensors, TensorFlow
            eager tensors, buffer-protocol, ``__array_interface__`` or ``__dlpack__`` objects),
            all of one dtype and, unless ``pad`` is given, one shape.
        out: write into this C-contiguous numpy array or CPU torch tensor (pinned or not) of
            exactly the batch's shape and dtype, and return it.
        pad: stack arrays of one dtype and rank but different shapes, padding each to the
            largest size of every dimension with this value. The call then returns
            ``(batch, shapes)``, ``shapes`` an int64 array of each input's original shape.

    Raises:
        InvalidInputError (a ValueError): empty input, shapes or ranks that differ, a pad value
            the dtype cannot hold, an ``out`` of the wrong shape or layout.
        InvalidTypeError (a TypeError): dtypes that differ, object dtype, an element that
            exposes no memory.

    Example:
        >>> import numpy as np, beam_turbo
        >>> beam_turbo.stack([np.arange(3), np.arange(3) * 2])
        array([[0, 1, 2],
               [0, 2, 4]])
        >>> batch, shapes = beam_turbo.stack([np.ones(2), np.ones(3)], pad=0.0)
        >>> batch.tolist(), shapes.tolist()
        ([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], [[2], [3]])
    """
    if not isinstance(arrays, list | tuple):
        arrays = list(arrays)
    torch = imported("torch")
    if torch is not None and pad is None and arrays and type(arrays[0]) is torch.Tensor:
        batch = _stack_torch(torch, arrays, out)
        if batch is not None:
            return batch
    if out is None or isinstance(out, np.ndarray):
        return _native.stack(arrays, out=out, pad=pad, coerce=_as_ndarray)
    result = _native.stack(arrays, out=_out_view(out), pad=pad, coerce=_as_ndarray)
    return (out, result[1]) if pad is not None else out


def set_pool_limit(nbytes: int) -> int:
    """Bound the idle batch memory kept for reuse (0 disables reuse); returns the old bound.

    Large batches (1 MiB and up) return to a small pool when their last array dies, so the
    next batch of a similar size does not page-fault fresh memory. The default bound is
    256 MiB of idle buffers.

    Example:
        >>> import beam_turbo
        >>> previous = beam_turbo.set_pool_limit(0)  # no reuse
        >>> _ = beam_turbo.set_pool_limit(previous)
    """
    if nbytes < 0:
        raise InvalidInputError(f"the pool limit must be a number of bytes >= 0, got {nbytes}")
    return _native.set_pool_limit(nbytes)


Converter = Callable[[Any, int], Batch]

# How to view each type of element seen so far, so that a batch of one foreign type probes
# the first element only (probing a TensorFlow tensor for a missing attribute costs ~1 us).
_CONVERTERS: dict[type, Converter] = {}


def _as_ndarray(obj: Any, index: int) -> Batch:
    """A numpy view (no copy) of element ``index``, which is not a numpy array."""
    convert = _CONVERTERS.get(type(obj))
    if convert is None:
        convert, cacheable = _converter_for(obj, index)
        if cacheable and len(_CONVERTERS) < 64:
            _CONVERTERS[type(obj)] = convert
    try:
        return convert(obj, index)
    except (InvalidInputError, InvalidTypeError):
        raise
    except (ValueError, TypeError, BufferError, RuntimeError) as err:
        raise InvalidInputError(
            f"element {index} ({type(obj).__name__}) could not be read as an array: {err}"
        ) from err


def _converter_for(obj: Any, index: int) -> tuple[Converter, bool]:
    """How to view ``obj``, and whether every object of its type is viewed the same way."""
    kind = type(obj)
    torch = imported("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return (lambda t, i: _tensor_view(torch, t, f"element {i}")), True
    if getattr(obj, "__array_interface__", None) is not None:
        # Set on the instance, an interface says nothing of other objects of the type.
        return _from_interface, hasattr(kind, "__array_interface__")
    if isinstance(obj, bytes):
        # numpy, and so Beam's numpy.stack, reads bytes as one string (dtype S), not as uint8.
        return (lambda o, i: np.asarray(o)), True
    try:
        memoryview(obj)
    except TypeError:
        pass
    else:
        return (lambda o, i: np.asarray(memoryview(o))), True
    if hasattr(obj, "__dlpack__"):
        return (lambda o, i: np.from_dlpack(o)), hasattr(kind, "__dlpack__")
    if hasattr(obj, "__array__"):
        return _from_array_method, hasattr(kind, "__array__")
    raise InvalidTypeError(
        f"element {index} is {kind.__name__}, which does not expose its memory "
        "(buffer protocol, __array_interface__ or __dlpack__); expected a numpy array or tensor"
    )


def _from_array_method(obj: Any, index: int) -> Batch:
    array = np.asarray(obj)
    if array.dtype.hasobject:
        raise InvalidTypeError(
            f"element {index} ({type(obj).__name__}) has shape {array.shape} and dtype "
            "object; object arrays hold references, not values, and cannot be stacked"
        )
    return array


def _from_interface(obj: Any, index: int) -> Batch:
    """A view of an ``__array_interface__`` exporter, checked to lie inside its buffer.

    A raw ``(address, read_only)`` pointer cannot be checked and is trusted, as numpy does.
    """
    interface = obj.__array_interface__
    array = np.asarray(obj)
    data = interface.get("data")
    if isinstance(data, tuple):
        return array
    exporter = obj if data is None else data
    memory = np.frombuffer(memoryview(exporter).cast("B"), dtype=np.uint8)
    _native.check_bounds(array, memory, index)
    return array


def _tensor_view(torch: Any, tensor: torch.Tensor, what: str) -> Batch:
    """A numpy view of a CPU tensor's memory (bfloat16 through ml_dtypes)."""
    if tensor.device.type != "cpu":
        raise InvalidInputError(
            f"{what} is a torch tensor on {tensor.device}; stack works on host memory "
            "(move it with .cpu(), or stack on the device with torch.stack)"
        )
    tensor = tensor.detach().resolve_conj().resolve_neg()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        view: Batch = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return view
    try:
        array: Batch = tensor.numpy()
    except TypeError as err:
        raise InvalidTypeError(f"{what} has torch dtype {tensor.dtype}: {err}") from err
    return array


def _out_view(out: Any) -> Batch:
    """``out`` as a numpy array sharing its memory."""
    torch = imported("torch")
    if torch is not None and isinstance(out, torch.Tensor):
        return _tensor_view(torch, out, "out=")
    raise InvalidTypeError(
        f"out= must be a numpy array or a CPU torch tensor, got {type(out).__name__}"
    )


_TORCH_TO_NUMPY: dict[Any, np.dtype[Any]] = {}


def _numpy_dtype(torch: Any, dtype: Any) -> np.dtype[Any] | None:
    """The numpy dtype with the same bytes as a torch dtype, or None if there is none."""
    found = _TORCH_TO_NUMPY.get(dtype)
    if found is None:
        try:
            found = _tensor_view(torch, torch.empty(0, dtype=dtype), "tensor").dtype
        except (TypeError, ImportError):
            return None
        _TORCH_TO_NUMPY[dtype] = found
    return found


def _stack_torch(torch: Any, tensors: Sequence[Any], out: Any) -> Any | None:
    """``torch.stack`` written straight into the batch; None to take the general path.

    The general path reports any problem with the precise element, so anything unusual
    (mixed types or dtypes, a tensor off the CPU, a shape mismatch) goes there.
    """
    first = tensors[0]
    dtype = first.dtype
    if _native.first_unlike(tensors, "dtype") is not None:
        return None
    shape = (len(tensors), *first.shape)
    if out is None:
        np_dtype = _numpy_dtype(torch, dtype)
        if np_dtype is None:
            return None
        batch = _native.empty(shape, np_dtype)
        target = torch.from_numpy(batch.view(np.int16) if dtype == torch.bfloat16 else batch)
        if dtype == torch.bfloat16:
            target = target.view(torch.bfloat16)
    elif isinstance(out, torch.Tensor):
        _check_torch_out(out, shape, dtype)
        batch = target = out
    else:
        return None
    try:
        with torch.no_grad():
            torch.stack(tensors, out=target)
    except RuntimeError:
        return None
    return batch


def _check_torch_out(out: Any, shape: tuple[int, ...], dtype: Any) -> None:
    if tuple(out.shape) != shape:
        raise InvalidInputError(
            f"out= has the wrong shape: got {tuple(out.shape)}, expected {shape}"
        )
    if out.dtype != dtype:
        raise InvalidInputError(f"out= has the wrong dtype: got {out.dtype}, expected {dtype}")
    if out.device.type != "cpu":
        raise InvalidInputError(f"out= must be in host memory: got a tensor on {out.device}")
    if not out.is_contiguous():
        raise InvalidInputError("out= must be C-contiguous: got a strided tensor")
