"""Shared fixtures: small generated data directories and recommenders loaded from them."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from recommender.dataset.generate import generate
from recommender.service import Recommender, load_recommender
from recommender.settings import Settings

SMALL = dict(n_users=300, n_restaurants=600, n_features=16, n_requests=300, seed=7)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated data directory: 300 users, 600 restaurants, 16 features."""
    directory = tmp_path_factory.mktemp("data") / "small"
    generate(directory, **SMALL)
    return directory


@pytest.fixture(scope="session")
def settings(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings reading the small data directory, preparing into a private directory."""
    return Settings(data_dir=data_dir, prepared_dir=tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="session")
def recommender(settings: Settings) -> Recommender:
    """The fast recommender over the small data."""
    return load_recommender(settings)


@pytest.fixture(scope="session")
def requests(data_dir: Path) -> list[dict]:
    """Every row of the small data's request.parquet."""
    return pq.read_table(data_dir / "request.parquet").to_pylist()
