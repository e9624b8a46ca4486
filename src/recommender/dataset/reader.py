"""Reading and validating the data directory: restaurants and user features."""

import hashlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

RESTAURANT_FILE = "restaurant.parquet"
USER_FILE = "user.parquet"
MODEL_FILE = "model.pkl"
SKOPS_MODEL_FILE = "model.skops"
RESTAURANT_COLUMNS = ("restaurant_id", "index", "latitude", "longitude")
EXAMPLES_SHOWN = 5
# Larger values overflow float64 once squared, so no metric could compare them.
MAX_FEATURE_MAGNITUDE = 1e150


class DataError(ValueError):
    """A data file that cannot be used as a whole (missing, wrong schema, wrong shape)."""


@dataclass
class Skipped:
    """Rows left out of a data file for one reason, with a few of their identifiers."""

    file: str
    reason: str
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, identifiers: list[str]) -> None:
        """Count ``identifiers`` as skipped and keep the first few as examples."""
        self.count += len(identifiers)
        room = EXAMPLES_SHOWN - len(self.examples)
        self.examples.extend(identifiers[:room])

    def __str__(self) -> str:
        shown = ", ".join(self.examples)
        more = "" if self.count <= len(self.examples) else ", ..."
        return f"{self.file}: skipped {self.count} rows ({self.reason}): {shown}{more}"


@dataclass(frozen=True)
class RestaurantTable:
    """Restaurants that passed validation.

    Attributes
    ----------
    ids : ndarray of shape (n_restaurants,), dtype object (str)
    rows : ndarray of shape (n_restaurants,), dtype int64
        The restaurant's row in the model's embeddings.
    latitude, longitude : ndarray of shape (n_restaurants,), dtype float64
        WGS-84 degrees.
    """

    ids: np.ndarray
    rows: np.ndarray
    latitude: np.ndarray
    longitude: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a file's bytes."""
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def data_sha256(restaurant_sha256: str, user_sha256: str) -> str:
    """The data version: one SHA-256 naming the restaurant and user files' contents.

    The same files give the same version whichever store serves them.
    """
    named = f"{RESTAURANT_FILE} {restaurant_sha256}\n{USER_FILE} {user_sha256}\n"
    return hashlib.sha256(named.encode()).hexdigest()


def read_restaurants(path: Path, n_model_rows: int) -> tuple[RestaurantTable, list[Skipped]]:
    """Read ``restaurant.parquet``, skipping rows that cannot be served.

    Coordinates may be stored as numbers or as strings. Rows whose coordinates do not parse
    or lie outside [-90, 90] x [-180, 180], whose ``index`` is not a row of the model
    (``0 <= index < n_model_rows``), whose id is missing, or whose id repeats an earlier row
    are skipped and reported.
    """
    table = _read_table(path, RESTAURANT_COLUMNS)
    ids = np.array(_column(path, table, "restaurant_id", _as_strings), dtype=object)
    rows = _column(path, table, "index", _as_row_numbers)
    latitude = _column(path, table, "latitude", _as_floats)
    longitude = _column(path, table, "longitude", _as_floats)

    missing_id = np.array([value is None or not value.strip() for value in ids], dtype=bool)
    bad_coordinates = ~(
        np.isfinite(latitude)
        & np.isfinite(longitude)
        & (np.abs(latitude) <= 90)
        & (np.abs(longitude) <= 180)
    )
    bad_row = ~((rows >= 0) & (rows < n_model_rows))

    checks = [
        (lambda keep: missing_id, "restaurant_id is missing"),
        (lambda keep: bad_coordinates, "latitude/longitude missing, not a number or out of range"),
        (lambda keep: bad_row, f"index is not a row of the model (0..{n_model_rows - 1})"),
        # Only rows that passed every other check count: the first servable row of an id wins.
        (lambda keep: _repeats(ids, keep), "restaurant_id repeats an earlier row"),
    ]
    keep = np.ones(len(ids), dtype=bool)
    skipped = []
    for check, reason in checks:
        bad = check(keep) & keep
        if bad.any():
            report = Skipped(path.name, reason)
            report.add([_describe_row(ids, position) for position in np.flatnonzero(bad)])
            skipped.append(report)
            keep &= ~bad

    restaurants = RestaurantTable(
        ids=ids[keep],
        rows=rows[keep].astype(np.int64),
        latitude=latitude[keep],
        longitude=longitude[keep],
    )
    return restaurants, skipped


def check_model_rows(n_model_rows: int, restaurant_file: Path) -> None:
    """Refuse a model that does not hold one embedding per row of ``restaurant.parquet``."""
    n_rows = count_rows(restaurant_file)
    if n_rows != n_model_rows:
        raise DataError(
            f"{restaurant_file}: has {n_rows} rows but the model holds {n_model_rows} "
            "restaurant embeddings; the model must be fitted on this restaurant file"
        )


@dataclass(frozen=True)
class UserBatch:
    """A slice of ``user.parquet``: ids and their features, before any row is checked.

    ``features`` has shape (n_rows, n_features) and the file's float dtype; missing values
    are NaN.
    """

    ids: list[str | None]
    features: np.ndarray


def user_feature_dtype(path: Path, n_features: int) -> np.dtype:
    """The dtype prepared features keep: float32 if every feature column is, else float64."""
    schema = _user_schema(path, n_features)
    types = {schema.field(name).type for name in feature_columns(n_features)}
    return np.dtype(np.float32) if types == {pa.float32()} else np.dtype(np.float64)


def count_rows(path: Path) -> int:
    """Number of rows in a Parquet file (from its metadata, without reading the rows)."""
    _read_schema(path)
    return pq.ParquetFile(path).metadata.num_rows


def iter_user_batches(path: Path, n_features: int, batch_size: int = 8192) -> Iterator[UserBatch]:
    """Stream ``user.parquet`` in batches of at most ``batch_size`` rows.

    Raises
    ------
    DataError
        If the file is missing, has no ``user_id`` column, or its feature columns are not
        exactly ``feature_0`` .. ``feature_{n_features - 1}`` of a numeric type.
    """
    _user_schema(path, n_features)
    dtype = user_feature_dtype(path, n_features)
    columns = ["user_id", *feature_columns(n_features)]
    try:
        yield from _user_batches(path, columns, dtype, batch_size)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: cannot read the rows ({error})") from error


def _user_batches(
    path: Path, columns: list[str], dtype: np.dtype, batch_size: int
) -> Iterator[UserBatch]:
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns):
        ids = _as_strings(batch.column(0))
        features = batch.drop_columns(["user_id"]).to_tensor(null_to_nan=True, row_major=True)
        yield UserBatch(ids=ids, features=np.asarray(features).astype(dtype, copy=False))


@dataclass
class UserChecks:
    """User rows left out while streaming ``user.parquet``, by reason."""

    file: str
    missing_id: Skipped = field(init=False)
    not_finite: Skipped = field(init=False)
    repeated_id: Skipped = field(init=False)

    def __post_init__(self) -> None:
        self.missing_id = Skipped(self.file, "user_id is missing")
        self.not_finite = Skipped(
            self.file,
            f"features missing, not finite, or of magnitude {MAX_FEATURE_MAGNITUDE:g} or more",
        )
        self.repeated_id = Skipped(self.file, "user_id repeats an earlier row")

    def reports(self) -> list[Skipped]:
        """The reasons that skipped at least one row."""
        return [r for r in (self.missing_id, self.not_finite, self.repeated_id) if r.count]


def usable_rows(features: np.ndarray) -> np.ndarray:
    """Rows, shape (n,) bool, whose values are all finite and below ``MAX_FEATURE_MAGNITUDE``."""
    usable = np.isfinite(features).all(axis=1)
    if features.dtype.itemsize > 4:  # a float32 can never reach the magnitude limit
        usable &= (np.abs(features) < MAX_FEATURE_MAGNITUDE).all(axis=1)
    return usable


def iter_valid_users(
    path: Path, n_features: int, checks: UserChecks, batch_size: int = 8192
) -> Iterator[tuple[UserBatch, int]]:
    """Stream the rows of ``user.parquet`` that can be served, with the rows read so far.

    Rows with a missing id, a missing or non-finite feature, or an id repeating an earlier
    row are left out and counted in ``checks``.
    """
    seen: set[str] = set()
    read = 0
    for batch in iter_user_batches(path, n_features, batch_size):
        finite = usable_rows(batch.features)
        keep = np.zeros(len(batch.ids), dtype=bool)
        kept_ids = []
        for position, identifier in enumerate(batch.ids):
            row = read + position
            if identifier is None or not identifier.strip():
                checks.missing_id.add([f"row {row}"])
            elif not finite[position]:
                checks.not_finite.add([f"{identifier!r} (row {row})"])
            elif identifier in seen:
                checks.repeated_id.add([f"{identifier!r} (row {row})"])
            else:
                keep[position] = True
                kept_ids.append(identifier)
                seen.add(identifier)
        read += len(batch.ids)
        yield UserBatch(ids=kept_ids, features=batch.features[keep]), read


def feature_columns(n_features: int) -> list[str]:
    """The names ``feature_0`` .. ``feature_{n_features - 1}``."""
    return [f"feature_{i}" for i in range(n_features)]


def _user_schema(path: Path, n_features: int) -> pa.Schema:
    schema = _read_schema(path)
    repeated = sorted({name for name in schema.names if schema.names.count(name) > 1})
    if repeated:
        raise DataError(f"{path}: columns appear more than once: {_preview(repeated)}")
    if "user_id" not in schema.names:
        raise DataError(f"{path}: no user_id column; found {_preview(schema.names)}")

    present = [name for name in schema.names if name.startswith("feature_")]
    expected = feature_columns(n_features)
    if set(present) != set(expected):
        missing = [name for name in expected if name not in set(present)]
        unexpected = [name for name in present if name not in set(expected)]
        raise DataError(
            f"{path}: has {len(present)} feature columns but the model expects {n_features} "
            f"(feature_0 .. feature_{n_features - 1}); missing: {_preview(missing) or 'none'}; "
            f"unexpected: {_preview(unexpected) or 'none'}"
        )
    not_numeric = [
        name
        for name in expected
        if not (
            pa.types.is_floating(schema.field(name).type)
            or pa.types.is_integer(schema.field(name).type)
        )
    ]
    if not_numeric:
        raise DataError(
            f"{path}: feature columns must be numeric; not numeric: {_preview(not_numeric)}"
        )
    return schema


def _read_schema(path: Path) -> pa.Schema:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable Parquet file ({error})") from error


def _read_table(path: Path, columns: tuple[str, ...]) -> pa.Table:
    schema = _read_schema(path)
    missing = [name for name in columns if name not in schema.names]
    if missing:
        raise DataError(
            f"{path}: missing columns {missing}; expected {list(columns)}, "
            f"found {_preview(schema.names)}"
        )
    try:
        return pq.read_table(path, columns=list(columns))
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: cannot read the rows ({error})") from error


def _as_strings(column: pa.ChunkedArray | pa.Array) -> list[str | None]:
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        column = column.cast(pa.string())
    return column.to_pylist()


def _column(path: Path, table: pa.Table, name: str, convert):
    """``convert`` applied to one column, any failure reported as the file's fault."""
    column = table.column(name)
    try:
        return convert(column)
    except (pa.ArrowException, ValueError, TypeError) as error:
        raise DataError(
            f"{path}: column {name!r} of type {column.type} cannot be read ({error})"
        ) from error


def _as_floats(column: pa.ChunkedArray) -> np.ndarray:
    if pa.types.is_floating(column.type) or pa.types.is_integer(column.type):
        # Integers too large for a float64 become huge floats, which fail the range checks.
        return column.cast(pa.float64(), safe=False).fill_null(math.nan).to_numpy()
    return np.array([_parse_float(value) for value in _as_strings(column)], dtype=np.float64)


_DECIMAL = re.compile(r"\s*[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\s*")


def _parse_float(value: str | None) -> float:
    """A plain decimal number (ASCII digits only), else NaN."""
    if value is None or not _DECIMAL.fullmatch(value):
        return math.nan
    return float(value)


def _as_row_numbers(column: pa.ChunkedArray) -> np.ndarray:
    values = _as_floats(column)
    usable = np.isfinite(values) & (values == np.floor(values)) & (np.abs(values) < 2**62)
    return np.where(usable, values, -1).astype(np.int64)


def _repeats(ids: np.ndarray, considered: np.ndarray) -> np.ndarray:
    seen: set[str] = set()
    repeated = np.zeros(len(ids), dtype=bool)
    for position, identifier in enumerate(ids):
        if identifier is None or not considered[position]:
            continue
        if identifier in seen:
            repeated[position] = True
        seen.add(identifier)
    return repeated


def _describe_row(ids: np.ndarray, position: int) -> str:
    identifier = ids[position]
    return f"row {position}" if identifier is None else f"{identifier!r} (row {position})"


def _preview(names: list[str]) -> str:
    shown = ", ".join(names[:EXAMPLES_SHOWN])
    return shown + (", ..." if len(names) > EXAMPLES_SHOWN else "")
