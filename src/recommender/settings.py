"""Every setting of the service: its name, its default and its environment variable."""

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from recommender.features.redis_cache import is_cache_url
from recommender.postgres.schema import is_database_url


class Settings(BaseSettings):
    """Service configuration, read from ``RECOMMENDER_*`` environment variables.

    Command-line options override these values; validation happens at start so that a bad
    deployment fails at once with a message naming the setting.
    """

    model_config = SettingsConfigDict(env_prefix="RECOMMENDER_", extra="ignore")

    data_dir: Path = Field(
        Path("data"),
        description="Directory holding restaurant.parquet, user.parquet and model.pkl.",
    )
    prepared_dir: Path | None = Field(
        None,
        description="Where prepared user features are kept; unset: `<data_dir>/.prepared`.",
    )
    model_sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-fA-F]{64}$",
        description="SHA-256 the model file must have; unset: the one in `<model file>.sha256` "
        "beside it, if there is one.",
    )
    host: str = Field("127.0.0.1", description="Address the HTTP server binds to.")
    port: int = Field(8000, ge=0, le=65535, description="Port the HTTP server binds to.")
    workers: int = Field(2, ge=1, le=64, description="Number of Gunicorn worker processes.")
    worker_timeout: int = Field(
        30, gt=0, description="Seconds a worker may stay silent before Gunicorn replaces it."
    )
    graceful_timeout: int = Field(
        10, gt=0, description="Seconds in-flight requests get to finish on shutdown."
    )
    store: str = Field(
        "embedded",
        description="Where user features live: `embedded` (the data directory, no server) or "
        "a PostgreSQL URL, `postgresql://user:password@host:port/database`.",
    )
    database_url: str | None = Field(
        None,
        description="The PostgreSQL database `recommender db load` writes to; unset: the "
        "store's URL, when the store is one.",
    )
    store_timeout: float = Field(
        2.0, gt=0, description="Seconds a request waits for the store before answering 503."
    )
    store_start_timeout: float = Field(
        30.0, ge=0, description="Seconds the server waits for the store at start before exiting."
    )
    store_pool_size: int = Field(
        4, ge=1, description="Most database connections each worker keeps open."
    )
    cache: str | None = Field(
        None,
        description="Redis in front of a PostgreSQL store: `redis://host:port/db`, "
        "`rediss://` (TLS), or `redis+cluster://host:port` for a Redis Cluster; unset: no cache.",
    )
    cache_ttl: float = Field(
        3600.0, ge=0.001, description="Seconds a cached feature vector lives (at least 1 ms)."
    )
    cache_timeout: float = Field(
        0.25, gt=0, description="Seconds a Redis call may take before the cache is skipped."
    )
    cache_warm: bool = Field(
        True, description="Fill the cache with every user before the workers start."
    )
    cache_warm_batch: int = Field(
        2000, ge=1, description="Users read and written per batch while warming."
    )
    ranker: Literal["fast", "exhaustive"] = Field(
        "fast",
        description="fast: spatial pre-filter then exact ranking; exhaustive: the model's "
        "kneighbors over every restaurant per request (the reference, much slower).",
    )
    default_size: int = Field(20, ge=1, description="Restaurants returned when size is not given.")
    max_size: int = Field(1000, ge=1, description="Largest size a request may ask for.")
    default_max_dis: float = Field(
        5000.0,
        gt=0,
        allow_inf_nan=False,
        description="Search radius in metres when max_dis is not given.",
    )
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        "info", description="Level of the service's and Gunicorn's logs."
    )
    log_format: Literal["auto", "json", "text"] = Field(
        "auto",
        description="Log lines as JSON objects or as text; auto: text on a terminal, JSON "
        "otherwise.",
    )
    metrics_dir: Path | None = Field(
        None,
        description="Directory where the workers' Prometheus metrics meet; default: a fresh "
        "temporary directory, removed on exit.",
    )

    @field_validator("store")
    @classmethod
    def _known_store(cls, value: str) -> str:
        if value != "embedded" and not is_database_url(value):
            raise ValueError(
                f"{value!r} is not a store: use embedded or postgresql://user@host:port/db"
            )
        return value

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str | None) -> str | None:
        if value is not None and not is_database_url(value):
            raise ValueError(
                f"{value!r} is not a PostgreSQL URL: use postgresql://user@host:port/db"
            )
        return value

    @field_validator("cache")
    @classmethod
    def _known_cache(cls, value: str | None) -> str | None:
        if value is not None and not is_cache_url(value):
            raise ValueError(
                f"{value!r} is not a cache: use redis://host:port/db or redis+cluster://host:port"
            )
        return value

    @model_validator(mode="after")
    def _cache_needs_database(self) -> "Settings":
        if self.cache is not None and self.store == "embedded":
            raise ValueError("a cache needs a PostgreSQL store: set --store postgresql://...")
        return self

    @model_validator(mode="after")
    def _database_url_from_store(self) -> "Settings":
        if self.database_url is None and self.store != "embedded":
            self.database_url = self.store
        return self

    @model_validator(mode="after")
    def _default_size_within_max(self) -> "Settings":
        if self.default_size > self.max_size:
            raise ValueError(f"default_size {self.default_size} exceeds max_size {self.max_size}")
        return self

    @property
    def resolved_prepared_dir(self) -> Path:
        """The directory for prepared files, defaulting to ``<data_dir>/.prepared``."""
        return self.prepared_dir if self.prepared_dir is not None else self.data_dir / ".prepared"


def settings_table(
    options: Mapping[str, Iterable[str]] | None = None,
    settings: type[BaseSettings] = Settings,
) -> str:
    """The settings as a markdown table: variable, command-line option, default and meaning.

    One row per field of ``settings``, in declaration order; the default is the class's own,
    whatever the environment says. This is the configuration table of the README.

    Parameters
    ----------
    options : mapping of str to iterable of str, optional
        Command-line options that set a field, by field name, such as
        ``{"data_dir": ["--data-dir"]}``; fields without any get an empty cell.
    settings : type, default=Settings
        The pydantic-settings class to describe.

    Raises
    ------
    ValueError
        If a field has no description; the message names the field.
    """
    options = options or {}
    prefix = settings.model_config.get("env_prefix", "")
    rows = ["| variable | option | default | meaning |", "|---|---|---|---|"]
    for name, field in settings.model_fields.items():
        if not field.description:
            raise ValueError(
                f"setting {name!r} has no description; give its Field a description= to document it"
            )
        cells = (
            f"`{(prefix + name).upper()}`",
            ", ".join(f"`{option}`" for option in options.get(name, ())),
            _markdown_default(field.get_default(call_default_factory=True)),
            _markdown_text(field.description),
        )
        rows.append(f"| {' | '.join(cells)} |")
    return "\n".join(rows) + "\n"


def _markdown_default(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    return f"`{value}`"


def _markdown_text(text: str) -> str:
    """``text`` on one line, safe inside a table cell; code spans are kept as they are."""
    pieces = re.split(r"(`[^`]*`)", " ".join(text.split()))
    # Outside code spans a placeholder such as <model file> would be read as an HTML tag.
    escaped = [
        piece if piece.startswith("`") else piece.replace("<", "&lt;").replace(">", "&gt;")
        for piece in pieces
    ]
    return "".join(escaped).replace("|", "\\|")
