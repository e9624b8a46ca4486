"""The DVC pipeline in dvc.yaml builds a data directory the service loads, and only what changed.

Each test runs the repository's own dvc.yaml, with tiny parameters, in a DVC project of its own
under a temporary directory (no Git), through the dvc of the project's environment.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import yaml

from recommender.postgres.schema import USERS
from recommender.service import load_recommender
from recommender.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = {"users": 30, "restaurants": 40, "features": 4, "requests": 10, "seed": 1}
UP_TO_DATE = "Data and pipelines are up to date."
# A bound on waiting, not an expectation of speed.
DVC_TIMEOUT = 120.0


def _dvc(project: Path, *arguments: str, **settings: str) -> str:
    """Run dvc in ``project``; returns what it printed. ``settings`` become RECOMMENDER_*."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RECOMMENDER_", "DVC_"))
    }
    # The stages call `recommender`; DVC keeps its state and configuration inside the test.
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env["DVC_SITE_CACHE_DIR"] = str(project / ".dvc-site-cache")
    env["DVC_GLOBAL_CONFIG_DIR"] = str(project / ".dvc-global-config")
    env["DVC_SYSTEM_CONFIG_DIR"] = str(project / ".dvc-system-config")
    env.update({f"RECOMMENDER_{name.upper()}": value for name, value in settings.items()})
    finished = subprocess.run(
        [str(BIN / "dvc"), *arguments],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=DVC_TIMEOUT,
    )
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, f"dvc {' '.join(arguments)} failed:\n{output}"
    return output


def _write_params(project: Path, **changes: int) -> None:
    (project / "params.yaml").write_text(yaml.safe_dump({"data": TINY | changes}))


def _ran(output: str) -> set[str]:
    """The stages a dvc repro ran, by name."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A project whose data is built by `dvc repro generate fit`, and what that printed."""
    project = tmp_path_factory.mktemp("pipeline") / "project"
    project.mkdir()
    shutil.copy(ROOT / "dvc.yaml", project)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for dependency in {dep for stage in stages.values() for dep in stage.get("deps", [])}:
        if not dependency.startswith("data/"):
            (project / dependency).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / dependency, project / dependency)
    _write_params(project)
    _dvc(project, "init", "--no-scm")
    return project, _dvc(project, "repro", "generate", "fit")


@pytest.fixture
def project(built: tuple[Path, str], tmp_path: Path) -> Path:
    """A private copy of the built project, for a test to change."""
    copy = tmp_path / "project"
    shutil.copytree(built[0], copy, ignore=shutil.ignore_patterns(".dvc-site-cache"))
    return copy


def test_repro_writes_a_data_directory_the_service_loads(
    built: tuple[Path, str], tmp_path: Path
) -> None:
    project, output = built

    recommender = load_recommender(
        Settings(data_dir=project / "data", prepared_dir=tmp_path / "prepared")
    )

    assert _ran(output) == {"generate", "fit"}
    assert (recommender.report.n_users, recommender.report.n_restaurants) == (30, 40)
    assert recommender.report.n_features == 4
    assert recommender.report.model_verified


def test_a_second_repro_runs_nothing(project: Path) -> None:
    output = _dvc(project, "repro", "generate", "fit")

    assert _ran(output) == set()
    assert UP_TO_DATE in output


def test_a_new_seed_reruns_generate_and_fit(project: Path) -> None:
    model_before = (project / "data" / "model.pkl").read_bytes()
    _write_params(project, seed=2)

    output = _dvc(project, "repro", "generate", "fit")

    assert _ran(output) == {"generate", "fit"}
    assert (project / "data" / "model.pkl").read_bytes() != model_before


def test_more_requests_regenerate_the_data_but_keep_the_model(project: Path) -> None:
    model_before = (project / "data" / "model.pkl").read_bytes()
    _write_params(project, requests=TINY["requests"] + 5)

    output = _dvc(project, "repro", "generate", "fit")

    assert _ran(output) == {"generate"}
    assert (project / "data" / "model.pkl").read_bytes() == model_before


def test_load_stage_loads_the_data_and_writes_a_receipt(project: Path, database_url: str) -> None:
    output = _dvc(project, "repro", "load", database_url=database_url)
    again = _dvc(project, "repro", "load", database_url=database_url)

    assert _ran(output) == {"load"}
    receipt = json.loads((project / "data" / "db-load.json").read_text())
    assert (receipt["n_users"], receipt["n_restaurants"], receipt["n_features"]) == (30, 40, 4)
    with psycopg.connect(database_url) as connection:
        assert connection.execute(f"SELECT count(*) FROM {USERS}").fetchone() == (30,)
    assert _ran(again) == set()
