"""Loading the pre-trained ``NearestNeighbors`` model and the restaurant embeddings it holds."""

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse

from recommender.dataset.reader import MAX_FEATURE_MAGNITUDE, DataError, usable_rows


@dataclass(frozen=True)
class TasteModel:
    """The fitted model and what ranking needs from it.

    Attributes
    ----------
    estimator : sklearn.neighbors.NearestNeighbors
        The fitted model, kept for the exhaustive reference ranker.
    embeddings : ndarray of shape (n_rows, n_features), read-only
        The restaurant embeddings the model was fitted on, row ``i`` = model row ``i``.
    metric : str or callable
        The metric the model measures differences with (``effective_metric_``).
    metric_params : dict
        Extra arguments of that metric (``effective_metric_params_``).
    """

    estimator: Any
    embeddings: np.ndarray
    metric: Any
    metric_params: dict

    @property
    def n_rows(self) -> int:
        """Number of restaurant embeddings in the model."""
        return self.embeddings.shape[0]

    @property
    def n_features(self) -> int:
        """Length of a user feature vector and of a restaurant embedding."""
        return self.embeddings.shape[1]


def load_model(path: Path) -> TasteModel:
    """Unpickle a fitted ``NearestNeighbors`` model and check it can rank restaurants.

    Raises
    ------
    DataError
        If the file is missing, is not a pickle, or does not hold a fitted
        ``NearestNeighbors``-like model with its training embeddings.
    """
    if not path.is_file():
        raise DataError(f"{path}: model file not found")
    try:
        with path.open("rb") as file:
            estimator = pickle.load(file)
    except Exception as error:
        raise DataError(f"{path}: cannot unpickle the model ({error})") from error
    return taste_model(estimator, source=str(path))


def taste_model(estimator: Any, source: str = "model") -> TasteModel:
    """Wrap a fitted ``NearestNeighbors`` estimator, validating what ranking relies on."""
    embeddings = getattr(estimator, "_fit_X", None)
    if not hasattr(estimator, "kneighbors") or embeddings is None:
        raise DataError(
            f"{source}: expected a fitted sklearn NearestNeighbors model, "
            f"got {type(estimator).__name__}"
        )
    metric = getattr(estimator, "effective_metric_", None)
    if metric is None or metric == "precomputed":
        raise DataError(f"{source}: the model's metric {metric!r} cannot compare user features")

    if scipy.sparse.issparse(embeddings):
        raise DataError(f"{source}: a model fitted on a sparse matrix is not supported")
    try:
        embeddings = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float64))
    except (TypeError, ValueError) as error:
        raise DataError(f"{source}: the model's embeddings are not numbers ({error})") from error
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise DataError(f"{source}: the model holds no restaurant embeddings")
    if not usable_rows(embeddings).all():
        raise DataError(
            f"{source}: the model's embeddings hold NaN, infinite values or values of "
            f"magnitude {MAX_FEATURE_MAGNITUDE:g} or more"
        )
    embeddings.setflags(write=False)
    return TasteModel(
        estimator=estimator,
        embeddings=embeddings,
        metric=metric,
        metric_params=dict(getattr(estimator, "effective_metric_params_", {}) or {}),
    )
