"""HuggingFace model handlers: Beam's ``HuggingFaceModelHandlerKeyedTensor``,
``HuggingFaceModelHandlerTensor`` and ``HuggingFacePipelineModelHandler``, with the same names,
arguments and results, made faster.

Switch by changing the import::

    # from apache_beam.ml.inference.huggingface_inference import HuggingFaceModelHandlerKeyedTensor
    from beam_turbo.huggingface import HuggingFaceModelHandlerKeyedTensor

What changes:

- PyTorch batches are built by :func:`beam_turbo.stack` (one copy; pinned and non-blocking on
  a GPU), and the outputs split into rows in one pass, as in :mod:`beam_turbo.pytorch`;
- ``pad_values`` (the keyed handler, not Beam's) lets token tensors of different lengths
  batch: each batch is padded to its longest element, ``RunInference`` sorts what it gathers
  by length so that little is padding, and per-token outputs come back trimmed to each
  element's own length. Beam can only run such elements one at a time (``max_batch_size=1``)
  or padded upstream to a fixed length. :func:`token_pad_values` gives the usual values;
- importing this module imports neither TensorFlow nor ``transformers``: Beam 2.75-2.77's
  module imports both (and, with TensorFlow 2.21 and torch 2.15 installed together, aborts the
  process unless torch's ``triton`` was imported first); TensorFlow is used only for TensorFlow
  tensors. (From Beam 2.78, Beam's module imports no framework; this one imports torch.) On
  Beam 2.78, as Beam's, the pipeline handler's device is chosen when the model loads;
- the batch byte-size metric is the batch's true size (Beam's sums each value's
  ``element_size()``, the bytes of one scalar);
- a user's ``inference_fn`` on ``HuggingFaceModelHandlerTensor`` gets the device as its third
  argument (Beam's passes ``inference_args`` there twice), as on the keyed handler.

``HuggingFacePipelineModelHandler`` runs a ``transformers.pipeline`` as Beam's does: a pipeline
batches inside itself when given ``batch_size`` (``inference_args={"batch_size": 32}``).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from beam_turbo._arrays.results import prediction_results
from beam_turbo._beam import internals
from beam_turbo._frameworks import imported
from beam_turbo._running.loading import loading_model
from beam_turbo._torch.inference import TorchInference, cuda_usable, resolve_device
from beam_turbo._torch.padding import check_pad_values, token_length
from beam_turbo.errors import InvalidInputError

__all__ = [
    "HuggingFaceModelHandlerKeyedTensor",
    "HuggingFaceModelHandlerTensor",
    "HuggingFacePipelineModelHandler",
    "token_pad_values",
]

#: Beam's module logs its warnings here; users filter on it.
_BEAM_LOG = logging.getLogger("apache_beam.ml.inference.huggingface_inference")
_NO_GPU = (
    "HuggingFaceModelHandler specified a 'GPU' device, but GPUs are not available. "
    "Switching to CPU."
)


def token_pad_values(tokenizer: Any) -> dict[str, int | float]:
    """The ``pad_values`` for a tokenizer's outputs: ``input_ids`` padded with its pad token,
    ``attention_mask`` and ``token_type_ids`` with 0.

    Example:
        >>> class Tokenizer:  # any transformers tokenizer
        ...     pad_token_id = 0
        >>> token_pad_values(Tokenizer())
        {'input_ids': 0, 'attention_mask': 0, 'token_type_ids': 0}
    """
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        raise InvalidInputError(
            f"{type(tokenizer).__name__} has no pad token (pad_token_id is None); set one "
            "first, e.g. tokenizer.pad_token = tokenizer.eos_token"
        )
    return {"input_ids": int(pad_id), "attention_mask": 0, "token_type_ids": 0}


def _check_model_args(model_uri: Any, model_class: Any) -> None:
    """Beam's check, with Beam's words (its ``_validate_constructor_args``)."""
    if not model_uri or not model_class:
        raise RuntimeError(
            "Please provide both model class and model uri to load the model."
            f"Got params as model_uri={model_uri} and model_class={model_class}."
        )


def _is_local_path(uri: Any) -> bool:
    return isinstance(uri, str | os.PathLike) and (
        os.path.isabs(uri) or str(uri).startswith((".", "~")) or os.path.exists(uri)
    )


def _torch_device(name: Any) -> torch.device:
    """The torch device for Beam's ``device`` argument ('CPU', 'GPU', or beam-turbo's 'auto',
    'cuda:N', ...); CUDA that cannot be used gives Beam's warning and the CPU."""
    device = resolve_device(name)
    if device.type == "cuda" and not cuda_usable(device):
        _BEAM_LOG.warning(_NO_GPU)
        return torch.device("cpu")
    return device


class _HuggingFaceTorch(TorchInference):
    """What the two tensor handlers share: Beam's device names for users' functions, the
    model loaded by ``from_pretrained`` onto the device, grads off."""

    _model_uri: str
    _model_class: Any
    _model_config_args: dict[str, Any]
    _device_name: Any = "CPU"
    _framework: str

    def _user_fn_device(self) -> Any:
        return self._device_name  # what Beam gives a user's function: the name, as given

    def _model_id(self) -> str | None:
        return self._model_uri

    def load_model(self) -> Any:
        """Load the model with ``model_class.from_pretrained(model_uri, **load_model_args)``;
        a PyTorch model goes to the device, its grads off."""
        # A local folder that is missing or not a model: an error that names it (HuggingFace
        # takes a missing absolute path for a malformed hub id). Hub ids are HF's to judge.
        local = _is_local_path(self._model_uri)
        with loading_model(self._model_uri, "HuggingFace model") if local else nullcontext():
            model = self._model_class.from_pretrained(self._model_uri, **self._model_config_args)
        if self._framework in ("pt", ""):
            self._device = _torch_device(self._device_name)
            if isinstance(model, torch.nn.Module):
                model.to(self._device)
        if callable(getattr(model, "requires_grad_", None)):
            model.requires_grad_(False)
        return model

    def update_model_path(self, model_path: str | None = None) -> None:
        self._model_uri = model_path if model_path else self._model_uri


class HuggingFaceModelHandlerKeyedTensor(_HuggingFaceTorch, ModelHandler):
    """Beam's ``HuggingFaceModelHandlerKeyedTensor``, faster, and with ``pad_values`` for token
    tensors of different lengths (see the module docs).

    Example:
        >>> # tokenizer = AutoTokenizer.from_pretrained(path)
        >>> # handler = HuggingFaceModelHandlerKeyedTensor(
        >>> #     model_uri=path, model_class=AutoModel, framework="pt",
        >>> #     pad_values=token_pad_values(tokenizer))
        >>> # embeddings = tokenized | RunInference(handler)
    """

    def __init__(
        self,
        model_uri: str,
        model_class: Any,
        framework: str,
        device: str = "CPU",
        *,
        inference_fn: Callable[..., Iterable[PredictionResult]] | None = None,
        load_model_args: dict[str, Any] | None = None,
        min_batch_size: int | None = None,
        max_batch_size: int | None = None,
        max_batch_duration_secs: int | None = None,
        large_model: bool = False,
        model_copies: int | None = None,
        max_batch_weight: int | None = None,
        element_size_fn: Callable[[Any], int] | None = None,
        batch_length_fn: Callable[[Any], int] | None = None,
        batch_bucket_boundaries: list[int] | None = None,
        pad_values: Mapping[str, int | float] | None = None,
        **kwargs: Any,
    ) -> None:
        self._pad_values = check_pad_values(pad_values)
        if self._pad_values is not None and framework != "pt":
            raise InvalidInputError(
                f"pad_values pads PyTorch tensors; framework={framework!r} (use 'pt')"
            )
        if self._pad_values is not None and batch_length_fn is None:
            # RunInference sorts what it gathers by length, so that padding stays small.
            batch_length_fn = functools.partial(token_length, pad_values=self._pad_values)
        super().__init__(
            min_batch_size=min_batch_size,
            max_batch_size=max_batch_size,
            max_batch_duration_secs=max_batch_duration_secs,
            max_batch_weight=max_batch_weight,
            element_size_fn=element_size_fn,
            batch_length_fn=batch_length_fn,
            batch_bucket_boundaries=batch_bucket_boundaries,
            large_model=large_model,
            model_copies=model_copies,
            **kwargs,
        )
        self._model_uri = model_uri
        self._model_class = model_class
        self._device_name = device
        self._device = resolve_device(device)  # checked now; the usable one at load time
        self._inference_fn = inference_fn
        self._model_config_args = load_model_args if load_model_args else {}
        self._framework = framework
        _check_model_args(model_uri, model_class)

    def run_inference(
        self,
        batch: Sequence[Mapping[str, Any]],
        model: Any,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        """Run the model on a batch of dicts of tensors: one batch per key (padded per batch
        for the keys in ``pad_values``), given to the model as keyword arguments."""
        args = inference_args or {}
        if self._inference_fn:
            if self._framework == "tf":
                return self._inference_fn(batch, model, self._device_name, args, self._model_uri)
            return self._run_user_fn(batch, model, args, self._model_uri)
        if self._framework == "tf":
            return _run_tensorflow_keyed(batch, model, self._device_name, args, self._model_uri)
        return self._run_keyed(batch, model, args, self._model_uri)

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        """The batch's true size in bytes (TensorFlow: Beam's ``sys.getsizeof`` sum)."""
        if self._framework == "tf":
            return sum(sys.getsizeof(element) for element in batch)
        return super().get_num_bytes(batch)

    def get_metrics_namespace(self) -> str:
        return "BeamML_HuggingFaceModelHandler_KeyedTensor"


class HuggingFaceModelHandlerTensor(_HuggingFaceTorch, ModelHandler):
    """Beam's ``HuggingFaceModelHandlerTensor``, faster: PyTorch tensors are stacked by
    :func:`beam_turbo.stack`; the framework is told from the first batch, as in Beam."""

    def __init__(
        self,
        model_uri: str,
        model_class: Any,
        device: str = "CPU",
        *,
        inference_fn: Callable[..., Iterable[PredictionResult]] | None = None,
        load_model_args: dict[str, Any] | None = None,
        min_batch_size: int | None = None,
        max_batch_size: int | None = None,
        max_batch_duration_secs: int | None = None,
        large_model: bool = False,
        model_copies: int | None = None,
        max_batch_weight: int | None = None,
        element_size_fn: Callable[[Any], int] | None = None,
        batch_length_fn: Callable[[Any], int] | None = None,
        batch_bucket_boundaries: list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            min_batch_size=min_batch_size,
            max_batch_size=max_batch_size,
            max_batch_duration_secs=max_batch_duration_secs,
            max_batch_weight=max_batch_weight,
            element_size_fn=element_size_fn,
            batch_length_fn=batch_length_fn,
            batch_bucket_boundaries=batch_bucket_boundaries,
            large_model=large_model,
            model_copies=model_copies,
            **kwargs,
        )
        self._model_uri = model_uri
        self._model_class = model_class
        self._device_name = device
        self._device = resolve_device(device)
        self._inference_fn = inference_fn
        self._model_config_args = load_model_args if load_model_args else {}
        self._framework = ""
        _check_model_args(model_uri, model_class)

    def run_inference(
        self,
        batch: Sequence[Any],
        model: Any,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        """Run the model on a batch of tensors, stacked into one."""
        args = inference_args or {}
        if not self._framework:
            self._framework = "tf" if _is_tensorflow_tensor(batch[0]) else "pt"
        if self._inference_fn:
            if self._framework == "tf":
                return self._inference_fn(batch, model, self._device_name, args, self._model_uri)
            return self._run_user_fn(batch, model, args, self._model_uri)
        if self._framework == "tf":
            return _run_tensorflow(batch, model, self._device_name, args, self._model_uri)
        return self._run_stacked(batch, model, args, self._model_uri)

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        """The batch's true size in bytes (TensorFlow: Beam's ``sys.getsizeof`` sum)."""
        if self._framework == "tf":
            return sum(sys.getsizeof(element) for element in batch)
        return super().get_num_bytes(batch)

    def get_metrics_namespace(self) -> str:
        return "BeamML_HuggingFaceModelHandler_Tensor"


def _is_tensorflow_tensor(value: Any) -> bool:
    tf = imported("tensorflow")  # a TensorFlow tensor means TensorFlow is imported
    return tf is not None and isinstance(value, tf.Tensor)


def _run_tensorflow(
    batch: Sequence[Any], model: Any, device: Any, args: dict[str, Any], model_id: str | None
) -> list[PredictionResult]:
    """Beam's TensorFlow inference: ``tf.stack`` the batch, call the model."""
    import tensorflow as tf

    if device == "GPU":
        _warn_without_tensorflow_gpu(tf, device)
    predictions = model(tf.stack(batch, axis=0), **args)
    return prediction_results(batch, predictions, model_id)


def _run_tensorflow_keyed(
    batch: Sequence[Mapping[str, Any]],
    model: Any,
    device: Any,
    args: dict[str, Any],
    model_id: str | None,
) -> list[PredictionResult]:
    """Beam's TensorFlow keyed inference: ``tf.stack`` per key, the model called with them."""
    import tensorflow as tf

    if device == "GPU":
        _warn_without_tensorflow_gpu(tf, device)
    columns: dict[str, list[Any]] = {}
    for example in batch:
        for key, tensor in example.items():
            columns.setdefault(key, []).append(tensor)
    stacked = {key: tf.stack(column, axis=0) for key, column in columns.items()}
    return prediction_results(batch, model(**stacked, **args), model_id)


def _warn_without_tensorflow_gpu(tf: Any, device: str) -> None:
    if not tf.config.list_physical_devices(device):
        _BEAM_LOG.warning(_NO_GPU)


def _default_pipeline_inference_fn(
    batch: Sequence[Any], pipeline: Any, inference_args: dict[str, Any]
) -> Any:
    return pipeline(batch, **inference_args)


class HuggingFacePipelineModelHandler(ModelHandler):
    """Beam's ``HuggingFacePipelineModelHandler``: a ``transformers.pipeline`` for a task or a
    model, run on each batch. The same arguments, devices, errors and results as Beam's."""

    def __init__(
        self,
        task: Any = "",
        model: str = "",
        *,
        device: str | None = None,
        inference_fn: Callable[..., Any] = _default_pipeline_inference_fn,
        load_pipeline_args: dict[str, Any] | None = None,
        min_batch_size: int | None = None,
        max_batch_size: int | None = None,
        max_batch_duration_secs: int | None = None,
        large_model: bool = False,
        model_copies: int | None = None,
        max_batch_weight: int | None = None,
        element_size_fn: Callable[[Any], int] | None = None,
        batch_length_fn: Callable[[Any], int] | None = None,
        batch_bucket_boundaries: list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            min_batch_size=min_batch_size,
            max_batch_size=max_batch_size,
            max_batch_duration_secs=max_batch_duration_secs,
            max_batch_weight=max_batch_weight,
            element_size_fn=element_size_fn,
            batch_length_fn=batch_length_fn,
            batch_bucket_boundaries=batch_bucket_boundaries,
            large_model=large_model,
            model_copies=model_copies,
            **kwargs,
        )
        self._task = task
        self._model = model
        self._inference_fn = inference_fn
        self._load_pipeline_args = dict(load_pipeline_args) if load_pipeline_args else {}
        self._framework = "pt"
        self._deduplicate_device_value(device)
        if not self._task and not self._model:
            raise RuntimeError(
                "Please provide either task or model to the HuggingFacePipelineModelHandler. "
                "If the model already defines the task, no need to specify the task."
            )

    def _deduplicate_device_value(self, device: str | None) -> None:
        """Beam's: ``device`` becomes the pipeline's ``device`` argument, unless
        ``load_pipeline_args`` has one (then ``device`` must not be given)."""
        current = device.upper() if device else None
        if current and current not in ("CPU", "GPU"):
            raise ValueError(
                f"Invalid device value: {device}. Please specify either CPU or GPU. Defaults "
                "to GPU if no value is provided."
            )
        if "device" in self._load_pipeline_args:
            if current:
                raise ValueError(
                    "`device` specified in `load_pipeline_args`. `device` parameter for "
                    "HuggingFacePipelineModelHandler will be ignored."
                )
            return
        if current == "CPU":
            self._load_pipeline_args["device"] = "cpu"
        elif internals.HUGGINGFACE_FRAMEWORKS_AT_LOAD:
            return  # chosen where the model loads (load_model), as Beam does
        elif torch.cuda.is_available():
            self._load_pipeline_args["device"] = "cuda:0"
        else:
            _BEAM_LOG.warning(_NO_GPU)
            _BEAM_LOG.warning(_NO_GPU)  # Beam warns twice: once probing, once choosing
            self._load_pipeline_args["device"] = "cpu"

    def load_model(self) -> Any:
        """The pipeline, from ``transformers.pipeline(task=..., model=..., **args)``."""
        if not internals.HUGGINGFACE_FRAMEWORKS_AT_LOAD:
            from transformers import pipeline

            return pipeline(task=self._task, model=self._model, **self._load_pipeline_args)
        try:
            from transformers import pipeline
        except ImportError as error:
            raise ImportError(internals.TRANSFORMERS_REQUIRED) from error
        args = dict(self._load_pipeline_args)
        if "device" not in args:  # the loading worker's GPU, as Beam 2.78 chooses it
            import torch as workers_torch

            if workers_torch.cuda.is_available():
                args["device"] = "cuda:0"
            else:
                _BEAM_LOG.warning(_NO_GPU)
                args["device"] = "cpu"
        return pipeline(task=self._task, model=self._model, **args)

    def run_inference(
        self,
        batch: Sequence[Any],
        pipeline: Any,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        """Run the pipeline on a batch of inputs (texts, or paths to images or audio)."""
        predictions = self._inference_fn(batch, pipeline, inference_args or {})
        return prediction_results(batch, predictions)

    def update_model_path(self, model_path: str | None = None) -> None:
        """Use another model for the same task from now on."""
        self._model = model_path if model_path else self._model

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        return sum(sys.getsizeof(element) for element in batch)

    def get_metrics_namespace(self) -> str:
        return "BeamML_HuggingFacePipelineModelHandler"
