"""beam_turbo.RunInference with a watched model folder (``watch_model_pattern``) and Beam's
model manager (``use_model_manager``), which take Beam's two-step path, and models shared
across processes (``large_model`` / ``model_copies``) and keyed handlers with many models
(whose model manager Beam shares across processes), which fuse (tests/test_large_models.py).
Each runs a real pipeline and is checked against stock Beam's ``RunInference``.

What a DirectRunner can show of ``watch_model_pattern`` (Beam 2.77): Beam's own tests only
check that the watch becomes the side input (``test_run_inference_watch_file_pattern_*_label``);
its end-to-end test of a model replaced while the pipeline runs
(``test_run_inference_with_side_inputin_streaming``) is marked ``sickbay_direct``. Here:

* with a ``TestStream`` (the streaming BundleBasedDirectRunner) the pipeline does not start,
  for stock Beam as for beam-turbo: "RuntimeError: Transform node AppliedPTransform(
  RunInference/WatchFilePattern/MatchContinuously/Watch/ParDo(_WatchGrowthDoFn)/
  ProcessKeyedElements/GroupByKey/GroupByKey, _GroupByKeyOnly) was not replaced as expected";
* the Prism runner, which streams, is never chosen for it (``WatchFilePattern`` keeps state in a
  ``CombiningValueStateSpec``), and its binary is not installed here;
* the FnApiRunner (batch) computes the side input in full before any element is predicted, and
  a watch that reports more than one file (or the same file twice) makes ``AsSingleton`` fail.

So the tests below watch in batch mode with one poll (an ``interval`` longer than the session):
the file found in the folder replaces the handler's own model, and a file arriving before a
later run replaces the model that the process has cached under the same model identifier.
"""

from __future__ import annotations

import multiprocessing
import pickle
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference import base
from apache_beam.ml.inference.sklearn_inference import SklearnModelHandlerNumpy as BeamSklearn
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.utils import multi_process_shared
from apache_beam.utils.timestamp import Duration, Timestamp
from sklearn.linear_model import LinearRegression

from beam_turbo import RunInference
from beam_turbo.sklearn import SklearnModelHandlerNumpy
from tests.side_inputs import in_fixed_windows

#: Stock Beam's transform and beam-turbo's, run side by side.
BOTH = [pytest.param(base.RunInference, id="stock"), pytest.param(RunInference, id="turbo")]


#: What ``run`` collects, by run. A module's global: Beam pickles this module's functions by
#: reference, so the FnApiRunner, running in this process, appends to this very dict.
_COLLECTED: dict[str, list[Any]] = {}


def _collect(value: Any, run_id: str) -> None:
    _COLLECTED[run_id].append(value)


def run(elements: Sequence[Any], transform: beam.PTransform, label: Any) -> list[Any]:
    """The outputs of ``transform`` on ``elements``, each mapped by ``label``."""
    run_id = uuid.uuid4().hex
    _COLLECTED[run_id] = []
    with beam.Pipeline(runner="FnApiRunner") as pipeline:
        out = pipeline | beam.Create(elements) | transform | beam.Map(label)
        _ = out | beam.Map(_collect, run_id)
    return _COLLECTED.pop(run_id)


# -- watch_model_pattern --------------------------------------------------------------------


def save_linear(path: Path, weight: float) -> LinearRegression:
    """A model predicting ``weight * (x0 + x1)``, pickled at ``path``."""
    x = np.random.default_rng(0).random((20, 2))
    model = LinearRegression().fit(x, x @ [weight, weight])
    path.write_bytes(pickle.dumps(model))
    return model


POINTS = [np.array([1.0, 2.0]), np.array([3.0, 4.0]), np.array([0.5, 0.25])]


#: Longer than any test session: the watch polls exactly once. (Beam's MatchContinuously
#: starts its poll window at ``Timestamp.now()`` evaluated when ``apache_beam.io.fileio`` was
#: imported, so the window [that import, stop) holds ceil(span / interval) polls; with 60 s,
#: a session past its first minute polled twice and AsSingleton saw the file twice.)
ONE_POLL_INTERVAL = 10**7


def watching(pattern: Path, **kwargs: Any) -> dict[str, Any]:
    """RunInference's arguments to watch ``pattern`` with exactly one poll."""
    return {
        "watch_model_pattern": str(pattern),
        "interval": ONE_POLL_INTERVAL,
        "stop_timestamp": Timestamp.now() + Duration(seconds=1),
        **kwargs,
    }


def scored(result: base.PredictionResult) -> tuple[tuple[float, ...], float, str]:
    return (tuple(result.example), round(float(result.inference), 6), str(result.model_id))


def predicted(result: base.PredictionResult) -> tuple[tuple[float, ...], float]:
    return scored(result)[:2]


def expected(model: LinearRegression, path: Path) -> list[tuple[tuple[float, ...], float, str]]:
    return [
        (tuple(x), round(float(y), 6), str(path))
        for x, y in zip(POINTS, model.predict(np.stack(POINTS)), strict=True)
    ]


def test_the_watch_is_the_side_input_of_inference() -> None:
    """Beam's test_run_inference_watch_file_pattern_keyword_arg_side_input_label."""
    pipeline = beam.Pipeline()
    results = (
        pipeline
        | beam.Create([1, 2, 3])
        | RunInference(AddingHandler(), watch_model_pattern="fake/path/*")
    )
    assert "WatchFilePattern/ApplyGlobalWindow" in str(results.producer.side_inputs[0])


@pytest.mark.parametrize("transform", BOTH)
@pytest.mark.parametrize(
    "handler_class", [SklearnModelHandlerNumpy, BeamSklearn], ids=["turbo handler", "beam handler"]
)
def test_a_model_file_in_the_watched_folder_replaces_the_handlers_model(
    tmp_path: Path, transform: type[base.RunInference], handler_class: type[Any]
) -> None:
    own = tmp_path / "own.pkl"
    save_linear(own, 1.0)
    folder = tmp_path / "watched"
    folder.mkdir()
    new = folder / "new.pkl"
    new_model = save_linear(new, 10.0)

    results = run(POINTS, transform(handler_class(str(own)), **watching(folder / "*.pkl")), scored)

    assert sorted(results) == sorted(expected(new_model, new))
    # (The handler's own model predicts a tenth of that.)
    assert all(abs(y) > 1 for _, y, _ in results)


def test_a_new_model_file_replaces_the_cached_model_in_a_later_run(tmp_path: Path) -> None:
    """The process keeps its model between runs (beam-turbo's ModelCache, keyed by the model
    identifier); a file that arrives before the next run is loaded instead of that model."""
    own = tmp_path / "own.pkl"
    save_linear(own, 1.0)
    identifier = f"watched-{uuid.uuid4().hex}"
    folder = tmp_path / "watched"
    folder.mkdir()
    first = folder / "v1.pkl"
    first_model = save_linear(first, 10.0)

    def one_run(pattern: str) -> list[Any]:
        handler = SklearnModelHandlerNumpy(str(own))
        transform = RunInference(handler, **watching(folder / pattern, model_identifier=identifier))
        return sorted(run(POINTS, transform, scored))

    assert one_run("v1*.pkl") == sorted(expected(first_model, first))
    second = folder / "v2.pkl"
    second_model = save_linear(second, -3.0)
    assert one_run("v2*.pkl") == sorted(expected(second_model, second))


# -- handlers whose results say which model gave them ----------------------------------------


class AddingModel:
    """Adds ``offset``; ``ident()`` names this loaded copy (a method, so that it also answers
    through a multi_process_shared proxy)."""

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.copy = uuid.uuid4().hex

    def predict(self, x: int) -> int:
        return x + self.offset

    def ident(self) -> str:
        return self.copy


class AddingHandler(base.ModelHandler[int, base.PredictionResult, AddingModel]):
    """Results are ``PredictionResult(x, x + offset, "<copy>|<shared>")``: which loaded copy
    gave them, and whether it came through Beam's ``multi_process_shared`` proxy. Loads fail
    ``fail_loads`` times first (per copy of the handler: each process unpickles its own)."""

    def __init__(self, offset: int = 1, fail_loads: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.offset = offset
        self.fail_loads = fail_loads

    def load_model(self) -> AddingModel:
        if self.fail_loads > 0:
            self.fail_loads -= 1
            raise ConnectionError("model store unavailable")
        return AddingModel(self.offset)

    def run_inference(
        self, batch: Sequence[int], model: AddingModel, inference_args: Any = None
    ) -> Iterable[base.PredictionResult]:
        shared = "multi_process_shared" in str(type(model))
        source = f"{model.ident()}|{shared}"
        return [base.PredictionResult(x, model.predict(x), source) for x in batch]


def answer(result: base.PredictionResult) -> tuple[int, int, bool]:
    """The example, the inference, and whether the model was shared across processes."""
    return (result.example, result.inference, result.model_id.endswith("|True"))


def copy_of(result: base.PredictionResult) -> str:
    return str(result.model_id).split("|")[0]


NUMBERS = list(range(20))


# -- use_model_manager ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def private_model_manager_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Beam's ModelManager serves every pipeline on a machine from one fixed address file in the
    temp directory (tag ``model_manager``), so another Beam pipeline running beside the tests
    would answer this session's requests (and fail to unpickle its handlers). The tests get a
    folder of their own, one for the session: within a process Beam registers the tag once."""
    # MultiProcessShared's default folder is bound when Beam is imported: replace the default.
    defaults = multi_process_shared.MultiProcessShared.__init__.__kwdefaults__
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(defaults, "path", str(tmp_path_factory.mktemp("model_manager")))
        yield


@pytest.fixture
def reaped_children(private_model_manager_folder: None) -> Iterator[None]:
    """As Beam's ModelManagerTest.tearDown: end the model processes this test spawned."""
    before = set(multiprocessing.active_children())
    yield
    for child in set(multiprocessing.active_children()) - before:
        child.terminate()
        child.join()


MODEL_MANAGER_ARGS = {  # Beam's test_run_inference_impl_with_model_manager_args
    "slack_percentage": 0.2,
    "poll_interval": 1.0,
    "peak_window_seconds": 10.0,
    "min_data_points": 10,
    "smoothing_factor": 0.5,
}


@pytest.mark.usefixtures("reaped_children")
def test_model_manager_with_beams_arguments_and_a_failing_first_load() -> None:
    """The model lives in a process that Beam's ModelManager spawns (no GPU here: it assumes
    16 GB and says so), which unpickles the handler's ``load_model``: beam-turbo's load
    retries must pickle, and must run there. (Before they were a picklable object, this
    failed with "Can't pickle local object 'retrying.<locals>.load_with_retries'".)
    The results are stock Beam's, as in Beam's test_run_inference_impl_with_model_manager."""
    transform = RunInference(
        AddingHandler(fail_loads=1, min_batch_size=5, max_batch_size=5),
        use_model_manager=True,
        model_manager_args=MODEL_MANAGER_ARGS,
        model_load_backoff_secs=0.0,
    )
    assert sorted(run(NUMBERS, transform, answer)) == [(x, x + 1, True) for x in NUMBERS]


@pytest.mark.slow
@pytest.mark.usefixtures("reaped_children")
@pytest.mark.parametrize("manager_args", [None, MODEL_MANAGER_ARGS], ids=["default", "args"])
def test_model_manager_gives_stock_beams_results(manager_args: dict[str, Any] | None) -> None:
    """Slow: each run spawns a model process that imports Beam (about 4 s here)."""
    outputs = {}
    for transform in (base.RunInference, RunInference):
        handler = AddingHandler(min_batch_size=5, max_batch_size=5)
        outputs[transform] = run(
            NUMBERS,
            transform(handler, use_model_manager=True, model_manager_args=manager_args),
            answer,
        )
    assert sorted(outputs[RunInference]) == sorted(outputs[base.RunInference])
    assert sorted(outputs[RunInference]) == [(x, x + 1, True) for x in NUMBERS]


# -- large_model / model_copies -------------------------------------------------------------


@pytest.mark.parametrize(
    ("sharing", "copies"),
    [({"large_model": True}, 1), ({"model_copies": 2}, 2)],
    ids=["large_model", "model_copies=2"],
)
def test_models_shared_across_processes_give_stock_beams_results(
    sharing: dict[str, Any], copies: int
) -> None:
    outputs, copies_used = {}, {}
    for transform in (base.RunInference, RunInference):
        handler = AddingHandler(min_batch_size=2, max_batch_size=2, **sharing)
        assert handler.share_model_across_processes()
        results = run(NUMBERS, transform(handler), lambda r: (answer(r), copy_of(r)))
        outputs[transform] = sorted(a for a, _ in results)
        copies_used[transform] = len({c for _, c in results})
    assert outputs[RunInference] == outputs[base.RunInference]
    assert outputs[RunInference] == [(x, x + 1, True) for x in NUMBERS]
    # Ten batches, routed round-robin over the copies: every copy serves some.
    assert copies_used[RunInference] == copies_used[base.RunInference] == copies


def test_a_large_sklearn_model_gives_stock_beams_results(tmp_path: Path) -> None:
    path = tmp_path / "model.pkl"
    model = save_linear(path, 2.0)
    want = [
        (tuple(x), round(float(y), 6))
        for x, y in zip(POINTS, model.predict(np.stack(POINTS)), strict=True)
    ]
    for handler in (
        SklearnModelHandlerNumpy(str(path), large_model=True),
        SklearnModelHandlerNumpy(str(path), model_copies=2),
        BeamSklearn(str(path), large_model=True),
    ):
        assert handler.share_model_across_processes()
        for transform in (base.RunInference, RunInference):
            got = run(POINTS, transform(handler), predicted)
            assert sorted(got) == sorted(want), (transform, handler)


# -- keyed handlers with many models --------------------------------------------------------


def many_models(hint: int | None) -> base.KeyedModelHandler[Any, Any, Any, Any]:
    """Beam's test_run_inference_impl_with_keyed_examples_many_mhs_max_models_hint: even keys
    below 10 to a model adding 200, the others to one adding 1."""
    return base.KeyedModelHandler(
        [
            base.KeyModelMapping([0, 2, 4, 6, 8], AddingHandler(offset=200)),
            base.KeyModelMapping([1, 3, 5, 7, 9, *range(10, 20)], AddingHandler(offset=1)),
        ],
        max_models_per_worker_hint=hint,
    )


@pytest.mark.parametrize("hint", [None, 1], ids=["no hint", "max_models_per_worker_hint=1"])
def test_keyed_handler_with_many_models_gives_stock_beams_results(hint: int | None) -> None:
    examples = [1, 5, 3, 10, 2, 4, 6, 8, 9, 7, 1, 5, 3, 10, 2, 4, 6, 8, 9, 7]
    keyed = list(enumerate(examples))
    want = [(k, x + (200 if k in (0, 2, 4, 6, 8) else 1)) for k, x in keyed]
    for transform in (base.RunInference, RunInference):
        pipeline = beam.Pipeline(runner="FnApiRunner")
        out = (
            pipeline
            | beam.Create(keyed)
            | transform(many_models(hint), metrics_namespace="many_models")
            | beam.MapTuple(lambda k, r: (k, r.inference))
        )
        assert_that(out, equal_to(want))
        result = pipeline.run()
        result.wait_until_finish()
        loads = result.metrics().query(MetricsFilter().with_name("load_model_latency_milli_secs"))
        count = sum(d.committed.count for d in loads["distributions"])
        # Each model loads once without the hint; with room for one model, they take turns.
        assert count > 2 if hint else count == 2, (transform, count)


class CountingModel:
    """Predicts how many predictions it has made (Beam's FakeStatefulModel)."""

    def __init__(self) -> None:
        self._count = 0

    def predict(self, example: int) -> int:
        return self._count

    def increment_state(self, amount: int) -> None:
        self._count += amount


class CountingHandler(base.ModelHandler[int, base.PredictionResult, CountingModel]):
    """Beam's FakeModelHandlerReturnsPredictionResult(multi_process_shared=True, state=True):
    results name the model path they came from, and count the model's predictions."""

    def __init__(self) -> None:
        super().__init__()
        self.model_id = "fake_model_id_default"

    def load_model(self) -> CountingModel:
        return CountingModel()

    def run_inference(
        self, batch: Sequence[int], model: CountingModel, inference_args: Any = None
    ) -> Iterable[base.PredictionResult]:
        if "multi_process_shared" not in str(type(model)):
            raise TypeError(f"expected a multi_process_shared model, got {type(model)}")
        results = []
        for example in batch:
            results.append(base.PredictionResult(example, model.predict(example), self.model_id))
            model.increment_state(1)
        return results

    def update_model_path(self, model_path: str | None = None) -> None:
        self.model_id = model_path or self.model_id

    def share_model_across_processes(self) -> bool:
        return True


def test_per_key_models_refresh_through_a_side_input() -> None:
    """Beam's test_run_inference_side_input_in_batch_per_key_models, with beam-turbo's
    RunInference: two keys' models (shared across processes) are replaced at different
    times through ``model_metadata_pcoll`` (``KeyModelPathMapping``s)."""
    import math
    import time

    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.transforms import window

    first_ts = math.floor(time.time()) - 30
    interval = 7
    main = [
        ("key1", first_ts - 2),
        ("key2", first_ts + 1),
        ("key2", first_ts + 8),
        ("key1", first_ts + 15),
        ("key2", first_ts + 22),
        ("key1", first_ts + 29),
    ]

    def mappings(key1: str, key2: str) -> list[base.KeyModelPathMapping]:
        return [
            base.KeyModelPathMapping(keys=["key1"], update_path=key1),
            base.KeyModelPathMapping(keys=["key2"], update_path=key2),
        ]

    side = [
        (first_ts + 1, mappings("fake_model_id_default", "fake_model_id_default")),
        (first_ts + 8, mappings("fake_model_id_1", "fake_model_id_default")),
        (first_ts + 15, mappings("fake_model_id_1", "fake_model_id_2")),
    ]
    handler = base.KeyedModelHandler(
        [
            base.KeyModelMapping(["key1"], CountingHandler()),
            base.KeyModelMapping(["key2"], CountingHandler()),
        ]
    )

    with TestPipeline("FnApiRunner") as pipeline:
        side_input = in_fixed_windows(pipeline, side, interval, "Side")
        results = (
            pipeline
            | "Main" >> beam.Create(main)
            | "MainTs" >> beam.Map(lambda x: window.TimestampedValue(x, x[1]))
            | "MainWin" >> beam.WindowInto(window.FixedWindows(interval))
            | RunInference(handler, model_metadata_pcoll=side_input)
            | "Results" >> beam.Map(lambda keyed: keyed[1])
        )
        ids = ["fake_model_id_default"] * 3 + ["fake_model_id_1", "fake_model_id_2"]
        ids.append("fake_model_id_1")
        inferences = [0, 0, 1, 0, 0, 1]
        expected = [
            base.PredictionResult(example=x[1], inference=i, model_id=m)
            for x, i, m in zip(main, inferences, ids, strict=True)
        ]
        assert_that(results, equal_to(expected))
