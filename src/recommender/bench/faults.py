"""Fault drills: a bounded load against a running server while one thing goes wrong.

Each drill sends requests from concurrent clients, injects one fault, sorts every outcome and
returns a ``FaultRecord``: how many requests were sent, how many failed, and how long the
service took to recover. Two kinds of client share the load: most keep their connection alive
between requests, as real clients do, and a few open a new connection per request. They fail
differently when a worker stops: a keep-alive connection may be closed while the client's next
request is on its way (HTTP/1.1 allows it, and a client may resend an idempotent request when
that happens), while a request on a new connection has no such excuse.

Two drills break a service behind the server rather than the server: the line to PostgreSQL
(the store), cut at a TCP proxy, and the Redis cache, killed. Both run on services of the
drill's own (a schema of its own, a redis-server of its own on a free port), never stopping a
server that others share.

The drills find Gunicorn's workers as the master's child processes and follow connections
through ``/proc`` (``/proc/net/tcp`` and each process's open files), so they run on Linux only,
against a server on 127.0.0.1.

``python -m recommender.bench.faults --data-dir DIR --out FILE.json`` runs every drill against
servers of its own, on copies of ``DIR``, and prints a table.
"""

import argparse
import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psycopg
import pyarrow.parquet as pq
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import make_url

from recommender.bench.load import request_paths
from recommender.bench.proxy import TcpProxy, through_proxy
from recommender.bench.server import ServerProcess, worker_pids
from recommender.bench.services import RedisProcess, free_port, private_schema
from recommender.contract import parse_query, render
from recommender.dataset.generate import generate
from recommender.dataset.reader import MODEL_FILE, RESTAURANT_FILE, USER_FILE, count_rows
from recommender.postgres.load import load_database
from recommender.postgres.schema import libpq_url, safe_url
from recommender.service import Recommender, load_recommender
from recommender.settings import Settings

# Outcomes that are not an answer.
WRONG_ANSWER = "wrong answer"
# The service saying it cannot answer now, and when to ask again: how a store outage shows.
UNAVAILABLE = "status 503 with Retry-After"
REFUSED = "connection refused"
DROPPED = "keep-alive connection dropped"
LOST = "connection lost"
TIMED_OUT = "timed out"

CHECKSUM_FILE = MODEL_FILE + ".sha256"
DATA_FILES = (RESTAURANT_FILE, USER_FILE, MODEL_FILE, CHECKSUM_FILE)

# Bounds on waiting, not expectations of speed: a healthy server needs a small part of them.
LIVENESS_TIMEOUT = 60.0
REQUEST_TIMEOUT = 30.0
POLL_SECONDS = 0.02


@dataclass
class FaultRecord:
    """What one drill measured.

    Attributes
    ----------
    fault : str
        What went wrong.
    requests_sent : int
        Requests the load and the held requests sent (recovery probes not counted).
    failures : int
        Requests that did not get an accepted answer, except those the fault makes expected
        (connections refused once a stopped server is gone).
    recovery_seconds : float or None
        Seconds from the fault until ``recovered_when`` held; None if it never did, or if there
        was nothing to recover from.
    recovered_when : str
        What recovery means for this fault.
    outcomes : dict of str to int
        Requests per outcome: an accepted answer's name (``"expected"``, ``"old"``,
        ``"new"``), ``WRONG_ANSWER``, ``"status NNN"``, or a connection outcome.
    details : dict
        What else the drill established (pids, exit status, connection errors, ...).
    """

    fault: str
    requests_sent: int
    failures: int
    recovery_seconds: float | None
    recovered_when: str
    outcomes: dict[str, int] = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    def table_row(self) -> str:
        """The record as a row of ``markdown_table``."""
        if self.recovery_seconds is None:
            recovery = self.recovered_when
        else:
            recovery = f"{self.recovery_seconds:.2f} s ({self.recovered_when})"
        return f"| {self.fault} | {self.requests_sent} | {self.failures} | {recovery} |"


def markdown_table(records: Sequence[FaultRecord]) -> str:
    """``| fault | requests sent | failures | recovery time |``, one row per record."""
    lines = ["| fault | requests sent | failures | recovery time |", "|---|---|---|---|"]
    return "\n".join(lines + [record.table_row() for record in records])


# The load ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """One request of a load: which one, when it was sent and finished, and how it ended."""

    index: int
    sent_at: float
    finished_at: float
    label: str


class Load:
    """Concurrent clients replaying ``paths`` until stopped, at most ``limit`` requests in all.

    ``clients`` keep their connection alive between requests; ``fresh_clients`` open a new
    connection per request. The ``i``-th request overall asks for ``paths[i % len(paths)]``;
    its outcome is the name of the first entry of ``answers`` whose ``i``-th answer (modulo
    its length) equals the body of a 200 response, else ``WRONG_ANSWER``, ``UNAVAILABLE`` (a
    503 with Retry-After), ``"status NNN"``, ``REFUSED``, ``DROPPED`` (a kept-alive connection
    closed or reset before the answer), ``LOST`` (the same on a new connection) or
    ``TIMED_OUT``. With ``stop_on_refusal`` a client stops at its first refused connection.
    """

    def __init__(
        self,
        url: str,
        paths: Sequence[str],
        answers: Mapping[str, Sequence[bytes]],
        clients: int = 6,
        fresh_clients: int = 2,
        limit: int = 20_000,
        stop_on_refusal: bool = False,
    ) -> None:
        self.url = url
        self.paths = paths
        self.answers = answers
        self.limit = limit
        self.stop_on_refusal = stop_on_refusal
        self.outcomes: list[Outcome] = []
        self.errors: Counter = Counter()
        self._sent = 0
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        kinds = [True] * clients + [False] * fresh_clients
        self._threads = [
            threading.Thread(target=self._client, args=(keep_alive,), daemon=True)
            for keep_alive in kinds
        ]

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def sent(self) -> int:
        """Requests sent so far."""
        with self._changed:
            return self._sent

    def stop(self) -> list[Outcome]:
        """Let each client finish the request it has in flight, then stop; every outcome."""
        self._stopping.set()
        for thread in self._threads:
            if thread.ident is not None:
                thread.join()
        return self.outcomes

    def counts(self, since: float | None = None, until: float | None = None) -> Counter:
        """Requests per outcome, of those sent in ``[since, until)`` if given."""
        with self._changed:
            return Counter(
                outcome.label
                for outcome in self.outcomes
                if (since is None or outcome.sent_at >= since)
                and (until is None or outcome.sent_at < until)
            )

    def wait_for(self, count: int, timeout: float = LIVENESS_TIMEOUT) -> None:
        """Wait until ``count`` requests have an outcome, or every client has stopped."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.outcomes) < count and self._running():
                if not self._changed.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"{len(self.outcomes)} of {count} requests finished")

    def wait_for_more(self, count: int, timeout: float = LIVENESS_TIMEOUT) -> None:
        """Wait until ``count`` more requests than now have an outcome."""
        with self._changed:
            target = len(self.outcomes) + count
        self.wait_for(target, timeout)

    def wait_for_run(self, label: str, length: int, timeout: float = LIVENESS_TIMEOUT) -> float:
        """Wait until the latest ``length`` outcomes all are ``label``; when the first was sent.

        Raises ``TimeoutError`` if that does not happen within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                run = self.outcomes[-length:]
                if len(run) == length and all(outcome.label == label for outcome in run):
                    return min(outcome.sent_at for outcome in run)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._running():
                    raise TimeoutError(f"the last {length} outcomes were not all {label!r}")
                self._changed.wait(timeout=remaining)

    def _running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def _next_index(self) -> int | None:
        with self._changed:
            if self._stopping.is_set() or self._sent >= self.limit:
                return None
            self._sent += 1
            return self._sent - 1

    def _client(self, keep_alive: bool) -> None:
        limits = httpx.Limits(max_keepalive_connections=None if keep_alive else 0)
        # trust_env=False: no proxy from the environment may see this traffic.
        with httpx.Client(
            base_url=self.url, trust_env=False, timeout=REQUEST_TIMEOUT, limits=limits
        ) as client:
            while (index := self._next_index()) is not None:
                sent_at = time.monotonic()
                label = self._ask(client, index)
                with self._changed:
                    self.outcomes.append(Outcome(index, sent_at, time.monotonic(), label))
                    self._changed.notify_all()
                if label == REFUSED and self.stop_on_refusal:
                    return

    def _ask(self, client: httpx.Client, index: int) -> str:
        connected = []

        def trace(event: str, info: dict) -> None:
            if event.endswith("connect_tcp.started"):
                connected.append(event)

        try:
            path = self.paths[index % len(self.paths)]
            response = client.get(path, extensions={"trace": trace})
        except httpx.ConnectError:
            return REFUSED
        except httpx.TimeoutException:
            return TIMED_OUT
        except httpx.TransportError as error:
            with self._changed:
                self.errors[f"{type(error).__name__}: {error}"] += 1
            return LOST if connected else DROPPED
        if response.status_code == 503 and "Retry-After" in response.headers:
            return UNAVAILABLE
        return label_answer(response.status_code, response.content, index, self.answers)


def label_answer(
    status: int, body: bytes, index: int, answers: Mapping[str, Sequence[bytes]]
) -> str:
    """The name of the answer ``body`` is to request ``index``, or why it is none."""
    if status != 200:
        return f"status {status}"
    for name, expected in answers.items():
        if body == expected[index % len(expected)]:
            return name
    return WRONG_ANSWER


def failures_of(counts: Mapping[str, int], accepted: Sequence[str]) -> int:
    """Requests whose outcome is not one of the ``accepted`` labels."""
    return sum(number for label, number in counts.items() if label not in accepted)


# Processes and connections, from /proc --------------------------------------------------------


@dataclass(frozen=True)
class TcpSocket:
    """One IPv4 TCP socket of this machine, as ``/proc/net/tcp`` lists it."""

    local_port: int
    remote_port: int
    listening: bool
    unread_bytes: int
    inode: int


def tcp_sockets() -> list[TcpSocket]:
    """Every IPv4 TCP socket in this network namespace."""
    sockets = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state, queues, inode = fields[1], fields[2], fields[3], fields[4], fields[9]
        sockets.append(
            TcpSocket(
                local_port=int(local.split(":")[1], 16),
                remote_port=int(remote.split(":")[1], 16),
                listening=state == "0A",
                unread_bytes=int(queues.split(":")[1], 16),
                inode=int(inode),
            )
        )
    return sockets


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets ``pid`` has open (none once it has exited)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for descriptor in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(descriptor)
                if target.startswith("socket:["):
                    inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def server_end(server_port: int, client_port: int) -> TcpSocket | None:
    """The server's end of the connection from ``client_port`` to ``server_port``."""
    for candidate in tcp_sockets():
        if candidate.local_port == server_port and candidate.remote_port == client_port:
            return candidate
    return None


def listening_pids(server_port: int, pids: set[int]) -> set[int]:
    """Those of ``pids`` that still hold the socket listening on ``server_port``."""
    listeners = {s.inode for s in tcp_sockets() if s.listening and s.local_port == server_port}
    return {pid for pid in pids if socket_inodes(pid) & listeners}


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> float:
    """Poll ``condition`` until it is true; returns when it became so (``time.monotonic()``).

    Raises ``TimeoutError`` naming ``what`` when it is still false after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:g} s")
        time.sleep(POLL_SECONDS)
    return time.monotonic()


def _within(condition: Callable[[], object], timeout: float) -> float | None:
    """When ``condition`` became true, or None if it did not within ``timeout``."""
    try:
        return wait_until(condition, timeout, "the condition")
    except TimeoutError:
        return None


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


# Requests held in flight ----------------------------------------------------------------------

# An empty JSON object, the parameters staying in the query string; its last byte is held back.
HELD_BODY = b"{}"


class HeldRequests:
    """POST requests whose body stops one byte short, so that they stay in flight.

    ``send`` returns once a worker has read each request as far as it was sent (its socket
    holds no unread byte), so the server has started every one of them; ``release`` sends the
    last bytes and reads the answers.
    """

    def __init__(self, url: str, paths: Sequence[str], count: int) -> None:
        self.host, self.port = _address(url)
        self.paths = [paths[i % len(paths)] for i in range(count)]
        self.connections: list[http.client.HTTPConnection] = []

    def send(self, timeout: float = LIVENESS_TIMEOUT) -> None:
        """Send every request but its last byte; wait until a worker has read what was sent."""
        for path in self.paths:
            connection = http.client.HTTPConnection(self.host, self.port, timeout=REQUEST_TIMEOUT)
            connection.putrequest("POST", path)
            connection.putheader("Content-Type", "application/json")
            connection.putheader("Content-Length", str(len(HELD_BODY)))
            connection.endheaders(HELD_BODY[:-1])
            self.connections.append(connection)
        wait_until(self._all_read, timeout, "a worker reading the held requests")

    def holders(self, pids: set[int]) -> set[int]:
        """Those of ``pids`` that hold at least one of the requests."""
        ends = [server_end(self.port, port) for port in self._client_ports()]
        inodes = {end.inode for end in ends if end is not None}
        return {pid for pid in pids if socket_inodes(pid) & inodes}

    def release(self, answers: Mapping[str, Sequence[bytes]]) -> Counter:
        """Send the last bytes and read every answer; requests per outcome label."""
        for connection in self.connections:
            with contextlib.suppress(OSError):
                connection.send(HELD_BODY[-1:])
        counts: Counter = Counter()
        for index, connection in enumerate(self.connections):
            try:
                response = connection.getresponse()
                counts[label_answer(response.status, response.read(), index, answers)] += 1
            except TimeoutError:
                counts[TIMED_OUT] += 1
            except (OSError, http.client.HTTPException):
                counts[LOST] += 1
            finally:
                connection.close()
        return counts

    def _client_ports(self) -> list[int]:
        return [connection.sock.getsockname()[1] for connection in self.connections]

    def _all_read(self) -> bool:
        ends = [server_end(self.port, port) for port in self._client_ports()]
        return all(end is not None and end.unread_bytes == 0 for end in ends)


# The drills -----------------------------------------------------------------------------------


def kill_worker(
    url: str,
    master_pid: int,
    paths: Sequence[str],
    expected: Sequence[bytes],
    *,
    workers: int,
    clients: int = 6,
    fresh_clients: int = 2,
    requests: int = 1000,
    timeout: float = LIVENESS_TIMEOUT,
) -> FaultRecord:
    """SIGKILL one worker in the middle of a load.

    About half of ``requests`` are sent before the kill and half after recovery: Gunicorn runs
    ``workers`` workers again, one of them new, and the new one has answered a request right.
    """
    load = Load(url, paths, {"expected": expected}, clients, fresh_clients, limit=requests * 20)
    with load:
        load.wait_for(requests // 2, timeout)
        before = worker_pids(master_pid)
        victim = min(before)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        recovered_at = _within(
            lambda: _new_worker_answers(url, master_pid, before, workers, paths, expected), timeout
        )
        load.wait_for_more(requests // 2, timeout)
    counts = load.counts()
    return FaultRecord(
        fault="worker killed (SIGKILL)",
        requests_sent=load.sent,
        failures=failures_of(counts, ["expected"]),
        recovery_seconds=None if recovered_at is None else recovered_at - killed_at,
        recovered_when="worker count restored, the new worker answering",
        outcomes=dict(counts),
        details={
            "killed": victim,
            "workers_before": sorted(before),
            "workers_after": sorted(worker_pids(master_pid)),
            "outcomes_sent_after_recovery": (
                None if recovered_at is None else dict(load.counts(since=recovered_at))
            ),
            "connection_errors": dict(load.errors),
        },
    )


def _new_worker_answers(
    url: str,
    master_pid: int,
    before: set[int],
    workers: int,
    paths: Sequence[str],
    expected: Sequence[bytes],
) -> bool:
    current = worker_pids(master_pid)
    new = current - before
    if len(current) != workers or not new:
        return False
    try:
        status, body, worker = answer_and_worker(url, paths[0], new)
    except (OSError, http.client.HTTPException):
        return False
    return worker is not None and status == 200 and body == expected[0]


def answer_and_worker(url: str, path: str, pids: set[int]) -> tuple[int, bytes, int | None]:
    """GET ``path`` on a new connection: the status, the body, and which of ``pids`` answered
    (None if none of them did).

    Raises ``OSError`` or ``http.client.HTTPException`` if the request gets no answer.
    """
    host, port = _address(url)
    connection = http.client.HTTPConnection(host, port, timeout=REQUEST_TIMEOUT)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        # The connection is kept alive, so the worker that answered still holds it.
        end = server_end(port, connection.sock.getsockname()[1])
        holders = [] if end is None else [pid for pid in pids if end.inode in socket_inodes(pid)]
        return response.status, body, holders[0] if holders else None
    finally:
        connection.close()


def stop_master(
    url: str,
    process: subprocess.Popen,
    paths: Sequence[str],
    expected: Sequence[bytes],
    *,
    graceful_timeout: float,
    held: int = 4,
    clients: int = 6,
    fresh_clients: int = 2,
    requests: int = 500,
    timeout: float = LIVENESS_TIMEOUT,
) -> FaultRecord:
    """SIGTERM to the master (``process``) with ``held`` requests in flight, under load.

    The held requests have been read by workers before the signal; they are completed only
    once the server refuses new connections, and must then get their full answer. The load's
    clients stop at their first refused connection. Failures: held requests without their
    answer, and load requests sent before the signal without theirs. Requests sent after the
    signal may be refused or dropped, but never answered wrongly. Recovery time is the time the
    master took to exit.
    """
    in_flight = HeldRequests(url, paths, held)
    load = Load(url, paths, {"expected": expected}, clients, fresh_clients, stop_on_refusal=True)
    with load:
        load.wait_for(requests // 2, timeout)
        in_flight.send(timeout)
        workers = worker_pids(process.pid)
        holders = in_flight.holders(workers)
        signalled_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        refused_at = _within(lambda: _refuses(url), timeout)
        held_counts = in_flight.release({"expected": expected})
        try:
            returncode = process.wait(timeout=graceful_timeout + timeout)
            exited_at = time.monotonic()
        except subprocess.TimeoutExpired:
            returncode, exited_at = None, None
        load.wait_for(load.sent, timeout)

    before = load.counts(until=signalled_at)
    after = load.counts(since=signalled_at)
    return FaultRecord(
        fault="master stopped (SIGTERM), requests in flight",
        requests_sent=load.sent + held,
        failures=failures_of(held_counts + before, ["expected"]) + after[WRONG_ANSWER],
        recovery_seconds=None if exited_at is None else exited_at - signalled_at,
        recovered_when="master exited",
        outcomes=dict(load.counts() + held_counts),
        details={
            "held_outcomes": dict(held_counts),
            "held_by_workers": sorted(holders),
            "outcomes_sent_before_signal": dict(before),
            "outcomes_sent_after_signal": dict(after),
            "refusing_after_seconds": None if refused_at is None else refused_at - signalled_at,
            "returncode": returncode,
            "workers_left": sorted(pid for pid in workers if Path(f"/proc/{pid}").exists()),
            "connection_errors": dict(load.errors),
        },
    )


def _refuses(url: str) -> bool:
    try:
        with socket.create_connection(_address(url), timeout=REQUEST_TIMEOUT):
            return False
    except ConnectionRefusedError:
        return True


def replace_data_files(source: Path, data_dir: Path) -> None:
    """Overwrite ``data_dir``'s data files in place with ``source``'s, as ``cp`` would."""
    for name in DATA_FILES:
        if (source / name).exists():
            shutil.copyfile(source / name, data_dir / name)


def replace_data(
    url: str,
    data_dir: Path,
    replacement_dir: Path,
    paths: Sequence[str],
    expected: Sequence[bytes],
    *,
    while_replaced: Callable[[], object] | None = None,
    clients: int = 6,
    fresh_clients: int = 2,
    requests: int = 1000,
    timeout: float = LIVENESS_TIMEOUT,
) -> FaultRecord:
    """Overwrite the served data files with another data set's, without any signal.

    ``while_replaced`` (for instance: start a second server on the replaced directory) runs
    once the files are replaced, while the load goes on. Every answer must stay the one
    expected from the data the server started with.
    """
    load = Load(url, paths, {"expected": expected}, clients, fresh_clients, limit=requests * 50)
    with load:
        load.wait_for(requests // 2, timeout)
        replace_data_files(replacement_dir, data_dir)
        if while_replaced is not None:
            while_replaced()
        load.wait_for_more(requests // 2, timeout)
    counts = load.counts()
    return FaultRecord(
        fault="data directory replaced (no signal)",
        requests_sent=load.sent,
        failures=failures_of(counts, ["expected"]),
        recovery_seconds=None,
        recovered_when="nothing to recover from",
        outcomes=dict(counts),
        details={"connection_errors": dict(load.errors)},
    )


def reload_data(
    url: str,
    master_pid: int,
    data_dir: Path,
    replacement_dir: Path,
    paths: Sequence[str],
    old: Sequence[bytes],
    new: Sequence[bytes],
    *,
    held: int = 4,
    clients: int = 6,
    fresh_clients: int = 2,
    requests: int = 1000,
    timeout: float = LIVENESS_TIMEOUT,
) -> FaultRecord:
    """Replace the data files, then SIGHUP the master, under load.

    Every answer must be the old or the new one for its request. ``held`` requests in flight
    on the old workers are completed once those workers have stopped listening (they are
    shutting down), and must get the old answer. Recovery: the latest ``len(paths)`` answers
    are all new.
    """
    answers = {"old": old, "new": new}
    in_flight = HeldRequests(url, paths, held)
    load = Load(url, paths, answers, clients, fresh_clients, limit=requests * 50)
    with load:
        load.wait_for(requests // 2, timeout)
        in_flight.send(timeout)
        before = worker_pids(master_pid)
        replace_data_files(replacement_dir, data_dir)
        signalled_at = time.monotonic()
        os.kill(master_pid, signal.SIGHUP)
        replaced_at = _within(lambda: _replaced(master_pid, before, url), timeout)
        held_counts = in_flight.release(answers)
        exited_at = _within(lambda: not any(_alive(pid) for pid in before), timeout)
        try:
            new_from = load.wait_for_run("new", len(paths), timeout)
        except TimeoutError:
            new_from = None
        load.wait_for_more(requests // 2, timeout)
    counts = load.counts()
    return FaultRecord(
        fault="SIGHUP reload of replaced data",
        requests_sent=load.sent + held,
        failures=failures_of(counts, ["old", "new"]) + failures_of(held_counts, ["old"]),
        recovery_seconds=None if new_from is None else max(0.0, new_from - signalled_at),
        recovered_when="every answer from the new data",
        outcomes=dict(counts + held_counts),
        details={
            "held_outcomes": dict(held_counts),
            "old_workers": sorted(before),
            "old_workers_stopped_listening": replaced_at is not None,
            "old_workers_exited": exited_at is not None,
            "workers_after": sorted(worker_pids(master_pid)),
            "connection_errors": dict(load.errors),
        },
    )


def _replaced(master_pid: int, before: set[int], url: str) -> bool:
    """New workers run and none of ``before`` still listens."""
    new = worker_pids(master_pid) - before
    return bool(new) and not listening_pids(_address(url)[1], before)


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def corrupt_model(data_dir: Path) -> None:
    """Garbage in the model file, with a checksum file matching it: unpickling fails."""
    garbage = b"not a pickle of a fitted model\n" * 64
    (data_dir / MODEL_FILE).write_bytes(garbage)
    digest = hashlib.sha256(garbage).hexdigest()
    (data_dir / CHECKSUM_FILE).write_text(f"{digest}  {MODEL_FILE}\n")


def mismatch_checksum(data_dir: Path) -> None:
    """A checksum file that does not match the (unchanged, valid) model file."""
    (data_dir / CHECKSUM_FILE).write_text(f"{'0' * 64}  {MODEL_FILE}\n")


def truncate_restaurants(data_dir: Path) -> None:
    """The restaurant file cut to its first half: no longer a readable Parquet file."""
    path = data_dir / RESTAURANT_FILE
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])


# Each way of breaking the data, and the file a failed reload should name.
BREAKAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "corrupt model": (corrupt_model, MODEL_FILE),
    "checksum mismatch": (mismatch_checksum, MODEL_FILE),
    "truncated restaurant file": (truncate_restaurants, RESTAURANT_FILE),
}


def reload_broken_data(
    url: str,
    master_pid: int,
    data_dir: Path,
    breakage: str,
    paths: Sequence[str],
    expected: Sequence[bytes],
    *,
    clients: int = 6,
    fresh_clients: int = 2,
    requests: int = 1000,
    timeout: float = LIVENESS_TIMEOUT,
) -> FaultRecord:
    """Break one data file (``breakage``, a key of ``BREAKAGES``), then SIGHUP the master.

    The reload must fail and every answer stay the one expected from the data loaded before.
    Gunicorn replaces its workers on SIGHUP whether or not the data loaded; recovery is the
    time until the old workers stopped listening and new ones run (on the old data).
    """
    damage, _ = BREAKAGES[breakage]
    load = Load(url, paths, {"expected": expected}, clients, fresh_clients, limit=requests * 50)
    with load:
        load.wait_for(requests // 2, timeout)
        before = worker_pids(master_pid)
        damage(data_dir)
        signalled_at = time.monotonic()
        os.kill(master_pid, signal.SIGHUP)
        replaced_at = _within(lambda: _replaced(master_pid, before, url), timeout)
        load.wait_for_more(requests // 2, timeout)
    counts = load.counts()
    return FaultRecord(
        fault=f"SIGHUP reload of a {breakage}",
        requests_sent=load.sent,
        failures=failures_of(counts, ["expected"]),
        recovery_seconds=None if replaced_at is None else replaced_at - signalled_at,
        recovered_when="workers replaced, answering from the old data",
        outcomes=dict(counts),
        details={
            "old_workers": sorted(before),
            "workers_after": sorted(worker_pids(master_pid)),
            "connection_errors": dict(load.errors),
        },
    )


# The services behind the server ---------------------------------------------------------------


def readiness(url: str) -> tuple[int, str]:
    """``/readyz``'s status code and the ``status`` it names (``ready``, ``degraded``, ...)."""
    # trust_env=False: no proxy from the environment may see this traffic.
    response = httpx.get(f"{url}/readyz", timeout=REQUEST_TIMEOUT, trust_env=False)
    try:
        return response.status_code, str(response.json().get("status"))
    except (ValueError, AttributeError):
        return response.status_code, "not a JSON object"


def every_worker_reports(url: str, master_pid: int, status: str, timeout: float) -> float | None:
    """Ask ``/readyz`` on new connections until each worker has answered ``status``.

    ``/readyz`` tells the state of the worker that answers it only, so one answer says nothing
    about the others. Returns when the last worker did (``time.monotonic()``), or None if they
    had not within ``timeout`` seconds.
    """
    workers = worker_pids(master_pid)
    reported: set[int] = set()

    def all_reported() -> bool:
        try:
            _, body, worker = answer_and_worker(url, "/readyz", workers)
            if worker is not None and json.loads(body).get("status") == status:
                reported.add(worker)
        except (OSError, http.client.HTTPException, ValueError, AttributeError):
            pass
        return reported == workers

    return _within(all_reported, timeout)


def cache_lookups(url: str) -> Counter:
    """Cache lookups so far, added up over the server's workers, by result (``hit``, ``miss``,
    ``skipped`` while the cache is failing)."""
    # trust_env=False: no proxy from the environment may see this traffic.
    text = httpx.get(f"{url}/metrics", timeout=REQUEST_TIMEOUT, trust_env=False).text
    counts: Counter = Counter()
    for family in text_string_to_metric_families(text):
        if family.name == "recommender_cache_lookups":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels["result"]] += int(sample.value)
    return counts


def sent_after_the_last_failure(
    outcomes: Sequence[Outcome], accepted: Sequence[str]
) -> list[Outcome] | None:
    """The outcomes of the requests sent after the last one whose outcome is not ``accepted``
    (all of them accepted, then); None if no request failed."""
    failed = [outcome.sent_at for outcome in outcomes if outcome.label not in accepted]
    if not failed:
        return None
    return [outcome for outcome in outcomes if outcome.sent_at > max(failed)]


def cut_store(
    url: str,
    master_pid: int,
    proxy: TcpProxy,
    paths: Sequence[str],
    expected: Sequence[bytes],
    *,
    cut_seconds: float = 3.0,
    clients: int = 6,
    fresh_clients: int = 2,
    requests: int = 1000,
    timeout: float = LIVENESS_TIMEOUT,
) -> FaultRecord:
    """Cut the server's line to PostgreSQL at ``proxy`` for ``cut_seconds``, under load.

    The cut drops every connection to PostgreSQL and refuses new ones; it lasts at least until
    a request has been answered ``UNAVAILABLE``. Failures are every request without its right
    answer, all of which should be ``UNAVAILABLE``: no other status, no wrong answer, no lost
    connection. Recovery: from the restore until the first answer to the requests sent after
    the last failure. About half of ``requests`` are sent before the cut, and at least half
    after a run of ``len(paths)`` right answers following the restore.
    """
    load = Load(url, paths, {"expected": expected}, clients, fresh_clients, limit=requests * 50)
    with load:
        load.wait_for(requests // 2, timeout)
        before = worker_pids(master_pid)
        cut_at = time.monotonic()
        proxy.cut()
        readiness_while_cut = readiness(url)
        time.sleep(max(0.0, cut_at + cut_seconds - time.monotonic()))
        _within(lambda: load.counts(since=cut_at)[UNAVAILABLE] > 0, timeout)
        proxy.restore()
        restored_at = time.monotonic()
        with contextlib.suppress(TimeoutError):
            load.wait_for_run("expected", len(paths), timeout)
        load.wait_for_more(requests // 2, timeout)
        readiness_after = readiness(url)

    counts = load.counts()
    # Recovered for good: from the first answer to the requests that all got their answer.
    recovered = sent_after_the_last_failure(load.outcomes, ["expected"])
    recovered_at = min((outcome.finished_at for outcome in recovered or []), default=None)
    if recovered is None:
        recovered_when = "no request failed"
    elif recovered_at is None:
        recovered_when = "never: the last request sent failed"
    else:
        recovered_when = "every request answered again"
    return FaultRecord(
        fault=f"PostgreSQL connections cut for {restored_at - cut_at:.1f} s",
        requests_sent=load.sent,
        failures=failures_of(counts, ["expected"]),
        recovery_seconds=None if recovered_at is None else max(0.0, recovered_at - restored_at),
        recovered_when=recovered_when,
        outcomes=dict(counts),
        details={
            "cut_seconds": restored_at - cut_at,
            "outcomes_sent_before_cut": dict(load.counts(until=cut_at)),
            "outcomes_sent_while_cut": dict(load.counts(since=cut_at, until=restored_at)),
            "outcomes_sent_after_restore": dict(load.counts(since=restored_at)),
            "requests_sent_after_the_last_failure": len(recovered or []),
            "readiness_while_cut": readiness_while_cut,
            "readiness_after": readiness_after,
            "workers_before": sorted(before),
            "workers_after": sorted(worker_pids(master_pid)),
            "connection_errors": dict(load.errors),
        },
    )


def kill_cache(
    url: str,
    master_pid: int,
    cache: RedisProcess,
    paths: Sequence[str],
    expected: Sequence[bytes],
    *,
    clients: int = 6,
    fresh_clients: int = 2,
    requests: int = 1000,
    timeout: float = LIVENESS_TIMEOUT,
) -> FaultRecord:
    """SIGKILL the server's Redis cache (``cache``) under load, then start it on the same port.

    Every answer must stay the right one: while Redis is down the service reads PostgreSQL.
    Every worker's ``/readyz`` should say ``degraded`` while Redis is down and ``ready`` after.
    Recovery: from the restart until every worker says ``ready``. About a third of ``requests``
    is sent before the kill, a third while Redis is down, a third after the recovery.
    """
    load = Load(url, paths, {"expected": expected}, clients, fresh_clients, limit=requests * 50)
    with load:
        load.wait_for(requests // 3, timeout)
        lookups_before = cache_lookups(url)
        killed_at = time.monotonic()
        cache.kill()
        degraded_at = every_worker_reports(url, master_pid, "degraded", timeout)
        load.wait_for_more(requests // 3, timeout)
        lookups_down = cache_lookups(url)
        cache.start()
        restarted_at = time.monotonic()
        ready_at = every_worker_reports(url, master_pid, "ready", timeout)
        lookups_restarted = cache_lookups(url)
        load.wait_for_more(requests // 3, timeout)
        lookups_after = cache_lookups(url)

    counts = load.counts()
    return FaultRecord(
        fault="Redis cache killed (SIGKILL), then restarted",
        requests_sent=load.sent,
        failures=failures_of(counts, ["expected"]),
        recovery_seconds=None if ready_at is None else ready_at - restarted_at,
        recovered_when=(
            "every worker's /readyz ready"
            if ready_at is not None
            else f"not every worker's /readyz ready within {timeout:g} s"
        ),
        outcomes=dict(counts),
        details={
            "every_worker_degraded_after_seconds": (
                None if degraded_at is None else degraded_at - killed_at
            ),
            "every_worker_ready": ready_at is not None,
            "down_seconds": restarted_at - killed_at,
            "outcomes_sent_while_down": dict(load.counts(since=killed_at, until=restarted_at)),
            "cache_lookups_while_down": dict(lookups_down - lookups_before),
            "cache_lookups_after_recovery": dict(lookups_after - lookups_restarted),
            "connection_errors": dict(load.errors),
        },
    )


# The command ---------------------------------------------------------------------------------

# Another seed than the data directory's (which is most likely 0 or a small number).
REPLACEMENT_SEED = 7_919
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"


@dataclass
class DrillPlan:
    """What ``run_drills`` runs, on which data, at which load.

    With a ``database_url`` the PostgreSQL and Redis drills run too, on a schema of their own
    in that database (created and dropped by ``run_drills``) and a redis-server of their own.
    """

    data_dir: Path
    work_dir: Path
    replacement_dir: Path | None = None
    database_url: str | None = None
    workers: int = 2
    clients: int = 6
    fresh_clients: int = 2
    requests: int = 1000
    cut_seconds: float = 3.0
    timeout: float = LIVENESS_TIMEOUT


def run_drills(plan: DrillPlan, progress: Callable[[str], None]) -> list[FaultRecord]:
    """Run every drill against a server of its own, each on a copy of ``plan.data_dir``."""
    paths = request_paths(plan.data_dir / "request.parquet")
    replacement, old, new = _two_data_sets(plan, progress)
    load = _load_options(plan)
    graceful_timeout = Settings().graceful_timeout
    records = []
    with _serving(plan, "kill") as (server, _):
        progress("drill: worker killed")
        records.append(
            kill_worker(server.url, server.process.pid, paths, old, workers=plan.workers, **load)
        )
    with _serving(plan, "stop") as (server, _):
        progress("drill: master stopped")
        records.append(
            stop_master(
                server.url, server.process, paths, old, graceful_timeout=graceful_timeout, **load
            )
        )
    with _serving(plan, "replace") as (server, served):

        def start_a_second_server() -> None:
            progress("starting a second server on the replaced data")
            with _serving(plan, "replace-second", data_dir=served):
                pass

        progress("drill: data directory replaced")
        records.append(
            replace_data(
                server.url,
                served,
                replacement,
                paths,
                old,
                while_replaced=start_a_second_server,
                **load,
            )
        )
    with _serving(plan, "reload") as (server, served):
        progress("drill: SIGHUP reload")
        records.append(
            reload_data(
                server.url, server.process.pid, served, replacement, paths, old, new, **load
            )
        )
    for breakage in BREAKAGES:
        with _serving(plan, f"reload-{breakage.replace(' ', '-')}") as (server, served):
            progress(f"drill: SIGHUP reload of a {breakage}")
            records.append(
                reload_broken_data(
                    server.url, server.process.pid, served, breakage, paths, old, **load
                )
            )
    if plan.database_url is not None:
        records += _service_drills(plan, plan.database_url, paths, old, progress)
    return records


def _load_options(plan: DrillPlan) -> dict:
    """The keyword arguments every drill takes for its load."""
    return {
        "clients": plan.clients,
        "fresh_clients": plan.fresh_clients,
        "requests": plan.requests,
        "timeout": plan.timeout,
    }


def _service_drills(
    plan: DrillPlan,
    database_url: str,
    paths: Sequence[str],
    expected: Sequence[bytes],
    progress: Callable[[str], None],
) -> list[FaultRecord]:
    """The PostgreSQL and Redis drills, on a schema of their own in ``database_url``'s database.

    PostgreSQL answers byte for byte as the embedded store does, so ``expected`` holds.
    """
    load = _load_options(plan)
    records = []
    with private_schema(database_url, "drill") as store:
        progress(f"loading {plan.data_dir} into a schema of its own in {safe_url(database_url)}")
        load_database(plan.data_dir, store)

        target = make_url(database_url)
        proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432)
        try:
            options = ["--store", through_proxy(store, proxy)]
            with _serving(plan, "postgres", options=options) as (server, _):
                progress("drill: PostgreSQL connections cut")
                records.append(
                    cut_store(
                        server.url,
                        server.process.pid,
                        proxy,
                        paths,
                        expected,
                        cut_seconds=plan.cut_seconds,
                        **load,
                    )
                )
        finally:
            proxy.cut()

        cache = RedisProcess(plan.work_dir / "redis").start()
        try:
            options = ["--store", store, "--cache", cache.url]
            with _serving(plan, "redis", options=options) as (server, _):
                progress("drill: Redis cache killed")
                records.append(
                    kill_cache(server.url, server.process.pid, cache, paths, expected, **load)
                )
        finally:
            cache.kill()
    return records


def _two_data_sets(
    plan: DrillPlan, progress: Callable[[str], None]
) -> tuple[Path, list[bytes], list[bytes]]:
    """The replacement data directory, and every request's answer from each data set."""
    replacement = plan.replacement_dir or plan.work_dir / "replacement"
    if plan.replacement_dir is None:
        progress(f"generating a replacement data set in {replacement}")
        _generate_like(plan.data_dir, replacement)
    progress("answering every request in process, from both data sets")
    rows = pq.read_table(plan.data_dir / "request.parquet").to_pylist()
    old = answers_in_process(plan.data_dir, rows, plan.work_dir / "prepared-old")
    new = answers_in_process(replacement, rows, plan.work_dir / "prepared-new")
    if sum(a != b for a, b in zip(old, new, strict=True)) < len(old) / 2:
        raise ValueError(f"{replacement} answers most requests as {plan.data_dir} does")
    return replacement, old, new


def answers_in_process(data_dir: Path, rows: list[dict], prepared_dir: Path) -> list[bytes]:
    """The rendered answer to each request row, computed in this process from ``data_dir``."""
    recommender = load_recommender(Settings(data_dir=data_dir, prepared_dir=prepared_dir))
    return answer_rows(recommender, rows)


def answer_rows(recommender: Recommender, rows: list[dict]) -> list[bytes]:
    """The rendered answer to each request row, with the recommender's store opened once."""

    async def answer_every_row() -> list[bytes]:
        await recommender.store.open()
        try:
            return [
                render(
                    await recommender.recommend(
                        row["user_id"], parse_query(row, recommender.limits)
                    )
                )
                for row in rows
            ]
        finally:
            await recommender.store.close()

    return asyncio.run(answer_every_row())


def _generate_like(data_dir: Path, out_dir: Path) -> None:
    """Generate a data set shaped like ``data_dir``'s (same user ids), from another seed."""
    n_features = sum(
        name.startswith("feature_") for name in pq.read_schema(data_dir / USER_FILE).names
    )
    generate(
        out_dir,
        n_users=count_rows(data_dir / USER_FILE),
        n_restaurants=count_rows(data_dir / RESTAURANT_FILE),
        n_features=n_features,
        n_requests=1,
        seed=REPLACEMENT_SEED,
    )


@contextlib.contextmanager
def _serving(
    plan: DrillPlan, name: str, data_dir: Path | None = None, options: Sequence[str] = ()
) -> Iterator[tuple[ServerProcess, Path]]:
    """A server on ``data_dir``, or on a fresh copy of the plan's data directory; ``options``
    go to ``recommender serve``."""
    if data_dir is None:
        data_dir = plan.work_dir / name / "data"
        shutil.copytree(plan.data_dir, data_dir, ignore=shutil.ignore_patterns(".prepared"))
    options = ["--data-dir", str(data_dir), "--workers", str(plan.workers), *options]
    server = ServerProcess(free_port(), options, plan.work_dir / f"server-{name}.log")
    with server:
        wait_until(
            lambda: len(worker_pids(server.process.pid)) == plan.workers,
            plan.timeout,
            f"{plan.workers} workers running",
        )
        try:
            yield server, data_dir
        finally:
            if server.process.poll() is not None:
                # A drill stopped the master. ServerProcess would signal its process group,
                # which fails once the group is empty: end what is left of it here instead.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.process.pid, signal.SIGKILL)
                server.process = None


def main(argv: list[str] | None = None) -> int:
    """Run the drills, write their records as JSON and print the table; the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m recommender.bench.faults",
        description="Run fault drills against servers of their own and print a table.",
    )
    parser.add_argument("--data-dir", type=Path, required=True, help="data directory to copy")
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the records")
    parser.add_argument(
        "--replacement-dir",
        type=Path,
        help="data set to replace the served one with (same user ids); default: generated "
        "like --data-dir from another seed",
    )
    parser.add_argument("--workers", type=int, default=2, help="default: 2")
    parser.add_argument("--clients", type=int, default=6, help="keep-alive clients (default 6)")
    parser.add_argument(
        "--fresh-clients", type=int, default=2, help="clients opening a connection per request"
    )
    parser.add_argument("--requests", type=int, default=1000, help="about; default: 1000")
    parser.add_argument(
        "--database-url",
        default=DEFAULT_DATABASE_URL,
        help="PostgreSQL database for the PostgreSQL and Redis drills, which work in a schema of "
        f"their own there and drop it afterwards (default: {DEFAULT_DATABASE_URL})",
    )
    parser.add_argument(
        "--cut-seconds",
        type=float,
        default=3.0,
        help="how long the line to PostgreSQL stays cut (at least; default: 3)",
    )
    parser.add_argument(
        "--skip-services",
        action="store_true",
        help="skip the drills that need PostgreSQL and redis-server",
    )
    arguments = parser.parse_args(argv)
    database_url = None if arguments.skip_services else arguments.database_url
    if database_url is not None and (missing := _missing_services(database_url)):
        parser.error(f"{missing}; pass --skip-services to run the other drills only")

    with tempfile.TemporaryDirectory(prefix="recommender-faults-") as work_dir:
        plan = DrillPlan(
            data_dir=arguments.data_dir,
            work_dir=Path(work_dir),
            replacement_dir=arguments.replacement_dir,
            database_url=database_url,
            workers=arguments.workers,
            clients=arguments.clients,
            fresh_clients=arguments.fresh_clients,
            requests=arguments.requests,
            cut_seconds=arguments.cut_seconds,
        )
        records = run_drills(plan, progress=lambda message: print(message, file=sys.stderr))
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(json.dumps([asdict(record) for record in records], indent=2))
    print(markdown_table(records))
    return 0


def _missing_services(database_url: str) -> str | None:
    """Why the PostgreSQL and Redis drills cannot run, or None if they can."""
    if shutil.which("redis-server") is None:
        return "the redis-server binary is not on PATH"
    try:
        with psycopg.connect(libpq_url(database_url), connect_timeout=3):
            pass
    except psycopg.Error as error:
        return f"PostgreSQL at {safe_url(database_url)} did not answer: {error}"
    return None


if __name__ == "__main__":
    sys.exit(main())
