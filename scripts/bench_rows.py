"""Schema'd rows through RunInference(...).with_tables(), batched or not (docs/tables.md).

Parquet in (4 files, ``id`` and 16 float32 features), scikit-learn ``LinearRegression``,
Parquet out (``id``, ``prediction``), on the in-process DirectRunner. The variants:

- ``rows-today``: ``ReadFromParquet`` (dicts) -> a ``Map`` to ``(id, float32[16])`` ->
  beam-turbo's ``RunInference(KeyedModelHandler(SklearnModelHandlerNumpy))`` -> a ``Map`` to a
  dict -> ``WriteToParquet(schema)``: the row pipeline;
- ``rows-per-row-out``: ``ReadFromParquet(as_rows=True)`` -> ``with_tables`` -> a ``Map`` to a
  dict -> ``WriteToParquet(schema)``: batched in, rows out;
- ``rows-batched``: ``ReadFromParquet(as_rows=True)`` -> ``with_tables`` ->
  ``WriteToParquet()`` (no schema: Beam writes a schema'd PCollection's Arrow batches);
- ``tables``: ``ReadFromParquetBatched`` -> ``with_tables`` -> ``WriteToParquetBatched``.

Each variant runs in a process of its own, round after round (interleaved, so load on a shared
machine falls on all alike): a warm-up run of the small size, then the small and the large run
timed. Throughput is the slope between them (start-up cancels out); the median over rounds.
Every output is read back and checked by id against ``model.predict``.

    PYTHONPATH=$PWD/python python scripts/bench_rows.py --rows 40000 400000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

FEATURES = [f"f{i}" for i in range(16)]
VARIANTS = ["rows-today", "rows-per-row-out", "rows-batched", "tables"]
FILES = 4


def write_inputs(directory: str, rows: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = os.path.join(directory, f"in-{rows}")
    if not os.path.isdir(folder):
        os.makedirs(folder)
        per = rows // FILES
        for i in range(FILES):
            rng = np.random.default_rng(i)
            columns: dict[str, Any] = {"id": pa.array(np.arange(i * per, (i + 1) * per))}
            for name in FEATURES:
                columns[name] = pa.array(rng.standard_normal(per).astype(np.float32))
            pq.write_table(pa.table(columns), os.path.join(folder, f"part-{i}.parquet"))
    return os.path.join(folder, "*.parquet")


def pipeline(variant: str, source: str, out: str, model_path: str) -> None:
    import apache_beam as beam
    import pyarrow as pa
    from apache_beam.ml.inference.base import KeyedModelHandler

    from beam_turbo import RunInference
    from beam_turbo.sklearn import SklearnModelHandlerNumpy

    schema = pa.schema([("id", pa.int64()), ("prediction", pa.float64())])
    handler = SklearnModelHandlerNumpy(model_uri=model_path)
    scoring = RunInference(handler).with_tables(
        FEATURES, keep_columns=["id"], prediction_dtype="float64"
    )
    with beam.Pipeline() as p:
        if variant == "rows-today":
            _ = (
                p
                | beam.io.ReadFromParquet(source)
                | beam.Map(
                    lambda r: (r["id"], np.array([r[f] for f in FEATURES], dtype=np.float32))
                )
                | RunInference(KeyedModelHandler(handler))
                | beam.Map(lambda kv: {"id": kv[0], "prediction": float(kv[1].inference)})
                | beam.io.WriteToParquet(out, schema)
            )
        elif variant == "rows-per-row-out":
            _ = (
                p
                | beam.io.ReadFromParquet(source, as_rows=True)
                | scoring
                | beam.Map(lambda row: {"id": row.id, "prediction": row.prediction})
                | beam.io.WriteToParquet(out, schema)
            )
        elif variant == "rows-batched":
            _ = (
                p
                | beam.io.ReadFromParquet(source, as_rows=True)
                | scoring
                | beam.io.WriteToParquet(out)
            )
        else:
            _ = (
                p
                | beam.io.ReadFromParquetBatched(source)
                | scoring
                | beam.io.WriteToParquetBatched(out, schema)
            )


def check(out_dir: str, source: str, model: Any) -> None:
    import pyarrow.parquet as pq

    written = pq.read_table(out_dir)
    data = pq.read_table(os.path.dirname(source))
    want = model.predict(np.column_stack([data[f].to_numpy() for f in FEATURES]))
    order = np.argsort(written["id"].to_numpy())
    got = written["prediction"].to_numpy()[order]
    ids = written["id"].to_numpy()[order]
    assert np.array_equal(ids, data["id"].to_numpy()), "rows lost or duplicated"
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def worker(variant: str, directory: str, sizes: list[int]) -> dict[str, float]:
    """One round of one variant: a warm-up, then each size timed; seconds per size."""
    model_path = os.path.join(directory, "model.pkl")
    with open(model_path, "rb") as f:
        model = pickle.load(f)
    times = {}
    for label, rows in [("warm-up", sizes[0]), *[(str(n), n) for n in sizes]]:
        source = write_inputs(directory, rows)
        out_dir = tempfile.mkdtemp(dir=directory)
        start = time.perf_counter()
        pipeline(variant, source, os.path.join(out_dir, "scored"), model_path)
        times[label] = time.perf_counter() - start
        check(out_dir, source, model)
        shutil.rmtree(out_dir)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs=2, default=[40_000, 400_000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="*", default=VARIANTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.dir, args.rows)))
        return
    from sklearn.linear_model import LinearRegression

    directory = tempfile.mkdtemp(prefix="bench-rows-")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, len(FEATURES))).astype(np.float32)
    model = LinearRegression().fit(x, x @ np.arange(len(FEATURES)) + 1.0)
    with open(os.path.join(directory, "model.pkl"), "wb") as f:
        pickle.dump(model, f)
    for rows in args.rows:
        write_inputs(directory, rows)
    small, large = args.rows
    slopes: dict[str, list[float]] = {v: [] for v in args.variants}
    whole: dict[str, list[float]] = {v: [] for v in args.variants}
    for _ in range(args.rounds):
        for variant in args.variants:
            command = [sys.executable, __file__, "--worker", variant, "--dir", directory]
            command += ["--rows", str(small), str(large)]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode:
                sys.exit(f"{variant} failed:\n{result.stderr[-3000:]}")
            times = json.loads(result.stdout.strip().splitlines()[-1])
            slopes[variant].append((large - small) / (times[str(large)] - times[str(small)]))
            whole[variant].append(large / times[str(large)])
    print(f"| variant | rows/s, slope {small:,} -> {large:,} | rows/s, {large:,} run |")
    print("| --- | ---: | ---: |")
    for variant in args.variants:
        slope, run = statistics.median(slopes[variant]), statistics.median(whole[variant])
        print(f"| {variant} | {slope:,.0f} | {run:,.0f} |")
    shutil.rmtree(directory)


if __name__ == "__main__":
    main()
