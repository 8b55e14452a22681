"""handlers: beam-turbo's model handlers against Beam's, per batch of 1,024, one run.

Each case times the work Beam's inference DoFn asks of a handler (``run_inference`` consumed
into per-element results, plus ``get_num_bytes``) for Beam's handler and ours on the same model
and batch, with the bare model's own time (stack, call, unbatch) beside them.

Ours must give Beam's results (one per element, the same example, an inference of the same
dtype, shape and values): the run exits 1 when a case differs. Speed never fails it.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from beam_turbo.bench._timing import format_seconds, measure, print_table

BATCH = 1024


@dataclass(frozen=True)
class Case:
    name: str
    beam: Any
    ours: Any
    batch: list[Any]
    bare: Callable[[], object]
    goal: float


def drive(handler: Any, model: Any, batch: list[Any]) -> Callable[[], object]:
    def call() -> object:
        results = list(handler.run_inference(batch, model))
        return results, handler.get_num_bytes(batch)

    return call


def difference(case: Case, beam_model: Any, our_model: Any) -> str | None:
    """How our handler's results differ from Beam's on the case's batch, or None."""
    theirs = list(case.beam.run_inference(case.batch, beam_model))
    mine = list(case.ours.run_inference(case.batch, our_model))
    if len(mine) != len(theirs):
        return f"{len(mine)} results, Beam gives {len(theirs)}"
    for index, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        got, want = np.asarray(a.inference), np.asarray(b.inference)
        if a.example is not b.example:
            return f"result {index} is for another example"
        if got.dtype != want.dtype or got.shape != want.shape:
            mine_kind, beams_kind = (
                f"{got.dtype}{list(got.shape)}",
                f"{want.dtype}{list(want.shape)}",
            )
            return f"result {index} is {mine_kind}, Beam's {beams_kind}"
        if not np.array_equal(got, want):
            return f"result {index} is {got.tolist()}, Beam's {want.tolist()}"
    return None


def sklearn_case(folder: str) -> Case:
    from apache_beam.ml.inference.sklearn_inference import SklearnModelHandlerNumpy as Beam
    from sklearn.linear_model import LinearRegression

    from beam_turbo.sklearn import SklearnModelHandlerNumpy as Ours

    rng = np.random.default_rng(0)
    x = rng.random((256, 16), dtype=np.float32)
    model = LinearRegression().fit(x, x @ rng.random(16))
    path = os.path.join(folder, "linear.pkl")
    with open(path, "wb") as f:
        pickle.dump(model, f)
    batch = [rng.random(16, dtype=np.float32) for _ in range(BATCH)]
    return Case(
        "sklearn linear, float32[16]",
        Beam(path),
        Ours(path),
        batch,
        lambda: list(model.predict(np.stack(batch))),
        2.0,
    )


def torch_cases(folder: str) -> list[Case]:
    import torch
    from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerTensor as Beam

    from beam_turbo.pytorch import PytorchModelHandlerTensor as Ours

    torch.manual_seed(0)
    cases = []
    for name, model, width, goal in [
        ("torch linear, float32[16]", torch.nn.Linear(16, 1), 16, 10.0),
        ("torch MLP 256-1024-1024-10", _mlp(), 256, 6.0),
    ]:
        path = os.path.join(folder, f"{name.split(',')[0].replace(' ', '_')}.pt")
        torch.save(model.state_dict(), path)
        spec: dict[str, Any] = {
            "state_dict_path": path,
            "model_class": type(model) if width == 16 else _mlp,
        }
        params = {"in_features": 16, "out_features": 1} if width == 16 else {}
        batch = [torch.rand(width) for _ in range(BATCH)]
        model.eval()

        def bare(model: Any = model, batch: list[Any] = batch) -> object:
            with torch.no_grad():
                return model(torch.stack(batch)).unbind(0)

        cases.append(
            Case(
                name,
                Beam(model_params=params, **spec),
                Ours(model_params=params, **spec),
                batch,
                bare,
                goal,
            )
        )
    return cases


def _mlp() -> Any:
    import torch

    return torch.nn.Sequential(
        torch.nn.Linear(256, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 10),
    )


def tensorflow_case(folder: str) -> Case:
    import tensorflow as tf
    from apache_beam.ml.inference.tensorflow_inference import TFModelHandlerNumpy as Beam

    from beam_turbo.tensorflow import TFModelHandlerNumpy as Ours

    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.Input((16,)), tf.keras.layers.Dense(1)])
    path = os.path.join(folder, "linear.keras")
    model.save(path)
    rng = np.random.default_rng(1)
    batch = [rng.random(16, dtype=np.float32) for _ in range(BATCH)]
    return Case(
        "TensorFlow linear, float32[16]",
        Beam(path),
        Ours(path),
        batch,
        lambda: tf.unstack(model(np.stack(batch))),
        40.0,
    )


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    parser.add_argument(
        "--framework",
        choices=["all", "sklearn", "torch", "tensorflow"],
        default="all",
        help="which handlers to compare",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    rounds, secs = (3, 0.05) if args.quick else (5, 0.3)
    rows = []
    wrong = []
    with tempfile.TemporaryDirectory() as folder:
        cases: list[Case] = []
        if args.framework in ("all", "sklearn"):
            cases.append(sklearn_case(folder))
        if args.framework in ("all", "torch"):
            cases += torch_cases(folder)
        if args.framework in ("all", "tensorflow"):
            cases.append(tensorflow_case(folder))
        for case in cases:
            beam_model, our_model = case.beam.load_model(), case.ours.load_model()
            found = difference(case, beam_model, our_model)
            if found is not None:
                wrong.append(f"{case.name}: {found}")
            beam = measure(
                drive(case.beam, beam_model, case.batch), rounds=rounds, min_round_secs=secs
            )
            ours = measure(
                drive(case.ours, our_model, case.batch), rounds=rounds, min_round_secs=secs
            )
            bare = measure(case.bare, rounds=rounds, min_round_secs=secs)
            ratio = beam.best / ours.best
            rows.append(
                [
                    case.name,
                    format_seconds(beam.best),
                    format_seconds(ours.best),
                    format_seconds(bare.best),
                    f"{ratio:.1f}x",
                    f">= {case.goal:g}x",
                    "yes" if ratio >= case.goal else "NO",
                ]
            )
    print(
        f"handlers per batch of {BATCH}: run_inference consumed + get_num_bytes (best of rounds)\n"
    )
    print_table(["model", "Beam", "beam-turbo", "bare model", "speed-up", "goal", "met"], rows)
    for line in wrong:
        print(f"WRONG RESULT: {line}", file=sys.stderr)
    return 1 if wrong else 0
