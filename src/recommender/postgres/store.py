"""User features read from PostgreSQL per request, and restaurants read once at start."""

import time
from collections.abc import Iterator

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
    engine_for,
    libpq_url,
    restaurants_table,
    safe_url,
    users_table,
)


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
    """

    def __init__(
        self, url: str, n_features: int, dtype: str, n_users: int, timeout: float, pool_size: int
    ) -> None:
        self.url = libpq_url(url)
        self.n_features = n_features
        self.n_users = n_users
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.timeout = timeout
        self.pool_size = pool_size
        self._pool: psycopg_pool.AsyncConnectionPool | None = None
        users = users_table()
        query = select(users.c.features).where(users.c.user_id == bindparam("user_id"))
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
            If PostgreSQL cannot be reached or does not answer within the timeout.
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


def iter_user_features(url: str, batch_size: int) -> Iterator[list[tuple[str, bytes]]]:
    """Every user's stored feature bytes, in batches, through a server-side cursor.

    Only one batch is in memory at a time, whatever the number of users.
    """
    users = users_table()
    query = str(select(users.c.user_id, users.c.features).compile(dialect=psycopg_dialect()))
    with psycopg.connect(libpq_url(url)) as connection:
        with connection.cursor(name="recommender_user_features") as cursor:
            cursor.itersize = batch_size
            cursor.execute(query)
            while rows := cursor.fetchmany(batch_size):
                yield [(user_id, bytes(value)) for user_id, value in rows]


def read_database(url: str, wait_seconds: float) -> tuple[dict, RestaurantTable, np.ndarray]:
    """The dataset description, the restaurants and their H3 cells, waiting for PostgreSQL.

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


def _read(connection: Connection) -> tuple[dict, RestaurantTable, np.ndarray]:
    names = set(inspect(connection).get_table_names())
    if not {"dataset", "restaurants", "users"} <= names:
        raise DataError("the database holds no loaded data; run `recommender db load` first")
    # Every column there is: a database loaded by an older version lacks the newer ones.
    described = Table(DATASET, MetaData(), autoload_with=connection)
    dataset = dict(connection.execute(select(described)).mappings().one())
    dataset.setdefault("data_sha256", None)
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
    return dict(dataset), table, np.array(columns[4], dtype=np.int64).astype(np.uint64)
