"""Loading the data directory into a ready recommender, and answering one request."""

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from recommender.contract import Limits
from recommender.dataset.prepared import load_prepared_users
from recommender.dataset.reader import (
    RESTAURANT_FILE,
    USER_FILE,
    DataError,
    Skipped,
    check_model_rows,
    data_sha256,
    file_sha256,
    read_restaurants,
)
from recommender.features import FeatureStore
from recommender.features.embedded import EmbeddedStore
from recommender.features.redis_cache import CachedStore
from recommender.model import TasteModel, load_model, model_path
from recommender.observability import Metrics
from recommender.postgres.store import PostgresStore, read_database
from recommender.ranking import Catalog, ExhaustiveRanker, FastRanker, Query, Ranking
from recommender.settings import Settings


class UnknownUser(LookupError):
    """No user with this id is in the store."""


@dataclass
class LoadReport:
    """What was loaded and how long it took, for the startup log."""

    n_restaurants: int = 0
    n_users: int = 0
    n_features: int = 0
    metric: str = ""
    model_sha256: str = ""
    model_verified: bool = False
    data_sha256: str = ""
    store: str = ""
    cache: str = "none"
    ranker: str = ""
    prepared: bool = False
    seconds: float = 0.0
    skipped: list[Skipped] = field(default_factory=list)

    def summary(self) -> str:
        """One line describing the loaded data."""
        if self.store != "embedded":
            prepared = "user features read per request"
        elif self.prepared:
            prepared = "prepared user features anew"
        else:
            prepared = "reused prepared features"
        check = "verified" if self.model_verified else "NOT verified: no pinned SHA-256"
        return (
            f"loaded {self.n_restaurants} restaurants and {self.n_users} users "
            f"({self.n_features} features, metric {self.metric}, store {self.store}, "
            f"cache {self.cache}, ranker {self.ranker}; {prepared}; model sha256 "
            f"{self.model_sha256[:12]} {check}; data sha256 {self.data_sha256[:12]}) "
            f"in {self.seconds:.2f} s"
        )


class Recommender:
    """Everything a worker needs to answer requests: the catalog, a ranker, a store, metrics."""

    def __init__(
        self,
        catalog: Catalog,
        store: FeatureStore,
        ranker: FastRanker | ExhaustiveRanker,
        limits: Limits,
        report: LoadReport,
        metrics: Metrics | None = None,
    ) -> None:
        self.catalog = catalog
        self.store = store
        self.ranker = ranker
        self.limits = limits
        self.report = report
        self.metrics = metrics or Metrics()
        self._store_latency = self.metrics.store_latency.labels(report.store or "unknown")

    async def recommend(self, user_id: str, query: Query) -> Ranking:
        """Rank the restaurants near ``query``'s point for ``user_id``.

        Raises
        ------
        UnknownUser
            If the store has no such user.
        """
        started = time.perf_counter()
        features = await self.store.features(user_id)
        self._store_latency.observe(time.perf_counter() - started)
        if features is None:
            raise UnknownUser(user_id)
        ranking = self.ranker.rank(features, query)
        self.metrics.candidates.observe(ranking.n_candidates)
        return ranking


def limits_of(settings: Settings) -> Limits:
    """The request defaults and bounds that ``settings`` configure."""
    return Limits(
        default_size=settings.default_size,
        max_size=settings.max_size,
        default_max_dis=settings.default_max_dis,
    )


def load_recommender(
    settings: Settings, progress: Callable[[str], None] | None = None
) -> Recommender:
    """Read, validate and index the data named by ``settings``.

    The model always comes from the data directory; restaurants and user features come from
    the data directory (embedded store) or from PostgreSQL.

    Raises
    ------
    DataError
        If a data file is missing, unreadable, or does not match the model, or the database
        cannot be reached or holds data for another model.
    """
    started = time.perf_counter()
    if not settings.data_dir.is_dir():
        raise DataError(f"data directory {settings.data_dir} does not exist")
    model = load_model(model_path(settings.data_dir), settings.model_sha256)
    metrics = Metrics()
    if settings.store == "embedded":
        catalog, store, skipped, prepared, version = _load_embedded(settings, model, progress)
    else:
        catalog, store, version = _load_postgres(settings, model, metrics)
        skipped, prepared = [], False

    ranker = ExhaustiveRanker(catalog) if settings.ranker == "exhaustive" else FastRanker(catalog)
    limits = limits_of(settings)
    report = LoadReport(
        n_restaurants=len(catalog),
        n_users=store.n_users,
        n_features=model.n_features,
        metric=str(model.metric),
        model_sha256=model.sha256,
        model_verified=model.verified,
        data_sha256=version,
        store="embedded" if settings.store == "embedded" else "postgresql",
        cache="redis" if settings.cache else "none",
        ranker=settings.ranker,
        prepared=prepared,
        seconds=time.perf_counter() - started,
        skipped=skipped,
    )
    return Recommender(catalog, store, ranker, limits, report, metrics)


def _load_embedded(
    settings: Settings, model: TasteModel, progress: Callable[[str], None] | None
) -> tuple[Catalog, FeatureStore, list[Skipped], bool, str]:
    data_dir = settings.data_dir
    check_model_rows(model.n_rows, data_dir / RESTAURANT_FILE)
    restaurant_sha256 = file_sha256(data_dir / RESTAURANT_FILE)
    restaurants, skipped = read_restaurants(data_dir / RESTAURANT_FILE, model.n_rows)
    if len(restaurants) == 0:
        raise DataError(f"{data_dir / RESTAURANT_FILE}: no restaurant row can be served")
    users, prepared = load_prepared_users(
        data_dir / USER_FILE, settings.resolved_prepared_dir, model.n_features, progress
    )
    if len(users.ids) == 0:
        raise DataError(f"{data_dir / USER_FILE}: no user row can be served")
    catalog = Catalog(
        restaurants.ids, restaurants.rows, restaurants.latitude, restaurants.longitude, model
    )
    version = data_sha256(restaurant_sha256, users.source_sha256)
    return catalog, EmbeddedStore(users), [*skipped, *users.skipped], prepared, version


def _load_postgres(
    settings: Settings, model: TasteModel, metrics: Metrics
) -> tuple[Catalog, FeatureStore, str]:
    # One load, read once: the restaurants, the dataset row and the name of the load's own
    # users table. A later `db load` reaches this server when it is reloaded (SIGHUP).
    loaded = read_database(settings.store, settings.store_start_timeout)
    dataset, restaurants = loaded.dataset, loaded.restaurants
    if (dataset["n_model_rows"], dataset["n_features"]) != (model.n_rows, model.n_features):
        raise DataError(
            f"the database was loaded for a model of {dataset['n_model_rows']} restaurants x "
            f"{dataset['n_features']} features, but {model_path(settings.data_dir)} holds "
            f"{model.n_rows} x {model.n_features}; run `recommender db load` with this model"
        )
    if len(restaurants) == 0:
        raise DataError("the database holds no restaurant that can be served")
    catalog = Catalog(
        restaurants.ids,
        restaurants.rows,
        restaurants.latitude,
        restaurants.longitude,
        model,
        cells=loaded.cells,
    )
    store = PostgresStore(
        settings.store,
        n_features=model.n_features,
        dtype=dataset["feature_dtype"],
        n_users=dataset["n_users"],
        timeout=settings.store_timeout,
        pool_size=settings.store_pool_size,
        users=loaded.users,
    )
    # A database loaded before data versions were recorded is known by its load id.
    version = dataset["data_sha256"] or f"load-{dataset['load_id']}"
    if settings.cache is None:
        return catalog, store, version
    cached = CachedStore(
        store,
        settings.cache,
        load_id=dataset["load_id"],
        ttl=settings.cache_ttl,
        timeout=settings.cache_timeout,
        lookups=metrics.cache_lookups,
    )
    return catalog, cached, version
