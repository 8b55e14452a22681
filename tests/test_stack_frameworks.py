"""beam_turbo.stack with torch and TensorFlow: inputs, out= buffers, and zero-copy hand-off."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch

import beam_turbo
from beam_turbo.errors import InvalidInputError, InvalidTypeError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def tf() -> Any:
    import tensorflow

    return tensorflow


def test_torch_inputs_give_a_numpy_batch_equal_to_torch_stack() -> None:
    tensors = [torch.randn(4, 3) for _ in range(10)]
    batch = beam_turbo.stack(tensors)
    assert isinstance(batch, np.ndarray)
    assert batch.ctypes.data % 64 == 0
    assert np.array_equal(batch, torch.stack(tensors).numpy())


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.int64, torch.uint8, torch.bool, torch.complex64]
)
def test_torch_dtypes(dtype: torch.dtype) -> None:
    tensors = [torch.arange(6).reshape(2, 3).to(dtype) for _ in range(3)]
    assert np.array_equal(beam_turbo.stack(tensors), torch.stack(tensors).numpy())


def test_torch_bfloat16_arrives_as_ml_dtypes_bfloat16() -> None:
    tensors = [torch.tensor([1.5, -2.0], dtype=torch.bfloat16)] * 3
    batch = beam_turbo.stack(tensors)
    assert batch.dtype == np.dtype(ml_dtypes.bfloat16)
    assert batch.astype(np.float32).tolist() == [[1.5, -2.0]] * 3


def test_torch_views_needing_grad_and_strided() -> None:
    base = torch.randn(5, 4, requires_grad=True)
    tensors = [base.T, base.T * 2, base.T[:, :]]
    expected = torch.stack([t.detach() for t in tensors]).numpy()
    assert np.array_equal(beam_turbo.stack(tensors), expected)


def test_mixed_torch_dtypes_name_the_element() -> None:
    tensors = [torch.zeros(3), torch.zeros(3), torch.zeros(3, dtype=torch.float64)]
    with pytest.raises(InvalidTypeError, match=r"element 2 has shape \(3,\) and dtype float64"):
        beam_turbo.stack(tensors)


def test_torch_shape_mismatch_names_the_element() -> None:
    tensors = [torch.zeros(3)] * 4 + [torch.zeros(4)]
    with pytest.raises(InvalidInputError, match=r"element 4 has shape \(4,\) and dtype float32"):
        beam_turbo.stack(tensors)


def test_torch_and_numpy_may_be_mixed() -> None:
    items = [torch.ones(2), np.zeros(2, np.float32)]
    assert beam_turbo.stack(items).tolist() == [[1.0, 1.0], [0.0, 0.0]]


def test_torch_padding() -> None:
    batch, shapes = beam_turbo.stack([torch.ones(1), torch.ones(3)], pad=0)
    assert batch.tolist() == [[1, 0, 0], [1, 1, 1]]
    assert shapes.tolist() == [[1], [3]]


def test_torch_from_numpy_shares_the_batch_memory() -> None:
    batch = beam_turbo.stack([np.ones(4, np.float32)] * 2)
    tensor = torch.from_numpy(batch)
    assert tensor.data_ptr() == batch.ctypes.data
    batch[1, 2] = 7.0
    assert tensor[1, 2].item() == 7.0


def test_torch_out_is_written_in_place() -> None:
    out = torch.full((3, 2), -1.0)
    tensors = [torch.tensor([float(i), float(i)]) for i in range(3)]
    assert beam_turbo.stack(tensors, out=out) is out
    assert out.tolist() == [[0, 0], [1, 1], [2, 2]]
    arrays = [np.array([i, i], np.float32) for i in range(3)]
    assert beam_turbo.stack(arrays, out=out) is out
    assert out.tolist() == [[0, 0], [1, 1], [2, 2]]


@pytest.mark.parametrize(
    ("out", "message"),
    [
        (torch.zeros(3, 3), r"out= has the wrong shape: got \(3, 3\), expected \(3, 2\)"),
        (torch.zeros(3, 2, dtype=torch.float64), r"out= has the wrong dtype"),
        (torch.zeros(2, 3).T, "out= must be C-contiguous"),
    ],
)
def test_torch_out_errors(out: torch.Tensor, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        beam_turbo.stack([torch.zeros(2)] * 3, out=out)
    with pytest.raises(InvalidInputError, match=message):
        beam_turbo.stack([np.zeros(2, np.float32)] * 3, out=out)


@pytest.mark.gpu
@cuda
def test_pinned_out_and_cuda_inputs() -> None:
    pinned = torch.empty((4, 8), pin_memory=True)
    assert beam_turbo.stack([torch.ones(8)] * 4, out=pinned) is pinned
    assert pinned.is_pinned()
    assert float(pinned.sum()) == 32.0
    with pytest.raises(InvalidInputError, match=r"element 1 is a torch tensor on cuda"):
        beam_turbo.stack([np.zeros(8, np.float32), torch.zeros(8, device="cuda")])


def test_tensorflow_eager_inputs(tf: Any) -> None:
    tensors = [tf.constant(np.arange(6, dtype=np.float32).reshape(2, 3) * i) for i in range(4)]
    assert np.array_equal(beam_turbo.stack(tensors), tf.stack(tensors).numpy())


def test_tensorflow_takes_the_batch_through_dlpack_without_a_copy(tf: Any) -> None:
    batch = beam_turbo.stack([np.ones(16, np.float32)] * 4)
    tensor = tf.experimental.dlpack.from_dlpack(batch.__dlpack__())
    batch[2, 5] = 42.0  # visible through TensorFlow only if the memory is shared
    assert float(tensor.numpy()[2, 5]) == 42.0
