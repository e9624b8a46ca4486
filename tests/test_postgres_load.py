"""Loading a data directory into PostgreSQL: the schema, the bulk copy, the atomic swap, the
users tables kept per load, refusals.

Every test works in a fresh schema of its own (the ``database_url`` fixture), so loads of
different tests never see each other's tables.
"""

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import h3.api.basic_int as h3
import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SMALL
from psycopg import sql
from sqlalchemy import inspect
from sqlalchemy.engine import make_url

from recommender.dataset.reader import DataError, read_restaurants
from recommender.geo import FINE_RESOLUTION
from recommender.postgres.load import load_database
from recommender.postgres.schema import USERS, engine_for
from recommender.postgres.store import PostgresStore

RECOMMENDER = Path(sys.executable).with_name("recommender")
N_USERS = SMALL["n_users"]
N_RESTAURANTS = SMALL["n_restaurants"]
N_FEATURES = SMALL["n_features"]
FLOAT32 = pa.float32()
# Each batch of user.parquet is checked just before it is copied: a bad row past the first
# batch is met after rows have already gone into the database.
FIRST_BATCH = 8192
EXTRA_USERS = 20_000
RELOADS = 4
CONCURRENT_LOADS = 4
# Bounds on waiting, not expectations of speed.
COMMAND_TIMEOUT = 60.0
READ_TIMEOUT = 30.0


def _rows(url: str, query: str | sql.Composable) -> list[tuple]:
    with psycopg.connect(url) as connection:
        return connection.execute(query).fetchall()


def _inspect(url: str, look: Callable) -> object:
    engine = engine_for(url)
    try:
        with engine.connect() as connection:
            return look(inspect(connection))
    finally:
        engine.dispose()


def _table_names(url: str) -> set[str]:
    return _inspect(url, lambda inspector: set(inspector.get_table_names()))


def _view_names(url: str) -> set[str]:
    return _inspect(url, lambda inspector: set(inspector.get_view_names()))


def _live_tables(*load_ids: str) -> set[str]:
    """The tables a database holds after loads keeping the users of ``load_ids``."""
    return {"restaurants", "dataset", *(f"users_{load_id}" for load_id in load_ids)}


def _current_load_id(url: str) -> str:
    return _rows(url, "SELECT load_id FROM dataset")[0][0]


def _stored_users(url: str) -> dict[str, bytes]:
    return dict(_rows(url, "SELECT user_id, features FROM users"))


def _users_of_load(url: str, load_id: str) -> dict[str, bytes]:
    table = sql.Identifier(f"users_{load_id}")
    return dict(_rows(url, sql.SQL("SELECT user_id, features FROM {}").format(table)))


def _read_users(directory: Path) -> tuple[list[str], np.ndarray]:
    """The ids and features (as stored in the file) of ``directory``'s user.parquet."""
    table = pq.read_table(directory / "user.parquet")
    ids = table.column("user_id").to_pylist()
    columns = [table.column(f"feature_{j}").to_numpy() for j in range(N_FEATURES)]
    return ids, np.column_stack(columns)


def _file_users(directory: Path) -> dict[str, bytes]:
    """Each user's features in ``directory`` as a load stores them (float32 little-endian)."""
    ids, features = _read_users(directory)
    return {
        user_id: row.astype("<f4").tobytes() for user_id, row in zip(ids, features, strict=True)
    }


def _write_users(
    directory: Path, ids: list[str], features: np.ndarray, float_type: pa.DataType = FLOAT32
) -> None:
    columns = {"user_id": pa.array(ids, pa.string())}
    for j in range(features.shape[1]):
        columns[f"feature_{j}"] = pa.array(features[:, j], float_type)
    pq.write_table(pa.table(columns), directory / "user.parquet")


def _copy_data_dir(source: Path, target: Path) -> Path:
    """``source``'s model, restaurants and users in ``target``, to be changed there."""
    target.mkdir(parents=True)
    for name in ("model.pkl", "restaurant.parquet", "user.parquet"):
        shutil.copy2(source / name, target / name)
    return target


def _with_users(
    data_dir: Path, target: Path, ids: list[str], features: np.ndarray, **write: object
) -> Path:
    directory = _copy_data_dir(data_dir, target)
    _write_users(directory, ids, features, **write)
    return directory


@pytest.fixture(scope="module")
def other_data_dir(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model and restaurants as ``data_dir``, with other features for the same users
    and many more users, so that a reload to it takes a while."""
    ids, features = _read_users(data_dir)
    rng = np.random.default_rng(11)
    extra = rng.normal(size=(EXTRA_USERS, N_FEATURES)).astype(np.float32)
    return _with_users(
        data_dir,
        tmp_path_factory.mktemp("other") / "data",
        [*ids, *(f"extra{i:05d}" for i in range(EXTRA_USERS))],
        np.vstack([0.5 - features, extra]),
    )


def _user_file_with_bad_value(data_dir: Path, target: Path, value: float, position: int) -> Path:
    rng = np.random.default_rng(3)
    n_users = FIRST_BATCH + 100
    features = rng.normal(size=(n_users, N_FEATURES)).astype(np.float32)
    features[position, 5] = value
    ids = [f"user{i:05d}" for i in range(n_users)]
    return _with_users(data_dir, target, ids, features)


# The schema.


def test_a_load_creates_restaurants_dataset_and_its_own_users_table_seen_through_a_view(
    database_url: str, data_dir: Path
) -> None:
    summary = load_database(data_dir, database_url)

    assert _table_names(database_url) == _live_tables(summary.load_id)
    assert _view_names(database_url) == {"users"}
    assert _current_load_id(database_url) == summary.load_id


def test_a_load_copies_every_user_and_every_restaurant(database_url: str, data_dir: Path) -> None:
    summary = load_database(data_dir, database_url)

    assert (summary.n_users, summary.n_restaurants) == (N_USERS, N_RESTAURANTS)
    assert _rows(database_url, "SELECT count(*) FROM users") == [(N_USERS,)]
    assert _rows(database_url, "SELECT count(*) FROM restaurants") == [(N_RESTAURANTS,)]


def test_the_dataset_row_describes_the_load(loaded_url: str) -> None:
    rows = _rows(
        loaded_url,
        "SELECT n_features, feature_dtype, n_model_rows, n_users, n_restaurants FROM dataset",
    )

    assert rows == [(N_FEATURES, "float32", N_RESTAURANTS, N_USERS, N_RESTAURANTS)]


@pytest.mark.parametrize(
    ("float_type", "dtype"),
    [(pa.float32(), np.dtype("<f4")), (pa.float64(), np.dtype("<f8"))],
    ids=["float32", "float64"],
)
def test_user_features_are_stored_as_one_bytea_of_little_endian_floats_of_the_file_type(
    database_url: str, data_dir: Path, tmp_path: Path, float_type: pa.DataType, dtype: np.dtype
) -> None:
    ids, features = _read_users(data_dir)
    directory = _with_users(data_dir, tmp_path / "data", ids, features, float_type=float_type)

    load_database(directory, database_url)

    column_types = _rows(
        database_url,
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = 'users' ORDER BY column_name",
    )
    assert column_types == [("features", "bytea"), ("user_id", "text")]
    stored = _stored_users(database_url)
    assert {len(value) for value in stored.values()} == {N_FEATURES * dtype.itemsize}
    for user_id, row in zip(ids, features, strict=True):
        assert np.array_equal(np.frombuffer(stored[user_id], dtype=dtype), row.astype(dtype))


@pytest.mark.parametrize("loads", [1, 2], ids=["first-load", "reload"])
def test_users_are_keyed_by_user_id(database_url: str, data_dir: Path, loads: int) -> None:
    for _ in range(loads):
        summary = load_database(data_dir, database_url)

    users = f"users_{summary.load_id}"
    key = _inspect(database_url, lambda inspector: inspector.get_pk_constraint(users))

    assert key["constrained_columns"] == ["user_id"]


@pytest.mark.parametrize("loads", [1, 2], ids=["first-load", "reload"])
def test_restaurants_are_keyed_by_id_and_indexed_by_h3_cell(
    database_url: str, data_dir: Path, loads: int
) -> None:
    for _ in range(loads):
        load_database(data_dir, database_url)

    key = _inspect(database_url, lambda inspector: inspector.get_pk_constraint("restaurants"))
    indexes = _inspect(database_url, lambda inspector: inspector.get_indexes("restaurants"))

    assert key["constrained_columns"] == ["restaurant_id"]
    assert ["h3_cell"] in [index["column_names"] for index in indexes]


def test_restaurants_carry_their_model_row_coordinates_and_h3_cell(
    loaded_url: str, data_dir: Path
) -> None:
    restaurants, _ = read_restaurants(data_dir / "restaurant.parquet", N_RESTAURANTS)
    expected = {
        identifier: (
            row,
            latitude,
            longitude,
            h3.latlng_to_cell(latitude, longitude, FINE_RESOLUTION),
        )
        for identifier, row, latitude, longitude in zip(
            restaurants.ids,
            restaurants.rows.tolist(),
            restaurants.latitude.tolist(),
            restaurants.longitude.tolist(),
            strict=True,
        )
    }

    rows = _rows(
        loaded_url,
        "SELECT restaurant_id, model_row, latitude, longitude, h3_cell FROM restaurants",
    )

    assert {identifier: tuple(rest) for identifier, *rest in rows} == expected


# Reloading.


def test_loading_the_same_data_twice_keeps_the_same_users_and_restaurants(
    loaded_url: str, data_dir: Path
) -> None:
    users = _stored_users(loaded_url)
    restaurants = sorted(_rows(loaded_url, "SELECT * FROM restaurants"))
    first = _current_load_id(loaded_url)

    second = load_database(data_dir, loaded_url).load_id

    assert _stored_users(loaded_url) == users
    assert sorted(_rows(loaded_url, "SELECT * FROM restaurants")) == restaurants
    assert _table_names(loaded_url) == _live_tables(first, second)


def test_a_reload_replaces_every_user(loaded_url: str, other_data_dir: Path) -> None:
    ids, features = _read_users(other_data_dir)

    load_database(other_data_dir, loaded_url)

    stored = _stored_users(loaded_url)
    assert sorted(stored) == sorted(ids)
    assert all(
        stored[user_id] == row.astype("<f4").tobytes()
        for user_id, row in zip(ids, features, strict=True)
    )


@contextlib.contextmanager
def _reloading_alternately(url: str, directories: list[Path]) -> Iterator[Future]:
    """Loads of ``directories`` one after the other in a thread; its future, to watch."""

    def reload() -> None:
        for directory in directories:
            load_database(directory, url)

    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(reload)


def test_reads_during_reloads_see_all_the_old_or_all_the_new_features_never_a_gap(
    loaded_url: str, data_dir: Path, other_data_dir: Path
) -> None:
    ids, old_features = _read_users(data_dir)
    _, new_features = _read_users(other_data_dir)
    user_id, old, new = ids[0], old_features[0], new_features[0]
    # Through the view: it must switch from one load's users to the other's without a gap.
    store = PostgresStore(
        loaded_url, N_FEATURES, "float32", N_USERS, timeout=READ_TIMEOUT, pool_size=2, users=USERS
    )
    directories = [other_data_dir, data_dir] * (RELOADS // 2)

    async def read_during_reloads() -> list[np.ndarray | None]:
        await store.open()
        try:
            seen = [await store.features(user_id)]
            with _reloading_alternately(loaded_url, directories) as reloads:
                while not reloads.done():
                    seen.append(await store.features(user_id))
                reloads.result()
            return seen
        finally:
            await store.close()

    seen = asyncio.run(read_during_reloads())

    assert len(seen) > RELOADS
    mixed = [
        features
        for features in seen
        if features is None or not (np.array_equal(features, old) or np.array_equal(features, new))
    ]
    assert mixed == []


def test_a_reader_during_reloads_sees_users_and_dataset_of_the_same_load(
    loaded_url: str, data_dir: Path, other_data_dir: Path
) -> None:
    directories = [other_data_dir, data_dir] * (RELOADS // 2)
    seen = set()

    with psycopg.connect(loaded_url, autocommit=True) as connection:
        with _reloading_alternately(loaded_url, directories) as reloads:
            while not reloads.done():
                counts = connection.execute(
                    "SELECT (SELECT count(*) FROM users), (SELECT n_users FROM dataset)"
                ).fetchone()
                seen.add(counts)
            reloads.result()

    assert seen <= {(N_USERS, N_USERS), (N_USERS + EXTRA_USERS, N_USERS + EXTRA_USERS)}


def test_concurrent_first_loads_all_succeed_one_after_the_other(
    database_url: str, data_dir: Path
) -> None:
    with ThreadPoolExecutor(max_workers=CONCURRENT_LOADS) as pool:
        loads = [
            pool.submit(load_database, data_dir, database_url) for _ in range(CONCURRENT_LOADS)
        ]
        summaries = [load.result() for load in loads]

    assert [summary.n_users for summary in summaries] == [N_USERS] * CONCURRENT_LOADS
    users_tables = _table_names(database_url) - _live_tables()
    assert len(users_tables) == 2
    assert users_tables <= {f"users_{summary.load_id}" for summary in summaries}
    assert f"users_{_current_load_id(database_url)}" in users_tables
    assert _rows(database_url, "SELECT count(*) FROM users") == [(N_USERS,)]


# Users kept per load.


def test_the_users_view_shows_the_users_of_the_newest_load(
    database_url: str, data_dir: Path, other_data_dir: Path
) -> None:
    seen = []
    for directory in (data_dir, other_data_dir, data_dir):
        load_database(directory, database_url)
        seen.append(_stored_users(database_url) == _file_users(directory))

    assert seen == [True, True, True]


def test_a_load_keeps_the_users_table_of_the_previous_load_unchanged(
    loaded_url: str, data_dir: Path, other_data_dir: Path
) -> None:
    previous = _current_load_id(loaded_url)

    load_database(other_data_dir, loaded_url)

    assert _users_of_load(loaded_url, previous) == _file_users(data_dir)


def test_after_three_loads_only_the_users_tables_of_the_two_newest_remain(
    database_url: str, data_dir: Path
) -> None:
    load_ids = [load_database(data_dir, database_url).load_id for _ in range(3)]

    assert _table_names(database_url) == _live_tables(*load_ids[1:])
    assert _view_names(database_url) == {"users"}


# Tables of other owners in the same schema, named like a load's users table but not exactly.
NOT_A_LOADS_USERS_TABLE = [
    "users_notes",
    "users_0123456789a",
    "users_ABCDEF0123",
    "my_users_0123456789",
    "users_retired_0123456789",
]


def test_loads_drop_no_table_they_did_not_create(database_url: str, data_dir: Path) -> None:
    with psycopg.connect(database_url) as connection:
        for name in NOT_A_LOADS_USERS_TABLE:
            create = sql.SQL("CREATE TABLE {} (note text)").format(sql.Identifier(name))
            connection.execute(create)

    for _ in range(3):
        load_database(data_dir, database_url)

    assert set(NOT_A_LOADS_USERS_TABLE) <= _table_names(database_url)


def test_a_long_reader_of_a_loads_own_users_table_does_not_hold_up_the_next_load(
    loaded_url: str, other_data_dir: Path
) -> None:
    # A server's cache warm-up reads the users table of its load for as long as it takes; the
    # next load leaves that table in place, so it has nothing to wait for.
    users = sql.Identifier(f"users_{_current_load_id(loaded_url)}")
    long_reader = psycopg.connect(loaded_url)
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        long_reader.execute(sql.SQL("SELECT count(*) FROM {}").format(users)).fetchone()
        reload = pool.submit(load_database, other_data_dir, loaded_url)
        summary = reload.result(timeout=COMMAND_TIMEOUT)
        in_the_view = _stored_users(loaded_url)
    finally:
        long_reader.close()
        pool.shutdown()

    assert summary.n_users == N_USERS + EXTRA_USERS
    assert in_the_view == _file_users(other_data_dir)


# Bad rows and bad files.


def test_restaurants_with_unparseable_coordinates_are_skipped_and_reported(
    database_url: str, data_dir: Path, tmp_path: Path
) -> None:
    directory = _copy_data_dir(data_dir, tmp_path / "data")
    table = pq.read_table(directory / "restaurant.parquet")
    latitude = table.column("latitude").to_pylist()
    latitude[:3] = ["north", "", "13.7.5"]
    position = table.schema.get_field_index("latitude")
    table = table.set_column(position, "latitude", pa.array(latitude, pa.string()))
    pq.write_table(table, directory / "restaurant.parquet")
    unparseable = table.column("restaurant_id").to_pylist()[:3]

    summary = load_database(directory, database_url)

    reports = [skipped for skipped in summary.skipped if "latitude" in skipped.reason]
    assert [report.count for report in reports] == [3]
    assert all(
        any(identifier in example for example in reports[0].examples) for identifier in unparseable
    )
    stored = {
        identifier for (identifier,) in _rows(database_url, "SELECT restaurant_id FROM restaurants")
    }
    assert len(stored) == N_RESTAURANTS - 3
    assert stored.isdisjoint(unparseable)


def test_users_repeating_an_earlier_id_are_skipped_and_reported_keeping_the_first(
    database_url: str, data_dir: Path, tmp_path: Path
) -> None:
    ids, features = _read_users(data_dir)
    repeated = np.full((2, N_FEATURES), 9.0, dtype=np.float32)
    directory = _with_users(
        data_dir, tmp_path / "data", [*ids, ids[0], ids[1]], np.vstack([features, repeated])
    )

    summary = load_database(directory, database_url)

    reports = [skipped for skipped in summary.skipped if "repeats" in skipped.reason]
    assert [(report.count, report.examples) for report in reports] == [
        (2, [f"{ids[0]!r} (row {N_USERS})", f"{ids[1]!r} (row {N_USERS + 1})"])
    ]
    assert _stored_users(database_url)[ids[0]] == features[0].astype("<f4").tobytes()


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_a_user_with_a_non_finite_feature_stops_the_load_naming_the_row(
    database_url: str, data_dir: Path, tmp_path: Path, value: float
) -> None:
    directory = _user_file_with_bad_value(data_dir, tmp_path / "data", value, FIRST_BATCH + 3)

    with pytest.raises(DataError, match=rf"'user{FIRST_BATCH + 3:05d}' \(row {FIRST_BATCH + 3}\)"):
        load_database(directory, database_url)


def test_a_failed_reload_leaves_the_loaded_data_intact(
    loaded_url: str, data_dir: Path, tmp_path: Path
) -> None:
    users = _stored_users(loaded_url)
    dataset = _rows(loaded_url, "SELECT * FROM dataset")
    tables = _table_names(loaded_url)
    directory = _user_file_with_bad_value(data_dir, tmp_path / "data", np.inf, FIRST_BATCH + 3)

    with pytest.raises(DataError):
        load_database(directory, loaded_url)

    assert _stored_users(loaded_url) == users
    assert _rows(loaded_url, "SELECT * FROM dataset") == dataset
    assert (_table_names(loaded_url), _view_names(loaded_url)) == (tables, {"users"})


def test_a_failed_first_load_leaves_no_table_behind(
    database_url: str, data_dir: Path, tmp_path: Path
) -> None:
    directory = _user_file_with_bad_value(data_dir, tmp_path / "data", np.nan, FIRST_BATCH + 3)

    with pytest.raises(DataError):
        load_database(directory, database_url)

    assert (_table_names(database_url), _view_names(database_url)) == (set(), set())


@pytest.mark.parametrize("n_columns", [N_FEATURES - 1, N_FEATURES + 1], ids=["fewer", "more"])
def test_a_user_file_with_another_number_of_feature_columns_stops_the_load(
    loaded_url: str, data_dir: Path, tmp_path: Path, n_columns: int
) -> None:
    users = _stored_users(loaded_url)
    ids = [f"user{i}" for i in range(10)]
    features = np.ones((10, n_columns), dtype=np.float32)
    directory = _with_users(data_dir, tmp_path / "data", ids, features)

    with pytest.raises(DataError, match=f"has {n_columns} feature columns but the model expects"):
        load_database(directory, loaded_url)

    assert _stored_users(loaded_url) == users


# The command line.


def _db_load(*arguments: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("RECOMMENDER_")}
    return subprocess.run(
        [str(RECOMMENDER), "db", "load", *arguments],
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )


def test_db_load_loads_the_data_directory_and_logs_the_counts(
    database_url: str, data_dir: Path
) -> None:
    finished = _db_load("--data-dir", str(data_dir), "--database-url", database_url)

    assert finished.returncode == 0, finished.stderr
    logged = f"loaded {N_USERS} users and {N_RESTAURANTS} restaurants ({N_FEATURES} features)"
    assert logged in finished.stderr
    assert _rows(database_url, "SELECT count(*) FROM users") == [(N_USERS,)]


def _bad_urls(server: str, unused_port: int) -> dict[str, tuple[str, str]]:
    """Database URLs that cannot be loaded into, each with what its error must name."""
    return {
        "unreachable": (
            make_url(server).set(host="127.0.0.1", port=unused_port).render_as_string(False),
            f"port {unused_port}",
        ),
        "unknown-role": (
            make_url(server).set(username="no_such_role").render_as_string(False),
            'role "no_such_role" does not exist',
        ),
        "malformed": ("not-a-url", "not-a-url"),
    }


@pytest.mark.parametrize("problem", ["unreachable", "unknown-role", "malformed"])
def test_db_load_with_a_bad_database_url_exits_non_zero_naming_the_problem_without_traceback(
    postgres_server: str, data_dir: Path, unused_port: int, problem: str
) -> None:
    url, named = _bad_urls(postgres_server, unused_port)[problem]

    finished = _db_load("--data-dir", str(data_dir), "--database-url", url)

    assert finished.returncode != 0
    assert "Traceback" not in finished.stderr
    assert named in finished.stderr


def _wait_until_a_lock_is_awaited(url: str) -> None:
    """Return once some session waits for a table lock (the reload reached its swap)."""
    deadline = time.monotonic() + COMMAND_TIMEOUT
    while time.monotonic() < deadline:
        if _rows(url, "SELECT count(*) FROM pg_locks WHERE NOT granted")[0][0]:
            return
        time.sleep(0.01)
    raise AssertionError("the reload never reached its swap")


def test_a_reload_waiting_for_a_long_reader_does_not_hold_up_other_readers(
    loaded_url: str, other_data_dir: Path
) -> None:
    # A long read (as a cache warm-up is) keeps the reload from renaming its tables; other
    # readers must still get their answers meanwhile, and the reload must finish afterwards.
    long_reader = psycopg.connect(loaded_url)
    long_reader.execute("SELECT count(*) FROM users").fetchone()
    reload = ThreadPoolExecutor(max_workers=1).submit(load_database, other_data_dir, loaded_url)
    try:
        _wait_until_a_lock_is_awaited(loaded_url)
        reads = []
        for _ in range(5):
            with psycopg.connect(loaded_url, autocommit=True) as reader:
                reader.execute("SET statement_timeout = '5s'")
                reads.append(reader.execute("SELECT count(*) FROM users").fetchone()[0])
        assert not reload.done()
    finally:
        long_reader.rollback()
        long_reader.close()

    summary = reload.result(timeout=COMMAND_TIMEOUT)
    assert reads and all(count > 0 for count in reads)
    assert _rows(loaded_url, "SELECT count(*) FROM users")[0][0] == summary.n_users
