"""The ``recommender`` command: one answer without a server, and the default data on first serve."""

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import recommender.dataset.generate as generate_module
import recommender.observability as observability
import recommender.server as server_module
from recommender import cli
from recommender.contract import render
from recommender.dataset.generate import generate
from recommender.ranking import Query
from recommender.service import Recommender, load_recommender
from recommender.settings import Settings

RECOMMENDER = Path(sys.executable).with_name("recommender")
SMALL = {"n_users": 50, "n_restaurants": 80, "n_features": 4, "n_requests": 10}


def _run(data_dir: Path, tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("RECOMMENDER_")}
    env["RECOMMENDER_PREPARED_DIR"] = str(tmp_path / "prepared")
    return subprocess.run(
        [str(RECOMMENDER), "recommend", "--data-dir", str(data_dir), *arguments],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_recommend_prints_the_api_answer(
    data_dir: Path, tmp_path: Path, recommender: Recommender
) -> None:
    arguments = ["--latitude", "13.8", "--longitude", "100.5", "--size", "50.0"]

    finished = _run(data_dir, tmp_path, "u001", *arguments, "--max-dis", "1e4", "--sort-dis", "1")

    assert finished.returncode == 0, finished.stderr
    query = Query(13.8, 100.5, 50, 10000.0, True)
    expected = render(asyncio.run(recommender.recommend("u001", query)))
    assert finished.stdout == expected.decode() + "\n"


def test_recommend_exits_non_zero_naming_an_unknown_user(data_dir: Path, tmp_path: Path) -> None:
    finished = _run(data_dir, tmp_path, "u999999", "--latitude", "13.8", "--longitude", "100.5")

    assert finished.returncode != 0
    assert finished.stdout == ""
    assert "unknown user 'u999999'" in finished.stderr


def test_recommend_exits_non_zero_saying_what_a_bad_parameter_allows(
    data_dir: Path, tmp_path: Path
) -> None:
    arguments = ["--latitude", "13.8", "--longitude", "100.5", "--size", "2.5"]

    finished = _run(data_dir, tmp_path, "u001", *arguments)

    assert finished.returncode != 0
    assert finished.stdout == ""
    assert "size must be a whole number from 1 to 1000; got '2.5'" in finished.stderr


@pytest.fixture
def bare_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """An empty working directory, no RECOMMENDER_* variables, and no real Gunicorn.

    Returns the arguments each call to ``serve`` received.
    """
    for name in list(os.environ):
        if name.startswith("RECOMMENDER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    served = []
    # The server's logging configuration would replace pytest's log capture.
    monkeypatch.setattr(observability, "configure_logging", lambda *arguments: None)
    # As the real server does, the recommender is loaded before anything is served.
    monkeypatch.setattr(
        server_module, "serve", lambda load, settings: served.append((load(), settings))
    )
    return served


def test_serve_generates_the_default_data_directory_when_none_is_configured(
    bare_environment: list[tuple], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default data (100,000 users x 1,000 features) is too large for a test: the same
    # path runs with the generator's sizes shrunk.
    real_generate = generate_module.generate
    monkeypatch.setattr(
        generate_module, "generate", lambda out, **kwargs: real_generate(out, **kwargs | SMALL)
    )

    status = cli.main(["serve"])

    assert status == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data"]
    recommender, settings = bare_environment[0]
    assert settings.data_dir == Path("data")
    assert recommender.report.n_users == SMALL["n_users"]


@pytest.mark.parametrize("given_by", ["option", "environment"])
def test_serve_refuses_a_configured_data_dir_that_does_not_exist(
    bare_environment: list[tuple],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    given_by: str,
) -> None:
    monkeypatch.setattr(generate_module, "generate", _must_not_generate)
    arguments = ["serve"]
    if given_by == "option":
        arguments += ["--data-dir", "missing"]
    else:
        monkeypatch.setenv("RECOMMENDER_DATA_DIR", "missing")

    status = cli.main(arguments)

    assert status != 0
    assert bare_environment == []
    assert "missing" in caplog.text
    assert list(tmp_path.iterdir()) == []


def _must_not_generate(*arguments: object, **kwargs: object) -> None:
    raise AssertionError("generated data for a configured data directory")


def test_recommend_warns_about_skipped_rows(tmp_path: Path) -> None:
    data = tmp_path / "data"
    generate(data, n_users=20, n_restaurants=30, n_features=4, n_requests=1, seed=3)
    table = pq.read_table(data / "restaurant.parquet").to_pydict()
    table["latitude"][0] = "not a number"
    pq.write_table(pa.table(table), data / "restaurant.parquet")

    result = _run(data, tmp_path, "u01", "--latitude", "13.8", "--longitude", "100.5")

    assert result.returncode == 0
    assert "skipped 1 rows" in result.stderr


def test_data_fit_fits_the_model_that_generate_no_model_left_out(tmp_path: Path) -> None:
    data = tmp_path / "data"
    sizes = ["--users", "20", "--restaurants", "30", "--features", "4", "--requests", "5"]
    generated = cli.main(["data", "generate", "--out", str(data), *sizes, "--no-model"])
    assert not (data / "model.pkl").exists()

    fitted = cli.main(["data", "fit", "--data-dir", str(data)])

    assert (generated, fitted) == (0, 0)
    recommender = load_recommender(Settings(data_dir=data, prepared_dir=tmp_path / "prepared"))
    assert (recommender.report.n_restaurants, recommender.report.n_features) == (30, 4)
    assert recommender.report.model_verified


def test_data_fit_without_embeddings_exits_2_saying_how_to_write_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    status = cli.main(["data", "fit", "--data-dir", str(tmp_path)])

    assert status == 2
    assert "recommender data generate --no-model" in caplog.text
    assert list(tmp_path.iterdir()) == []
