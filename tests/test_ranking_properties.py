"""Invariants of every answer, on random restaurants, embeddings and users."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.neighbors import NearestNeighbors

from recommender.geo import geodesic_distance
from recommender.model import taste_model
from recommender.ranking import Catalog, FastRanker, Query, Ranking

CENTRE = (13.8, 100.5)


def _ranker(seed: int, n_restaurants: int, n_features: int, metric: str) -> FastRanker:
    rng = np.random.default_rng(seed)
    latitude = CENTRE[0] + rng.normal(0, 0.05, n_restaurants)
    longitude = CENTRE[1] + rng.normal(0, 0.05, n_restaurants)
    embeddings = rng.standard_normal((n_restaurants, n_features))
    model = taste_model(NearestNeighbors(metric=metric).fit(embeddings))
    ids = np.array([f"r{i:04d}" for i in range(n_restaurants)], dtype=object)
    return FastRanker(Catalog(ids, np.arange(n_restaurants), latitude, longitude, model))


def _key(ranking: Ranking, position: int, by_displacement: bool) -> tuple:
    difference = ranking.difference[position]
    displacement = ranking.displacement[position]
    first, second = (displacement, difference) if by_displacement else (difference, displacement)
    return (first, second, ranking.ids[position])


cases = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**32 - 1),
        "n_restaurants": st.integers(1, 300),
        "n_features": st.integers(1, 12),
        "metric": st.sampled_from(["euclidean", "manhattan", "cosine"]),
        "size": st.integers(1, 40),
        "max_dis": st.floats(1.0, 30_000.0),
        "by_displacement": st.booleans(),
        "offset": st.tuples(st.floats(-0.1, 0.1), st.floats(-0.1, 0.1)),
    }
)


def _query(case: dict, max_dis: float | None = None) -> Query:
    return Query(
        latitude=CENTRE[0] + case["offset"][0],
        longitude=CENTRE[1] + case["offset"][1],
        size=case["size"],
        max_dis=case["max_dis"] if max_dis is None else max_dis,
        sort_by_displacement=case["by_displacement"],
    )


def _user(case: dict) -> np.ndarray:
    return np.random.default_rng(case["seed"] + 1).standard_normal(case["n_features"])


@settings(max_examples=60, deadline=None)
@given(case=cases)
def test_every_answer_is_within_max_dis_sorted_and_at_most_size(case: dict) -> None:
    ranker = _ranker(case["seed"], case["n_restaurants"], case["n_features"], case["metric"])
    query = _query(case)

    ranking = ranker.rank(_user(case), query)

    assert len(ranking.ids) <= query.size
    positions = [int(np.flatnonzero(ranker.catalog.ids == i)[0]) for i in ranking.ids]
    exact = geodesic_distance(
        query.latitude,
        query.longitude,
        ranker.catalog.index.latitude[positions],
        ranker.catalog.index.longitude[positions],
    )
    assert np.all(exact <= query.max_dis)
    keys = [_key(ranking, i, query.sort_by_displacement) for i in range(len(ranking.ids))]
    assert keys == sorted(keys)


@settings(max_examples=60, deadline=None)
@given(case=cases, growth=st.floats(1.0, 10.0))
def test_a_larger_radius_drops_a_restaurant_only_for_better_ranked_ones(
    case: dict, growth: float
) -> None:
    ranker = _ranker(case["seed"], case["n_restaurants"], case["n_features"], case["metric"])
    user = _user(case)
    near = ranker.rank(user, _query(case))
    far = ranker.rank(user, _query(case, case["max_dis"] * growth))

    by_displacement = case["by_displacement"]
    far_keys = [_key(far, i, by_displacement) for i in range(len(far.ids))]
    for position, restaurant in enumerate(near.ids):
        if restaurant in far.ids:
            continue
        lost = _key(near, position, by_displacement)
        assert len(far.ids) == case["size"]
        assert all(key < lost for key in far_keys)


@settings(max_examples=30, deadline=None)
@given(case=cases)
def test_the_same_question_gets_the_same_answer(case: dict) -> None:
    ranker = _ranker(case["seed"], case["n_restaurants"], case["n_features"], case["metric"])

    first = ranker.rank(_user(case), _query(case))
    second = ranker.rank(_user(case), _query(case))

    assert first.ids == second.ids
    assert np.array_equal(first.difference, second.difference)
    assert np.array_equal(first.displacement, second.displacement)
