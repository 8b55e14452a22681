"""``beam-turbo bench tabular``: its output check here, and quick runs of the variants that need
no pyspark, end to end, each variant in a worker process."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import beam_turbo
from beam_turbo import cli
from beam_turbo.bench import tabular


def _write(folder: Path, ids: list[int], predictions: list[float]) -> str:
    os.makedirs(folder, exist_ok=True)
    table = pa.table({"id": pa.array(ids, pa.int64()), "prediction": predictions})
    pq.write_table(table, folder / "part-00000.parquet")
    return str(folder)


def test_check_output_finds_lost_repeated_and_wrong_rows(tmp_path: Path) -> None:
    expected = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    good = tabular.check_output(
        _write(tmp_path / "good", [3, 1, 0, 2], [4.0, 2.0, 1.0, 3.00001]), expected
    )
    assert (good.rows, good.problem) == (4, None)
    assert good.max_abs_diff == pytest.approx(1e-5)
    lost = tabular.check_output(_write(tmp_path / "lost", [0, 1, 2], [1.0, 2.0, 3.0]), expected)
    assert lost.problem is not None
    assert "1 lost" in lost.problem
    repeated = [0, 1, 2, 2, 3], [1.0, 2.0, 3.0, 3.0, 4.0]
    twice = tabular.check_output(_write(tmp_path / "twice", *repeated), expected)
    assert twice.problem is not None
    assert "1 repeated" in twice.problem
    shifted = tabular.check_output(
        _write(tmp_path / "shifted", [0, 1, 2, 3], [2, 1, 3, 4]), expected
    )
    assert shifted.problem is not None
    assert "2 predictions differ" in shifted.problem
    empty = tabular.check_output(str(tmp_path / "nothing"), expected)
    assert empty.problem is not None
    assert "no Parquet files" in empty.problem


def test_inputs_are_eight_seeded_files_of_id_and_features(tmp_path: Path) -> None:
    def predict(x: np.ndarray) -> np.ndarray:
        return np.asarray(x.sum(axis=1))

    expected = tabular.write_inputs(str(tmp_path / "a"), 1_000, 7, predict)
    again = tabular.write_inputs(str(tmp_path / "b"), 1_000, 7, predict)
    np.testing.assert_array_equal(expected, again)
    files = sorted(os.listdir(tmp_path / "a"))
    assert len(files) == tabular.FILES
    table = pq.read_table(tmp_path / "a")
    assert table.schema.names == ["id", *tabular.FEATURES]
    assert table.schema.field("f0").type == pa.float32()
    ids = table.column("id").to_numpy()
    np.testing.assert_array_equal(np.sort(ids), np.arange(1_000))
    features = np.column_stack([table.column(f).to_numpy() for f in tabular.FEATURES])
    np.testing.assert_allclose(predict(features), expected[ids])


def test_inputs_in_row_groups_of_the_size_asked(tmp_path: Path) -> None:
    """--row-group: a Beam reader's table is a row group, so a fixed one keeps the tables the
    same size at every dataset size."""
    tabular.write_inputs(str(tmp_path), 1_000, 7, lambda x: x.sum(axis=1), row_group=50)
    for name in sorted(os.listdir(tmp_path)):
        metadata = pq.ParquetFile(tmp_path / name).metadata
        assert metadata.num_rows == 125
        groups = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        assert groups == [50, 50, 25], (name, groups)


def _quick(capsys: pytest.CaptureFixture[str], *variants: str) -> tuple[int, str]:
    argv = ["bench", "tabular", "--quick", "--sizes", "2000", "6000", "--variants", *variants]
    code = cli.main(argv)
    return code, capsys.readouterr().out


def test_quick_run_checks_every_variants_output(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _quick(capsys, "stock", "patched", "turbo", "plain", "arrow")
    assert code == 0, out
    ran = ["stock", "patched", "plain", "arrow"]
    if hasattr(beam_turbo.RunInference, "with_tables"):
        ran.append("turbo")
    else:
        assert "turbo: not available: RunInference has no with_tables" in out
    for name in ran:
        # The warm-up, the small and the large run: 2,000 + 2,000 + 6,000 rows, each checked.
        assert re.search(rf"^  {name}: verified, 3 runs, 10,000 rows", out, re.MULTILINE), out
        assert re.search(rf"^\| {name}: .* \| 2,000, 6,000 \|$", out, re.MULTILINE), out
    assert "FAILED" not in out
    # A scikit-learn model: beam-turbo's pipelines import no other framework; stock Beam's
    # imports torch (its inference module does, where torch is installed).
    for name in ("patched", "turbo", "plain", "arrow"):
        assert re.search(rf"^  {name}: verified, .*; frameworks imported: none$", out, re.M), out
    if importlib.util.find_spec("torch") is not None:
        assert re.search(r"^  stock: verified, .*; frameworks imported: torch$", out, re.M), out


def test_a_wrong_prediction_fails_the_command(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_inputs = tabular.write_inputs

    def off_by_one_for_id_5(*args: object, **kwargs: object) -> np.ndarray:
        expected = np.asarray(write_inputs(*args, **kwargs))  # type: ignore[arg-type]
        expected[5] += 1
        return expected

    monkeypatch.setattr(tabular, "write_inputs", off_by_one_for_id_5)
    code, out = _quick(capsys, "arrow")
    assert code == 1, out
    assert "arrow: FAILED" in out
    assert "1 predictions differ from predict's, e.g. id 5" in out
