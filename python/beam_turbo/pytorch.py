"""PyTorch model handlers: Beam's ``PytorchModelHandlerTensor`` and
``PytorchModelHandlerKeyedTensor``, with the same names, arguments and results, made faster.

Switch by changing the import::

    # from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerTensor
    from beam_turbo.pytorch import PytorchModelHandlerTensor

What changes, with Beam's default inference function:

- the batch is built by :func:`beam_turbo.stack` (one copy, a clear error naming a tensor of
  the wrong shape or dtype); on a GPU it is stacked straight into a reused pinned-memory
  buffer and copied to the device without blocking, so the next batch is stacked while the
  current one computes;
- the outputs are split into rows with one ``unbind`` and the results built in one pass;
- the batch byte-size metric is the stacked batch's true size, known in constant time (Beam's
  figure, the sum of ``element_size()`` over each tensor's first dimension, is only right for
  one-dimensional elements and costs a tensor per scalar);
- a CUDA out-of-memory error frees cached memory and splits the batch in halves until it fits;
- ``device`` also takes ``'auto'``, ``'cpu'``, ``'cuda'`` and ``'cuda:N'`` (and Beam's
  ``'CPU'``/``'GPU'``); CUDA that is not usable gives a warning and the CPU, as in Beam;
- ``inference_mode=True`` and ``autocast_dtype=torch.float16 | torch.bfloat16`` are opt-in.

A user's ``inference_fn`` still receives exactly what Beam gives it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from apache_beam.ml.inference import pytorch_inference as beam_pytorch
from apache_beam.ml.inference.base import PredictionResult

from beam_turbo._torch.inference import TorchInference, beam_device_name, resolve_device
from beam_turbo._torch.padding import check_pad_values, token_length
from beam_turbo.errors import InvalidInputError

__all__ = ["PytorchModelHandlerKeyedTensor", "PytorchModelHandlerTensor", "resolve_device"]


class PytorchModelHandlerTensor(TorchInference, beam_pytorch.PytorchModelHandlerTensor):
    """Beam's ``PytorchModelHandlerTensor``, faster; see the module docs for what changes.

    Example:
        >>> import torch, tempfile, os
        >>> from beam_turbo.pytorch import PytorchModelHandlerTensor
        >>> path = os.path.join(tempfile.mkdtemp(), "linear.pt")
        >>> torch.save(torch.nn.Linear(2, 1).state_dict(), path)
        >>> handler = PytorchModelHandlerTensor(
        ...     state_dict_path=path, model_class=torch.nn.Linear,
        ...     model_params={"in_features": 2, "out_features": 1})
        >>> model = handler.load_model()
        >>> len(handler.run_inference([torch.ones(2), torch.zeros(2)], model))
        2
    """

    def __init__(
        self,
        state_dict_path: str | None = None,
        model_class: Callable[..., torch.nn.Module] | None = None,
        model_params: dict[str, Any] | None = None,
        device: str | torch.device = "CPU",
        *,
        inference_fn: beam_pytorch.TensorInferenceFn = beam_pytorch.default_tensor_inference_fn,
        torch_script_model_path: str | None = None,
        min_batch_size: int | None = None,
        max_batch_size: int | None = None,
        max_batch_duration_secs: int | None = None,
        large_model: bool = False,
        model_copies: int | None = None,
        load_model_args: dict[str, Any] | None = None,
        max_batch_weight: int | None = None,
        element_size_fn: Callable[[Any], int] | None = None,
        batch_length_fn: Callable[[Any], int] | None = None,
        batch_bucket_boundaries: list[int] | None = None,
        inference_mode: bool = False,
        autocast_dtype: torch.dtype | str | None = None,
        **kwargs: Any,
    ) -> None:
        # Not Beam's: device= takes more choices, and inference_mode/autocast_dtype are added.
        super().__init__(
            state_dict_path,
            model_class,
            model_params,
            beam_device_name(device),
            inference_fn=inference_fn,
            torch_script_model_path=torch_script_model_path,
            min_batch_size=min_batch_size,
            max_batch_size=max_batch_size,
            max_batch_duration_secs=max_batch_duration_secs,
            large_model=large_model,
            model_copies=model_copies,
            load_model_args=load_model_args,
            max_batch_weight=max_batch_weight,
            element_size_fn=element_size_fn,
            batch_length_fn=batch_length_fn,
            batch_bucket_boundaries=batch_bucket_boundaries,
            **kwargs,
        )
        self._setup(device, inference_mode, autocast_dtype)

    def run_inference(
        self,
        batch: Sequence[torch.Tensor],
        model: torch.nn.Module,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        """Run the model on a batch of tensors; one ``PredictionResult`` per tensor."""
        args = inference_args or {}
        model_id = self._model_id()
        if self._inference_fn is not beam_pytorch.default_tensor_inference_fn:
            return self._run_user_fn(batch, model, args, model_id)

        return self._run_stacked(batch, model, args, model_id)

    def predict_matrix(
        self,
        matrix: Any,
        model: torch.nn.Module,
        inference_args: dict[str, Any] | None = None,
        feature_names: Sequence[str] = (),
    ) -> Any:
        """Predict a table's rows, given as one matrix of its feature columns (for
        ``RunInference(...).with_tables()``): the model called with one tensor that shares
        the matrix's memory on the CPU; one prediction per row, as numpy."""
        if self._inference_fn is not beam_pytorch.default_tensor_inference_fn:
            raise InvalidInputError(
                "with_tables() calls the model on the feature matrix itself: it does not take "
                f"a custom inference_fn ({self._inference_fn!r})"
            )
        with self._modes():
            output = model(torch.from_numpy(matrix).to(self._device), **(inference_args or {}))
        return output.detach().float().cpu().numpy()


class PytorchModelHandlerKeyedTensor(TorchInference, beam_pytorch.PytorchModelHandlerKeyedTensor):
    """Beam's ``PytorchModelHandlerKeyedTensor``, faster: each key's tensors are stacked by
    :func:`beam_turbo.stack` (pinned and non-blocking on a GPU), the outputs split in one pass.

    With ``pad_values`` (not Beam's), elements may be ragged: the inputs it names (token
    tensors) are padded per batch to the batch's longest element with their value, the model
    sees the padded batch, and each element's per-token outputs are trimmed back to its own
    length (see :mod:`beam_turbo._torch.padding`); ``RunInference`` gathers and sorts elements by
    length so that little is padding. Only for models that honour a mask (give them
    ``attention_mask``): padding changes what a model that ignores it computes.

    Example:
        >>> import os, tempfile, torch
        >>> from beam_turbo.pytorch import PytorchModelHandlerKeyedTensor
        >>> class Embed(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.table = torch.nn.Embedding(10, 2)
        ...     def forward(self, input_ids, attention_mask):
        ...         return self.table(input_ids) * attention_mask[..., None]
        >>> path = os.path.join(tempfile.mkdtemp(), "embed.pt")
        >>> torch.save(Embed().state_dict(), path)
        >>> handler = PytorchModelHandlerKeyedTensor(
        ...     path, Embed, pad_values={"input_ids": 0, "attention_mask": 0})
        >>> model = handler.load_model()
        >>> batch = [{"input_ids": torch.tensor([1, 2, 3]), "attention_mask": torch.ones(3)},
        ...          {"input_ids": torch.tensor([4]), "attention_mask": torch.ones(1)}]
        >>> [tuple(r.inference.shape) for r in handler.run_inference(batch, model)]
        [(3, 2), (1, 2)]
    """

    def __init__(
        self,
        state_dict_path: str | None = None,
        model_class: Callable[..., torch.nn.Module] | None = None,
        model_params: dict[str, Any] | None = None,
        device: str | torch.device = "CPU",
        *,
        inference_fn: beam_pytorch.KeyedTensorInferenceFn = (
            beam_pytorch.default_keyed_tensor_inference_fn
        ),
        torch_script_model_path: str | None = None,
        min_batch_size: int | None = None,
        max_batch_size: int | None = None,
        max_batch_duration_secs: int | None = None,
        large_model: bool = False,
        model_copies: int | None = None,
        load_model_args: dict[str, Any] | None = None,
        max_batch_weight: int | None = None,
        element_size_fn: Callable[[Any], int] | None = None,
        batch_length_fn: Callable[[Any], int] | None = None,
        batch_bucket_boundaries: list[int] | None = None,
        inference_mode: bool = False,
        autocast_dtype: torch.dtype | str | None = None,
        pad_values: Mapping[str, int | float] | None = None,
        **kwargs: Any,
    ) -> None:
        # Not Beam's: device= takes more choices; inference_mode, autocast_dtype and
        # pad_values are added.
        self._pad_values = check_pad_values(pad_values)
        if self._pad_values is not None and batch_length_fn is None:
            # RunInference sorts what it gathers by length, so that padding stays small.
            batch_length_fn = functools.partial(token_length, pad_values=self._pad_values)
        super().__init__(
            state_dict_path,
            model_class,
            model_params,
            beam_device_name(device),
            inference_fn=inference_fn,
            torch_script_model_path=torch_script_model_path,
            min_batch_size=min_batch_size,
            max_batch_size=max_batch_size,
            max_batch_duration_secs=max_batch_duration_secs,
            large_model=large_model,
            model_copies=model_copies,
            load_model_args=load_model_args,
            max_batch_weight=max_batch_weight,
            element_size_fn=element_size_fn,
            batch_length_fn=batch_length_fn,
            batch_bucket_boundaries=batch_bucket_boundaries,
            **kwargs,
        )
        self._setup(device, inference_mode, autocast_dtype)

    def run_inference(
        self,
        batch: Sequence[dict[str, torch.Tensor]],
        model: torch.nn.Module,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        """Run the model on a batch of dicts of tensors, one stacked tensor per key."""
        args = inference_args or {}
        model_id = self._model_id()
        if self._inference_fn is not beam_pytorch.default_keyed_tensor_inference_fn:
            return self._run_user_fn(batch, model, args, model_id)

        return self._run_keyed(batch, model, args, model_id)
