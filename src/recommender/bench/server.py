"""Starting a server to measure, and reading its memory."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx


class ServerProcess:
    """``recommender serve`` in a process group of its own, stopped on exit."""

    def __init__(self, port: int, options: list[str], log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.command = [sys.executable, "-m", "recommender.cli", "serve", "--port", str(port)]
        self.command += options
        self.log = log
        self.process: subprocess.Popen | None = None
        self.ready_seconds = 0.0

    def __enter__(self) -> "ServerProcess":
        started = time.perf_counter()
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited; see {self.log}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    self.ready_seconds = time.perf_counter() - started
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the server did not become ready; see {self.log}")

    def __exit__(self, *exc_info: object) -> None:
        if self.process is None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def pss_megabytes(self) -> float:
        """Proportional set size of the master and its workers, in MB (shared pages split)."""
        return sum(_smaps_rollup(pid).get("Pss", 0) for pid in _tree(self.process.pid)) / 1024

    def worker_pids(self) -> list[int]:
        """The master's children, the Gunicorn workers; empty once the master is gone."""
        try:
            return sorted(worker_pids(self.process.pid))
        except (FileNotFoundError, ProcessLookupError):
            return []


def process_usage(pid: int) -> dict[str, float] | None:
    """Memory and CPU time of one process, or None if it has gone.

    ``rss_mb`` counts every resident page, shared or not; ``pss_mb`` splits shared pages
    among their sharers; ``private_dirty_mb`` counts the pages only this process has written
    (its own heap, and shared pages it has copied on write), where a leak shows first.
    ``cpu_seconds`` is user plus system time since the process started.
    """
    try:
        memory = _smaps_rollup(pid)
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return {
        "rss_mb": memory.get("Rss", 0) / 1024,
        "pss_mb": memory.get("Pss", 0) / 1024,
        "private_dirty_mb": memory.get("Private_Dirty", 0) / 1024,
        # utime and stime, fields 14 and 15 of stat; pid and name (fields 1 and 2) are cut off.
        "cpu_seconds": (int(fields[11]) + int(fields[12])) / ticks,
    }


def worker_pids(master_pid: int) -> set[int]:
    """The live (not zombie) child processes of ``master_pid``: Gunicorn's workers."""
    children = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses; the fields after it do not.
        state, parent = stat[stat.rindex(")") + 2 :].split()[:2]
        if int(parent) == master_pid and state not in "ZX":
            children.add(int(entry.name))
    return children


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _tree(pid: int) -> list[int]:
    return [pid, *(descendant for child in _children(pid) for descendant in _tree(child))]


def _smaps_rollup(pid: int) -> dict[str, int]:
    """The kB fields of /proc/<pid>/smaps_rollup by name (``Rss``, ``Pss``, ...)."""
    sizes = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if rest.endswith(" kB"):
            sizes[name] = int(rest.split()[0])
    return sizes
