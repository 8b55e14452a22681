"""pytest-benchmark suite for beam_turbo.stack; each group holds ours and the alternatives,
so pytest-benchmark's table shows the ratios of one run.

Run: scripts/bench.sh benches/bench_stack.py
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import beam_turbo
from beam_turbo.bench.stack import images, numpy_pad_and_stack, small_arrays, tokens


@pytest.fixture(scope="module")
def small() -> list[np.ndarray[Any, Any]]:
    return small_arrays()


@pytest.fixture(scope="module")
def imgs() -> list[np.ndarray[Any, Any]]:
    return images()


@pytest.fixture(scope="module")
def toks() -> list[np.ndarray[Any, Any]]:
    return tokens()


@pytest.mark.benchmark(group="1000 x float32[16]")
def test_small_beam_turbo(benchmark: Any, small: list[np.ndarray[Any, Any]]) -> None:
    benchmark(beam_turbo.stack, small)


@pytest.mark.benchmark(group="1000 x float32[16]")
def test_small_numpy_stack(benchmark: Any, small: list[np.ndarray[Any, Any]]) -> None:
    benchmark(np.stack, small)


@pytest.mark.benchmark(group="1000 x float32[16]")
def test_small_numpy_concatenate(benchmark: Any, small: list[np.ndarray[Any, Any]]) -> None:
    benchmark(lambda: np.concatenate(small).reshape(len(small), -1))


@pytest.mark.benchmark(group="64 x float32[224,224,3]")
def test_images_beam_turbo(benchmark: Any, imgs: list[np.ndarray[Any, Any]]) -> None:
    benchmark(beam_turbo.stack, imgs)


@pytest.mark.benchmark(group="64 x float32[224,224,3]")
def test_images_numpy_copyto(benchmark: Any, imgs: list[np.ndarray[Any, Any]]) -> None:
    src = np.stack(imgs)
    dst = np.empty_like(src)
    benchmark(np.copyto, dst, src)


@pytest.mark.benchmark(group="64 x float32[224,224,3]")
def test_images_numpy_stack(benchmark: Any, imgs: list[np.ndarray[Any, Any]]) -> None:
    benchmark(np.stack, imgs)


@pytest.mark.benchmark(group="256 x int64[1..512] padded")
def test_tokens_beam_turbo(benchmark: Any, toks: list[np.ndarray[Any, Any]]) -> None:
    benchmark(lambda: beam_turbo.stack(toks, pad=0))


@pytest.mark.benchmark(group="256 x int64[1..512] padded")
def test_tokens_numpy(benchmark: Any, toks: list[np.ndarray[Any, Any]]) -> None:
    benchmark(numpy_pad_and_stack, toks)


@pytest.mark.benchmark(group="1000 x torch float32[16]")
def test_torch_beam_turbo(benchmark: Any, small: list[np.ndarray[Any, Any]]) -> None:
    torch = pytest.importorskip("torch")
    tensors = [torch.from_numpy(a) for a in small]
    benchmark(beam_turbo.stack, tensors)


@pytest.mark.benchmark(group="1000 x torch float32[16]")
def test_torch_beam_turbo_reused_out(benchmark: Any, small: list[np.ndarray[Any, Any]]) -> None:
    torch = pytest.importorskip("torch")
    tensors = [torch.from_numpy(a) for a in small]
    out = torch.empty((len(tensors), 16))
    benchmark(lambda: beam_turbo.stack(tensors, out=out))


@pytest.mark.benchmark(group="1000 x torch float32[16]")
def test_torch_stack(benchmark: Any, small: list[np.ndarray[Any, Any]]) -> None:
    torch = pytest.importorskip("torch")
    tensors = [torch.from_numpy(a) for a in small]
    benchmark(torch.stack, tensors)
