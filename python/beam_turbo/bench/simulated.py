"""A simulated accelerator end to end: ``bench e2e --framework simulated``.

The model's time is spent off the CPU and outside the GIL, as a device's is: it sleeps
``per_element_secs`` times the batch's length (2 us an element by default), then returns
each element itself as its result. With ``per_element_secs=0`` it is a model that takes no
time, so its pipeline measures RunInference's own cost per element. In the same run, in
rounds that take the pipelines in turn (so that the machine's load falls on all alike):

- ``floor``: the same pipeline with an identity ``Map`` for RunInference (Beam's floor);
- ``free``: beam-turbo's RunInference with the model that takes no time;
- ``simulated``: beam-turbo's RunInference with the simulated accelerator;
- ``stock``: stock Beam's RunInference with the simulated accelerator;

each of beam-turbo's serial (``with_batches_in_flight(0)``) and in flight (its default) where
the build has ``with_batches_in_flight``, else serial alone. Throughput is the slope between a
small and a large run, the median over rounds; the model alone is timed outside Beam, on
batches of 1,024. Then every RunInference variant runs once more over the small run's
elements, keyed, and each element's result is checked against its input: a wrong or missing
one prints ``WRONG RESULT`` and the benchmark exits 1 (speed never fails it).
"""

from __future__ import annotations

import argparse
import math
import operator
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference import base
from apache_beam.options.pipeline_options import PipelineOptions

from beam_turbo._arrays.results import prediction_results
from beam_turbo.bench._outputs import read_predictions, write_or_count
from beam_turbo.bench._timing import print_table
from beam_turbo.bench.real_models import BATCH_SIZE_METRIC, has_batches_in_flight

CHUNK = 2_000  # elements generated per seed
FEATURES = 16  # each element is float32[FEATURES]
PER_ELEMENT_SECS = 2e-6  # the simulated device's time per element (the measurement)
MODEL_ALONE_BATCH = 1_024
#: Goals (issue 23): the simulated accelerator's throughput against the slower of the model
#: alone and the free pipeline; the free pipeline's against the floor.
GOAL_OVERLAP, GOAL_FREE = 0.9, 0.7


_NBYTES = operator.attrgetter("nbytes")


class SimulatedModel:
    """A device that takes ``per_element_secs`` an element, off the CPU and outside the GIL
    (a sleep), and gives each element back as its result."""

    def __init__(self, per_element_secs: float) -> None:
        self.per_element_secs = per_element_secs

    def __call__(self, batch: Sequence[Any]) -> Sequence[Any]:
        if self.per_element_secs > 0:
            time.sleep(self.per_element_secs * len(batch))
        return batch


class SimulatedHandler(base.ModelHandler[Any, base.PredictionResult, SimulatedModel]):
    """A Beam ``ModelHandler`` of :class:`SimulatedModel`: its results are built in one pass
    (as beam-turbo's handlers build theirs), so that a free model's pipeline costs no more
    than RunInference's own work."""

    def __init__(self, per_element_secs: float) -> None:
        super().__init__()
        self.per_element_secs = per_element_secs

    def load_model(self) -> SimulatedModel:
        return SimulatedModel(self.per_element_secs)

    def run_inference(
        self,
        batch: Sequence[Any],
        model: SimulatedModel,
        inference_args: dict[str, Any] | None = None,
    ) -> list[base.PredictionResult]:
        return prediction_results(batch, model(batch))

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        """The batch's bytes, as beam-turbo's handlers count them (Beam's default pickles the
        whole batch for this metric: about 1.5 µs an element here, the handler's cost, not
        RunInference's), in one pass over the arrays' ``nbytes`` (20 ns an element)."""
        return sum(map(_NBYTES, batch))


@dataclass(frozen=True)
class Variant:
    """One pipeline: ``which`` of floor, turbo or stock; the model's seconds an element
    (None: no model); beam-turbo's batches in flight (None: its default)."""

    name: str
    label: str
    which: str
    per_element_secs: float | None = None
    in_flight: int | None = None


def variants(per_element_secs: float) -> list[Variant]:
    """The pipelines of one run: beam-turbo's serial and in flight where the build has both."""
    in_flight = has_batches_in_flight()
    found = [Variant("floor", "identity Map (Beam's floor)", "floor")]
    for model, secs in (("free", 0.0), ("simulated", per_element_secs)):
        what = "model that takes no time" if secs == 0 else "simulated accelerator"
        if in_flight:
            found.append(
                Variant(f"{model}-serial", f"beam-turbo, {what}, serial", "turbo", secs, 0)
            )
            found.append(Variant(model, f"beam-turbo, {what}, in flight", "turbo", secs))
        else:
            found.append(Variant(model, f"beam-turbo, {what} (serial)", "turbo", secs))
    found.append(Variant("stock", "stock Beam, simulated accelerator", "stock", per_element_secs))
    return found


def generate(seed: int, keyed: bool = False) -> Iterator[Any]:
    """``CHUNK`` float32[16] elements from ``seed``; with ``keyed``, each with a unique id."""
    rows = np.random.default_rng(seed).random((CHUNK, FEATURES), dtype=np.float32)
    if keyed:
        for i, row in enumerate(rows):
            yield seed * CHUNK + i, row
    else:
        yield from rows


def run_pipeline(variant: Variant, elements: int, output: str | None = None) -> dict[str, Any]:
    """One pipeline of ``variant`` over ``elements`` generated elements: its seconds, and the
    mean batch size it reported (NaN for the floor). With ``output``, the elements are keyed
    and ``(id, result)`` lines written there."""
    from beam_turbo.inference import RunInference

    keyed = output is not None
    start = time.perf_counter()
    pipeline = beam.Pipeline(options=PipelineOptions([]))
    examples = (
        pipeline
        | "Seeds" >> beam.Create(list(range(max(1, elements // CHUNK))))
        | "Generate" >> beam.FlatMap(generate, keyed=keyed)
    )
    if variant.which == "floor":
        outputs = examples | "Identity" >> beam.Map(lambda x: x)
    else:
        assert variant.per_element_secs is not None
        handler: base.ModelHandler = SimulatedHandler(variant.per_element_secs)
        if keyed:
            handler = base.KeyedModelHandler(handler)
        transform: Any
        if variant.which == "stock":
            transform = base.RunInference(handler)
        else:
            transform = RunInference(handler)
            if variant.in_flight is not None:
                transform = transform.with_batches_in_flight(variant.in_flight)
        outputs = examples | "RunInference" >> transform
        if keyed:
            outputs = outputs | "Inference" >> beam.MapTuple(lambda key, r: (key, r.inference))
    write_or_count(outputs, output)
    result = pipeline.run()
    result.wait_until_finish()
    seconds = time.perf_counter() - start
    count = total = 0
    for dist in result.metrics().query()["distributions"]:
        value = dist.committed or dist.attempted
        if dist.key.metric.name == BATCH_SIZE_METRIC and value is not None and value.count:
            count, total = count + value.count, total + value.sum
    return {"seconds": seconds, "mean_batch": total / count if count else math.nan}


def model_alone_secs(per_element_secs: float, batch_size: int = MODEL_ALONE_BATCH) -> float:
    """The handler's ``run_inference`` alone, outside Beam, on batches of ``batch_size``
    (results built): seconds an element, the best of 5 timings of 10 calls."""
    handler = SimulatedHandler(per_element_secs)
    model = handler.load_model()
    batch = [row for seed in range(-(-batch_size // CHUNK)) for row in generate(seed)]
    batch = batch[:batch_size]
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(10):
            handler.run_inference(batch, model)
        best = min(best, (time.perf_counter() - start) / (10 * batch_size))
    return best


def wrong_results(found: dict[int, list[float]], elements: int) -> list[str]:
    """What is wrong in a keyed run's ``(id, result)`` over ``elements`` elements: each
    element's result must be its input, exactly, once."""
    problems = []
    for seed in range(max(1, elements // CHUNK)):
        for key, row in generate(seed, keyed=True):
            got = found.pop(key, None)
            if got is None:
                problems.append(f"element {key}: no result")
            elif got != [float(v) for v in row]:
                problems.append(f"element {key}: result {got[:3]}... is not its input")
    problems.extend(f"element {key}: a result for no input" for key in sorted(found))
    return problems


@dataclass
class Measured:
    slopes: list[float]
    rounds: list[float]  # each round's rate, NaN where it gave no slope
    mean_batch: float = math.nan

    @property
    def rate(self) -> float:
        """Elements per second: the inverse of the median slope (NaN without one)."""
        return 1 / statistics.median(self.slopes) if self.slopes else math.nan


def measure(
    runs: Sequence[Variant], small: int, large: int, rounds: int, say: Any = print
) -> dict[str, Measured]:
    """Each variant's slope between ``small`` and ``large`` elements, ``rounds`` times, the
    variants in turn within each round (after one untimed small run of each)."""
    for variant in runs:
        run_pipeline(variant, small)
    found = {v.name: Measured([], []) for v in runs}
    for n in range(rounds):
        for variant in runs:
            t_small = run_pipeline(variant, small)["seconds"]
            t_large = run_pipeline(variant, large)
            slope = (t_large["seconds"] - t_small) / (large - small)
            found[variant.name].mean_batch = t_large["mean_batch"]
            found[variant.name].rounds.append(1 / slope if slope > 0 else math.nan)
            if slope > 0:  # else the machine's load swamped the difference
                found[variant.name].slopes.append(slope)
            rate = f"{1 / slope:,.0f} el/s" if slope > 0 else "no slope (noise)"
            say(f"  round {n + 1}/{rounds}, {variant.name}: {rate}")
    return found


def check(runs: Sequence[Variant], elements: int) -> bool:
    """Run each RunInference variant keyed over ``elements`` elements and check every
    result; print ``WRONG RESULT`` lines for any that is not right."""
    right = True
    with tempfile.TemporaryDirectory() as folder:
        for variant in runs:
            if variant.which == "floor":
                continue
            output = os.path.join(folder, variant.name, "out")
            run_pipeline(variant, elements, output)
            problems = wrong_results(read_predictions(output), elements)
            for line in problems[:5]:
                print(f"WRONG RESULT: {variant.name}: {line}", file=sys.stderr)
            if problems:
                print(f"WRONG RESULT: {variant.name}: {len(problems):,} of {elements:,} elements")
            right = right and not problems
    return right


def run(args: argparse.Namespace) -> int:
    """``beam-turbo bench e2e --framework simulated``."""
    small, large = (10_000, 60_000) if args.quick else (20_000, 400_000)
    if args.sizes:
        small, large = args.sizes
    if small < CHUNK or large <= small:
        raise SystemExit(f"--sizes: SMALL at least {CHUNK:,} and LARGE above it")
    rounds = 1 if args.quick else args.rounds
    per_element = args.per_element_us * 1e-6
    runs = variants(per_element)
    print(
        f"simulated accelerator ({args.per_element_us:g} us an element, a sleep outside the "
        f"GIL) on the DirectRunner: median over {rounds} round(s) of the slope between "
        f"{small:,} and {large:,} elements"
    )
    if not has_batches_in_flight():
        print("  (this build has no with_batches_in_flight: beam-turbo's runs are serial)")
    found = measure(runs, small, large, rounds)
    alone = 1 / model_alone_secs(per_element)
    # The model alone at the batches the simulated pipeline ran: a sleep's wake-up costs a
    # fixed ~0.1 ms a call (as a device's launch does), which small batches pay more of.
    at_mean = found["simulated"].mean_batch if "simulated" in found else math.nan
    alone_at_mean = (
        math.nan if math.isnan(at_mean) else 1 / model_alone_secs(per_element, round(at_mean))
    )
    right = check(runs, small)

    rate = {name: m.rate for name, m in found.items()}
    floor = rate["floor"]
    rows = [
        [
            f"{v.name}: {v.label}",
            f"{rate[v.name]:,.0f}",
            f"{rate[v.name] / floor:.2f}",
            "" if math.isnan(found[v.name].mean_batch) else f"{found[v.name].mean_batch:,.0f}",
        ]
        for v in runs
    ]
    rows.append(
        [
            f"the model alone, batches of {MODEL_ALONE_BATCH:,}, outside Beam",
            f"{alone:,.0f}",
            f"{alone / floor:.2f}",
            "",
        ]
    )
    if not math.isnan(alone_at_mean):
        rows.append(
            [
                "the model alone, batches of simulated's mean",
                f"{alone_at_mean:,.0f}",
                f"{alone_at_mean / floor:.2f}",
                f"{round(at_mean):,}",
            ]
        )
    print()
    print_table(["pipeline", "elements/s", "vs floor", "mean batch"], rows)
    per_round = [{name: m.rounds[n] for name, m in found.items()} for n in range(rounds)]
    print(ratios(rate, alone, per_round))
    print(f"\noutputs: every element's result {'right' if right else 'NOT right'}, each variant")
    return 0 if right else 1


def goal_ratios(rate: dict[str, float], alone: float) -> dict[str, float]:
    """The goals' ratios from pipelines' rates and the model alone's: ``overlap``, simulated /
    min(model alone, free); ``best``, simulated against the serial best 1 / (1/free-serial +
    1/model alone) (free's where there is no serial run), and ``serial-best`` for
    simulated-serial, and ``in flight``, simulated / simulated-serial; ``free``, free / floor.

    Example:
        >>> goal_ratios({"floor": 500.0, "free": 250.0, "simulated": 150.0}, 500.0)["overlap"]
        0.6
    """
    free, simulated = rate["free"], rate["simulated"]
    serial_best = 1 / (1 / rate.get("free-serial", free) + 1 / alone)
    found = {
        "overlap": simulated / min(alone, free),
        "serial best": serial_best,
        "best": simulated / serial_best,
        "free": free / rate["floor"],
    }
    if "simulated-serial" in rate:
        found["serial-best"] = rate["simulated-serial"] / serial_best
        found["in flight"] = simulated / rate["simulated-serial"]
    return found


def ratios(rate: dict[str, float], alone: float, rounds: Sequence[dict[str, float]] = ()) -> str:
    """The goals' ratios (:func:`goal_ratios`) of the median rates, each with its range over
    ``rounds`` (each round's rates: its pipelines ran side by side, under the same load).

    Example:
        >>> print(ratios({"floor": 500.0, "free": 250.0, "simulated": 150.0}, 500.0))
        <BLANKLINE>
        goals: simulated / min(model alone, free) = 150 / 250 = 0.60 (goal >= 0.9, missed)
          serial best 1 / (1/free + 1/model alone) = 167: simulated is 0.90 of it
          free / floor = 250 / 500 = 0.50 (goal >= 0.7, missed)
    """
    if not {"floor", "free", "simulated"} <= rate.keys():
        return ""  # a run of fewer pipelines (a test's)
    found = goal_ratios(rate, alone)
    per_round = [goal_ratios(r, alone) for r in rounds]

    def ratio(name: str, goal: float | None = None) -> str:
        text = f"{found[name]:.2f}"
        spread = sorted(r[name] for r in per_round if not math.isnan(r[name]))
        if len(spread) > 1:
            text += f" (rounds {spread[0]:.2f}-{spread[-1]:.2f})"
        if goal is not None and math.isnan(found[name]):
            text += f" (goal >= {goal}, n/a: a pipeline gave no slope)"
        elif goal is not None:
            text += f" (goal >= {goal}, {'met' if found[name] >= goal else 'missed'})"
        return text

    free, simulated = rate["free"], rate["simulated"]
    serial = "free-serial" if "free-serial" in rate else "free"
    also = f", simulated-serial {ratio('serial-best')}" if "serial-best" in found else ""
    return "\n".join(
        [
            "",
            f"goals: simulated / min(model alone, free) = {simulated:,.0f} / "
            f"{min(alone, free):,.0f} = {ratio('overlap', GOAL_OVERLAP)}",
            f"  serial best 1 / (1/{serial} + 1/model alone) = {found['serial best']:,.0f}: "
            f"simulated is {ratio('best')} of it{also}",
            f"  free / floor = {free:,.0f} / {rate['floor']:,.0f} = {ratio('free', GOAL_FREE)}",
            *(
                [f"  simulated in flight / serial = {ratio('in flight')}"]
                if "in flight" in found
                else []
            ),
        ]
    )
