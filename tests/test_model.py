"""The difference is the model's own distance, and only a fitted model file is accepted."""

import hashlib
import pathlib
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import skops.io
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler

from recommender.dataset.reader import DataError
from recommender.model import load_model, model_path, taste_model
from recommender.ranking import Catalog

N_RESTAURANTS = 60
N_FEATURES = 8
TOLERANCE = 1e-6

ESTIMATORS = {
    "euclidean": lambda: NearestNeighbors(metric="euclidean"),
    "manhattan": lambda: NearestNeighbors(metric="manhattan"),
    "cosine": lambda: NearestNeighbors(metric="cosine"),
    "chebyshev": lambda: NearestNeighbors(metric="chebyshev"),
    "minkowski_p3": lambda: NearestNeighbors(metric="minkowski", p=3),
    "minkowski_p1.5": lambda: NearestNeighbors(metric="minkowski", p=1.5),
    "sqeuclidean": lambda: NearestNeighbors(metric="sqeuclidean"),
    "canberra": lambda: NearestNeighbors(metric="canberra"),
    "braycurtis": lambda: NearestNeighbors(metric="braycurtis"),
    "ball_tree": lambda: NearestNeighbors(algorithm="ball_tree"),
    "ball_tree_manhattan": lambda: NearestNeighbors(algorithm="ball_tree", metric="manhattan"),
    "kd_tree_chebyshev": lambda: NearestNeighbors(algorithm="kd_tree", metric="chebyshev"),
    "seuclidean": lambda: NearestNeighbors(
        metric="seuclidean", metric_params={"V": np.linspace(0.5, 2.0, N_FEATURES)}
    ),
    "mahalanobis": lambda: NearestNeighbors(
        algorithm="brute",
        metric="mahalanobis",
        metric_params={"VI": np.diag(np.linspace(0.5, 2.0, N_FEATURES))},
    ),
    "weighted_minkowski": lambda: NearestNeighbors(
        metric="minkowski", p=3, metric_params={"w": np.linspace(0.5, 2.0, N_FEATURES)}
    ),
}


def embeddings_and_users(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random restaurant embeddings (shape (60, 8)) and user features, one equal to a restaurant."""
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(loc=1.0, scale=2.0, size=(N_RESTAURANTS, N_FEATURES))
    users = rng.normal(loc=1.0, scale=2.0, size=(5, N_FEATURES))
    return embeddings, np.vstack([users, embeddings[7]])


def catalog_of(estimator: NearestNeighbors, seed: int = 0) -> Catalog:
    """A catalog over every row of the model, listed in shuffled order at random places."""
    rng = np.random.default_rng(seed)
    n_rows = estimator.n_samples_fit_
    rows = rng.permutation(n_rows)
    return Catalog(
        ids=np.array([f"r{row:03d}" for row in rows], dtype=object),
        rows=rows,
        latitude=rng.uniform(13.7, 14.0, n_rows),
        longitude=rng.uniform(100.3, 100.8, n_rows),
        model=taste_model(estimator),
    )


def worst_disagreement(estimator: NearestNeighbors, users: np.ndarray) -> float:
    """Largest gap between the catalog's difference and the model's kneighbors, over all pairs."""
    catalog = catalog_of(estimator)
    every_position = np.arange(len(catalog))
    worst = 0.0
    for user in users:
        distances, rows = estimator.kneighbors(user[np.newaxis, :], n_neighbors=len(catalog))
        by_row = np.empty(len(catalog))
        by_row[rows[0]] = distances[0]

        difference = catalog.difference(user, every_position)

        worst = max(worst, float(np.max(np.abs(difference - by_row[catalog.rows]))))
    return worst


@pytest.mark.parametrize("make_estimator", ESTIMATORS.values(), ids=ESTIMATORS.keys())
def test_difference_agrees_with_the_models_kneighbors(make_estimator) -> None:
    embeddings, users = embeddings_and_users(seed=1)
    estimator = make_estimator().fit(embeddings)

    assert worst_disagreement(estimator, users) <= TOLERANCE


def test_cosine_difference_involving_zero_vectors_agrees_with_the_models_kneighbors() -> None:
    embeddings, users = embeddings_and_users(seed=2)
    embeddings[[3, 40]] = 0.0
    users = np.vstack([users, np.zeros(N_FEATURES)])
    estimator = NearestNeighbors(metric="cosine").fit(embeddings)

    assert worst_disagreement(estimator, users) <= TOLERANCE


BOOLEAN_METRICS = [
    ("jaccard", "brute"),
    ("dice", "brute"),
    ("hamming", "brute"),
    ("rogerstanimoto", "brute"),
    ("russellrao", "ball_tree"),
    ("sokalmichener", "ball_tree"),
]


# Both scikit-learn and the catalog warn that they read 0.0 and 1.0 as booleans.
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.DataConversionWarning")
@pytest.mark.parametrize(("metric", "algorithm"), BOOLEAN_METRICS)
def test_difference_agrees_with_the_models_kneighbors_for_a_boolean_metric(
    metric: str, algorithm: str
) -> None:
    embeddings, users = embeddings_and_users(seed=6)
    estimator = NearestNeighbors(metric=metric, algorithm=algorithm).fit(
        (embeddings > 1.0).astype(np.float64)
    )

    assert worst_disagreement(estimator, (users > 1.0).astype(np.float64)) <= TOLERANCE


def test_difference_agrees_with_kneighbors_for_a_callable_metric() -> None:
    embeddings, users = embeddings_and_users(seed=3)
    estimator = NearestNeighbors(metric=_squared_gap_sum_root).fit(embeddings)

    assert worst_disagreement(estimator, users) <= TOLERANCE


def _squared_gap_sum_root(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.sum((a - b) ** 2)) + np.abs(a - b).max())


def test_difference_leaves_the_model_embeddings_unchanged() -> None:
    embeddings, users = embeddings_and_users(seed=4)
    catalog = catalog_of(NearestNeighbors().fit(embeddings))
    before = catalog.model.embeddings.copy()

    catalog.difference(users[0], np.arange(len(catalog)))

    np.testing.assert_array_equal(catalog.model.embeddings, before)


def test_load_model_reads_the_embeddings_and_metric_of_a_fitted_model(tmp_path: Path) -> None:
    embeddings, _ = embeddings_and_users(seed=5)
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(NearestNeighbors(metric="manhattan").fit(embeddings)))

    model = load_model(path)

    np.testing.assert_array_equal(model.embeddings, embeddings)
    assert (model.metric, model.n_rows, model.n_features) == ("manhattan", 60, 8)


def test_load_model_refuses_a_missing_file_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "absent" / "model.pkl"

    with pytest.raises(DataError, match=re.escape(str(path))):
        load_model(path)


@pytest.mark.parametrize(
    "content",
    [b"", b"this is not a pickle\n", pickle.dumps(NearestNeighbors().fit(np.eye(3)))[:40]],
    ids=["empty", "text", "truncated_pickle"],
)
def test_load_model_refuses_a_file_that_is_not_a_pickle_naming_it(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "model.pkl"
    path.write_bytes(content)

    with pytest.raises(DataError, match=re.escape(str(path))):
        load_model(path)


NOT_A_FITTED_MODEL = {
    "dict": lambda: {"embeddings": np.eye(3)},
    "array": lambda: np.eye(3),
    "unfitted_nearest_neighbors": lambda: NearestNeighbors(),
    "fitted_scaler": lambda: StandardScaler().fit(np.eye(3)),
    "precomputed_nearest_neighbors": lambda: NearestNeighbors(metric="precomputed").fit(
        np.ones((3, 3)) - np.eye(3)
    ),
}


@pytest.mark.parametrize("make_object", NOT_A_FITTED_MODEL.values(), ids=NOT_A_FITTED_MODEL.keys())
def test_load_model_refuses_a_pickle_of_anything_but_a_fitted_nearest_neighbors_naming_it(
    tmp_path: Path, make_object
) -> None:
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(make_object()))

    with pytest.raises(DataError, match=re.escape(str(path))):
        load_model(path)


def _fitted(tmp_path: Path, algorithm: str = "auto") -> NearestNeighbors:
    embeddings, _ = embeddings_and_users(seed=5)
    return NearestNeighbors(algorithm=algorithm).fit(embeddings)


def _pickled(tmp_path: Path) -> Path:
    path = tmp_path / "model.pkl"
    with path.open("wb") as file:
        pickle.dump(_fitted(tmp_path), file)
    return path


def test_a_pickle_whose_pinned_sha256_differs_is_refused_before_unpickling(tmp_path: Path) -> None:
    path = _pickled(tmp_path)

    with pytest.raises(DataError, match="SHA-256"):
        load_model(path, expected_sha256="0" * 64)


def test_a_pickle_matching_its_checksum_file_loads(tmp_path: Path) -> None:
    path = _pickled(tmp_path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "model.pkl.sha256").write_text(f"{digest}  model.pkl\n")

    assert load_model(path).sha256 == digest


def test_a_pickle_not_matching_its_checksum_file_is_refused(tmp_path: Path) -> None:
    path = _pickled(tmp_path)
    (tmp_path / "model.pkl.sha256").write_text(f"{'a' * 64}  model.pkl\n")

    with pytest.raises(DataError, match="refusing to load"):
        load_model(path)


def test_a_pickle_with_a_malicious_payload_and_a_wrong_pin_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(_Touch(str(marker))))

    with pytest.raises(DataError):
        load_model(path, expected_sha256="1" * 64)
    assert not marker.exists()


class _Opaque:
    """A type no one has vouched for."""


class _Touch:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


@pytest.mark.parametrize("algorithm", ["brute", "kd_tree", "ball_tree"])
def test_a_skops_model_loads_without_pickle_and_ranks_like_the_original(
    tmp_path: Path, algorithm: str
) -> None:
    estimator = _fitted(tmp_path, algorithm)
    path = tmp_path / "model.skops"
    skops.io.dump(estimator, path)

    model = load_model(path)

    np.testing.assert_array_equal(model.embeddings, estimator._fit_X)
    assert model.metric == estimator.effective_metric_


def test_a_skops_file_holding_an_untrusted_type_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.skops"
    skops.io.dump({"model": _fitted(tmp_path), "extra": _Opaque()}, path)

    with pytest.raises(DataError, match="does not trust"):
        load_model(path)


def test_the_data_directory_prefers_a_skops_model(tmp_path: Path) -> None:
    (tmp_path / "model.pkl").write_bytes(b"")
    (tmp_path / "model.skops").write_bytes(b"")

    assert model_path(tmp_path).name == "model.skops"
