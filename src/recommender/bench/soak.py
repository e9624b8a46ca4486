"""The soak: one server under a steady open-loop rate for minutes, watched window by window.

A soak shows what a short run cannot: memory that grows with every request, latency that
creeps up, workers that die and are replaced. The load runs without a break; after a warm-up
it is cut into windows (60 s by default), and each worker's memory and CPU time are sampled at
the start of the first window and at the end of every window.
"""

import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from recommender.bench.load import OpenLoopTrace, trace_open_loop
from recommender.bench.server import ServerProcess, process_usage

SOAK_RATE = 500.0
WINDOW_SECONDS = 60.0
# Long enough for the memory to settle, so that growth from the first sample to the last is
# growth under steady load: at 500 requests/s with the reference data, a worker's RSS stops
# growing (it has faulted in the whole shared data set) about 40 s into the load, and its
# private dirty memory (objects copied on write, allocator arenas) between 40 and 70 s in.
WARM_UP_SECONDS = 60.0

# The verdict's limits. The machine is shared and noisy: a p99 within 1.5 times the first
# window's at the end, and never more than twice the best window's, is "stable".
P99_DRIFT_LIMIT = 1.5
P99_SPREAD_LIMIT = 2.0
# A worker's RSS and PSS keep growing for minutes as it faults in more of the shared data set
# (the restaurant embeddings of every new neighbourhood asked about): pages the master mapped
# once, no leak. A leak lands in the pages only the worker has written, its private dirty
# memory (about 25 MB): the limit, 5% of it over ten minutes at 500 requests/s with each worker
# answering half, is under 10 bytes a request.
PRIVATE_DIRTY_GROWTH_LIMIT_PERCENT = 5.0
# The client keeps the rate if every window sent at least 99% of the requests it should have.
SEND_RATE_TOLERANCE = 0.01


def run_soak(
    server: ServerProcess,
    paths: list[str],
    seconds: float,
    progress: Callable[[str], None],
    rate: float = SOAK_RATE,
    window_seconds: float = WINDOW_SECONDS,
    warm_up_seconds: float = WARM_UP_SECONDS,
) -> dict:
    """Soak ``server`` at ``rate`` requests/s for ``seconds`` after a warm-up; return the record.

    The record holds the windows (requests, errors, latency percentiles in ms, the client's
    send rate, each worker's memory in MB and CPU share at the window's end), the memory
    samples themselves, and a summary with the verdict (see ``summarize``).
    """
    if seconds <= 0 or window_seconds <= 0:
        raise ValueError(
            f"the soak needs a positive duration and window, not {seconds} s and {window_seconds} s"
        )
    bounds = window_bounds(seconds, window_seconds)
    start = time.perf_counter() + 0.5
    sample_offsets = [0.0, *(end for _, end in bounds)]
    start_pids = server.worker_pids()
    load_before = os.getloadavg()
    sampler = _Sampler(server, start + warm_up_seconds, sample_offsets, progress)
    sampler.start()
    trace = trace_open_loop(server.url, paths, rate, warm_up_seconds + seconds, start=start)
    sampler.join()

    soaked = replace(trace, scheduled_s=trace.scheduled_s - warm_up_seconds)
    (warm_up,) = window_stats(soaked, [(-warm_up_seconds, 0.0)])
    windows = with_usage(window_stats(soaked, bounds), sampler.samples)
    return {
        "rate": rate,
        "seconds": seconds,
        "window_seconds": window_seconds,
        "warm_up_seconds": warm_up_seconds,
        "worker_pids_at_start": start_pids,
        # Other work on the machine competes for the same cores. The soak itself keeps less than
        # one core busy at 500 requests/s; a load average well above 1 means its latency
        # measured the neighbours too.
        "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
        "warm_up": warm_up,
        "windows": windows,
        "memory_samples": sampler.samples,
        "summary": summarize(
            windows, sampler.samples, start_pids, rate, warm_up_errors=warm_up["errors"]
        ),
    }


class _Sampler(threading.Thread):
    """Samples the workers' memory and CPU time at given offsets from ``origin``.

    A thread of its own, so reading /proc (a few ms per worker for a large mapping) does not
    hold up the client's sends; the reads release the GIL while the kernel works.
    """

    def __init__(
        self,
        server: ServerProcess,
        origin: float,
        offsets: list[float],
        progress: Callable[[str], None],
    ) -> None:
        super().__init__(name="soak-sampler", daemon=True)
        self.server = server
        self.origin = origin
        self.offsets = offsets
        self.progress = progress
        self.samples: list[dict] = []

    def run(self) -> None:
        for offset in self.offsets:
            time.sleep(max(0.0, self.origin + offset - time.perf_counter()))
            sample = self._sample(offset)
            self.samples.append(sample)
            memory = ", ".join(
                f"{worker['pid']} RSS {worker['rss_mb']:.0f} MB PSS {worker['pss_mb']:.0f} MB"
                for worker in sample["workers"]
            )
            self.progress(f"  soak {offset:.0f} s: workers {memory or 'gone'}")

    def _sample(self, offset: float) -> dict:
        started = time.perf_counter()
        workers = []
        for pid in self.server.worker_pids():
            usage = process_usage(pid)
            if usage is not None:
                workers.append({"pid": pid, **{name: round(v, 2) for name, v in usage.items()}})
        return {
            "offset_s": offset,
            "workers": workers,
            "client_cpu_seconds": round(time.process_time(), 2),
            # Milliseconds; the kernel reads a worker's memory under that worker's mmap lock,
            # so a read that takes seconds means a worker stuck in the kernel holding it.
            "read_ms": round((time.perf_counter() - started) * 1000, 1),
        }


def window_bounds(seconds: float, window_seconds: float) -> list[tuple[float, float]]:
    """Consecutive windows ``(start_s, end_s)`` covering ``seconds``; the last may be shorter."""
    count = max(1, int(np.ceil(seconds / window_seconds - 1e-9)))
    return [(i * window_seconds, min((i + 1) * window_seconds, seconds)) for i in range(count)]


def window_stats(trace: OpenLoopTrace, bounds: list[tuple[float, float]]) -> list[dict]:
    """Requests, errors and latency of each window, by scheduled send time.

    An error is any answer but 200, or no answer (``transport_errors``: refused, reset,
    timed out). ``sent_per_second`` counts the requests the client actually began inside the
    window, so a client that falls behind its schedule shows there; ``send_lag_*`` say how late
    it began them, which separates a paused client from a stalled server.
    """
    began_s = trace.scheduled_s + trace.send_lag_ms / 1000
    windows = []
    for start, end in bounds:
        scheduled = (trace.scheduled_s >= start) & (trace.scheduled_s < end)
        status = trace.status[scheduled]
        latency = trace.latency_ms[scheduled]
        lag = trace.send_lag_ms[scheduled]
        windows.append(
            {
                "start_s": start,
                "end_s": end,
                "requests": int(scheduled.sum()),
                "ok": int((status == 200).sum()),
                "errors": int((status != 200).sum()),
                "transport_errors": int((status == -1).sum()),
                "p50_ms": _percentile(latency, 50),
                "p90_ms": _percentile(latency, 90),
                "p99_ms": _percentile(latency, 99),
                "max_ms": _percentile(latency, 100),
                "sent_per_second": round(
                    float(((began_s >= start) & (began_s < end)).sum()) / (end - start), 1
                ),
                "send_lag_p99_ms": _percentile(lag, 99),
                "send_lag_max_ms": _percentile(lag, 100),
            }
        )
    return windows


def _percentile(values: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if len(values) else None


def with_usage(windows: list[dict], samples: list[dict]) -> list[dict]:
    """``windows`` with each worker's memory at the window's end and CPU share during it.

    ``samples[0]`` is taken at the start of the first window, ``samples[k]`` at the end of
    window k. CPU shares are percent of one core, for the workers and for this client.
    """
    merged = []
    for window, before, after in zip(windows, samples, samples[1:], strict=False):
        elapsed = after["offset_s"] - before["offset_s"]
        cpu_before = {worker["pid"]: worker["cpu_seconds"] for worker in before["workers"]}
        workers = [
            {
                "pid": worker["pid"],
                "rss_mb": worker["rss_mb"],
                "pss_mb": worker["pss_mb"],
                "private_dirty_mb": worker["private_dirty_mb"],
                "cpu_percent": _share(
                    worker["cpu_seconds"] - cpu_before.get(worker["pid"], 0.0), elapsed
                ),
            }
            for worker in after["workers"]
        ]
        client = after["client_cpu_seconds"] - before["client_cpu_seconds"]
        merged.append({**window, "workers": workers, "client_cpu_percent": _share(client, elapsed)})
    return merged + windows[len(merged) :]


def _share(cpu_seconds: float, elapsed: float) -> float | None:
    return round(100 * cpu_seconds / elapsed, 1) if elapsed > 0 else None


def memory_growth(samples: list[dict]) -> list[dict]:
    """Each worker's RSS, PSS and private dirty memory at the first and last sample, and growth.

    A worker missing from the last sample (it died or was replaced) has no growth.
    """
    if not samples:
        return []
    last = {worker["pid"]: worker for worker in samples[-1]["workers"]}
    growth = []
    for first in samples[0]["workers"]:
        row = {"pid": first["pid"]}
        final = last.get(first["pid"])
        for kind in ("rss", "pss", "private_dirty"):
            before = first[f"{kind}_mb"]
            after = None if final is None else final[f"{kind}_mb"]
            row[f"{kind}_first_mb"] = before
            row[f"{kind}_last_mb"] = after
            row[f"{kind}_growth_percent"] = (
                round(100 * (after - before) / before, 2) if after is not None and before else None
            )
        growth.append(row)
    return growth


def worker_changes(start_pids: list[int], samples: list[dict]) -> list[dict]:
    """Each sample at which the set of worker pids differs from the one before it.

    A pid that disappears (``gone``) or appears (``new``) means Gunicorn replaced a worker:
    it crashed, was killed, or timed out.
    """
    changes = []
    previous = set(start_pids)
    for sample in samples:
        current = {worker["pid"] for worker in sample["workers"]}
        if current != previous:
            changes.append(
                {
                    "offset_s": sample["offset_s"],
                    "gone": sorted(previous - current),
                    "new": sorted(current - previous),
                }
            )
        previous = current
    return changes


def p99_stability(windows: list[dict]) -> dict:
    """The first and last window's p99, their ratio, the range across windows, the verdict.

    ``stable`` is None with fewer than two windows: one window cannot show a trend.
    """
    values = [window["p99_ms"] for window in windows if window["p99_ms"] is not None]
    if not values:
        return {"stable": None}
    first, last, low, high = values[0], values[-1], min(values), max(values)
    drift = last / first if first else None
    spread = high / low if low else None
    stable = None
    if len(values) >= 2 and drift is not None and spread is not None:
        stable = drift <= P99_DRIFT_LIMIT and spread <= P99_SPREAD_LIMIT
    return {
        "first_ms": first,
        "last_ms": last,
        "last_over_first": None if drift is None else round(drift, 2),
        "min_ms": low,
        "max_ms": high,
        "max_over_min": None if spread is None else round(spread, 2),
        "stable": stable,
    }


def summarize(
    windows: list[dict],
    samples: list[dict],
    start_pids: list[int],
    rate: float,
    warm_up_errors: int = 0,
) -> dict:
    """Totals, p99 stability, memory growth, worker changes, the client's pace, and the verdict.

    The soak passes when no request failed (in the warm-up either), no worker was replaced,
    p99 is stable (when there are two windows or more to judge), no worker's private dirty
    memory grew beyond the limit and the client kept the rate (otherwise the server was not
    measured at the rate asked for).
    """
    growth = memory_growth(samples)
    changes = worker_changes(start_pids, samples)
    p99 = p99_stability(windows)
    sent = [window["sent_per_second"] for window in windows]
    lags = [
        window["send_lag_p99_ms"] for window in windows if window["send_lag_p99_ms"] is not None
    ]
    client_cpu = [
        window["client_cpu_percent"]
        for window in windows
        if window.get("client_cpu_percent") is not None
    ]
    private_growth = [row["private_dirty_growth_percent"] for row in growth]

    checks = {
        "zero_errors": warm_up_errors + sum(window["errors"] for window in windows) == 0,
        "workers_kept": not changes and bool(growth),
        "private_memory_growth_within_limit": bool(private_growth)
        and all(g is not None and g <= PRIVATE_DIRTY_GROWTH_LIMIT_PERCENT for g in private_growth),
        "client_kept_rate": all(value >= rate * (1 - SEND_RATE_TOLERANCE) for value in sent),
    }
    if p99["stable"] is not None:
        checks["p99_stable"] = p99["stable"]
    return {
        "requests": sum(window["requests"] for window in windows),
        "errors": sum(window["errors"] for window in windows),
        "transport_errors": sum(window["transport_errors"] for window in windows),
        "warm_up_errors": warm_up_errors,
        "p99": p99,
        "memory": growth,
        "worker_changes": changes,
        "client": {
            "rate": rate,
            "sent_per_second_min": min(sent) if sent else None,
            "send_lag_p99_ms_max": max(lags) if lags else None,
            "send_lag_max_ms": max(
                (w["send_lag_max_ms"] for w in windows if w.get("send_lag_max_ms") is not None),
                default=None,
            ),
            "cpu_percent_max": max(client_cpu) if client_cpu else None,
        },
        "checks": checks,
        "passed": all(checks.values()),
    }


def summary_lines(summary: dict) -> list[str]:
    """The summary as a few lines for a person."""
    p99, client = summary["p99"], summary["client"]
    lines = [
        f"soak {'PASSED' if summary['passed'] else 'FAILED'}: "
        + ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in summary["checks"].items()),
        f"  requests {summary['requests']}, errors {summary['errors']} "
        f"({summary['transport_errors']} without an answer), "
        f"{summary['warm_up_errors']} in the warm-up",
    ]
    if p99["stable"] is None and "first_ms" not in p99:
        lines.append("  p99: no requests")
    else:
        lines.append(
            f"  p99 first {p99['first_ms']:.2f} ms, last {p99['last_ms']:.2f} ms "
            f"(x{p99['last_over_first']}), min {p99['min_ms']:.2f} ms, max {p99['max_ms']:.2f} ms "
            f"(x{p99['max_over_min']})"
            + ("" if p99["stable"] is not None else "; one window, stability not judged")
        )
    for row in summary["memory"]:
        lines.append(
            f"  worker {row['pid']}: RSS {_growth(row, 'rss')}, PSS {_growth(row, 'pss')}, "
            f"private dirty {_growth(row, 'private_dirty')}"
        )
    for change in summary["worker_changes"]:
        lines.append(
            f"  workers changed at {change['offset_s']:.0f} s: gone {change['gone']}, "
            f"new {change['new']}"
        )
    lines.append(
        f"  client: {client['sent_per_second_min']} req/s in its slowest window of "
        f"{client['rate']:g}, sends late by up to {client['send_lag_p99_ms_max']} ms (p99) "
        f"and {client['send_lag_max_ms']} ms (max), "
        f"CPU up to {client['cpu_percent_max']}% of a core"
    )
    return lines


def _growth(row: dict, kind: str) -> str:
    first, last, percent = (
        row[f"{kind}_{part}"] for part in ("first_mb", "last_mb", "growth_percent")
    )
    if last is None:
        return f"{first:.0f} MB, then gone"
    return f"{first:.0f} -> {last:.0f} MB ({percent:+.2f}%)"
