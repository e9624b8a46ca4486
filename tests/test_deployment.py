"""The container deployment: what the Dockerfile and the Compose file name must exist and fit.

No image is built or run here (there is no container engine); ``docker-compose config``
validates the Compose file, and the commands, settings, volumes and health checks that the two
files name are checked against the package itself.
"""

import argparse
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from conftest import Server, free_port, service_missing, start_server, stop_server

from recommender import cli
from recommender.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERIGNORE = ROOT / ".dockerignore"
ONE_SHOT_SERVICE = "load"
SETTING_VARIABLES = {f"RECOMMENDER_{name.upper()}" for name in Settings.model_fields}
# Bounds on waiting, not expectations of speed.
COMPOSE_TIMEOUT = 60.0
READY_TIMEOUT = 30.0


def _docker_compose(*arguments: str, env_file: Path) -> subprocess.CompletedProcess:
    executable = shutil.which("docker-compose")
    if executable is None:
        service_missing(
            "docker-compose", "no docker-compose on PATH (apt-get install docker-compose)"
        )
    # Only what docker-compose needs: no variable of this shell may change the interpolation.
    env = {name: os.environ[name] for name in ("PATH", "HOME", "LANG") if name in os.environ}
    return subprocess.run(
        [executable, "--env-file", str(env_file), "--file", str(COMPOSE_FILE), *arguments],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=COMPOSE_TIMEOUT,
    )


@pytest.fixture(scope="module")
def empty_env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty ``.env`` file, so that the defaults written in the Compose file apply."""
    path = tmp_path_factory.mktemp("compose") / "empty.env"
    path.write_text("")
    return path


@pytest.fixture(scope="module")
def resolved(empty_env_file: Path) -> subprocess.CompletedProcess:
    """``docker-compose config``: the Compose file resolved (interpolated, merged) as YAML."""
    finished = _docker_compose("config", env_file=empty_env_file)
    assert finished.returncode == 0, finished.stderr
    return finished


@pytest.fixture(scope="module")
def services(resolved: subprocess.CompletedProcess) -> dict:
    """The Compose file's services as docker-compose resolves them."""
    return yaml.safe_load(resolved.stdout)["services"]


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    instructions, pending = [], ""
    for line in dockerfile.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        keyword, _, arguments = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def _image_instructions() -> list[tuple[str, str]]:
    """The instructions of the Dockerfile's last stage: the image that runs."""
    instructions = _instructions(DOCKERFILE.read_text())
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from + 1 :]


def _only(instructions: list[tuple[str, str]], keyword: str) -> str:
    found = [arguments for name, arguments in instructions if name == keyword]
    assert len(found) == 1, f"expected one {keyword} in the image's stage, found {len(found)}"
    return found[0]


def _image_health_check() -> list[str]:
    """The argument vector of the image's HEALTHCHECK (exec form)."""
    arguments = _only(_image_instructions(), "HEALTHCHECK")
    form = re.match(r"(?:--\S+\s+)*CMD\s+(\[.*\])$", arguments)
    assert form is not None, f"HEALTHCHECK is not in the form [--options] CMD [...]: {arguments}"
    return json.loads(form[1])


def _recommender_command(argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed by the ``recommender`` command line; fails the test if it does not parse."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv[0] in scripts, f"{argv[0]!r} is not one of the package's commands {list(scripts)}"
    try:
        return cli._parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"not a valid recommender command: {shlex.join(argv)}")


def _recommender_lines(script: str) -> list[list[str]]:
    """The ``recommender`` commands a shell script runs, one argument vector per line."""
    commands = []
    for line in script.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["exec"]:
            words = words[1:]
        if words[:1] == ["recommender"]:
            commands.append(words)
    return commands


def test_compose_file_passes_docker_compose_validation(empty_env_file: Path) -> None:
    finished = _docker_compose("config", "--quiet", env_file=empty_env_file)

    assert finished.returncode == 0, finished.stderr


def test_every_variable_the_compose_file_uses_has_a_default(
    resolved: subprocess.CompletedProcess,
) -> None:
    assert "variable is not set" not in resolved.stderr, resolved.stderr


def test_compose_runs_postgres_redis_a_load_job_and_the_api(services: dict) -> None:
    assert set(services) == {"postgres", "redis", ONE_SHOT_SERVICE, "api"}


def test_api_starts_only_after_the_load_job_succeeded_and_redis_is_healthy(
    services: dict,
) -> None:
    depends_on = services["api"]["depends_on"]

    assert depends_on["load"]["condition"] == "service_completed_successfully"
    assert depends_on["redis"]["condition"] == "service_healthy"


def test_load_job_waits_for_a_healthy_postgres_and_runs_once(services: dict) -> None:
    load = services[ONE_SHOT_SERVICE]

    assert load["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert load.get("restart", "no") == "no"


def test_every_long_running_service_has_a_health_check(services: dict) -> None:
    for name, service in services.items():
        if name == ONE_SHOT_SERVICE:
            continue
        test = service.get("healthcheck", {}).get("test", ["NONE"])
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, f"{name}: health check {test}"


def test_load_job_and_api_use_the_image_built_from_this_repository(services: dict) -> None:
    for name in (ONE_SHOT_SERVICE, "api"):
        assert Path(services[name]["build"]["context"]) == ROOT, name
    assert services[ONE_SHOT_SERVICE]["image"] == services["api"]["image"]


def test_every_recommender_variable_named_is_a_setting() -> None:
    named = {
        path.name: set(re.findall(r"RECOMMENDER_[A-Z0-9_]+", path.read_text()))
        for path in (DOCKERFILE, COMPOSE_FILE)
    }

    assert named[COMPOSE_FILE.name], "the Compose file configures the service through no variable"
    for path, variables in named.items():
        assert variables <= SETTING_VARIABLES, (
            f"{path}: no such setting {variables - SETTING_VARIABLES}"
        )


@pytest.mark.parametrize("service", [ONE_SHOT_SERVICE, "api"])
def test_service_environment_is_a_valid_configuration(
    services: dict, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in os.environ:
        if name.startswith("RECOMMENDER_"):
            monkeypatch.delenv(name)
    for name, value in services[service]["environment"].items():
        monkeypatch.setenv(name, value)

    Settings()


def test_api_reaches_the_postgres_and_redis_services_with_their_credentials(
    services: dict,
) -> None:
    environment = services["api"]["environment"]
    postgres = services["postgres"]["environment"]
    store = urlsplit(environment["RECOMMENDER_STORE"])
    cache = urlsplit(environment["RECOMMENDER_CACHE"])

    assert (store.hostname, store.port or 5432) == ("postgres", 5432)
    assert (store.username, store.password) == (
        postgres["POSTGRES_USER"],
        postgres["POSTGRES_PASSWORD"],
    )
    assert store.path == f"/{postgres['POSTGRES_DB']}"
    assert (cache.scheme, cache.hostname, cache.port or 6379) == ("redis", "redis", 6379)


def test_load_job_fills_the_database_the_api_reads(services: dict) -> None:
    load = services[ONE_SHOT_SERVICE]["environment"]
    api = services["api"]["environment"]

    assert (
        load.get("RECOMMENDER_DATABASE_URL", load.get("RECOMMENDER_STORE"))
        == api["RECOMMENDER_STORE"]
    )


def _mounts(service: dict) -> dict[str, tuple[str, str]]:
    """Each volume mount of ``service`` as target: (source, mode)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        mounts[target] = (source, mode[0] if mode else "rw")
    return mounts


def test_load_job_writes_and_the_api_reads_the_same_named_data_volume(services: dict) -> None:
    load, api = services[ONE_SHOT_SERVICE], services["api"]
    load_source, load_mode = _mounts(load)[load["environment"]["RECOMMENDER_DATA_DIR"]]
    api_source, _ = _mounts(api)[api["environment"]["RECOMMENDER_DATA_DIR"]]

    assert load_source == api_source
    assert not load_source.startswith(("/", ".")), "the data should live in a named volume"
    assert load_mode == "rw"


def test_load_job_generates_into_and_loads_from_its_data_directory(services: dict) -> None:
    load = services[ONE_SHOT_SERVICE]
    data_dir = Path(load["environment"]["RECOMMENDER_DATA_DIR"])
    # docker-compose config writes a literal $ as $$, ready to be read again.
    script = load["command"][-1].replace("$$", "$")

    commands = _recommender_lines(script)
    runs = [_recommender_command(argv).run for argv in commands]

    assert runs == [cli._generate, cli._load_database]
    generate = commands[0]
    assert Path(generate[generate.index("--out") + 1]) == data_dir


def test_image_runs_as_an_unprivileged_user() -> None:
    user = _only(_image_instructions(), "USER").split(":")[0]

    assert user not in ("root", "0")


def test_image_installs_the_locked_dependencies_then_the_package_alone() -> None:
    runs = [
        arguments
        for keyword, arguments in _instructions(DOCKERFILE.read_text())
        if keyword == "RUN"
    ]

    assert any(re.search(r"pip install [^&;]*requirements\.lock", run) for run in runs), runs
    assert any(re.search(r"pip install --no-deps \.(\s|$)", run) for run in runs), runs


def test_image_command_serves_the_api_on_every_interface() -> None:
    command = json.loads(_only(_image_instructions(), "CMD"))

    arguments = _recommender_command(command)

    assert arguments.run is cli._serve
    assert arguments.host == "0.0.0.0"
    port = arguments.port or Settings.model_fields["port"].default
    assert _only(_image_instructions(), "EXPOSE") == str(port)


def test_api_port_is_published_on_the_port_the_server_binds(services: dict) -> None:
    targets = {int(port["target"]) for port in services["api"]["ports"]}

    assert targets == {Settings.model_fields["port"].default}


def test_build_context_keeps_what_the_image_copies_and_leaves_out_the_bulk() -> None:
    patterns = [
        line.strip().lstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith(("#", "!"))
    ]

    def ignored(path: str) -> bool:
        return any(
            fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern.removeprefix("**/"))
            for pattern in patterns
        )

    copied = [
        source
        for keyword, arguments in _instructions(DOCKERFILE.read_text())
        if keyword == "COPY" and not arguments.startswith("--from")
        for source in arguments.split()[:-1]
    ]
    assert copied and not [source for source in copied if ignored(source)]
    assert all(ignored(path) for path in (".git", ".venv", "data", "bench-results"))


@pytest.fixture(scope="module")
def server(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server over the small data, for health checks to ask; started, not waited for."""
    running = start_server(data_dir, tmp_path_factory.mktemp("server"), "--workers", "1")
    try:
        yield running
    finally:
        stop_server(running)


def _health_check(argv: list[str], port: int) -> subprocess.CompletedProcess:
    """Run a health check's command here, with this interpreter, against ``port``."""
    assert argv[0] == "python", f"the health check runs {argv[0]!r}, not the image's python"
    env = {key: value for key, value in os.environ.items() if not key.startswith("RECOMMENDER_")}
    env["RECOMMENDER_PORT"] = str(port)
    return subprocess.run(
        [sys.executable, *argv[1:]], env=env, capture_output=True, text=True, timeout=30
    )


def _port(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def _passes_once_ready(argv: list[str], server: Server) -> bool:
    """Whether the health check ``argv`` passes within the timeout, trying again and again."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"server exited with {server.process.returncode}:\n{server.log_text()}")
        if _health_check(argv, _port(server)).returncode == 0:
            return True
        time.sleep(0.2)
    return False


def test_image_health_check_asks_readyz_and_passes_once_the_server_is_ready(
    server: Server,
) -> None:
    argv = _image_health_check()

    assert "/readyz" in argv[-1], argv
    assert _passes_once_ready(argv, server), server.log_text()


def test_image_health_check_fails_when_no_server_answers() -> None:
    finished = _health_check(_image_health_check(), free_port())

    assert finished.returncode != 0


def test_api_health_check_asks_readyz_and_passes_once_the_server_is_ready(
    services: dict, server: Server
) -> None:
    test = services["api"]["healthcheck"]["test"]
    default = f"127.0.0.1:{Settings.model_fields['port'].default}/readyz"
    assert test[0] == "CMD" and default in test[-1], test
    # The same command, aimed at the test's server instead of the container's port.
    argv = [*test[1:-1], test[-1].replace(default, f"127.0.0.1:{_port(server)}/readyz")]

    assert _passes_once_ready(argv, server), server.log_text()
