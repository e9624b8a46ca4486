"""Which restaurants lie within a radius, and how far away they are, on the WGS-84 ellipsoid.

Three steps narrow the work, and only the last decides:

1. An H3 pre-filter: restaurants are sorted by their H3 cell, so the restaurants under any
   coarser cell form one contiguous slice. A disk of cells around the query point, wide
   enough to contain the whole circle, gives a few slices.
2. Chord bounds: the straight-line (chord) distance between two points is never more than
   the geodesic, and a geodesic is never longer than the arc of a circle of the ellipsoid's
   smallest radius of curvature over the same chord. Rows whose chord exceeds the radius
   are out; rows whose arc bound is within it are in.
3. Exact geodesics (Karney's algorithm, through pyproj) for the few rows between the bounds.
"""

import math
from dataclasses import dataclass

import h3.api.basic_int as h3
import numpy as np
import pyproj

GEOD = pyproj.Geod(ellps="WGS84")
_TO_ECEF = pyproj.Transformer.from_crs("EPSG:4326", "EPSG:4978", always_xy=True)

# The smallest radius of curvature of the WGS-84 ellipsoid is a(1 - e^2) = 6,335,439 m
# (meridional, at the equator); a smaller value only widens the band checked exactly.
_MIN_CURVATURE_RADIUS = 6_300_000.0
# The arc bound holds for arcs shorter than half a circle of that radius; stay far below.
_ARC_BOUND_CHORD_LIMIT = 1_000_000.0
# No two points of the ellipsoid are farther apart than half a meridian, 20,003,931 m.
_LONGEST_GEODESIC = 20_004_000.0
# Slack against rounding in coordinates and chords: metres, and a relative part.
_ABSOLUTE_SLACK = 1e-6
_RELATIVE_SLACK = 1e-12

FINE_RESOLUTION = 10
# Cells of a coarser resolution vary in size; local edge lengths are shrunk by this factor
# before counting the rings needed, and one extra ring covers children overhanging parents.
_EDGE_SAFETY = 0.85
_MAX_RINGS = 5
_AVERAGE_EDGE = [h3.average_hexagon_edge_length(r, unit="m") for r in range(FINE_RESOLUTION + 1)]


@dataclass(frozen=True)
class Candidates:
    """Restaurants within the radius of a query point.

    Attributes
    ----------
    positions : ndarray of shape (n_candidates,), dtype int64
        Positions in the index's order, ascending.
    chord : ndarray of shape (n_candidates,), dtype float64
        Straight-line distance in metres: a lower bound of each displacement.
    n_scanned : int
        Rows the pre-filter handed to the exact test.
    """

    positions: np.ndarray
    chord: np.ndarray
    n_scanned: int


def fine_cells(latitude: np.ndarray, longitude: np.ndarray) -> np.ndarray:
    """The H3 cell of each point at the index's resolution, shape (n,), dtype uint64."""
    cells = [
        h3.latlng_to_cell(lat, lon, FINE_RESOLUTION)
        for lat, lon in zip(latitude.tolist(), longitude.tolist(), strict=True)
    ]
    return np.array(cells, dtype=np.uint64)


def to_ecef(latitude: np.ndarray, longitude: np.ndarray) -> np.ndarray:
    """Earth-centred coordinates in metres, shape (n, 3), of points on the ellipsoid."""
    x, y, z = _TO_ECEF.transform(longitude, latitude, np.zeros_like(latitude))
    return np.column_stack([x, y, z])


def geodesic_distance(
    latitude: float, longitude: float, latitudes: np.ndarray, longitudes: np.ndarray
) -> np.ndarray:
    """WGS-84 geodesic distance in metres from one point to each of many, shape (n,)."""
    n = len(latitudes)
    if n == 0:
        return np.empty(0, dtype=np.float64)
    _, _, distance = GEOD.inv(np.full(n, longitude), np.full(n, latitude), longitudes, latitudes)
    return np.asarray(distance, dtype=np.float64)


def arc_upper_bound(chord: np.ndarray) -> np.ndarray:
    """An upper bound in metres of the geodesic between two points ``chord`` metres apart.

    Infinite where the chord is too long for the bound to hold.
    """
    ratio = np.minimum(chord / (2 * _MIN_CURVATURE_RADIUS), 1.0)
    bound = 2 * _MIN_CURVATURE_RADIUS * np.arcsin(ratio)
    bound = bound * (1 + _RELATIVE_SLACK) + _ABSOLUTE_SLACK
    return np.where(chord < _ARC_BOUND_CHORD_LIMIT, bound, np.inf)


class SpatialIndex:
    """Restaurant locations ordered by H3 cell, answering "which are within r metres?".

    Parameters
    ----------
    latitude, longitude : ndarray of shape (n_restaurants,)
        WGS-84 degrees.
    tie_break : ndarray of shape (n_restaurants,), optional
        Sort key for points in the same fine cell.
    cells : ndarray of shape (n_restaurants,), optional
        The points' H3 cells at ``FINE_RESOLUTION``, when already known.

    Attributes
    ----------
    order : ndarray of shape (n_restaurants,), dtype int64
        ``order[p]`` is the input row stored at position ``p``; every other array of the
        index, and every position it returns, follows this order.
    """

    def __init__(
        self,
        latitude: np.ndarray,
        longitude: np.ndarray,
        tie_break: np.ndarray | None = None,
        cells: np.ndarray | None = None,
    ) -> None:
        fine = fine_cells(latitude, longitude) if cells is None else cells.astype(np.uint64)
        # Within a cell, ``tie_break`` fixes the order so it does not depend on the input's.
        self.order = np.lexsort((tie_break, fine)) if tie_break is not None else np.argsort(fine)
        self.latitude = np.ascontiguousarray(latitude[self.order], dtype=np.float64)
        self.longitude = np.ascontiguousarray(longitude[self.order], dtype=np.float64)
        ecef = to_ecef(self.latitude, self.longitude)
        self._x, self._y, self._z = (np.ascontiguousarray(ecef[:, axis]) for axis in range(3))
        fine = fine[self.order]
        # Ordering by a fine cell also orders by every ancestor of it: an ancestor's id is the
        # fine id with its trailing digits overwritten by one fixed value.
        self._cells = [
            np.array([h3.cell_to_parent(int(cell), r) for cell in fine], dtype=np.uint64)
            for r in range(FINE_RESOLUTION)
        ] + [fine]

    def __len__(self) -> int:
        return len(self.order)

    def within(self, latitude: float, longitude: float, max_dis: float) -> Candidates:
        """Every restaurant whose geodesic distance from the point is at most ``max_dis`` metres."""
        scanned = self._prefilter(latitude, longitude, max_dis)
        ox, oy, oz = _TO_ECEF.transform(longitude, latitude, 0.0)
        dx, dy, dz = self._x[scanned] - ox, self._y[scanned] - oy, self._z[scanned] - oz
        squared = dx * dx + dy * dy + dz * dz

        limit = max_dis * (1 + _RELATIVE_SLACK) + _ABSOLUTE_SLACK
        possible = np.flatnonzero(squared <= limit * limit)
        positions, chord = scanned[possible], np.sqrt(squared[possible])
        if max_dis >= _LONGEST_GEODESIC:
            return Candidates(positions=positions, chord=chord, n_scanned=len(scanned))
        uncertain = np.flatnonzero(chord > _chord_surely_within(max_dis))
        if len(uncertain):
            band = positions[uncertain]
            exact = geodesic_distance(
                latitude, longitude, self.latitude[band], self.longitude[band]
            )
            keep = np.ones(len(positions), dtype=bool)
            keep[uncertain[exact > max_dis]] = False
            positions, chord = positions[keep], chord[keep]
        return Candidates(positions=positions, chord=chord, n_scanned=len(scanned))

    def displacement(self, latitude: float, longitude: float, positions: np.ndarray) -> np.ndarray:
        """Geodesic distance in metres from the point to the restaurants at ``positions``."""
        return geodesic_distance(
            latitude, longitude, self.latitude[positions], self.longitude[positions]
        )

    def _prefilter(self, latitude: float, longitude: float, max_dis: float) -> np.ndarray:
        """Positions (ascending) of a superset of the restaurants within ``max_dis``."""
        resolution = _resolution_for(max_dis)
        if resolution is None:
            return np.arange(len(self), dtype=np.int64)

        centre = h3.latlng_to_cell(latitude, longitude, resolution)
        local_edge = math.sqrt(2 * h3.cell_area(centre, unit="m^2") / (3 * math.sqrt(3)))
        rings = math.ceil(max_dis / (_EDGE_SAFETY * local_edge)) + 1
        cells = np.sort(np.array(h3.grid_disk(centre, rings), dtype=np.uint64))

        keys = self._cells[resolution]
        starts = np.searchsorted(keys, cells, side="left")
        stops = np.searchsorted(keys, cells, side="right")
        return _concatenate_ranges(starts, stops)


def _chord_surely_within(max_dis: float) -> float:
    """The longest chord whose geodesic is surely at most ``max_dis`` metres (by the arc bound)."""
    arc = (max_dis - _ABSOLUTE_SLACK) / (1 + _RELATIVE_SLACK)
    if arc <= 0:
        return 0.0
    if arc >= math.pi * _MIN_CURVATURE_RADIUS:
        return 0.0
    chord = 2 * _MIN_CURVATURE_RADIUS * math.sin(arc / (2 * _MIN_CURVATURE_RADIUS))
    return min(chord, _ARC_BOUND_CHORD_LIMIT)


def _resolution_for(max_dis: float) -> int | None:
    """The finest resolution whose cells are large enough for a small disk, or None."""
    for resolution in range(FINE_RESOLUTION, -1, -1):
        if max_dis <= (_MAX_RINGS - 1) * _EDGE_SAFETY * _AVERAGE_EDGE[resolution]:
            return resolution
    return None


def _concatenate_ranges(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """All integers in the half-open ranges [starts[i], stops[i]), ascending."""
    lengths = stops - starts
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    offsets = np.repeat(starts - np.cumsum(lengths) + lengths, lengths)
    return (offsets + np.arange(total)).astype(np.int64)
