"""Request ids, version headers, metrics and log lines, in process (one worker, no server)."""

import asyncio
import gc
import json
import logging
import weakref
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import Client
from prometheus_client.parser import text_string_to_metric_families

from recommender.api import create_app
from recommender.dataset.reader import RESTAURANT_FILE, USER_FILE, data_sha256, file_sha256
from recommender.model import model_path
from recommender.observability import JsonFormatter, logging_config
from recommender.ranking import Query
from recommender.service import Recommender, load_recommender
from recommender.settings import Settings

POINT = "latitude=13.8&longitude=100.5"


@pytest.fixture
def fresh(settings: Settings) -> Recommender:
    """A recommender of its own, so that its metrics count this test's requests only."""
    return load_recommender(settings)


def _samples(client: Client, name: str) -> dict[tuple, float]:
    """The values of metric ``name`` on /metrics, keyed by their sorted labels."""
    text = client.get("/metrics").text
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


class TestRequestIds:
    def test_a_client_request_id_is_returned_unchanged(self, recommender: Recommender) -> None:
        response = Client(create_app(recommender)).get(
            "/healthz", headers={"X-Request-ID": "checkout-42.a:b"}
        )

        assert response.headers["X-Request-ID"] == "checkout-42.a:b"

    @pytest.mark.parametrize(
        "given", [None, "", "has space", "x" * 129, "semi;colon", "new\u00e9line"]
    )
    def test_a_missing_or_unsafe_request_id_is_replaced_by_a_fresh_one(
        self, recommender: Recommender, given: str | None
    ) -> None:
        client = Client(create_app(recommender))
        headers = {} if given is None else {"X-Request-ID": given.encode("utf-8")}

        first = client.get("/healthz", headers=headers).headers["X-Request-ID"]
        second = client.get("/healthz", headers=headers).headers["X-Request-ID"]

        assert len(first) == 32 and int(first, 16) >= 0
        assert first != second

    def test_errors_carry_a_request_id_too(self, recommender: Recommender) -> None:
        client = Client(create_app(recommender))

        for response in (
            client.get(f"/recommend/nobody?{POINT}"),
            client.get("/recommend/u001?latitude=north&longitude=1"),
            client.get("/no/such/route"),
            client.get("/healthz?" + "x" * 5000),
        ):
            assert response.status_code >= 400
            assert len(response.headers["X-Request-ID"]) == 32


class TestVersionHeaders:
    def test_every_response_names_the_model_and_data_that_answered(
        self, recommender: Recommender, data_dir: Path
    ) -> None:
        client = Client(create_app(recommender))
        data = data_sha256(
            file_sha256(data_dir / RESTAURANT_FILE), file_sha256(data_dir / USER_FILE)
        )

        for response in (
            client.get(f"/recommend/u001?{POINT}"),
            client.get(f"/recommend/nobody?{POINT}"),
            client.get("/readyz"),
        ):
            assert response.headers["X-Model-SHA256"] == file_sha256(model_path(data_dir))
            assert response.headers["X-Data-SHA256"] == data

    def test_other_data_gives_another_data_version(
        self, recommender: Recommender, data_dir: Path, tmp_path: Path
    ) -> None:
        other = tmp_path / "data"
        other.mkdir()
        for path in data_dir.iterdir():
            if path.is_file():
                (other / path.name).write_bytes(path.read_bytes())
        # The same values written in other row groups: another file, so another version.
        pq.write_table(pq.read_table(data_dir / USER_FILE), other / USER_FILE, row_group_size=7)

        copy = load_recommender(Settings(data_dir=other, prepared_dir=tmp_path / "prepared"))

        assert copy.report.data_sha256 != recommender.report.data_sha256
        assert copy.report.model_sha256 == recommender.report.model_sha256


class TestMetrics:
    def test_requests_are_counted_by_route_template_and_status(self, fresh: Recommender) -> None:
        client = Client(create_app(fresh))
        for _ in range(3):
            client.get(f"/recommend/u001?{POINT}")
        client.get(f"/recommend/nobody?{POINT}")
        client.get("/recommend/u001?latitude=north&longitude=1")
        client.get("/scan/for/admin.php")

        counts = _samples(client, "recommender_requests_total")

        route = ("route", "/recommend/{user_id}")
        assert counts[(("method", "GET"), route, ("status", "200"))] == 3
        assert counts[(("method", "GET"), route, ("status", "404"))] == 1
        assert counts[(("method", "GET"), route, ("status", "422"))] == 1
        assert counts[(("method", "GET"), ("route", "unmatched"), ("status", "404"))] == 1

    def test_the_documents_routes_are_counted_under_their_own_paths(
        self, fresh: Recommender
    ) -> None:
        client = Client(create_app(fresh))
        client.get("/openapi.json")
        client.get("/docs")

        counts = _samples(client, "recommender_requests_total")

        for path in ("/openapi.json", "/docs"):
            assert counts[(("method", "GET"), ("route", path), ("status", "200"))] == 1

    def test_latency_is_a_histogram_with_one_observation_per_request(
        self, fresh: Recommender
    ) -> None:
        client = Client(create_app(fresh))
        for _ in range(4):
            client.get(f"/recommend/u001?{POINT}")

        counts = _samples(client, "recommender_request_duration_seconds_count")
        infinite = _samples(client, "recommender_request_duration_seconds_bucket")

        labels = (("method", "GET"), ("route", "/recommend/{user_id}"), ("status", "200"))
        assert counts[labels] == 4
        assert infinite[tuple(sorted((*labels, ("le", "+Inf"))))] == 4

    def test_candidates_per_request_add_up_to_the_answers_candidates(
        self, fresh: Recommender, requests: list[dict]
    ) -> None:
        client = Client(create_app(fresh))
        rows = requests[:5]
        expected = 0
        for row in rows:
            point = f"latitude={row['latitude']}&longitude={row['longitude']}"
            client.get(f"/recommend/{row['user_id']}?{point}&max_dis=8000")
            query = Query(row["latitude"], row["longitude"], 20, 8000.0, False)
            ranking = asyncio.run(fresh.recommend(row["user_id"], query))
            expected += ranking.n_candidates

        # Each answer was computed twice: once served, once directly above.
        assert _samples(client, "recommender_candidates_count")[()] == 2 * len(rows)
        assert _samples(client, "recommender_candidates_sum")[()] == 2 * expected

    def test_store_latency_is_observed_per_lookup_with_the_store_named(
        self, fresh: Recommender
    ) -> None:
        client = Client(create_app(fresh))
        client.get(f"/recommend/u001?{POINT}")
        client.get(f"/recommend/nobody?{POINT}")

        assert _samples(client, "recommender_store_duration_seconds_count") == {
            (("store", "embedded"),): 2
        }

    def test_the_version_is_an_info_metric(self, fresh: Recommender) -> None:
        client = Client(create_app(fresh))

        versions = _samples(client, "recommender_version_info")

        labels = (
            ("data_sha256", fresh.report.data_sha256),
            ("model_sha256", fresh.report.model_sha256),
        )
        assert versions == {labels: 1.0}

    def test_metrics_are_prometheus_text(self, fresh: Recommender) -> None:
        response = Client(create_app(fresh)).get("/metrics")

        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=")
        assert "# TYPE recommender_requests_total counter" in response.text


class TestLogs:
    def test_each_request_logs_one_line_with_route_status_latency_and_id(
        self, recommender: Recommender, caplog: pytest.LogCaptureFixture
    ) -> None:
        client = Client(create_app(recommender))

        with caplog.at_level(logging.INFO, logger="recommender.request"):
            client.get(f"/recommend/u001?{POINT}", headers={"X-Request-ID": "trace-7"})

        lines = [r for r in caplog.records if r.name == "recommender.request"]
        assert len(lines) == 1
        fields = json.loads(JsonFormatter().format(lines[0]))
        assert fields["method"] == "GET"
        assert fields["route"] == "/recommend/{user_id}"
        assert fields["status"] == 200
        assert fields["request_id"] == "trace-7"
        assert fields["latency_ms"] > 0

    def test_the_log_line_holds_neither_the_user_id_nor_features(
        self, recommender: Recommender, caplog: pytest.LogCaptureFixture
    ) -> None:
        client = Client(create_app(recommender))
        features = asyncio.run(recommender.store.features("u001"))

        with caplog.at_level(logging.DEBUG):
            client.get(f"/recommend/u001?{POINT}")

        ours = [record for record in caplog.records if record.name.startswith("recommender")]
        text = "\n".join(JsonFormatter().format(record) for record in ours)
        assert "u001" not in text
        assert repr(float(features[0]))[:8] not in text

    def test_auto_format_is_json_off_a_terminal(self) -> None:
        config = logging_config("auto", "info")

        assert config["formatters"]["service"] == {"()": JsonFormatter}

    def test_text_format_is_plain(self) -> None:
        config = logging_config("text", "info")

        assert "format" in config["formatters"]["service"]


def test_an_app_built_anew_keeps_nothing_of_the_data_before(settings: Settings) -> None:
    # A reload builds a new app on new data; the old data set must be freed, not kept alive
    # by anything that outlives its app.
    first = load_recommender(settings)
    Client(create_app(first)).get(f"/recommend/u001?{POINT}")
    gone = weakref.ref(first)
    del first

    Client(create_app(load_recommender(settings))).get(f"/recommend/u001?{POINT}")
    gc.collect()

    assert gone() is None
