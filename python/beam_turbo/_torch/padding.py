"""Ragged keyed inputs (token tensors of different lengths): padded per batch to the batch's
longest element by :func:`beam_turbo.stack`, and each element's results trimmed back to its own
length. Used by the keyed PyTorch and HuggingFace handlers when given ``pad_values``.

A batch's token-level outputs are told from pooled ones by their shape: an output whose
dimension 1 is the batch's padded length is per token, and each element gets its own first
``length`` positions of it. So that a pooled output (the hidden size, the number of labels) is
never taken for a per-token one, a batch whose longest element has exactly that many tokens is
padded one token further (the model sees one more masked position).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from apache_beam.metrics.metric import Metrics

from beam_turbo._arrays.inputs import timed_stack
from beam_turbo._arrays.results import prediction_results, rows
from beam_turbo._arrays.stacking import stack
from beam_turbo.errors import InvalidInputError, InvalidTypeError

__all__ = [
    "PADDED_TOKENS_METRIC",
    "TOKENS_METRIC",
    "PaddedBatch",
    "check_pad_values",
    "count_tokens",
    "pad_batch",
    "padded_results",
    "token_length",
]

#: Counters in the handler's metrics namespace: the real tokens of padded batches, and the
#: tokens the model computed (padding included). Padding fraction: 1 - tokens / padded tokens.
TOKENS_METRIC = "beam_turbo_tokens"
PADDED_TOKENS_METRIC = "beam_turbo_padded_tokens"

#: Model config fields whose values are the widths of pooled outputs.
_POOLED_WIDTHS = ("hidden_size", "num_labels", "projection_dim")


def check_pad_values(pad_values: Mapping[str, Any] | None) -> dict[str, int | float] | None:
    """``pad_values`` as given to a handler, checked: a non-empty mapping from input keys to
    real numbers (``input_ids``: the tokenizer's pad id; ``attention_mask``: 0).

    Example:
        >>> check_pad_values({"input_ids": 0, "attention_mask": 0})
        {'input_ids': 0, 'attention_mask': 0}
    """
    if pad_values is None:
        return None
    if not isinstance(pad_values, Mapping) or not pad_values:
        raise InvalidInputError(
            f"pad_values={pad_values!r}: expected a non-empty dict from input keys to the "
            "value each is padded with, e.g. {'input_ids': tokenizer.pad_token_id, "
            "'attention_mask': 0, 'token_type_ids': 0}"
        )
    checked: dict[str, int | float] = {}
    for key, value in pad_values.items():
        if not isinstance(key, str):
            raise InvalidInputError(f"pad_values: key {key!r} is not a string (an input's name)")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise InvalidInputError(
                f"pad_values[{key!r}] = {value!r}: expected an int or a float (None: the "
                "tokenizer has no pad token; give it one, e.g. its eos id)"
            )
        checked[key] = value.item() if isinstance(value, np.generic) else value  # type: ignore[assignment]
    return checked


def token_length(element: Mapping[str, Any], pad_values: Mapping[str, Any]) -> int:
    """An element's length in tokens: dimension 0 of its first padded input."""
    key = next(iter(pad_values))
    try:
        tensor = element[key]
    except (KeyError, TypeError) as error:
        raise InvalidInputError(
            f"an element has no input {key!r}, which pad_values pads; got {_describe(element)}"
        ) from error
    shape = getattr(tensor, "shape", None)
    if not shape:
        raise InvalidInputError(
            f"input {key!r} of an element has shape {tuple(shape or ())}; a padded input "
            "needs at least one dimension (its tokens)"
        )
    return int(shape[0])


class PaddedBatch:
    """A ragged batch stacked per key: ``inputs`` (one CPU tensor per key), each element's own
    length in tokens (``lengths``), and the padded length (``padded``)."""

    __slots__ = ("inputs", "lengths", "padded", "tokens")

    def __init__(
        self, inputs: dict[str, torch.Tensor], lengths: np.ndarray[Any, Any], padded: int
    ) -> None:
        self.inputs = inputs
        self.lengths = lengths
        self.padded = padded
        #: Real tokens in the batch.
        self.tokens = int(lengths.sum())

    @property
    def padded_tokens(self) -> int:
        """Tokens the model computes, padding included."""
        return self.padded * len(self.lengths)


def pad_batch(
    batch: Sequence[Mapping[str, Any]],
    pad_values: Mapping[str, int | float],
    stack_same_shape: Any,
    model: Any = None,
) -> PaddedBatch:
    """Stack a batch of dicts of tensors: the keys in ``pad_values`` padded to the batch's
    longest element with their pad value (one copy, by :func:`beam_turbo.stack`), the others
    by ``stack_same_shape(column)``. ``model`` (its config) names the pooled widths that the
    padded length must not equal.

    Raises:
        InvalidInputError: an element whose keys differ from element 0's, a padded input whose
            rank differs from element 0's, a pad value its dtype cannot hold; each names the
            element, the key and what was expected.
    """
    keys = list(batch[0])
    missing = [key for key in pad_values if key not in batch[0]]
    if missing:
        raise InvalidInputError(
            f"element 0 has no input {missing[0]!r}, which pad_values pads; it has {keys}"
        )
    for index, element in enumerate(batch):
        if not isinstance(element, Mapping):
            raise InvalidTypeError(
                f"element {index} is {type(element).__name__}; expected a dict from input "
                f"names to tensors, like element 0 ({keys})"
            )
        if len(element) != len(keys) or any(key not in element for key in keys):
            raise InvalidInputError(
                f"element {index} has inputs {list(element)}; every element of a batch needs "
                f"the inputs of element 0: {keys}"
            )
    inputs: dict[str, torch.Tensor] = {}
    lengths: np.ndarray[Any, Any] | None = None
    padded = 0
    for key in keys:
        column = [element[key] for element in batch]
        if key not in pad_values:
            inputs[key] = stack_same_shape(column)
            continue
        _check_ranks(column, key)
        try:
            # The one copy: each element's tokens into the padded batch, pad value around.
            stacked, shapes = timed_stack(stack, column, pad=pad_values[key])
        except (InvalidInputError, InvalidTypeError) as error:
            raise type(error)(f"input {key!r}: {error}") from None
        if lengths is None:
            lengths, padded = shapes[:, 0].copy(), stacked.shape[1]
        inputs[key] = _as_tensor(stacked)
    assert lengths is not None  # pad_values is non-empty and every key was found
    widths = _pooled_widths(model)
    if padded in widths and int(lengths.min()) < padded:  # else trimming cuts nothing
        padded = _pad_further(inputs, pad_values, padded, widths)
    return PaddedBatch(inputs, lengths, padded)


def _check_ranks(column: Sequence[Any], key: str) -> None:
    rank = len(getattr(column[0], "shape", ()))
    for index, tensor in enumerate(column):
        shape = tuple(getattr(tensor, "shape", ()))
        if len(shape) != rank or rank == 0:
            raise InvalidInputError(
                f"input {key!r} of element {index} has shape {shape} "
                f"({getattr(tensor, 'dtype', type(tensor).__name__)}); expected "
                f"{rank if rank else 'at least one'} dimension(s) like element 0's "
                f"{tuple(getattr(column[0], 'shape', ()))}: padding lengthens dimensions, it "
                "does not add them"
            )


def _as_tensor(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if batch.dtype.name == "bfloat16":
        return torch.from_numpy(batch.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(batch)  # shares the stacked batch's memory: no copy


def _pooled_widths(model: Any) -> set[int]:
    config = getattr(model, "config", None)
    found = (getattr(config, name, None) for name in _POOLED_WIDTHS)
    return {width for width in found if isinstance(width, int)}


def _pad_further(
    inputs: dict[str, torch.Tensor],
    pad_values: Mapping[str, int | float],
    padded: int,
    widths: set[int],
) -> int:
    """Lengthen the padded inputs until the padded length is no pooled width (a rare copy)."""
    longer = padded + 1
    while longer in widths:
        longer += 1
    for key, value in pad_values.items():
        tensor = inputs[key]
        grown = tensor.new_full((tensor.shape[0], longer, *tensor.shape[2:]), value)
        grown[:, :padded] = tensor
        inputs[key] = grown
    return longer


def count_tokens(namespace: str, padded: PaddedBatch) -> None:
    """Add a padded batch's tokens to the :data:`TOKENS_METRIC` and
    :data:`PADDED_TOKENS_METRIC` counters (outside a pipeline, nothing is counted)."""
    Metrics.counter(namespace, TOKENS_METRIC).inc(padded.tokens)
    Metrics.counter(namespace, PADDED_TOKENS_METRIC).inc(padded.padded_tokens)


def padded_results(
    batch: Sequence[Any], predictions: Any, padded: PaddedBatch, model_id: str | None
) -> list[Any]:
    """Beam's per-element results, each element's per-token outputs trimmed to its length."""
    if isinstance(predictions, Mapping):
        columns = {key: _trimmed(value, padded) for key, value in predictions.items()}
        keys = list(columns)
        per_example: Iterable[Any] = (
            dict(zip(keys, values, strict=False)) for values in zip(*columns.values(), strict=False)
        )
        return prediction_results(batch, list(per_example), model_id)
    return prediction_results(batch, _trimmed(predictions, padded), model_id)


def _trimmed(output: Any, padded: PaddedBatch) -> Any:
    """An output's rows; a per-token output's each cut to its element's length (views)."""
    if (
        isinstance(output, torch.Tensor)
        and output.dim() >= 2
        and output.shape[0] == len(padded.lengths)
        and output.shape[1] == padded.padded
    ):
        lengths = padded.lengths.tolist()
        return [row[:length] for row, length in zip(output.unbind(0), lengths, strict=True)]
    return rows(output)


def _describe(element: Any) -> str:
    if isinstance(element, Mapping):
        return f"inputs {list(element)}"
    return f"a {type(element).__name__}"
