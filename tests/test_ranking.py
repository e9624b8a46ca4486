"""The fast ranker gives exactly the answer of an exhaustive reference, for every request.

The reference is written out here, from the product's rules alone: the model's own
``kneighbors`` over every restaurant, the WGS-84 geodesic from the user to every restaurant,
the restaurants within ``max_dis``, sorted with ``np.lexsort`` and cut to ``size``.
"""

import asyncio
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pyproj
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.neighbors import NearestNeighbors

from recommender.model import taste_model
from recommender.ranking import Catalog, ExhaustiveRanker, FastRanker, ProjectionBounds, Query
from recommender.service import Recommender, UnknownUser

GEOD = pyproj.Geod(ellps="WGS84")
DEFAULT_MAX_DIS = 5000.0
# Same answer means the differences agree this closely with the model's kneighbors.
DIFFERENCE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Answer:
    """A reference answer, best first."""

    ids: list[str]
    difference: np.ndarray
    displacement: np.ndarray
    n_candidates: int


class Reference:
    """The exhaustive answer over restaurants given as plain arrays.

    Parameters
    ----------
    ids : sequence of str, length n_restaurants
    rows : ndarray of shape (n_restaurants,)
        Each restaurant's row in the model.
    latitude, longitude : ndarray of shape (n_restaurants,), WGS-84 degrees
    estimator : fitted sklearn NearestNeighbors
    """

    def __init__(self, ids, rows, latitude, longitude, estimator: NearestNeighbors) -> None:
        self.ids = np.asarray(ids, dtype=str)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.latitude = np.asarray(latitude, dtype=np.float64)
        self.longitude = np.asarray(longitude, dtype=np.float64)
        self.estimator = estimator
        self._differences: dict[bytes, np.ndarray] = {}
        self._metres: dict[tuple[float, float], np.ndarray] = {}

    def rank(self, user: np.ndarray, query: Query) -> Answer:
        metres = self.metres(query.latitude, query.longitude)
        inside = np.flatnonzero(metres <= query.max_dis)
        difference = self.differences(user)[inside]
        displacement = np.rint(metres[inside]).astype(np.int64)
        ids = self.ids[inside]

        if query.sort_by_displacement:
            order = np.lexsort((ids, difference, displacement))
        else:
            order = np.lexsort((ids, displacement, difference))
        order = order[: query.size]
        return Answer(
            ids=ids[order].tolist(),
            difference=difference[order],
            displacement=displacement[order],
            n_candidates=len(inside),
        )

    def differences(self, user: np.ndarray) -> np.ndarray:
        """The model's kneighbors distance from ``user`` to each restaurant, shape (n,)."""
        key = user.tobytes()
        if key not in self._differences:
            self.remember(user[np.newaxis, :])
        return self._differences[key]

    def remember(self, users: np.ndarray) -> None:
        """Ask kneighbors once for many users, shape (n_users, n_features), and keep the answers."""
        n_rows = self.estimator.n_samples_fit_
        distances, rows = self.estimator.kneighbors(users, n_neighbors=n_rows)
        for user, user_distances, user_rows in zip(users, distances, rows, strict=True):
            by_row = np.empty(n_rows, dtype=np.float64)
            by_row[user_rows] = user_distances
            self._differences[user.tobytes()] = by_row[self.rows]

    def metres(self, latitude: float, longitude: float) -> np.ndarray:
        """The geodesic from the point to each restaurant, shape (n,), metres."""
        key = (latitude, longitude)
        if key not in self._metres:
            n = len(self.ids)
            _, _, metres = GEOD.inv(
                np.full(n, longitude), np.full(n, latitude), self.longitude, self.latitude
            )
            self._metres[key] = np.asarray(metres, dtype=np.float64)
        return self._metres[key]


@pytest.fixture(scope="module")
def user_features(data_dir: Path) -> dict[str, np.ndarray]:
    """Every user's features as written in user.parquet, as float64."""
    table = pq.read_table(data_dir / "user.parquet")
    features = np.column_stack(
        [table.column(name).to_numpy() for name in table.column_names[1:]]
    ).astype(np.float64)
    return dict(zip(table.column("user_id").to_pylist(), features, strict=True))


@pytest.fixture(scope="module")
def reference(data_dir: Path, user_features: dict[str, np.ndarray]) -> Reference:
    """The exhaustive reference over the small data, read straight from its files."""
    table = pq.read_table(data_dir / "restaurant.parquet").to_pydict()
    with open(data_dir / "model.pkl", "rb") as file:
        estimator = pickle.load(file)
    reference = Reference(
        ids=table["restaurant_id"],
        rows=table["index"],
        latitude=[float(value) for value in table["latitude"]],
        longitude=[float(value) for value in table["longitude"]],
        estimator=estimator,
    )
    reference.remember(np.array(list(user_features.values())))
    return reference


@pytest.fixture(scope="module")
def served_features(recommender: Recommender, requests: list[dict]) -> dict[str, np.ndarray]:
    """The features the service's store hands out for every requested user."""

    async def fetch() -> dict[str, np.ndarray]:
        user_ids = {request["user_id"] for request in requests}
        return {user_id: await recommender.store.features(user_id) for user_id in user_ids}

    return asyncio.run(fetch())


def query_for(
    request: dict, max_dis: float | None = None, sort_by_displacement: bool | None = None
) -> Query:
    """The request's query (NaN sort_dis is 0, NaN max_dis is 5000 m), with overrides."""
    if max_dis is None:
        max_dis = DEFAULT_MAX_DIS if math.isnan(request["max_dis"]) else request["max_dis"]
    if sort_by_displacement is None:
        sort_by_displacement = request["sort_dis"] == 1.0
    return Query(
        latitude=request["latitude"],
        longitude=request["longitude"],
        size=request["size"],
        max_dis=max_dis,
        sort_by_displacement=sort_by_displacement,
    )


def disagreement(answer, expected: Answer) -> str | None:
    """What differs between an answer and the reference's, or None when they are identical."""
    if answer.ids != expected.ids:
        return f"ids {answer.ids} != {expected.ids}"
    if answer.displacement.tolist() != expected.displacement.tolist():
        return f"displacements {answer.displacement} != {expected.displacement}"
    gap = np.abs(np.asarray(answer.difference) - expected.difference)
    if np.any(gap > DIFFERENCE_TOLERANCE):
        return f"differences off by up to {gap.max():.3g}"
    if answer.n_candidates != expected.n_candidates:
        return f"n_candidates {answer.n_candidates} != {expected.n_candidates}"
    return None


RADII = {
    "requested": None,
    "one_metre": 1.0,
    "one_and_a_half_km": 1_500.0,
    "whole_city": 100_000.0,
    "whole_planet": 3e7,
}
ORDERS = {"requested": None, "by_difference": False, "by_displacement": True}
SORTS = {"by_difference": False, "by_displacement": True}


@pytest.mark.parametrize("sort_by_displacement", ORDERS.values(), ids=ORDERS.keys())
@pytest.mark.parametrize("max_dis", RADII.values(), ids=RADII.keys())
def test_fast_ranker_gives_the_reference_answer_on_every_request(
    recommender: Recommender,
    reference: Reference,
    user_features: dict[str, np.ndarray],
    served_features: dict[str, np.ndarray],
    requests: list[dict],
    max_dis: float | None,
    sort_by_displacement: bool | None,
) -> None:
    ranker = FastRanker(recommender.catalog)
    mismatches = {}

    for number, request in enumerate(requests):
        query = query_for(request, max_dis, sort_by_displacement)
        answer = ranker.rank(served_features[request["user_id"]], query)
        expected = reference.rank(user_features[request["user_id"]], query)
        mismatches[number] = disagreement(answer, expected)

    assert {number: text for number, text in mismatches.items() if text} == {}


def test_exhaustive_ranker_gives_the_reference_answer_on_every_request(
    recommender: Recommender,
    reference: Reference,
    user_features: dict[str, np.ndarray],
    requests: list[dict],
) -> None:
    ranker = ExhaustiveRanker(recommender.catalog)
    mismatches = {}

    for number, request in enumerate(requests):
        features = user_features[request["user_id"]]
        query = query_for(request)
        mismatches[number] = disagreement(
            ranker.rank(features, query), reference.rank(features, query)
        )

    assert {number: text for number, text in mismatches.items() if text} == {}


def test_recommender_gives_the_reference_answer_on_every_request(
    recommender: Recommender,
    reference: Reference,
    user_features: dict[str, np.ndarray],
    requests: list[dict],
) -> None:
    async def answer_rows() -> list:
        return [
            await recommender.recommend(request["user_id"], query_for(request))
            for request in requests
        ]

    answers = asyncio.run(answer_rows())

    mismatches = {
        number: disagreement(
            answer, reference.rank(user_features[request["user_id"]], query_for(request))
        )
        for number, (answer, request) in enumerate(zip(answers, requests, strict=True))
    }
    assert {number: text for number, text in mismatches.items() if text} == {}


OTHER_METRICS = {
    "manhattan": {"metric": "manhattan"},
    "cosine": {"metric": "cosine"},
    "chebyshev": {"metric": "chebyshev"},
    "minkowski_p3": {"metric": "minkowski", "p": 3},
    "ball_tree": {"algorithm": "ball_tree"},
}


@pytest.mark.parametrize("arguments", OTHER_METRICS.values(), ids=OTHER_METRICS.keys())
def test_fast_ranker_gives_the_reference_answer_under_other_metrics(
    reference: Reference,
    user_features: dict[str, np.ndarray],
    requests: list[dict],
    arguments: dict,
) -> None:
    estimator = NearestNeighbors(**arguments).fit(reference.estimator._fit_X)
    other = Reference(
        reference.ids, reference.rows, reference.latitude, reference.longitude, estimator
    )
    other.remember(np.array(list(user_features.values())))
    catalog = Catalog(
        other.ids.astype(object),
        other.rows,
        other.latitude,
        other.longitude,
        taste_model(estimator),
    )
    ranker = FastRanker(catalog)
    mismatches = {}

    for number, request in enumerate(requests):
        features = user_features[request["user_id"]]
        query = query_for(request, max_dis=10_000.0)
        mismatches[number] = disagreement(ranker.rank(features, query), other.rank(features, query))

    assert {number: text for number, text in mismatches.items() if text} == {}


def test_restaurants_beyond_max_dis_are_never_returned(
    recommender: Recommender,
    reference: Reference,
    served_features: dict[str, np.ndarray],
    requests: list[dict],
) -> None:
    ranker = FastRanker(recommender.catalog)
    position_of = {identifier: p for p, identifier in enumerate(reference.ids.tolist())}
    farthest = 0.0

    for request in requests:
        query = Query(request["latitude"], request["longitude"], 1000, 2_000.0, False)
        answer = ranker.rank(served_features[request["user_id"]], query)
        positions = [position_of[identifier] for identifier in answer.ids]
        metres = reference.metres(query.latitude, query.longitude)[positions]
        farthest = max(farthest, float(metres.max(initial=0.0)))

    assert 0.0 < farthest <= 2_000.0


@pytest.mark.parametrize("sort_by_displacement", SORTS.values(), ids=SORTS.keys())
@pytest.mark.parametrize("size", [1, 7, 50])
def test_exactly_size_restaurants_are_returned_when_more_are_in_range(
    recommender: Recommender,
    served_features: dict[str, np.ndarray],
    requests: list[dict],
    size: int,
    sort_by_displacement: bool,
) -> None:
    ranker = FastRanker(recommender.catalog)
    lengths = set()

    for request in requests:
        query = Query(
            request["latitude"], request["longitude"], size, 100_000.0, sort_by_displacement
        )
        lengths.add(len(ranker.rank(served_features[request["user_id"]], query).ids))

    assert lengths == {size}


@pytest.mark.parametrize("sort_by_displacement", SORTS.values(), ids=SORTS.keys())
def test_size_larger_than_the_candidate_count_returns_every_candidate(
    recommender: Recommender,
    reference: Reference,
    served_features: dict[str, np.ndarray],
    requests: list[dict],
    sort_by_displacement: bool,
) -> None:
    request = requests[0]
    query = Query(request["latitude"], request["longitude"], 1000, 3_000.0, sort_by_displacement)
    inside = reference.metres(query.latitude, query.longitude) <= query.max_dis

    answer = FastRanker(recommender.catalog).rank(served_features[request["user_id"]], query)

    assert 0 < len(answer.ids) < query.size
    assert sorted(answer.ids) == sorted(reference.ids[inside].tolist())


@pytest.mark.parametrize(
    ("latitude", "longitude", "max_dis"),
    [(0.0, 0.0, 100_000.0), (-33.87, 151.21, 1_000_000.0), (13.75, 100.0, 1.0)],
    ids=["gulf_of_guinea", "sydney", "one_metre_west_of_bangkok"],
)
def test_no_restaurant_in_range_gives_an_empty_list(
    recommender: Recommender,
    served_features: dict[str, np.ndarray],
    latitude: float,
    longitude: float,
    max_dis: float,
) -> None:
    features = next(iter(served_features.values()))

    answer = FastRanker(recommender.catalog).rank(
        features, Query(latitude, longitude, 20, max_dis, False)
    )

    assert isinstance(answer.ids, list)
    assert (answer.ids, len(answer.difference), len(answer.displacement)) == ([], 0, 0)
    assert answer.n_candidates == 0


def test_unknown_user_is_refused(recommender: Recommender) -> None:
    query = Query(13.75, 100.5, 20, 5_000.0, False)

    with pytest.raises(UnknownUser):
        asyncio.run(recommender.recommend("no-such-user", query))


# A hand-made catalog around one point, to pin down the order of ties.
CENTRE = (13.75, 100.5)
TASTES = {"A": [1.0, 0.0, 0.0], "B": [0.0, 1.0, 0.0], "C": [0.0, 0.0, 1.0]}
# Differences from this user: A 0.2, B 1.28, C 1.43.
USER = np.array([1.0, 0.2, 0.0])


def place(azimuth: float, metres: float) -> tuple[float, float]:
    longitude, latitude, _ = GEOD.fwd(CENTRE[1], CENTRE[0], azimuth, metres)
    return latitude, longitude


def tiny(restaurants: list[tuple[str, str, tuple[float, float]]]) -> tuple[Catalog, Reference]:
    """A catalog and its reference from (id, taste, (latitude, longitude)) triples.

    Model rows run in the opposite order to the list, so a row is never its list position.
    """
    n = len(restaurants)
    rows = np.arange(n)[::-1].copy()
    embeddings = np.empty((n, 3))
    embeddings[rows] = [TASTES[taste] for _, taste, _ in restaurants]
    estimator = NearestNeighbors().fit(embeddings)
    ids = [identifier for identifier, _, _ in restaurants]
    latitude = np.array([point[0] for _, _, point in restaurants])
    longitude = np.array([point[1] for _, _, point in restaurants])
    catalog = Catalog(
        np.array(ids, dtype=object), rows, latitude, longitude, taste_model(estimator)
    )
    return catalog, Reference(ids, rows, latitude, longitude, estimator)


RANKERS = {
    "fast": lambda catalog, reference: FastRanker(catalog).rank,
    "exhaustive": lambda catalog, reference: ExhaustiveRanker(catalog).rank,
    "reference": lambda catalog, reference: reference.rank,
}


@pytest.mark.parametrize("ranker", RANKERS.values(), ids=RANKERS.keys())
def test_equal_differences_are_ordered_by_rounded_displacement_then_by_id(ranker) -> None:
    catalog, reference = tiny(
        [
            ("r4", "A", place(0, 300.0)),
            ("r3", "A", place(0, 200.0)),
            ("r2", "B", place(0, 10.0)),
            ("r1", "A", place(120, 200.0)),
            ("r0", "A", place(240, 200.4)),
        ]
    )

    answer = ranker(catalog, reference)(USER, Query(*CENTRE, 10, 1_000.0, False))

    assert answer.ids == ["r0", "r1", "r3", "r4", "r2"]


@pytest.mark.parametrize("ranker", RANKERS.values(), ids=RANKERS.keys())
def test_equal_rounded_displacements_are_ordered_by_difference_then_by_id(ranker) -> None:
    catalog, reference = tiny(
        [
            ("r5", "C", place(0, 150.3)),
            ("r4", "A", place(60, 149.6)),
            ("r3", "B", place(120, 150.0)),
            ("r2", "A", place(180, 150.2)),
            ("r1", "C", place(240, 20.0)),
            ("r0", "A", place(300, 400.0)),
        ]
    )

    answer = ranker(catalog, reference)(USER, Query(*CENTRE, 10, 1_000.0, True))

    assert answer.ids == ["r1", "r2", "r4", "r3", "r5", "r0"]
    assert answer.displacement.tolist() == [20, 150, 150, 150, 150, 400]


@pytest.mark.parametrize("sort_by_displacement", SORTS.values(), ids=SORTS.keys())
@pytest.mark.parametrize("ranker", RANKERS.values(), ids=RANKERS.keys())
def test_ties_on_both_keys_are_ordered_by_id_as_text(ranker, sort_by_displacement: bool) -> None:
    spot = place(45, 75.0)
    catalog, reference = tiny(
        [(identifier, "B", spot) for identifier in ("r9", "r100", "r1", "r10")]
    )

    answer = ranker(catalog, reference)(USER, Query(*CENTRE, 10, 1_000.0, sort_by_displacement))

    assert answer.ids == ["r1", "r10", "r100", "r9"]


@pytest.mark.parametrize("sort_by_displacement", SORTS.values(), ids=SORTS.keys())
@pytest.mark.parametrize("ranker", RANKERS.values(), ids=RANKERS.keys())
def test_the_cut_through_tied_restaurants_keeps_the_smallest_ids(
    ranker, sort_by_displacement: bool
) -> None:
    spot = place(200, 500.0)
    tied = [(identifier, "B", spot) for identifier in ("e", "b", "f", "d", "c")]
    catalog, reference = tiny([*tied, ("z", "A", place(200, 50.0)), ("a", "C", place(0, 900.0))])

    answer = ranker(catalog, reference)(USER, Query(*CENTRE, 3, 1_000.0, sort_by_displacement))

    assert answer.ids == ["z", "b", "c"]


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_features=st.integers(2, 40),
    noise=st.sampled_from([0.0, 0.01, 1.0, 100.0]),
)
def test_projection_bounds_enclose_every_exact_squared_difference(
    seed: int, n_features: int, noise: float
) -> None:
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((60, 3)) @ rng.standard_normal((3, n_features))
    embeddings = latent + noise * rng.standard_normal((60, n_features))
    user = embeddings[0] * 0.5 + noise * rng.standard_normal(n_features)
    bounds = ProjectionBounds(embeddings, n_components=4)

    lower, upper = bounds.squared(user, np.arange(60))

    exact = ((embeddings - user) ** 2).sum(axis=1)
    slack = 1e-9 * (1 + exact)
    assert np.all(lower <= exact + slack)
    assert np.all(exact <= upper + slack)
