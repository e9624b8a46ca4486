"""Reading restaurant.parquet and user.parquet: rows kept, skipped and reported, files refused."""

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recommender.dataset.reader import DataError, Skipped, iter_user_batches, read_restaurants

N_MODEL_ROWS = 3


def restaurant_columns(n: int = N_MODEL_ROWS) -> dict[str, list]:
    """Columns of ``n`` servable restaurants ``r00``, ``r01``, ... with string coordinates."""
    return {
        "restaurant_id": [f"r{i:02d}" for i in range(n)],
        "index": list(range(n)),
        "latitude": [f"{13.75 + i / 1000:.6f}" for i in range(n)],
        "longitude": [f"{100.5 + i / 1000:.6f}" for i in range(n)],
    }


def write_table(path: Path, columns: dict[str, list | pa.Array]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def read(path: Path, n_model_rows: int = N_MODEL_ROWS):
    return read_restaurants(path, n_model_rows)


def assert_reported(report: Skipped, count: int, named: list[str]) -> None:
    """``report`` counts ``count`` rows and its examples name ``named``, in file order."""
    assert report.count == count
    assert len(report.examples) == len(named)
    for example, name in zip(report.examples, named, strict=True):
        assert name in example


def test_string_coordinates_are_read_as_degrees(tmp_path: Path) -> None:
    columns = restaurant_columns(2)
    columns["latitude"] = ["13.756331", "-33.868820"]
    columns["longitude"] = ["100.501762", "151.209290"]

    restaurants, _ = read(write_table(tmp_path / "restaurant.parquet", columns))

    assert restaurants.latitude.tolist() == [13.756331, -33.868820]
    assert restaurants.longitude.tolist() == [100.501762, 151.209290]


@pytest.mark.parametrize(
    ("coordinate_type", "latitude", "longitude"),
    [
        (pa.float64(), [13.756331, -33.86882], [100.501762, 151.20929]),
        (pa.float32(), [13.5, -33.75], [100.25, 151.125]),
        (pa.int64(), [13, -33], [100, 151]),
    ],
)
def test_numeric_coordinates_are_read_as_degrees(
    tmp_path: Path, coordinate_type: pa.DataType, latitude: list, longitude: list
) -> None:
    columns = restaurant_columns(2)
    columns["latitude"] = pa.array(latitude, coordinate_type)
    columns["longitude"] = pa.array(longitude, coordinate_type)

    restaurants, skipped = read(write_table(tmp_path / "restaurant.parquet", columns))

    assert skipped == []
    assert restaurants.latitude.dtype == np.float64
    assert restaurants.latitude.tolist() == [float(value) for value in latitude]
    assert restaurants.longitude.tolist() == [float(value) for value in longitude]


def test_kept_restaurants_keep_their_ids_and_model_rows_in_file_order(tmp_path: Path) -> None:
    columns = restaurant_columns()
    columns["index"] = [2, 0, 1]

    restaurants, _ = read(write_table(tmp_path / "restaurant.parquet", columns))

    assert restaurants.ids.tolist() == ["r00", "r01", "r02"]
    assert restaurants.rows.tolist() == [2, 0, 1]
    assert restaurants.rows.dtype == np.int64


def test_a_file_without_faults_reports_no_skipped_rows(tmp_path: Path) -> None:
    restaurants, skipped = read(write_table(tmp_path / "restaurant.parquet", restaurant_columns()))

    assert len(restaurants) == N_MODEL_ROWS
    assert skipped == []


def test_coordinates_on_the_edges_of_the_valid_range_are_kept(tmp_path: Path) -> None:
    columns = restaurant_columns(4)
    columns["latitude"] = ["90", "-90", "0", "0"]
    columns["longitude"] = ["0", "0", "180", "-180"]

    restaurants, skipped = read(write_table(tmp_path / "restaurant.parquet", columns), 4)

    assert skipped == []
    assert len(restaurants) == 4


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("latitude", "north"),
        ("longitude", ""),
        ("latitude", None),
        ("latitude", "nan"),
        ("longitude", "inf"),
        ("latitude", "1e999"),
        ("latitude", "90.000001"),
        ("longitude", "-180.000001"),
    ],
)
def test_a_restaurant_whose_string_coordinates_cannot_be_used_is_skipped(
    tmp_path: Path, column: str, value: str | None
) -> None:
    columns = restaurant_columns()
    columns[column][1] = value

    restaurants, skipped = read(write_table(tmp_path / "restaurant.parquet", columns))

    assert restaurants.ids.tolist() == ["r00", "r02"]
    [report] = skipped
    assert_reported(report, 1, ["r01"])


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("latitude", math.nan),
        ("longitude", math.inf),
        ("latitude", -math.inf),
        ("longitude", None),
        ("latitude", 91.0),
        ("longitude", 181.0),
    ],
)
def test_a_restaurant_whose_numeric_coordinates_cannot_be_used_is_skipped(
    tmp_path: Path, column: str, value: float | None
) -> None:
    columns = restaurant_columns()
    columns["latitude"] = [float(value) for value in columns["latitude"]]
    columns["longitude"] = [float(value) for value in columns["longitude"]]
    columns[column][1] = value
    columns[column] = pa.array(columns[column], pa.float64())

    restaurants, skipped = read(write_table(tmp_path / "restaurant.parquet", columns))

    assert restaurants.ids.tolist() == ["r00", "r02"]
    [report] = skipped
    assert_reported(report, 1, ["r01"])


@pytest.mark.parametrize("index", [-1, N_MODEL_ROWS, None, 1.5])
def test_a_restaurant_whose_index_is_not_a_model_row_is_skipped(
    tmp_path: Path, index: float | None
) -> None:
    columns = restaurant_columns()
    columns["index"][1] = index

    restaurants, skipped = read(write_table(tmp_path / "restaurant.parquet", columns))

    assert restaurants.ids.tolist() == ["r00", "r02"]
    [report] = skipped
    assert_reported(report, 1, ["r01"])


def test_a_restaurant_without_an_id_is_skipped_and_named_by_its_row(tmp_path: Path) -> None:
    columns = restaurant_columns()
    columns["restaurant_id"][1] = None

    restaurants, skipped = read(write_table(tmp_path / "restaurant.parquet", columns))

    assert restaurants.ids.tolist() == ["r00", "r02"]
    [report] = skipped
    assert_reported(report, 1, ["row 1"])


def test_a_restaurant_repeating_an_earlier_id_is_skipped_and_the_first_is_kept(
    tmp_path: Path,
) -> None:
    columns = restaurant_columns()
    columns["restaurant_id"][2] = "r00"

    restaurants, skipped = read(write_table(tmp_path / "restaurant.parquet", columns))

    assert restaurants.ids.tolist() == ["r00", "r01"]
    assert restaurants.latitude[0] == float(columns["latitude"][0])
    [report] = skipped
    assert_reported(report, 1, ["'r00' (row 2)"])


def test_each_reason_is_reported_separately_with_its_own_count(tmp_path: Path) -> None:
    columns = restaurant_columns(8)
    columns["restaurant_id"][1] = None
    columns["latitude"][2] = "x"
    columns["latitude"][3] = "y"
    columns["index"][4] = 99
    columns["restaurant_id"][5:8] = ["r00", "r00", "r00"]

    restaurants, skipped = read(write_table(tmp_path / "restaurant.parquet", columns), 8)

    assert restaurants.ids.tolist() == ["r00"]
    assert [report.count for report in skipped] == [1, 2, 1, 3]
    assert len({report.reason for report in skipped}) == 4


def test_a_row_with_several_faults_is_counted_once(tmp_path: Path) -> None:
    columns = restaurant_columns()
    columns["restaurant_id"][1] = None
    columns["latitude"][1] = "x"
    columns["index"][1] = -1

    _, skipped = read(write_table(tmp_path / "restaurant.parquet", columns))

    assert sum(report.count for report in skipped) == 1


def test_every_skipped_row_is_counted_but_only_the_first_few_are_named(tmp_path: Path) -> None:
    columns = restaurant_columns(14)
    columns["latitude"][2:14] = ["x"] * 12

    _, skipped = read(write_table(tmp_path / "restaurant.parquet", columns), 14)

    [report] = skipped
    assert_reported(report, 12, ["r02", "r03", "r04", "r05", "r06"])


def test_a_skip_report_reads_as_one_line_naming_the_file_the_count_and_examples(
    tmp_path: Path,
) -> None:
    columns = restaurant_columns(14)
    columns["latitude"][2:14] = ["x"] * 12

    _, [report] = read(write_table(tmp_path / "restaurant.parquet", columns), 14)
    line = str(report)

    assert "\n" not in line
    assert "restaurant.parquet" in line
    assert "12" in line
    assert all(example in line for example in report.examples)


def test_a_missing_restaurant_file_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="restaurant.parquet"):
        read(tmp_path / "restaurant.parquet")


def test_a_restaurant_file_that_is_not_parquet_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "restaurant.parquet"
    path.write_text("restaurant_id,index,latitude,longitude\nr00,0,13.75,100.5\n")

    with pytest.raises(DataError, match="restaurant.parquet"):
        read(path)


@pytest.mark.parametrize("missing", ["restaurant_id", "index", "latitude", "longitude"])
def test_a_restaurant_file_missing_a_column_is_refused_naming_the_file_and_the_column(
    tmp_path: Path, missing: str
) -> None:
    columns = restaurant_columns()
    del columns[missing]
    path = write_table(tmp_path / "restaurant.parquet", columns)

    with pytest.raises(DataError, match="restaurant.parquet") as raised:
        read(path)

    assert missing in str(raised.value).removeprefix(str(path))


def user_columns(n_features: int, names: list[str] | None = None) -> dict[str, list]:
    """Two users ``a`` and ``b``; feature ``j`` of user ``i`` is ``10 * i + j``."""
    names = names if names is not None else [f"feature_{j}" for j in range(n_features)]
    columns: dict[str, list] = {"user_id": ["a", "b"]}
    for j, name in enumerate(names):
        columns[name] = [float(j), float(10 + j)]
    return columns


def read_users(path: Path, n_features: int) -> np.ndarray:
    return np.vstack([batch.features for batch in iter_user_batches(path, n_features)])


def test_user_features_are_read_in_feature_order_whatever_the_column_order(
    tmp_path: Path,
) -> None:
    columns = user_columns(3)
    shuffled = {name: columns[name] for name in ["feature_2", "user_id", "feature_0", "feature_1"]}
    path = write_table(tmp_path / "user.parquet", shuffled)

    assert read_users(path, 3).tolist() == [[0.0, 1.0, 2.0], [10.0, 11.0, 12.0]]


def test_a_user_file_without_user_id_is_refused_naming_it(tmp_path: Path) -> None:
    columns = user_columns(3)
    del columns["user_id"]
    path = write_table(tmp_path / "user.parquet", columns)

    with pytest.raises(DataError, match="user.parquet.*user_id"):
        read_users(path, 3)


@pytest.mark.parametrize("n_columns", [2, 4])
def test_a_user_file_with_another_number_of_features_is_refused_saying_both(
    tmp_path: Path, n_columns: int
) -> None:
    path = write_table(tmp_path / "user.parquet", user_columns(n_columns))

    with pytest.raises(DataError, match="user.parquet") as raised:
        read_users(path, 3)

    message = str(raised.value).removeprefix(str(path))
    assert str(n_columns) in message
    assert "3" in message


def test_a_gap_in_the_feature_columns_is_refused_naming_the_missing_column(
    tmp_path: Path,
) -> None:
    names = ["feature_0", "feature_2", "feature_3", "feature_4"]
    path = write_table(tmp_path / "user.parquet", user_columns(4, names))

    with pytest.raises(DataError, match="user.parquet") as raised:
        read_users(path, 4)

    assert "feature_1" in str(raised.value).removeprefix(str(path))


def test_a_non_numeric_feature_column_is_refused_naming_it(tmp_path: Path) -> None:
    columns = user_columns(3)
    columns["feature_1"] = ["one", "eleven"]
    path = write_table(tmp_path / "user.parquet", columns)

    with pytest.raises(DataError, match="user.parquet") as raised:
        read_users(path, 3)

    assert "feature_1" in str(raised.value).removeprefix(str(path))


@pytest.mark.parametrize("index", [-(2**63), 2**53 + 1, 2**62 + 7])
def test_an_index_too_large_for_any_model_is_skipped_not_a_crash(
    tmp_path: Path, index: int
) -> None:
    columns = restaurant_columns()
    columns["index"] = pa.array([0, 1, index], pa.int64())

    restaurants, skipped = read(write_table(tmp_path / "r.parquet", columns))

    assert list(restaurants.ids) == ["r00", "r01"]
    assert_reported(skipped[0], 1, ["r02"])


@pytest.mark.parametrize("text", ["1_3.8", "١٣.٨", "13,5", "0x10", "nan", "inf"])
def test_coordinates_that_are_not_plain_decimal_numbers_are_skipped(
    tmp_path: Path, text: str
) -> None:
    columns = restaurant_columns()
    columns["latitude"][1] = text

    restaurants, skipped = read(write_table(tmp_path / "r.parquet", columns))

    assert list(restaurants.ids) == ["r00", "r02"]
    assert_reported(skipped[0], 1, ["r01"])


@pytest.mark.parametrize("blank", ["", "   "])
def test_a_blank_restaurant_id_counts_as_missing(tmp_path: Path, blank: str) -> None:
    columns = restaurant_columns()
    columns["restaurant_id"][0] = blank

    restaurants, skipped = read(write_table(tmp_path / "r.parquet", columns))

    assert list(restaurants.ids) == ["r01", "r02"]
    assert skipped[0].reason == "restaurant_id is missing"


def test_a_column_of_an_unreadable_type_is_refused_naming_the_file_and_column(
    tmp_path: Path,
) -> None:
    columns = restaurant_columns()
    columns["latitude"] = pa.array([[1.0], [2.0], [3.0]], pa.list_(pa.float64()))

    with pytest.raises(DataError, match=r"r\.parquet.*'latitude'"):
        read(write_table(tmp_path / "r.parquet", columns))


def test_a_user_file_repeating_a_column_name_is_refused(tmp_path: Path) -> None:
    table = pa.Table.from_arrays(
        [pa.array(["a"]), pa.array([1.0]), pa.array([2.0])],
        names=["user_id", "feature_0", "feature_0"],
    )
    path = tmp_path / "user.parquet"
    pq.write_table(table, path)

    with pytest.raises(DataError, match="more than once"):
        list(iter_user_batches(path, 1))
