"""``patch()`` imports no framework the pipeline does not import, and covers the handler modules
imported after it. Each case runs in a fresh interpreter: imports are process state."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

FRAMEWORKS = ("tensorflow", "torch", "sklearn", "tf_keras", "keras")


def _run(script: str) -> dict[str, object]:
    """Run ``script`` in a fresh interpreter; it prints one JSON object as its last line."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


_LOADED = f"[m for m in {FRAMEWORKS!r} if m in sys.modules]"


@pytest.mark.parametrize(
    "pipeline_import",
    [
        "from apache_beam.ml.inference.sklearn_inference import SklearnModelHandlerNumpy as H",
        "from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerTensor as H",
    ],
)
def test_patch_imports_no_framework_that_stock_beam_does_not(pipeline_import: str) -> None:
    stock = _run(
        f"""
        import json, sys
        from apache_beam.ml.inference.base import RunInference
        {pipeline_import}
        print(json.dumps({{"loaded": {_LOADED}}}))
        """
    )
    patched = _run(
        f"""
        import json, sys
        import beam_turbo
        beam_turbo.patch()
        after_patch = {_LOADED}
        from apache_beam.ml.inference.base import RunInference
        {pipeline_import}
        print(json.dumps({{
            "after_patch": after_patch,
            "loaded": {_LOADED},
            "ours": H.__module__,
            "run_inference": RunInference is beam_turbo.RunInference,
        }}))
        """
    )
    assert patched["after_patch"] == []  # patch() itself imports no framework
    # The pipeline's own framework is there; torch only where the pipeline imports it (stock
    # Beam's inference module imports it for its model manager: _beam/lazy_torch.py).
    own = "sklearn" if "sklearn" in pipeline_import else "torch"
    assert patched["loaded"] == [own], (patched["loaded"], stock["loaded"])
    assert own in stock["loaded"]  # type: ignore[operator]
    assert "tensorflow" not in patched["loaded"]
    assert patched["ours"].startswith("beam_turbo.")  # type: ignore[attr-defined]
    assert patched["run_inference"] is True


def test_patch_covers_tensorflow_handlers_imported_after_it() -> None:
    """A TensorFlow pipeline that imports Beam's handler module after ``patch()`` (which
    itself loads no framework) gets beam-turbo's two handlers, and the patched handler gives
    the model's results in a pipeline. The imports are a TensorFlow pipeline's: Beam's
    inference base imports torch before the handler module imports TensorFlow, an order that
    does not abort. (One interpreter, not a stock one beside it: TensorFlow's import is most
    of this test's time.)"""
    imports = textwrap.dedent(
        f"""
        import json, sys
        import beam_turbo
        beam_turbo.patch()
        after_patch = {_LOADED}
        from apache_beam.ml.inference.base import RunInference
        from apache_beam.ml.inference.tensorflow_inference import (
            TFModelHandlerNumpy as N,
            TFModelHandlerTensor as T,
        )
        """
    )
    pipeline = textwrap.dedent(
        f"""
        import apache_beam as beam
        import numpy as np
        import tensorflow as tf
        from apache_beam.testing.util import assert_that, equal_to

        class Doubling(N):
            def load_model(self):
                return lambda x: tf.convert_to_tensor(x) * 2

        with beam.Pipeline() as pipeline:
            out = (
                pipeline
                | beam.Create([np.array([1.0, 2.0]), np.array([3.0, 4.0])])
                | RunInference(Doubling("unused"))
                | beam.Map(lambda r: r.inference.numpy().tolist())
            )
            assert_that(out, equal_to([[2.0, 4.0], [6.0, 8.0]]))
        print(json.dumps({{
            "after_patch": after_patch,
            "loaded": {_LOADED},
            "ours": [N.__module__, T.__module__],
            "run_inference": RunInference is beam_turbo.RunInference,
        }}))
        """
    )
    patched = _run(imports + pipeline)
    assert patched["after_patch"] == []
    assert "tensorflow" in patched["loaded"]  # type: ignore[operator]
    assert patched["ours"] == ["beam_turbo.tensorflow"] * 2
    assert patched["run_inference"] is True


def test_handlers_imported_after_patch_are_beam_turbos_until_unpatch() -> None:
    result = _run(
        """
        import json, sys
        import beam_turbo
        beam_turbo.patch()
        from apache_beam.ml.inference import sklearn_inference
        patched = sklearn_inference.SklearnModelHandlerPandas.__module__
        beam_turbo.unpatch()
        restored = sklearn_inference.SklearnModelHandlerPandas.__module__
        import apache_beam.ml.inference.tensorflow_inference as tf_inference
        print(json.dumps({
            "patched": patched,
            "restored": restored,
            "after_unpatch": tf_inference.TFModelHandlerNumpy.__module__,
            "is_patched": beam_turbo._beam.patch.is_patched(),
        }))
        """
    )
    assert result == {
        "patched": "beam_turbo.sklearn",
        "restored": "apache_beam.ml.inference.sklearn_inference",
        "after_unpatch": "apache_beam.ml.inference.tensorflow_inference",
        "is_patched": False,
    }


def test_patch_before_beam_imports_no_framework_and_covers_runinference() -> None:
    """``patch()`` first, as a pipeline that cannot be edited calls it: Beam's inference base
    (which imports torch where installed) is patched when the pipeline imports it, and the
    package's re-export of ``RunInference`` goes back to Beam's on ``unpatch()``."""
    result = _run(
        f"""
        import json, sys
        import sklearn, beam_turbo
        beam_turbo.patch()
        after_patch = {_LOADED}
        import apache_beam.ml.inference as package
        from apache_beam.ml.inference import base
        patched = [base.RunInference is beam_turbo.RunInference,
                   package.RunInference is beam_turbo.RunInference]
        beam_turbo.unpatch()
        print(json.dumps({{
            "after_patch": after_patch,
            "patched": patched,
            "restored": [base.RunInference.__module__, package.RunInference.__module__],
        }}))
        """
    )
    assert result == {
        "after_patch": ["sklearn"],
        "patched": [True, True],
        "restored": ["apache_beam.ml.inference.base"] * 2,
    }


def test_huggingface_handlers_import_no_tensorflow_and_patch_covers_beams() -> None:
    """``beam_turbo.huggingface`` imports neither TensorFlow nor transformers (Beam's module
    imports both); after ``patch()``, Beam's module gives beam-turbo's three handlers, and
    importing it does not abort the process (triton comes before Beam's TensorFlow import)."""
    result = _run(
        f"""
        import json, sys
        import beam_turbo.huggingface
        ours_loaded = {_LOADED} + [m for m in ("transformers",) if m in sys.modules]
        beam_turbo.patch()
        from apache_beam.ml.inference.huggingface_inference import (
            HuggingFaceModelHandlerKeyedTensor as K,
            HuggingFaceModelHandlerTensor as T,
            HuggingFacePipelineModelHandler as P,
        )
        import apache_beam as beam
        print(json.dumps({{
            "ours_loaded": ours_loaded,
            "patched": [K.__module__, T.__module__, P.__module__],
            "sort_and_batch": beam.SortAndBatchElements.__module__,
        }}))
        """
    )
    assert result == {
        "ours_loaded": ["torch"],  # Beam's inference base imports torch where installed
        "patched": ["beam_turbo.huggingface"] * 3,
        "sort_and_batch": "beam_turbo.batching",
    }
