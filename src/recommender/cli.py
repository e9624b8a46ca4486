"""The ``recommender`` command: generate data, serve the API, or answer one request."""

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from recommender.contract import ParameterError, check_user_id, parse_query, render
from recommender.dataset.reader import DataError
from recommender.features import StoreUnavailable
from recommender.features.redis_cache import CachedStore
from recommender.postgres.store import DatabaseUnreachable
from recommender.ranking import Query, Ranking
from recommender.service import Recommender, UnknownUser, limits_of, load_recommender
from recommender.settings import Settings, settings_table

log = logging.getLogger("recommender")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    parser = _parser()
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        return arguments.run(arguments)
    except DatabaseUnreachable as error:
        log.error("%s", error)
        return 3
    except (DataError, ValidationError) as error:
        log.error("%s", error)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recommender", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="manage the data directory")
    data_commands = data.add_subparsers(required=True, metavar="COMMAND")
    generate = data_commands.add_parser("generate", help="write deterministic synthetic data")
    generate.add_argument("--out", type=Path, default=Path("data"), help="default: data")
    generate.add_argument("--users", type=int, default=100_000, help="default: 100000")
    generate.add_argument("--restaurants", type=int, default=10_000, help="default: 10000")
    generate.add_argument("--features", type=int, default=1000, help="default: 1000")
    generate.add_argument("--requests", type=int, default=2000, help="default: 2000")
    generate.add_argument("--seed", type=int, default=0, help="default: 0")
    generate.add_argument(
        "--force", action="store_true", help="overwrite the files of an existing directory"
    )
    generate.add_argument(
        "--no-model",
        dest="model",
        action="store_false",
        help="write restaurant_embeddings.npy instead of model.pkl, for `data fit` to fit later",
    )
    generate.set_defaults(run=_generate)
    fit = data_commands.add_parser(
        "fit", help="fit model.pkl on the restaurant embeddings written by generate --no-model"
    )
    fit.add_argument("--data-dir", type=Path, default=Path("data"), help="default: data")
    fit.set_defaults(run=_fit)

    config = commands.add_parser("config", help="print every setting as a markdown table")
    config.set_defaults(run=_print_config)

    serve = commands.add_parser("serve", help="serve the HTTP API")
    _add_data_options(serve)
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="bind port (default 8000)")
    serve.add_argument("--workers", type=int, help="worker processes (default 2)")
    serve.set_defaults(run=_serve)

    recommend = commands.add_parser("recommend", help="print the API's answer for one request")
    _add_data_options(recommend)
    recommend.add_argument("user_id")
    recommend.add_argument("--latitude", required=True, help="WGS-84 degrees, -90 to 90")
    recommend.add_argument("--longitude", required=True, help="WGS-84 degrees, -180 to 180")
    recommend.add_argument("--size", help="restaurants to return at most (default 20)")
    recommend.add_argument("--max-dis", dest="max_dis", help="radius in metres (default 5000)")
    recommend.add_argument(
        "--sort-dis", dest="sort_dis", help="1: order by displacement; 0: by difference"
    )
    recommend.set_defaults(run=_recommend)

    database = commands.add_parser("db", help="manage the PostgreSQL store")
    database_commands = database.add_subparsers(required=True, metavar="COMMAND")
    load = database_commands.add_parser(
        "load", help="create the schema and bulk-load users and restaurants"
    )
    load.add_argument("--data-dir", type=Path, help="data directory (default: data)")
    load.add_argument(
        "--database-url",
        help="postgresql://user:password@host:port/database "
        "(default: RECOMMENDER_DATABASE_URL, else RECOMMENDER_STORE)",
    )
    load.add_argument(
        "--receipt", type=Path, help="also write what was loaded, and where, to this JSON file"
    )
    load.set_defaults(run=_load_database)

    bench = commands.add_parser("bench", help="replay request.parquet and measure")
    target = bench.add_mutually_exclusive_group()
    target.add_argument("--url", help="measure a running server at this URL")
    target.add_argument(
        "--start", action="store_true", help="start the servers to measure (the default)"
    )
    bench.add_argument("--data-dir", type=Path, default=Path("data"), help="default: data")
    bench.add_argument("--requests", type=Path, help="default: <data-dir>/request.parquet")
    bench.add_argument(
        "--duration", type=float, help="seconds per run (default: 30; the soak: 600)"
    )
    bench.add_argument(
        "--soak-window",
        type=float,
        default=60.0,
        help="seconds per window of the soak (default: 60)",
    )
    bench.add_argument("--out", type=Path, default=Path("bench-results"))
    bench.add_argument("--store", help="also measure this PostgreSQL store")
    bench.add_argument("--cache", help="with --store: a Redis cache in front of it")
    bench.add_argument(
        "--scenario",
        action="append",
        choices=["embedded", "embedded-exhaustive", "postgresql", "postgresql-redis", "soak"],
        help="run only these scenarios (repeatable; default: all that apply except soak, "
        "ten minutes at 500 requests/s, which runs only when named)",
    )
    bench.set_defaults(run=_bench)

    cache = commands.add_parser("cache", help="manage the Redis cache")
    cache_commands = cache.add_subparsers(required=True, metavar="COMMAND")
    warm = cache_commands.add_parser("warm", help="fill the cache with every user's features")
    _add_data_options(warm)
    warm.set_defaults(run=_warm_cache)
    return parser


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="data directory (default: data)")
    parser.add_argument("--ranker", choices=["fast", "exhaustive"], help="default: fast")
    parser.add_argument(
        "--store", help="embedded (default) or postgresql://user:password@host:port/database"
    )
    parser.add_argument(
        "--cache", help="redis://host:port/db or redis+cluster://host:port (PostgreSQL store only)"
    )


def _settings(arguments: argparse.Namespace) -> Settings:
    names = ("data_dir", "ranker", "store", "cache", "host", "port", "workers")
    given = {name: getattr(arguments, name, None) for name in names}
    return Settings(**{name: value for name, value in given.items() if value is not None})


def _generate(arguments: argparse.Namespace) -> int:
    from recommender.dataset.generate import generate

    out = arguments.out
    holds_files = out.is_file() or (out.is_dir() and any(out.iterdir()))
    if holds_files and not arguments.force:
        log.error("%s already holds files; pass --force to overwrite them", arguments.out)
        return 2
    started = time.perf_counter()
    try:
        generate(
            arguments.out,
            n_users=arguments.users,
            n_restaurants=arguments.restaurants,
            n_features=arguments.features,
            n_requests=arguments.requests,
            seed=arguments.seed,
            model=arguments.model,
            progress=log.info,
        )
    except ValueError as error:
        log.error("%s", error)
        return 2
    log.info("wrote %s in %.1f s", arguments.out, time.perf_counter() - started)
    return 0


def _fit(arguments: argparse.Namespace) -> int:
    from recommender.dataset.generate import fit_model

    started = time.perf_counter()
    try:
        n_restaurants, n_features = fit_model(arguments.data_dir)
    except ValueError as error:
        log.error("%s", error)
        return 2
    log.info(
        "fitted the model on %d restaurant embeddings of %d features into %s in %.1f s",
        n_restaurants,
        n_features,
        arguments.data_dir,
        time.perf_counter() - started,
    )
    return 0


def _print_config(arguments: argparse.Namespace) -> int:
    sys.stdout.write(settings_table(_setting_options(_parser())))
    return 0


def _setting_options(
    parser: argparse.ArgumentParser, options: dict[str, list[str]] | None = None
) -> dict[str, list[str]]:
    """The options, of any subcommand, named after a setting: ``{"data_dir": ["--data-dir"]}``."""
    options = {} if options is None else options
    for action in parser._actions:  # argparse offers no public way to walk its subcommands
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                _setting_options(command, options)
        elif action.dest in Settings.model_fields and action.option_strings:
            flags = options.setdefault(action.dest, [])
            if action.option_strings[-1] not in flags:
                flags.append(action.option_strings[-1])
    return options


def _serve(arguments: argparse.Namespace) -> int:
    from recommender.observability import MetricsDirectoryBusy, configure_logging
    from recommender.server import serve

    settings = _settings(arguments)
    configure_logging(settings.log_format, settings.log_level)
    _generate_default_data_if_missing(settings)

    def load() -> Recommender:
        recommender = load_recommender(settings, progress=log.info)
        _log_loaded(recommender.report)
        if isinstance(recommender.store, CachedStore) and settings.cache_warm:
            _warm(settings, recommender.store)
        return recommender

    try:
        serve(load, settings)
    except MetricsDirectoryBusy as error:
        log.error("%s", error)
        return 2
    return 0


def _bench(arguments: argparse.Namespace) -> int:
    from recommender.bench.runner import BenchPlan, run

    logging.getLogger("httpx").setLevel(logging.WARNING)
    if arguments.url and "soak" in (arguments.scenario or ()):
        log.error("the soak starts its own server to watch its workers; drop --url")
        return 2
    durations = {}
    if arguments.duration is not None:
        durations = {"seconds": arguments.duration, "soak_seconds": arguments.duration}
    plan = BenchPlan(
        data_dir=arguments.data_dir,
        requests_file=arguments.requests or arguments.data_dir / "request.parquet",
        out=arguments.out,
        **durations,
        soak_window_seconds=arguments.soak_window,
        url=arguments.url,
        store=arguments.store,
        cache=arguments.cache,
        only=tuple(arguments.scenario or ()),
    )
    results = run(plan, progress=log.info)
    if results["speedup_over_exhaustive"] is not None:
        log.info("speed-up over the exhaustive ranker: %s", results["speedup_over_exhaustive"])
    log.info("wrote %s", plan.out / "results.json")
    return 0


def _warm_cache(arguments: argparse.Namespace) -> int:
    settings = _settings(arguments)
    if settings.cache is None:
        log.error("name the cache: --cache redis://host:port/db")
        return 2
    recommender = load_recommender(settings)
    return 0 if _warm(settings, recommender.store) else 3


def _warm(settings: Settings, store: CachedStore) -> bool:
    """Fill the cache; a failure is logged and leaves the cache to fill lazily."""
    from recommender.features.redis_cache import warm
    from recommender.postgres.store import iter_user_features

    started = time.perf_counter()
    log.info("warming the cache %s from PostgreSQL", settings.cache)
    try:
        written = warm(
            settings.cache,
            store.load_id,
            iter_user_features(settings.store, settings.cache_warm_batch, store.store.users),
            ttl=settings.cache_ttl,
            timeout=max(settings.cache_timeout, 5.0),
            progress=_every(10, log.info),
        )
    except Exception as error:  # noqa: BLE001 - any failure leaves a working, colder service
        log.warning("cache warm-up failed, serving with a lazily filled cache: %s", error)
        return False
    log.info("warmed %d users in %.1f s", written, time.perf_counter() - started)
    return True


def _every(n: int, report):
    """A progress callback passing on every ``n``-th message."""
    calls = iter(range(1 << 62))
    return lambda message: report(message) if next(calls) % n == 0 else None


def _recommend(arguments: argparse.Namespace) -> int:
    settings = _settings(arguments)
    raw = {name: getattr(arguments, name) for name in ("latitude", "longitude", "size")}
    raw.update(max_dis=arguments.max_dis, sort_dis=arguments.sort_dis)
    try:
        check_user_id(arguments.user_id)
        query = parse_query(raw, limits_of(settings))
    except ParameterError as error:
        log.error("%s", error.message)
        return 2
    recommender = load_recommender(settings)
    for skipped in recommender.report.skipped:
        log.warning("%s", skipped)
    try:
        ranking = asyncio.run(_recommend_once(recommender, arguments.user_id, query))
    except UnknownUser:
        log.error("unknown user %r", arguments.user_id)
        return 1
    except StoreUnavailable as error:
        log.error("%s", error)
        return 3
    sys.stdout.write(render(ranking).decode() + "\n")
    return 0


async def _recommend_once(recommender: Recommender, user_id: str, query: Query) -> Ranking:
    await recommender.store.open()
    try:
        return await recommender.recommend(user_id, query)
    finally:
        await recommender.store.close()


def _load_database(arguments: argparse.Namespace) -> int:
    from recommender.postgres.load import load_database
    from recommender.postgres.schema import safe_url

    settings = _settings(arguments)
    if arguments.database_url is not None:
        settings = Settings(**{**settings.model_dump(), "database_url": arguments.database_url})
    url = settings.database_url
    if url is None:
        log.error("name the database: --database-url postgresql://user@host:port/database")
        return 2
    summary = load_database(settings.data_dir, url, log.info, settings.model_sha256)
    for skipped in summary.skipped:
        log.warning("%s", skipped)
    log.info(
        "loaded %d users and %d restaurants (%d features) in %.1f s",
        summary.n_users,
        summary.n_restaurants,
        summary.n_features,
        summary.seconds,
    )
    if arguments.receipt is not None:
        receipt = {
            "database": safe_url(url),
            "data_dir": str(settings.data_dir),
            "n_users": summary.n_users,
            "n_restaurants": summary.n_restaurants,
            "n_features": summary.n_features,
        }
        arguments.receipt.parent.mkdir(parents=True, exist_ok=True)
        arguments.receipt.write_text(json.dumps(receipt, indent=2) + "\n")
    return 0


def _generate_default_data_if_missing(settings: Settings) -> None:
    if "data_dir" in settings.model_fields_set or settings.data_dir.exists():
        return
    log.info("no data directory at %s: generating the synthetic reference data", settings.data_dir)
    from recommender.dataset.generate import generate

    # Written aside and renamed into place: an interrupted run leaves no half-made directory.
    partial = settings.data_dir.with_name(f".{settings.data_dir.name}.partial-{os.getpid()}")
    try:
        generate(partial, progress=log.info)
        os.replace(partial, settings.data_dir)
    except OSError:
        if not settings.data_dir.is_dir():
            raise
        log.info("another process generated %s first; using it", settings.data_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _log_loaded(report) -> None:
    log.info("%s", report.summary())
    for skipped in report.skipped:
        log.warning("%s", skipped)


if __name__ == "__main__":
    sys.exit(main())
