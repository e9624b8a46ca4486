"""What the service tells the people who run it: metrics, log lines and request ids."""

import fcntl
import logging
import logging.config
import os
import re
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import orjson
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
_REQUEST_ID_HEADER = b"x-request-id"
# A client's id is echoed into logs and headers, so only short ids of harmless characters are
# taken; anything else is replaced by a fresh one.
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_CANDIDATE_BUCKETS = (0, 1, 3, 10, 30, 100, 300, 1000, 3000, 10_000, 100_000)
# Requests that match no route share one label, so a scan of random paths cannot create
# unbounded metric series.
_UNMATCHED = "unmatched"
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

request_log = logging.getLogger("recommender.request")


class MetricsDirectoryBusy(Exception):
    """Another running server keeps its metrics in the directory asked for."""


_held_locks: list = []


def collect_in(directory: Path) -> None:
    """Make this process and the workers it forks keep their metrics in ``directory``.

    Call before any metric is created. Files a previous server left there are removed: their
    counts belong to processes that no longer exist.

    Raises
    ------
    MetricsDirectoryBusy
        If another running server uses ``directory``: removing its files would lose its counts.
    """
    directory.mkdir(parents=True, exist_ok=True)
    lock = (directory / ".lock").open("a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise MetricsDirectoryBusy(
            f"metrics directory {directory} is in use by another running server; give each "
            "server its own RECOMMENDER_METRICS_DIR"
        ) from None
    # Held, and inherited by the workers, for as long as this server runs.
    _held_locks.append(lock)
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROCESS_DIR] = str(directory)
    # The client chooses where values live when it is first imported; choose again now.
    values.ValueClass = values.get_value_class()


def worker_exited(pid: int) -> None:
    """Drop the live gauges of a worker that has exited."""
    if MULTIPROCESS_DIR in os.environ:
        multiprocess.mark_process_dead(pid)


class Metrics:
    """The service's Prometheus metrics.

    With ``PROMETHEUS_MULTIPROC_DIR`` set (see ``collect_in``) every process writes its values
    there and ``exposition`` adds up all of them; otherwise the values live in this object.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        by_request = ["method", "route", "status"]
        self.requests = Counter(
            "recommender_requests", "HTTP requests answered.", by_request, registry=self.registry
        )
        self.latency = Histogram(
            "recommender_request_duration_seconds",
            "Seconds from receiving a request to sending the last byte of its answer.",
            by_request,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.candidates = Histogram(
            "recommender_candidates",
            "Restaurants within max_dis for each answered recommendation.",
            buckets=_CANDIDATE_BUCKETS,
            registry=self.registry,
        )
        self.store_latency = Histogram(
            "recommender_store_duration_seconds",
            "Seconds to read one user's features from the store (and cache).",
            ["store"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.cache_lookups = Counter(
            "recommender_cache_lookups",
            "Cache lookups by result: hit, miss, or skipped while the cache is failing.",
            ["result"],
            registry=self.registry,
        )
        self.version = Gauge(
            "recommender_version_info",
            "The model and data a worker answers from (value 1).",
            ["model_sha256", "data_sha256"],
            multiprocess_mode="livemax",
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        """All metrics in the Prometheus text format."""
        directory = os.environ.get(MULTIPROCESS_DIR)
        if directory is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)
        return generate_latest(registry)


class ObserveRequests:
    """ASGI middleware: a request id, version headers, metrics and one log line per request.

    The request id is the client's ``X-Request-ID`` when it is a short token, else a new one;
    either way it is returned in the response's ``X-Request-ID``.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, headers: dict[str, str]) -> None:
        self.app = app
        self.metrics = metrics
        self.headers = [(name.lower().encode(), value.encode()) for name, value in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        status = 500

        status_sent = False

        async def send_with_headers(message: Message) -> None:
            nonlocal status, status_sent
            if message["type"] == "http.response.start":
                status, status_sent = message["status"], True
                extra = [(_REQUEST_ID_HEADER, request_id.encode()), *self.headers]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            # Anything the application did not turn into a response: logged with the request
            # id, and answered as every other error is, in JSON, with the usual headers.
            request_log.exception("unhandled error, request_id=%s", request_id)
            if status_sent:
                raise
            status = 500
            await _internal_error(send_with_headers)
        finally:
            self._record(scope, status, time.perf_counter() - started, request_id)

    def _record(self, scope: Scope, status: int, seconds: float, request_id: str) -> None:
        route = _route_template(scope)
        # Any other method is one label, so a client cannot create unbounded metric series.
        method = scope["method"] if scope["method"] in _KNOWN_METHODS else "other"
        labels = (method, route, str(status))
        self.metrics.requests.labels(*labels).inc()
        self.metrics.latency.labels(*labels).observe(seconds)
        milliseconds = round(seconds * 1000, 3)
        request_log.info(
            "%s %s %d %.1f ms request_id=%s",
            method,
            route,
            status,
            milliseconds,
            request_id,
            extra={
                "fields": {
                    "method": method,
                    "route": route,
                    "status": status,
                    "latency_ms": milliseconds,
                    "request_id": request_id,
                }
            },
        )


async def _internal_error(send: Send) -> None:
    body = orjson.dumps({"detail": "internal error"})
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 500, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _route_template(scope: Scope) -> str:
    """The path template of the route that answered, or ``unmatched``."""
    route = scope.get("route")
    if route is None:
        # FastAPI names its own routes in the scope, but not plain Starlette ones such as
        # /openapi.json and /docs.
        router = getattr(scope.get("app"), "router", None)
        route = next(
            (r for r in getattr(router, "routes", ()) if r.matches(scope)[0] == Match.FULL),
            None,
        )
    return getattr(route, "path", _UNMATCHED)


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == _REQUEST_ID_HEADER:
            given = value.decode("latin-1")
            if _CLIENT_REQUEST_ID.fullmatch(given):
                return given
            break
    return uuid.uuid4().hex


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def logging_config(log_format: str, level: str) -> dict:
    """A ``logging.config.dictConfig`` for the service and for Gunicorn's own logger.

    ``log_format`` is ``json``, ``text``, or ``auto``: text when standard error is a terminal,
    JSON otherwise (for log collectors).
    """
    if log_format == "auto":
        log_format = "text" if sys.stderr.isatty() else "json"
    formatter = (
        {"()": JsonFormatter}
        if log_format == "json"
        else {"format": "%(asctime)s [%(process)d] %(levelname)s %(name)s %(message)s"}
    )
    handler = {
        "class": "logging.StreamHandler",
        "formatter": "service",
        "stream": "ext://sys.stderr",
    }
    quiet = {"level": "WARNING", "handlers": [], "propagate": True}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"service": formatter},
        "handlers": {"console": handler},
        "root": {"level": level.upper(), "handlers": ["console"]},
        "loggers": {
            "gunicorn.error": {"level": level.upper(), "handlers": [], "propagate": True},
            "gunicorn.access": quiet,
            # Each request already has its own line from ObserveRequests.
            "uvicorn.access": quiet,
            "uvicorn.error": {"level": level.upper(), "handlers": [], "propagate": True},
            "httpx": quiet,
        },
    }


def configure_logging(log_format: str, level: str = "info") -> None:
    """Apply ``logging_config`` to this process."""
    logging.config.dictConfig(logging_config(log_format, level))
