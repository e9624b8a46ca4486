"""Prepared user features: built once from user.parquet, reused while it is unchanged."""

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recommender.dataset.prepared import PreparedUsers, load_prepared_users
from recommender.dataset.reader import DataError, Skipped

N_FEATURES = 3
FLOAT32 = pa.float32()


def write_users(
    path: Path,
    ids: list[str | None],
    features: np.ndarray,
    feature_types: pa.DataType | list[pa.DataType] = FLOAT32,
    nulls: Iterable[tuple[int, int]] = (),
    **write_options,
) -> Path:
    """Write a user file; ``nulls`` holds the (row, feature) cells written as null."""
    n_features = features.shape[1]
    if isinstance(feature_types, pa.DataType):
        feature_types = [feature_types] * n_features
    null_cells = set(nulls)
    columns = {"user_id": pa.array(ids, pa.string())}
    for j, feature_type in enumerate(feature_types):
        mask = np.array([(i, j) in null_cells for i in range(len(ids))], dtype=bool)
        columns[f"feature_{j}"] = pa.array(features[:, j], feature_type, mask=mask)
    pq.write_table(pa.table(columns), path, **write_options)
    return path


def random_features(n_users: int, seed: int = 0, n_features: int = N_FEATURES) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n_users, n_features))


def prepare(source: Path, n_features: int = N_FEATURES, **options) -> tuple[PreparedUsers, bool]:
    return load_prepared_users(source, source.parent / "prepared", n_features, **options)


def prepared_files(source: Path) -> dict[str, int]:
    """Every file of the prepared directory, with its modification time in nanoseconds."""
    prepared_dir = source.parent / "prepared"
    return {
        path.name: path.stat().st_mtime_ns
        for path in prepared_dir.iterdir()
        if path.name != ".lock"
    }


def assert_reported(report: Skipped, count: int, named: list[str]) -> None:
    """``report`` counts ``count`` rows and its examples name ``named``, in file order."""
    assert report.count == count
    assert len(report.examples) == len(named)
    for example, name in zip(report.examples, named, strict=True):
        assert name in example


class Interrupted(Exception):
    """Stands for a process stopped half-way through preparing."""


def interrupt(message: str) -> None:
    raise Interrupted(message)


def test_float32_features_stay_float32_in_the_prepared_matrix(tmp_path: Path) -> None:
    source = write_users(tmp_path / "user.parquet", ["a", "b"], random_features(2))

    users, _ = prepare(source)

    assert users.features.dtype == np.float32


@pytest.mark.parametrize(
    "feature_types",
    [
        pa.float64(),
        [pa.float32(), pa.float64(), pa.float32()],
        pa.int64(),
    ],
    ids=["float64", "float32-and-float64", "int64"],
)
def test_features_of_any_other_type_are_prepared_as_float64(
    tmp_path: Path, feature_types: pa.DataType | list[pa.DataType]
) -> None:
    features = np.round(random_features(2) * 100)
    source = write_users(tmp_path / "user.parquet", ["a", "b"], features, feature_types)

    users, _ = prepare(source)

    assert users.features.dtype == np.float64


@pytest.mark.parametrize("feature_type", [pa.float32(), pa.float64()])
def test_each_prepared_row_equals_its_source_row(tmp_path: Path, feature_type: pa.DataType) -> None:
    features = random_features(5)
    source = write_users(
        tmp_path / "user.parquet", ["a", "b", "c", "d", "e"], features, feature_type
    )

    users, _ = prepare(source)

    assert users.ids.tolist() == ["a", "b", "c", "d", "e"]
    expected = features.astype(feature_type.to_pandas_dtype())
    np.testing.assert_array_equal(users.features, expected)


def test_the_prepared_matrix_is_read_only(tmp_path: Path) -> None:
    source = write_users(tmp_path / "user.parquet", ["a"], random_features(1))

    users, _ = prepare(source)

    assert not users.features.flags.writeable


def test_a_user_without_an_id_is_skipped_and_named_by_its_row(tmp_path: Path) -> None:
    features = random_features(3)
    source = write_users(tmp_path / "user.parquet", ["a", None, "c"], features)

    users, _ = prepare(source)

    assert users.ids.tolist() == ["a", "c"]
    np.testing.assert_array_equal(users.features, features[[0, 2]].astype(np.float32))
    [report] = users.skipped
    assert_reported(report, 1, ["row 1"])


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, None])
def test_a_user_with_a_missing_or_non_finite_feature_is_skipped(
    tmp_path: Path, value: float | None
) -> None:
    features = random_features(3)
    nulls = []
    if value is None:
        nulls = [(1, 2)]
    else:
        features[1, 2] = value
    source = write_users(tmp_path / "user.parquet", ["a", "b", "c"], features, nulls=nulls)

    users, _ = prepare(source)

    assert users.ids.tolist() == ["a", "c"]
    [report] = users.skipped
    assert_reported(report, 1, ["'b'"])


def test_a_repeated_user_id_is_skipped_and_the_first_row_is_kept(tmp_path: Path) -> None:
    features = random_features(3)
    source = write_users(tmp_path / "user.parquet", ["a", "b", "a"], features)

    users, _ = prepare(source)

    assert users.ids.tolist() == ["a", "b"]
    np.testing.assert_array_equal(users.features[0], features[0].astype(np.float32))
    [report] = users.skipped
    assert_reported(report, 1, ["'a' (row 2)"])


def test_rows_after_skipped_rows_stay_with_their_ids_however_long_the_file(
    tmp_path: Path,
) -> None:
    # Long enough to be read in several batches; feature_0 holds each row's number.
    n_rows = 2 * 8192 + 10
    ids = [f"u{row}" for row in range(n_rows)]
    features = np.arange(n_rows, dtype=np.float64)[:, np.newaxis]
    ids[5] = None
    features[8200, 0] = math.nan
    ids[16390] = "u3"
    source = write_users(tmp_path / "user.parquet", ids, features, pa.float64())

    users, _ = prepare(source, n_features=1)

    kept = np.setdiff1d(np.arange(n_rows), [5, 8200, 16390])
    assert users.ids.tolist() == [f"u{row}" for row in kept]
    np.testing.assert_array_equal(users.features[:, 0], kept.astype(np.float64))
    missing, not_finite, repeated = users.skipped
    assert_reported(missing, 1, ["row 5"])
    assert_reported(not_finite, 1, ["'u8200' (row 8200)"])
    assert_reported(repeated, 1, ["'u3' (row 16390)"])


def test_skipped_users_are_counted_in_full_but_only_a_few_are_named(tmp_path: Path) -> None:
    ids = [None] * 9 + ["a"]
    source = write_users(tmp_path / "user.parquet", ids, random_features(10))

    users, _ = prepare(source)

    [report] = users.skipped
    assert_reported(report, 9, ["row 0", "row 1", "row 2", "row 3", "row 4"])


def test_the_first_load_prepares_the_user_features(tmp_path: Path) -> None:
    source = write_users(tmp_path / "user.parquet", ["a"], random_features(1))

    _, prepared = prepare(source)

    assert prepared


def test_a_second_load_reuses_the_prepared_files_without_rewriting_them(tmp_path: Path) -> None:
    source = write_users(tmp_path / "user.parquet", ["a", "b"], random_features(2))
    prepare(source)
    before = prepared_files(source)

    users, prepared = prepare(source)

    assert not prepared
    assert prepared_files(source) == before
    assert users.ids.tolist() == ["a", "b"]


def test_a_reused_preparation_reports_the_same_skipped_rows(tmp_path: Path) -> None:
    source = write_users(tmp_path / "user.parquet", ["a", None, "a"], random_features(3))
    first, _ = prepare(source)

    second, _ = prepare(source)

    assert second.skipped == first.skipped


def test_a_changed_user_file_is_prepared_again(tmp_path: Path) -> None:
    source = write_users(tmp_path / "user.parquet", ["a", "b"], random_features(2))
    prepare(source)
    changed = random_features(3, seed=1)
    write_users(source, ["c", "d", "e"], changed)

    users, prepared = prepare(source)

    assert prepared
    assert users.ids.tolist() == ["c", "d", "e"]
    np.testing.assert_array_equal(users.features, changed.astype(np.float32))


def test_a_user_file_changed_without_changing_size_or_modification_time_is_prepared_again(
    tmp_path: Path,
) -> None:
    # Copies that keep timestamps (rsync -t, tar, cp -p) or tools that normalise them can
    # replace the features of the same users with a file of the same size and time.
    source = write_users(
        tmp_path / "user.parquet", ["a", "b"], random_features(2), compression="none"
    )
    status = source.stat()
    prepare(source)
    changed = random_features(2, seed=1)
    write_users(source, ["a", "b"], changed, compression="none")
    os.utime(source, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert source.stat().st_size == status.st_size

    users, prepared = prepare(source)

    assert prepared
    np.testing.assert_array_equal(users.features, changed.astype(np.float32))


def test_preparing_again_removes_the_previous_prepared_files(tmp_path: Path) -> None:
    source = write_users(tmp_path / "user.parquet", ["a", "b"], random_features(2))
    prepare(source)
    before = set(prepared_files(source))
    write_users(source, ["c", "d", "e"], random_features(3, seed=1))

    prepare(source)

    after = set(prepared_files(source))
    assert len(after) == len(before)
    assert after & before == {"users.json"}


def test_features_mapped_before_preparing_again_keep_their_values(tmp_path: Path) -> None:
    features = random_features(2)
    source = write_users(tmp_path / "user.parquet", ["a", "b"], features)
    first, _ = prepare(source)
    write_users(source, ["a", "b", "c"], random_features(3, seed=1))

    prepare(source)

    np.testing.assert_array_equal(first.features, features.astype(np.float32))


def test_an_interrupted_preparation_leaves_the_previous_one_in_place(tmp_path: Path) -> None:
    features = random_features(2)
    source = write_users(tmp_path / "user.parquet", ["a", "b"], features)
    prepare(source)
    write_users(source, ["c", "d", "e"], random_features(3, seed=1))

    with pytest.raises(Interrupted):
        prepare(source, progress=interrupt)

    prepared_dir = tmp_path / "prepared"
    manifest = json.loads((prepared_dir / "users.json").read_text())
    matrix = np.load(prepared_dir / manifest["features"])[: manifest["n_users"]]
    np.testing.assert_array_equal(matrix, features.astype(np.float32))
    assert np.load(prepared_dir / manifest["ids"]).tolist() == ["a", "b"]


def test_preparing_removes_files_left_by_an_interrupted_preparation(tmp_path: Path) -> None:
    source = write_users(tmp_path / "user.parquet", ["a", "b"], random_features(2))
    with pytest.raises(Interrupted):
        prepare(source, progress=interrupt)

    prepare(source)

    assert sorted(Path(name).suffix for name in prepared_files(source)) == [".json", ".npy", ".npy"]


def test_a_preparation_overlapping_another_still_maps_complete_features(tmp_path: Path) -> None:
    # Two servers starting at once on one data directory prepare into the same place; the
    # other one starts here, as a separate process, half-way through this one's preparation.
    features = random_features(2)
    source = write_users(tmp_path / "user.parquet", ["a", "b"], features)
    script = (
        "import sys, numpy as np\n"
        "from pathlib import Path\n"
        "from recommender.dataset.prepared import load_prepared_users\n"
        "source = Path(sys.argv[1])\n"
        "users, _ = load_prepared_users(source, source.parent / 'prepared', 3)\n"
        "np.save(sys.argv[2], np.asarray(users.features))\n"
    )
    seen_by_other = tmp_path / "other.npy"
    others: list[subprocess.Popen] = []

    def start_another(message: str) -> None:
        if not others:
            command = [sys.executable, "-c", script, str(source), str(seen_by_other)]
            others.append(subprocess.Popen(command))

    users, _ = prepare(source, progress=start_another)
    assert others[0].wait(timeout=120) == 0

    np.testing.assert_array_equal(users.features, features.astype(np.float32))
    np.testing.assert_array_equal(np.load(seen_by_other), features.astype(np.float32))


def test_features_prepared_for_another_number_of_features_are_not_reused(tmp_path: Path) -> None:
    source = write_users(tmp_path / "user.parquet", ["a"], random_features(1))
    prepare(source, n_features=N_FEATURES)

    with pytest.raises(DataError, match="user.parquet"):
        prepare(source, n_features=N_FEATURES + 1)


@pytest.mark.parametrize("damage", ["garbled manifest", "missing matrix"])
def test_an_unusable_preparation_is_prepared_again(tmp_path: Path, damage: str) -> None:
    features = random_features(2)
    source = write_users(tmp_path / "user.parquet", ["a", "b"], features)
    prepare(source)
    prepared_dir = tmp_path / "prepared"
    if damage == "garbled manifest":
        (prepared_dir / "users.json").write_text("{not json")
    else:
        manifest = json.loads((prepared_dir / "users.json").read_text())
        (prepared_dir / manifest["features"]).unlink()

    users, prepared = prepare(source)

    assert prepared
    np.testing.assert_array_equal(users.features, features.astype(np.float32))


def test_a_missing_user_file_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="user.parquet"):
        prepare(tmp_path / "user.parquet")


def test_a_user_file_that_is_not_parquet_is_refused_naming_it(tmp_path: Path) -> None:
    source = tmp_path / "user.parquet"
    source.write_text("user_id,feature_0,feature_1,feature_2\na,1,2,3\n")

    with pytest.raises(DataError, match="user.parquet"):
        prepare(source)


def test_a_user_with_a_feature_too_large_to_square_is_skipped(tmp_path: Path) -> None:
    features = random_features(2)
    features[1, 0] = 1e200
    source = write_users(
        tmp_path / "user.parquet", ["a", "b"], features, feature_types=pa.float64()
    )

    users, _ = prepare(source)

    assert users.ids.tolist() == ["a"]
    assert_reported(users.skipped[0], 1, ["'b'"])
