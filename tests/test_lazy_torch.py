"""beam-turbo's handlers import Beam's inference module without torch (``_beam/lazy_torch.py``):
a scikit-learn pipeline's process does not hold torch (some 500 MiB) it never uses, and Beam's
model manager, which needs torch, still imports it when a pipeline asks for it.

Each check runs in a fresh interpreter: this test process has imported torch and Beam already.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PYTHON_ROOT = str(Path(__file__).resolve().parents[1] / "python")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason="torch is not installed: nothing to defer"
)


def run_fresh(code: str) -> str:
    """``code`` run by a fresh interpreter that finds this checkout's beam_turbo; its stdout."""
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([PYTHON_ROOT, *sys.path]))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_sklearn_table_pipeline_never_imports_torch() -> None:
    out = run_fresh(
        """
        import sys
        import apache_beam as beam
        import numpy as np
        import pyarrow as pa
        from sklearn.linear_model import LinearRegression
        import beam_turbo
        from beam_turbo.sklearn import SklearnModelHandlerNumpy
        from apache_beam.ml.inference import base
        from apache_beam.testing.util import assert_that, equal_to

        model = LinearRegression().fit(np.eye(2, dtype=np.float32), [1.0, 2.0])
        handler = SklearnModelHandlerNumpy(model_uri="unused")
        handler.load_model = lambda: model
        table = pa.table({"id": [7, 8], "a": [1.0, 0.0], "b": [0.0, 1.0]})
        with beam.Pipeline() as p:
            out = (
                p
                | beam.Create([table])
                | beam_turbo.RunInference(handler).with_tables(
                    feature_columns=["a", "b"], keep_columns=["id"]
                )
                | beam.FlatMap(lambda t: t.to_pylist())
                | beam.Map(lambda r: (r["id"], round(r["prediction"], 6)))
            )
            assert_that(out, equal_to([(7, 1.0), (8, 2.0)]))
        print("torch" in sys.modules, base.resource is not None)
        """
    )
    assert out.split() == ["False", "True"], out


def test_beams_model_manager_still_imports_when_asked_for() -> None:
    out = run_fresh(
        """
        import sys
        import beam_turbo.sklearn
        from apache_beam.ml.inference import base
        print("torch" in sys.modules, base.ModelManager is None)
        from apache_beam.ml.inference.model_manager import ModelManager
        print("torch" in sys.modules, ModelManager.__name__)
        """
    )
    assert out.split() == ["False", "True", "True", "ModelManager"], out


def test_torch_imported_first_keeps_beams_import() -> None:
    out = run_fresh(
        """
        import torch
        import beam_turbo.sklearn
        from apache_beam.ml.inference import base
        print(base.ModelManager is not None)
        """
    )
    assert out.split() == ["True"], out
