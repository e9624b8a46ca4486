"""Loading the pre-trained ``NearestNeighbors`` model and the restaurant embeddings it holds."""

import dataclasses
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse
import skops.io

from recommender.dataset.reader import (
    MAX_FEATURE_MAGNITUDE,
    MODEL_FILE,
    SKOPS_MODEL_FILE,
    DataError,
    file_sha256,
    usable_rows,
)


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
    sha256 : str
        The model file's SHA-256 (empty for a model not read from a file).
    verified : bool
        Whether the file was checked before loading (a matching SHA-256, or skops).
    """

    estimator: Any
    embeddings: np.ndarray
    metric: Any
    metric_params: dict
    sha256: str = ""
    verified: bool = False

    @property
    def n_rows(self) -> int:
        """Number of restaurant embeddings in the model."""
        return self.embeddings.shape[0]

    @property
    def n_features(self) -> int:
        """Length of a user feature vector and of a restaurant embedding."""
        return self.embeddings.shape[1]


# scikit-learn's own search trees and distance metrics, which a fitted NearestNeighbors holds
# and skops reconstructs with its own loaders; skops does not trust them by default.
_NEIGHBORS_INTERNALS = (
    "sklearn.neighbors._kd_tree.",
    "sklearn.neighbors._ball_tree.",
    "sklearn.metrics._dist_metrics.",
)


def model_path(data_dir: Path) -> Path:
    """The data directory's model: ``model.skops`` when present, else ``model.pkl``."""
    skops_file = data_dir / SKOPS_MODEL_FILE
    return skops_file if skops_file.exists() else data_dir / MODEL_FILE


def load_model(path: Path, expected_sha256: str | None = None) -> TasteModel:
    """Load a fitted ``NearestNeighbors`` model and check it can rank restaurants.

    A pickle (``.pkl``) runs whatever code it holds when loaded, so its SHA-256 is checked
    first against ``expected_sha256`` or, when none is given, against a ``<file>.sha256``
    beside it (``sha256sum`` format). A ``.skops`` file is loaded without running code and
    only if every type in it is one skops trusts.

    Raises
    ------
    DataError
        If the file is missing, its checksum does not match, it cannot be loaded, or it does
        not hold a fitted ``NearestNeighbors``-like model with its training embeddings.
    """
    if not path.is_file():
        raise DataError(f"{path}: model file not found")
    digest = file_sha256(path)
    pinned = expected_sha256 or _checksum_beside(path)
    if pinned is not None and digest != pinned.lower():
        raise DataError(
            f"{path}: SHA-256 is {digest} but {pinned} was expected; refusing to load it"
        )
    estimator = _load_skops(path) if path.suffix == ".skops" else _unpickle(path)
    model = taste_model(estimator, source=str(path), sha256=digest)
    return dataclasses.replace(model, verified=pinned is not None or path.suffix == ".skops")


def _checksum_beside(path: Path) -> str | None:
    checksum_file = path.with_name(path.name + ".sha256")
    if not checksum_file.is_file():
        return None
    words = checksum_file.read_text().split()
    if not words or not re.fullmatch(r"[0-9a-fA-F]{64}", words[0]):
        raise DataError(f"{checksum_file}: expected a SHA-256 in hex as its first word")
    return words[0]


def _unpickle(path: Path) -> Any:
    try:
        with path.open("rb") as file:
            return pickle.load(file)
    except Exception as error:
        raise DataError(f"{path}: cannot unpickle the model ({error})") from error


def _load_skops(path: Path) -> Any:
    try:
        untrusted = skops.io.get_untrusted_types(file=path)
    except Exception as error:
        raise DataError(f"{path}: not a readable skops file ({error})") from error
    refused = [name for name in untrusted if not name.startswith(_NEIGHBORS_INTERNALS)]
    if refused:
        raise DataError(f"{path}: holds types skops does not trust: {', '.join(refused)}")
    try:
        return skops.io.load(path, trusted=untrusted)
    except Exception as error:
        raise DataError(f"{path}: cannot load the skops model ({error})") from error


def taste_model(estimator: Any, source: str = "model", sha256: str = "") -> TasteModel:
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
        sha256=sha256,
    )
