"""Gunicorn with Uvicorn workers, the data loaded once in the master and shared by fork."""

import gc
import logging
from typing import Any

from gunicorn.app.base import BaseApplication
from threadpoolctl import threadpool_limits

from recommender.api import create_app
from recommender.service import Recommender
from recommender.settings import Settings


def _limit_blas_threads(server: Any, worker: Any) -> None:
    # Each worker is one busy process; BLAS threads of two workers on two cores would fight.
    threadpool_limits(limits=1)


class Server(BaseApplication):
    """A Gunicorn application serving an already loaded ``Recommender``.

    The recommender is loaded before the workers fork, so its arrays (and the memory-mapped
    user features) are shared between all workers instead of copied into each.
    """

    def __init__(self, recommender: Recommender, settings: Settings) -> None:
        self.recommender = recommender
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        settings = self.settings
        options = {
            "bind": f"{settings.host}:{settings.port}",
            "workers": settings.workers,
            "worker_class": "uvicorn.workers.UvicornWorker",
            "preload_app": True,
            "timeout": settings.worker_timeout,
            "graceful_timeout": settings.graceful_timeout,
            "keepalive": 5,
            "loglevel": settings.log_level,
            "post_fork": _limit_blas_threads,
            "control_socket_disable": True,
        }
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return create_app(self.recommender)


def serve(recommender: Recommender, settings: Settings) -> None:
    """Run the HTTP server until it is stopped (SIGTERM or SIGINT)."""
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    # What the master loaded lives as long as the workers: keeping it out of the collector's
    # scans shortens GC pauses and keeps the pages shared after the fork.
    gc.collect()
    gc.freeze()
    Server(recommender, settings).run()
