"""Request parameters are validated into a query, leniently for the number shapes clients send."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recommender.contract import (
    MAX_USER_ID_LENGTH,
    PARAMETERS,
    Limits,
    ParameterError,
    check_user_id,
    parse_query,
    render,
)
from recommender.ranking import Query, Ranking

LIMITS = Limits()
POINT = {"latitude": 13.75, "longitude": 100.5}
NOT_GIVEN = {
    "empty": "",
    "blank": "  ",
    "nan": "nan",
    "NaN": "NaN",
    "NAN": "NAN",
    "nAn": "nAn",
    "minus-nan": "-nan",
    "plus-NaN": "+NaN",
    "spaced-nan": " nan ",
    "null": None,
    "float-nan": math.nan,
}
RULES = {
    "latitude": "-90 to 90",
    "longitude": "-180 to 180",
    "size": "1 to 1000",
    "max_dis": "positive",
    "sort_dis": "0 (order by difference) or 1",
}


def _parse(**raw: object) -> Query:
    return parse_query({**POINT, **raw}, LIMITS)


def _refusal(**raw: object) -> ParameterError:
    with pytest.raises(ParameterError) as caught:
        parse_query({**POINT, **raw}, LIMITS)
    return caught.value


def test_only_latitude_and_longitude_give_the_defaults() -> None:
    query = parse_query({"latitude": "13.75", "longitude": "100.5"}, LIMITS)

    assert query == Query(
        latitude=13.75, longitude=100.5, size=20, max_dis=5000.0, sort_by_displacement=False
    )


@pytest.mark.parametrize("latitude", [-90, 90, "-90", "90.0", 0, "-0", 13.75, "1.375e1"])
def test_latitude_accepts_every_finite_number_from_minus_90_to_90(latitude: object) -> None:
    assert _parse(latitude=latitude).latitude == float(latitude)


@pytest.mark.parametrize("longitude", [-180, 180, "-180.0", "180", 100.5, " 100.5 "])
def test_longitude_accepts_every_finite_number_from_minus_180_to_180(longitude: object) -> None:
    assert _parse(longitude=longitude).longitude == float(longitude)


@pytest.mark.parametrize(
    ("raw", "size"),
    [("1", 1), ("50", 50), ("50.0", 50), (50.0, 50), ("5e1", 50), (" 50 ", 50), (1000, 1000)],
)
def test_size_accepts_whole_numbers_written_as_integers_or_floats(raw: object, size: int) -> None:
    query = _parse(size=raw)

    assert query.size == size
    assert isinstance(query.size, int)


@pytest.mark.parametrize(
    ("raw", "max_dis"),
    [("10000", 10000.0), ("10000.0", 10000.0), (10000.0, 10000.0), (1, 1.0), ("0.5", 0.5)],
)
def test_max_dis_accepts_positive_metres_as_integers_or_floats(raw: object, max_dis: float) -> None:
    assert _parse(max_dis=raw).max_dis == max_dis


@pytest.mark.parametrize("max_dis", ["1e7", 40_075_000, "1e300", 1.7e308])
def test_max_dis_has_no_upper_bound(max_dis: object) -> None:
    assert _parse(max_dis=max_dis).max_dis == float(max_dis)


@pytest.mark.parametrize("sort_dis", [1, 1.0, "1", "1.0", " 1 ", "1e0"])
def test_sort_dis_of_one_orders_by_displacement(sort_dis: object) -> None:
    assert _parse(sort_dis=sort_dis).sort_by_displacement is True


@pytest.mark.parametrize("sort_dis", [0, 0.0, "0", "0.0", "-0"])
def test_sort_dis_of_zero_orders_by_difference(sort_dis: object) -> None:
    assert _parse(sort_dis=sort_dis).sort_by_displacement is False


@pytest.mark.parametrize("value", NOT_GIVEN.values(), ids=NOT_GIVEN.keys())
def test_empty_null_or_nan_size_takes_the_default(value: object) -> None:
    assert _parse(size=value).size == LIMITS.default_size


@pytest.mark.parametrize("value", NOT_GIVEN.values(), ids=NOT_GIVEN.keys())
def test_empty_null_or_nan_max_dis_takes_the_default(value: object) -> None:
    assert _parse(max_dis=value).max_dis == LIMITS.default_max_dis


@pytest.mark.parametrize("value", NOT_GIVEN.values(), ids=NOT_GIVEN.keys())
def test_empty_null_or_nan_sort_dis_orders_by_difference(value: object) -> None:
    assert _parse(sort_dis=value).sort_by_displacement is False


def test_a_request_row_with_nan_floats_parses_like_a_client_sends_it() -> None:
    row = {"latitude": 13.79, "longitude": 100.43, "size": 50, "sort_dis": math.nan}
    row["max_dis"] = 10000.0

    from_floats = parse_query(row, LIMITS)
    from_text = parse_query({name: str(value) for name, value in row.items()}, LIMITS)

    assert from_floats == from_text == Query(13.79, 100.43, 50, 10000.0, False)


def test_limits_set_the_defaults() -> None:
    limits = Limits(default_size=7, max_size=50, default_max_dis=250.0)

    query = parse_query(POINT, limits)

    assert (query.size, query.max_dis) == (7, 250.0)


def test_limits_set_the_largest_size() -> None:
    limits = Limits(max_size=50)

    assert parse_query({**POINT, "size": 50}, limits).size == 50
    with pytest.raises(ParameterError, match="1 to 50"):
        parse_query({**POINT, "size": 51}, limits)


@pytest.mark.parametrize("name", ["latitude", "longitude"])
@pytest.mark.parametrize("value", ["", "  ", None], ids=["empty", "blank", "null"])
def test_empty_or_null_coordinates_are_refused_as_required(name: str, value: object) -> None:
    error = _refusal(**{name: value})

    assert error.parameter == name
    assert "required" in error.message


@pytest.mark.parametrize("name", ["latitude", "longitude"])
@pytest.mark.parametrize("value", ["nan", "NaN", math.nan], ids=["nan", "NaN", "float-nan"])
def test_nan_coordinates_are_refused_as_required_like_missing_ones(
    name: str, value: object
) -> None:
    error = _refusal(**{name: value})

    assert error.parameter == name
    assert "required" in error.message


@pytest.mark.parametrize("name", ["latitude", "longitude"])
def test_a_missing_coordinate_is_refused_as_required(name: str) -> None:
    raw = {key: value for key, value in POINT.items() if key != name}

    with pytest.raises(ParameterError, match=f"{name} is required") as caught:
        parse_query(raw, LIMITS)

    assert caught.value.parameter == name


OUT_OF_RANGE = [
    ("latitude", 90.000001),
    ("latitude", "-90.5"),
    ("latitude", 91),
    ("longitude", 180.000001),
    ("longitude", "-181"),
    ("size", 0),
    ("size", "0.0"),
    ("size", "-1"),
    ("size", 1001),
    ("size", "1e4"),
    ("max_dis", 0),
    ("max_dis", "0.0"),
    ("max_dis", "-0"),
    ("max_dis", -5000.0),
    ("sort_dis", 2),
    ("sort_dis", "-1"),
    ("sort_dis", "2.0"),
]
NOT_WHOLE = [
    ("size", "2.5"),
    ("size", 2.5),
    ("size", "20.5"),
    ("sort_dis", "0.5"),
    ("sort_dis", 0.5),
]
NOT_FINITE = [
    (name, value)
    for name in PARAMETERS
    for value in ("inf", "-inf", "Infinity", "1e999", "-1e999", math.inf, -math.inf, 10**400)
]
NOT_NUMBERS = [
    (name, value)
    for name in PARAMETERS
    for value in (
        "abc",
        "12abc",
        "0x10",
        "1_000",
        "1,5",
        "1.2.3",
        "e5",
        "--1",
        "true",
        True,
        False,
        [1],
        [],
        {"value": 1},
        (1,),
    )
]
# Arabic-Indic, fullwidth and Devanagari one: digits to Python's float(), text to a client.
NOT_ASCII_DIGITS = ["\u0661", "\uff11", "\u0967"]


@pytest.mark.parametrize(("name", "value"), OUT_OF_RANGE)
def test_numbers_outside_the_allowed_range_are_refused(name: str, value: object) -> None:
    assert _refusal(**{name: value}).parameter == name


@pytest.mark.parametrize(("name", "value"), NOT_WHOLE)
def test_fractions_are_refused_where_a_whole_number_is_needed(name: str, value: object) -> None:
    assert _refusal(**{name: value}).parameter == name


@pytest.mark.parametrize(("name", "value"), NOT_FINITE)
def test_infinite_and_overflowing_numbers_are_refused(name: str, value: object) -> None:
    assert _refusal(**{name: value}).parameter == name


@pytest.mark.parametrize(("name", "value"), NOT_NUMBERS)
def test_text_booleans_and_containers_are_refused(name: str, value: object) -> None:
    assert _refusal(**{name: value}).parameter == name


@pytest.mark.parametrize("value", NOT_ASCII_DIGITS, ids=["arabic-indic", "fullwidth", "devanagari"])
def test_digits_outside_ascii_are_refused(value: str) -> None:
    assert _refusal(size=value).parameter == "size"


@pytest.mark.parametrize(("name", "value"), [(name, "far") for name in PARAMETERS])
def test_a_refusal_says_what_the_parameter_allows_and_what_it_got(name: str, value: str) -> None:
    message = _refusal(**{name: value}).message

    assert message.startswith(name)
    assert RULES[name] in message
    assert "'far'" in message


def test_a_refusal_does_not_echo_a_long_value_in_full() -> None:
    message = _refusal(size="x" * 10_000).message

    assert len(message) < 200


def test_the_first_bad_parameter_is_named() -> None:
    error = _refusal(latitude="north", size="many")

    assert error.parameter == "latitude"


def test_a_user_id_of_the_longest_allowed_length_passes() -> None:
    check_user_id("u" * MAX_USER_ID_LENGTH)


def test_a_user_id_over_256_characters_is_refused() -> None:
    with pytest.raises(ParameterError, match="256") as caught:
        check_user_id("u" * (MAX_USER_ID_LENGTH + 1))

    assert caught.value.parameter == "user_id"


NUMERIC_TEXT = st.from_regex(r"\A\s?[+-]?(\d{1,4}(\.\d{0,3})?|\.\d{1,3})([eE][+-]?\d{1,3})?\s?\Z")
VALUES = st.one_of(
    st.none(),
    st.text(max_size=80),
    NUMERIC_TEXT,
    st.sampled_from(["", "nan", "NaN", "inf", "1e999", "-0", "1.0"]),
    st.integers(),
    st.integers(min_value=10**300),
    st.floats(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
)
RAW_PARAMETERS = st.dictionaries(st.sampled_from(PARAMETERS), VALUES)


@settings(max_examples=500, deadline=None)
@given(raw=RAW_PARAMETERS)
def test_any_values_give_a_valid_query_or_a_parameter_error(raw: dict[str, object]) -> None:
    try:
        query = parse_query(raw, LIMITS)
    except ParameterError as error:
        assert error.parameter in PARAMETERS
        assert error.message.startswith(error.parameter)
        return

    assert -90 <= query.latitude <= 90
    assert -180 <= query.longitude <= 180
    assert isinstance(query.size, int) and 1 <= query.size <= LIMITS.max_size
    assert math.isfinite(query.max_dis) and query.max_dis > 0
    assert isinstance(query.sort_by_displacement, bool)


def _ranking(ids: list[str], difference: list[float], displacement: list[int]) -> Ranking:
    return Ranking(
        ids=ids,
        difference=np.array(difference, dtype=np.float64),
        displacement=np.array(displacement, dtype=np.int64),
        n_candidates=len(ids),
    )


def test_render_writes_restaurants_with_id_difference_and_displacement() -> None:
    ranking = _ranking(["r0042", "r0007"], [24.613, 30.5], [1830, 12])

    assert json.loads(render(ranking)) == {
        "restaurants": [
            {"id": "r0042", "difference": 24.613, "displacement": 1830},
            {"id": "r0007", "difference": 30.5, "displacement": 12},
        ]
    }


def test_render_writes_displacement_as_a_json_integer() -> None:
    body = render(_ranking(["r0042"], [24.613], [1830]))

    assert b'"displacement":1830}' in body


def test_render_keeps_every_digit_of_the_difference() -> None:
    difference = 6.612220870291139 + 1e-15

    body = render(_ranking(["r0042"], [difference], [1]))

    assert json.loads(body)["restaurants"][0]["difference"] == difference


def test_render_of_an_empty_ranking_is_an_empty_list() -> None:
    assert json.loads(render(_ranking([], [], []))) == {"restaurants": []}
