"""Gunicorn with Uvicorn workers, the data loaded once in the master and shared by fork."""

import asyncio
import gc
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import uvicorn
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from threadpoolctl import threadpool_limits
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.workers import UvicornWorker

from recommender.api import create_app
from recommender.dataset.reader import DataError
from recommender.observability import collect_in, logging_config, worker_exited
from recommender.service import Recommender
from recommender.settings import Settings

log = logging.getLogger("recommender")


def _after_fork(server: Any, worker: Any) -> None:
    # Each worker is one busy process; BLAS threads of two workers on two cores would fight.
    threadpool_limits(limits=1)
    # Uvicorn's worker hands its loggers Gunicorn's handlers; here every line goes through the
    # root logger's, so that it is in the configured format.
    for name in ("uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True


def _forget_worker(server: Any, worker: Any) -> None:
    worker_exited(worker.pid)


# How long a stopping worker waits for connections it has accepted to send their request.
_ACCEPTED_REQUEST_WAIT = 1.0
# A request line and headers longer than this are refused (431) as they arrive. The parser
# itself has no bound, and its cost grows faster than the head's length.
MAX_HEAD_BYTES = 65_536


class _BoundedHead(HttpToolsProtocol):
    """Uvicorn's httptools protocol, refusing a request head over ``MAX_HEAD_BYTES``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse_head()
                return
        super().data_received(data)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # Counting starts over for the next request on this connection. (Not at the next
        # request's beginning: the parser reports that in the middle of bytes already counted.)
        self._in_head, self._head_bytes = True, 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def _refuse_head(self) -> None:
        self.logger.warning("request head over %d bytes refused", MAX_HEAD_BYTES)
        body = orjson.dumps(
            {"detail": f"the request line and headers must be at most {MAX_HEAD_BYTES} bytes"}
        )
        head = (
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        )
        self.transport.write(head + body)
        self.transport.close()
        self._in_head = False


class _DrainingServer(uvicorn.Server):
    """Uvicorn, except that a stopping worker first reads the requests it has accepted.

    Uvicorn closes every connection without a request in progress when it stops, including
    one it accepted a moment ago whose request is still in the socket buffer: that client
    would see its connection reset. Here the worker stops accepting, gives such connections a
    bounded moment to deliver their request, and then shuts down as Uvicorn does, finishing
    every request it has read.
    """

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _ACCEPTED_REQUEST_WAIT
        # A few turns of the loop read whatever has already arrived.
        for _ in range(3):
            await asyncio.sleep(0)
        while loop.time() < deadline and any(
            getattr(connection, "cycle", None) is None
            for connection in self.server_state.connections
        ):
            await asyncio.sleep(0.01)
        await super().shutdown(sockets)


class Worker(UvicornWorker):
    """Gunicorn's Uvicorn worker, stopping through ``_DrainingServer``.

    It also stops by itself when its master is gone (killed with SIGKILL, say), within the
    worker timeout, instead of holding the port and serving on without supervision.
    """

    CONFIG_KWARGS = {**UvicornWorker.CONFIG_KWARGS, "http": _BoundedHead}

    async def callback_notify(self) -> None:
        if os.getppid() != self.ppid:
            self.log.warning("master %s is gone; worker %s stopping", self.ppid, self.pid)
            self._server.should_exit = True
        await super().callback_notify()

    async def _serve(self) -> None:
        # Mirrors UvicornWorker._serve, with the draining server in place of uvicorn.Server.
        self.config.app = self.wsgi
        server = self._server = _DrainingServer(config=self.config)
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)


class Server(BaseApplication):
    """A Gunicorn application serving a ``Recommender`` loaded in the master.

    The recommender is loaded before the workers fork, so its arrays (and the memory-mapped
    user features) are shared between all workers instead of copied into each. SIGHUP to the
    master calls ``load`` again: if it succeeds, new workers fork from the new data while the
    old ones finish their requests and exit; if it fails, the new workers fork from the data
    loaded before. Each worker answers from one data set only, never a mix.
    """

    def __init__(self, load: Callable[[], Recommender], settings: Settings) -> None:
        self.load_recommender = load
        self.settings = settings
        self.recommender = load()
        _freeze()
        super().__init__()

    def load_config(self) -> None:
        settings = self.settings
        options = {
            "bind": f"{settings.host}:{settings.port}",
            "workers": settings.workers,
            "worker_class": Worker,
            "preload_app": True,
            "timeout": settings.worker_timeout,
            "graceful_timeout": settings.graceful_timeout,
            "keepalive": 5,
            "loglevel": settings.log_level,
            "post_fork": _after_fork,
            "child_exit": _forget_worker,
            "logconfig_dict": logging_config(settings.log_format, settings.log_level),
            "control_socket_disable": True,
        }
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return create_app(self.recommender)

    def reload(self) -> None:
        """On SIGHUP: load the data again; keep what is loaded if that fails."""
        super().reload()
        log.info("reloading the data on SIGHUP")
        try:
            recommender = self.load_recommender()
        except DataError as error:
            log.error(
                "reload failed; the workers keep answering from the data loaded before: %s", error
            )
            return
        except Exception:  # noqa: BLE001 - the master must outlive any failed reload
            log.exception("reload failed; the workers keep answering from the data loaded before")
            return
        self.recommender = recommender
        # Gunicorn calls load() again for the workers it forks next.
        self.callable = None
        _freeze()


def _freeze() -> None:
    # What the master loaded lives as long as the workers: keeping it out of the collector's
    # scans shortens GC pauses and keeps the pages shared after the fork.
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def serve(load: Callable[[], Recommender], settings: Settings) -> None:
    """Load with ``load`` and serve until stopped (SIGTERM or SIGINT); SIGHUP reloads."""
    metrics_dir = settings.metrics_dir
    if metrics_dir is None:
        metrics_dir = Path(tempfile.mkdtemp(prefix="recommender-metrics-"))
    collect_in(metrics_dir)
    try:
        Server(load, settings).run()
    finally:
        if settings.metrics_dir is None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
