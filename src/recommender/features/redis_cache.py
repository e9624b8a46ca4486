"""A Redis cache in front of the store, shared by every worker and replica (cache-aside).

Values are the store's raw feature bytes, checked for length on every read: nothing read from
Redis is ever unpickled or evaluated. Keys carry the id of the database load they came from,
so a server only ever reads entries of the load it serves, and a TTL, so that entries of loads
no longer served expire.

When Redis fails, requests go to the store directly (slower, still correct) and the cache is
tried again after a short pause; ``status`` reports the cache as degraded meanwhile.
"""

import asyncio
import time
from collections.abc import Callable, Iterable

import numpy as np
import redis
import redis.asyncio as aioredis
import redis.cluster
import redis.exceptions
from prometheus_client import Counter
from redis.asyncio.cluster import RedisCluster

from recommender.postgres.store import PostgresStore

CLUSTER_SCHEME = "redis+cluster://"
# After a failure, requests skip Redis for this long instead of each paying a timeout.
_RETRY_AFTER_SECONDS = 1.0
# A cluster client raises its own family of errors besides the ordinary ones.
_REDIS_FAILURES = (
    redis.exceptions.RedisError,
    redis.exceptions.RedisClusterException,
    OSError,
    TimeoutError,
)


def is_cache_url(value: str) -> bool:
    """Whether ``value`` names a Redis server or cluster."""
    return value.startswith(("redis://", "rediss://", CLUSTER_SCHEME))


def feature_key(load_id: str, user_id: str) -> bytes:
    """The cache key of one user's features from one database load."""
    return b"recommender:features:" + load_id.encode() + b":" + user_id.encode("utf-8")


def connect(url: str, timeout: float, asynchronous: bool = True):
    """A client for a single Redis (``redis://``) or a cluster (``redis+cluster://``).

    An asyncio client for the workers, or a blocking one (``asynchronous=False``) for warm-up.
    """
    options = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if url.startswith(CLUSTER_SCHEME):
        cluster = RedisCluster if asynchronous else redis.cluster.RedisCluster
        return cluster.from_url("redis://" + url[len(CLUSTER_SCHEME) :], **options)
    single = aioredis.Redis if asynchronous else redis.Redis
    return single.from_url(url, **options)


def _milliseconds(seconds: float) -> int:
    """A TTL for Redis's PX option: whole milliseconds, at least one."""
    return max(1, round(seconds * 1000))


class CachedStore:
    """User features from Redis when present, else from PostgreSQL (then kept in Redis).

    Parameters
    ----------
    store : PostgresStore
        The system of record.
    url : str
        ``redis://host:port/db`` or ``redis+cluster://host:port``.
    load_id : str
        The database load whose values are cached (part of every key).
    ttl : float
        Seconds an entry lives.
    timeout : float
        Seconds a Redis call may take before the cache counts as failed.
    lookups : prometheus_client.Counter, optional
        Counts each lookup under the label ``hit``, ``miss`` or ``skipped`` (the cache is
        failing and not asked).
    """

    def __init__(
        self,
        store: PostgresStore,
        url: str,
        load_id: str,
        ttl: float,
        timeout: float,
        lookups: Counter | None = None,
    ) -> None:
        self.store = store
        self.url = url
        self.load_id = load_id
        self.ttl = ttl
        self.timeout = timeout
        self.n_users = store.n_users
        self.hits = 0
        self.misses = 0
        self._lookups = lookups
        self._client: aioredis.Redis | RedisCluster | None = None
        self._failed_until = 0.0
        self._failure = ""

    async def open(self) -> None:
        """Open the store and create the Redis client (it connects on first use)."""
        await self.store.open()
        self._client = connect(self.url, self.timeout)

    async def close(self) -> None:
        """Close both connections."""
        if self._client is not None:
            await self._client.aclose()
        await self.store.close()

    async def status(self) -> dict[str, str]:
        """The store's state, and the cache's: ``ok``, or ``degraded: <reason>``."""
        states = await self.store.status()
        if self._client is not None and time.monotonic() >= self._failed_until:
            try:
                await asyncio.wait_for(self._client.ping(), self.timeout)
            except _REDIS_FAILURES as error:
                self._fail(error)
        if time.monotonic() < self._failed_until:
            return {**states, "cache": f"degraded: {self._failure}"}
        return {**states, "cache": "ok"}

    async def features(self, user_id: str) -> np.ndarray | None:
        """The user's features as float64, None for an unknown user.

        Raises
        ------
        StoreUnavailable
            If the value is not cached and the store cannot answer.
        """
        key = feature_key(self.load_id, user_id)
        skipped = time.monotonic() < self._failed_until
        cached = await self._get(key)
        # Limitation: only the length is checked; a value of the right length written by
        # anyone else with access to this Redis would be served as the user's features.
        if cached is not None and len(cached) == self._value_length():
            self.hits += 1
            self._count("hit")
            return self.store.decode(cached, user_id)

        self.misses += 1
        self._count("skipped" if skipped else "miss")
        value = await self.store.feature_bytes(user_id)
        if value is None:
            return None
        await self._set(key, value)
        return self.store.decode(value, user_id)

    def _count(self, result: str) -> None:
        if self._lookups is not None:
            self._lookups.labels(result).inc()

    def _value_length(self) -> int:
        return self.store.n_features * self.store.dtype.itemsize

    async def _get(self, key: bytes) -> bytes | None:
        if self._client is None or time.monotonic() < self._failed_until:
            return None
        try:
            # The client's own retries could outlast the timeout; this bounds the whole call.
            return await asyncio.wait_for(self._client.get(key), self.timeout)
        except _REDIS_FAILURES as error:
            self._fail(error)
            return None

    async def _set(self, key: bytes, value: bytes) -> None:
        if self._client is None or time.monotonic() < self._failed_until:
            return
        try:
            await asyncio.wait_for(
                self._client.set(key, value, px=_milliseconds(self.ttl)), self.timeout
            )
        except _REDIS_FAILURES as error:
            self._fail(error)

    def _fail(self, error: Exception) -> None:
        self._failed_until = time.monotonic() + _RETRY_AFTER_SECONDS
        self._failure = f"{type(error).__name__}: {error}"


def warm(
    url: str,
    load_id: str,
    batches: Iterable[list[tuple[str, bytes]]],
    ttl: float,
    timeout: float,
    progress: Callable[[str], None] | None = None,
) -> int:
    """Write every batch of ``(user_id, feature bytes)`` rows, one pipeline per batch.

    Memory holds one batch at a time whatever the number of users. Returns the number of
    users written.
    """
    client = connect(url, timeout, asynchronous=False)
    written = 0
    try:
        for batch in batches:
            pipeline = client.pipeline(transaction=False)
            for user_id, value in batch:
                pipeline.set(feature_key(load_id, user_id), value, px=_milliseconds(ttl))
            pipeline.execute()
            written += len(batch)
            if progress is not None:
                progress(f"warmed {written} users")
    finally:
        client.close()
    return written
