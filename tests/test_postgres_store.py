"""User features served from PostgreSQL: the same answers as the embedded store, from the load
the store started on whatever is loaded later, and behaviour when the database is missing at
start or goes away while serving.

The database "goes away" through a cuttable TCP proxy (``postgres_proxy``), never by stopping
the PostgreSQL server that other tests share.
"""

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psycopg
import pyarrow.parquet as pq
import pytest
from conftest import (
    SMALL,
    Client,
    Server,
    TcpProxy,
    answer_rows,
    free_port,
    local_client,
    running_server,
    through_proxy,
)
from psycopg import sql

from recommender.api import create_app
from recommender.bench.server import worker_pids
from recommender.contract import PARAMETERS
from recommender.dataset.generate import generate
from recommender.dataset.reader import DataError
from recommender.features import StoreUnavailable
from recommender.postgres.load import load_database
from recommender.postgres.schema import libpq_url
from recommender.postgres.store import PostgresStore, read_database
from recommender.service import Recommender, load_recommender
from recommender.settings import Settings

RECOMMENDER = Path(sys.executable).with_name("recommender")
N_USERS = SMALL["n_users"]
N_RESTAURANTS = SMALL["n_restaurants"]
N_FEATURES = SMALL["n_features"]
WORKERS = 2
# Bounds on waiting, not expectations of speed: a healthy server needs a small part of them.
START_TIMEOUT = 30.0
CLIENT_TIMEOUT = 10.0
RECOVERY_TIMEOUT = 30.0
# Seconds the served store waits for PostgreSQL per request before answering 503.
STORE_TIMEOUT = 1
# A bound on waiting for something that must happen, not an expectation of speed.
LIVENESS_TIMEOUT = 30.0
N_REQUESTS = 16


def _environment(**settings: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("RECOMMENDER_")}
    env.update({f"RECOMMENDER_{name.upper()}": value for name, value in settings.items()})
    return env


# Answers.


@pytest.mark.parametrize("loads", [1, 2], ids=["loaded-once", "loaded-twice"])
def test_postgres_answers_every_request_byte_for_byte_as_the_embedded_store(
    database_url: str,
    data_dir: Path,
    recommender: Recommender,
    requests: list[dict],
    loads: int,
) -> None:
    for _ in range(loads):
        load_database(data_dir, database_url)
    served = load_recommender(Settings(data_dir=data_dir, store=database_url))

    answers = answer_rows(served, requests)

    expected = answer_rows(recommender, requests)
    mismatches = [
        number
        for number, (answer, wanted) in enumerate(zip(answers, expected, strict=True))
        if answer != wanted
    ]
    assert mismatches == []


def test_the_postgres_recommender_reports_what_the_database_holds(
    loaded_url: str, data_dir: Path
) -> None:
    report = load_recommender(Settings(data_dir=data_dir, store=loaded_url)).report

    assert (report.n_users, report.n_restaurants, report.store) == (
        N_USERS,
        N_RESTAURANTS,
        "postgresql",
    )


async def _read_features(store: PostgresStore, user_id: str) -> np.ndarray | None:
    await store.open()
    try:
        return await asyncio.wait_for(store.features(user_id), CLIENT_TIMEOUT)
    finally:
        await store.close()


def _pinned_store(url: str, timeout: float = 5.0, pool_size: int = 1) -> PostgresStore:
    """A store reading the users table of the load ``url`` holds now, as a server does."""
    users = read_database(url, wait_seconds=LIVENESS_TIMEOUT).users
    return PostgresStore(
        url, N_FEATURES, "float32", N_USERS, timeout=timeout, pool_size=pool_size, users=users
    )


def test_features_of_an_unknown_user_are_none(loaded_url: str) -> None:
    store = _pinned_store(loaded_url)

    assert asyncio.run(_read_features(store, "nobody")) is None


def test_a_database_without_loaded_data_is_refused_at_start(
    database_url: str, data_dir: Path
) -> None:
    with pytest.raises(DataError, match="recommender db load"):
        load_recommender(Settings(data_dir=data_dir, store=database_url))


def test_a_database_loaded_for_another_model_is_refused_at_start(
    loaded_url: str, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    generate(other, n_users=5, n_restaurants=40, n_features=4, n_requests=0, seed=1)

    loaded_for = f"{N_RESTAURANTS} restaurants x {N_FEATURES} features.*40 x 4"
    with pytest.raises(DataError, match=loaded_for):
        load_recommender(Settings(data_dir=other, store=loaded_url))


# One load per store, whatever is loaded later.


@pytest.fixture(scope="module")
def second_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another small data set: the same sizes and user ids, other features, restaurants, model."""
    directory = tmp_path_factory.mktemp("second") / "small"
    generate(directory, **{**SMALL, "seed": SMALL["seed"] + 1})
    return directory


def _file_feature_bytes(directory: Path) -> dict[str, bytes]:
    """Each user's features in ``directory`` as a load stores them (float32 little-endian)."""
    table = pq.read_table(directory / "user.parquet")
    columns = [table.column(f"feature_{j}").to_numpy() for j in range(N_FEATURES)]
    rows = np.column_stack(columns).astype("<f4")
    ids = table.column("user_id").to_pylist()
    return {user_id: row.tobytes() for user_id, row in zip(ids, rows, strict=True)}


def _served_bytes(store: PostgresStore, user_ids: list[str]) -> dict[str, bytes | None]:
    """Each user's feature bytes as ``store`` serves them."""

    async def read_all() -> dict[str, bytes | None]:
        await store.open()
        try:
            return {
                user_id: await asyncio.wait_for(store.feature_bytes(user_id), CLIENT_TIMEOUT)
                for user_id in user_ids
            }
        finally:
            await store.close()

    return asyncio.run(read_all())


def _mismatches(answers: list[bytes], expected: list[bytes]) -> list[int]:
    pairs = enumerate(zip(answers, expected, strict=True))
    return [number for number, (answer, wanted) in pairs if answer != wanted]


def test_a_store_answers_the_features_of_its_own_load_after_another_load(
    loaded_url: str, data_dir: Path, second_data_dir: Path
) -> None:
    first, second = _file_feature_bytes(data_dir), _file_feature_bytes(second_data_dir)
    assert first.keys() == second.keys() and first != second, "the loads must differ"
    started_before = load_recommender(Settings(data_dir=data_dir, store=loaded_url)).store

    load_database(second_data_dir, loaded_url)
    started_after = load_recommender(Settings(data_dir=second_data_dir, store=loaded_url)).store

    assert _served_bytes(started_before, list(first)) == first
    assert _served_bytes(started_after, list(second)) == second


def test_a_recommender_answers_as_before_after_another_load_until_it_is_reloaded(
    loaded_url: str,
    data_dir: Path,
    second_data_dir: Path,
    recommender: Recommender,
    requests: list[dict],
) -> None:
    served = load_recommender(Settings(data_dir=data_dir, store=loaded_url))

    load_database(second_data_dir, loaded_url)

    assert _mismatches(answer_rows(served, requests), answer_rows(recommender, requests)) == []


def test_a_server_answers_from_the_load_it_started_on_after_another_load(
    loaded_url: str,
    data_dir: Path,
    second_data_dir: Path,
    recommender: Recommender,
    requests: list[dict],
    tmp_path: Path,
) -> None:
    rows = requests[:N_REQUESTS]
    options = ("--store", loaded_url, "--workers", "1")
    with running_server(data_dir, tmp_path, *options, store_start_timeout="10") as server:
        load_database(second_data_dir, loaded_url)
        with local_client(CLIENT_TIMEOUT) as client:
            answers = [
                client.get(
                    f"{server.url}/recommend/{row['user_id']}", params=_as_client_sends(row)
                ).content
                for row in rows
            ]

    assert _mismatches(answers, answer_rows(recommender, rows)) == []


def test_a_store_two_loads_behind_raises_store_unavailable(
    loaded_url: str, data_dir: Path, second_data_dir: Path
) -> None:
    store = _pinned_store(loaded_url)
    user_id, _ = _first_user(data_dir)

    load_database(second_data_dir, loaded_url)
    load_database(data_dir, loaded_url)

    with pytest.raises(StoreUnavailable, match="UndefinedTable"):
        asyncio.run(_read_features(store, user_id))


def test_a_request_to_a_recommender_two_loads_behind_is_answered_503_with_retry_after(
    loaded_url: str, data_dir: Path, second_data_dir: Path, requests: list[dict]
) -> None:
    served = load_recommender(Settings(data_dir=data_dir, store=loaded_url))
    row = requests[0]

    load_database(second_data_dir, loaded_url)
    load_database(data_dir, loaded_url)
    response = Client(create_app(served)).get(
        f"/recommend/{row['user_id']}", params=_as_client_sends(row)
    )

    assert (response.status_code, response.headers.get("retry-after")) == (503, "1")
    assert "unavailable" in response.json()["detail"]


# A database loaded before users were kept per load.


def _to_previous_layout(url: str) -> None:
    """Turn a database after one load into the earlier layout: the users in a table ``users``."""
    with psycopg.connect(url) as connection:
        [(load_id,)] = connection.execute("SELECT load_id FROM dataset").fetchall()
        connection.execute("DROP VIEW users")
        loaded = sql.Identifier(f"users_{load_id}")
        connection.execute(sql.SQL("ALTER TABLE {} RENAME TO users").format(loaded))


def _relations(url: str) -> dict[str, str]:
    """The tables and views of the database's schema, each with its kind."""
    with psycopg.connect(url) as connection:
        rows = connection.execute(
            "SELECT table_name, table_type FROM information_schema.tables "
            "WHERE table_schema = current_schema()"
        ).fetchall()
    return dict(rows)


def test_a_database_of_the_previous_layout_is_served_as_the_embedded_store_serves(
    loaded_url: str, data_dir: Path, recommender: Recommender, requests: list[dict]
) -> None:
    _to_previous_layout(loaded_url)
    assert _relations(loaded_url)["users"] == "BASE TABLE"

    served = load_recommender(Settings(data_dir=data_dir, store=loaded_url))

    assert _mismatches(answer_rows(served, requests), answer_rows(recommender, requests)) == []


def test_a_load_over_the_previous_layout_puts_the_users_in_a_table_of_their_own(
    loaded_url: str, second_data_dir: Path
) -> None:
    _to_previous_layout(loaded_url)

    summary = load_database(second_data_dir, loaded_url)

    assert _relations(loaded_url) == {
        "users": "VIEW",
        f"users_{summary.load_id}": "BASE TABLE",
        "restaurants": "BASE TABLE",
        "dataset": "BASE TABLE",
    }


def test_a_store_started_after_a_load_over_the_previous_layout_answers_the_new_load(
    loaded_url: str, second_data_dir: Path
) -> None:
    _to_previous_layout(loaded_url)
    load_database(second_data_dir, loaded_url)
    second = _file_feature_bytes(second_data_dir)

    store = load_recommender(Settings(data_dir=second_data_dir, store=loaded_url)).store

    assert _served_bytes(store, list(second)) == second


# The store when PostgreSQL goes away.


def _first_user(data_dir: Path) -> tuple[str, np.ndarray]:
    table = pq.read_table(data_dir / "user.parquet").slice(0, 1).to_pylist()[0]
    features = np.array([table[f"feature_{j}"] for j in range(N_FEATURES)], dtype=np.float32)
    return table["user_id"], features.astype(np.float64)


def _proxied_store(loaded_url: str, proxy: TcpProxy) -> PostgresStore:
    users = read_database(loaded_url, wait_seconds=LIVENESS_TIMEOUT).users
    url = through_proxy(loaded_url, proxy)
    return PostgresStore(
        url, N_FEATURES, "float32", N_USERS, timeout=STORE_TIMEOUT, pool_size=2, users=users
    )


def test_the_store_raises_store_unavailable_while_postgres_is_cut(
    loaded_url: str, data_dir: Path, postgres_proxy: TcpProxy
) -> None:
    store = _proxied_store(loaded_url, postgres_proxy)
    user_id, _ = _first_user(data_dir)

    async def read_before_and_during_cut() -> None:
        await store.open()
        try:
            await asyncio.wait_for(store.features(user_id), CLIENT_TIMEOUT)
            postgres_proxy.cut()
            await asyncio.wait_for(store.features(user_id), CLIENT_TIMEOUT)
        finally:
            await store.close()

    with pytest.raises(StoreUnavailable):
        asyncio.run(read_before_and_during_cut())


def test_the_store_answers_again_once_postgres_comes_back(
    loaded_url: str, data_dir: Path, postgres_proxy: TcpProxy
) -> None:
    store = _proxied_store(loaded_url, postgres_proxy)
    user_id, features = _first_user(data_dir)

    async def read_across_cut_and_restore() -> np.ndarray:
        await store.open()
        try:
            await asyncio.wait_for(store.features(user_id), CLIENT_TIMEOUT)
            postgres_proxy.cut()
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(store.features(user_id), CLIENT_TIMEOUT)
            postgres_proxy.restore()
            deadline = time.monotonic() + RECOVERY_TIMEOUT
            while True:
                try:
                    return await asyncio.wait_for(store.features(user_id), CLIENT_TIMEOUT)
                except StoreUnavailable:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
        finally:
            await store.close()

    assert np.array_equal(asyncio.run(read_across_cut_and_restore()), features)


# The server.


def _worker_pids(server: Server) -> set[int]:
    return worker_pids(server.process.pid)


def _wait_for_workers(server: Server) -> None:
    # The first worker may answer /healthz before the master has forked the others.
    deadline = time.monotonic() + START_TIMEOUT
    while len(_worker_pids(server)) != WORKERS:
        if time.monotonic() > deadline:
            pytest.fail(f"the server did not run {WORKERS} workers:\n{server.log_text()}")
        time.sleep(0.1)


@pytest.fixture
def proxied_server(
    loaded_url: str, data_dir: Path, postgres_proxy: TcpProxy, tmp_path: Path
) -> Iterator[Server]:
    """A server reading user features through the cuttable proxy."""
    with running_server(
        data_dir,
        tmp_path,
        "--store",
        through_proxy(loaded_url, postgres_proxy),
        "--workers",
        str(WORKERS),
        store_timeout=str(STORE_TIMEOUT),
        store_start_timeout="10",
    ) as running:
        _wait_for_workers(running)
        yield running


def _ask(server: Server, request: dict) -> int | str:
    """The status of one request on a fresh connection, or the transport error's name."""
    # A fresh connection per request, so that either worker may accept it.
    with local_client(CLIENT_TIMEOUT) as client:
        url = f"{server.url}/recommend/{request['user_id']}"
        parameters = {"latitude": request["latitude"], "longitude": request["longitude"]}
        try:
            response = client.get(url, params=parameters)
        except httpx.TransportError as error:
            return type(error).__name__
    if response.status_code == 503 and "detail" not in _json_object(response):
        return "503 without a JSON detail"
    return response.status_code


def _as_client_sends(row: dict) -> dict[str, str]:
    return {name: str(row[name]) for name in PARAMETERS}


def _json_object(response: httpx.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _ask_many(server: Server, requests: list[dict]) -> list[int | str]:
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda request: _ask(server, request), requests))


def test_serve_exits_with_a_clear_message_when_postgres_is_unreachable_at_start(
    data_dir: Path, tmp_path: Path, unused_port: int
) -> None:
    store = f"postgresql://postgres@127.0.0.1:{unused_port}/test"
    env = _environment(prepared_dir=str(tmp_path / "prepared"), store_start_timeout="2")
    command = [str(RECOMMENDER), "serve", "--store", store, "--data-dir", str(data_dir)]

    finished = subprocess.run(
        [*command, "--port", str(free_port())],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
    )

    assert finished.returncode != 0
    assert f"127.0.0.1:{unused_port}/test did not answer within 2 s" in finished.stderr
    assert "Traceback" not in finished.stderr


def test_requests_are_answered_503_with_a_json_body_while_postgres_is_cut(
    proxied_server: Server, postgres_proxy: TcpProxy, requests: list[dict]
) -> None:
    assert _ask_many(proxied_server, requests[:N_REQUESTS]) == [200] * N_REQUESTS

    postgres_proxy.cut()
    statuses = _ask_many(proxied_server, requests[:N_REQUESTS])

    assert statuses == [503] * N_REQUESTS


def test_losing_postgres_costs_no_worker(
    proxied_server: Server, postgres_proxy: TcpProxy, requests: list[dict]
) -> None:
    workers = _worker_pids(proxied_server)
    _ask_many(proxied_server, requests[:N_REQUESTS])

    postgres_proxy.cut()
    _ask_many(proxied_server, requests[:N_REQUESTS])
    postgres_proxy.restore()
    _ask_many(proxied_server, requests[:N_REQUESTS])

    assert _worker_pids(proxied_server) == workers


def _wait_for_answers(server: Server, request: dict) -> None:
    deadline = time.monotonic() + RECOVERY_TIMEOUT
    while _ask(server, request) != 200:
        if time.monotonic() > deadline:
            pytest.fail(f"no answer within {RECOVERY_TIMEOUT} s of restoring PostgreSQL")
        time.sleep(0.2)


def test_requests_succeed_again_once_postgres_comes_back(
    proxied_server: Server, postgres_proxy: TcpProxy, requests: list[dict]
) -> None:
    postgres_proxy.cut()
    assert set(_ask_many(proxied_server, requests[:N_REQUESTS])) == {503}

    postgres_proxy.restore()
    _wait_for_answers(proxied_server, requests[0])
    statuses = _ask_many(proxied_server, requests[:N_REQUESTS])

    assert statuses == [200] * N_REQUESTS


class RequestStream:
    """Threads sending requests back to back until stopped, each status counted.

    A request that fails at the transport (refused, reset, timed out) counts by the error's
    name. Each thread sends at most ``limit`` requests, so the stream is bounded.
    """

    def __init__(self, server: Server, requests: list[dict], limit: int = 5000) -> None:
        self.statuses: list[int | str] = []
        self._stopped = threading.Event()
        self._threads = [
            threading.Thread(target=self._send, args=(server, requests[offset::4], limit))
            for offset in range(4)
        ]
        for thread in self._threads:
            thread.start()

    def _send(self, server: Server, requests: list[dict], limit: int) -> None:
        for number in range(limit):
            if self._stopped.is_set():
                return
            self.statuses.append(_ask(server, requests[number % len(requests)]))

    def wait_for(self, status: int | str, timeout: float, more: int = 1) -> None:
        """Wait until ``status`` is counted ``more`` times more than now."""
        wanted = self.statuses.count(status) + more
        deadline = time.monotonic() + timeout
        while self.statuses.count(status) < wanted:
            if time.monotonic() > deadline:
                pytest.fail(f"no {status} within {timeout} s; statuses so far: {self.counts()}")
            time.sleep(0.05)

    def stop(self) -> dict[int | str, int]:
        self._stopped.set()
        for thread in self._threads:
            thread.join()
        return self.counts()

    def counts(self) -> dict[int | str, int]:
        statuses = list(self.statuses)
        return {status: statuses.count(status) for status in set(statuses)}


def test_requests_across_a_cut_and_a_restore_get_an_answer_or_a_503_and_never_hang(
    proxied_server: Server, postgres_proxy: TcpProxy, requests: list[dict]
) -> None:
    stream = RequestStream(proxied_server, requests)
    try:
        stream.wait_for(200, RECOVERY_TIMEOUT)
        postgres_proxy.cut()
        stream.wait_for(503, RECOVERY_TIMEOUT)
        postgres_proxy.restore()
        stream.wait_for(200, RECOVERY_TIMEOUT, more=N_REQUESTS)
    finally:
        counts = stream.stop()

    assert set(counts) == {200, 503}, counts


def test_a_query_blocked_in_the_database_is_cancelled_by_the_statement_timeout(
    loaded_url: str, data_dir: Path
) -> None:
    # The store's statement_timeout, not the client, must end a query that PostgreSQL holds:
    # nothing else would, and the request would wait for as long as the lock is held.
    store = _pinned_store(loaded_url, timeout=0.3)
    user_id, _ = _first_user(data_dir)

    async def read_while_locked() -> None:
        await store.open()
        try:
            with psycopg.connect(libpq_url(loaded_url)) as locker:
                # Locking the view locks the load's users table behind it too.
                locker.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
                # A bound on waiting only, far above the timeout under test.
                await asyncio.wait_for(store.features(user_id), LIVENESS_TIMEOUT)
        finally:
            await store.close()

    with pytest.raises(StoreUnavailable, match="QueryCanceled"):
        asyncio.run(read_while_locked())


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ("DELETE FROM dataset", "holds 0 rows"),
        ("INSERT INTO dataset SELECT * FROM dataset", "holds 2 rows"),
        ("UPDATE dataset SET data_sha256 = E'abc\\r\\nSet-Cookie: x=1'", "is not a SHA-256"),
    ],
    ids=["no-row", "two-rows", "header-in-version"],
)
def test_a_dataset_description_that_is_not_one_sane_row_is_refused_at_start(
    loaded_url: str, data_dir: Path, change: str, complaint: str
) -> None:
    with psycopg.connect(libpq_url(loaded_url), autocommit=True) as connection:
        connection.execute(change)

    with pytest.raises(DataError, match=complaint):
        load_recommender(Settings(data_dir=data_dir, store=loaded_url))
