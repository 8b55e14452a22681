"""MobileNetV2 on images end to end: ``--framework mobilenet``.

torchvision's ``mobilenet_v2`` with random weights (seeded, saved as a state dict) classifies
224x224 RGB images made in the pipeline as JPEG bytes (smooth colour fields with noise,
seeded) and decoded there (``beam.Map``) into normalized float32 tensors of (3, 224, 224), as
a pipeline reading images would. Stock Beam's ``PytorchModelHandlerTensor`` and
``RunInference`` against beam-turbo's, both with their default batching.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Iterator, Sequence
from typing import Any

import apache_beam as beam
import numpy as np

from beam_turbo.bench._outputs import write_or_count
from beam_turbo.bench.real_models import (
    RealModel,
    Variant,
    best_rate,
    keyed_elements,
    turbo_inference,
)

CHUNK = 16  # images generated per seed
SIDE = 224
# ImageNet's channel means and deviations, as torchvision's models expect their input.
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def jpeg_images(seed: int, count: int = CHUNK) -> list[bytes]:
    """``count`` JPEG-encoded 224x224 RGB images from ``seed``: a 7x7 field of random colours
    stretched smooth, with pixel noise.

    Example:
        >>> images = jpeg_images(0, 2)
        >>> images == jpeg_images(0, 2), images[0][:2] == b"\\xff\\xd8", images[0] != images[1]
        (True, True, True)
    """
    from PIL import Image

    rng = np.random.default_rng([seed, 3])
    made = []
    for _ in range(count):
        field = Image.fromarray(rng.integers(0, 256, (7, 7, 3), dtype=np.uint8))
        smooth = np.asarray(field.resize((SIDE, SIDE), Image.Resampling.BILINEAR), np.int16)
        noisy = np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8)
        encoded = io.BytesIO()
        Image.fromarray(noisy).save(encoded, format="JPEG", quality=90)
        made.append(encoded.getvalue())
    return made


def _images_iter(seed: int) -> Iterator[bytes]:
    return iter(jpeg_images(seed))


def decode(keyed: tuple[int, bytes]) -> tuple[int, Any]:
    """``(id, JPEG bytes)`` to ``(id, float32 tensor (3, 224, 224))``, normalized with
    ImageNet's means and deviations (torchvision's ``ToTensor`` and ``Normalize``)."""
    import torch
    from PIL import Image

    key, encoded = keyed
    with Image.open(io.BytesIO(encoded)) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    normalized = (pixels / 255.0 - MEAN) / STD
    return key, torch.from_numpy(np.ascontiguousarray(normalized.transpose(2, 0, 1)))


def logits(keyed: tuple[int, Any]) -> tuple[int, np.ndarray[Any, Any]]:
    """The 1,000 class scores of one result, as numpy."""
    key, result = keyed
    return key, result.inference.cpu().numpy()


def bare(spec: dict[str, Any], chunks: list[int], batch_sizes: Sequence[int]) -> dict[str, float]:
    """The model alone on the images of ``chunks``, decoded beforehand: one at a time
    (``"1"``), and stacked in batches of each of ``batch_sizes``."""
    import torch
    import torchvision

    device = spec.get("device", "cpu")
    model = torchvision.models.mobilenet_v2(weights=None)
    model.load_state_dict(torch.load(spec["state_dict_path"]))
    model.eval().to(device)
    images = [decode((0, image))[1] for seed in chunks for image in jpeg_images(seed)]

    def run(inputs: list[Any]) -> None:
        with torch.no_grad():
            for batch in inputs:
                model(batch.to(device))  # on a GPU, the host-to-device copy counts
        if device != "cpu":
            torch.cuda.synchronize()

    rates = {}
    for size in (1, *batch_sizes):
        batches = [torch.stack(images[i : i + size]) for i in range(0, len(images), size)]
        rates[str(size)] = best_rate(functools.partial(run, batches), len(images))
    return rates


def prepare(folder: str) -> dict[str, Any]:
    """MobileNetV2 with random weights (seeded), its batch-norm statistics taken from 64
    generated images (seeds the pipelines do not use), saved as a state dict in ``folder``.

    Without the statistics, the scores of random weights are about 1e-9 and any tolerance
    passes; with them, they are about 0.1-1, as a trained model's logits.
    """
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None)
    for layer in model.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.momentum = None  # a plain average over the batches below
    model.train()
    with torch.no_grad():
        for seed in range(1_000, 1_000 + 64 // CHUNK):
            model(torch.stack([decode((0, image))[1] for image in jpeg_images(seed)]))
    path = os.path.join(folder, "mobilenet_v2.pt")
    torch.save(model.eval().state_dict(), path)
    return {"state_dict_path": path}


def build(
    pipeline: Any, spec: dict[str, Any], variant: Variant, chunks: list[int], output: str | None
) -> None:
    import torchvision
    from apache_beam.ml.inference import base

    handler_args: dict[str, Any] = {
        "state_dict_path": spec["state_dict_path"],
        "model_class": torchvision.models.mobilenet_v2,
        "model_params": {"weights": None},
        "device": "GPU" if spec.get("device") == "cuda" else "CPU",  # Beam's names
    }
    images = (
        pipeline
        | "Seeds" >> beam.Create(list(enumerate(chunks)))
        | "Generate" >> beam.FlatMap(keyed_elements(CHUNK, _images_iter))
        | "Decode" >> beam.Map(decode)
    )
    if variant.turbo:
        from beam_turbo.pytorch import PytorchModelHandlerTensor

        handler = base.KeyedModelHandler(PytorchModelHandlerTensor(**handler_args))
        results = images | "RunInference" >> turbo_inference(handler, variant)
    else:
        from apache_beam.ml.inference import pytorch_inference

        stock = pytorch_inference.PytorchModelHandlerTensor(**handler_args)
        results = images | "RunInference" >> base.RunInference(base.KeyedModelHandler(stock))
    scores = results | "Logits" >> beam.Map(logits)
    write_or_count(scores, output)


MODEL = RealModel(
    title="MobileNetV2 (random weights) on 224x224 JPEG images decoded in the pipeline",
    unit="images",
    chunk=CHUNK,
    variants=(
        Variant("stock", "Beam"),
        Variant("turbo", "beam-turbo", turbo=True),
    ),
    demo_variants=("stock", "turbo"),
    goals={"stock": 1.0},
    sizes={"full": (32, 160), "quick": (16, 48)},
    rtol=1e-4,
    atol=1e-5,
    prepare=prepare,
    build=build,
    bare=bare,
)
