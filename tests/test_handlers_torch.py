"""beam_turbo.pytorch: same results as Beam's handlers, faster paths, devices, OOM, bad input."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import apache_beam as beam
import pytest
import torch
from apache_beam.ml.inference import pytorch_inference as beam_pytorch
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference
from apache_beam.testing.util import assert_that, equal_to

from beam_turbo.errors import InvalidInputError, ModelLoadError, ModelNotFoundError
from beam_turbo.pytorch import (
    PytorchModelHandlerKeyedTensor,
    PytorchModelHandlerTensor,
    resolve_device,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def linear(tmp_path: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    path = tmp_path / "linear.pt"
    torch.save(torch.nn.Linear(4, 2).state_dict(), path)
    return {
        "state_dict_path": str(path),
        "model_class": torch.nn.Linear,
        "model_params": {"in_features": 4, "out_features": 2},
    }


def batch_of(n: int, *shape: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(n)
    return [torch.rand(*shape, generator=generator) for _ in range(n)]


def same_results(ours: list[PredictionResult], beams: list[PredictionResult]) -> None:
    assert len(ours) == len(beams)
    for mine, theirs in zip(ours, beams, strict=True):
        assert type(mine) is type(theirs) is PredictionResult
        assert mine.example is theirs.example
        assert type(mine.inference) is type(theirs.inference)
        assert mine.inference.dtype == theirs.inference.dtype
        assert torch.equal(mine.inference, theirs.inference)
        assert mine.model_id == theirs.model_id


def test_handlers_subclass_beams() -> None:
    assert issubclass(PytorchModelHandlerTensor, beam_pytorch.PytorchModelHandlerTensor)
    assert issubclass(PytorchModelHandlerKeyedTensor, ModelHandler)


def test_results_equal_beams_for_state_dict_models(linear: dict[str, Any]) -> None:
    ours, beams = (
        PytorchModelHandlerTensor(**linear),
        beam_pytorch.PytorchModelHandlerTensor(**linear),
    )
    batch = batch_of(37, 4)
    same_results(
        list(ours.run_inference(batch, ours.load_model())),
        list(beams.run_inference(batch, beams.load_model())),
    )


def test_results_equal_beams_for_torchscript_and_inference_args(tmp_path: Path) -> None:
    class Scaled(torch.nn.Module):
        def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return x.sum(dim=1, keepdim=True) * scale

    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(Scaled()), str(path))
    ours = PytorchModelHandlerTensor(torch_script_model_path=str(path))
    beams = beam_pytorch.PytorchModelHandlerTensor(torch_script_model_path=str(path))
    batch = batch_of(9, 3, 2)
    args = {"scale": 2.0}
    same_results(
        list(ours.run_inference(batch, ours.load_model(), args)),
        list(beams.run_inference(batch, beams.load_model(), args)),
    )


def test_dict_outputs_become_one_dict_per_example_as_in_beam(tmp_path: Path) -> None:
    class TwoHeads(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"sum": x.sum(dim=1), "max": x.max(dim=1).values}

    path = tmp_path / "heads.pt"
    torch.jit.save(torch.jit.script(TwoHeads()), str(path))
    ours = PytorchModelHandlerTensor(torch_script_model_path=str(path))
    beams = beam_pytorch.PytorchModelHandlerTensor(torch_script_model_path=str(path))
    batch = batch_of(5, 3)
    mine = list(ours.run_inference(batch, ours.load_model()))
    theirs = list(beams.run_inference(batch, beams.load_model()))
    for a, b in zip(mine, theirs, strict=True):
        assert a.inference.keys() == b.inference.keys()
        assert all(torch.equal(a.inference[k], b.inference[k]) for k in a.inference)


def test_keyed_tensors_equal_beams(tmp_path: Path) -> None:
    class Keyed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(3, 1)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.linear(a) + b
            return out

    torch.manual_seed(1)
    path = tmp_path / "keyed.pt"
    torch.save(Keyed().state_dict(), path)
    spec: dict[str, Any] = {"state_dict_path": str(path), "model_class": Keyed}
    ours = PytorchModelHandlerKeyedTensor(**spec)
    beams = beam_pytorch.PytorchModelHandlerKeyedTensor(**spec)
    batch = [{"a": torch.rand(3), "b": torch.rand(1)} for _ in range(11)]
    same_results(
        list(ours.run_inference(batch, ours.load_model())),
        list(beams.run_inference(batch, beams.load_model())),
    )
    assert ours.get_num_bytes(batch) == 11 * (3 + 1) * 4
    with pytest.raises(InvalidInputError, match=r"element 1 has keys \['a'\], element 0 has"):
        ours.run_inference(
            [{"a": torch.rand(3), "b": torch.rand(1)}, {"a": torch.rand(3)}], ours.load_model()
        )


def test_user_inference_fn_gets_what_beam_gives(linear: dict[str, Any]) -> None:
    seen: list[Any] = []

    def inference_fn(
        batch: Any, model: Any, device: Any, args: Any, model_id: Any = None
    ) -> list[PredictionResult]:
        seen.append((type(batch), len(batch), device, model_id))
        return [PredictionResult(x, model(x), model_id) for x in batch]

    handler = PytorchModelHandlerTensor(inference_fn=inference_fn, **linear)
    results = list(handler.run_inference(batch_of(3, 4), handler.load_model()))
    assert len(results) == 3
    assert seen == [(list, 3, torch.device("cpu"), linear["state_dict_path"])]


def test_true_byte_size_for_multi_dimensional_elements(linear: dict[str, Any]) -> None:
    ours, beams = (
        PytorchModelHandlerTensor(**linear),
        beam_pytorch.PytorchModelHandlerTensor(**linear),
    )
    batch = [torch.rand(3, 4) for _ in range(5)]
    list(ours.run_inference(batch, ours.load_model()))
    assert ours.get_num_bytes(batch) == 5 * 3 * 4 * 4  # constant time, from the stacked batch
    assert ours.get_num_bytes(batch) == 5 * 3 * 4 * 4  # and computed when not remembered
    assert beams.get_num_bytes(batch) == 5 * 3 * 4  # Beam's figure: element_size per row


def test_wrong_shape_keeps_beams_error_and_names_the_element(linear: dict[str, Any]) -> None:
    handler = PytorchModelHandlerTensor(**linear)
    model = handler.load_model()
    # Beam's error type and words (torch.stack's), then the element and what a user can do.
    with pytest.raises(
        RuntimeError,
        match=r"(?s)^stack expects each tensor to be equal size.*element 2 has shape \(5,\) "
        r"and dtype float32.*max_batch_size=1",
    ):
        handler.run_inference([torch.rand(4), torch.rand(4), torch.rand(5)], model)


def test_mixed_dtypes_are_promoted_as_beams_handler_does(linear: dict[str, Any]) -> None:
    handler = PytorchModelHandlerTensor(**linear)
    beams = beam_pytorch.PytorchModelHandlerTensor(**linear)
    model = handler.load_model()
    batch = [torch.rand(4), torch.arange(4)]  # float32 and int64: float32
    ours = [r.inference for r in handler.run_inference(batch, model)]
    theirs = [r.inference for r in beams.run_inference(batch, model)]
    assert [t.dtype for t in ours] == [t.dtype for t in theirs]
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_missing_corrupt_and_mismatched_model_files_name_the_file(
    linear: dict[str, Any], tmp_path: Path
) -> None:
    missing = dict(linear, state_dict_path=str(tmp_path / "nope.pt"))
    with pytest.raises(ModelNotFoundError, match=r"nope\.pt does not exist"):
        PytorchModelHandlerTensor(**missing).load_model()
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match=r"corrupt\.pt could not be loaded"):
        PytorchModelHandlerTensor(**dict(linear, state_dict_path=str(corrupt))).load_model()
    wrong = dict(linear, model_params={"in_features": 5, "out_features": 2})
    with pytest.raises(
        ModelLoadError, match=r"(?s)state dict in .*linear\.pt does not fit Linear: .*size mismatch"
    ):
        PytorchModelHandlerTensor(**wrong).load_model()


def test_device_names() -> None:
    assert resolve_device("CPU") == torch.device("cpu")
    assert resolve_device("GPU") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected_auto = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected_auto
    with pytest.raises(InvalidInputError, match="device='tpu:0'"):
        resolve_device("tpu:0")
    with pytest.raises(InvalidInputError, match="device='meta'"):
        resolve_device("meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback without CUDA")
@pytest.mark.parametrize("device", ["GPU", "cuda", "cuda:1"])
def test_cuda_without_cuda_warns_and_uses_the_cpu(
    linear: dict[str, Any], device: str, caplog: pytest.LogCaptureFixture
) -> None:
    handler = PytorchModelHandlerTensor(device=device, **linear)
    with caplog.at_level(logging.WARNING):
        model = handler.load_model()
    assert "GPUs are not available" in caplog.text
    assert next(model.parameters()).device == torch.device("cpu")
    assert len(list(handler.run_inference(batch_of(2, 4), model))) == 2


def test_inference_mode_and_autocast_are_opt_in(linear: dict[str, Any]) -> None:
    plain = PytorchModelHandlerTensor(**linear)
    batch = batch_of(4, 4)
    result = next(iter(plain.run_inference(batch, plain.load_model())))
    assert not result.inference.is_inference()
    result.inference.add_(1)  # downstream may change outputs in place, as with Beam

    fast = PytorchModelHandlerTensor(inference_mode=True, **linear)
    assert next(iter(fast.run_inference(batch, fast.load_model()))).inference.is_inference()

    bf16 = PytorchModelHandlerTensor(autocast_dtype="bfloat16", **linear)
    out = next(iter(bf16.run_inference(batch, bf16.load_model()))).inference
    assert out.dtype == torch.bfloat16
    with pytest.raises(InvalidInputError, match="autocast_dtype='int8'"):
        PytorchModelHandlerTensor(autocast_dtype="int8", **linear)


class FailsAboveSize(torch.nn.Module):
    """Raises CUDA's out-of-memory error for batches above a size, as a GPU would."""

    limit = 8
    sizes: list[int] = []  # noqa: RUF012 - shared record of calls, reset by the test

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        FailsAboveSize.sizes.append(len(x))
        if len(x) > self.limit:
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 1 GiB total)"
            )
        return x * 2


def test_cuda_oom_splits_the_batch_until_it_fits(tmp_path: Path) -> None:
    path = tmp_path / "fails.pt"
    torch.save(FailsAboveSize().state_dict(), path)
    handler = PytorchModelHandlerTensor(state_dict_path=str(path), model_class=FailsAboveSize)
    batch = batch_of(30, 2)
    FailsAboveSize.sizes = []
    results = list(handler.run_inference(batch, handler.load_model()))
    assert [r.example for r in results] == batch
    assert all(torch.equal(r.inference, r.example * 2) for r in results)
    # 30 fails, 15 fails, then parts of 7 (the size that fit) for the rest.
    assert FailsAboveSize.sizes == [30, 15, 7, 7, 7, 7, 2]


def test_an_element_that_alone_runs_out_of_memory_raises(tmp_path: Path) -> None:
    path = tmp_path / "fails.pt"
    torch.save(FailsAboveSize().state_dict(), path)
    handler = PytorchModelHandlerTensor(state_dict_path=str(path), model_class=FailsAboveSize)
    FailsAboveSize.limit = 0
    try:
        with pytest.raises(torch.OutOfMemoryError):
            handler.run_inference(batch_of(3, 2), handler.load_model())
    finally:
        FailsAboveSize.limit = 8


def test_handler_pickles_and_runs_after_unpickling(linear: dict[str, Any]) -> None:
    import pickle

    handler = PytorchModelHandlerTensor(**linear)
    model = handler.load_model()
    list(handler.run_inference(batch_of(3, 4), model))
    copy = pickle.loads(pickle.dumps(handler))
    assert len(list(copy.run_inference(batch_of(3, 4), copy.load_model()))) == 3


def test_inside_stock_beam_run_inference(linear: dict[str, Any]) -> None:
    inputs = batch_of(50, 4)
    model = beam_pytorch.PytorchModelHandlerTensor(**linear).load_model()
    with torch.no_grad():
        expected = [(i, round(float(model(x)[0]), 5)) for i, x in enumerate(inputs)]
    with beam.Pipeline() as pipeline:
        outputs = (
            pipeline
            | beam.Create(list(enumerate(inputs)))
            | beam.Map(lambda kv: (kv[0], kv[1]))
            | RunInference(
                beam.ml.inference.base.KeyedModelHandler(PytorchModelHandlerTensor(**linear))
            )
            | beam.MapTuple(lambda i, r: (i, round(float(r.inference[0]), 5)))
        )
        assert_that(outputs, equal_to(expected))


@pytest.mark.gpu
@cuda
def test_gpu_results_equal_cpu_and_stay_on_device(linear: dict[str, Any]) -> None:
    cpu = PytorchModelHandlerTensor(**linear)
    gpu = PytorchModelHandlerTensor(device="cuda", **linear)
    batch = batch_of(300, 4)
    on_gpu = list(gpu.run_inference(batch, gpu.load_model()))
    on_cpu = list(cpu.run_inference(batch, cpu.load_model()))
    assert on_gpu[0].inference.device.type == "cuda"
    for a, b in zip(on_gpu, on_cpu, strict=True):
        assert torch.allclose(a.inference.cpu(), b.inference, atol=1e-6)
    # Reused pinned buffers: a second and third batch give fresh, correct results.
    for _ in range(2):
        again = list(gpu.run_inference(batch, gpu.load_model()))
        assert torch.allclose(again[-1].inference.cpu(), on_cpu[-1].inference, atol=1e-6)
