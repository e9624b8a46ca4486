"""User features prepared once into a memory-mapped matrix, shared by every worker.

Reading a 1,000-column Parquet file takes seconds; mapping a ``.npy`` file takes
milliseconds and lets every forked worker share the same pages. The prepared files are
rebuilt whenever ``user.parquet`` changes (size, modification or change time, or inode) and
are replaced atomically, so a reader never sees a half-written matrix.
"""

import fcntl
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recommender.dataset.reader import (
    DataError,
    Skipped,
    UserChecks,
    count_rows,
    file_sha256,
    iter_valid_users,
    user_feature_dtype,
)

FORMAT_VERSION = 2
MANIFEST = "users.json"


@dataclass(frozen=True)
class PreparedUsers:
    """User features ready to serve.

    Attributes
    ----------
    ids : ndarray of shape (n_users,), dtype str
    features : ndarray of shape (n_users, n_features), float32 or float64, read-only
        Row ``i`` holds the features of ``ids[i]``.
    skipped : list of Skipped
        Rows of ``user.parquet`` that were left out, and why.
    source_sha256 : str
        SHA-256 of the ``user.parquet`` the features were prepared from.
    """

    ids: np.ndarray
    features: np.ndarray
    skipped: list[Skipped]
    source_sha256: str


def load_prepared_users(
    source: Path,
    prepared_dir: Path,
    n_features: int,
    progress: Callable[[str], None] | None = None,
) -> tuple[PreparedUsers, bool]:
    """Map the prepared user features for ``source``, preparing them first if needed.

    Returns the prepared users and whether they had to be (re)built.
    """
    if not source.is_file():
        raise DataError(f"{source}: file not found")
    try:
        prepared_dir.mkdir(parents=True, exist_ok=True)
        lock = open(prepared_dir / ".lock", "a")  # noqa: SIM115 - held for the whole block below
    except OSError as error:
        raise DataError(
            f"cannot write prepared user features to {prepared_dir} ({error.strerror}); "
            "set RECOMMENDER_PREPARED_DIR to a writable directory"
        ) from error
    # One process at a time checks, builds and maps: a preparation never removes files that
    # another process is about to map.
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        signature = _signature(source, n_features)
        manifest = _read_manifest(prepared_dir)
        rebuilt = manifest is None or manifest["signature"] != signature
        if rebuilt:
            try:
                manifest = _prepare(source, prepared_dir, n_features, signature, progress)
            except OSError as error:
                raise DataError(
                    f"cannot write prepared user features to {prepared_dir} ({error})"
                ) from error
        return _open(prepared_dir, manifest), rebuilt


def _signature(source: Path, n_features: int) -> dict:
    status = source.stat()
    return {
        "format": FORMAT_VERSION,
        "source": str(source.resolve()),
        "size": status.st_size,
        "mtime_ns": status.st_mtime_ns,
        # A copy that keeps size and modification time still gets a new inode or ctime.
        "inode": status.st_ino,
        "ctime_ns": status.st_ctime_ns,
        "n_features": n_features,
    }


def _read_manifest(prepared_dir: Path) -> dict | None:
    try:
        manifest = json.loads((prepared_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    files = [manifest.get("features"), manifest.get("ids")]
    if not all(isinstance(name, str) and (prepared_dir / name).is_file() for name in files):
        return None
    return manifest


def _prepare(
    source: Path,
    prepared_dir: Path,
    n_features: int,
    signature: dict,
    progress: Callable[[str], None] | None,
) -> dict:
    prepared_dir.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    features_name, ids_name = f"features-{token}.npy", f"ids-{token}.npy"
    source_sha256 = file_sha256(source)
    n_rows = count_rows(source)
    dtype = user_feature_dtype(source, n_features)

    matrix = np.lib.format.open_memmap(
        prepared_dir / features_name, mode="w+", dtype=dtype, shape=(n_rows, n_features)
    )
    ids: list[str] = []
    checks = UserChecks(source.name)
    for batch, read in iter_valid_users(source, n_features, checks):
        matrix[len(ids) : len(ids) + len(batch.ids)] = batch.features
        ids.extend(batch.ids)
        if progress is not None:
            progress(f"prepared {read}/{n_rows} users")

    matrix.flush()
    del matrix
    np.save(prepared_dir / ids_name, np.array(ids, dtype=str))

    skipped = checks.reports()
    manifest = {
        "signature": signature,
        "features": features_name,
        "ids": ids_name,
        "n_users": len(ids),
        "source_sha256": source_sha256,
        "skipped": [vars(report) for report in skipped],
    }
    _write_atomically(prepared_dir / MANIFEST, json.dumps(manifest, indent=2))
    _remove_unreferenced(prepared_dir, {features_name, ids_name, MANIFEST})
    return manifest


def _open(prepared_dir: Path, manifest: dict) -> PreparedUsers:
    # Rows past n_users are space left by skipped rows of the source file.
    features = np.load(prepared_dir / manifest["features"], mmap_mode="r")[: manifest["n_users"]]
    ids = np.load(prepared_dir / manifest["ids"])
    skipped = [Skipped(**report) for report in manifest["skipped"]]
    return PreparedUsers(
        ids=ids, features=features, skipped=skipped, source_sha256=manifest["source_sha256"]
    )


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _remove_unreferenced(prepared_dir: Path, keep: set[str]) -> None:
    for path in prepared_dir.glob("*.npy"):
        if path.name not in keep:
            path.unlink(missing_ok=True)
