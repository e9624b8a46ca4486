#!/usr/bin/env python3
"""Run the project from a fresh clone with nothing but Python 3.

    python3 dev.py serve [OPTIONS]     serve the API (generates the default data on first run)
    python3 dev.py test [PYTEST ARGS]  run the test suite
    python3 dev.py run COMMAND [ARGS]  run any command inside the project's environment,
                                       e.g. python3 dev.py run recommender recommend --help

The first call creates .venv and installs the pinned dependencies from requirements.lock;
later calls reinstall only when requirements.lock or pyproject.toml changed.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".installed-from"
LOCK_INPUTS = (ROOT / "requirements.lock", ROOT / "pyproject.toml")


def main(argv: list[str]) -> int:
    """Dispatch ``serve``, ``test`` or ``run``; returns the exit status."""
    if not argv or argv[0] not in ("serve", "test", "run"):
        print(__doc__, file=sys.stderr)
        return 2
    ensure_environment()
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return _exec([str(BIN / "recommender"), "serve", *rest])
    if command == "test":
        return _exec([str(BIN / "python"), "-m", "pytest", *rest])
    if not rest:
        print("dev.py run: name a command to run", file=sys.stderr)
        return 2
    return _exec(rest)


def ensure_environment() -> None:
    """Create .venv and install the locked dependencies unless already up to date."""
    wanted = _fingerprint()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    if not (BIN / "python").exists():
        print("creating .venv ...", file=sys.stderr)
        try:
            venv.create(VENV, with_pip=True)
        except Exception as error:  # noqa: BLE001 - any failure here has the same remedy
            sys.exit(
                f"could not create a virtual environment ({error}); on Debian or Ubuntu "
                "install it with: apt-get install python3-venv"
            )
    print("installing pinned dependencies from requirements.lock ...", file=sys.stderr)
    pip = [str(BIN / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "-r", str(ROOT / "requirements.lock")], check=True)
    subprocess.run([*pip, "install", "--no-deps", "-e", str(ROOT)], check=True)
    STAMP.write_text(wanted)


def _fingerprint() -> str:
    digest = hashlib.sha256()
    for path in LOCK_INPUTS:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _exec(command: list[str]) -> int:
    """Replace this process with ``command``, so signals reach the server directly."""
    os.chdir(ROOT)
    env = dict(os.environ, VIRTUAL_ENV=str(VENV), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    executable = shutil.which(command[0], path=env["PATH"])
    if executable is None:
        print(f"dev.py: no command {command[0]!r} in the project's environment", file=sys.stderr)
        return 127
    os.execve(executable, command, env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
