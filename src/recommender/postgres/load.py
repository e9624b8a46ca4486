"""Bulk-loading a data directory into PostgreSQL with COPY, swapped in atomically.

Everything happens in one transaction: fresh tables under a new load id are created with their
keys and indexes and filled with COPY. Then ``restaurants`` and ``dataset`` are renamed over the
live ones, while the users stay in their table ``users_<load id>`` and the view ``users`` is
pointed at it. A server reading during the load keeps seeing the previous data until the
commit, and a failed load leaves the database as it was.

A server reads the users table of the load it started on until it is reloaded, so a load keeps
the previous load's users table for the servers still on it and drops older ones. A server two
loads behind finds its table gone and answers 503 until it is reloaded.
"""

import datetime
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h3.api.basic_int as h3
import psycopg
from psycopg import sql
from sqlalchemy import MetaData, insert, inspect
from sqlalchemy.exc import DBAPIError

from recommender.dataset.reader import (
    RESTAURANT_FILE,
    USER_FILE,
    DataError,
    Skipped,
    UserChecks,
    check_model_rows,
    count_rows,
    data_sha256,
    file_sha256,
    iter_valid_users,
    read_restaurants,
    user_feature_dtype,
)
from recommender.geo import FINE_RESOLUTION
from recommender.model import load_model, model_path
from recommender.postgres.schema import (
    DATASET,
    RESTAURANTS,
    USERS,
    dataset_table,
    engine_for,
    load_users_name,
    restaurants_table,
    safe_url,
    users_table,
)

# Serialises concurrent loads of the same database (any fixed number unique to this schema).
_LOAD_LOCK = 0x7265636F6D
# Each swap attempt waits this long for its locks, then steps aside; about three minutes in all.
_SWAP_LOCK_WAIT = "200ms"
_SWAP_PAUSE_SECONDS = 0.5
_SWAP_ATTEMPTS = 250
# A load id is this many lowercase hexadecimal digits.
_LOAD_ID_DIGITS = 10
# The users tables loads create; only tables named exactly so are ever dropped.
_LOAD_USERS_NAME = re.compile(rf"{USERS}_[0-9a-f]{{{_LOAD_ID_DIGITS}}}")


@dataclass
class LoadSummary:
    """What a load wrote and skipped."""

    load_id: str = ""
    n_users: int = 0
    n_restaurants: int = 0
    n_features: int = 0
    seconds: float = 0.0
    skipped: list[Skipped] = field(default_factory=list)


def load_database(
    data_dir: Path,
    url: str,
    progress: Callable[[str], None] | None = None,
    model_sha256: str | None = None,
) -> LoadSummary:
    """Create the schema and load ``data_dir``'s users and restaurants into ``url``.

    Raises
    ------
    DataError
        If a file is unusable, does not match the model, or a user row has a missing or
        non-finite feature; nothing is committed then.
    """
    started = time.perf_counter()
    report = progress or (lambda message: None)
    model = load_model(model_path(data_dir), model_sha256)
    check_model_rows(model.n_rows, data_dir / RESTAURANT_FILE)
    restaurants, skipped = read_restaurants(data_dir / RESTAURANT_FILE, model.n_rows)
    users_file = data_dir / USER_FILE
    version = data_sha256(file_sha256(data_dir / RESTAURANT_FILE), file_sha256(users_file))
    dtype = user_feature_dtype(users_file, model.n_features)
    n_rows = count_rows(users_file)

    load_id = uuid.uuid4().hex[:_LOAD_ID_DIGITS]
    metadata = MetaData()
    staged = {
        USERS: users_table(load_users_name(load_id), metadata),
        RESTAURANTS: restaurants_table(f"{RESTAURANTS}_{load_id}", metadata),
        DATASET: dataset_table(f"{DATASET}_{load_id}", metadata),
    }
    checks = UserChecks(users_file.name)
    engine = engine_for(url)
    try:
        with engine.begin() as connection:
            raw = connection.connection.driver_connection
            raw.execute("SELECT pg_advisory_xact_lock(%s)", (_LOAD_LOCK,))
            metadata.create_all(connection)

            n_users = 0
            with raw.cursor().copy(_copy_statement(staged[USERS], ["user_id", "features"])) as copy:
                copy.set_types(["text", "bytea"])
                for batch, read in iter_valid_users(users_file, model.n_features, checks):
                    if checks.not_finite.count:
                        rows = ", ".join(checks.not_finite.examples)
                        raise DataError(
                            f"{users_file}: a user row has a missing or non-finite feature "
                            f"({rows}); the load stopped and nothing was loaded"
                        )
                    rows = batch.features.astype(dtype.newbyteorder("<"), copy=False)
                    for user_id, features in zip(batch.ids, rows, strict=True):
                        copy.write_row((user_id, features.tobytes()))
                    n_users += len(batch.ids)
                    report(f"copied {read}/{n_rows} users")

            columns = ["restaurant_id", "model_row", "latitude", "longitude", "h3_cell"]
            with raw.cursor().copy(_copy_statement(staged[RESTAURANTS], columns)) as copy:
                copy.set_types(["text", "int4", "float8", "float8", "int8"])
                for row in zip(
                    restaurants.ids,
                    restaurants.rows.tolist(),
                    restaurants.latitude.tolist(),
                    restaurants.longitude.tolist(),
                    strict=True,
                ):
                    copy.write_row((*row, h3.latlng_to_cell(row[2], row[3], FINE_RESOLUTION)))
            report(f"copied {len(restaurants)} restaurants")

            connection.execute(
                insert(staged[DATASET]).values(
                    load_id=load_id,
                    n_features=model.n_features,
                    feature_dtype=dtype.name,
                    n_model_rows=model.n_rows,
                    n_users=n_users,
                    n_restaurants=len(restaurants),
                    loaded_at=datetime.datetime.now(datetime.UTC).isoformat(),
                    data_sha256=version,
                )
            )
            _swap_into_place(connection, raw, staged, load_id)
    except (psycopg.Error, DBAPIError) as error:
        reason = getattr(error, "orig", None) or error
        raise DataError(f"cannot load into {safe_url(url)}: {reason}") from error
    finally:
        engine.dispose()

    return LoadSummary(
        load_id=load_id,
        n_users=n_users,
        n_restaurants=len(restaurants),
        n_features=model.n_features,
        seconds=time.perf_counter() - started,
        skipped=[*skipped, *checks.reports()],
    )


def _copy_statement(table, columns: list[str]) -> sql.Composed:
    return sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        sql.Identifier(table.name), sql.SQL(", ").join(map(sql.Identifier, columns))
    )


def _swap_into_place(connection, raw: psycopg.Connection, staged: dict, load_id: str) -> None:
    """Put the staged tables in place of the live ones, waiting politely for the locks.

    ``restaurants`` and ``dataset`` are renamed over, the view ``users`` is pointed at the new
    users table, and the users tables of loads before the previous one are dropped. Each of
    these needs an exclusive lock, and every reader queues behind a waiting one. So each attempt
    waits only briefly (a long reader, such as a cache warm-up, makes it give way and try again)
    and readers are never held up for longer than that.
    """
    live = set(inspect(connection).get_table_names())
    for _ in range(_SWAP_ATTEMPTS):
        raw.execute("SAVEPOINT swap")
        raw.execute("SELECT set_config('lock_timeout', %s, true)", (_SWAP_LOCK_WAIT,))
        try:
            _swap(raw, staged, live, load_id)
        except psycopg.errors.LockNotAvailable:
            raw.execute("ROLLBACK TO SAVEPOINT swap")
            time.sleep(_SWAP_PAUSE_SECONDS)
            continue
        raw.execute("RELEASE SAVEPOINT swap")
        return
    raise DataError(
        "the new tables were loaded but could not be swapped in: other sessions held the live "
        "tables throughout; nothing was changed"
    )


def _swap(raw: psycopg.Connection, staged: dict, live: set[str], load_id: str) -> None:
    kept = {staged[USERS].name}
    if DATASET in live:
        query = sql.SQL("SELECT load_id FROM {}").format(sql.Identifier(DATASET))
        kept.update(load_users_name(previous) for (previous,) in raw.execute(query))

    # Locks are taken in the order readers take them (the users, then the dataset, then the
    # restaurants): no reader then holds a lock the swap waits for while waiting for one it holds.
    drop = sql.SQL("DROP TABLE {}")
    # A database loaded before users were kept per load holds them in a table of that name.
    if USERS in live:
        raw.execute(drop.format(sql.Identifier(USERS)))
    raw.execute(
        sql.SQL("CREATE OR REPLACE VIEW {} AS SELECT * FROM {}").format(
            sql.Identifier(USERS), sql.Identifier(staged[USERS].name)
        )
    )
    rename = sql.SQL("ALTER TABLE {} RENAME TO {}")
    for name in (DATASET, RESTAURANTS):
        retired = f"{name}_retired_{load_id}"
        if name in live:
            raw.execute(rename.format(sql.Identifier(name), sql.Identifier(retired)))
        raw.execute(rename.format(sql.Identifier(staged[name].name), sql.Identifier(name)))
        if name in live:
            raw.execute(drop.format(sql.Identifier(retired)))

    # Servers on the previous load go on reading its table; older loads' tables go.
    for name in sorted(live):
        if _LOAD_USERS_NAME.fullmatch(name) and name not in kept:
            raw.execute(drop.format(sql.Identifier(name)))
