"""``beam_turbo.RunInference``: Beam's ``RunInference``, with beam-turbo's batching, model cache,
load retries and out-of-memory recovery. Change the import; nothing else::

    # from apache_beam.ml.inference.base import RunInference
    from beam_turbo import RunInference

It is a subclass of Beam's transform, so it takes every argument Beam 2.77's takes (and
``with_exception_handling``, ``with_monitoring_transform``, keyed, multi-model and maybe-keyed
handlers, pre/post-processing, side-input model refresh, ``watch_model_pattern``,
``use_model_manager``, ``large_model`` and ``model_copies``, all through Beam's own
machinery) and gives Beam's outputs. What it changes, and when it takes which of its paths
(fused in one DoFn, within bundles or across them in keyed state; or Beam's own inference DoFn
after ``BatchElements``), is in ``docs/run-inference.md`` and ``docs/architecture.md``; the
deliberate differences from Beam in the README's table.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam import typehints
from apache_beam.coders import typecoders
from apache_beam.ml.inference import base
from apache_beam.transforms import window as beam_window

from beam_turbo._arrays.tables import TableSpec, row_count
from beam_turbo._dofns.beam_inference import BeamInferenceDoFn
from beam_turbo._dofns.gathering import GatheringDoFn, RunBatches, WindowedGatheringDoFn
from beam_turbo._dofns.keyed_state import keying_dofn, stateful_inference_dofn
from beam_turbo._dofns.rows import TableRowsDoFn, row_type, rows_spec
from beam_turbo._gathering.gatherer import POOL_BATCHES, by_length, unkeyed_length
from beam_turbo._gathering.sizing import BATCHING_ARGS, LENGTH_ARGS, STREAMING_ARGS, Sizing
from beam_turbo._running.dead_letters import DEAD_LETTER_TAG, MAIN_TAG, check_threshold
from beam_turbo._running.flight import DEFAULT_BATCHES_IN_FLIGHT
from beam_turbo._running.tables import check_scores_tables, check_unbatched_by_length
from beam_turbo.batching import BatchElements
from beam_turbo.errors import InvalidInputError, InvalidTypeError

__all__ = [
    "TABLE_MAX_BATCH_BYTES",
    "TABLE_MAX_BATCH_ROWS",
    "TABLE_MIN_BATCH_ROWS",
    "TABLE_UNNAMED_MAX_BATCH_ROWS",
    "RunInference",
]

#: The largest batch of rows ``with_tables()`` gathers unless the handler sets
#: ``max_batch_size``: a model's rows are smaller than the elements Beam's default (10,000)
#: is for. Where the feature columns are named, the batch is also bounded by
#: ``TABLE_MAX_BATCH_BYTES`` of model input; where they are not (their count is known only at
#: the first table), by ``TABLE_UNNAMED_MAX_BATCH_ROWS``.
TABLE_MAX_BATCH_ROWS = 1 << 20
#: The model input (the feature matrix) a batch of rows may take: at 16 float64 features,
#: ``TABLE_MAX_BATCH_ROWS`` rows. Large batches matter on a loaded machine: a linear model's
#: multi-threaded BLAS took 10 to 50 times as long per row on 65,536-row batches as on
#: 1,048,576-row ones (its threads wait on each other), and each batch is a write (a Parquet row
#: group) downstream.
TABLE_MAX_BATCH_BYTES = 1 << 27
TABLE_UNNAMED_MAX_BATCH_ROWS = 1 << 16
#: The smallest, unless the handler sets ``min_batch_size`` (a bundle's or window's end still
#: closes a batch short of it).
TABLE_MIN_BATCH_ROWS = 1 << 10

_LOG = logging.getLogger(__name__)


def _table_max_batch_rows(spec: TableSpec) -> int:
    """The most rows in a batch of ``spec``'s tables, unless the handler says: within
    ``TABLE_MAX_BATCH_BYTES`` of model input (at the feature dtype's size, or 8 bytes a value
    where it is the columns' own), at most ``TABLE_MAX_BATCH_ROWS``, at least
    ``TABLE_MIN_BATCH_ROWS``.

    Example:
        >>> _table_max_batch_rows(TableSpec(feature_columns=("a",) * 16))
        1048576
        >>> _table_max_batch_rows(TableSpec(feature_columns=("a",) * 1000))
        16777
        >>> _table_max_batch_rows(TableSpec())
        65536
    """
    if spec.feature_columns is None:
        return TABLE_UNNAMED_MAX_BATCH_ROWS
    width = max(1, len(spec.feature_columns))
    value_bytes = 8 if spec.feature_dtype is None else np.dtype(spec.feature_dtype).itemsize
    rows = TABLE_MAX_BATCH_BYTES // (width * value_bytes)
    return int(min(TABLE_MAX_BATCH_ROWS, max(TABLE_MIN_BATCH_ROWS, rows)))


class RunInference(base.RunInference):
    """Beam's ``RunInference`` made faster; see the module docs for what changes.

    Args:
        model_handler: any Beam ``ModelHandler``: beam-turbo's, Beam's, or your own.
        clock, inference_args, metrics_namespace, model_metadata_pcoll, watch_model_pattern,
        model_identifier, use_model_manager, model_manager_args, monitoring_transform, kwargs:
            as in Beam.
        model_load_retries: how many times a failed model load is retried (default 2).
        model_load_backoff_secs: the first retry's delay, doubled for each next one (1.0).

    Example:
        >>> import apache_beam as beam, numpy as np
        >>> from beam_turbo import RunInference
        >>> from beam_turbo.sklearn import SklearnModelHandlerNumpy
        >>> # examples | RunInference(SklearnModelHandlerNumpy(model_uri="model.pkl"))
    """

    def __init__(
        self,
        model_handler: base.ModelHandler,
        clock: Any = time,
        inference_args: dict[str, Any] | None = None,
        metrics_namespace: str | None = None,
        *,
        model_metadata_pcoll: beam.PCollection | None = None,
        watch_model_pattern: str | None = None,
        model_identifier: str | None = None,
        use_model_manager: bool = False,
        model_manager_args: dict[str, Any] | None = None,
        monitoring_transform: beam.PTransform | None = None,
        model_load_retries: int = 2,
        model_load_backoff_secs: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if not isinstance(model_handler, base.ModelHandler):
            raise InvalidTypeError(
                f"model_handler must be an apache_beam ModelHandler, got "
                f"{type(model_handler).__name__}"
            )
        if not isinstance(model_load_retries, int) or model_load_retries < 0:
            raise InvalidInputError(
                f"model_load_retries must be an int >= 0, got {model_load_retries!r}"
            )
        if not model_load_backoff_secs >= 0:
            raise InvalidInputError(
                f"model_load_backoff_secs must be >= 0, got {model_load_backoff_secs!r}"
            )
        super().__init__(
            model_handler,
            clock,
            inference_args,
            metrics_namespace,
            model_metadata_pcoll=model_metadata_pcoll,
            watch_model_pattern=watch_model_pattern,
            model_identifier=model_identifier,
            use_model_manager=use_model_manager,
            model_manager_args=model_manager_args,
            **kwargs,
        )
        # Ours on every supported Beam: 2.75 and 2.76 have no monitoring outlet (_finish adds it).
        self._monitoring_transform = monitoring_transform
        self._model_load_retries = model_load_retries
        self._model_load_backoff_secs = model_load_backoff_secs
        self._isolate_failures = False
        self._tables: TableSpec | None = None
        self._batches_in_flight = DEFAULT_BATCHES_IN_FLIGHT
        self._adaptive = True

    def with_batches_in_flight(self, batches: int, *, adaptive: bool = True) -> RunInference:
        """How many batches run on an inference thread while the next is gathered (default
        1: one ahead); 0 runs each batch as it is gathered, on the DoFn's thread. In flight,
        the model's time overlaps Beam's per-element work wherever the model releases the GIL
        (PyTorch, TensorFlow, a device; see docs/run-inference.md for when it gains). With
        ``adaptive`` (the default) the DoFn measures, as it runs, whether handing batches
        over or running them where they are gathered takes less time per element, and keeps
        the faster (``False``: every batch handed over). Results in the global window then
        come out with a later element of the bundle, or at the end of the window at the
        bundle's end. Batching across bundles (``max_batch_duration_secs``) and Beam's two
        steps run each batch as it is gathered.

        Example:
            >>> # examples | RunInference(handler).with_batches_in_flight(0)  # serial
        """
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 0:
            raise InvalidInputError(
                f"with_batches_in_flight takes an int >= 0 (0: serial), got {batches!r}"
            )
        if not isinstance(adaptive, bool):
            raise InvalidInputError(
                f"with_batches_in_flight's adaptive takes True or False, got {adaptive!r}"
            )
        self._batches_in_flight = batches
        self._adaptive = adaptive
        return self

    def with_tables(
        self,
        feature_columns: Sequence[str] | None = None,
        *,
        keep_columns: Sequence[str] | None = None,
        prediction_column: str = "prediction",
        feature_dtype: str | None = None,
        prediction_dtype: str | None = None,
    ) -> RunInference:
        """Score tables column-wise: each element is a table (a ``pyarrow.Table`` or
        ``RecordBatch``, a ``pandas.DataFrame``; ``ReadFromParquetBatched`` gives pyarrow
        Tables). Tables are cut and joined into batches of the sizer's target rows, and each
        batch comes out as one table of the same kind, with ``keep_columns`` (default: all)
        and the prediction in ``prediction_column``. The feature columns (default: every
        column not in ``keep_columns``) become the model's input matrix in one copy, of
        ``feature_dtype`` (default: the columns' common type); predictions are of
        ``prediction_dtype`` (default: what the model returns; a Parquet writer's schema must
        match). With exception
        handling, failing rows reach the dead letters as rows (dicts); with
        ``isolate_failures=True`` the batch is halved to find them and the rest are scored.

        Schema'd rows (Beam ``Row``s, NamedTuples: ``ReadFromParquet(as_rows=True)``,
        ``beam.Select``) are scored as Arrow tables too: Beam hands them over in its batches
        where the producer is batched, the columns are checked against the schema when the
        pipeline is built, and rows come out (the kept fields, then the prediction, float64
        unless ``prediction_dtype``), in Arrow batches for a batched step after (Beam's
        ``WriteToParquet`` without a schema). See ``docs/tables.md``.

        The handler must score a matrix (``predict_matrix``): beam-turbo's
        ``SklearnModelHandlerNumpy``, ``SklearnModelHandlerPandas``,
        ``PytorchModelHandlerTensor`` and ``TFModelHandlerNumpy`` do.

        Example:
            >>> # (p | beam.io.ReadFromParquetBatched("in-*.parquet")
            >>> #    | RunInference(handler).with_tables(keep_columns=["id"])
            >>> #    | beam.io.WriteToParquetBatched("out", schema))
        """
        check_scores_tables(self._model_handler)
        check_unbatched_by_length(self._model_handler)
        if not prediction_column:
            raise InvalidInputError("prediction_column must be a non-empty column name")
        self._tables = TableSpec(
            feature_columns=None if feature_columns is None else tuple(feature_columns),
            prediction_column=prediction_column,
            keep_columns=None if keep_columns is None else tuple(keep_columns),
            feature_dtype=feature_dtype,
            prediction_dtype=prediction_dtype,
        )
        return self

    def with_exception_handling(
        self,
        *,
        exc_class: Any = Exception,
        use_subprocess: bool = False,
        threshold: float = 1,
        timeout: int | None = None,
        isolate_failures: bool = False,
    ) -> RunInference:
        """Beam's dead-letter output (a ``RunInferenceDLQ`` beside the results), plus
        ``isolate_failures``: a failing batch is split until the failing elements are found;
        the others still give results, and each failing one reaches the dead-letter output
        alone, as ``([element], exception_info)``. No element is lost or duplicated.

        ``exc_class``, ``use_subprocess``, ``threshold`` and ``timeout`` keep Beam's meaning.
        A ``timeout`` or ``use_subprocess`` guards each batch with Beam's own wrappers (Beam's
        two steps); otherwise batching and inference stay fused, every element of a failing
        batch is dead-lettered as ``(batch, exception_info)``, and ``threshold`` bounds the
        share of elements in failing batches (Beam's two steps count batches).

        Example:
            >>> # results, dlq = examples | RunInference(handler).with_exception_handling(
            >>> #     isolate_failures=True)
        """
        super().with_exception_handling(
            exc_class=exc_class, use_subprocess=use_subprocess, threshold=threshold, timeout=timeout
        )
        self._isolate_failures = isolate_failures
        return self

    def with_monitoring_transform(self, monitoring_transform: beam.PTransform) -> RunInference:
        """Beam 2.77's: ``monitoring_transform`` also receives the un-postprocessed results
        (on Beam 2.75 and 2.76 too)."""
        self._monitoring_transform = monitoring_transform
        return self

    def _can_fuse(self) -> bool:
        """Whether batching and inference can be one DoFn with Beam's semantics intact.

        Not with a model side input or file watch (the model changes under the batches),
        ``inference_args`` given as a side input,
        exception handling with a ``timeout`` or ``use_subprocess`` (Beam's wrappers time and
        isolate each ``process`` call, and a fused DoFn buffers across calls), the model
        manager, no batching, or batching options outside beam-turbo's (a custom handler's).
        Plain exception handling fuses: the fused DoFn sends every element of a failing batch
        to the dead-letter output itself. ``max_batch_duration_secs`` fuses too, batching
        across bundles in keyed state (``_dofns.keyed_state``). So do models shared across
        processes (``large_model``, ``model_copies``): the fused DoFn gets them as Beam's does
        (``_running.loading.SharedModels``).
        """
        handler = self._model_handler
        wrapped = self._with_exception_handling and (
            self._use_subprocess or self._timeout is not None
        )
        return (
            self._model_metadata_pcoll is None
            # A side input is resolved by the runner per element: Beam's two steps pass it.
            and not isinstance(self._inference_args, beam.pvalue.AsSideInput)
            and not self._watch_model_pattern
            and not wrapped
            and not self._use_model_manager
            and not handler.should_skip_batching()
            and set(handler.batch_elements_kwargs()) <= BATCHING_ARGS | LENGTH_ARGS | STREAMING_ARGS
        )

    def expand(self, pcoll: beam.PCollection) -> Any:
        # Beam's expand, with the inference step fused where Beam's semantics allow.
        handler = self._model_handler
        handler.validate_inference_args(self._inference_args)
        pcoll, bad_preprocessed = self._apply_fns(
            pcoll, handler.get_preprocess_fns(), "BeamML_RunInference_Preprocess"
        )
        if self._tables is not None and not self._can_fuse():
            raise InvalidInputError(
                "with_tables() scores tables in one fused step; it does not take a model side "
                "input, watch_model_pattern, an inference_args side input, the model manager, "
                "timeout= or use_subprocess=True, nor a handler without batching"
            )
        if self._can_fuse():
            results, bad_inference = self._infer_fused(pcoll)
        else:
            results, bad_inference = self._infer_with_beams_dofn(pcoll)
        return self._finish(results, bad_inference, bad_preprocessed)

    def _infer_fused(self, pcoll: beam.PCollection) -> tuple[Any, Any]:
        """Batching and inference in one DoFn: the results, and the dead letters (or None).
        The DoFn is the gatherer's variant for the input (the global window, windows, keyed
        state across bundles) composed with the batch runner (:class:`RunBatches`)."""
        handler = self._model_handler
        batching_args = dict(handler.batch_elements_kwargs())
        if self._tables is not None:
            # Rows: a batch of a model's rows is larger than one of its elements, and the sizer
            # need not climb from one row.
            batching_args.setdefault("max_batch_size", _table_max_batch_rows(self._tables))
            batching_args.setdefault(
                "min_batch_size", min(TABLE_MIN_BATCH_ROWS, batching_args["max_batch_size"])
            )
        sizing = Sizing.from_batching_args(batching_args)
        tables = self._tables
        rows: dict[str, Any] | None = None
        schema = None if tables is None else row_type(pcoll.element_type)
        if tables is not None and schema is not None:
            # Schema'd rows: checked against their schema now; Beam's Arrow batches in and out.
            tables, output_type = rows_spec(schema, tables)
            rows = {"input_type": schema, "output_type": output_type}
        action = RunBatches(
            handler=handler,
            clock=self._clock,
            metrics_namespace=self._metrics_namespace,
            model_tag=self._model_tag,
            inference_args=self._inference_args,
            retries=self._model_load_retries,
            backoff_secs=self._model_load_backoff_secs,
            exc_class=self._exc_class if self._with_exception_handling else None,
            isolate_failures=self._isolate_failures,
            tables=tables,
            # Across bundles a batch is run where a timer or an element closes it.
            in_flight=0 if "max_batch_duration_secs" in batching_args else self._batches_in_flight,
            adaptive=self._adaptive,
        )
        max_buffering_secs = batching_args.get("max_batch_duration_secs")
        length_fn = batching_args.get("length_fn")
        fused: beam.DoFn
        batched = pcoll
        if rows is not None:
            if max_buffering_secs is not None:
                raise InvalidInputError(
                    "with_tables() on schema'd rows batches within Beam's batches and bundles: "
                    "it does not take max_batch_duration_secs"
                )
            fused = TableRowsDoFn(sizing=sizing, action=action, **rows)
        elif max_buffering_secs is not None:
            # Across bundles, in keyed state: keyed as Beam's stateful batching keys.
            fused = stateful_inference_dofn(
                input_coder=typecoders.registry.get_coder(pcoll),
                max_buffering_secs=max_buffering_secs,
                sizing=sizing,
                clock=self._clock,
                action=action,
                rows=self._tables is not None,
            )
            keying, key_type = keying_dofn(handler)
            keyed = beam.ParDo(keying).with_output_types(
                typehints.KV[key_type, pcoll.element_type]  # str or (str, int): deterministic
            )
            batched = pcoll | "BeamML_RunInference_Key" >> keyed
        else:
            # Beam's batch_length_fn: a pool of batches is sorted by length, then cut.
            pooled: dict[str, Any] = {}
            if length_fn is not None:
                cut = by_length(unkeyed_length(length_fn, handler))
                pooled = {"pool": POOL_BATCHES, "cut": cut}
            windowed = not isinstance(pcoll.windowing.windowfn, beam_window.GlobalWindows)
            dofn_class = WindowedGatheringDoFn if windowed else GatheringDoFn
            fused = dofn_class(
                sizing=sizing, action=action, rows=self._tables is not None, **pooled
            )
        pardo = beam.ParDo(fused).with_resource_hints(**handler.get_resource_hints())
        with self._inference_step(pcoll.pipeline):
            if not self._with_exception_handling:
                return batched | "BeamML_RunInference" >> pardo, None
            outputs = batched | "BeamML_RunInference" >> pardo.with_outputs(
                DEAD_LETTER_TAG, main=MAIN_TAG
            )
        bad_inference = outputs[DEAD_LETTER_TAG]
        if self._threshold < 1:
            # Tables: a failing row is a dead letter, so the share is of rows (a schema'd
            # row is one already).
            count = row_count if self._tables is not None and rows is None else None
            check_threshold(pcoll, bad_inference, self._threshold, count)
        return outputs[MAIN_TAG], bad_inference

    def _infer_with_beams_dofn(self, pcoll: beam.PCollection) -> tuple[Any, Any]:
        """Beam's two steps (batching, then Beam's inference DoFn) with beam-turbo's
        ``BatchElements`` and DoFn: the results, and the dead letters (or None)."""
        handler = self._model_handler
        if self._watch_model_pattern:
            self._model_metadata_pcoll = self._get_model_metadata_pcoll(pcoll.pipeline)
        upstream = None
        if handler.should_skip_batching():
            batched = pcoll
        else:
            batching = BatchElements(**handler.batch_elements_kwargs())
            upstream = batching.sizing
            batched = pcoll | batching
        # With exception handling, the model loads inside process(), so that a model that
        # never loads sends the elements to the dead-letter output with its error.
        load_model_at_runtime = (
            self._model_metadata_pcoll is not None
            or self._timeout is not None
            or self._with_exception_handling
        )
        dofn = BeamInferenceDoFn(
            handler,
            self._clock,
            self._metrics_namespace,
            load_model_at_runtime,
            self._model_tag,
            self._use_model_manager,
            self._model_manager_args,
            retries=self._model_load_retries,
            backoff_secs=self._model_load_backoff_secs,
            isolate=self._exc_class if self._isolate_failures else None,
            upstream=upstream,
        )
        side_input = (
            beam.pvalue.AsSingleton(self._model_metadata_pcoll)
            if self._model_metadata_pcoll
            else None
        )
        pardo = beam.ParDo(dofn, self._inference_args, side_input).with_resource_hints(
            **handler.get_resource_hints()
        )
        with self._inference_step(pcoll.pipeline):
            if not self._with_exception_handling:
                return batched | "BeamML_RunInference" >> pardo, None
            results, bad_inference = batched | "BeamML_RunInference" >> (
                pardo.with_exception_handling(
                    exc_class=self._exc_class,
                    use_subprocess=self._use_subprocess,
                    threshold=self._threshold,
                    timeout=self._timeout,
                    on_failure_callback=self._timeout_callback(),
                )
            )
        return results, bad_inference

    def _inference_step(self, pipeline: beam.Pipeline) -> Any:
        """The context the inference step is applied in: Beam 2.78 annotates that step with
        the model identifier (before, ``annotations()`` gave it to the whole transform)."""
        if "model_identifier" in super().annotations():
            return contextlib.nullcontext()
        return pipeline.transform_annotations(model_identifier=self._model_tag)

    def _finish(self, results: Any, bad_inference: Any, bad_preprocessed: Any) -> Any:
        """Beam's tail of expand: the monitoring outlet, post-processing, the DLQ."""
        handler = self._model_handler
        if self._monitoring_transform is not None:
            with results.pipeline.transform_annotations(model_identifier=""):
                _ = results | "BeamML_RunInference_MonitoringOutlet" >> self._monitoring_transform
        results, bad_postprocessed = self._apply_fns(
            results, handler.get_postprocess_fns(), "BeamML_RunInference_Postprocess"
        )
        if self._with_exception_handling:
            return results, base.RunInferenceDLQ(bad_inference, bad_preprocessed, bad_postprocessed)
        return results

    def _timeout_callback(self) -> Callable[[Exception, Any], None] | None:
        """Beam's: on a timeout, mark the current model invalid so that it is reloaded."""
        if self._timeout is None or not self._model_handler.should_garbage_collect_on_timeout():
            return None
        model_tag, timeout = self._model_tag, self._timeout
        share = self._model_handler.share_model_across_processes()

        def on_failure(exception: Exception, element: Any) -> None:
            if type(exception) is not TimeoutError:
                return
            base.load_model_status(model_tag, share).try_mark_current_model_invalid(timeout)
            _LOG.warning("Inference failed with a timeout, marking the current model for GC")

        return on_failure
