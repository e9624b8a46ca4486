"""The database schema, defined once as SQLAlchemy Core tables.

Each load writes fresh tables under its load id: ``restaurants`` and ``dataset`` are renamed
into place, while the users stay in ``users_<load id>`` so that a server keeps reading the users
of the load it started on; ``users`` is a view of the newest load's. The functions here build a
table under any name.
"""

from sqlalchemy import (
    BigInteger,
    Column,
    Double,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    create_engine,
)
from sqlalchemy.engine import Engine, make_url

USERS = "users"
RESTAURANTS = "restaurants"
DATASET = "dataset"


def load_users_name(load_id: str) -> str:
    """The name of the table holding the user features of the load ``load_id``."""
    return f"{USERS}_{load_id}"


def users_table(name: str = USERS, metadata: MetaData | None = None) -> Table:
    """User features, one row per user: the raw little-endian bytes of the feature vector."""
    return Table(
        name,
        metadata or MetaData(),
        Column("user_id", Text, primary_key=True),
        Column("features", LargeBinary, nullable=False),
    )


def restaurants_table(name: str = RESTAURANTS, metadata: MetaData | None = None) -> Table:
    """Restaurant locations, their model rows, and the H3 cell the spatial pre-filter uses."""
    return Table(
        name,
        metadata or MetaData(),
        Column("restaurant_id", Text, primary_key=True),
        Column("model_row", Integer, nullable=False),
        Column("latitude", Double, nullable=False),
        Column("longitude", Double, nullable=False),
        Column("h3_cell", BigInteger, nullable=False, index=True),
    )


def dataset_table(name: str = DATASET, metadata: MetaData | None = None) -> Table:
    """One row describing the loaded data: which load and version, feature count and type."""
    return Table(
        name,
        metadata or MetaData(),
        Column("load_id", Text, nullable=False),
        Column("n_features", Integer, nullable=False),
        Column("feature_dtype", Text, nullable=False),
        Column("n_model_rows", Integer, nullable=False),
        Column("n_users", Integer, nullable=False),
        Column("n_restaurants", Integer, nullable=False),
        Column("loaded_at", Text, nullable=False),
        # Empty in databases loaded before the data version was recorded.
        Column("data_sha256", Text, nullable=True),
    )


def is_database_url(value: str) -> bool:
    """Whether ``value`` names a PostgreSQL database (rather than the embedded store)."""
    return value.startswith(("postgresql://", "postgres://", "postgresql+psycopg://"))


def safe_url(url: str) -> str:
    """``url`` with its password hidden, for messages and logs."""
    return make_url(url).render_as_string(hide_password=True)


def libpq_url(url: str) -> str:
    """The URL as psycopg expects it (without SQLAlchemy's ``+driver`` part)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def engine_for(url: str) -> Engine:
    """A SQLAlchemy engine on psycopg 3 for ``url``."""
    sqlalchemy_url = make_url(url).set(drivername="postgresql+psycopg")
    return create_engine(sqlalchemy_url, pool_pre_ping=True)
