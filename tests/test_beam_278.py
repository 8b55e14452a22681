"""Where Beam 2.78 changed its own semantics, beam-turbo follows the installed Beam's, chosen
by one version check (``_beam/internals.py``). These tests run the 2.78 behaviours on any
Beam, by setting the constants that check gives (on 2.78 they are so already), so that CI on
the development Beam keeps them working; Beam 2.78's own tests (the conformance) are the spec.
The 2.75-2.77 behaviours are the rest of the suite's."""

from __future__ import annotations

import logging
import sys
import types
from typing import Any

import apache_beam as beam
import pytest
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import window
from apache_beam.utils import proto_utils

from beam_turbo import BatchElements
from beam_turbo._beam import internals
from beam_turbo._gathering.gatherer import Gatherer
from beam_turbo._gathering.sizing import Sizing


@pytest.fixture
def beam_278(monkeypatch: pytest.MonkeyPatch) -> None:
    """Beam 2.78's semantics, whatever Beam is installed."""
    monkeypatch.setattr(internals, "MAX_BATCH_WEIGHT_BOUNDS_APART", True)
    monkeypatch.setattr(internals, "STATEFUL_BATCHING_DOFN_LABEL", "_StatefulBatchElementsDoFn")
    monkeypatch.setattr(
        internals,
        "LENGTH_FN_IGNORED_WARNING",
        "BatchElements ignores length_fn and bucket_boundaries unless "
        "max_batch_duration_secs is set.",
    )
    monkeypatch.setattr(internals, "HUGGINGFACE_FRAMEWORKS_AT_LOAD", True)


def lengths(batch: list[str]) -> tuple[int, ...]:
    return tuple(len(element) for element in batch)


def test_the_constants_follow_the_installed_beam() -> None:
    release = tuple(int(part) for part in beam.__version__.split(".")[:2])
    assert (release >= (2, 78)) == internals.SINCE_2_78
    assert internals.MAX_BATCH_WEIGHT_BOUNDS_APART == internals.SINCE_2_78
    assert (internals.STATEFUL_BATCHING_DOFN_LABEL is not None) == internals.SINCE_2_78
    assert (internals.LENGTH_FN_IGNORED_WARNING is not None) == internals.SINCE_2_78
    assert internals.HUGGINGFACE_FRAMEWORKS_AT_LOAD == internals.SINCE_2_78


def test_the_weight_is_bounded_apart_from_the_count(beam_278: None) -> None:
    # Beam 2.78's util_test.BatchElementsTest.test_max_batch_weight: at most 3 elements, and a
    # total length of at most 10.
    sizing = Sizing.from_batching_args(
        {"min_batch_size": 3, "max_batch_size": 3, "max_batch_weight": 10, "element_size_fn": len}
    )
    assert sizing.weight_fn is None
    assert sizing.load_fn is len
    assert sizing.max_load == 10
    gatherer = Gatherer(sizing)
    batches = []
    for n in [1, 1, 1, 4, 4, 4, 1, 20, 1]:
        batches += [lengths(batch.elements) for _, batch in gatherer.add("a" * n, "w")]
    batches += [lengths(batch.elements) for _, batch in gatherer.drain()]
    assert batches == [(1, 1, 1), (4, 4), (4, 1), (20,), (1,)]


def test_before_278_the_weight_is_the_size() -> None:
    if internals.MAX_BATCH_WEIGHT_BOUNDS_APART:
        pytest.skip("Beam 2.78's meaning is installed")
    sizing = Sizing.from_batching_args(
        {"min_batch_size": 3, "max_batch_size": 3, "max_batch_weight": 10, "element_size_fn": len}
    )
    assert sizing.weight_fn is len
    assert sizing.load_fn is None
    assert sizing.max_weight == 10


def test_batch_elements_max_batch_weight(beam_278: None) -> None:
    with BeamTestPipeline("FnApiRunner") as p:
        res = (
            p
            | beam.Create([1, 1, 1, 4, 4, 4, 1, 20, 1], reshuffle=False)
            | beam.Map(lambda n: "a" * n)
            | BatchElements(
                min_batch_size=3, max_batch_size=3, max_batch_weight=10, element_size_fn=len
            )
            | beam.Map(lengths)
        )
        assert_that(res, equal_to([(1, 1, 1), (4, 4), (4, 1), (20,), (1,)]))


def test_batch_elements_max_batch_weight_windowed(beam_278: None) -> None:
    elements = [(1, 11)] * 4 + [(4, 1)] * 3
    with BeamTestPipeline("FnApiRunner") as p:
        res = (
            p
            | beam.Create(elements, reshuffle=False)
            | beam.MapTuple(lambda n, ts: window.TimestampedValue("a" * n, ts))
            | beam.WindowInto(window.FixedWindows(10))
            | BatchElements(
                min_batch_size=3, max_batch_size=3, max_batch_weight=10, element_size_fn=len
            )
            | beam.Map(lengths)
        )
        assert_that(res, equal_to([(4, 4), (4,), (1, 1, 1), (1,)]))


def test_stateful_max_batch_weight(beam_278: None) -> None:
    def batch_lengths(p: Any, label: str, elements: list[str]) -> Any:
        return (
            p
            | f"Create{label}" >> beam.Create(elements)
            | f"Batch{label}"
            >> BatchElements(
                min_batch_size=3,
                max_batch_size=3,
                max_batch_duration_secs=100,
                max_batch_weight=10,
                element_size_fn=len,
            )
            | f"Len{label}" >> beam.Map(len)
        )

    with BeamTestPipeline("FnApiRunner") as p:
        heavy = batch_lengths(p, "Heavy", ["aaaa"] * 6)
        assert_that(heavy, equal_to([2, 2, 2]), label="CheckHeavy")
        light = batch_lengths(p, "Light", ["a"] * 7)
        assert_that(light, equal_to([3, 3, 1]), label="CheckLight")


def test_max_batch_weight_checks(beam_278: None) -> None:
    with pytest.raises(ValueError, match="requires element_size_fn"):
        BatchElements(max_batch_weight=10)
    with pytest.raises(ValueError, match="must be >= 1"):
        BatchElements(max_batch_weight=0, element_size_fn=len)


def test_length_fn_without_streaming_warns(
    beam_278: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=internals.BATCHING_LOGGER):
        BatchElements(min_batch_size=3, max_batch_size=3, length_fn=len)
    assert [r.name for r in caplog.records] == [internals.BATCHING_LOGGER]
    assert "ignores length_fn" in caplog.records[0].getMessage()


def _stateful_transforms(**kwargs: Any) -> dict[str, set[str]]:
    p = beam.Pipeline()
    _ = p | beam.Create(["a"]) | "Batch" >> BatchElements(max_batch_duration_secs=100, **kwargs)
    transforms = {}
    for transform in p.to_runner_api().components.transforms.values():
        if transform.spec.urn == common_urns.primitives.PAR_DO.urn:
            payload = proto_utils.parse_Bytes(
                transform.spec.payload, beam_runner_api_pb2.ParDoPayload
            )
            if payload.state_specs:
                transforms[transform.unique_name] = set(payload.state_specs)
    return transforms


def test_stateful_label_and_state_names(beam_278: None) -> None:
    # Beam 2.78 pins them, for the update compatibility of streaming pipelines.
    state = {"values", "count", "batch_size", "batch_estimator"}
    label = "Batch/ParDo(_StatefulBatchElementsDoFn)"
    assert _stateful_transforms() == {label: state}
    assert _stateful_transforms(element_size_fn=len) == {label: state | {"weight"}}
    weighed = _stateful_transforms(element_size_fn=len, max_batch_weight=10)
    assert weighed == {label: state | {"weight"}}


def test_before_278_the_stateful_names_are_beam_turbos() -> None:
    if internals.STATEFUL_BATCHING_DOFN_LABEL is not None:
        pytest.skip("Beam 2.78's names are installed")
    state = {"values", "count", "weight", "batch_size", "batch_estimator"}
    assert _stateful_transforms() == {"Batch/Batch": state}


def _fake_module(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


@pytest.mark.parametrize(
    ("device", "cuda", "expected"),
    [(None, True, "cuda:0"), (None, False, "cpu"), ("GPU", True, "cuda:0"), ("CPU", True, "cpu")],
)
def test_pipeline_device_is_chosen_at_load(
    beam_278: None, monkeypatch: pytest.MonkeyPatch, device: Any, cuda: bool, expected: str
) -> None:
    from beam_turbo.huggingface import HuggingFacePipelineModelHandler

    def fake_torch(available: bool) -> types.ModuleType:
        return _fake_module("torch", cuda=types.SimpleNamespace(is_available=lambda: available))

    # Built where the opposite holds: the loading worker's GPU decides.
    with monkeypatch.context() as built:
        built.setitem(sys.modules, "torch", fake_torch(not cuda))
        handler = HuggingFacePipelineModelHandler(task="text-classification", device=device)
    monkeypatch.setitem(sys.modules, "torch", fake_torch(cuda))
    monkeypatch.setitem(
        sys.modules, "transformers", _fake_module("transformers", pipeline=lambda **kw: kw)
    )
    loaded = handler.load_model()
    assert loaded == {"task": "text-classification", "model": "", "device": expected}


def test_pipeline_without_transformers_says_so(
    beam_278: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from beam_turbo.huggingface import HuggingFacePipelineModelHandler

    handler = HuggingFacePipelineModelHandler(task="text-classification", device="CPU")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    with pytest.raises(ImportError, match="transformers is required"):
        handler.load_model()
