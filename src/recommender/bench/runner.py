"""The benchmark's scenarios, run side by side, written to results.json and plots."""

import json
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from recommender.bench.load import LoadResult, request_paths, run_open_loop, run_wrk
from recommender.bench.server import ServerProcess
from recommender.bench.services import free_port
from recommender.bench.soak import (
    SOAK_RATE,
    WARM_UP_SECONDS,
    WINDOW_SECONDS,
    run_soak,
    summary_lines,
)

REFERENCE_RATE = 30.0
CONNECTIONS = 32
# Ten minutes of steady load: run only when named, never as part of the default run.
SOAK = "soak"
SOAK_SECONDS = 600.0


@dataclass
class Scenario:
    """One server configuration and what was measured against it."""

    name: str
    options: list[str]
    results: dict[str, dict] = field(default_factory=dict)
    memory_mb: float | None = None
    ready_seconds: float | None = None


@dataclass
class BenchPlan:
    """What to run: servers to start (or one running server) and for how long."""

    data_dir: Path
    requests_file: Path
    out: Path
    seconds: float = 30.0
    soak_seconds: float = SOAK_SECONDS
    soak_window_seconds: float = WINDOW_SECONDS
    url: str | None = None
    store: str | None = None
    cache: str | None = None
    workers: int = 2
    sweep_rates: tuple[float, ...] = (30.0, 100.0, 300.0, 600.0)
    only: tuple[str, ...] = ()


def run(plan: BenchPlan, progress: Callable[[str], None]) -> dict:
    """Run every scenario of ``plan``; write results.json and the plots; return the results."""
    plan.out.mkdir(parents=True, exist_ok=True)
    paths = request_paths(plan.requests_file)
    paths_file = plan.out / "paths.txt"
    paths_file.write_text("\n".join(paths) + "\n")

    scenarios = [s for s in _scenarios(plan) if not plan.only or s.name in plan.only]
    for scenario in scenarios:
        progress(f"scenario {scenario.name}")
        if plan.url is not None:
            _measure(scenario, plan.url, plan, paths, paths_file, progress)
            continue
        log = plan.out / f"server-{scenario.name}.log"
        with ServerProcess(free_port(), scenario.options, log) as server:
            scenario.ready_seconds = round(server.ready_seconds, 2)
            if scenario.name == SOAK:
                _soak(scenario, server, plan, paths, progress)
            else:
                _measure(scenario, server.url, plan, paths, paths_file, progress)
            scenario.memory_mb = round(server.pss_megabytes(), 1)

    results = {
        "machine": _machine(),
        "seconds_per_run": plan.seconds,
        "scenarios": [vars(scenario) for scenario in scenarios],
    }
    results["speedup_over_exhaustive"] = _speedup(scenarios)
    (plan.out / "results.json").write_text(json.dumps(results, indent=2))
    from recommender.bench.plots import plot

    plot(results, plan.out)
    return results


def _scenarios(plan: BenchPlan) -> list[Scenario]:
    if plan.url is not None:
        return [Scenario("given-server", [])]
    common = ["--data-dir", str(plan.data_dir), "--workers", str(plan.workers)]
    scenarios = [
        Scenario("embedded", common),
        Scenario("embedded-exhaustive", [*common, "--ranker", "exhaustive"]),
    ]
    if plan.store is not None:
        options = [*common, "--store", plan.store]
        if plan.cache is not None:
            options += ["--cache", plan.cache]
        scenarios.append(Scenario("postgresql-redis" if plan.cache else "postgresql", options))
    if SOAK in plan.only:
        scenarios.append(Scenario(SOAK, common))
    return scenarios


def _measure(
    scenario: Scenario,
    url: str,
    plan: BenchPlan,
    paths: list[str],
    paths_file: Path,
    progress: Callable[[str], None],
) -> None:
    run_wrk(url, paths_file, CONNECTIONS, 2)  # warm connections, caches and page tables
    fixed = run_open_loop(url, paths, REFERENCE_RATE, plan.seconds)
    scenario.results[f"fixed-{REFERENCE_RATE:g}/s"] = fixed.as_dict()
    progress(f"  fixed {REFERENCE_RATE:g}/s: {_line(fixed)}")
    maximum = run_wrk(url, paths_file, CONNECTIONS, plan.seconds)
    scenario.results[f"max-{CONNECTIONS}-connections"] = maximum.as_dict()
    progress(f"  {CONNECTIONS} connections: {_line(maximum)}")
    if scenario.name in ("embedded", "given-server"):
        for rate in plan.sweep_rates:
            if rate == REFERENCE_RATE:
                continue
            swept = run_open_loop(url, paths, rate, min(plan.seconds, 10.0))
            scenario.results[f"fixed-{rate:g}/s"] = swept.as_dict()
            progress(f"  fixed {rate:g}/s: {_line(swept)}")


def _soak(
    scenario: Scenario,
    server: ServerProcess,
    plan: BenchPlan,
    paths: list[str],
    progress: Callable[[str], None],
) -> None:
    progress(
        f"  {SOAK_RATE:g} requests/s for {WARM_UP_SECONDS:g} s of warm-up, then "
        f"{plan.soak_seconds:g} s in windows of {plan.soak_window_seconds:g} s"
    )
    record = run_soak(
        server, paths, plan.soak_seconds, progress, window_seconds=plan.soak_window_seconds
    )
    scenario.results[SOAK] = record
    for line in summary_lines(record["summary"]):
        progress(line)
    load = record["load_average_1_5_15"]
    progress(
        f"  machine load average (1 min) {load['before'][0]:.1f} before, "
        f"{load['after'][0]:.1f} after"
    )


def _line(result: LoadResult) -> str:
    return (
        f"{result.per_second:.0f} req/s, p50 {result.p50_ms:.2f} ms, p90 {result.p90_ms:.2f} ms, "
        f"p99 {result.p99_ms:.2f} ms, max {result.max_ms:.1f} ms, errors {result.errors}"
    )


def _speedup(scenarios: list[Scenario]) -> float | None:
    by_name = {scenario.name: scenario for scenario in scenarios}
    if "embedded" not in by_name or "embedded-exhaustive" not in by_name:
        return None
    key = f"max-{CONNECTIONS}-connections"
    fast = by_name["embedded"].results[key]["requests_per_second"]
    slow = by_name["embedded-exhaustive"].results[key]["requests_per_second"]
    return round(fast / slow, 1) if slow else None


def _machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "system": platform.platform(),
    }
