"""User features read from PostgreSQL per request, and restaurants read once at start.

A server reads the users table of the load it started on (``users_<load id>``), never the
``users`` view that follows the newest load, so its answers come from one load until it is
reloaded. ``db load`` keeps the previous load's table; a server two loads behind finds its table
gone and its requests are answered 503 until it is reloaded.
"""

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import psycopg
import psycopg_pool
from sqlalchemy import MetaData, Table, bindparam, inspect, select
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError

from recommender.dataset.reader import DataError, RestaurantTable
from recommender.features import StoredFeaturesInvalid, StoreUnavailable
from recommender.postgres.schema import (
    DATASET,
    RESTAURANTS,
    USERS,
    engine_for,
    libpq_url,
    load_users_name,
    restaurants_table,
    safe_url,
    users_table,
)

_NOT_LOADED = "the database holds no loaded data; run `recommender db load` first"


class DatabaseUnreachable(DataError):
    """PostgreSQL did not answer within the start-up wait."""


class PostgresStore:
    """User features by primary key through a connection pool opened in each worker.

    Parameters
    ----------
    url : str
        ``postgresql://user:password@host:port/database``.
    n_features : int
        Length of every feature vector; a stored value of another length is refused.
    dtype : str
        The stored float type, ``float32`` or ``float64`` (little-endian bytes).
    timeout : float
        Seconds a request may wait for a connection or for its query.
    pool_size : int
        Most connections this process keeps open.
    users : str
        The table the user features are read from: that of the load the server started on
        (``read_database`` names it). The second ``db load`` after that one drops it; every read
        then raises ``StoreUnavailable`` until the server is reloaded.
    """

    def __init__(
        self,
        url: str,
        n_features: int,
        dtype: str,
        n_users: int,
        timeout: float,
        pool_size: int,
        users: str,
    ) -> None:
        self.url = libpq_url(url)
        self.n_features = n_features
        self.n_users = n_users
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.timeout = timeout
        self.pool_size = pool_size
        self.users = users
        self._pool: psycopg_pool.AsyncConnectionPool | None = None
        table = users_table(users)
        query = select(table.c.features).where(table.c.user_id == bindparam("user_id"))
        self._query = str(query.compile(dialect=psycopg_dialect()))

    async def open(self) -> None:
        """Start the pool; connections are made, and remade after failures, in the background."""
        self._pool = psycopg_pool.AsyncConnectionPool(
            self.url,
            min_size=1,
            max_size=self.pool_size,
            open=False,
            timeout=self.timeout,
            kwargs={"autocommit": True, "connect_timeout": max(1, round(self.timeout))},
            configure=self._configure,
            check=psycopg_pool.AsyncConnectionPool.check_connection,
        )
        await self._pool.open(wait=False)

    async def close(self) -> None:
        """Close the pool's connections."""
        if self._pool is not None:
            await self._pool.close()

    async def status(self) -> dict[str, str]:
        """``ok`` when PostgreSQL answers a trivial query within the timeout."""
        if self._pool is None:
            return {"store": "unavailable: the pool is not open"}
        try:
            async with self._pool.connection() as connection:
                await connection.execute("SELECT 1")
        except (psycopg.Error, psycopg_pool.PoolTimeout) as error:
            return {"store": f"unavailable: {type(error).__name__}"}
        return {"store": "ok"}

    async def features(self, user_id: str) -> np.ndarray | None:
        """The user's features as float64, None for an unknown user.

        Raises
        ------
        StoreUnavailable
            If PostgreSQL cannot be reached or does not answer within the timeout, or no longer
            holds the users of this store's load.
        """
        value = await self.feature_bytes(user_id)
        return None if value is None else self.decode(value, user_id)

    async def feature_bytes(self, user_id: str) -> bytes | None:
        """The user's features as stored (little-endian bytes), None for an unknown user."""
        if self._pool is None:
            raise StoreUnavailable("the PostgreSQL pool is not open")
        try:
            async with self._pool.connection() as connection:
                cursor = await connection.execute(self._query, {"user_id": user_id})
                row = await cursor.fetchone()
        except (psycopg.Error, psycopg_pool.PoolTimeout) as error:
            raise StoreUnavailable(f"PostgreSQL: {type(error).__name__}") from error
        return None if row is None else bytes(row[0])

    def decode(self, value: bytes, user_id: str) -> np.ndarray:
        """Stored bytes as a float64 feature vector, refusing a value of the wrong length."""
        expected = self.n_features * self.dtype.itemsize
        if len(value) != expected:
            raise StoredFeaturesInvalid(
                f"stored features of user {user_id!r} have {len(value)} bytes, "
                f"expected {expected}; reload the database"
            )
        return np.frombuffer(value, dtype=self.dtype).astype(np.float64)

    async def _configure(self, connection: psycopg.AsyncConnection) -> None:
        # A query that outlives the request's patience is cancelled on the server too.
        milliseconds = str(max(1, round(self.timeout * 1000)))
        await connection.execute(
            "SELECT set_config('statement_timeout', %s, false)", (milliseconds,)
        )


def iter_user_features(url: str, batch_size: int, users: str) -> Iterator[list[tuple[str, bytes]]]:
    """Every user's stored feature bytes in the table ``users``, in batches, through a
    server-side cursor.

    Only one batch is in memory at a time, whatever the number of users. A cache warm-up passes
    the table of the load whose id its keys carry.
    """
    table = users_table(users)
    query = str(select(table.c.user_id, table.c.features).compile(dialect=psycopg_dialect()))
    with psycopg.connect(libpq_url(url)) as connection:
        with connection.cursor(name="recommender_user_features") as cursor:
            cursor.itersize = batch_size
            cursor.execute(query)
            while rows := cursor.fetchmany(batch_size):
                yield [(user_id, bytes(value)) for user_id, value in rows]


@dataclass(frozen=True)
class LoadedData:
    """What a server reads from the database at start, all of one load.

    Attributes
    ----------
    dataset : dict
        The ``dataset`` row: load id, data version, feature count and type, counts.
    users : str
        The table holding this load's user features.
    restaurants : RestaurantTable
    cells : ndarray of shape (n_restaurants,), dtype uint64
        Each restaurant's H3 cell.
    """

    dataset: dict
    users: str
    restaurants: RestaurantTable
    cells: np.ndarray


def read_database(url: str, wait_seconds: float) -> LoadedData:
    """The current load's description, users table, restaurants and their H3 cells, waiting
    for PostgreSQL.

    Raises
    ------
    DatabaseUnreachable
        If PostgreSQL does not answer within ``wait_seconds``.
    DataError
        If the database holds no loaded data.
    """
    engine = engine_for(url)
    deadline = time.monotonic() + wait_seconds
    try:
        while True:
            try:
                with engine.connect() as connection:
                    return _read(connection)
            except OperationalError as error:
                if time.monotonic() >= deadline:
                    raise DatabaseUnreachable(
                        f"PostgreSQL at {safe_url(url)} did not answer within {wait_seconds:g} s: "
                        f"{error.orig}"
                    ) from error
                time.sleep(1.0)
    finally:
        engine.dispose()


_LOAD_ID = re.compile(r"[0-9a-zA-Z_-]{1,64}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _checked_dataset(dataset: dict) -> dict:
    # The load id and data version go into table names, cache keys and response headers.
    dataset.setdefault("data_sha256", None)
    if not _LOAD_ID.fullmatch(str(dataset["load_id"])):
        raise DataError(f"the dataset table's load_id {dataset['load_id']!r} is not a load id")
    version = dataset["data_sha256"]
    if version is not None and not _SHA256.fullmatch(version):
        raise DataError(f"the dataset table's data_sha256 {version!r} is not a SHA-256")
    return dataset


def _read(connection: Connection) -> LoadedData:
    if not {DATASET, RESTAURANTS} <= set(inspect(connection).get_table_names()):
        raise DataError(_NOT_LOADED)
    # Every column there is: a database loaded by an older version lacks the newer ones.
    described = Table(DATASET, MetaData(), autoload_with=connection)
    # Reading the table locks it until this transaction ends: no load can swap in another
    # (nor drop this load's users table) before the restaurants have been read.
    rows = connection.execute(select(described)).mappings().all()
    if len(rows) != 1:
        raise DataError(
            f"the dataset table holds {len(rows)} rows where one describes the load; "
            "run `recommender db load` again"
        )
    dataset = _checked_dataset(dict(rows[0]))
    users = _users_of(connection, dataset["load_id"])
    restaurants = restaurants_table()
    rows = connection.execute(
        select(
            restaurants.c.restaurant_id,
            restaurants.c.model_row,
            restaurants.c.latitude,
            restaurants.c.longitude,
            restaurants.c.h3_cell,
        )
    ).all()
    columns = list(zip(*rows, strict=True)) if rows else [[], [], [], [], []]
    table = RestaurantTable(
        ids=np.array(columns[0], dtype=object),
        rows=np.array(columns[1], dtype=np.int64),
        latitude=np.array(columns[2], dtype=np.float64),
        longitude=np.array(columns[3], dtype=np.float64),
    )
    cells = np.array(columns[4], dtype=np.int64).astype(np.uint64)
    return LoadedData(dataset=dataset, users=users, restaurants=table, cells=cells)


def _users_of(connection: Connection, load_id: str) -> str:
    """The users table of the load ``load_id``."""
    tables = inspect(connection).get_table_names()
    if load_users_name(load_id) in tables:
        return load_users_name(load_id)
    # Limitation: a database loaded before users were kept per load has only a ``users`` table;
    # a server started on it reads ``users`` by name, and so reads the next load's users as soon
    # as that load is committed, until the server is reloaded.
    if USERS in tables:
        return USERS
    raise DataError(_NOT_LOADED)
