"""Faults under load: a worker killed, the master stopped, the data replaced or reloaded, the
line to PostgreSQL cut, the Redis cache killed.

Each fixture below runs one drill of ``recommender.bench.faults`` against a server of its own
(two workers; six clients on keep-alive connections and two opening a connection per request,
replaying request.parquet), and the tests read its record. Answers are compared byte for byte
with the in-process answers.
"""

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import (
    SMALL,
    RedisProcess,
    Server,
    TcpProxy,
    answer_rows,
    start_redis,
    start_server,
    stop_server,
    through_proxy,
    wait_until_healthy,
)
from sqlalchemy.engine import make_url

from recommender.bench import faults
from recommender.bench.load import request_paths
from recommender.bench.services import private_schema
from recommender.dataset.generate import generate
from recommender.postgres.load import load_database
from recommender.service import Recommender, load_recommender
from recommender.settings import Settings

WORKERS = 2
KEEP_ALIVE_CLIENTS = 6
FRESH_CLIENTS = 2
CLIENTS = KEEP_ALIVE_CLIENTS + FRESH_CLIENTS
GRACEFUL_TIMEOUT = 10
# Bounds on waiting, not expectations of speed: a healthy server needs a small part of them.
LIVENESS_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def paths(data_dir: Path) -> list[str]:
    """request.parquet's rows as the paths the load sends, in the ``requests`` fixture's order."""
    return request_paths(data_dir / "request.parquet")


@pytest.fixture(scope="module")
def expected(recommender: Recommender, requests: list[dict]) -> list[bytes]:
    """The answer to each request row from the small data."""
    return answer_rows(recommender, requests)


@pytest.fixture(scope="module")
def other_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another small data set of the same shape (same user ids), from another seed."""
    directory = tmp_path_factory.mktemp("other") / "small"
    generate(directory, **{**SMALL, "seed": SMALL["seed"] + 1})
    return directory


@pytest.fixture(scope="module")
def other_expected(
    other_data_dir: Path, requests: list[dict], tmp_path_factory: pytest.TempPathFactory
) -> list[bytes]:
    """The answer to each request row (of the small data) from the other data set."""
    settings = Settings(data_dir=other_data_dir, prepared_dir=tmp_path_factory.mktemp("prepared"))
    return answer_rows(load_recommender(settings), requests)


def _copy(data_dir: Path, target: Path) -> Path:
    shutil.copytree(data_dir, target, ignore=shutil.ignore_patterns(".prepared"))
    return target


@contextmanager
def _serving(data_dir: Path, directory: Path, *options: str, **settings: str) -> Iterator[Server]:
    directory.mkdir(parents=True, exist_ok=True)
    server = start_server(
        data_dir,
        directory,
        "--workers",
        str(WORKERS),
        *options,
        graceful_timeout=str(GRACEFUL_TIMEOUT),
        **settings,
    )
    try:
        wait_until_healthy(server, LIVENESS_TIMEOUT)
        faults.wait_until(
            lambda: len(faults.worker_pids(server.process.pid)) == WORKERS,
            LIVENESS_TIMEOUT,
            f"{WORKERS} workers running",
        )
        yield server
    finally:
        stop_server(server)


def test_the_other_data_set_answers_most_requests_differently(
    expected: list[bytes], other_expected: list[bytes]
) -> None:
    # Without this, "old or new answer" could not tell the two data sets apart.
    differing = sum(old != new for old, new in zip(expected, other_expected, strict=True))

    assert differing > len(expected) * 0.9


# A worker killed ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker_killed(
    data_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    paths: list[str],
    expected: list[bytes],
) -> faults.FaultRecord:
    """One worker SIGKILLed in the middle of about 1,000 requests."""
    with _serving(data_dir, tmp_path_factory.mktemp("killed")) as server:
        return faults.kill_worker(
            server.url,
            server.process.pid,
            paths,
            expected,
            workers=WORKERS,
            clients=KEEP_ALIVE_CLIENTS,
            fresh_clients=FRESH_CLIENTS,
            requests=1000,
            timeout=LIVENESS_TIMEOUT,
        )


def test_gunicorn_replaces_a_killed_worker_with_a_new_one(
    worker_killed: faults.FaultRecord,
) -> None:
    details = worker_killed.details
    after = set(details["workers_after"])

    assert len(after) == WORKERS
    assert details["killed"] not in after
    assert after - set(details["workers_before"])


def test_the_new_worker_answers_after_a_kill(worker_killed: faults.FaultRecord) -> None:
    assert worker_killed.recovery_seconds is not None, worker_killed


def test_a_killed_worker_costs_at_most_the_requests_in_flight(
    worker_killed: faults.FaultRecord,
) -> None:
    # Each client has one request in flight at a time.
    assert worker_killed.failures <= CLIENTS, worker_killed


def test_a_killed_worker_costs_only_connections_never_a_wrong_answer_or_an_error_status(
    worker_killed: faults.FaultRecord,
) -> None:
    allowed = {"expected", faults.DROPPED, faults.LOST}

    assert set(worker_killed.outcomes) <= allowed, worker_killed


def test_every_request_after_the_recovery_from_a_kill_gets_its_answer(
    worker_killed: faults.FaultRecord,
) -> None:
    # The drill sends about half its requests after the new worker answered.
    after = worker_killed.details["outcomes_sent_after_recovery"]

    assert set(after) == {"expected"}, worker_killed


# The master stopped ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stopped_under_load(
    data_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    paths: list[str],
    expected: list[bytes],
) -> faults.FaultRecord:
    """SIGTERM to the master with four requests held in flight and eight clients sending."""
    with _serving(data_dir, tmp_path_factory.mktemp("stopped")) as server:
        return faults.stop_master(
            server.url,
            server.process,
            paths,
            expected,
            graceful_timeout=GRACEFUL_TIMEOUT,
            held=4,
            clients=KEEP_ALIVE_CLIENTS,
            fresh_clients=FRESH_CLIENTS,
            requests=500,
            timeout=LIVENESS_TIMEOUT,
        )


def test_requests_in_flight_at_sigterm_are_answered_in_full(
    stopped_under_load: faults.FaultRecord,
) -> None:
    assert stopped_under_load.details["held_outcomes"] == {"expected": 4}, stopped_under_load


def test_new_connections_are_refused_while_requests_in_flight_finish(
    stopped_under_load: faults.FaultRecord,
) -> None:
    # The held requests are completed only after a refusal, so a refusal came while they ran.
    refusing_after = stopped_under_load.details["refusing_after_seconds"]

    assert refusing_after is not None, stopped_under_load


def test_the_master_exits_0_within_the_graceful_timeout_after_sigterm(
    stopped_under_load: faults.FaultRecord,
) -> None:
    details = stopped_under_load.details

    assert details["returncode"] == 0, stopped_under_load
    assert stopped_under_load.recovery_seconds <= GRACEFUL_TIMEOUT + LIVENESS_TIMEOUT / 2
    assert details["workers_left"] == []


def test_every_request_sent_before_sigterm_gets_its_answer(
    stopped_under_load: faults.FaultRecord,
) -> None:
    assert stopped_under_load.failures == 0, stopped_under_load


def test_requests_sent_after_sigterm_are_answered_or_refused_never_answered_wrongly(
    stopped_under_load: faults.FaultRecord,
) -> None:
    allowed = {"expected", faults.REFUSED, faults.DROPPED, faults.LOST}

    assert set(stopped_under_load.details["outcomes_sent_after_signal"]) <= allowed


# The data directory replaced, without a signal ------------------------------------------------


@pytest.fixture(scope="module")
def replaced_under_load(
    data_dir: Path,
    other_data_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    paths: list[str],
    expected: list[bytes],
    other_expected: list[bytes],
) -> tuple[faults.FaultRecord, dict]:
    """The served files overwritten with the other data set, then a second server started on
    them (preparing its user features anew in the same prepared directory) during the load."""
    root = tmp_path_factory.mktemp("replaced")
    served = _copy(data_dir, root / "data")
    prepared = str(root / "prepared")
    second: dict = {}

    def start_a_second_server() -> None:
        with _serving(served, root / "second", prepared_dir=prepared) as server:
            answers = {"new": other_expected}
            with faults.Load(server.url, paths, answers, limit=len(paths)) as load:
                load.wait_for(len(paths))
            second["outcomes"] = dict(load.counts())
            second["log"] = server.log_text()

    with _serving(served, root / "first", prepared_dir=prepared) as server:
        record = faults.replace_data(
            server.url,
            served,
            other_data_dir,
            paths,
            expected,
            while_replaced=start_a_second_server,
            clients=KEEP_ALIVE_CLIENTS,
            fresh_clients=FRESH_CLIENTS,
            requests=1000,
            timeout=LIVENESS_TIMEOUT,
        )
    return record, second


def test_answers_stay_those_of_the_data_loaded_at_start_when_the_files_are_replaced(
    replaced_under_load: tuple[faults.FaultRecord, dict],
) -> None:
    record, _ = replaced_under_load

    assert record.outcomes == {"expected": record.requests_sent}, record


def test_a_second_server_started_on_the_replaced_files_answers_from_them(
    replaced_under_load: tuple[faults.FaultRecord, dict],
    paths: list[str],
) -> None:
    # This is what makes the test above mean something: the files did change under the first
    # server, and the second one rebuilt the prepared user features both share.
    _, second = replaced_under_load

    assert second["outcomes"] == {"new": len(paths)}
    assert "prepared user features anew" in second["log"]


# SIGHUP: reload the data ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def reloaded_under_load(
    data_dir: Path,
    other_data_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    paths: list[str],
    expected: list[bytes],
    other_expected: list[bytes],
) -> faults.FaultRecord:
    """The served files replaced with the other data set, then SIGHUP, under load, with four
    requests held in flight on the old workers."""
    root = tmp_path_factory.mktemp("reloaded")
    served = _copy(data_dir, root / "data")
    with _serving(served, root) as server:
        return faults.reload_data(
            server.url,
            server.process.pid,
            served,
            other_data_dir,
            paths,
            expected,
            other_expected,
            held=4,
            clients=KEEP_ALIVE_CLIENTS,
            fresh_clients=FRESH_CLIENTS,
            requests=1000,
            timeout=LIVENESS_TIMEOUT,
        )


def test_every_answer_across_a_reload_is_the_old_or_the_new_one(
    reloaded_under_load: faults.FaultRecord,
) -> None:
    allowed = {"old", "new", faults.DROPPED, faults.LOST}

    assert set(reloaded_under_load.outcomes) <= allowed, reloaded_under_load


def test_a_reload_loses_no_request_sent_on_a_new_connection(
    reloaded_under_load: faults.FaultRecord,
) -> None:
    assert faults.LOST not in reloaded_under_load.outcomes, reloaded_under_load


def test_a_reload_drops_at_most_one_request_per_kept_alive_connection_and_old_worker(
    reloaded_under_load: faults.FaultRecord,
) -> None:
    # A keep-alive connection may be closed as the client's next request arrives (HTTP/1.1
    # lets the client resend it); each old worker closes each connection at most once.
    dropped = reloaded_under_load.outcomes.get(faults.DROPPED, 0)

    assert dropped <= KEEP_ALIVE_CLIENTS * WORKERS, reloaded_under_load


def test_after_a_reload_every_answer_comes_from_the_new_data(
    reloaded_under_load: faults.FaultRecord,
) -> None:
    assert reloaded_under_load.recovery_seconds is not None, reloaded_under_load


def test_requests_in_flight_on_old_workers_finish_with_the_old_answer_after_a_reload(
    reloaded_under_load: faults.FaultRecord,
) -> None:
    details = reloaded_under_load.details

    assert details["old_workers_stopped_listening"], reloaded_under_load
    assert details["held_outcomes"] == {"old": 4}, reloaded_under_load


def test_old_workers_exit_after_a_reload(reloaded_under_load: faults.FaultRecord) -> None:
    details = reloaded_under_load.details

    assert details["old_workers_exited"], reloaded_under_load
    assert len(details["workers_after"]) == WORKERS
    assert not set(details["workers_after"]) & set(details["old_workers"])


@pytest.fixture(scope="module", params=sorted(faults.BREAKAGES))
def reloaded_broken(
    request: pytest.FixtureRequest,
    data_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    paths: list[str],
    expected: list[bytes],
) -> tuple[faults.FaultRecord, str, str]:
    """One data file broken, then SIGHUP, under load; with what the server logged after it."""
    breakage = request.param
    root = tmp_path_factory.mktemp("broken")
    served = _copy(data_dir, root / "data")
    with _serving(served, root) as server:
        logged_before = len(server.log_text())
        record = faults.reload_broken_data(
            server.url,
            server.process.pid,
            served,
            breakage,
            paths,
            expected,
            clients=KEEP_ALIVE_CLIENTS,
            fresh_clients=FRESH_CLIENTS,
            requests=1000,
            timeout=LIVENESS_TIMEOUT,
        )
        logged_after = server.log_text()[logged_before:]
    return record, faults.BREAKAGES[breakage][1], logged_after


def test_a_failed_reload_keeps_every_answer_on_the_data_loaded_before(
    reloaded_broken: tuple[faults.FaultRecord, str, str],
) -> None:
    record, _, _ = reloaded_broken

    assert set(record.outcomes) <= {"expected", faults.DROPPED, faults.LOST}, record


def test_a_failed_reload_loses_no_request_sent_on_a_new_connection(
    reloaded_broken: tuple[faults.FaultRecord, str, str],
) -> None:
    record, _, _ = reloaded_broken

    assert faults.LOST not in record.outcomes, record


def test_a_failed_reload_drops_at_most_one_request_per_kept_alive_connection_and_old_worker(
    reloaded_broken: tuple[faults.FaultRecord, str, str],
) -> None:
    record, _, _ = reloaded_broken

    assert record.outcomes.get(faults.DROPPED, 0) <= KEEP_ALIVE_CLIENTS * WORKERS, record


def test_a_failed_reload_is_logged_as_an_error_naming_the_broken_file(
    reloaded_broken: tuple[faults.FaultRecord, str, str],
) -> None:
    _, broken_file, log = reloaded_broken
    errors = [line for line in log.splitlines() if "error" in line.lower()]

    assert any(broken_file in line for line in errors), log


# The line to PostgreSQL cut -------------------------------------------------------------------

# Seconds the served store waits for PostgreSQL per request before answering 503.
STORE_TIMEOUT = 1
CUT_SECONDS = 2.0
STORE_REQUESTS = 1000


@pytest.fixture(scope="module")
def store_url(postgres_server: str, data_dir: Path) -> Iterator[str]:
    """The small data loaded into a schema of this module's own, dropped afterwards."""
    with private_schema(postgres_server, "test") as url:
        load_database(data_dir, url)
        yield url


@pytest.fixture(scope="module")
def store_cut(
    store_url: str,
    data_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    paths: list[str],
    expected: list[bytes],
) -> faults.FaultRecord:
    """The line to PostgreSQL cut for two seconds in the middle of about 1,000 requests."""
    target = make_url(store_url)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432)
    options = ["--store", through_proxy(store_url, proxy)]
    try:
        directory = tmp_path_factory.mktemp("cut")
        with _serving(data_dir, directory, *options, store_timeout=str(STORE_TIMEOUT)) as server:
            return faults.cut_store(
                server.url,
                server.process.pid,
                proxy,
                paths,
                expected,
                cut_seconds=CUT_SECONDS,
                clients=KEEP_ALIVE_CLIENTS,
                fresh_clients=FRESH_CLIENTS,
                requests=STORE_REQUESTS,
                timeout=LIVENESS_TIMEOUT,
            )
    finally:
        proxy.cut()


def test_requests_get_503_with_retry_after_while_postgres_is_cut(
    store_cut: faults.FaultRecord,
) -> None:
    assert store_cut.details["outcomes_sent_while_cut"].get(faults.UNAVAILABLE, 0) > 0, store_cut


def test_a_cut_to_postgres_costs_only_503s_never_another_status_a_wrong_answer_or_a_connection(
    store_cut: faults.FaultRecord,
) -> None:
    assert set(store_cut.outcomes) <= {"expected", faults.UNAVAILABLE}, store_cut


def test_requests_are_answered_again_once_postgres_comes_back(
    store_cut: faults.FaultRecord,
) -> None:
    assert store_cut.recovery_seconds is not None, store_cut


def test_once_recovered_from_the_cut_every_request_gets_its_answer(
    store_cut: faults.FaultRecord,
) -> None:
    # The drill sends at least half its requests after a run of right answers past the restore;
    # a failure among them would leave fewer than that after the last failure.
    answered = store_cut.details["requests_sent_after_the_last_failure"]

    assert answered >= STORE_REQUESTS // 2, store_cut


def test_readyz_says_unavailable_while_postgres_is_cut_and_ready_after(
    store_cut: faults.FaultRecord,
) -> None:
    details = store_cut.details

    assert details["readiness_while_cut"] == (503, "unavailable"), store_cut
    assert details["readiness_after"] == (200, "ready"), store_cut


def test_a_cut_to_postgres_under_load_costs_no_worker(store_cut: faults.FaultRecord) -> None:
    details = store_cut.details

    assert details["workers_after"] == details["workers_before"], store_cut


# The Redis cache killed -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_killed(
    store_url: str,
    data_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    paths: list[str],
    expected: list[bytes],
) -> faults.FaultRecord:
    """A private redis-server in front of PostgreSQL, SIGKILLed in the middle of about 1,000
    requests and started again on the same port."""
    root = tmp_path_factory.mktemp("cache")
    cache = start_redis(RedisProcess(root / "redis"))
    try:
        with _serving(data_dir, root, "--store", store_url, "--cache", cache.url) as server:
            return faults.kill_cache(
                server.url,
                server.process.pid,
                cache,
                paths,
                expected,
                clients=KEEP_ALIVE_CLIENTS,
                fresh_clients=FRESH_CLIENTS,
                requests=1000,
                timeout=LIVENESS_TIMEOUT,
            )
    finally:
        cache.kill()


def test_every_request_gets_its_answer_while_redis_is_killed_and_restarted(
    cache_killed: faults.FaultRecord,
) -> None:
    assert cache_killed.outcomes == {"expected": cache_killed.requests_sent}, cache_killed


def test_requests_while_redis_is_down_are_answered_from_postgres(
    cache_killed: faults.FaultRecord,
) -> None:
    details = cache_killed.details

    assert set(details["outcomes_sent_while_down"]) == {"expected"}, cache_killed
    assert details["cache_lookups_while_down"].get("skipped", 0) > 0, cache_killed


def test_every_worker_reports_degraded_while_redis_is_down(
    cache_killed: faults.FaultRecord,
) -> None:
    degraded_after = cache_killed.details["every_worker_degraded_after_seconds"]

    assert degraded_after is not None, cache_killed


def test_every_worker_reports_ready_once_redis_is_back(cache_killed: faults.FaultRecord) -> None:
    assert cache_killed.recovery_seconds is not None, cache_killed


def test_the_cache_serves_hits_again_once_redis_is_back(cache_killed: faults.FaultRecord) -> None:
    assert cache_killed.details["cache_lookups_after_recovery"].get("hit", 0) > 0, cache_killed
