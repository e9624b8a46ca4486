"""The served API against its own OpenAPI document, and against requests too large to parse.

Schemathesis reads ``/openapi.json`` from a real ``recommender serve`` (Gunicorn, Uvicorn workers,
embedded store, small data) and sends it schema-derived requests, valid and invalid: no answer
may be a 5xx or differ from what the document says (status codes, content types, bodies), valid
requests must be accepted and invalid ones refused.

The run is bounded so that it fits in the normal test suite, and seeded so that a failure comes
back the same. A longer run, or another seed, locally::

    RECOMMENDER_FUZZ_EXAMPLES=2000 RECOMMENDER_FUZZ_SEED=7 \\
        .venv/bin/python -m pytest tests/test_openapi_fuzz.py

Each failure is printed with a curl command that repeats it against a server of one's own. The
API accepts on purpose some forms the document does not declare (contract.py: "50.0" for a size,
an empty or "nan" value, a JSON null, a numeric string in the body); when a longer run's refusal
check flags one of those, the document is what falls short.

The run goes through schemathesis' command line: its pytest loader for a schema served by a
fixture (``schemathesis.pytest.from_fixture``) fails under pytest 9.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from conftest import Server, local_client, running_server

EXAMPLES = int(os.environ.get("RECOMMENDER_FUZZ_EXAMPLES", "150"))
SEED = int(os.environ.get("RECOMMENDER_FUZZ_SEED", "20240611"))
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
# Bounds on waiting, not expectations of speed: a healthy run needs a small part of them.
RUN_TIMEOUT = 120.0 + EXAMPLES
ANSWER_TIMEOUT = 30.0

# What a request the document forbids may be answered with: the statuses the API refuses with,
# 414 among them for a path or query string over the guard's limit.
REFUSALS = [400, 404, 405, 414, 415, 422]
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "positive_data_acceptance",
    "negative_data_rejection",
    "unsupported_method",
    "allow_header_conformance",
)


def _config(known_users: list[str]) -> str:
    """A schemathesis.toml for the run: the checks above, and real user ids half of the time."""
    checks = "\n".join(f"{name}.enabled = true" for name in CHECKS)
    return f"""
seed = {SEED}
request-timeout = {ANSWER_TIMEOUT}
continue-on-failure = true

[generation]
mode = "all"
max-examples = {EXAMPLES}
database = "none"

[phases]
examples.enabled = true
coverage.enabled = true
fuzzing.enabled = true
stateful.enabled = false

[checks]
enabled = false
{checks}
negative_data_rejection.expected-statuses = {json.dumps(REFUSALS)}

# Without real ids nearly every generated user is unknown, and the ranking is never reached.
[dictionaries.users]
values = {json.dumps(known_users)}

[parameters]
"path.user_id" = {{ dictionary = "users", probability = 0.5 }}

# POST takes each parameter from the query string or the body, never from both, and needs the
# coordinates from one of them (422 otherwise): rules across two locations that an OpenAPI
# document cannot express, so a request valid by the document may break them.
[[operations]]
include-method = "POST"
include-path = "/recommend/{{user_id}}"
checks.positive_data_acceptance.expected-statuses = [200, 404, 422]
"""


@pytest.fixture(scope="module")
def server(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A production-shaped server (two workers) shared by this module's tests."""
    with running_server(data_dir, tmp_path_factory.mktemp("fuzz"), "--workers", "2") as running:
        yield running


def _run_schemathesis(server: Server, config: Path, reports: Path) -> subprocess.CompletedProcess:
    command = [
        str(SCHEMATHESIS),
        "--config-file",
        str(config),
        "run",
        f"{server.url}/openapi.json",
        "--workers",
        "2",
        "--no-color",
        "--report",
        "json",
        "--report-json-path",
        str(reports / "report.json"),
    ]
    # No proxy from the environment may see this traffic.
    env = {key: value for key, value in os.environ.items() if "proxy" not in key.lower()}
    return subprocess.run(
        command, capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env, check=False
    )


def test_every_documented_operation_answers_as_its_document_says(
    server: Server, requests: list[dict], tmp_path: Path
) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(_config(sorted({row["user_id"] for row in requests})))

    run = _run_schemathesis(server, config, tmp_path)

    output = f"{run.stdout}\n{run.stderr}"
    assert run.returncode == 0, output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["complete"], output
    assert report["operations"]["tested"] == report["operations"]["total"] > 0, output
    # The run reached the ranking: some generated requests were answered with restaurants.
    rates = report["valid_rates"]["GET /recommend/{user_id}"]["fuzzing"]
    assert rates["accepted"] > 0, output


def _answer_to_raw_request(url: str, target: str) -> bytes:
    """The bytes a server answers to ``GET target``, read while the request is still being sent.

    Raw, because HTTP clients refuse or rewrite such targets; read while sending, because a server
    that refuses early stops reading, and a client that only sends would block.
    """
    address = urlsplit(url)
    request = f"GET {target} HTTP/1.1\r\nHost: {address.netloc}\r\nConnection: close\r\n\r\n"
    answer = bytearray()
    with socket.create_connection((address.hostname, address.port), ANSWER_TIMEOUT) as line:

        def send() -> None:
            # The server may close the line before taking it all; its answer is what counts.
            with contextlib.suppress(OSError):
                line.sendall(request.encode())

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            while chunk := line.recv(65536):
                answer += chunk
        except TimeoutError:
            pytest.fail(f"no end to the answer within {ANSWER_TIMEOUT} s: {bytes(answer[:200])!r}")
        except ConnectionResetError:
            pass
        sender.join(ANSWER_TIMEOUT)
    return bytes(answer)


def _status(answer: bytes) -> int:
    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 "), f"not an HTTP answer: {answer[:200]!r}"
    return int(status_line.split()[1])


@pytest.mark.parametrize("size", [5_000, 100_000, 1_000_000], ids=["5kB", "100kB", "1MB"])
@pytest.mark.parametrize(
    "target",
    [
        "/recommend/{pad}?latitude=13.8&longitude=100.5",
        "/recommend/u001?latitude=13.8&longitude=100.5&pad={pad}",
    ],
    ids=["path", "query"],
)
def test_an_oversized_path_or_query_is_refused_before_the_api_sees_it(
    server: Server, target: str, size: int
) -> None:
    answer = _answer_to_raw_request(server.url, target.format(pad="u" * size))

    # 414 from the API's guard; past 64 KiB, 431 from the server's bound on a request head, before
    # the HTTP parser has to buffer it. Never an answer of the API proper, never a 5xx.
    assert _status(answer) == (414 if size < 65_536 else 431), answer[:500]
    with local_client() as client:
        assert client.get(f"{server.url}/healthz").status_code == 200


def test_the_longest_valid_user_id_is_looked_up_not_refused(server: Server) -> None:
    # 256 characters, as many as the document allows, of four UTF-8 bytes each: percent-encoded,
    # the path is 12 bytes a character long.
    user_id = "\N{GRINNING FACE}" * 256

    with local_client() as client:
        response = client.get(
            f"{server.url}/recommend/{quote(user_id, safe='')}",
            params={"latitude": 13.8, "longitude": 100.5},
        )

    assert response.status_code == 404, response.text
    assert response.json()["user_id"] == user_id
