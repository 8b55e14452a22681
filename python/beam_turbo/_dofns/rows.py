"""RunInference over Beam's schema'd rows, batched: ``RunInference(...).with_tables()`` on a
PCollection whose elements are Beam ``Row``s (``ReadFromParquet(as_rows=True)``, ``beam.Select``,
``beam.Row`` from a ``Map``, SQL).

:class:`TableRowsDoFn` declares ``process_batch`` over Arrow tables (Beam's Arrow batch
converter), so Beam hands it the producer's batches wherever the producer is batched, and its
outputs are Arrow tables too, so a batched step after it gets them as they are; a per-row step
after it gets rows, which Beam makes from the tables. Its ``process`` takes rows one by one
(from a per-row producer): they are gathered, made into a table by the same converter, and
scored as one.

It composes the pieces of the table path: the :class:`~beam_turbo._gathering.gatherer.Gatherer`
(``rows=True`` cuts Beam's batches to the sizer's target; the plain one gathers rows) and
:class:`~beam_turbo._dofns.gathering.RunBatches` with a ``TableSpec`` (the batch runner: dead
letters, isolation, out-of-memory splitting, sizer feedback, metrics).

What Beam 2.77's batched DoFns impose:

- a batch never crosses a ``process_batch`` call: what ``finish_bundle`` emits Beam takes as
  elements, not batches, so a partial batch held to the end of the bundle would come out row
  by row. Beam's batches are cut to the target, and not joined;
- every output of a DoFn that yields batches is taken as a batch, the dead-letter output too:
  dead letters (the failing rows, as rows of the input's type, with their error) are held and
  emitted at the end of the bundle, as elements;
- the rows ``process`` gathered and not yet scored at the end of the bundle come out as rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.typehints.batch import BatchConverter
from apache_beam.typehints.row_type import RowTypeConstraint
from apache_beam.utils.windowed_value import PANE_INFO_UNKNOWN, HomogeneousWindowedBatch

from beam_turbo._arrays.tables import TableRows, TableSpec, check_columns
from beam_turbo._beam import internals
from beam_turbo._dofns.gathering import RunBatches
from beam_turbo._gathering.gatherer import Gatherer, SizedBatch
from beam_turbo._gathering.sizing import Sizing
from beam_turbo._running.collector import cyclic_gc_paused
from beam_turbo.errors import InvalidInputError, InvalidTypeError

__all__ = ["TableRowsDoFn", "row_type", "rows_spec"]

_GLOBAL = beam.transforms.window.GlobalWindow()


def row_type(element_type: Any) -> RowTypeConstraint | None:
    """The Beam schema of a PCollection's elements (a ``Row`` type or a NamedTuple), or None."""
    if isinstance(element_type, RowTypeConstraint):
        return element_type
    if isinstance(element_type, type):
        try:
            return RowTypeConstraint.from_user_type(element_type)
        except Exception:  # a type Beam cannot make a schema of: not schema'd
            return None
    return None


def _arrow_schema(rows: RowTypeConstraint) -> Any:
    from apache_beam.typehints.arrow_type_compatibility import arrow_schema_from_beam_schema
    from apache_beam.typehints.schemas import typing_to_runner_api

    return arrow_schema_from_beam_schema(typing_to_runner_api(rows).row_type.schema)


def rows_spec(rows: RowTypeConstraint, spec: TableSpec) -> tuple[TableSpec, RowTypeConstraint]:
    """``spec`` for rows of the schema ``rows``, checked against it now, at construction (the
    table path's one rule, :func:`~beam_turbo._arrays.tables.check_columns`, on a table of no
    rows with the schema's columns), and the output's row type: the kept fields, then the
    prediction, of ``spec.prediction_dtype`` (default float64: a schema is declared before the
    model has run)."""
    from apache_beam.typehints.schemas import named_fields_from_element_type

    fields = named_fields_from_element_type(rows)
    shown = ", ".join(f"{name}: {getattr(kind, '__name__', kind)}" for name, kind in fields)
    try:
        schema = _arrow_schema(rows)
    except (NotImplementedError, TypeError, ValueError) as error:
        raise InvalidTypeError(
            f"with_tables() scores schema'd rows as Arrow tables, and Beam has no Arrow type for "
            f"a field of these rows ({shown}): {error}. Select or cast the fields first"
        ) from None
    try:
        check_columns(schema.empty_table(), spec)
    except (KeyError, TypeError, ValueError) as error:
        raise type(error)(
            f"{error} (checked when the pipeline is built, on the rows' schema: {shown})"
        ) from None
    dtype = np.dtype(spec.prediction_dtype or "float64")
    if dtype.kind not in "bif":  # Beam's schemas have no unsigned integers
        raise InvalidTypeError(
            f"prediction_dtype={spec.prediction_dtype!r}: a schema'd row's prediction field is a "
            "bool, a signed integer or a float (one prediction per row)"
        )
    prediction_type: Any = bool if dtype.kind == "b" else dtype.type
    kept = fields if spec.keep_columns is None else [f for f in fields if f[0] in spec.keep_columns]
    if spec.keep_columns is not None:
        order = {name: i for i, name in enumerate(spec.keep_columns)}
        kept.sort(key=lambda field: order[field[0]])
    output = RowTypeConstraint.from_fields([*kept, (spec.prediction_column, prediction_type)])
    return dataclasses.replace(spec, prediction_dtype=dtype.name), output


class TableRowsDoFn(beam.DoFn):
    """Schema'd rows scored as Arrow tables: see the module docs.

    Args:
        sizing: the transform's sizing (rows).
        action: ``RunBatches`` with the rows' ``TableSpec``.
        input_type, output_type: the rows' schemas in and out (:func:`rows_spec`).
    """

    def __init__(
        self,
        *,
        sizing: Sizing,
        action: RunBatches,
        input_type: RowTypeConstraint,
        output_type: RowTypeConstraint,
    ) -> None:
        self._sizing = sizing
        self._action = action
        self._input_type = input_type
        self._output_type = output_type

    # Beam's batched DoFn: Arrow tables in and out, rows of these types.
    def get_input_batch_type(self, input_element_type: Any) -> Any:
        import pyarrow as pa

        return pa.Table

    def get_output_batch_type(self, input_element_type: Any) -> Any:
        import pyarrow as pa

        return pa.Table

    def infer_output_type(self, input_type: Any) -> Any:
        return self._output_type

    def setup(self) -> None:
        import pyarrow as pa

        self._sizing = self._sizing.shared()
        self._action.setup(self._sizing)
        self._to_table = BatchConverter.from_typehints(
            element_type=self._input_type, batch_type=pa.Table
        )
        self._to_rows = BatchConverter.from_typehints(
            element_type=self._output_type, batch_type=pa.Table
        )
        self._schema = _arrow_schema(self._output_type)
        user_type = self._input_type.user_type
        self._row = beam.Row if user_type is None else user_type

    def start_bundle(self) -> None:
        self._action.release()
        self._gatherer = Gatherer(self._sizing)  # rows from process(), per window
        self._dead: list[Any] = []  # dead letters, emitted (as elements) at the bundle's end

    def process_batch(
        self,
        batch: Any,
        window: Any = beam.DoFn.WindowParam,
        timestamp: Any = beam.DoFn.TimestampParam,
    ) -> Iterator[Any]:
        # Cut to the target; what is left runs now (see the module docs). The outputs are
        # tables, which Beam places in the input batch's window, at its timestamp.
        cut = Gatherer(self._sizing, rows=True)
        for _, part in cut.add(batch, window):
            yield from self._scored(part, timestamp, window)
        for _, part in cut.drain():
            yield from self._scored(part, timestamp, window)

    @beam.DoFn.yields_batches
    def process(
        self,
        row: Any,
        window: Any = beam.DoFn.WindowParam,
        timestamp: Any = beam.DoFn.TimestampParam,
    ) -> Iterator[Any]:
        for full_window, batch in self._gatherer.add(row, window):
            # Placed as the row path places them: in the global window at the timestamp of the
            # row that filled the batch; in others at the end of the window.
            at = timestamp if full_window is _GLOBAL else full_window.max_timestamp()
            for table in self._scored(self._as_table(batch), at, full_window):
                yield HomogeneousWindowedBatch.of(table, at, (full_window,), PANE_INFO_UNKNOWN)

    def finish_bundle(self) -> Iterator[Any]:
        for window, batch in self._gatherer.drain():
            if window is _GLOBAL:
                placed = internals.at_end_of_global_window(None)
                at, windows = placed.timestamp, placed.windows
            else:
                at, windows = window.max_timestamp(), (window,)
            for table in self._scored(self._as_table(batch), at, window):
                for row in self._to_rows.explode_batch(table):
                    yield internals.WindowedValue(row, at, windows)
        dead, self._dead = self._dead, []
        yield from dead
        self._action.bundle_done()

    def teardown(self) -> None:
        self._action.close()

    def _as_table(self, batch: SizedBatch) -> SizedBatch:
        """A batch of rows as a batch of one table's rows, by Beam's converter."""
        table = self._to_table.produce_batch(batch.elements)
        return SizedBatch(batch.target, TableRows([table]), batch.weight)  # type: ignore[arg-type]

    def _scored(self, batch: SizedBatch, timestamp: Any, window: Any) -> Iterator[Any]:
        """The batch's tables; its dead letters are held for the end of the bundle, their
        rows of the input's type."""
        with cyclic_gc_paused():
            outputs = self._action.outputs(batch)
        for output in outputs:
            if isinstance(output, beam.pvalue.TaggedOutput):
                rows, error = output.value
                entry = ([self._row(**row) for row in rows], error)
                value = internals.WindowedValue(entry, timestamp, (window,))
                self._dead.append(beam.pvalue.TaggedOutput(output.tag, value))
                continue
            yield self._conformed(output)

    def _conformed(self, table: Any) -> Any:
        """``table`` with the output schema's fields (their nullability, as a writer of the
        schema checks), not copied; an error naming a column whose type differs from it."""
        import pyarrow as pa

        schema = self._schema
        if table.schema.equals(schema):
            return table
        names = table.schema.names
        if names != schema.names:
            raise InvalidInputError(
                f"the scored rows' columns {names} are not the output schema's {schema.names}"
            )
        for field, column in zip(schema, table.columns, strict=True):
            if column.type != field.type:
                raise InvalidInputError(
                    f"column {field.name!r} came out as {column.type}, but the output rows' "
                    f"field is {field.type}: the input's Arrow batches must have the types of "
                    "its schema, and a model scoring schema'd rows must give one prediction "
                    "per row (a model with several outputs per row: score tables, not rows)"
                )
        return pa.Table.from_arrays(table.columns, schema=schema)
