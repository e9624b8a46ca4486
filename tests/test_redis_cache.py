"""The Redis cache in front of PostgreSQL: cache-aside, raw values, warm-up in batches, one load
per server, outages, identical answers, and a Redis Cluster.

Tests on the machine's Redis touch only keys of their own: every key carries the load id of a
database load made for the test, and the test deletes those keys afterwards. Tests that stop
Redis use a private ``redis-server`` (``redis_process``) or a private cluster (``redis_cluster``).
"""

import ast
import asyncio
import contextlib
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path

import httpx
import numpy as np
import psycopg
import pyarrow.parquet as pq
import pytest
import redis
import redis.cluster
from conftest import SMALL, RedisProcess, answer_rows, free_port, local_client, running_server
from pydantic import ValidationError
from sqlalchemy.engine import make_url

import recommender.features.redis_cache as redis_cache
from recommender.api import create_app
from recommender.contract import PARAMETERS
from recommender.dataset.generate import generate
from recommender.features.redis_cache import CLUSTER_SCHEME, CachedStore, feature_key, warm
from recommender.postgres.load import load_database
from recommender.postgres.schema import load_users_name
from recommender.postgres.store import iter_user_features
from recommender.service import Recommender, load_recommender
from recommender.settings import Settings

RECOMMENDER = Path(sys.executable).with_name("recommender")
N_USERS = SMALL["n_users"]
N_FEATURES = SMALL["n_features"]
# The generated user features are float32, stored as little-endian bytes.
FEATURE_DTYPE = np.dtype("<f4")
VALUE_BYTES = N_FEATURES * FEATURE_DTYPE.itemsize
USER = "u001"
# Long enough to outlive any test; entries a failed teardown leaves behind still expire.
TTL = 60.0
SHORT_TTL = 0.3
# Bounds on waiting, not expectations of speed: a healthy system needs a small part of them.
CLIENT_TIMEOUT = 10.0
EXPIRY_TIMEOUT = 10.0
RECOVERY_TIMEOUT = 30.0
COMMAND_TIMEOUT = 60.0
# Requests answered before, during and after an outage: enough to cross each change.
STREAM_STEP = 40
STREAM_TASKS = 4
BATCH_SIZE = 32
# Settings only check the form of a URL; nothing connects to this one.
STORE_URL = "postgresql://postgres@127.0.0.1:5432/test"


# Data and cache.


def _load_id(url: str) -> str:
    with psycopg.connect(url) as connection:
        return connection.execute("SELECT load_id FROM dataset").fetchone()[0]


def _users_table(url: str) -> str:
    """The users table of the load ``url`` holds now."""
    return load_users_name(_load_id(url))


def _stored_features(url: str) -> dict[str, bytes]:
    """Every user's feature bytes as PostgreSQL holds them."""
    with psycopg.connect(url) as connection:
        rows = connection.execute("SELECT user_id, features FROM users").fetchall()
    return {user_id: bytes(value) for user_id, value in rows}


def _file_features(data_dir: Path, user_id: str) -> np.ndarray:
    """The user's features as user.parquet holds them, float32."""
    table = pq.read_table(data_dir / "user.parquet")
    row = table.column("user_id").to_pylist().index(user_id)
    features = [table.column(f"feature_{j}")[row].as_py() for j in range(N_FEATURES)]
    return np.array(features, dtype=np.float32)


@pytest.fixture
def shared_redis(redis_server: str, loaded_url: str) -> Iterator[redis.Redis]:
    """A client of the machine's Redis; the keys of the test's load are deleted afterwards."""
    client = redis.Redis.from_url(redis_server)
    load_ids = {_load_id(loaded_url)}
    yield client
    load_ids.add(_load_id(loaded_url))
    for load_id in load_ids:
        pattern = feature_key(load_id, "*")
        keys = list(client.scan_iter(match=pattern, count=1000))
        if keys:
            client.delete(*keys)
    client.close()


def _cached_recommender(data_dir: Path, url: str, cache: str, **settings: object) -> Recommender:
    options = {"cache_ttl": TTL, **settings}
    return load_recommender(Settings(data_dir=data_dir, store=url, cache=cache, **options))


def _cached_store(data_dir: Path, url: str, cache: str, **settings: object) -> CachedStore:
    store = _cached_recommender(data_dir, url, cache, **settings).store
    assert isinstance(store, CachedStore)
    return store


def _read(store: CachedStore, *user_ids: str) -> list[np.ndarray | None]:
    """Each user's features through an opened store, in order."""

    async def read_all() -> list[np.ndarray | None]:
        await store.open()
        try:
            return [
                await asyncio.wait_for(store.features(user_id), CLIENT_TIMEOUT)
                for user_id in user_ids
            ]
        finally:
            await store.close()

    return asyncio.run(read_all())


def _key(store: CachedStore, user_id: str) -> bytes:
    return feature_key(store.load_id, user_id)


def _wait_until_expired(client: redis.Redis, key: bytes) -> None:
    deadline = time.monotonic() + EXPIRY_TIMEOUT
    while client.exists(key):
        if time.monotonic() > deadline:
            pytest.fail(f"{key!r} was still in Redis {EXPIRY_TIMEOUT} s after it was written")
        time.sleep(0.05)


# Cache-aside.


def test_a_miss_reads_postgres_and_fills_the_cache(
    shared_redis: redis.Redis, redis_server: str, loaded_url: str, data_dir: Path
) -> None:
    store = _cached_store(data_dir, loaded_url, redis_server)

    _read(store, USER)

    assert (store.misses, store.hits) == (1, 0)
    assert shared_redis.get(_key(store, USER)) == _stored_features(loaded_url)[USER]


def test_the_read_after_a_miss_is_a_hit(
    shared_redis: redis.Redis, redis_server: str, loaded_url: str, data_dir: Path
) -> None:
    store = _cached_store(data_dir, loaded_url, redis_server)

    first, second = _read(store, USER, USER)

    assert (store.misses, store.hits) == (1, 1)
    assert np.array_equal(second, first)


def test_a_cached_entry_lives_for_the_configured_ttl(
    shared_redis: redis.Redis, redis_server: str, loaded_url: str, data_dir: Path
) -> None:
    store = _cached_store(data_dir, loaded_url, redis_server, cache_ttl=TTL)

    _read(store, USER)

    assert 0 < shared_redis.pttl(_key(store, USER)) <= TTL * 1000


def test_an_expired_entry_is_read_from_postgres_again_and_refilled(
    shared_redis: redis.Redis, redis_server: str, loaded_url: str, data_dir: Path
) -> None:
    store = _cached_store(data_dir, loaded_url, redis_server, cache_ttl=SHORT_TTL)
    _read(store, USER)
    _wait_until_expired(shared_redis, _key(store, USER))

    _read(store, USER)

    assert (store.misses, store.hits) == (2, 0)
    assert shared_redis.get(_key(store, USER)) == _stored_features(loaded_url)[USER]


def test_an_unknown_user_is_none_and_leaves_nothing_in_the_cache(
    shared_redis: redis.Redis, redis_server: str, loaded_url: str, data_dir: Path
) -> None:
    store = _cached_store(data_dir, loaded_url, redis_server)

    assert _read(store, "nobody") == [None]
    assert shared_redis.exists(_key(store, "nobody")) == 0


def test_entries_of_an_earlier_load_are_never_read(
    shared_redis: redis.Redis, redis_server: str, loaded_url: str, data_dir: Path
) -> None:
    earlier = _cached_store(data_dir, loaded_url, redis_server)
    _read(earlier, USER)
    planted = np.full(N_FEATURES, 7.0, dtype=FEATURE_DTYPE).tobytes()
    shared_redis.set(_key(earlier, USER), planted, px=round(TTL * 1000))
    load_database(data_dir, loaded_url)

    [features] = _read(_cached_store(data_dir, loaded_url, redis_server), USER)

    assert np.array_equal(features, _file_features(data_dir, USER))


# One load per server, cached or not.


@pytest.fixture(scope="module")
def second_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another small data set: the same sizes and user ids, other features, restaurants, model."""
    directory = tmp_path_factory.mktemp("second") / "small"
    generate(directory, **{**SMALL, "seed": SMALL["seed"] + 1})
    return directory


def test_after_a_load_a_store_started_before_it_serves_its_own_loads_bytes_cached_or_not(
    shared_redis: redis.Redis,
    redis_server: str,
    loaded_url: str,
    data_dir: Path,
    second_data_dir: Path,
) -> None:
    first = _stored_features(loaded_url)
    users = sorted(first)
    cached = users[: N_USERS // 2]
    store = _cached_store(data_dir, loaded_url, redis_server)
    _read(store, *cached)

    load_database(second_data_dir, loaded_url)
    second = _stored_features(loaded_url)
    assert second.keys() == first.keys() and second != first, "the loads must differ"
    served = _read(store, *users)

    # The first half came from Redis, the second from PostgreSQL.
    assert (store.hits, store.misses) == (len(cached), N_USERS)
    as_stored = [features.astype(FEATURE_DTYPE).tobytes() for features in served]
    assert dict(zip(users, as_stored, strict=True)) == first


def test_entries_written_after_a_load_by_a_store_started_before_it_hold_its_own_loads_bytes(
    shared_redis: redis.Redis,
    redis_server: str,
    loaded_url: str,
    data_dir: Path,
    second_data_dir: Path,
) -> None:
    first = _stored_features(loaded_url)
    store = _cached_store(data_dir, loaded_url, redis_server)

    load_database(second_data_dir, loaded_url)
    _read(store, *first)

    written = shared_redis.mget([_key(store, user_id) for user_id in first])
    assert dict(zip(first, written, strict=True)) == first


def test_a_warm_up_after_a_load_writes_the_bytes_of_the_load_its_keys_name(
    shared_redis: redis.Redis,
    redis_server: str,
    loaded_url: str,
    data_dir: Path,
    second_data_dir: Path,
) -> None:
    # A server reads the dataset row, then warms the cache: a load may come in between.
    first = _stored_features(loaded_url)
    store = _cached_store(data_dir, loaded_url, redis_server)
    load_database(second_data_dir, loaded_url)

    batches = iter_user_features(loaded_url, BATCH_SIZE, store.store.users)
    warm(redis_server, store.load_id, batches, TTL, CLIENT_TIMEOUT)

    written = shared_redis.mget([_key(store, user_id) for user_id in first])
    assert dict(zip(first, written, strict=True)) == first


# Values: raw feature bytes, never pickle.


def test_the_cached_value_is_the_raw_feature_bytes_stored_in_postgres(
    shared_redis: redis.Redis, redis_server: str, loaded_url: str, data_dir: Path
) -> None:
    store = _cached_store(data_dir, loaded_url, redis_server)

    _read(store, USER)

    value = shared_redis.get(_key(store, USER))
    assert value == _stored_features(loaded_url)[USER]
    assert np.array_equal(np.frombuffer(value, dtype=FEATURE_DTYPE), _file_features(data_dir, USER))


@pytest.mark.parametrize(
    "corrupt",
    [
        b"",
        b"\x00" * (VALUE_BYTES - 1),
        b"\x00" * (VALUE_BYTES + FEATURE_DTYPE.itemsize),
        b"not a feature vector",
    ],
    ids=["empty", "one-byte-short", "one-feature-long", "text"],
)
def test_a_cached_value_of_the_wrong_length_is_not_trusted(
    shared_redis: redis.Redis, redis_server: str, loaded_url: str, data_dir: Path, corrupt: bytes
) -> None:
    store = _cached_store(data_dir, loaded_url, redis_server)
    shared_redis.set(_key(store, USER), corrupt, px=round(TTL * 1000))

    [features] = _read(store, USER)

    assert np.array_equal(features, _file_features(data_dir, USER))
    assert (store.misses, store.hits) == (1, 0)


def test_a_cached_value_of_the_wrong_length_is_replaced_by_the_stored_bytes(
    shared_redis: redis.Redis, redis_server: str, loaded_url: str, data_dir: Path
) -> None:
    store = _cached_store(data_dir, loaded_url, redis_server)
    shared_redis.set(_key(store, USER), b"\x00" * 3, px=round(TTL * 1000))

    _read(store, USER)

    assert shared_redis.get(_key(store, USER)) == _stored_features(loaded_url)[USER]


class _CreatesFileWhenUnpickled:
    """A pickle payload whose unpickling opens ``path`` for writing, creating the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))


def test_a_pickle_in_the_cache_is_never_unpickled(
    shared_redis: redis.Redis,
    redis_server: str,
    loaded_url: str,
    data_dir: Path,
    tmp_path: Path,
) -> None:
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_CreatesFileWhenUnpickled(marker))
    assert len(payload) != VALUE_BYTES, "the payload must not pass for a feature vector"
    store = _cached_store(data_dir, loaded_url, redis_server)
    shared_redis.set(_key(store, USER), payload, px=round(TTL * 1000))

    [features] = _read(store, USER)

    assert not marker.exists()
    assert np.array_equal(features, _file_features(data_dir, USER))


DESERIALISERS = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve"}


def test_the_cache_module_imports_no_deserialiser() -> None:
    tree = ast.parse(Path(redis_cache.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])

    assert imported & DESERIALISERS == set()


# Warm-up in bounded batches.


def _batches(loaded_url: str) -> Iterator[list]:
    """The loaded users in warm-up batches, from the table of the load in ``loaded_url``."""
    return iter_user_features(loaded_url, BATCH_SIZE, _users_table(loaded_url))


def _recorded(batches: Iterable[list], sizes: list[int]) -> Iterator[list]:
    for batch in batches:
        sizes.append(len(batch))
        yield batch


def test_warm_writes_every_users_stored_bytes(
    shared_redis: redis.Redis, redis_server: str, loaded_url: str
) -> None:
    load_id = _load_id(loaded_url)

    warm(
        redis_server,
        load_id,
        _batches(loaded_url),
        TTL,
        CLIENT_TIMEOUT,
    )

    stored = _stored_features(loaded_url)
    cached = shared_redis.mget([feature_key(load_id, user_id) for user_id in stored])
    assert dict(zip(stored, cached, strict=True)) == stored


def test_warm_returns_the_number_of_users_written(
    shared_redis: redis.Redis, redis_server: str, loaded_url: str
) -> None:
    batches = _batches(loaded_url)

    written = warm(redis_server, _load_id(loaded_url), batches, TTL, CLIENT_TIMEOUT)

    assert written == N_USERS


def test_warm_gives_every_entry_the_ttl(
    shared_redis: redis.Redis, redis_server: str, loaded_url: str
) -> None:
    load_id = _load_id(loaded_url)

    warm(
        redis_server,
        load_id,
        _batches(loaded_url),
        TTL,
        CLIENT_TIMEOUT,
    )

    ttls = [shared_redis.pttl(feature_key(load_id, user)) for user in _stored_features(loaded_url)]
    assert all(0 < ttl <= TTL * 1000 for ttl in ttls)


def test_warm_up_batches_never_exceed_the_batch_size(
    shared_redis: redis.Redis, redis_server: str, loaded_url: str
) -> None:
    sizes: list[int] = []
    batches = _recorded(_batches(loaded_url), sizes)

    warm(redis_server, _load_id(loaded_url), batches, TTL, CLIENT_TIMEOUT)

    assert max(sizes) <= BATCH_SIZE
    assert sum(sizes) == N_USERS


def test_warm_writes_each_batch_before_reading_the_next(
    shared_redis: redis.Redis, redis_server: str, loaded_url: str
) -> None:
    load_id = _load_id(loaded_url)
    written_before_next: list[bool] = []

    def watched(batches: Iterable[list[tuple[str, bytes]]]) -> Iterator[list]:
        previous: list[tuple[str, bytes]] = []
        for batch in batches:
            if previous:
                keys = [feature_key(load_id, user_id) for user_id, _ in previous]
                written_before_next.append(shared_redis.exists(*keys) == len(keys))
            yield batch
            previous = batch

    warm(
        redis_server,
        load_id,
        watched(_batches(loaded_url)),
        TTL,
        CLIENT_TIMEOUT,
    )

    assert written_before_next == [True] * (math.ceil(N_USERS / BATCH_SIZE) - 1)


def test_user_features_are_fetched_from_postgres_one_batch_at_a_time(loaded_url: str) -> None:
    name = f"batch-probe-{os.getpid()}-{time.monotonic_ns()}"
    url = make_url(loaded_url).update_query_dict({"application_name": name})
    users = _users_table(loaded_url)
    batches = iter_user_features(url.render_as_string(hide_password=False), BATCH_SIZE, users)

    next(batches)
    with psycopg.connect(loaded_url) as observer:
        [query] = observer.execute(
            "SELECT query FROM pg_stat_activity WHERE application_name = %s", (name,)
        ).fetchone()
    batches.close()

    assert query.startswith(f"FETCH FORWARD {BATCH_SIZE} ")


def _environment(**settings: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("RECOMMENDER_")}
    env.update({f"RECOMMENDER_{name.upper()}": value for name, value in settings.items()})
    return env


def _cache_warm(
    data_dir: Path, url: str, cache: str, tmp_path: Path
) -> subprocess.CompletedProcess:
    command = ["cache", "warm", "--data-dir", str(data_dir), "--store", url, "--cache", cache]
    return subprocess.run(
        [str(RECOMMENDER), *command],
        env=_environment(cache_ttl=str(TTL), cache_warm_batch=str(BATCH_SIZE)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )


def test_cache_warm_command_fills_the_cache_with_every_user(
    shared_redis: redis.Redis, redis_server: str, loaded_url: str, data_dir: Path, tmp_path: Path
) -> None:
    finished = _cache_warm(data_dir, loaded_url, redis_server, tmp_path)

    assert finished.returncode == 0, finished.stderr
    load_id = _load_id(loaded_url)
    stored = _stored_features(loaded_url)
    cached = shared_redis.mget([feature_key(load_id, user_id) for user_id in stored])
    assert dict(zip(stored, cached, strict=True)) == stored


def test_cache_warm_command_exits_non_zero_when_the_cache_is_unreachable(
    loaded_url: str, data_dir: Path, tmp_path: Path
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"

    finished = _cache_warm(data_dir, loaded_url, dead, tmp_path)

    assert finished.returncode != 0
    assert "cache warm-up failed" in finished.stderr


# Serving with a cache that is down.


def _as_client_sends(row: dict) -> dict[str, str]:
    return {name: str(row[name]) for name in PARAMETERS}


def test_serve_with_an_unreachable_cache_starts_answers_and_warns(
    loaded_url: str, data_dir: Path, tmp_path: Path, requests: list[dict]
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    options = ("--store", loaded_url, "--cache", dead, "--workers", "1")
    with running_server(data_dir, tmp_path, *options, store_start_timeout="10") as server:
        with local_client(CLIENT_TIMEOUT) as client:
            row = requests[0]
            url = f"{server.url}/recommend/{row['user_id']}"
            response = client.get(url, params=_as_client_sends(row))

    assert response.status_code == 200
    # Not on a terminal, the server logs JSON lines.
    lines = [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]
    assert any(
        line["level"] == "warning" and line["message"].startswith("cache warm-up failed")
        for line in lines
    )


# Answers with and without the cache.


def _uncached_answers(data_dir: Path, url: str, rows: list[dict]) -> list[bytes]:
    return answer_rows(load_recommender(Settings(data_dir=data_dir, store=url)), rows)


def _mismatches(answers: list[bytes], expected: list[bytes]) -> list[int]:
    pairs = enumerate(zip(answers, expected, strict=True))
    return [row for row, (answer, wanted) in pairs if answer != wanted]


def test_answers_with_the_cache_are_identical_to_answers_without_it(
    shared_redis: redis.Redis,
    redis_server: str,
    loaded_url: str,
    data_dir: Path,
    requests: list[dict],
) -> None:
    cached = _cached_recommender(data_dir, loaded_url, redis_server)

    cold = answer_rows(cached, requests)
    warmed = answer_rows(cached, requests)

    # Each user was read from PostgreSQL once; every other answer came from Redis.
    assert cached.store.misses == len({row["user_id"] for row in requests})
    expected = _uncached_answers(data_dir, loaded_url, requests)
    assert (_mismatches(cold, expected), _mismatches(warmed, expected)) == ([], [])


# Redis killed, hung and restarted while serving.


@contextlib.asynccontextmanager
async def _serving(recommender: Recommender) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app in this process, its store opened as a worker opens it."""
    app = create_app(recommender)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield client


class _RequestStream:
    """Tasks sending the sample requests back to back, each answer checked against ``expected``.

    An answer is recorded as its status, with ``"wrong body"`` for a 200 whose body differs and
    ``"no answer"`` for a request not answered within ``CLIENT_TIMEOUT``.
    """

    def __init__(self, client: httpx.AsyncClient, rows: list[dict], expected: list[bytes]) -> None:
        self.answers: list[int | str] = []
        self._client = client
        self._rows = rows
        self._expected = expected
        self._tasks = [asyncio.create_task(self._send(offset)) for offset in range(STREAM_TASKS)]

    async def _send(self, offset: int) -> None:
        for number in range(offset, 100 * len(self._rows), STREAM_TASKS):
            row = self._rows[number % len(self._rows)]
            url = f"/recommend/{row['user_id']}"
            try:
                response = await asyncio.wait_for(
                    self._client.get(url, params=_as_client_sends(row)), CLIENT_TIMEOUT
                )
            except TimeoutError:
                self.answers.append("no answer")
                continue
            right = response.content == self._expected[number % len(self._rows)]
            ok = response.status_code != 200 or right
            self.answers.append(response.status_code if ok else "wrong body")

    async def wait_for_more(self, count: int) -> None:
        """Wait (bounded) until ``count`` more requests have been answered."""
        wanted = len(self.answers) + count
        deadline = time.monotonic() + RECOVERY_TIMEOUT
        while len(self.answers) < wanted:
            if time.monotonic() > deadline:
                pytest.fail(f"{count} requests were not answered within {RECOVERY_TIMEOUT} s")
            await asyncio.sleep(0.01)

    async def stop(self) -> list[int | str]:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        return self.answers


def test_every_request_is_answered_right_while_redis_is_killed_and_restarted(
    redis_process: RedisProcess, loaded_url: str, data_dir: Path, requests: list[dict]
) -> None:
    served = _cached_recommender(data_dir, loaded_url, redis_process.url)
    expected = _uncached_answers(data_dir, loaded_url, requests)

    async def stream_across_outage() -> list[int | str]:
        async with _serving(served) as client:
            stream = _RequestStream(client, requests, expected)
            try:
                await stream.wait_for_more(STREAM_STEP)
                await asyncio.to_thread(redis_process.kill)
                await stream.wait_for_more(STREAM_STEP)
                await asyncio.to_thread(redis_process.start)
                await stream.wait_for_more(STREAM_STEP)
            finally:
                answers = await stream.stop()
        return answers

    answers = asyncio.run(stream_across_outage())

    assert set(answers) == {200}, {answer: answers.count(answer) for answer in set(answers)}


async def _readiness(client: httpx.AsyncClient) -> tuple[int, dict]:
    response = await asyncio.wait_for(client.get("/readyz"), CLIENT_TIMEOUT)
    return response.status_code, response.json()


def test_readyz_reports_the_cache_degraded_while_redis_is_down(
    redis_process: RedisProcess, loaded_url: str, data_dir: Path
) -> None:
    served = _cached_recommender(data_dir, loaded_url, redis_process.url)

    async def readiness_after_kill() -> tuple[int, dict]:
        async with _serving(served) as client:
            await _readiness(client)
            redis_process.kill()
            return await _readiness(client)

    code, body = asyncio.run(readiness_after_kill())

    assert (code, body["status"], body["store"]) == (200, "degraded", "ok")
    assert body["cache"].startswith("degraded: ")


def test_readyz_reports_ready_again_once_redis_is_back(
    redis_process: RedisProcess, loaded_url: str, data_dir: Path
) -> None:
    served = _cached_recommender(data_dir, loaded_url, redis_process.url)

    async def readiness_after_restart() -> tuple[int, dict]:
        async with _serving(served) as client:
            redis_process.kill()
            assert (await _readiness(client))[1]["status"] == "degraded"
            redis_process.start()
            deadline = time.monotonic() + RECOVERY_TIMEOUT
            while (readiness := await _readiness(client))[1]["status"] != "ready":
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            return readiness

    code, body = asyncio.run(readiness_after_restart())

    assert (code, body["status"], body["cache"]) == (200, "ready", "ok")


def test_the_cache_is_used_again_once_redis_is_back(
    redis_process: RedisProcess, loaded_url: str, data_dir: Path
) -> None:
    store = _cached_store(data_dir, loaded_url, redis_process.url)

    async def hits_after_restart() -> int:
        await store.open()
        try:
            await store.features(USER)
            redis_process.kill()
            await store.features(USER)
            redis_process.start()
            hits = store.hits
            deadline = time.monotonic() + RECOVERY_TIMEOUT
            while store.hits == hits and time.monotonic() < deadline:
                await asyncio.wait_for(store.features(USER), CLIENT_TIMEOUT)
                await asyncio.sleep(0.1)
            return store.hits - hits
        finally:
            await store.close()

    assert asyncio.run(hits_after_restart()) > 0


def test_a_request_while_redis_hangs_is_answered_from_postgres(
    redis_process: RedisProcess, loaded_url: str, data_dir: Path
) -> None:
    store = _cached_store(data_dir, loaded_url, redis_process.url, cache_timeout=0.2)

    async def read_while_hung() -> tuple[np.ndarray | None, dict]:
        await store.open()
        try:
            await store.features("u002")
            # A stopped process keeps its socket open but answers nothing, as a hung server.
            redis_process.process.send_signal(signal.SIGSTOP)
            features = await asyncio.wait_for(store.features(USER), CLIENT_TIMEOUT)
            return features, await store.status()
        finally:
            await store.close()

    features, status = asyncio.run(read_while_hung())

    assert np.array_equal(features, _file_features(data_dir, USER))
    assert status["cache"].startswith("degraded: ")


def test_a_request_with_an_unreachable_cluster_cache_is_answered_from_postgres(
    loaded_url: str, data_dir: Path
) -> None:
    dead = f"{CLUSTER_SCHEME}127.0.0.1:{free_port()}"
    store = _cached_store(data_dir, loaded_url, dead)

    [features] = _read(store, USER)

    assert np.array_equal(features, _file_features(data_dir, USER))


def test_readyz_reports_an_unreachable_cluster_cache_as_degraded(
    loaded_url: str, data_dir: Path
) -> None:
    dead = f"{CLUSTER_SCHEME}127.0.0.1:{free_port()}"
    served = _cached_recommender(data_dir, loaded_url, dead)

    async def readiness() -> httpx.Response:
        async with _serving(served) as client:
            return await asyncio.wait_for(client.get("/readyz"), CLIENT_TIMEOUT)

    response = asyncio.run(readiness())

    assert response.status_code == 200
    assert response.json()["status"] == "degraded"


# Settings.


def test_a_cache_ttl_below_one_millisecond_is_refused_at_start() -> None:
    # Redis keeps entries for whole milliseconds: a shorter TTL would make every write fail.
    with pytest.raises(ValidationError, match="cache_ttl"):
        Settings(store=STORE_URL, cache="redis://127.0.0.1:6379/0", cache_ttl=0.0004)


# A Redis Cluster.


def _cluster_client(url: str) -> redis.cluster.RedisCluster:
    return redis.cluster.RedisCluster.from_url("redis://" + url[len(CLUSTER_SCHEME) :])


def _masters_holding_keys(url: str) -> int:
    cluster = _cluster_client(url)
    try:
        sizes = [node.redis_connection.dbsize() for node in cluster.get_primaries()]
    finally:
        cluster.close()
    return sum(1 for size in sizes if size > 0)


def test_a_cluster_cache_fills_on_misses_and_hits_afterwards_on_every_master(
    redis_cluster: str, loaded_url: str, data_dir: Path
) -> None:
    store = _cached_store(data_dir, loaded_url, redis_cluster)
    users = list(_stored_features(loaded_url))

    _read(store, *users, *users)

    assert (store.misses, store.hits, _masters_holding_keys(redis_cluster)) == (
        N_USERS,
        N_USERS,
        3,
    )


def test_warm_fills_a_cluster_cache_with_every_users_stored_bytes(
    redis_cluster: str, loaded_url: str
) -> None:
    load_id = _load_id(loaded_url)

    warm(
        redis_cluster,
        load_id,
        _batches(loaded_url),
        TTL,
        CLIENT_TIMEOUT,
    )

    stored = _stored_features(loaded_url)
    cluster = _cluster_client(redis_cluster)
    try:
        cached = cluster.mget_nonatomic([feature_key(load_id, user_id) for user_id in stored])
    finally:
        cluster.close()
    assert dict(zip(stored, cached, strict=True)) == stored


def test_answers_through_a_warmed_cluster_cache_are_identical_to_answers_without_it(
    redis_cluster: str, loaded_url: str, data_dir: Path, requests: list[dict]
) -> None:
    cached = _cached_recommender(data_dir, loaded_url, redis_cluster)
    batches = _batches(loaded_url)
    warm(redis_cluster, cached.store.load_id, batches, TTL, CLIENT_TIMEOUT)

    answers = answer_rows(cached, requests)

    assert cached.store.misses == 0
    assert _mismatches(answers, _uncached_answers(data_dir, loaded_url, requests)) == []
