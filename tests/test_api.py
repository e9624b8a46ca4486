"""The HTTP API, in process: status codes and bodies for every kind of request a client sends."""

import asyncio
import json
import logging
import math
from urllib.parse import quote

import httpx
import pytest
from conftest import Client
from hypothesis import given, settings
from hypothesis import strategies as st

from recommender.api import create_app
from recommender.contract import PARAMETERS, render
from recommender.ranking import Query
from recommender.service import Recommender, load_recommender
from recommender.settings import Settings

USER = "u001"
POINT = "latitude=13.8&longitude=100.5"
POINT_BODY = {"latitude": 13.8, "longitude": 100.5}


@pytest.fixture(scope="module")
def client(recommender: Recommender) -> Client:
    return Client(create_app(recommender))


def _expected(recommender: Recommender, user_id: str, query: Query) -> bytes:
    return render(asyncio.run(recommender.recommend(user_id, query)))


def _query_of(row: dict) -> Query:
    """The query a request row means, NaN taking the defaults (independent of parse_query)."""
    max_dis = 5000.0 if math.isnan(row["max_dis"]) else row["max_dis"]
    return Query(row["latitude"], row["longitude"], row["size"], max_dis, row["sort_dis"] == 1.0)


def _as_client_sends(row: dict) -> dict[str, str]:
    """A request row as query parameters, floats and NaN written as Python prints them."""
    return {name: str(row[name]) for name in PARAMETERS}


def _assert_refused(response: httpx.Response, parameter: str) -> None:
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["parameter"] == parameter
    assert parameter in body["detail"]


def test_get_answers_every_sample_request_as_the_recommender_does(
    client: Client, recommender: Recommender, requests: list[dict]
) -> None:
    for row in requests[:40]:
        response = client.get(f"/recommend/{row['user_id']}", params=_as_client_sends(row))

        assert response.status_code == 200
        assert response.content == _expected(recommender, row["user_id"], _query_of(row))


def test_sample_requests_cover_nan_and_float_parameters(requests: list[dict]) -> None:
    rows = requests[:40]

    assert any(math.isnan(row["max_dis"]) for row in rows)
    assert any(math.isnan(row["sort_dis"]) for row in rows)
    assert any(row["sort_dis"] == 1.0 for row in rows)


def test_post_with_a_json_body_answers_as_get_does(client: Client, requests: list[dict]) -> None:
    for row in requests[:40]:
        url = f"/recommend/{row['user_id']}"
        body = json.dumps({name: row[name] for name in PARAMETERS})

        posted = client.post(url, content=body, headers={"content-type": "application/json"})
        got = client.get(url, params=_as_client_sends(row))

        assert posted.status_code == got.status_code == 200
        assert posted.content == got.content


def test_post_takes_parameters_from_the_query_string(client: Client) -> None:
    posted = client.post(f"/recommend/{USER}?{POINT}&size=3")
    got = client.get(f"/recommend/{USER}?{POINT}&size=3")

    assert posted.status_code == 200
    assert posted.content == got.content


def test_post_combines_query_string_and_body_parameters(client: Client) -> None:
    posted = client.post(f"/recommend/{USER}?latitude=13.8&size=3", json={"longitude": 100.5})
    got = client.get(f"/recommend/{USER}?{POINT}&size=3")

    assert posted.status_code == 200
    assert posted.content == got.content


@pytest.mark.parametrize("name", PARAMETERS)
def test_post_refuses_a_parameter_given_in_both_query_and_body(client: Client, name: str) -> None:
    values = {"latitude": 13.8, "longitude": 100.5, "size": 3, "max_dis": 900, "sort_dis": 1}

    response = client.post(f"/recommend/{USER}?{name}={values[name]}", json=values)

    _assert_refused(response, name)


def test_an_answer_is_a_list_of_restaurants_with_id_difference_and_displacement(
    client: Client,
) -> None:
    response = client.get(f"/recommend/{USER}?{POINT}&size=5")

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    restaurants = response.json()["restaurants"]
    assert len(restaurants) == 5
    for restaurant in restaurants:
        assert set(restaurant) == {"id", "difference", "displacement"}
        assert isinstance(restaurant["id"], str) and restaurant["id"].startswith("r")
        assert isinstance(restaurant["difference"], float)
        assert isinstance(restaurant["displacement"], int)


def test_no_restaurant_in_range_is_an_empty_answer(client: Client) -> None:
    response = client.get(f"/recommend/{USER}?latitude=-45&longitude=-120")

    assert response.status_code == 200
    assert response.json() == {"restaurants": []}


@pytest.mark.parametrize(
    "parameters",
    [
        "size=50.0&max_dis=10000.0&sort_dis=1.0",
        "size=50&max_dis=10000&sort_dis=1",
        "size=5e1&max_dis=1e4&sort_dis=1e0",
    ],
)
def test_floats_and_integers_for_whole_numbers_give_the_same_answer(
    client: Client, recommender: Recommender, parameters: str
) -> None:
    response = client.get(f"/recommend/{USER}?{POINT}&{parameters}")

    assert response.status_code == 200
    assert response.content == _expected(recommender, USER, Query(13.8, 100.5, 50, 1e4, True))


@pytest.mark.parametrize(
    "parameters",
    ["", "size=&max_dis=&sort_dis=", "size=nan&max_dis=NaN&sort_dis=NAN"],
    ids=["absent", "empty", "nan"],
)
def test_absent_empty_or_nan_parameters_take_the_defaults(
    client: Client, recommender: Recommender, parameters: str
) -> None:
    response = client.get(f"/recommend/{USER}?{POINT}&{parameters}")

    assert response.status_code == 200
    assert response.content == _expected(recommender, USER, Query(13.8, 100.5, 20, 5000.0, False))


@pytest.mark.parametrize(
    "body",
    [
        b'{"latitude": 13.8, "longitude": 100.5, "size": null, "max_dis": null, "sort_dis": null}',
        b'{"latitude": 13.8, "longitude": 100.5, "size": NaN, "max_dis": NaN, "sort_dis": NaN}',
        b'{"latitude": 13.8, "longitude": 100.5, "size": "", "max_dis": "nan", "sort_dis": ""}',
    ],
    ids=["null", "NaN-token", "empty-and-nan-text"],
)
def test_null_and_nan_in_a_json_body_take_the_defaults(
    client: Client, recommender: Recommender, body: bytes
) -> None:
    response = client.post(f"/recommend/{USER}", content=body)

    assert response.status_code == 200
    assert response.content == _expected(recommender, USER, Query(13.8, 100.5, 20, 5000.0, False))


def test_numeric_strings_in_a_json_body_count_as_numbers(
    client: Client, recommender: Recommender
) -> None:
    body = {"latitude": "13.8", "longitude": "100.5", "size": "50.0", "sort_dis": "1.0"}

    response = client.post(f"/recommend/{USER}", json=body | {"max_dis": "10000.0"})

    assert response.status_code == 200
    assert response.content == _expected(recommender, USER, Query(13.8, 100.5, 50, 1e4, True))


def test_max_dis_has_no_upper_bound(client: Client, recommender: Recommender) -> None:
    response = client.get(f"/recommend/{USER}?{POINT}&max_dis=1e308&size=1000")

    assert response.status_code == 200
    assert len(response.json()["restaurants"]) == len(recommender.catalog)


@pytest.mark.parametrize(
    "point",
    [
        "latitude=90&longitude=180",
        "latitude=-90&longitude=-180",
        "latitude=0&longitude=180",
        "latitude=89.9999&longitude=-179.9999",
    ],
)
@pytest.mark.parametrize("max_dis", ["1e-300", "1", "5000", "2e7", "1e308"])
@pytest.mark.parametrize("sort_dis", ["0", "1"])
def test_extreme_points_and_radii_are_answered(
    client: Client, point: str, max_dis: str, sort_dis: str
) -> None:
    response = client.get(f"/recommend/{USER}?{point}&max_dis={max_dis}&sort_dis={sort_dis}")

    assert response.status_code == 200


@pytest.mark.parametrize("name", ["latitude", "longitude"])
@pytest.mark.parametrize("value", ["absent", "", "nan"])
def test_a_missing_coordinate_is_refused_naming_it(client: Client, name: str, value: str) -> None:
    given = {"latitude": "13.8", "longitude": "100.5"}
    if value == "absent":
        del given[name]
    else:
        given[name] = value

    response = client.get(f"/recommend/{USER}", params=given)

    _assert_refused(response, name)


BAD_QUERY_VALUES = [
    ("latitude", "90.5"),
    ("latitude", "inf"),
    ("latitude", "north"),
    ("longitude", "-180.5"),
    ("longitude", "1e999"),
    ("size", "2.5"),
    ("size", "0"),
    ("size", "-1"),
    ("size", "1001"),
    ("size", "inf"),
    ("size", "1e999"),
    ("size", "true"),
    ("size", "twenty"),
    ("max_dis", "0"),
    ("max_dis", "-5000"),
    ("max_dis", "inf"),
    ("max_dis", "1e999"),
    ("max_dis", "far"),
    ("sort_dis", "2"),
    ("sort_dis", "0.5"),
    ("sort_dis", "-1"),
    ("sort_dis", "yes"),
]


@pytest.mark.parametrize(("name", "value"), BAD_QUERY_VALUES)
def test_get_refuses_a_bad_query_value_naming_the_parameter(
    client: Client, name: str, value: str
) -> None:
    given = {"latitude": "13.8", "longitude": "100.5", name: value}

    _assert_refused(client.get(f"/recommend/{USER}", params=given), name)


@pytest.mark.parametrize(("name", "value"), BAD_QUERY_VALUES)
def test_post_refuses_a_bad_query_value_naming_the_parameter(
    client: Client, name: str, value: str
) -> None:
    given = {"latitude": "13.8", "longitude": "100.5", name: value}

    _assert_refused(client.post(f"/recommend/{USER}", params=given), name)


BAD_BODY_VALUES = [
    ("latitude", True),
    ("latitude", [13.8]),
    ("latitude", {"degrees": 13.8}),
    ("longitude", 180.5),
    ("size", 2.5),
    ("size", 0),
    ("size", False),
    ("size", [20]),
    ("size", 10**30),
    ("max_dis", -1),
    ("max_dis", "far"),
    ("sort_dis", 2),
    ("sort_dis", True),
]


@pytest.mark.parametrize(("name", "value"), BAD_BODY_VALUES)
def test_post_refuses_a_bad_body_value_naming_the_parameter(
    client: Client, name: str, value: object
) -> None:
    response = client.post(f"/recommend/{USER}", json=POINT_BODY | {name: value})

    _assert_refused(response, name)


@pytest.mark.parametrize(
    "token", ["Infinity", "-Infinity", "1e999"], ids=["inf", "minus-inf", "overflow"]
)
def test_post_refuses_infinite_json_numbers(client: Client, token: str) -> None:
    body = f'{{"latitude": 13.8, "longitude": 100.5, "max_dis": {token}}}'

    _assert_refused(client.post(f"/recommend/{USER}", content=body), "max_dis")


@pytest.mark.parametrize("name", PARAMETERS)
def test_a_parameter_repeated_in_the_query_string_is_refused(client: Client, name: str) -> None:
    values = {
        "latitude": "13.8",
        "longitude": "100.5",
        "size": "3",
        "max_dis": "9",
        "sort_dis": "1",
    }
    query = "&".join(f"{key}={value}" for key, value in values.items())

    response = client.get(f"/recommend/{USER}?{query}&{name}={values[name]}")

    _assert_refused(response, name)


def test_a_refusal_says_what_is_allowed(client: Client) -> None:
    response = client.get(f"/recommend/{USER}?{POINT}&size=2.5")

    assert response.json() == {
        "detail": "size must be a whole number from 1 to 1000; got '2.5'",
        "parameter": "size",
    }


def test_unknown_query_parameters_are_ignored(client: Client) -> None:
    response = client.get(f"/recommend/{USER}?{POINT}&size=3&cache_buster=123")

    assert response.status_code == 200
    assert response.content == client.get(f"/recommend/{USER}?{POINT}&size=3").content


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_an_unknown_user_is_a_404_naming_the_user(client: Client, method: str) -> None:
    response = client.request(method, f"/recommend/u999999?{POINT}")

    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"detail": "unknown user", "user_id": "u999999"}


@pytest.mark.parametrize(
    "path",
    [
        "/recommend/%22u001%22",
        "/recommend/u001%27%20OR%20%271%27=%271",
        "/recommend/%C3%BC%F0%9F%8D%9C",
        "/recommend/a%2Fb",
        "/recommend/..%2F..%2Fetc%2Fpasswd",
        "/recommend/%00",
        "/recommend/%FF%FE",
        "/recommend/%ED%A0%80",
        "/recommend/%20",
        "/recommend/u001%3Flatitude=1",
        "/recommend/" + "u" * 256,
    ],
)
def test_odd_user_ids_get_a_4xx_with_a_json_body(client: Client, path: str) -> None:
    response = client.get(f"{path}?{POINT}")

    assert 400 <= response.status_code < 500
    assert response.headers["content-type"] == "application/json"
    assert "detail" in response.json()


def test_a_user_id_over_256_characters_is_refused(client: Client) -> None:
    response = client.get(f"/recommend/{'u' * 257}?{POINT}")

    _assert_refused(response, "user_id")


@pytest.mark.parametrize(
    "body",
    [b"{", b'{"latitude": 13.8,}', b"latitude=13.8", b"\xff\xfe\x00", b"[" * 5000],
    ids=["truncated", "trailing-comma", "form", "not-utf8", "deeply-nested"],
)
def test_a_malformed_json_body_is_a_4xx_with_a_json_body(client: Client, body: bytes) -> None:
    response = client.post(f"/recommend/{USER}?{POINT}", content=body)

    _assert_refused(response, "body")


@pytest.mark.parametrize(
    "body", [b"[]", b'[{"latitude": 13.8}]', b'"x"', b"13.8", b"null", b"true"]
)
def test_a_json_body_that_is_not_an_object_is_a_4xx_with_a_json_body(
    client: Client, body: bytes
) -> None:
    response = client.post(f"/recommend/{USER}?{POINT}", content=body)

    _assert_refused(response, "body")


def test_a_body_over_16_kib_is_a_4xx_with_a_json_body(client: Client) -> None:
    body = json.dumps(POINT_BODY).encode().ljust(16 * 1024 + 1)

    response = client.post(f"/recommend/{USER}", content=body)

    _assert_refused(response, "body")


def test_a_body_of_exactly_16_kib_is_accepted(client: Client) -> None:
    body = json.dumps(POINT_BODY).encode().ljust(16 * 1024)

    response = client.post(f"/recommend/{USER}", content=body)

    assert response.status_code == 200


def test_an_empty_body_means_no_body_parameters(client: Client) -> None:
    response = client.post(f"/recommend/{USER}?{POINT}", content=b"")

    assert response.status_code == 200


QUERY_VALUES = st.one_of(
    st.text(max_size=30),
    st.floats().map(str),
    st.integers().map(str),
    st.sampled_from(["", "nan", "1.0", "50.0", "-0", "1e999", "13.8", "100.5"]),
)


@settings(max_examples=150, deadline=None)
@given(
    user_id=st.one_of(st.just(USER), st.text(min_size=1, max_size=300)),
    parameters=st.dictionaries(st.sampled_from(PARAMETERS), QUERY_VALUES),
)
def test_no_query_a_client_sends_gets_a_5xx(
    client: Client, user_id: str, parameters: dict[str, str]
) -> None:
    response = client.get(f"/recommend/{quote(user_id, safe='')}", params=parameters)

    # An id ending in an encoded slash is redirected (307) to the path without it.
    assert response.status_code < 500


BODY_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=30),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=150, deadline=None)
@given(body=st.dictionaries(st.sampled_from([*PARAMETERS, "other"]), BODY_VALUES))
def test_no_json_body_a_client_sends_gets_a_5xx(client: Client, body: dict[str, object]) -> None:
    response = client.post(f"/recommend/{USER}", content=json.dumps(body))

    assert response.status_code in (200, 422)
    assert response.headers["content-type"] == "application/json"


def test_healthz_answers_ok(client: Client) -> None:
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_reports_the_embedded_store_ready_with_what_was_loaded(
    client: Client, recommender: Recommender
) -> None:
    response = client.get("/readyz")

    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "store": "ok",
        "restaurants": len(recommender.catalog),
        "users": recommender.store.n_users,
    }


def test_openapi_documents_get_and_post_of_the_recommend_route(client: Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]

    assert set(paths["/recommend/{user_id}"]) == {"get", "post"}


@pytest.mark.parametrize("method", ["get", "post"])
def test_openapi_documents_every_parameter_of_the_recommend_route(
    client: Client, method: str
) -> None:
    operation = client.get("/openapi.json").json()["paths"]["/recommend/{user_id}"][method]

    places = {parameter["name"]: parameter["in"] for parameter in operation["parameters"]}
    assert places == {"user_id": "path"} | {name: "query" for name in PARAMETERS}
    assert all(parameter.get("description") for parameter in operation["parameters"])


def test_openapi_documents_the_post_body_parameters(client: Client) -> None:
    operation = client.get("/openapi.json").json()["paths"]["/recommend/{user_id}"]["post"]

    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert set(schema["properties"]) == set(PARAMETERS)


def test_openapi_documents_the_answer_and_error_statuses(client: Client) -> None:
    operation = client.get("/openapi.json").json()["paths"]["/recommend/{user_id}"]["get"]

    assert {"200", "404", "422"} <= set(operation["responses"])
    answer = operation["responses"]["200"]["content"]["application/json"]["schema"]
    item = answer["properties"]["restaurants"]["items"]
    assert set(item["required"]) == {"id", "difference", "displacement"}


def test_a_body_repeating_a_key_is_refused(client: Client) -> None:
    body = '{"latitude": 13.75, "longitude": 100.5, "size": 1, "size": 2}'

    response = client.post(f"/recommend/{USER}", content=body)

    assert response.status_code == 422
    assert "size is given more than once" in response.json()["detail"]


def test_a_nan_query_value_does_not_conflict_with_the_body(client: Client) -> None:
    response = client.post(
        f"/recommend/{USER}?size=nan",
        content='{"latitude": 13.75, "longitude": 100.5, "size": 2}',
    )

    assert response.status_code == 200
    assert len(response.json()["restaurants"]) <= 2


def test_a_long_bad_value_is_echoed_only_in_part(client: Client) -> None:
    body = json.dumps({"latitude": ["x" * 5000], "longitude": 100.5})

    response = client.post(f"/recommend/{USER}", content=body)

    assert response.status_code == 422
    assert len(response.json()["detail"]) < 300


@pytest.mark.parametrize(
    ("target", "part"),
    [
        ("/recommend/" + "u" * 5000 + "?latitude=1&longitude=1", "path"),
        ("/recommend/u1?latitude=1&longitude=1&pad=" + "x" * 3000, "query"),
        ("/healthz?" + "x" * 3000, "query"),
    ],
)
def test_an_oversized_path_or_query_is_refused_with_414_naming_it(
    client: Client, target: str, part: str
) -> None:
    response = client.get(target)

    assert response.status_code == 414
    assert response.json()["parameter"] == part
    assert "at most" in response.json()["detail"]


@pytest.mark.parametrize("method", ["DELETE", "PUT", "PATCH"])
def test_a_method_not_allowed_names_every_allowed_method(client: Client, method: str) -> None:
    response = client.request(method, f"/recommend/{USER}?{POINT}")

    assert response.status_code == 405
    assert {name.strip() for name in response.headers["Allow"].split(",")} >= {"GET", "POST"}


def test_the_longest_user_id_of_multibyte_characters_is_looked_up_not_refused(
    client: Client,
) -> None:
    user_id = "\N{GRINNING FACE}" * 256

    response = client.get(f"/recommend/{quote(user_id)}?{POINT}")

    assert response.status_code == 404
    assert response.json()["user_id"] == user_id


@pytest.mark.parametrize("user_id", ["a\x00b", "new\nline", "tab\there", "del\x7f"])
def test_a_user_id_with_control_characters_is_refused_naming_user_id(
    client: Client, user_id: str
) -> None:
    response = client.get(f"/recommend/{quote(user_id)}?{POINT}")

    assert response.status_code == 422
    assert response.json()["parameter"] == "user_id"


def test_an_unexpected_error_is_a_json_500_with_a_request_id(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    recommender = load_recommender(settings)

    async def broken(user_id: str) -> None:
        raise RuntimeError("disk on fire")

    recommender.store.features = broken
    client = Client(create_app(recommender))

    with caplog.at_level(logging.ERROR, logger="recommender.request"):
        response = client.get(f"/recommend/{USER}?{POINT}", headers={"X-Request-ID": "trace-me"})

    assert response.status_code == 500
    assert response.json() == {"detail": "internal error"}
    assert response.headers["X-Request-ID"] == "trace-me"
    assert "X-Model-SHA256" in response.headers
    assert any("trace-me" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_probes_answer_head_as_get_without_a_body(client: Client, path: str) -> None:
    response = client.request("HEAD", path)

    assert response.status_code == 200
    assert response.content == b""
