"""End to end: ``recommender serve`` under Gunicorn with two workers, over a local socket."""

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import SMALL, Server, local_client, running_server, start_server
from prometheus_client.parser import text_string_to_metric_families

from recommender.bench.server import worker_pids
from recommender.contract import render
from recommender.dataset.generate import generate
from recommender.ranking import Query
from recommender.service import Recommender

RECOMMENDER = Path(sys.executable).with_name("recommender")
WORKERS = 2
# Bounds on waiting, not expectations of speed: a healthy server needs a small part of them.
STOP_TIMEOUT = 30.0


@pytest.fixture
def own_server(data_dir: Path, tmp_path: Path) -> Iterator[Server]:
    """A server for one test alone, which may stop it."""
    with running_server(data_dir, tmp_path, "--workers", str(WORKERS)) as running:
        yield running


@pytest.fixture(scope="module")
def server(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server shared by the tests that leave it running."""
    with running_server(
        data_dir, tmp_path_factory.mktemp("server"), "--workers", str(WORKERS)
    ) as running:
        yield running


def _worker_pids(server: Server) -> set[int]:
    return worker_pids(server.process.pid)


def _expected(recommender: Recommender, user_id: str, query: Query) -> bytes:
    return render(asyncio.run(recommender.recommend(user_id, query)))


def test_served_answers_equal_the_in_process_answers_byte_for_byte(
    server: Server, recommender: Recommender, requests: list[dict]
) -> None:
    with local_client() as client:
        for row in requests[:10]:
            query = Query(row["latitude"], row["longitude"], row["size"], 7500.0, True)
            parameters = {
                "latitude": row["latitude"],
                "longitude": row["longitude"],
                "size": f"{row['size']}.0",
                "max_dis": "7500.0",
                "sort_dis": "1.0",
            }

            response = client.get(f"{server.url}/recommend/{row['user_id']}", params=parameters)

            assert response.status_code == 200
            assert response.content == _expected(recommender, row["user_id"], query)


def test_served_post_answers_equal_the_in_process_answers_byte_for_byte(
    server: Server, recommender: Recommender, requests: list[dict]
) -> None:
    row = requests[0]
    body = {"latitude": row["latitude"], "longitude": row["longitude"], "size": float("nan")}
    query = Query(row["latitude"], row["longitude"], 20, 5000.0, False)

    with local_client() as client:
        response = client.post(f"{server.url}/recommend/{row['user_id']}", content=json.dumps(body))

    assert response.status_code == 200
    assert response.content == _expected(recommender, row["user_id"], query)


def test_the_master_runs_two_workers(server: Server) -> None:
    assert len(_worker_pids(server)) == WORKERS


def test_many_concurrent_requests_are_answered_without_losing_a_worker(
    server: Server, requests: list[dict]
) -> None:
    workers_before = _worker_pids(server)

    def ask(row: dict) -> int:
        # A fresh connection per request, so that either worker may accept it.
        with local_client() as client:
            url = f"{server.url}/recommend/{row['user_id']}"
            parameters = {"latitude": row["latitude"], "longitude": row["longitude"]}
            return client.get(url, params=parameters).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(ask, requests[:200]))

    assert statuses == [200] * 200
    assert _worker_pids(server) == workers_before


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/recommend/u001?latitude=91&longitude=100.5", None, 422),
        ("GET", "/recommend/u001?latitude=13.8", None, 422),
        ("GET", "/recommend/u001?latitude=13.8&longitude=100.5&size=2.5", None, 422),
        ("GET", "/recommend/u001?latitude=13.8&longitude=100.5&size=1&size=2", None, 422),
        ("GET", "/recommend/nobody?latitude=13.8&longitude=100.5", None, 404),
        ("GET", "/recommend/a%2Fb?latitude=13.8&longitude=100.5", None, 404),
        ("GET", f"/recommend/{'u' * 257}?latitude=13.8&longitude=100.5", None, 422),
        ("POST", "/recommend/u001", b"{", 422),
        ("POST", "/recommend/u001", b"[13.8, 100.5]", 422),
        ("POST", "/recommend/u001", b" " * 20_000, 422),
        ("POST", "/recommend/u001?latitude=13.8", b'{"latitude": 13.8}', 422),
    ],
    ids=[
        "latitude-out-of-range",
        "longitude-missing",
        "fractional-size",
        "size-twice",
        "unknown-user",
        "encoded-slash",
        "long-user-id",
        "malformed-body",
        "array-body",
        "oversized-body",
        "query-and-body",
    ],
)
def test_bad_input_is_answered_with_a_4xx_json_body(
    server: Server, method: str, path: str, body: bytes | None, status: int
) -> None:
    with local_client() as client:
        response = client.request(method, f"{server.url}{path}", content=body)

    assert response.status_code == status
    assert "detail" in response.json()


def test_sigterm_stops_the_server_cleanly(own_server: Server) -> None:
    server = own_server
    workers = _worker_pids(server)

    server.process.send_signal(signal.SIGTERM)
    returncode = server.process.wait(timeout=STOP_TIMEOUT)

    assert returncode == 0, server.log_text()
    assert _gone_within(workers, STOP_TIMEOUT), server.log_text()


def _gone_within(pids: set[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{pid}").exists() for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _recommend_count(text: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "recommender_requests_total"
        and sample.labels["route"] == "/recommend/{user_id}"
    )


def test_metrics_and_log_lines_cover_every_worker(own_server: Server, requests: list[dict]) -> None:
    server = own_server
    rows = requests[:60]

    def ask(numbered: tuple[int, dict]) -> int:
        number, row = numbered
        # A fresh connection per request, so that either worker may accept it.
        with local_client() as client:
            url = f"{server.url}/recommend/{row['user_id']}"
            parameters = {"latitude": row["latitude"], "longitude": row["longitude"]}
            headers = {"X-Request-ID": f"probe-{number}"}
            return client.get(url, params=parameters, headers=headers).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(ask, enumerate(rows)))
    with local_client() as client:
        metrics = client.get(f"{server.url}/metrics").text

    lines = [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]
    requests_logged = [line for line in lines if line.get("request_id", "").startswith("probe-")]
    assert statuses == [200] * len(rows)
    assert _recommend_count(metrics) == len(rows)
    assert sorted(line["request_id"] for line in requests_logged) == sorted(
        f"probe-{number}" for number in range(len(rows))
    )
    assert {line["pid"] for line in requests_logged} == _worker_pids(server)


def test_after_a_reload_the_version_metric_names_only_the_new_model(
    data_dir: Path, tmp_path: Path
) -> None:
    served = tmp_path / "served"
    shutil.copytree(data_dir, served)
    with running_server(served, tmp_path, "--workers", str(WORKERS)) as server:
        with local_client() as client:
            before = client.get(f"{server.url}/healthz").headers["X-Model-SHA256"]
        old_workers = _worker_pids(server)
        generate(served, **{**SMALL, "seed": SMALL["seed"] + 1})

        server.process.send_signal(signal.SIGHUP)
        assert _gone_within(old_workers, STOP_TIMEOUT), server.log_text()
        with local_client() as client:
            after = client.get(f"{server.url}/healthz").headers["X-Model-SHA256"]

        with local_client() as client:
            metrics = client.get(f"{server.url}/metrics").text
        versions = [
            sample.labels["model_sha256"]
            for family in text_string_to_metric_families(metrics)
            for sample in family.samples
            if sample.name == "recommender_version_info"
        ]
        assert after != before
        assert versions == [after]


def test_a_hung_worker_is_replaced_after_the_worker_timeout(
    data_dir: Path, tmp_path: Path, requests: list[dict]
) -> None:
    row = requests[0]
    parameters = {"latitude": row["latitude"], "longitude": row["longitude"]}
    with running_server(
        data_dir, tmp_path, "--workers", str(WORKERS), worker_timeout="2"
    ) as server:
        hung = min(_worker_pids(server))

        # A stopped process stands for one stuck in a request: it answers nothing any more.
        os.kill(hung, signal.SIGSTOP)
        replaced = _gone_within({hung}, STOP_TIMEOUT)
        deadline = time.monotonic() + STOP_TIMEOUT
        while len(_worker_pids(server)) < WORKERS and time.monotonic() < deadline:
            time.sleep(0.1)

        assert replaced, server.log_text()
        assert len(_worker_pids(server)) == WORKERS
        assert "WORKER TIMEOUT" in server.log_text()
        with local_client() as client:
            for _ in range(4):
                url = f"{server.url}/recommend/{row['user_id']}"
                assert client.get(url, params=parameters).status_code == 200


def test_every_log_line_is_json_off_a_terminal_even_the_http_parsers(
    server: Server,
) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=STOP_TIMEOUT) as connection:
        connection.sendall(b"GET healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert connection.recv(1024).startswith(b"HTTP/1.1 400")
    with local_client() as client:
        client.get(f"{server.url}/healthz")

    lines = server.log_text().splitlines()

    assert lines
    assert all(json.loads(line)["message"] for line in lines)
    assert any("Invalid HTTP request" in json.loads(line)["message"] for line in lines)


def test_workers_stop_by_themselves_when_their_master_is_killed(
    data_dir: Path, tmp_path: Path
) -> None:
    with running_server(
        data_dir, tmp_path, "--workers", str(WORKERS), worker_timeout="2"
    ) as server:
        workers = _worker_pids(server)
        try:
            server.process.kill()
            server.process.wait()

            assert _gone_within(workers, STOP_TIMEOUT), server.log_text()
        finally:
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_a_second_server_on_the_same_metrics_directory_is_refused_and_counts_survive(
    data_dir: Path, tmp_path: Path, requests: list[dict]
) -> None:
    shared = str(tmp_path / "metrics")
    row = requests[0]
    parameters = {"latitude": row["latitude"], "longitude": row["longitude"]}
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    with running_server(data_dir, first_dir, metrics_dir=shared) as first:
        with local_client() as client:
            for _ in range(3):
                client.get(f"{first.url}/recommend/{row['user_id']}", params=parameters)

        second = start_server(data_dir, second_dir, metrics_dir=shared)
        returncode = second.process.wait(timeout=STOP_TIMEOUT)

        with local_client() as client:
            metrics = client.get(f"{first.url}/metrics").text
        assert returncode == 2
        assert "in use by another running server" in second.log_text()
        assert _recommend_count(metrics) == 3


@pytest.mark.parametrize("header_bytes", [70_000, 200_000, 5_000_000])
def test_a_request_head_over_64_kib_is_refused_with_431_and_the_worker_answers_on(
    server: Server, header_bytes: int
) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=STOP_TIMEOUT) as connection:
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        answer = b""
        with contextlib.suppress(ConnectionError):
            for start in range(0, header_bytes, 16_384):
                connection.sendall(b"a" * min(16_384, header_bytes - start))
        with contextlib.suppress(ConnectionError):
            while chunk := connection.recv(4096):
                answer += chunk

    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert b"at most 65536 bytes" in answer
    with local_client() as client:
        assert client.get(f"{server.url}/healthz").status_code == 200


def test_a_request_head_of_a_few_kib_is_answered(server: Server) -> None:
    with local_client() as client:
        response = client.get(f"{server.url}/healthz", headers={"X-Trace": "t" * 8000})

    assert response.status_code == 200


def test_the_head_bound_counts_each_request_of_a_kept_alive_connection_alone(
    server: Server,
) -> None:
    # Twenty heads of 8 KiB on one connection: 160 KiB in all, each far below the bound.
    with local_client() as client:
        statuses = [
            client.get(f"{server.url}/healthz", headers={"X-Trace": "t" * 8192}).status_code
            for _ in range(20)
        ]

    assert statuses == [200] * 20
