"""Loading a data directory end to end: what is served, what is skipped, what is refused."""

import asyncio
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse
from sklearn.neighbors import NearestNeighbors

from recommender.dataset.reader import MODEL_FILE, RESTAURANT_FILE, USER_FILE, DataError
from recommender.ranking import Query
from recommender.service import (
    Recommender,
    UnknownUser,
    load_recommender,
)
from recommender.settings import Settings

N_FEATURES = 7
STRING = pa.string()
NEARBY = Query(
    latitude=13.75, longitude=100.5, size=50, max_dis=5_000.0, sort_by_displacement=False
)


@dataclass
class DataDir:
    """A small data directory and what was written into it.

    ``embeddings`` has shape (n_restaurants, n_features), row ``i`` being the model's row ``i``;
    ``user_features`` has shape (n_users, n_features), float32, as in ``user.parquet``.
    """

    path: Path
    restaurants: dict[str, list]
    embeddings: np.ndarray
    user_ids: list[str | None]
    user_features: np.ndarray

    def restaurant_embedding(self, position: int) -> np.ndarray:
        return self.embeddings[self.restaurants["index"][position]]


def write_restaurants(directory: Path, columns: dict[str, list]) -> None:
    pq.write_table(pa.table(columns), directory / RESTAURANT_FILE)


def write_users(directory: Path, ids: list[str | None], features: np.ndarray) -> None:
    columns = {"user_id": pa.array(ids, pa.string())}
    for j in range(features.shape[1]):
        columns[f"feature_{j}"] = pa.array(features[:, j], pa.float32())
    pq.write_table(pa.table(columns), directory / USER_FILE)


def write_model(directory: Path, embeddings: np.ndarray) -> None:
    with open(directory / MODEL_FILE, "wb") as file:
        pickle.dump(NearestNeighbors(metric="euclidean").fit(embeddings), file)


def make_data_dir(
    directory: Path,
    n_features: int = N_FEATURES,
    n_restaurants: int = 6,
    coordinate_type: pa.DataType = STRING,
) -> DataDir:
    """Restaurants within 2 km of ``NEARBY``'s point, four users, a fitted model."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    latitude = [round(13.75 + 0.002 * i, 6) for i in range(n_restaurants)]
    longitude = [round(100.5 - 0.001 * i, 6) for i in range(n_restaurants)]
    if coordinate_type == pa.string():
        latitude = [f"{value:.6f}" for value in latitude]
        longitude = [f"{value:.6f}" for value in longitude]
    restaurants = {
        "restaurant_id": [f"r{i}" for i in range(n_restaurants)],
        "index": rng.permutation(n_restaurants).tolist(),
        "latitude": latitude,
        "longitude": longitude,
    }
    embeddings = rng.standard_normal((n_restaurants, n_features))
    user_ids = ["u0", "u1", "u2", "u3"]
    user_features = rng.standard_normal((4, n_features)).astype(np.float32)

    write_restaurants(directory, restaurants)
    write_model(directory, embeddings)
    write_users(directory, user_ids, user_features)
    return DataDir(directory, restaurants, embeddings, user_ids, user_features)


def load(data: DataDir, ranker: str = "fast") -> Recommender:
    settings = Settings(data_dir=data.path, prepared_dir=data.path / "prepared", ranker=ranker)
    return load_recommender(settings)


def recommend(recommender: Recommender, user_id: str, query: Query = NEARBY) -> list[str]:
    return asyncio.run(recommender.recommend(user_id, query)).ids


def features_of(recommender: Recommender, user_id: str) -> np.ndarray | None:
    return asyncio.run(recommender.store.features(user_id))


def ranked_ids(data: DataDir, user: int, positions: range) -> list[str]:
    """Restaurants at ``positions`` of the file, ordered by Euclidean difference to ``user``."""
    features = data.user_features[user].astype(np.float64)
    difference = [np.linalg.norm(data.restaurant_embedding(i) - features) for i in positions]
    return [data.restaurants["restaurant_id"][positions[k]] for k in np.argsort(difference)]


def message_of(error: pytest.ExceptionInfo, data: DataDir) -> str:
    """The error's message with the data directory's path taken out, so digits are its own."""
    return str(error.value).replace(str(data.path), "")


@pytest.fixture
def data(tmp_path: Path) -> DataDir:
    return make_data_dir(tmp_path / "data")


@pytest.mark.parametrize("n_features", [1, N_FEATURES])
@pytest.mark.parametrize("ranker", ["fast", "exhaustive"])
def test_a_model_of_any_dimension_ranks_nearby_restaurants_by_its_difference(
    tmp_path: Path, n_features: int, ranker: str
) -> None:
    data = make_data_dir(tmp_path / "data", n_features=n_features)

    recommender = load(data, ranker)

    assert recommend(recommender, "u1") == ranked_ids(data, 1, range(6))


def test_the_load_report_counts_what_was_loaded(data: DataDir) -> None:
    report = load(data).report

    assert (report.n_restaurants, report.n_users, report.n_features) == (6, 4, N_FEATURES)
    assert report.skipped == []


def test_string_and_numeric_coordinates_give_the_same_recommendations(tmp_path: Path) -> None:
    strings = make_data_dir(tmp_path / "strings", coordinate_type=pa.string())
    numbers = make_data_dir(tmp_path / "numbers", coordinate_type=pa.float64())

    from_strings = asyncio.run(load(strings).recommend("u2", NEARBY))
    from_numbers = asyncio.run(load(numbers).recommend("u2", NEARBY))

    assert from_strings.ids == from_numbers.ids
    np.testing.assert_array_equal(from_strings.displacement, from_numbers.displacement)
    np.testing.assert_array_equal(from_strings.difference, from_numbers.difference)


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("latitude", "north"),
        ("index", 7),
        ("restaurant_id", None),
        ("restaurant_id", "r0"),
    ],
    ids=["coordinates", "index", "missing-id", "repeated-id"],
)
@pytest.mark.parametrize("ranker", ["fast", "exhaustive"])
def test_a_skipped_restaurant_is_never_served(
    tmp_path: Path, column: str, value: object, ranker: str
) -> None:
    # The last restaurant stands on the user's spot with the user's own features: served, it
    # would come first.
    data = make_data_dir(tmp_path / "data", n_restaurants=7)
    data.embeddings[data.restaurants["index"][6]] = data.user_features[0]
    write_model(data.path, data.embeddings)
    data.restaurants["latitude"][6] = f"{NEARBY.latitude:.6f}"
    data.restaurants["longitude"][6] = f"{NEARBY.longitude:.6f}"
    data.restaurants[column][6] = value
    write_restaurants(data.path, data.restaurants)

    recommender = load(data, ranker)

    assert recommend(recommender, "u0") == ranked_ids(data, 0, range(6))


def test_skipped_rows_of_both_files_are_in_the_load_report(data: DataDir) -> None:
    data.restaurants["latitude"][2] = "north"
    write_restaurants(data.path, data.restaurants)
    data.user_features[3, 0] = np.nan
    write_users(data.path, data.user_ids, data.user_features)

    report = load(data).report

    assert [(skipped.file, skipped.count) for skipped in report.skipped] == [
        (RESTAURANT_FILE, 1),
        (USER_FILE, 1),
    ]
    assert "r2" in report.skipped[0].examples[0]
    assert "u3" in report.skipped[1].examples[0]


def test_a_restaurant_file_with_no_servable_row_is_refused(data: DataDir) -> None:
    data.restaurants["latitude"] = ["north"] * 6
    write_restaurants(data.path, data.restaurants)

    with pytest.raises(DataError, match=RESTAURANT_FILE):
        load(data)


def test_a_model_fitted_on_another_number_of_restaurants_is_refused(data: DataDir) -> None:
    write_model(data.path, np.random.default_rng(1).standard_normal((9, N_FEATURES)))

    with pytest.raises(DataError, match=RESTAURANT_FILE) as raised:
        load(data)

    message = message_of(raised, data)
    assert re.search(r"\b6\b", message)
    assert re.search(r"\b9\b", message)


def test_a_model_whose_dimension_differs_from_the_user_features_is_refused(
    data: DataDir,
) -> None:
    write_users(data.path, data.user_ids, data.user_features[:, :5])

    with pytest.raises(DataError, match=USER_FILE) as raised:
        load(data)

    message = message_of(raised, data)
    assert re.search(r"\b5\b", message)
    assert re.search(rf"\b{N_FEATURES}\b", message)


def remove(path: Path) -> None:
    path.unlink()


def write_text(path: Path) -> None:
    path.write_text("id,value\nr0,1\n")


def drop_column(name: str):
    def drop(path: Path) -> None:
        pq.write_table(pq.read_table(path).drop_columns([name]), path)

    return drop


def damage_data_pages(path: Path) -> None:
    """Overwrite every byte between the leading magic and the footer, keeping the footer."""
    content = bytearray(path.read_bytes())
    footer_length = int.from_bytes(content[-8:-4], "little")
    end = len(content) - 8 - footer_length
    content[4:end] = b"\xab" * (end - 4)
    path.write_bytes(bytes(content))


def pickle_of(value: object):
    def write(path: Path) -> None:
        path.write_bytes(pickle.dumps(value))

    return write


@pytest.mark.parametrize(
    ("name", "spoil"),
    [
        pytest.param(RESTAURANT_FILE, remove, id="restaurants-missing"),
        pytest.param(RESTAURANT_FILE, write_text, id="restaurants-not-parquet"),
        pytest.param(RESTAURANT_FILE, drop_column("latitude"), id="restaurants-no-latitude"),
        pytest.param(RESTAURANT_FILE, damage_data_pages, id="restaurants-damaged"),
        pytest.param(USER_FILE, remove, id="users-missing"),
        pytest.param(USER_FILE, write_text, id="users-not-parquet"),
        pytest.param(USER_FILE, drop_column("user_id"), id="users-no-user-id"),
        pytest.param(USER_FILE, damage_data_pages, id="users-damaged"),
        pytest.param(MODEL_FILE, remove, id="model-missing"),
        pytest.param(MODEL_FILE, write_text, id="model-not-a-pickle"),
        pytest.param(MODEL_FILE, pickle_of({"n_neighbors": 5}), id="model-not-a-model"),
        pytest.param(MODEL_FILE, pickle_of(NearestNeighbors()), id="model-not-fitted"),
    ],
)
def test_an_unusable_data_file_is_refused_naming_it(data: DataDir, name: str, spoil) -> None:
    spoil(data.path / name)

    with pytest.raises(DataError, match=re.escape(name)):
        load(data)


def test_the_served_feature_vector_equals_the_source_row(data: DataDir) -> None:
    features = features_of(load(data), "u2")

    assert features.dtype == np.float64
    np.testing.assert_array_equal(features, data.user_features[2].astype(np.float64))


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_user_with_a_non_finite_feature_is_unknown_to_the_store(
    data: DataDir, value: float
) -> None:
    data.user_features[1, 3] = value
    write_users(data.path, data.user_ids, data.user_features)

    assert features_of(load(data), "u1") is None


def test_recommending_for_a_skipped_user_raises_unknown_user(data: DataDir) -> None:
    data.user_features[1, 3] = np.nan
    write_users(data.path, data.user_ids, data.user_features)
    recommender = load(data)

    with pytest.raises(UnknownUser):
        recommend(recommender, "u1")


def test_a_repeated_user_is_served_with_the_features_of_their_first_row(data: DataDir) -> None:
    write_users(data.path, ["u0", "u1", "u0", "u3"], data.user_features)

    features = features_of(load(data), "u0")

    np.testing.assert_array_equal(features, data.user_features[0].astype(np.float64))


def test_a_second_load_reuses_the_prepared_user_features(data: DataDir) -> None:
    first = load(data).report
    prepared_dir = data.path / "prepared"
    before = {path.name: path.stat().st_mtime_ns for path in prepared_dir.iterdir()}

    second = load(data).report

    assert (first.prepared, second.prepared) == (True, False)
    assert {path.name: path.stat().st_mtime_ns for path in prepared_dir.iterdir()} == before


def test_a_changed_user_file_is_prepared_again_at_the_next_load(data: DataDir) -> None:
    load(data)
    changed = np.random.default_rng(1).standard_normal((5, N_FEATURES)).astype(np.float32)
    write_users(data.path, ["u0", "u1", "u2", "u3", "u4"], changed)

    recommender = load(data)

    assert recommender.report.prepared
    np.testing.assert_array_equal(features_of(recommender, "u4"), changed[4].astype(np.float64))


@pytest.mark.parametrize("metric", ["canberra", "braycurtis", "correlation"])
def test_no_restaurant_in_range_is_an_empty_answer_whatever_the_metric(
    data: DataDir, metric: str
) -> None:
    with open(data.path / MODEL_FILE, "wb") as file:
        pickle.dump(NearestNeighbors(metric=metric).fit(data.embeddings), file)
    recommender = load(data)
    far_away = Query(
        latitude=0.0, longitude=0.0, size=5, max_dis=1000.0, sort_by_displacement=False
    )

    assert recommend(recommender, "u0", far_away) == []


def test_a_model_fitted_on_a_sparse_matrix_is_refused_naming_the_file(data: DataDir) -> None:
    with open(data.path / MODEL_FILE, "wb") as file:
        pickle.dump(NearestNeighbors().fit(scipy.sparse.csr_matrix(data.embeddings)), file)

    with pytest.raises(DataError, match="sparse"):
        load(data)


@pytest.mark.parametrize("value", [math.nan, math.inf, 1e200])
def test_a_model_with_unusable_embedding_values_is_refused(data: DataDir, value: float) -> None:
    embeddings = data.embeddings.copy()
    embeddings[1, 0] = value
    estimator = NearestNeighbors().fit(data.embeddings)
    estimator._fit_X = embeddings
    with open(data.path / MODEL_FILE, "wb") as file:
        pickle.dump(estimator, file)

    with pytest.raises(DataError, match="embeddings"):
        load(data)


def test_a_data_file_with_no_servable_user_is_refused(data: DataDir) -> None:
    write_users(data.path, [None, None], np.zeros((2, N_FEATURES)))

    with pytest.raises(DataError, match="no user row can be served"):
        load(data)


def test_a_prepared_dir_that_cannot_be_written_is_refused_naming_the_setting(
    data: DataDir,
) -> None:
    blocked = data.path / "blocked"
    blocked.write_text("a file where a directory should be")
    settings = Settings(data_dir=data.path, prepared_dir=blocked)

    with pytest.raises(DataError, match="RECOMMENDER_PREPARED_DIR"):
        load_recommender(settings)
