"""Exact ranking of the restaurants near a user by the model's difference.

Two rankers give the same answers. ``FastRanker`` asks the spatial index for the candidates
and measures differences on those alone. ``ExhaustiveRanker`` is the reference: the model's
own ``kneighbors`` over every restaurant, then the geodesic filter, sort and cut.

The order of an answer: by difference (or, with ``sort_by_displacement``, by displacement
rounded to whole metres), ties broken on the other key, then on the restaurant id.
"""

import contextlib
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import DistanceMetric, pairwise_distances
from sklearn.utils.extmath import randomized_svd

from recommender.dataset.reader import DataError
from recommender.geo import SpatialIndex, arc_upper_bound, geodesic_distance
from recommender.model import TasteModel


@dataclass(frozen=True)
class Query:
    """Where the user stands and what they asked for (already validated).

    ``latitude`` and ``longitude`` in WGS-84 degrees, ``max_dis`` in metres.
    """

    latitude: float
    longitude: float
    size: int
    max_dis: float
    sort_by_displacement: bool


@dataclass(frozen=True)
class Ranking:
    """An answer, best first.

    Attributes
    ----------
    ids : list of str, length n_returned
    difference : ndarray of shape (n_returned,), float64
        The model's distance between the user features and each restaurant embedding.
    displacement : ndarray of shape (n_returned,), int64
        Geodesic distance in whole metres.
    n_candidates : int
        Restaurants within ``max_dis``.
    """

    ids: list[str]
    difference: np.ndarray
    displacement: np.ndarray
    n_candidates: int


class Catalog:
    """Restaurants in spatial order, with their embeddings laid out in the same order.

    Parameters
    ----------
    ids : ndarray of shape (n_restaurants,), dtype object (str)
    rows : ndarray of shape (n_restaurants,), dtype int64
        Each restaurant's row in the model.
    latitude, longitude : ndarray of shape (n_restaurants,), WGS-84 degrees
    model : TasteModel
    cells : ndarray of shape (n_restaurants,), optional
        H3 cells of the restaurants at the spatial index's resolution, when already known.
    """

    def __init__(
        self,
        ids: np.ndarray,
        rows: np.ndarray,
        latitude: np.ndarray,
        longitude: np.ndarray,
        model: TasteModel,
        cells: np.ndarray | None = None,
    ) -> None:
        ids = np.asarray(ids, dtype=object)
        self.index = SpatialIndex(latitude, longitude, tie_break=ids, cells=cells)
        order = self.index.order
        self.ids = ids[order]
        self.rows = np.asarray(rows, dtype=np.int64)[order]
        self.id_rank = np.argsort(np.argsort(self.ids, kind="stable"), kind="stable")
        self.model = model
        # The model's own embeddings, not a copy: the exact pass reads only a few rows.
        self._difference = Difference(model, model.embeddings)
        self._check_difference_matches_model()
        self.bounds = None
        if model.metric in _EUCLIDEAN:
            self.bounds = _projection_bounds(model.embeddings[self.rows])

    def __len__(self) -> int:
        return len(self.ids)

    def difference(self, user: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """The model's differences, shape (len(positions),), to the restaurants at ``positions``."""
        return self._difference(user, self.rows[positions])

    def _check_difference_matches_model(self) -> None:
        """Refuse at start a metric this service would measure differently from the model."""
        probe = self.model.embeddings[self.rows[0]]
        n_neighbors = min(self.model.n_rows, 8)
        expected, rows = self.model.estimator.kneighbors(probe[np.newaxis, :], n_neighbors)
        measured = self._difference(probe, rows[0])
        reference = expected[0]
        gap = np.max(np.abs(measured - reference) / np.maximum(1.0, np.abs(reference)), initial=0)
        if not gap <= 1e-6:
            raise DataError(
                f"the model's metric {self.model.metric!r} is measured here {gap:.3g} (relative) "
                "away from the model's own kneighbors; this metric is not supported"
            )

    def answer(
        self,
        positions: np.ndarray,
        difference: np.ndarray,
        displacement: np.ndarray,
        query: Query,
        n_candidates: int,
    ) -> Ranking:
        """Order the given rows as the answer orders them and cut to ``query.size``."""
        rounded = np.rint(displacement).astype(np.int64)
        if query.sort_by_displacement:
            order = np.lexsort((self.id_rank[positions], difference, rounded))
        else:
            order = np.lexsort((self.id_rank[positions], rounded, difference))
        order = order[: query.size]
        return Ranking(
            ids=self.ids[positions[order]].tolist(),
            difference=difference[order],
            displacement=rounded[order],
            n_candidates=n_candidates,
        )


class Difference:
    """The model's metric between one user's features and many restaurant embeddings.

    Called with model rows: ``difference(user, rows)`` measures against ``embeddings[rows]``.

    Common metrics are computed directly; any other the way the model's ``kneighbors``
    measures it: scikit-learn's ``DistanceMetric`` where it knows the metric, else
    ``pairwise_distances``.
    """

    def __init__(self, model: TasteModel, embeddings: np.ndarray) -> None:
        self.metric = model.metric
        self.params = {
            name: value for name, value in model.metric_params.items() if value is not None
        }
        self.embeddings = embeddings
        self._kernel = _kernel_for(self.metric, self.params)
        self._distance_metric = None
        if self._kernel is None:
            with contextlib.suppress(ValueError, TypeError):
                self._distance_metric = DistanceMetric.get_metric(self.metric, **self.params)
        self._cosine_norms = None
        if self.metric == "cosine" and not self.params:
            norms = np.linalg.norm(embeddings, axis=1)
            # As scikit-learn does, a zero vector is left as it is rather than normalised.
            self._cosine_norms = np.where(norms == 0, 1.0, norms)

    def __call__(self, user: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Differences, shape (len(rows),), float64, for ``user`` of shape (n_features,)."""
        if len(rows) == 0:
            return np.empty(0, dtype=np.float64)
        if self._cosine_norms is not None:
            return self._cosine(user, rows)
        block = self.embeddings[rows]
        if self._kernel is not None:
            return self._kernel(block, user)
        if self._distance_metric is not None:
            return self._distance_metric.pairwise(user[np.newaxis, :], block)[0]
        return pairwise_distances(user[np.newaxis, :], block, metric=self.metric, **self.params)[0]

    def _cosine(self, user: np.ndarray, rows: np.ndarray) -> np.ndarray:
        user_norm = np.linalg.norm(user) or 1.0
        similarity = (self.embeddings[rows] @ user) / (self._cosine_norms[rows] * user_norm)
        return np.clip(1.0 - similarity, 0.0, 2.0)


def _euclidean(block: np.ndarray, user: np.ndarray) -> np.ndarray:
    block -= user
    return np.sqrt(np.einsum("ij,ij->i", block, block))


def _squared_euclidean(block: np.ndarray, user: np.ndarray) -> np.ndarray:
    block -= user
    return np.einsum("ij,ij->i", block, block)


def _manhattan(block: np.ndarray, user: np.ndarray) -> np.ndarray:
    block -= user
    return np.abs(block).sum(axis=1)


def _chebyshev(block: np.ndarray, user: np.ndarray) -> np.ndarray:
    block -= user
    return np.abs(block).max(axis=1)


def _minkowski(p: float):
    if p == 1:
        return _manhattan
    if p == 2:
        return _euclidean
    if np.isinf(p):
        return _chebyshev

    def minkowski(block: np.ndarray, user: np.ndarray) -> np.ndarray:
        block -= user
        return (np.abs(block) ** p).sum(axis=1) ** (1 / p)

    return minkowski


_DIRECT_METRICS = {
    "euclidean": _euclidean,
    "l2": _euclidean,
    "sqeuclidean": _squared_euclidean,
    "manhattan": _manhattan,
    "cityblock": _manhattan,
    "l1": _manhattan,
    "chebyshev": _chebyshev,
    "infinity": _chebyshev,
}


def _kernel_for(metric, params: dict):
    """A direct implementation of the metric, or None to defer to scikit-learn."""
    if not isinstance(metric, str):
        return None
    if not params:
        return _DIRECT_METRICS.get(metric)
    if metric == "minkowski" and set(params) == {"p"}:
        return _minkowski(float(params["p"]))
    return None


_EUCLIDEAN = ("euclidean", "l2", "sqeuclidean")


class ProjectionBounds:
    """Cheap lower and upper bounds of squared euclidean differences.

    The embeddings are split, around their mean, into a part inside a few principal
    directions and a residual. For a user ``u`` and a restaurant ``r`` with projections
    ``a``, ``b`` and residual norms ``ru``, ``rr``::

        |a - b|^2 + (ru - rr)^2  <=  |u - r|^2  <=  |a - b|^2 + (ru + rr)^2

    (Pythagoras, then the triangle inequality on the residuals). Any orthonormal directions
    give valid bounds; principal ones make them tight, so only a few rows beyond ``size``
    need their exact difference.

    Parameters
    ----------
    embeddings : ndarray of shape (n_restaurants, n_features), float64
    n_components : int
        Directions kept, at most half the feature count.
    """

    def __init__(self, embeddings: np.ndarray, n_components: int = 32) -> None:
        n_restaurants, n_features = embeddings.shape
        n_components = max(1, min(n_components, n_features // 2, n_restaurants))
        self.mean = embeddings.mean(axis=0)
        sample = embeddings[np.linspace(0, n_restaurants - 1, min(n_restaurants, 2048)).astype(int)]
        _, _, basis = randomized_svd(
            sample - self.mean, n_components, n_oversamples=8, n_iter=2, random_state=0
        )
        self.basis = np.ascontiguousarray(basis)
        centred = embeddings - self.mean
        self.projected = np.ascontiguousarray(centred @ self.basis.T)
        squared_norms = np.einsum("ij,ij->i", centred, centred)
        residual = squared_norms - np.einsum("ij,ij->i", self.projected, self.projected)
        self.residual = np.sqrt(np.maximum(residual, 0.0))

    def squared(self, user: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bounds of ``|user - embedding|^2`` for each position, shape (m,)."""
        centred = user - self.mean
        projected = self.basis @ centred
        residual = np.sqrt(max(centred @ centred - projected @ projected, 0.0))
        offset = self.projected[positions] - projected
        inside = np.einsum("ij,ij->i", offset, offset)
        others = self.residual[positions]
        return inside + (residual - others) ** 2, inside + (residual + others) ** 2


def _projection_bounds(embeddings: np.ndarray) -> "ProjectionBounds | None":
    """Bounds for these embeddings, or None where their values are too extreme to bound."""
    try:
        with np.errstate(all="ignore"):
            bounds = ProjectionBounds(embeddings)
    except (ValueError, np.linalg.LinAlgError):
        return None
    parts = (bounds.basis, bounds.mean, bounds.projected, bounds.residual)
    return bounds if all(np.isfinite(part).all() for part in parts) else None


def _could_be_best(bounds: ProjectionBounds, user: np.ndarray, positions: np.ndarray, size: int):
    """Indices of the rows whose difference may be among the ``size`` smallest.

    At least ``size`` rows have a squared difference no larger than the ``size``-th smallest
    upper bound; a row whose lower bound exceeds it cannot beat them. The margin absorbs
    rounding in the bounds themselves.
    """
    with np.errstate(all="ignore"):
        lower, upper = bounds.squared(user, positions)
    threshold = np.partition(upper, size - 1)[size - 1]
    if not (np.isfinite(threshold) and np.isfinite(lower).all()):
        return np.arange(len(positions))
    return np.flatnonzero(lower <= threshold * (1 + 1e-9) + 1e-9)


class FastRanker:
    """Differences measured on the candidates within the radius only."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def rank(self, user: np.ndarray, query: Query) -> Ranking:
        """The answer for ``user`` (shape (n_features,), float64) and ``query``."""
        catalog = self.catalog
        candidates = catalog.index.within(query.latitude, query.longitude, query.max_dis)
        positions, chord = candidates.positions, candidates.chord
        n_candidates = len(positions)
        if query.sort_by_displacement:
            positions = positions[_nearest_possible(chord, query.size)]
            difference = catalog.difference(user, positions)
        else:
            if catalog.bounds is not None and len(positions) > query.size:
                positions = positions[_could_be_best(catalog.bounds, user, positions, query.size)]
            difference = catalog.difference(user, positions)
            best = _smallest_with_ties(difference, query.size)
            positions, difference = positions[best], difference[best]
        displacement = catalog.index.displacement(query.latitude, query.longitude, positions)
        return catalog.answer(positions, difference, displacement, query, n_candidates)


def _smallest_with_ties(values: np.ndarray, size: int) -> np.ndarray:
    """Indices of the ``size`` smallest values and of every value tied with the last of them."""
    if len(values) <= size:
        return np.arange(len(values))
    kth = np.partition(values, size - 1)[size - 1]
    return np.flatnonzero(values <= kth)


def _nearest_possible(chord: np.ndarray, size: int) -> np.ndarray:
    """Indices of every row that can be among the ``size`` nearest by rounded displacement.

    At least ``size`` rows lie within ``bound`` metres; a row whose chord, a lower bound of
    its displacement, exceeds ``bound + 1`` rounds to a larger whole metre than all of them.
    """
    if len(chord) <= size:
        return np.arange(len(chord))
    bound = np.partition(arc_upper_bound(chord), size - 1)[size - 1]
    return np.flatnonzero(chord <= bound + 1.0)


class ExhaustiveRanker:
    """The reference: the model's ``kneighbors`` over every restaurant, then the radius."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def rank(self, user: np.ndarray, query: Query) -> Ranking:
        """The answer for ``user`` (shape (n_features,), float64) and ``query``."""
        catalog = self.catalog
        model = catalog.model
        distances, rows = model.estimator.kneighbors(
            user[np.newaxis, :], n_neighbors=model.n_rows, return_distance=True
        )
        difference_by_row = np.empty(model.n_rows, dtype=np.float64)
        difference_by_row[rows[0]] = distances[0]

        displacement = geodesic_distance(
            query.latitude, query.longitude, catalog.index.latitude, catalog.index.longitude
        )
        positions = np.flatnonzero(displacement <= query.max_dis)
        return catalog.answer(
            positions,
            difference_by_row[catalog.rows[positions]],
            displacement[positions],
            query,
            len(positions),
        )
