"""Every setting of the service: its name, its default and its environment variable."""

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


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
        description="Where prepared user features are kept; default: <data_dir>/.prepared.",
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
    ranker: Literal["fast", "exhaustive"] = Field(
        "fast",
        description="fast: spatial pre-filter then exact ranking; exhaustive: the model's "
        "kneighbors over every restaurant per request (the reference, much slower).",
    )
    default_size: int = Field(20, ge=1, description="Restaurants returned when size is not given.")
    max_size: int = Field(1000, ge=1, description="Largest size a request may ask for.")
    default_max_dis: float = Field(
        5000.0, gt=0, description="Search radius in metres when max_dis is not given."
    )
    log_level: str = Field("info", description="Log level of the server.")

    @property
    def resolved_prepared_dir(self) -> Path:
        """The directory for prepared files, defaulting to ``<data_dir>/.prepared``."""
        return self.prepared_dir if self.prepared_dir is not None else self.data_dir / ".prepared"
