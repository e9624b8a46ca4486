"""Loading the data directory into a ready recommender, and answering one request."""

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from recommender.contract import Limits
from recommender.dataset.prepared import load_prepared_users
from recommender.dataset.reader import DataError, Skipped, read_restaurants, count_rows
from recommender.features import FeatureStore
from recommender.features.embedded import EmbeddedStore
from recommender.model import load_model
from recommender.ranking import Catalog, ExhaustiveRanker, FastRanker, Query, Ranking
from recommender.settings import Settings

RESTAURANT_FILE = "restaurant.parquet"
USER_FILE = "user.parquet"
MODEL_FILE = "model.pkl"


class UnknownUser(LookupError):
    """No user with this id is in the store."""


@dataclass
class LoadReport:
    """What was loaded and how long it took, for the startup log."""

    n_restaurants: int = 0
    n_users: int = 0
    n_features: int = 0
    metric: str = ""
    store: str = ""
    ranker: str = ""
    prepared: bool = False
    seconds: float = 0.0
    skipped: list[Skipped] = field(default_factory=list)

    def summary(self) -> str:
        """One line describing the loaded data."""
        prepared = "prepared user features anew" if self.prepared else "reused prepared features"
        return (
            f"loaded {self.n_restaurants} restaurants and {self.n_users} users "
            f"({self.n_features} features, metric {self.metric}, store {self.store}, "
            f"ranker {self.ranker}; {prepared}) in {self.seconds:.2f} s"
        )


class Recommender:
    """Everything a worker needs to answer requests: the catalog, a ranker and a store."""

    def __init__(
        self,
        catalog: Catalog,
        store: FeatureStore,
        ranker: FastRanker | ExhaustiveRanker,
        limits: Limits,
        report: LoadReport,
    ) -> None:
        self.catalog = catalog
        self.store = store
        self.ranker = ranker
        self.limits = limits
        self.report = report

    async def recommend(self, user_id: str, query: Query) -> Ranking:
        """Rank the restaurants near ``query``'s point for ``user_id``.

        Raises
        ------
        UnknownUser
            If the store has no such user.
        """
        features = await self.store.features(user_id)
        if features is None:
            raise UnknownUser(user_id)
        return self.ranker.rank(features, query)


def load_recommender(
    settings: Settings, progress: Callable[[str], None] | None = None
) -> Recommender:
    """Read, validate and index the data directory named by ``settings``.

    Raises
    ------
    DataError
        If a data file is missing, unreadable, or does not match the model.
    """
    started = time.perf_counter()
    data_dir = settings.data_dir
    model = load_model(data_dir / MODEL_FILE)
    _check_model_matches_restaurants(model.n_rows, data_dir / RESTAURANT_FILE)
    restaurants, skipped = read_restaurants(data_dir / RESTAURANT_FILE, model.n_rows)
    if len(restaurants) == 0:
        raise DataError(f"{data_dir / RESTAURANT_FILE}: no restaurant row can be served")

    users, prepared = load_prepared_users(
        data_dir / USER_FILE, settings.resolved_prepared_dir, model.n_features, progress
    )
    catalog = Catalog(
        restaurants.ids, restaurants.rows, restaurants.latitude, restaurants.longitude, model
    )
    store = EmbeddedStore(users)
    ranker = ExhaustiveRanker(catalog) if settings.ranker == "exhaustive" else FastRanker(catalog)
    limits = Limits(
        default_size=settings.default_size,
        max_size=settings.max_size,
        default_max_dis=settings.default_max_dis,
    )
    report = LoadReport(
        n_restaurants=len(catalog),
        n_users=store.n_users,
        n_features=model.n_features,
        metric=str(model.metric),
        store="embedded",
        ranker=settings.ranker,
        prepared=prepared,
        seconds=time.perf_counter() - started,
        skipped=[*skipped, *users.skipped],
    )
    return Recommender(catalog, store, ranker, limits, report)


def _check_model_matches_restaurants(n_model_rows: int, restaurant_file: Path) -> None:
    n_rows = count_rows(restaurant_file)
    if n_rows != n_model_rows:
        raise DataError(
            f"{restaurant_file}: has {n_rows} rows but the model holds {n_model_rows} "
            "restaurant embeddings; the model must be fitted on this restaurant file"
        )
