"""An installed beam-turbo, checked from outside the checkout (scripts/wheels.sh runs it).

``sdist``: the package imports from the environment it was installed into (not the checkout)
and ``beam_turbo.RunInference`` runs a scikit-learn model on the DirectRunner, its results those
of the model's own ``predict``. ``stack``: only numpy and the native module (an emulated Python
with nothing else installed).

Usage: ``python scripts/wheel_smoke.py sdist|stack``; exits non-zero on any difference.
"""

from __future__ import annotations

import sys
import sysconfig
from typing import Any

import numpy as np


def check_installed() -> None:
    import beam_turbo

    site = sysconfig.get_paths()["purelib"]
    if not beam_turbo.__file__ or not beam_turbo.__file__.startswith(site):
        raise SystemExit(f"beam_turbo imported from {beam_turbo.__file__}, not from {site}")
    print(f"beam-turbo {beam_turbo.__version__} from {beam_turbo.__file__}")


def check_stack() -> None:
    import beam_turbo

    rows = [np.arange(5, dtype=np.float32) * i for i in range(7)]
    batch = beam_turbo.stack(rows)
    if batch.dtype != np.float32 or not np.array_equal(batch, np.stack(rows)):
        raise SystemExit(f"stack gave {batch!r}, not numpy.stack's result")
    sizer = beam_turbo.BatchSizer(min_batch_size=1, max_batch_size=64)
    if not 1 <= sizer.next_size() <= 64:
        raise SystemExit(f"BatchSizer.next_size() out of [1, 64]: {sizer.next_size()}")
    print(f"stack: {batch.shape} {batch.dtype}, as numpy.stack")


def check_pipeline() -> None:
    import pickle
    import tempfile
    from pathlib import Path

    import apache_beam as beam
    from apache_beam.ml.inference.sklearn_inference import SklearnModelHandlerNumpy
    from apache_beam.testing.util import assert_that
    from sklearn.linear_model import LinearRegression

    import beam_turbo

    rng = np.random.default_rng(0)
    x = rng.random((300, 3))
    model = LinearRegression().fit(x, x @ np.array([2.0, -1.0, 0.5]) + 3.0)
    expected = {tuple(row): float(y) for row, y in zip(x, model.predict(x), strict=True)}

    def matches(results: list[Any]) -> None:
        found = {tuple(r.example): float(r.inference) for r in results}
        if found.keys() != expected.keys():
            raise AssertionError(f"{len(found)} results for {len(expected)} elements")
        worst = max(abs(found[k] - expected[k]) for k in expected)
        if worst > 1e-9:
            raise AssertionError(f"results differ from model.predict by up to {worst:g}")

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.pkl"
        path.write_bytes(pickle.dumps(model))
        with beam.Pipeline() as pipeline:
            results = (
                pipeline
                | beam.Create(list(x))
                | beam_turbo.RunInference(SklearnModelHandlerNumpy(model_uri=str(path)))
            )
            assert_that(results, matches)
    print(f"pipeline: beam_turbo.RunInference gave model.predict's {len(expected)} results")


def main(argv: list[str]) -> int:
    (what,) = argv
    if what == "sdist":
        check_installed()
        check_stack()
        check_pipeline()
    elif what == "stack":
        check_stack()
    else:
        raise SystemExit("usage: wheel_smoke.py sdist|stack")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
