"""Deterministic synthetic data in the reference layout: restaurants, users, model and requests.

Users and restaurants share latent tastes: twenty cuisine centres in a small latent space,
mapped into feature space by one random mixing matrix. A restaurant sits near its cuisine's
centre; a user sits near a blend of one to three centres. The nearest restaurant embeddings to a
user's features are therefore restaurants of the cuisines that user likes, so rankings over the
data mean something. Restaurant locations cluster in hotspots inside a Bangkok bounding box.

Every random draw comes from one ``numpy.random.SeedSequence(seed)``, split into independent
streams, so the same arguments always write byte-identical files. The streams also keep the parts
apart: the restaurant table depends only on ``n_restaurants``, the model not on ``n_users`` or
``n_requests``, and the user features not on ``n_restaurants`` or ``n_requests``.

Fitting the model can also be a step of its own: ``generate(..., model=False)`` writes the
restaurant embeddings instead, and ``fit_model`` later fits the same model from them.
"""

import hashlib
import math
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.neighbors import NearestNeighbors

LATITUDE_RANGE = (13.68, 14.11)
LONGITUDE_RANGE = (100.30, 100.85)
METRES_PER_DEGREE_LATITUDE = 111_320.0

N_LATENT = 32
N_CUISINES = 20
# Cuisine centres about 32 apart, restaurant and user spreads a few units: a user's nearest
# restaurants lie at a difference of about 5-15, most other restaurants at 25-40.
CUISINE_SCALE = 4.0
RESTAURANT_SPREAD = 1.0
USER_SPREAD = 1.5
FEATURE_NOISE = 1.0
USER_CUISINE_COUNT_SHARES = (0.5, 0.35, 0.15)

N_HOTSPOTS = 12
HOTSPOT_SIGMA_METRES = (1_500.0, 4_000.0)
HOTSPOT_MARGIN_METRES = 8_000.0
RESTAURANT_BACKGROUND_SHARE = 0.3
REQUEST_BACKGROUND_SHARE = 0.1
COORDINATE_DECIMALS = 6

# Written instead of the model by ``generate(..., model=False)``, read by ``fit_model``.
EMBEDDINGS_FILE = "restaurant_embeddings.npy"

# 10,000 users x 1,000 float32 features is 40 MB per row group: memory stays bounded while the
# row groups stay large enough to read quickly.
USERS_PER_ROW_GROUP = 10_000
N_SMALL_USERS = 100

REQUEST_SIZES = (20, 50)
REQUEST_SORT_DIS = (0.0, 1.0, math.nan)
REQUEST_MAX_DIS_METRES = (5_000.0, 10_000.0, math.nan)

RESTAURANT_SCHEMA = pa.schema(
    [
        ("restaurant_id", pa.string()),
        ("index", pa.int64()),
        ("latitude", pa.string()),
        ("longitude", pa.string()),
    ]
)
REQUEST_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("latitude", pa.float64()),
        ("longitude", pa.float64()),
        ("size", pa.int64()),
        ("sort_dis", pa.float64()),
        ("max_dis", pa.float64()),
    ]
)


@dataclass(frozen=True)
class _Tastes:
    centres: np.ndarray
    popularity: np.ndarray
    mixing: np.ndarray


@dataclass(frozen=True)
class _Hotspots:
    latitudes: np.ndarray
    longitudes: np.ndarray
    sigmas_metres: np.ndarray
    weights: np.ndarray


def generate(
    out_dir: Path,
    *,
    n_users: int = 100_000,
    n_restaurants: int = 10_000,
    n_features: int = 1000,
    n_requests: int = 2000,
    seed: int = 0,
    model: bool = True,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Write a synthetic data directory in the reference layout.

    Files written into ``out_dir`` (created if missing, existing files replaced):

    - ``restaurant.parquet``: ``restaurant_id`` (string), ``index`` (int64, the restaurant's row
      in the model; a permutation of ``0..n_restaurants-1`` in shuffled file order),
      ``latitude`` and ``longitude`` (strings, degrees WGS-84 with 6 decimals).
    - ``user.parquet``: ``user_id`` (string) and ``feature_0`` .. ``feature_{n_features-1}``
      (float32), one row group per 10,000 users.
    - ``user.small.parquet``: the first 100 users of ``user.parquet``, same schema.
    - ``model.pkl``: a ``NearestNeighbors(metric="euclidean")`` fitted on the restaurant
      embeddings, float64 of shape (n_restaurants, n_features), row ``i`` being the restaurant
      whose ``index`` is ``i``; pickle protocol 5.
    - ``request.parquet``: ``user_id`` (string, an existing user), ``latitude`` and
      ``longitude`` (float64, degrees), ``size`` (int64, 20 or 50), ``sort_dis`` (float64, 0.0,
      1.0 or NaN) and ``max_dis`` (float64, metres: 5000.0, 10000.0 or NaN).

    With ``model=False``, ``restaurant_embeddings.npy`` (the embeddings the model would be
    fitted on, float64 of shape (n_restaurants, n_features)) replaces ``model.pkl`` and
    ``model.pkl.sha256``; ``fit_model`` then writes the model ``generate`` would have written.

    Parameters
    ----------
    out_dir : Path
        Directory to write into.
    n_users : int, default=100_000
        Number of users, at least 0.
    n_restaurants : int, default=10_000
        Number of restaurants, at least 1.
    n_features : int, default=1000
        Length of every user feature vector and restaurant embedding, at least 1.
    n_requests : int, default=2000
        Number of requests, at least 0; more than 0 needs at least one user.
    seed : int, default=0
        Seed of every random draw, at least 0. Same arguments give byte-identical files.
    model : bool, default=True
        Fit and write the model; if False, write the restaurant embeddings for ``fit_model``.
    progress : callable, optional
        Called with one short line of text as each part of the data is written.

    Raises
    ------
    ValueError
        If an argument is out of range; the message names the argument and its value.
    """
    _validate(n_users, n_restaurants, n_features, n_requests, seed)
    report = progress if progress is not None else _ignore
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tastes_seed, hotspots_seed, embeddings_seed, restaurants_seed, users_seed, requests_seed = (
        np.random.SeedSequence(seed).spawn(6)
    )
    tastes = _draw_tastes(np.random.default_rng(tastes_seed), n_features)
    hotspots = _draw_hotspots(np.random.default_rng(hotspots_seed))

    _write_restaurants(out_dir, np.random.default_rng(restaurants_seed), hotspots, n_restaurants)
    report(f"restaurants {n_restaurants}/{n_restaurants}")

    embeddings_rng = np.random.default_rng(embeddings_seed)
    embeddings = _draw_restaurant_embeddings(embeddings_rng, tastes, n_restaurants)
    if model:
        _write_model(out_dir, embeddings)
        report(f"model fitted on {n_restaurants} restaurant embeddings of {n_features} features")
    else:
        np.save(out_dir / EMBEDDINGS_FILE, embeddings, allow_pickle=False)
        report(f"restaurant embeddings {n_restaurants}x{n_features} written, model not fitted")

    _write_users(out_dir, users_seed, tastes, n_users, report)

    _write_requests(out_dir, np.random.default_rng(requests_seed), hotspots, n_users, n_requests)
    report(f"requests {n_requests}/{n_requests}")


def fit_model(data_dir: Path) -> tuple[int, int]:
    """Fit the model on ``data_dir``'s restaurant embeddings and write it beside them.

    Reads ``restaurant_embeddings.npy`` as ``generate(..., model=False)`` wrote it and writes
    ``model.pkl`` and ``model.pkl.sha256``, byte-identical to those ``generate`` writes with
    the same arguments.

    Parameters
    ----------
    data_dir : Path
        Directory holding ``restaurant_embeddings.npy``.

    Returns
    -------
    shape : tuple of int
        ``(n_restaurants, n_features)`` of the embeddings the model was fitted on.

    Raises
    ------
    ValueError
        If the embeddings file is missing, unreadable, not a non-empty two-dimensional float
        array, or holds a non-finite value; the message names the file.
    """
    path = Path(data_dir) / EMBEDDINGS_FILE
    if not path.is_file():
        raise ValueError(
            f"{path} does not exist; write it with `recommender data generate --no-model`"
        )
    try:
        embeddings = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a NumPy array file: {error}") from error
    if embeddings.ndim != 2 or embeddings.shape[0] < 1 or embeddings.dtype.kind != "f":
        raise ValueError(
            f"{path} holds {embeddings.dtype} of shape {embeddings.shape}; expected floats of "
            "shape (n_restaurants, n_features) with at least one restaurant"
        )
    if not np.isfinite(embeddings).all():
        raise ValueError(f"{path} holds a non-finite value; expected finite embeddings")
    _write_model(Path(data_dir), embeddings)
    return embeddings.shape


def _ignore(message: str) -> None:
    pass


def _validate(
    n_users: int, n_restaurants: int, n_features: int, n_requests: int, seed: int
) -> None:
    for name, value, minimum in (
        ("n_users", n_users, 0),
        ("n_restaurants", n_restaurants, 1),
        ("n_features", n_features, 1),
        ("n_requests", n_requests, 0),
        ("seed", seed, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(
                f"{name}={value!r} is not an integer; expected an integer >= {minimum}"
            )
        if value < minimum:
            raise ValueError(f"{name}={value!r} is out of range; expected an integer >= {minimum}")
    if n_requests > 0 and n_users == 0:
        raise ValueError(
            f"n_requests={n_requests!r} needs users to request for, but n_users=0; "
            "expected n_users >= 1 or n_requests=0"
        )


def _draw_tastes(rng: np.random.Generator, n_features: int) -> _Tastes:
    centres = rng.normal(scale=CUISINE_SCALE, size=(N_CUISINES, N_LATENT))
    popularity = rng.dirichlet(np.full(N_CUISINES, 2.0))
    # Variance 1 / n_features keeps the mapping close to an isometry, so differences in
    # feature space are about the latent ones whatever the number of features.
    mixing = rng.normal(scale=1.0 / math.sqrt(n_features), size=(N_LATENT, n_features))
    return _Tastes(centres=centres, popularity=popularity, mixing=mixing)


def _draw_hotspots(rng: np.random.Generator) -> _Hotspots:
    margin_latitude = HOTSPOT_MARGIN_METRES / METRES_PER_DEGREE_LATITUDE
    margin_longitude = margin_latitude / math.cos(math.radians(np.mean(LATITUDE_RANGE)))
    latitudes = rng.uniform(
        LATITUDE_RANGE[0] + margin_latitude, LATITUDE_RANGE[1] - margin_latitude, N_HOTSPOTS
    )
    longitudes = rng.uniform(
        LONGITUDE_RANGE[0] + margin_longitude, LONGITUDE_RANGE[1] - margin_longitude, N_HOTSPOTS
    )
    sigmas_metres = rng.uniform(*HOTSPOT_SIGMA_METRES, N_HOTSPOTS)
    weights = rng.dirichlet(np.full(N_HOTSPOTS, 2.0))
    return _Hotspots(
        latitudes=latitudes, longitudes=longitudes, sigmas_metres=sigmas_metres, weights=weights
    )


def _draw_locations(
    rng: np.random.Generator, hotspots: _Hotspots, n: int, background_share: float
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` locations: hotspot mixture plus a uniform background share, clipped to the box.

    Returns latitudes and longitudes in degrees, each float64 of shape (n,).
    """
    background = rng.random(n) < background_share
    spot = rng.choice(N_HOTSPOTS, size=n, p=hotspots.weights)
    offsets_metres = rng.standard_normal((n, 2)) * hotspots.sigmas_metres[spot, None]
    uniform_latitudes = rng.uniform(*LATITUDE_RANGE, n)
    uniform_longitudes = rng.uniform(*LONGITUDE_RANGE, n)

    latitudes = hotspots.latitudes[spot] + offsets_metres[:, 0] / METRES_PER_DEGREE_LATITUDE
    metres_per_degree_longitude = METRES_PER_DEGREE_LATITUDE * np.cos(np.radians(latitudes))
    longitudes = hotspots.longitudes[spot] + offsets_metres[:, 1] / metres_per_degree_longitude
    latitudes = np.where(background, uniform_latitudes, latitudes)
    longitudes = np.where(background, uniform_longitudes, longitudes)
    return np.clip(latitudes, *LATITUDE_RANGE), np.clip(longitudes, *LONGITUDE_RANGE)


def _draw_restaurant_embeddings(
    rng: np.random.Generator, tastes: _Tastes, n_restaurants: int
) -> np.ndarray:
    """Draw the restaurant embeddings: float64 of shape (n_restaurants, n_features)."""
    cuisines = rng.choice(N_CUISINES, size=n_restaurants, p=tastes.popularity)
    latents = tastes.centres[cuisines] + rng.normal(
        scale=RESTAURANT_SPREAD, size=(n_restaurants, N_LATENT)
    )
    embeddings = latents @ tastes.mixing
    n_features = embeddings.shape[1]
    embeddings += rng.normal(scale=FEATURE_NOISE / math.sqrt(n_features), size=embeddings.shape)
    return embeddings


def _write_restaurants(
    out_dir: Path, rng: np.random.Generator, hotspots: _Hotspots, n_restaurants: int
) -> None:
    index = rng.permutation(n_restaurants)
    latitudes, longitudes = _draw_locations(
        rng, hotspots, n_restaurants, RESTAURANT_BACKGROUND_SHARE
    )
    table = pa.table(
        {
            "restaurant_id": _ids("r", range(1, n_restaurants + 1), n_restaurants),
            "index": pa.array(index, type=pa.int64()),
            "latitude": [f"{value:.{COORDINATE_DECIMALS}f}" for value in latitudes],
            "longitude": [f"{value:.{COORDINATE_DECIMALS}f}" for value in longitudes],
        },
        schema=RESTAURANT_SCHEMA,
    )
    pq.write_table(table, out_dir / "restaurant.parquet")


def _write_model(out_dir: Path, embeddings: np.ndarray) -> None:
    model = NearestNeighbors(metric="euclidean").fit(embeddings)
    with open(out_dir / "model.pkl", "wb") as file:
        pickle.dump(model, file, protocol=5)
    digest = hashlib.sha256((out_dir / "model.pkl").read_bytes()).hexdigest()
    (out_dir / "model.pkl.sha256").write_text(f"{digest}  model.pkl\n")


def _write_users(
    out_dir: Path,
    seed: np.random.SeedSequence,
    tastes: _Tastes,
    n_users: int,
    report: Callable[[str], None],
) -> None:
    """Write ``user.parquet`` one row group at a time, and ``user.small.parquet``.

    Each row group draws from its own child of ``seed``, so a user's features depend only on
    the seed, the tastes and the user's position, never on ``n_users``.
    """
    n_features = tastes.mixing.shape[1]
    schema = pa.schema(
        [("user_id", pa.string())] + [(f"feature_{j}", pa.float32()) for j in range(n_features)]
    )
    starts = range(0, n_users, USERS_PER_ROW_GROUP)
    small = schema.empty_table()

    with pq.ParquetWriter(out_dir / "user.parquet", schema, use_dictionary=False) as writer:
        for start, chunk_seed in zip(starts, seed.spawn(len(starts)), strict=True):
            stop = min(start + USERS_PER_ROW_GROUP, n_users)
            features = _draw_user_features(np.random.default_rng(chunk_seed), tastes, stop - start)
            columns = [_ids("u", range(start + 1, stop + 1), n_users)]
            columns += [pa.array(feature) for feature in features]
            table = pa.Table.from_arrays(columns, schema=schema)
            writer.write_table(table, row_group_size=USERS_PER_ROW_GROUP)
            if start == 0:
                small = table.slice(0, N_SMALL_USERS)
            report(f"users {stop}/{n_users}")

    pq.write_table(small, out_dir / "user.small.parquet", use_dictionary=False)


def _draw_user_features(rng: np.random.Generator, tastes: _Tastes, n: int) -> np.ndarray:
    """Draw ``n`` user feature vectors, transposed: float32 of shape (n_features, n).

    Transposed so that every feature is one contiguous column, ready for the Parquet writer.
    """
    most = len(USER_CUISINE_COUNT_SHARES)
    last = rng.choice(most, size=n, p=USER_CUISINE_COUNT_SHARES)
    cuisines = rng.choice(N_CUISINES, size=(n, most), p=tastes.popularity)
    weights = rng.standard_exponential((n, most))
    weights[np.arange(most) > last[:, None]] = 0.0
    weights /= weights.sum(axis=1, keepdims=True)
    latents = np.einsum("uk,ukl->ul", weights, tastes.centres[cuisines])
    latents += rng.normal(scale=USER_SPREAD, size=latents.shape)

    n_features = tastes.mixing.shape[1]
    features = tastes.mixing.T.astype(np.float32) @ latents.T.astype(np.float32)
    noise = rng.standard_normal(features.shape, dtype=np.float32)
    noise *= np.float32(FEATURE_NOISE / math.sqrt(n_features))
    features += noise
    return features


def _write_requests(
    out_dir: Path,
    rng: np.random.Generator,
    hotspots: _Hotspots,
    n_users: int,
    n_requests: int,
) -> None:
    users = rng.integers(1, n_users + 1, size=n_requests)
    latitudes, longitudes = _draw_locations(rng, hotspots, n_requests, REQUEST_BACKGROUND_SHARE)
    table = pa.table(
        {
            "user_id": _ids("u", users, n_users),
            "latitude": np.round(latitudes, COORDINATE_DECIMALS),
            "longitude": np.round(longitudes, COORDINATE_DECIMALS),
            "size": rng.choice(np.array(REQUEST_SIZES, dtype=np.int64), size=n_requests),
            "sort_dis": rng.choice(np.array(REQUEST_SORT_DIS), size=n_requests),
            "max_dis": rng.choice(np.array(REQUEST_MAX_DIS_METRES), size=n_requests),
        },
        schema=REQUEST_SCHEMA,
    )
    pq.write_table(table, out_dir / "request.parquet")


def _ids(prefix: str, numbers: Iterable[int], count: int) -> pa.Array:
    """Identifiers such as ``u000042``: prefix, then number zero-padded to ``count``'s width."""
    width = len(str(count))
    return pa.array([f"{prefix}{number:0{width}d}" for number in numbers], pa.string())
