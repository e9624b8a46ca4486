"""The API's request parameters and response body, shared by HTTP and the command line.

Real clients send numbers in many shapes: ``size=50``, ``size=50.0``, ``max_dis=10000.0``,
``sort_dis=1.0``, and NaN or an empty value for "not given". Those are accepted; anything
else is refused with a message that names the parameter and what it allows.
"""

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

from recommender.ranking import Query, Ranking

PARAMETERS = ("latitude", "longitude", "size", "max_dis", "sort_dis")
MAX_VALUE_LENGTH = 64
MAX_USER_ID_LENGTH = 256
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
# No id in any store has them, and PostgreSQL refuses a NUL in text outright.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NOT_GIVEN = re.compile(r"[+-]?nan", re.IGNORECASE)


class ParameterError(ValueError):
    """A request parameter with a value the API does not accept."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.message = message


@dataclass(frozen=True)
class Limits:
    """Defaults and bounds that deployments may change."""

    default_size: int = 20
    max_size: int = 1000
    default_max_dis: float = 5000.0


def parse_query(raw: Mapping[str, object], limits: Limits) -> Query:
    """Validate raw parameter values (strings, numbers or None) into a ``Query``.

    Raises
    ------
    ParameterError
        Naming the first parameter whose value is not allowed.
    """
    latitude = _number(raw, "latitude", "a number from -90 to 90")
    if latitude is None or not -90 <= latitude <= 90:
        _refuse(raw, "latitude", "a number from -90 to 90")
    longitude = _number(raw, "longitude", "a number from -180 to 180")
    if longitude is None or not -180 <= longitude <= 180:
        _refuse(raw, "longitude", "a number from -180 to 180")

    size_rule = f"a whole number from 1 to {limits.max_size}"
    size = _number(raw, "size", size_rule)
    if size is None:
        size = limits.default_size
    elif size != int(size) or not 1 <= size <= limits.max_size:
        _refuse(raw, "size", size_rule)

    max_dis_rule = "a positive number of metres"
    max_dis = _number(raw, "max_dis", max_dis_rule)
    if max_dis is None:
        max_dis = limits.default_max_dis
    elif max_dis <= 0:
        _refuse(raw, "max_dis", max_dis_rule)

    sort_rule = "0 (order by difference) or 1 (order by displacement)"
    sort_dis = _number(raw, "sort_dis", sort_rule)
    if sort_dis is None:
        sort_dis = 0
    elif sort_dis not in (0, 1):
        _refuse(raw, "sort_dis", sort_rule)

    return Query(
        latitude=latitude,
        longitude=longitude,
        size=int(size),
        max_dis=float(max_dis),
        sort_by_displacement=sort_dis == 1,
    )


def check_user_id(user_id: str) -> None:
    """Refuse a user id too long to be one, before it is looked up anywhere."""
    if len(user_id) > MAX_USER_ID_LENGTH:
        raise ParameterError(
            "user_id", f"user_id must be at most {MAX_USER_ID_LENGTH} characters long"
        )
    if _CONTROL.search(user_id):
        raise ParameterError("user_id", "user_id must not contain control characters")


def render(ranking: Ranking) -> bytes:
    """The JSON response body for a ranking."""
    restaurants = [
        {"id": identifier, "difference": difference, "displacement": displacement}
        for identifier, difference, displacement in zip(
            ranking.ids, ranking.difference.tolist(), ranking.displacement.tolist(), strict=True
        )
    ]
    return orjson.dumps({"restaurants": restaurants})


def _number(raw: Mapping[str, object], name: str, rule: str) -> float | None:
    """The finite number given for ``name``, or None when it is absent, empty or NaN."""
    value = raw.get(name)
    if value is None:
        return None
    if isinstance(value, bool):
        _refuse(raw, name, rule)
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:
            _refuse(raw, name, rule)
    elif isinstance(value, str):
        text = value.strip()
        if text == "" or _NOT_GIVEN.fullmatch(text):
            return None
        if len(text) > MAX_VALUE_LENGTH or not _NUMBER.fullmatch(text):
            _refuse(raw, name, rule)
        number = float(text)
    else:
        _refuse(raw, name, rule)
    if math.isnan(number):
        return None
    if math.isinf(number):
        _refuse(raw, name, rule)
    return number


def is_given(value: object) -> bool:
    """Whether a raw parameter value counts as given (not absent, empty or NaN)."""
    return not _means_not_given(value)


def _means_not_given(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and (
        not value.strip() or bool(_NOT_GIVEN.fullmatch(value.strip()))
    )


def _refuse(raw: Mapping[str, object], name: str, rule: str):
    value = raw.get(name)
    if _means_not_given(value):
        raise ParameterError(name, f"{name} is required: {rule}")
    shown = repr(value)
    if len(shown) > MAX_VALUE_LENGTH:
        shown = shown[:MAX_VALUE_LENGTH] + "..."
    raise ParameterError(name, f"{name} must be {rule}; got {shown}")
