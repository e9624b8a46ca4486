"""Services of a drill's (or a test's) own: a redis-server it may kill, a PostgreSQL schema.

Both live on loopback or inside a database others share, so each is created fresh and removed
afterwards, and nothing else there is touched.
"""

import contextlib
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import redis
from psycopg import sql
from sqlalchemy.engine import make_url

from recommender.postgres.schema import libpq_url

# Bounds on waiting, not expectations of speed: redis-server starts in milliseconds.
REDIS_START_TIMEOUT = 10.0
REDIS_STOP_TIMEOUT = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServerMissing(RuntimeError):
    """There is no ``redis-server`` binary on PATH."""


class RedisProcess:
    """A redis-server of one's own on a loopback port, which may be killed and restarted.

    It keeps nothing on disk (``--save ""``, ``--appendonly no``), so a restarted server starts
    empty, on the same port.
    """

    def __init__(self, directory: Path, port: int | None = None, *options: str) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.options = options
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisProcess":
        """Start the server and wait (bounded) until it answers.

        Raises
        ------
        RedisServerMissing
            If ``redis-server`` is not on PATH.
        RuntimeError
            If the server exits or does not answer within ``REDIS_START_TIMEOUT`` seconds.
        """
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisServerMissing("the redis-server binary is not on PATH")
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [binary, "--bind", "127.0.0.1", "--port", str(self.port)]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self.directory)]
        self.process = subprocess.Popen(
            [*command, *self.options], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        while time.monotonic() < deadline and self.process.poll() is None:
            if self.answers():
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def answers(self) -> bool:
        """Whether the server answers a PING."""
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def kill(self) -> None:
        """Stop the server at once, as a crash would (SIGKILL)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=REDIS_STOP_TIMEOUT)
        self.process = None


def with_search_path(url: str, schema: str) -> str:
    """``url`` with its connections' search_path set to ``schema``."""
    return (
        make_url(url)
        .update_query_dict({"options": f"-csearch_path={schema}"})
        .render_as_string(hide_password=False)
    )


@contextlib.contextmanager
def private_schema(url: str, prefix: str) -> Iterator[str]:
    """A new schema ``<prefix>_<random>`` in ``url``'s database, dropped with all it holds on
    exit; yields ``url`` with its connections' search_path set to it."""
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(libpq_url(url), autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        yield with_search_path(url, schema)
    finally:
        with psycopg.connect(libpq_url(url), autocommit=True) as connection:
            connection.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
