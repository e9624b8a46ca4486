"""The spatial index returns exactly the restaurants a brute-force geodesic filter keeps.

Query points range over the whole globe, with extra weight near the poles, across the
antimeridian and near the twelve H3 pentagons, where a grid-based pre-filter is most likely
to miss a corner of the circle. Restaurants are placed around each query point, many of them
a hair inside or outside the radius.
"""

import math

import h3.api.basic_int as h3
import numpy as np
import pyproj
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recommender.geo import SpatialIndex, arc_upper_bound

GEOD = pyproj.Geod(ellps="WGS84")
LARGEST_RADIUS = 3e7
BOUNDARY_FACTORS = (1 - 1e-9, 1.0, 1 + 1e-9)
PENTAGON_CENTRES = sorted(
    {h3.cell_to_latlng(cell) for resolution in range(16) for cell in h3.get_pentagons(resolution)}
)
# Radii around which a cell-based pre-filter changes its resolution: a few average hexagon
# edges of each resolution from 0 (about 1,281 km) to 10 (about 76 m).
RESOLUTION_RADII = sorted(
    factor * h3.average_hexagon_edge_length(resolution, unit="m")
    for resolution in range(11)
    for factor in (0.85, 2.5, 3.4, 4.0)
)


def brute_force_within(
    latitude: float, longitude: float, latitudes: np.ndarray, longitudes: np.ndarray, radius: float
) -> set[int]:
    """Input rows whose WGS-84 geodesic distance from the point is at most ``radius`` metres."""
    metres = geodesic(latitude, longitude, latitudes, longitudes)
    return set(np.flatnonzero(metres <= radius).tolist())


def geodesic(
    latitude: float, longitude: float, latitudes: np.ndarray, longitudes: np.ndarray
) -> np.ndarray:
    n = len(latitudes)
    _, _, metres = GEOD.inv(np.full(n, longitude), np.full(n, latitude), longitudes, latitudes)
    return np.asarray(metres, dtype=np.float64)


def points_around(
    latitude: float, longitude: float, azimuths: list[float], distances: list[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Latitudes and longitudes of the points at each azimuth (degrees) and distance (metres)."""
    n = len(azimuths)
    longitudes, latitudes, _ = GEOD.fwd(
        np.full(n, longitude), np.full(n, latitude), np.asarray(azimuths), np.asarray(distances)
    )
    return np.asarray(latitudes, dtype=np.float64), np.asarray(longitudes, dtype=np.float64)


def candidate_rows(index: SpatialIndex, latitude: float, longitude: float, radius: float) -> set:
    return set(index.order[index.within(latitude, longitude, radius).positions].tolist())


def _offset(point: tuple[float, float], azimuth: float, metres: float) -> tuple[float, float]:
    longitude, latitude, _ = GEOD.fwd(point[1], point[0], azimuth, metres)
    return latitude, longitude


latitudes = st.floats(-90, 90)
longitudes = st.floats(-180, 180)
anywhere = st.tuples(latitudes, longitudes)
near_a_pole = st.builds(
    lambda sign, offset, longitude: (sign * (90 - offset), longitude),
    st.sampled_from([-1, 1]),
    st.floats(0, 0.5),
    longitudes,
)
across_the_antimeridian = st.builds(
    lambda latitude, sign, offset: (latitude, sign * (180 - offset)),
    latitudes,
    st.sampled_from([-1, 1]),
    st.floats(0, 0.5),
)
near_a_pentagon = st.builds(
    _offset,
    st.sampled_from(PENTAGON_CENTRES),
    st.floats(-180, 180),
    st.floats(-1, 5.5).map(lambda exponent: 10**exponent),
)
query_points = st.one_of(anywhere, near_a_pole, across_the_antimeridian, near_a_pentagon)
radii = st.one_of(
    st.floats(0, math.log10(LARGEST_RADIUS)).map(lambda exponent: 10**exponent),
    st.sampled_from(RESOLUTION_RADII),
    st.sampled_from([1.0, 1e6, 20_003_931.0, 20_004_000.0, LARGEST_RADIUS]),
)
azimuths = st.floats(-180, 180)
# Up to three times the radius away: inside, near and well outside the circle.
spread = st.lists(st.tuples(azimuths, st.floats(0, 3)), min_size=1, max_size=40)
boundary = st.lists(azimuths, min_size=1, max_size=8)


@st.composite
def scenes(draw) -> tuple[float, float, float, np.ndarray, np.ndarray]:
    """A query point, a radius, and restaurants around it (latitudes, longitudes)."""
    latitude, longitude = draw(query_points)
    radius = draw(radii)
    placed = draw(spread)
    edge = draw(boundary)
    directions = [azimuth for azimuth, _ in placed]
    distances = [fraction * radius for _, fraction in placed]
    for azimuth in edge:
        directions += [azimuth] * len(BOUNDARY_FACTORS)
        distances += [radius * factor for factor in BOUNDARY_FACTORS]
    restaurant_latitudes, restaurant_longitudes = points_around(
        latitude, longitude, directions, distances
    )
    return latitude, longitude, radius, restaurant_latitudes, restaurant_longitudes


@settings(max_examples=400, deadline=None)
@given(scenes())
def test_candidates_are_exactly_the_restaurants_within_max_dis(scene) -> None:
    latitude, longitude, radius, restaurant_latitudes, restaurant_longitudes = scene
    index = SpatialIndex(restaurant_latitudes, restaurant_longitudes)

    found = candidate_rows(index, latitude, longitude, radius)

    expected = brute_force_within(
        latitude, longitude, restaurant_latitudes, restaurant_longitudes, radius
    )
    assert found == expected


@settings(max_examples=150, deadline=None)
@given(scenes())
def test_candidate_positions_are_ascending_and_unique(scene) -> None:
    latitude, longitude, radius, restaurant_latitudes, restaurant_longitudes = scene
    index = SpatialIndex(restaurant_latitudes, restaurant_longitudes)

    positions = index.within(latitude, longitude, radius).positions

    assert np.all(np.diff(positions) > 0)


@settings(max_examples=150, deadline=None)
@given(scenes())
def test_chord_of_a_candidate_is_never_more_than_its_geodesic(scene) -> None:
    latitude, longitude, radius, restaurant_latitudes, restaurant_longitudes = scene
    index = SpatialIndex(restaurant_latitudes, restaurant_longitudes)

    candidates = index.within(latitude, longitude, radius)

    exact = geodesic(
        latitude,
        longitude,
        index.latitude[candidates.positions],
        index.longitude[candidates.positions],
    )
    # Earth-centred coordinates carry rounding of a few nanometres.
    assert np.all(candidates.chord <= exact + 1e-6)


@settings(max_examples=150, deadline=None)
@given(scenes())
def test_arc_upper_bound_of_a_chord_is_never_less_than_the_geodesic(scene) -> None:
    latitude, longitude, radius, restaurant_latitudes, restaurant_longitudes = scene
    index = SpatialIndex(restaurant_latitudes, restaurant_longitudes)
    candidates = index.within(latitude, longitude, radius)

    bound = arc_upper_bound(candidates.chord)

    exact = geodesic(
        latitude,
        longitude,
        index.latitude[candidates.positions],
        index.longitude[candidates.positions],
    )
    assert np.all(bound >= exact)


@settings(max_examples=150, deadline=None)
@given(scenes())
def test_displacement_is_the_pyproj_geodesic_in_metres(scene) -> None:
    latitude, longitude, _, restaurant_latitudes, restaurant_longitudes = scene
    index = SpatialIndex(restaurant_latitudes, restaurant_longitudes)
    positions = np.arange(len(index))

    displacement = index.displacement(latitude, longitude, positions)

    rows = index.order[positions]
    expected = geodesic(
        latitude, longitude, restaurant_latitudes[rows], restaurant_longitudes[rows]
    )
    np.testing.assert_allclose(displacement, expected, rtol=0, atol=1e-9)


SPECIAL_POINTS = {
    **{f"pentagon_{i}": centre for i, centre in enumerate(PENTAGON_CENTRES[::11])},
    "north_pole": (90.0, 0.0),
    "south_pole": (-90.0, 45.0),
    "antimeridian_east": (10.0, 180.0),
    "antimeridian_west": (-35.0, -179.9999),
    "bangkok": (13.7563, 100.5018),
}


@pytest.mark.parametrize("point", SPECIAL_POINTS.values(), ids=SPECIAL_POINTS.keys())
def test_a_ring_just_inside_every_resolution_radius_is_found_whole(
    point: tuple[float, float],
) -> None:
    latitude, longitude = point
    ring = np.linspace(-180, 180, 72, endpoint=False)
    directions = np.tile(ring, len(RESOLUTION_RADII))
    distances = np.repeat(np.array(RESOLUTION_RADII) * (1 - 1e-9), len(ring))
    restaurant_latitudes, restaurant_longitudes = points_around(
        latitude, longitude, directions.tolist(), distances.tolist()
    )
    index = SpatialIndex(restaurant_latitudes, restaurant_longitudes)

    missing = {
        radius: len(
            brute_force_within(
                latitude, longitude, restaurant_latitudes, restaurant_longitudes, radius
            )
            - candidate_rows(index, latitude, longitude, radius)
        )
        for radius in RESOLUTION_RADII
    }

    assert {radius: count for radius, count in missing.items() if count} == {}


def test_no_candidate_in_an_empty_spot() -> None:
    index = SpatialIndex(np.array([13.75, 13.76]), np.array([100.5, 100.51]))

    candidates = index.within(0.0, 0.0, 1.0)

    assert (len(candidates.positions), len(candidates.chord)) == (0, 0)
