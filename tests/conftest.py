"""Shared fixtures: small generated data directories and recommenders loaded from them."""

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pyarrow.parquet as pq
import pytest
import redis
from fastapi import FastAPI
from sqlalchemy.engine import make_url

# Helpers the fault drills share with the tests; the tests import them from here.
from recommender.bench.faults import answer_rows as answer_rows
from recommender.bench.proxy import TcpProxy
from recommender.bench.proxy import through_proxy as through_proxy
from recommender.bench.services import RedisProcess, RedisServerMissing, free_port, private_schema
from recommender.dataset.generate import generate
from recommender.postgres.load import load_database
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


# Integration tests talk to real servers. On a machine without them they skip, saying why;
# with RECOMMENDER_REQUIRE_SERVICES=1 (set by CI) a missing server fails them instead.
REQUIRE_SERVICES = os.environ.get("RECOMMENDER_REQUIRE_SERVICES") == "1"
POSTGRES_URL = os.environ.get(
    "RECOMMENDER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


def service_missing(name: str, reason: str) -> None:
    """Skip the test, or fail it when services are required."""
    if REQUIRE_SERVICES:
        pytest.fail(f"{name} is required (RECOMMENDER_REQUIRE_SERVICES=1) but {reason}")
    pytest.skip(f"{name} is not available: {reason}")


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The URL of a reachable PostgreSQL server."""
    try:
        with psycopg.connect(POSTGRES_URL, connect_timeout=3) as connection:
            connection.execute("SELECT 1")
    except psycopg.Error as error:
        service_missing("PostgreSQL", f"{POSTGRES_URL} did not answer ({error})")
    return POSTGRES_URL


@pytest.fixture
def database_url(postgres_server: str) -> Iterator[str]:
    """A URL whose connections work in a fresh schema of their own, dropped afterwards."""
    with private_schema(postgres_server, "test") as url:
        yield url


@pytest.fixture
def postgres_proxy(postgres_server: str) -> Iterator[TcpProxy]:
    """A cuttable line to the PostgreSQL server."""
    url = make_url(postgres_server)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    yield proxy
    proxy.cut()


REDIS_URL = os.environ.get("RECOMMENDER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def redis_server() -> str:
    """The URL of the machine's running Redis (tests use keys of their own, never flush)."""
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
        client.ping()
        client.close()
    except redis.RedisError as error:
        service_missing("Redis", f"{REDIS_URL} did not answer ({error})")
    return REDIS_URL


def start_redis(server: RedisProcess) -> RedisProcess:
    """``server``, started; without a redis-server binary the test skips (fails in CI)."""
    try:
        return server.start()
    except RedisServerMissing as error:
        service_missing("redis-server", str(error))


@pytest.fixture
def redis_process(tmp_path: Path) -> Iterator[RedisProcess]:
    """A private redis-server, started; stopped after the test."""
    server = start_redis(RedisProcess(tmp_path / "redis"))
    yield server
    server.kill()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[str]:
    """A private 3-master Redis Cluster on loopback ports; its ``redis+cluster://`` URL."""
    nodes = [
        RedisProcess(
            tmp_path / f"node{i}",
            None,
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(tmp_path / f"node{i}" / "nodes.conf"),
            "--cluster-node-timeout",
            "2000",
            # The bus port defaults to port + 10000, which may not exist for a high free port.
            "--cluster-port",
            str(free_port()),
        )
        for i in range(3)
    ]
    try:
        for node in nodes:
            start_redis(node)
        addresses = [f"127.0.0.1:{node.port}" for node in nodes]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        _wait_for_cluster(nodes[0].port)
        yield f"redis+cluster://127.0.0.1:{nodes[0].port}"
    finally:
        for node in nodes:
            node.kill()


def _wait_for_cluster(port: int) -> None:
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if client.cluster("info").get("cluster_state") == "ok":
            return
        time.sleep(0.1)
    raise RuntimeError("the Redis Cluster did not become ready")


class Client:
    """A synchronous client for the app, through httpx's ASGI transport (no server, no network)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def request(self, method: str, url: str, **kwargs: object) -> httpx.Response:
        async def send() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
            # The lifespan opens the store, as a server's worker does before serving.
            async with self.app.router.lifespan_context(self.app):
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                    return await c.request(method, url, **kwargs)

        return asyncio.run(send())

    def get(self, url: str, **kwargs: object) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: object) -> httpx.Response:
        return self.request("POST", url, **kwargs)


@dataclass
class Server:
    """A running ``recommender serve`` process and the address it answers on."""

    process: subprocess.Popen
    url: str
    log: Path

    def log_text(self) -> str:
        """What the server has logged so far."""
        return self.log.read_text(errors="replace")


def local_client(timeout: float = 10.0) -> httpx.Client:
    """An HTTP client for servers on this machine."""
    # trust_env=False: no proxy from the environment may see this traffic.
    return httpx.Client(trust_env=False, timeout=timeout)


RECOMMENDER = Path(sys.executable).with_name("recommender")


def start_server(data_dir: Path, tmp_path: Path, *options: str, **settings: str) -> Server:
    """``recommender serve`` on a free loopback port, in a process group of its own.

    ``settings`` become ``RECOMMENDER_*`` variables; no other such variable is inherited.
    """
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("RECOMMENDER_")}
    env["RECOMMENDER_PREPARED_DIR"] = str(tmp_path / "prepared")
    env.update({f"RECOMMENDER_{name.upper()}": value for name, value in settings.items()})
    log = tmp_path / "server.log"
    command = [str(RECOMMENDER), "serve", "--data-dir", str(data_dir), "--port", str(port)]
    with log.open("wb") as output:
        process = subprocess.Popen(
            [*command, *options],
            env=env,
            cwd=tmp_path,
            stdout=output,
            stderr=subprocess.STDOUT,
            # Its own process group, so teardown can end the workers along with the master.
            start_new_session=True,
        )
    return Server(process=process, url=f"http://127.0.0.1:{port}", log=log)


@pytest.fixture
def loaded_url(database_url: str, data_dir: Path) -> str:
    """A database holding the small data."""
    load_database(data_dir, database_url)
    return database_url


@pytest.fixture
def unused_port() -> int:
    """A loopback port nothing listens on."""
    return free_port()


def wait_until_healthy(server: Server, timeout: float = 30.0) -> None:
    """Wait (bounded) until ``server`` answers /healthz; fail with its log if it exits or not."""
    deadline = time.monotonic() + timeout
    with local_client() as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                pytest.fail(f"server exited with {server.process.returncode}:\n{server.log_text()}")
            with contextlib.suppress(httpx.TransportError):
                if client.get(f"{server.url}/healthz").status_code == 200:
                    return
            time.sleep(0.1)
    pytest.fail(f"server did not answer /healthz within {timeout} s:\n{server.log_text()}")


def stop_server(server: Server, timeout: float = 30.0) -> None:
    """SIGTERM the master; SIGKILL its whole process group if it outlives ``timeout``."""
    if server.process.poll() is not None:
        return
    server.process.terminate()
    try:
        server.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()


@contextlib.contextmanager
def running_server(
    data_dir: Path, tmp_path: Path, *options: str, **settings: str
) -> Iterator[Server]:
    """A server from ``start_server``, healthy when yielded; stopped afterwards, however left."""
    server = start_server(data_dir, tmp_path, *options, **settings)
    try:
        wait_until_healthy(server)
        yield server
    finally:
        stop_server(server)
