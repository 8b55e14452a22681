"""Real models end to end: ``bench e2e`` and ``demo`` with ``--framework minilm|mobilenet``.

Each variant of the pipeline (stock Beam's, beam-turbo's) runs in a process of its own, so
its peak resident memory is its own; the parent asks each in turn for a small and a large
run, round after round, so that load on a shared machine falls on all of them alike.
Throughput is the slope between the two runs (start-up and the batch sizer's ramp cancel
out), the median over rounds. A cheap variant times its large run over the same elements
repeated (``Variant.repeats``), so that every variant is timed over the same sentences or
images while a fast one still runs long enough to time.

The pipelines run in the worker processes only, and each worker imports torch (and triton,
where installed) before anything imports TensorFlow (Beam's Hugging Face module does, and the
other order aborts the process with this TensorFlow and torch).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from beam_turbo.bench._outputs import read_predictions
from beam_turbo.bench._timing import print_table

#: ``--framework`` name -> the module defining its ``MODEL``.
REAL_MODELS = {"minilm": "beam_turbo.bench.minilm", "mobilenet": "beam_turbo.bench.mobilenet"}

#: Beam's RunInference metric of the elements in each batch run, recorded by both stock Beam's
#: and beam-turbo's RunInference (the same figures as ``BatchElements/batch_size`` and
#: ``beam_turbo_batch_size``).
BATCH_SIZE_METRIC = "inference_request_batch_size"


@dataclass(frozen=True)
class Variant:
    """One way of running the model: ``name`` is what the table and the worker call it."""

    name: str
    label: str
    repeats: int = 1  # the large run covers the timed elements this many times
    turbo: bool = False
    in_flight: int | None = None  # beam-turbo's batches in flight (None: its default)


#: The name suffix of a beam-turbo variant run serial (``--serial``).
SERIAL = "-serial"


def serial_variant(variant: Variant) -> Variant:
    """beam-turbo's ``variant`` with ``with_batches_in_flight(0)``: serial."""
    return Variant(
        variant.name + SERIAL, variant.label + ", serial", variant.repeats, True, in_flight=0
    )


def turbo_inference(handler: Any, variant: Variant) -> Any:
    """beam-turbo's ``RunInference(handler)`` with ``variant``'s batches in flight."""
    from beam_turbo.inference import RunInference

    transform = RunInference(handler)
    if variant.in_flight is not None:
        transform = transform.with_batches_in_flight(variant.in_flight)
    return transform


@dataclass(frozen=True)
class Agreement:
    """How one variant's outputs compare with the reference's."""

    same: bool
    compared: int
    max_abs_diff: float


@dataclass(frozen=True)
class RealModel:
    """A real model's pipelines, and how to read and check what they produce."""

    title: str
    unit: str  # what an element is: "sentences", "images"
    chunk: int  # elements generated per seed
    variants: tuple[Variant, ...]  # the first is the reference the others are checked against
    demo_variants: tuple[str, ...]
    goals: dict[str, float]  # turbo's speed-up goal over each of these variants
    sizes: dict[str, tuple[int, int]]  # "full" / "quick": (small, large) elements
    rtol: float
    atol: float
    prepare: Callable[[str], dict[str, Any]]  # in the parent: save the model, say where
    build: Callable[..., None]  # (pipeline, spec, variant, chunks, output) in a worker
    padding_counters: Callable[[Variant], tuple[str, str] | None] = lambda _: None
    notes: tuple[str, ...] = field(default_factory=tuple)
    #: The model alone, without Beam, over the elements of ``chunks`` (in a worker):
    #: elements per second one at a time (key ``"1"``) and in batches of each of
    #: ``bare_batch_sizes``: what batching itself can gain on this machine.
    bare: Callable[[dict[str, Any], list[int], Sequence[int]], dict[str, float]] | None = None
    bare_batch_sizes: tuple[int, ...] = (8, 32)
    bare_batches: str = ""  # how the bare model's batches are made, if not plain stacking

    def variant(self, name: str) -> Variant:
        if name.endswith(SERIAL):
            return serial_variant(self.variant(name.removesuffix(SERIAL)))
        return next(v for v in self.variants if v.name == name)


def has_batches_in_flight() -> bool:
    """Whether this build's RunInference has ``with_batches_in_flight``."""
    from beam_turbo.inference import RunInference

    return hasattr(RunInference, "with_batches_in_flight")


def load(name: str) -> RealModel:
    """The ``MODEL`` of ``--framework name`` (its module imports Beam, no ML framework)."""
    model: RealModel = importlib.import_module(REAL_MODELS[name]).MODEL
    return model


def chunks_for(small: int, large: int, chunk: int, elements: int, repeats: int) -> list[int]:
    """The content seed of each generated chunk of a run of ``elements``: the first
    ``large`` elements are all different; a longer run (``repeats`` > 1) goes over the
    elements between ``small`` and ``large`` again, so its extra time is spent on the same
    elements as every other variant's.

    Example:
        >>> chunks_for(2, 6, 2, 2, 1), chunks_for(2, 6, 2, 6, 1), chunks_for(2, 6, 2, 10, 2)
        ([0], [0, 1, 2], [0, 1, 2, 1, 2])
    """
    first, last = small // chunk, large // chunk
    count = elements // chunk
    if count <= last or repeats == 1:
        return list(range(min(count, last)))
    return list(range(first)) + [first + k % (last - first) for k in range(count - first)]


def timed_elements(small: int, large: int, repeats: int) -> int:
    """The large run's elements for a variant whose extra elements repeat ``repeats`` times.

    Example:
        >>> timed_elements(32, 160, 4)
        544
    """
    return small + repeats * (large - small)


def best_rate(work: Callable[[], object], elements: int, tries: int = 2) -> float:
    """Elements per second of the fastest of ``tries`` calls of ``work`` (the first also
    warms up).

    Example:
        >>> best_rate(lambda: None, 10) > 0
        True
    """
    best = math.inf
    for _ in range(tries):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return elements / max(best, 1e-9)


def compare(
    reference: dict[int, list[float]], other: dict[int, list[float]], rtol: float, atol: float
) -> Agreement:
    """Whether two variants' outputs agree element by element within ``allclose``.

    Example:
        >>> compare({1: [1.0, 2.0]}, {1: [1.0, 2.0000001]}, rtol=0, atol=1e-6).same
        True
    """
    import numpy as np

    if reference.keys() != other.keys() or not reference:
        return Agreement(False, len(other), float("inf"))
    worst = 0.0
    same = True
    for key, values in reference.items():
        a, b = np.asarray(values), np.asarray(other[key])
        if a.shape != b.shape:
            return Agreement(False, len(other), float("inf"))
        worst = max(worst, float(np.max(np.abs(a - b))))
        same = same and bool(np.allclose(b, a, rtol=rtol, atol=atol))
    return Agreement(same, len(other), worst)


# --- the parent: workers, rounds, tables ----------------------------------------------------


class Worker:
    """A process that runs one variant's pipelines when asked (JSON lines over its pipes):
    ``python -m module CONFIG``, where ``module`` serves them (this one's ``_serve``, or
    another benchmark's, as :mod:`beam_turbo.bench.tabular`)."""

    def __init__(
        self,
        framework: str,
        variant: str,
        spec: dict[str, Any],
        options: Sequence[str],
        log: str,
        module: str = __name__,
    ) -> None:
        import beam_turbo

        package_root = os.path.dirname(os.path.dirname(os.path.abspath(beam_turbo.__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        env.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads at run time
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        config = {"framework": framework, "variant": variant, "spec": spec, "options": [*options]}
        self.variant = variant
        self._log_path = log
        self._log = open(log, "w")  # noqa: SIM115 -- closed in close()
        self._process = subprocess.Popen(
            [sys.executable, "-m", module, json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
        )

    def receive(self) -> dict[str, Any]:
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.variant} worker died:\n{self._log_tail()}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"the {self.variant} worker failed:\n{reply['error']}")
        return reply

    def send(self, **command: Any) -> None:
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps(command) + "\n")
        self._process.stdin.flush()

    def ask(self, **command: Any) -> dict[str, Any]:
        self.send(**command)
        return self.receive()

    def _log_tail(self) -> str:
        self._log.flush()
        with open(self._log_path) as f:
            return "".join(f.readlines()[-30:])

    def close(self) -> None:
        if self._process.poll() is None:
            with contextlib.suppress(RuntimeError, OSError):
                self.ask(op="stop")
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()


@dataclass
class Measured:
    """What the rounds found for one variant."""

    slopes: list[float] = field(default_factory=list)
    large_run: dict[str, Any] = field(default_factory=dict)  # the last large run's metrics
    peak_mib: float = 0.0
    agreement: Agreement | None = None
    bare: dict[str, float] | None = None  # the reference worker's: the model alone

    @property
    def per_element_secs(self) -> float:
        """The median slope; NaN if no round gave one."""
        return statistics.median(self.slopes) if self.slopes else math.nan


def measure(
    model: RealModel,
    framework: str,
    variants: Sequence[Variant],
    small: int,
    large: int,
    rounds: int,
    options: Sequence[str] = (),
    say: Callable[[str], None] = print,
    bare: bool = False,
    device: str = "cpu",
) -> dict[str, Measured]:
    """Time each variant (``rounds`` rounds of a small and a large run, variants in turn),
    check its outputs over the first ``small`` elements against the first variant's, and
    read its peak memory; with ``bare``, time the model alone in the first variant's worker
    over the elements between ``small`` and ``large``. The model runs on ``device``."""
    found = {v.name: Measured() for v in variants}
    with tempfile.TemporaryDirectory() as folder:
        spec = {**model.prepare(folder), "device": device}
        workers = [
            Worker(framework, v.name, spec, options, os.path.join(folder, f"{v.name}.log"))
            for v in variants
        ]
        try:
            start = time.perf_counter()
            # They start side by side: import the frameworks, then run the small pipeline
            # once untimed (the first run in a process pays for first calls and caches).
            for worker in workers:
                worker.send(op="run", small=small, large=large, elements=small)
            for worker in workers:
                worker.receive()  # ready
                worker.receive()  # warmed up
            say(f"  workers started and warmed up in {time.perf_counter() - start:.1f} s")
            for n in range(rounds):
                for variant, worker in zip(variants, workers, strict=True):
                    start = time.perf_counter()
                    t_small = worker.ask(op="run", small=small, large=large, elements=small)
                    elements = timed_elements(small, large, variant.repeats)
                    t_large = worker.ask(op="run", small=small, large=large, elements=elements)
                    slope = (t_large["seconds"] - t_small["seconds"]) / (elements - small)
                    found[variant.name].large_run = t_large
                    rate = "the large run was the faster: no slope"
                    if slope > 0:  # else the machine's load swamped the difference
                        found[variant.name].slopes.append(slope)
                        rate = f"{1 / slope:,.1f} {model.unit}/s"
                    say(
                        f"  round {n + 1}/{rounds}, {variant.name}: {rate} "
                        f"({time.perf_counter() - start:.1f} s)"
                    )
            if bare and model.bare is not None:
                found[variants[0].name].bare = workers[0].ask(op="bare", small=small, large=large)
            outputs = {}
            for worker in workers:
                outputs[worker.variant] = os.path.join(folder, "out", worker.variant)
                worker.ask(
                    op="run",
                    small=small,
                    large=large,
                    elements=small,
                    output=outputs[worker.variant],
                )
            for worker in workers:
                found[worker.variant].peak_mib = worker.ask(op="peak")["peak_mib"]
        finally:
            for worker in workers:
                worker.close()

        reference = read_predictions(outputs[variants[0].name])
        for variant in variants[1:]:
            found[variant.name].agreement = compare(
                reference, read_predictions(outputs[variant.name]), model.rtol, model.atol
            )
    return found


def _batches(run: dict[str, Any]) -> str:
    sizes = run.get("distributions", {}).get(BATCH_SIZE_METRIC)
    if not sizes or not sizes["count"]:
        return "n/a"
    count, total, largest = sizes["count"], sizes["sum"], sizes["max"]
    return f"{count:,}, {total / count:,.1f} ({largest:,})"


def padding_fraction(model: RealModel, variant: Variant, run: dict[str, Any]) -> float | None:
    """The share of tokens computed that were padding, from the run's two counters."""
    names = model.padding_counters(variant)
    counters = run.get("counters", {})
    if names is None or names[0] not in counters or not counters.get(names[1]):
        return None
    tokens, computed = int(counters[names[0]]), int(counters[names[1]])
    return 1 - tokens / computed


def _ratio(found: dict[str, Measured], better: str, than: str) -> float:
    return found[than].per_element_secs / found[better].per_element_secs


def _format_ratio(ratio: float) -> str:
    return "n/a" if math.isnan(ratio) else f"{ratio:.2f}x"


def print_results(
    model: RealModel,
    variants: Sequence[Variant],
    found: dict[str, Measured],
    small: int,
    large: int,
    rounds: int,
    runner: str = "the DirectRunner",
) -> bool:
    """The table of a run; whether every variant's outputs agreed with the reference's."""
    reference = variants[0].name
    turbo = next((v.name for v in variants if v.turbo), None)
    print(
        f"\nend to end on {runner}, {model.title}: median over {rounds} round(s) of the slope "
        f"between {small:,} and {large:,} {model.unit} (a variant marked xN runs the "
        f"{large - small:,} between N times)\n"
    )
    with_padding = any(padding_fraction(model, v, found[v.name].large_run) for v in variants)
    headers = [
        "pipeline",
        f"{model.unit}/s",
        *(f"vs {v.name}" for v in variants if v.name != turbo),
        "batches: count, mean (max)",
        *(["padding"] if with_padding else []),
        "peak memory",
    ]
    rows = []
    for variant in variants:
        measured = found[variant.name]
        ratios = []
        for other in variants:
            if other.name == turbo:
                continue
            goal = model.goals.get(other.name) if variant.name == turbo else None
            ratios.append(
                ""
                if other is variant
                else _format_ratio(_ratio(found, variant.name, other.name))
                + (f" (goal >= {goal}x)" if goal else "")
            )
        row = [
            f"{variant.name}: {variant.label}"
            + (f" (x{variant.repeats})" if variant.repeats > 1 else ""),
            "n/a (too noisy)" if not measured.slopes else f"{1 / measured.per_element_secs:,.1f}",
            *ratios,
            f"{_batches(measured.large_run)}",
        ]
        if with_padding:
            fraction = padding_fraction(model, variant, measured.large_run)
            row.append("n/a" if fraction is None else f"{fraction:.0%}")
        memory = f"{measured.peak_mib:,.0f} MiB"
        if variant.name != reference:
            memory += f" ({measured.peak_mib / found[reference].peak_mib:.2f}x)"
        row.append(memory)
        rows.append(row)
    print_table(headers, rows)
    for note in model.notes:
        print(note)
    bare = found[reference].bare
    if bare:
        one = bare.pop("1")
        sizes = ", ".join(f"{size}: {rate:,.1f}" for size, rate in bare.items())
        best_size, best = max(bare.items(), key=lambda item: item[1])
        print(
            f"the model alone, without Beam, over the {large - small:,} timed {model.unit} "
            f"(best of 2), {model.unit}/s: one at a time {one:,.1f}; in batches"
            f"{model.bare_batches} of {sizes}; the best, {best_size}, {best / one:.2f}x one at "
            "a time (what batching itself gains here)"
        )
    all_same = True
    print(f"\noutputs over the first {small:,} {model.unit}, against {reference}:")
    for variant in variants[1:]:
        agreement = found[variant.name].agreement
        assert agreement is not None
        all_same = all_same and agreement.same
        verdict = "the same" if agreement.same else "DIFFERENT"
        print(
            f"  {variant.name}: {verdict} for all {agreement.compared:,} {model.unit} "
            f"(allclose rtol={model.rtol:g}, atol={model.atol:g}; "
            f"largest difference {agreement.max_abs_diff:.2g})"
        )
    return all_same


def bench(args: argparse.Namespace) -> int:
    """``beam-turbo bench e2e --framework minilm|mobilenet``."""
    model = load(args.framework)
    small, large = model.sizes["quick" if args.quick else "full"]
    rounds = 1 if args.quick else args.rounds
    variants = list(model.variants)
    if getattr(args, "serial", False):
        if has_batches_in_flight():
            variants += [serial_variant(v) for v in model.variants if v.turbo]
        else:
            print("(this build has no with_batches_in_flight: beam-turbo is serial, run once)")
    device = getattr(args, "device", "cpu")
    on = f", on {device}" if device != "cpu" else ""
    print(f"{model.title}: {len(variants)} variants, each in a process of its own{on}")
    start = time.perf_counter()
    found = measure(
        model, args.framework, variants, small, large, rounds, bare=not args.quick, device=device
    )
    same = print_results(model, variants, found, small, large, rounds)
    print(f"\nthe whole benchmark took {time.perf_counter() - start:.0f} s")
    return 0 if same else 1


def demo(args: argparse.Namespace, options: Sequence[str], runner: str) -> int:
    """``beam-turbo demo --framework minilm|mobilenet``: stock and turbo side by side."""
    model = load(args.framework)
    chunk = model.chunk
    large = (args.elements or model.sizes["full"][1]) // chunk * chunk
    # The small run is a fifth of the large one, or what --check asks for, up to half of it;
    # its elements are the ones checked. Elements are generated in whole chunks.
    small = large // 5 if args.check is None else min(-(-args.check // chunk) * chunk, large // 2)
    small = max(chunk, small // chunk * chunk)
    if large <= small:
        raise SystemExit(
            f"--elements: at least {2 * model.chunk} {model.unit} for {args.framework}"
        )
    variants = [model.variant(name) for name in model.demo_variants]
    print(
        f"beam-turbo demo: {model.title}, stock Beam RunInference and beam-turbo's, on {runner}\n"
    )
    found = measure(model, args.framework, variants, small, large, args.rounds, options)
    same = print_results(model, variants, found, small, large, args.rounds, runner)
    reference, turbo = variants[0].name, variants[-1].name
    print(f"\nspeed-up: {_format_ratio(_ratio(found, turbo, reference))} over {reference}")
    return 0 if same else 1


# --- a worker ---------------------------------------------------------------------------------


def _peak_resident_mib() -> float:
    """This process's peak resident memory (``VmHWM``: since its own start, which
    ``ru_maxrss`` is not after a fork of a large parent); with its children's, if any."""
    import resource

    peak_kib = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    peak_kib = int(line.split()[1])
    except OSError:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(peak_kib, children) / 1024


def _metrics(result: Any) -> dict[str, Any]:
    """The counters and distributions a finished pipeline reports, by name (summed over
    steps and namespaces)."""
    query = result.metrics().query()
    counters: dict[str, int] = {}
    for found in query["counters"]:
        value = found.committed if found.committed is not None else found.attempted
        counters[found.key.metric.name] = counters.get(found.key.metric.name, 0) + int(value or 0)
    distributions: dict[str, dict[str, int]] = {}
    for found in query["distributions"]:
        value = found.committed if found.committed is not None else found.attempted
        if value is None:
            continue
        seen = distributions.setdefault(
            found.key.metric.name, {"count": 0, "sum": 0, "min": value.min, "max": value.max}
        )
        seen["count"] += value.count
        seen["sum"] += value.sum
        seen["min"] = min(seen["min"], value.min)
        seen["max"] = max(seen["max"], value.max)
    return {"counters": counters, "distributions": distributions}


def run_pipeline(
    model: RealModel,
    spec: dict[str, Any],
    variant: Variant,
    chunks: list[int],
    options: Sequence[str] = (),
    output: str | None = None,
) -> dict[str, Any]:
    """One pipeline over ``chunks`` (content seeds); its seconds and metrics."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    start = time.perf_counter()
    pipeline = beam.Pipeline(options=PipelineOptions(list(options)))
    model.build(pipeline, spec, variant, chunks, output)
    result = pipeline.run()
    result.wait_until_finish()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, **_metrics(result)}


def keyed_elements(chunk: int, make: Callable[[int], Iterator[Any]]) -> Callable[..., Any]:
    """A ``FlatMap`` function from ``(position, content seed)`` to ``(id, element)``: ids
    are unique per run, content repeats with the seed."""

    def generate(position_and_seed: tuple[int, int]) -> Iterator[tuple[int, Any]]:
        position, seed = position_and_seed
        for i, element in enumerate(make(seed)):
            yield position * chunk + i, element

    return generate


def _serve(config_json: str) -> None:
    # Replies go to the real stdout; anything else printing there goes to stderr instead.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def reply(message: dict[str, Any]) -> None:
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    try:
        import torch  # noqa: F401 -- before TensorFlow, which Beam's HF module imports

        with contextlib.suppress(ImportError):
            import triton  # noqa: F401 -- see above
        config = json.loads(config_json)
        model = load(config["framework"])
        variant = model.variant(config["variant"])
        spec, options = config["spec"], config["options"]
        import apache_beam  # noqa: F401 -- imported now, not in the first timed run
    except Exception:
        reply({"error": traceback.format_exc()})
        return
    reply({"ready": True})
    for line in sys.stdin:
        command = json.loads(line)
        try:
            if command["op"] == "stop":
                reply({})
                return
            if command["op"] == "peak":
                reply({"peak_mib": _peak_resident_mib()})
                continue
            if command["op"] == "bare":
                assert model.bare is not None
                timed = chunks_for(
                    command["small"], command["large"], model.chunk, command["large"], 1
                )
                timed = timed[command["small"] // model.chunk :]
                reply(model.bare(spec, timed, model.bare_batch_sizes))
                continue
            chunks = chunks_for(
                command["small"],
                command["large"],
                model.chunk,
                command["elements"],
                variant.repeats,
            )
            reply(run_pipeline(model, spec, variant, chunks, options, command.get("output")))
        except Exception:
            reply({"error": traceback.format_exc()})


if __name__ == "__main__":
    # The package's own module, not this ``__main__`` copy: the model modules import it.
    from beam_turbo.bench import real_models

    real_models._serve(sys.argv[1])
