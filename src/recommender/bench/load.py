"""Load generators: wrk for maximum throughput, an open-loop client for a fixed rate."""

import asyncio
import json
import math
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import aiohttp
import numpy as np
import pyarrow.parquet as pq


@dataclass
class LoadResult:
    """What one load run measured; latencies in milliseconds."""

    requests: int
    seconds: float
    ok: int
    not_found: int
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @property
    def per_second(self) -> float:
        """Completed requests per second."""
        return self.requests / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict:
        """The fields and the rate, for results.json."""
        return {**asdict(self), "requests_per_second": round(self.per_second, 1)}


def request_paths(requests_file: Path) -> list[str]:
    """The request.parquet rows as the query strings a client sends (NaN written as ``nan``)."""
    paths = []
    for row in pq.read_table(requests_file).to_pylist():
        parameters = "&".join(
            f"{name}={_text(row[name])}"
            for name in ("latitude", "longitude", "size", "max_dis", "sort_dis")
        )
        paths.append(f"/recommend/{row['user_id']}?{parameters}")
    return paths


def _text(value: object) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return str(value)


def run_wrk(url: str, paths_file: Path, connections: int, seconds: float) -> LoadResult:
    """Closed-loop maximum throughput with wrk (one thread: a second core serves)."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed; on Debian or Ubuntu: apt-get install wrk")
    script = resources.files("recommender.bench") / "replay.lua"
    with resources.as_file(script) as script_path:
        output = subprocess.run(
            [
                wrk,
                "-t1",
                f"-c{connections}",
                f"-d{seconds:g}s",
                "-s",
                str(script_path),
                url,
                "--",
                str(paths_file),
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 60,
        ).stdout
    line = next(line for line in output.splitlines() if line.startswith("WRK_JSON "))
    fields = json.loads(line.removeprefix("WRK_JSON "))
    return LoadResult(
        requests=fields["requests"],
        seconds=fields["seconds"],
        ok=fields["ok"],
        not_found=fields["not_found"],
        errors=fields["other_status"] + fields["socket_errors"],
        p50_ms=fields["p50_ms"],
        p90_ms=fields["p90_ms"],
        p99_ms=fields["p99_ms"],
        max_ms=fields["max_ms"],
    )


@dataclass
class OpenLoopTrace:
    """Every request of one open-loop run, in schedule order.

    ``scheduled_s`` is each request's intended send time in seconds after the first;
    ``send_lag_ms`` how much later the client actually began it (its own delay, not the
    server's); ``latency_ms`` the time from the intended send to the whole response, so a
    stalled server or client shows as latency; ``status`` the HTTP status, -1 for a transport
    error or timeout. Arrays of shape (n_requests,).
    """

    rate: float
    seconds: float
    scheduled_s: np.ndarray
    send_lag_ms: np.ndarray
    latency_ms: np.ndarray
    status: np.ndarray


def run_open_loop(url: str, paths: list[str], rate: float, seconds: float) -> LoadResult:
    """Requests sent on a fixed schedule, whatever the server does (open loop).

    Latency counts from the scheduled send time, so a stalled server shows as latency
    instead of as a slower schedule.
    """
    trace = trace_open_loop(url, paths, rate, seconds)
    latencies, statuses = trace.latency_ms, trace.status
    return LoadResult(
        requests=len(statuses),
        seconds=trace.seconds,
        ok=int((statuses == 200).sum()),
        not_found=int((statuses == 404).sum()),
        errors=int(((statuses != 200) & (statuses != 404)).sum()),
        p50_ms=float(np.percentile(latencies, 50)),
        p90_ms=float(np.percentile(latencies, 90)),
        p99_ms=float(np.percentile(latencies, 99)),
        max_ms=float(np.max(latencies)),
    )


def trace_open_loop(
    url: str, paths: list[str], rate: float, seconds: float, start: float | None = None
) -> OpenLoopTrace:
    """Send ``rate`` requests per second for ``seconds`` in open loop; record each request.

    ``start`` is the ``time.perf_counter()`` instant of the first send (default: shortly
    after the call), so a caller can sample something else on the same clock.
    """
    return asyncio.run(_open_loop(url, paths, rate, seconds, start))


async def _open_loop(
    url: str, paths: list[str], rate: float, seconds: float, start: float | None
) -> OpenLoopTrace:
    count = max(1, int(rate * seconds))
    began = np.full(count, np.nan)
    latencies = np.full(count, np.nan)
    statuses = np.zeros(count, dtype=np.int64)
    connector = aiohttp.TCPConnector(limit=256)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as client:

        async def one(i: int, scheduled: float) -> None:
            began[i] = time.perf_counter()
            try:
                async with client.get(paths[i % len(paths)]) as response:
                    await response.read()
                    statuses[i] = response.status
            except (aiohttp.ClientError, TimeoutError):
                statuses[i] = -1
            latencies[i] = (time.perf_counter() - scheduled) * 1000

        if start is None:
            start = time.perf_counter() + 0.1
        pending = set()
        for i in range(count):
            scheduled = start + i / rate
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            task = asyncio.create_task(one(i, scheduled))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
        elapsed = time.perf_counter() - start
    scheduled_s = np.arange(count) / rate
    return OpenLoopTrace(
        rate=rate,
        seconds=elapsed,
        scheduled_s=scheduled_s,
        send_lag_ms=(began - start - scheduled_s) * 1000,
        latency_ms=latencies,
        status=statuses,
    )
