"""The synthetic generator writes the reference layout, deterministically, from valid arguments."""

import math
import pickle
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.neighbors import NearestNeighbors

import recommender.dataset.generate as generate_module
from recommender.dataset.generate import EMBEDDINGS_FILE, fit_model, generate

SMALL = {"n_users": 300, "n_restaurants": 200, "n_features": 16, "n_requests": 50}
FILES = (
    "restaurant.parquet",
    "user.parquet",
    "user.small.parquet",
    "model.pkl",
    "model.pkl.sha256",
    "request.parquet",
)
LATITUDE_RANGE = (13.68, 14.11)
LONGITUDE_RANGE = (100.30, 100.85)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("data")
    generate(out_dir, **SMALL, seed=7)
    return out_dir


def _user_features(table: pa.Table) -> np.ndarray:
    return np.column_stack(
        [table.column(f"feature_{j}").to_numpy() for j in range(SMALL["n_features"])]
    )


def _load_model(data_dir: Path) -> NearestNeighbors:
    with open(data_dir / "model.pkl", "rb") as file:
        return pickle.load(file)


def test_every_file_of_the_layout_is_written(data_dir: Path) -> None:
    assert sorted(path.name for path in data_dir.iterdir()) == sorted(FILES)


def test_out_dir_is_created_with_its_parents(tmp_path: Path) -> None:
    out_dir = tmp_path / "a" / "b"

    generate(out_dir, **SMALL)

    assert all((out_dir / name).is_file() for name in FILES)


def test_restaurant_file_has_the_reference_columns_and_types(data_dir: Path) -> None:
    schema = pq.read_schema(data_dir / "restaurant.parquet")

    assert schema.names == ["restaurant_id", "index", "latitude", "longitude"]
    assert schema.types == [pa.string(), pa.int64(), pa.string(), pa.string()]


def test_restaurant_ids_are_unique_zero_padded_to_one_width(data_dir: Path) -> None:
    ids = pq.read_table(data_dir / "restaurant.parquet").column("restaurant_id").to_pylist()

    assert len(set(ids)) == SMALL["n_restaurants"]
    assert all(re.fullmatch(r"r\d{3}", restaurant_id) for restaurant_id in ids)


def test_restaurant_index_is_a_permutation_not_the_file_order(data_dir: Path) -> None:
    index = pq.read_table(data_dir / "restaurant.parquet").column("index").to_numpy()

    assert sorted(index) == list(range(SMALL["n_restaurants"]))
    assert not np.array_equal(index, np.arange(SMALL["n_restaurants"]))


def test_restaurant_coordinates_are_six_decimal_strings_inside_the_bangkok_box(
    data_dir: Path,
) -> None:
    table = pq.read_table(data_dir / "restaurant.parquet")

    for name, (low, high) in (("latitude", LATITUDE_RANGE), ("longitude", LONGITUDE_RANGE)):
        values = table.column(name).to_pylist()
        assert all(re.fullmatch(r"\d+\.\d{6}", value) for value in values)
        assert all(low <= float(value) <= high for value in values)


def test_user_file_has_user_id_then_float32_features(data_dir: Path) -> None:
    schema = pq.read_schema(data_dir / "user.parquet")

    assert schema.names == ["user_id"] + [f"feature_{j}" for j in range(16)]
    assert schema.types == [pa.string()] + [pa.float32()] * 16


def test_user_ids_are_unique_zero_padded_to_one_width(data_dir: Path) -> None:
    ids = pq.read_table(data_dir / "user.parquet").column("user_id").to_pylist()

    assert len(set(ids)) == SMALL["n_users"]
    assert ids[0] == "u001"
    assert all(re.fullmatch(r"u\d{3}", user_id) for user_id in ids)


def test_small_user_file_is_the_first_hundred_users(data_dir: Path) -> None:
    users = pq.read_table(data_dir / "user.parquet")
    small = pq.read_table(data_dir / "user.small.parquet")

    assert small.equals(users.slice(0, 100))


def test_users_are_written_in_row_groups_without_changing_their_schema(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(generate_module, "USERS_PER_ROW_GROUP", 128)

    generate(tmp_path, **SMALL)

    metadata = pq.read_metadata(tmp_path / "user.parquet")
    sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    assert sizes == [128, 128, 44]
    ids = pq.read_table(tmp_path / "user.parquet").column("user_id").to_pylist()
    assert ids == [f"u{number:03d}" for number in range(1, 301)]


def test_model_is_euclidean_nearest_neighbors_fitted_on_every_restaurant(data_dir: Path) -> None:
    model = _load_model(data_dir)

    assert isinstance(model, NearestNeighbors)
    assert model.metric == "euclidean"
    assert model.n_samples_fit_ == SMALL["n_restaurants"]
    assert model.n_features_in_ == SMALL["n_features"]


def test_model_file_is_pickle_protocol_5(data_dir: Path) -> None:
    assert (data_dir / "model.pkl").read_bytes()[:2] == b"\x80\x05"


def test_without_the_model_the_restaurant_embeddings_take_its_place(tmp_path: Path) -> None:
    generate(tmp_path / "whole", **SMALL, seed=5)
    generate(tmp_path / "apart", **SMALL, seed=5, model=False)

    written = {path.name for path in (tmp_path / "apart").iterdir()}
    assert written == set(FILES) - {"model.pkl", "model.pkl.sha256"} | {EMBEDDINGS_FILE}
    for name in written - {EMBEDDINGS_FILE}:
        assert (tmp_path / "apart" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    embeddings = np.load(tmp_path / "apart" / EMBEDDINGS_FILE)
    assert embeddings.shape == (SMALL["n_restaurants"], SMALL["n_features"])
    assert embeddings.dtype == np.float64


def test_fitting_apart_writes_the_model_generate_writes_in_one_go(tmp_path: Path) -> None:
    generate(tmp_path / "whole", **SMALL, seed=5)
    generate(tmp_path / "apart", **SMALL, seed=5, model=False)

    shape = fit_model(tmp_path / "apart")

    assert shape == (SMALL["n_restaurants"], SMALL["n_features"])
    for name in ("model.pkl", "model.pkl.sha256"):
        assert (tmp_path / "apart" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


@pytest.mark.parametrize(
    ("embeddings", "named"),
    [
        (None, "does not exist; write it with `recommender data generate --no-model`"),
        (np.zeros(5), "shape (5,)"),
        (np.zeros((0, 3)), "shape (0, 3)"),
        (np.zeros((4, 3), dtype=np.int64), "int64 of shape (4, 3)"),
        (np.array([[0.0, np.nan]]), "non-finite"),
    ],
)
def test_fit_model_refuses_missing_or_unusable_embeddings_naming_the_file(
    tmp_path: Path, embeddings: np.ndarray | None, named: str
) -> None:
    if embeddings is not None:
        np.save(tmp_path / EMBEDDINGS_FILE, embeddings)

    with pytest.raises(ValueError, match=re.escape(named)) as raised:
        fit_model(tmp_path)

    assert EMBEDDINGS_FILE in str(raised.value)
    assert not (tmp_path / "model.pkl").exists()


def test_user_restaurant_differences_are_in_the_tens_and_nearest_restaurants_vary(
    data_dir: Path,
) -> None:
    features = _user_features(pq.read_table(data_dir / "user.parquet")).astype(np.float64)

    differences, rows = _load_model(data_dir).kneighbors(features, SMALL["n_restaurants"])

    assert 10.0 <= np.median(differences) <= 60.0
    assert len(np.unique(rows[:, 0])) >= SMALL["n_users"] // 3


def test_request_file_has_the_reference_columns_and_types(data_dir: Path) -> None:
    schema = pq.read_schema(data_dir / "request.parquet")

    assert schema.names == ["user_id", "latitude", "longitude", "size", "sort_dis", "max_dis"]
    assert schema.types == [pa.string()] + [pa.float64()] * 2 + [pa.int64()] + [pa.float64()] * 2


def test_requests_take_only_allowed_values(data_dir: Path) -> None:
    requests = pq.read_table(data_dir / "request.parquet").to_pydict()

    assert len(requests["user_id"]) == SMALL["n_requests"]
    assert set(requests["size"]) <= {20, 50}
    assert {"nan" if math.isnan(v) else v for v in requests["sort_dis"]} <= {0.0, 1.0, "nan"}
    assert {"nan" if math.isnan(v) else v for v in requests["max_dis"]} <= {5000.0, 10000.0, "nan"}


def test_requests_name_existing_users(data_dir: Path) -> None:
    users = set(pq.read_table(data_dir / "user.parquet").column("user_id").to_pylist())
    requested = pq.read_table(data_dir / "request.parquet").column("user_id").to_pylist()

    assert set(requested) <= users


def test_request_locations_lie_inside_the_bangkok_box(data_dir: Path) -> None:
    requests = pq.read_table(data_dir / "request.parquet")

    for name, (low, high) in (("latitude", LATITUDE_RANGE), ("longitude", LONGITUDE_RANGE)):
        values = requests.column(name).to_numpy()
        assert np.all((low <= values) & (values <= high))


def test_same_arguments_write_byte_identical_files(tmp_path: Path) -> None:
    generate(tmp_path / "first", **SMALL, seed=3)
    generate(tmp_path / "second", **SMALL, seed=3)

    for name in FILES:
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes()


def test_different_seeds_write_different_files(tmp_path: Path) -> None:
    generate(tmp_path / "first", **SMALL, seed=3)
    generate(tmp_path / "second", **SMALL, seed=4)

    for name in FILES:
        assert (tmp_path / "first" / name).read_bytes() != (tmp_path / "second" / name).read_bytes()


def test_restaurants_do_not_depend_on_the_number_of_users(tmp_path: Path) -> None:
    generate(tmp_path / "few", **{**SMALL, "n_users": 120})
    generate(tmp_path / "many", **SMALL)

    for name in ("restaurant.parquet", "model.pkl"):
        assert (tmp_path / "few" / name).read_bytes() == (tmp_path / "many" / name).read_bytes()


def test_restaurant_table_does_not_depend_on_the_number_of_features(tmp_path: Path) -> None:
    generate(tmp_path / "narrow", **{**SMALL, "n_features": 4})
    generate(tmp_path / "wide", **SMALL)

    narrow = (tmp_path / "narrow" / "restaurant.parquet").read_bytes()
    assert narrow == (tmp_path / "wide" / "restaurant.parquet").read_bytes()


def test_users_do_not_depend_on_the_number_of_restaurants(tmp_path: Path) -> None:
    generate(tmp_path / "few", **{**SMALL, "n_restaurants": 50})
    generate(tmp_path / "many", **SMALL)

    few = pq.read_table(tmp_path / "few" / "user.parquet")
    many = pq.read_table(tmp_path / "many" / "user.parquet")
    assert few.equals(many)


def test_zero_users_and_requests_write_empty_files_with_the_full_schema(tmp_path: Path) -> None:
    generate(tmp_path, **{**SMALL, "n_users": 0, "n_requests": 0})

    for name, n_columns in (
        ("user.parquet", 17),
        ("user.small.parquet", 17),
        ("request.parquet", 6),
    ):
        table = pq.read_table(tmp_path / name)
        assert (table.num_rows, table.num_columns) == (0, n_columns)


def test_progress_reports_each_part_with_counts(tmp_path: Path) -> None:
    messages: list[str] = []

    generate(tmp_path, **SMALL, progress=messages.append)

    assert "restaurants 200/200" in messages
    assert "users 300/300" in messages
    assert "requests 50/50" in messages


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"n_users": -1}, "n_users=-1"),
        ({"n_restaurants": 0}, "n_restaurants=0"),
        ({"n_features": 0}, "n_features=0"),
        ({"n_requests": -5}, "n_requests=-5"),
        ({"seed": -1}, "seed=-1"),
        ({"n_users": 2.5}, "n_users=2.5"),
        ({"n_features": True}, "n_features=True"),
        ({"n_users": 0, "n_requests": 10}, "n_requests=10"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_the_argument_and_value(
    tmp_path: Path, arguments: dict[str, object], named: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(named)):
        generate(tmp_path / "out", **{**SMALL, **arguments})

    assert not (tmp_path / "out").exists()
