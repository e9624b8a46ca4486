"""The soak's arithmetic: windows, percentiles, memory growth, worker changes and the verdict."""

import numpy as np
import pytest

from recommender.bench.load import OpenLoopTrace
from recommender.bench.soak import (
    P99_DRIFT_LIMIT,
    P99_SPREAD_LIMIT,
    PRIVATE_DIRTY_GROWTH_LIMIT_PERCENT,
    memory_growth,
    p99_stability,
    summarize,
    summary_lines,
    window_bounds,
    window_stats,
    with_usage,
    worker_changes,
)


def _trace(rate: float, latency_ms: list[float], status=None, send_lag_ms=None) -> OpenLoopTrace:
    count = len(latency_ms)
    return OpenLoopTrace(
        rate=rate,
        seconds=count / rate,
        scheduled_s=np.arange(count) / rate,
        send_lag_ms=np.zeros(count) if send_lag_ms is None else np.asarray(send_lag_ms, float),
        latency_ms=np.asarray(latency_ms, dtype=float),
        status=np.full(count, 200) if status is None else np.asarray(status),
    )


def _worker(pid: int, rss: float, pss: float = 100.0, dirty: float = 10.0, cpu: float = 0.0):
    return {"pid": pid, "rss_mb": rss, "pss_mb": pss, "private_dirty_mb": dirty, "cpu_seconds": cpu}


def _sample(offset: float, *workers: dict, client_cpu: float = 0.0) -> dict:
    return {"offset_s": offset, "workers": list(workers), "client_cpu_seconds": client_cpu}


def _window(p99: float, errors: int = 0, sent: float = 500.0) -> dict:
    return {
        "requests": 100,
        "errors": errors,
        "transport_errors": 0,
        "p99_ms": p99,
        "sent_per_second": sent,
        "send_lag_p99_ms": 1.0,
    }


def _steady_samples(count: int = 3) -> list[dict]:
    return [_sample(60.0 * k, _worker(1, 1000.0), _worker(2, 1000.0)) for k in range(count)]


def test_windows_cover_the_duration_and_only_the_last_may_be_shorter():
    assert window_bounds(600, 60) == [(60.0 * k, 60.0 * (k + 1)) for k in range(10)]
    assert window_bounds(150, 60) == [(0, 60), (60, 120), (120, 150)]
    assert window_bounds(30, 60) == [(0, 30)]


def test_each_window_holds_the_latencies_of_the_requests_scheduled_in_it():
    first, second = list(range(1, 21)), list(range(101, 121))
    windows = window_stats(_trace(10.0, first + second), window_bounds(4, 2))

    assert [window["requests"] for window in windows] == [20, 20]
    assert [window["p50_ms"] for window in windows] == [10.5, 110.5]
    assert [window["max_ms"] for window in windows] == [20, 120]
    assert windows[0]["p99_ms"] == pytest.approx(np.percentile(first, 99), abs=1e-3)


def test_requests_scheduled_before_the_first_window_count_in_none():
    trace = _trace(10.0, [1000.0] * 10 + [1.0] * 10)
    warmed_up = OpenLoopTrace(**{**vars(trace), "scheduled_s": trace.scheduled_s - 1.0})

    (window,) = window_stats(warmed_up, window_bounds(1, 1))

    assert window["requests"] == 10
    assert window["max_ms"] == 1.0


def test_every_answer_but_200_and_every_missing_answer_is_an_error():
    statuses = [200, 404, 500, 503, -1, 200]
    (window,) = window_stats(_trace(6.0, [1.0] * 6, status=statuses), window_bounds(1, 1))

    assert window["ok"] == 2
    assert window["errors"] == 4
    assert window["transport_errors"] == 1


def test_a_client_behind_its_schedule_sends_fewer_requests_in_the_window():
    lag_ms = [0.0] * 10 + [1000.0] * 10
    windows = window_stats(_trace(10.0, [1.0] * 20, send_lag_ms=lag_ms), window_bounds(2, 1))

    assert [window["sent_per_second"] for window in windows] == [10.0, 0.0]
    assert windows[1]["send_lag_p99_ms"] == 1000.0
    assert windows[1]["send_lag_max_ms"] == 1000.0
    summary = summarize(windows, _steady_samples(), [1, 2], rate=10.0)
    assert summary["checks"]["client_kept_rate"] is False
    assert summary["passed"] is False


def test_each_window_gets_the_memory_at_its_end_and_the_cpu_share_during_it():
    samples = [
        _sample(0.0, _worker(1, 1000.0, cpu=10.0), client_cpu=5.0),
        _sample(60.0, _worker(1, 1010.0, cpu=40.0), client_cpu=20.0),
    ]

    (window,) = with_usage([{"p99_ms": 1.0}], samples)

    assert window["workers"] == [
        {"pid": 1, "rss_mb": 1010.0, "pss_mb": 100.0, "private_dirty_mb": 10.0, "cpu_percent": 50.0}
    ]
    assert window["client_cpu_percent"] == 25.0
    assert window["p99_ms"] == 1.0


def test_memory_growth_is_the_percent_change_from_the_first_sample_to_the_last():
    samples = [
        _sample(0.0, _worker(1, 1000.0, pss=500.0, dirty=20.0)),
        _sample(60.0, _worker(1, 1500.0, pss=900.0, dirty=90.0)),
        _sample(120.0, _worker(1, 1020.0, pss=495.0, dirty=30.0)),
    ]

    (growth,) = memory_growth(samples)

    assert growth["rss_first_mb"] == 1000.0
    assert growth["rss_last_mb"] == 1020.0
    assert growth["rss_growth_percent"] == 2.0
    assert growth["pss_growth_percent"] == -1.0
    assert growth["private_dirty_growth_percent"] == 50.0


def test_private_dirty_memory_growing_beyond_the_limit_fails_the_soak():
    grown = 20.0 * (1 + (PRIVATE_DIRTY_GROWTH_LIMIT_PERCENT + 1) / 100)
    samples = [
        _sample(0.0, _worker(1, 1000.0, dirty=20.0), _worker(2, 1000.0, dirty=20.0)),
        _sample(60.0, _worker(1, 1000.0, dirty=20.0), _worker(2, 1000.0, dirty=grown)),
    ]

    summary = summarize([_window(5.0)], samples, [1, 2], rate=500.0)

    assert summary["checks"]["private_memory_growth_within_limit"] is False
    assert summary["passed"] is False


def test_shared_pages_faulted_in_grow_rss_and_pss_without_failing_the_soak():
    samples = [
        _sample(0.0, _worker(1, 400.0, pss=170.0, dirty=25.0)),
        _sample(60.0, _worker(1, 440.0, pss=180.0, dirty=25.0)),
    ]

    summary = summarize([_window(5.0)], samples, [1], rate=500.0)

    assert summary["memory"][0]["rss_growth_percent"] == 10.0
    assert summary["checks"]["private_memory_growth_within_limit"] is True
    assert summary["passed"] is True


def test_a_replaced_worker_is_reported_where_it_changed_and_fails_the_soak():
    samples = [
        _sample(0.0, _worker(1, 1000.0), _worker(2, 1000.0)),
        _sample(60.0, _worker(1, 1000.0), _worker(2, 1000.0)),
        _sample(120.0, _worker(1, 1000.0), _worker(3, 900.0)),
        _sample(180.0, _worker(1, 1000.0), _worker(3, 950.0)),
    ]

    assert worker_changes([1, 2], samples) == [{"offset_s": 120.0, "gone": [2], "new": [3]}]
    summary = summarize([_window(5.0)] * 3, samples, [1, 2], rate=500.0)
    assert summary["checks"]["workers_kept"] is False
    assert summary["passed"] is False
    assert {row["pid"]: row["rss_growth_percent"] for row in summary["memory"]} == {1: 0.0, 2: None}


def test_a_worker_gone_without_a_successor_is_a_change():
    samples = [_sample(0.0, _worker(1, 1000.0), _worker(2, 1000.0)), _sample(60.0, _worker(1, 1.0))]

    assert worker_changes([1, 2], samples) == [{"offset_s": 60.0, "gone": [2], "new": []}]


def test_a_worker_replaced_during_the_warm_up_is_a_change_too():
    samples = [_sample(0.0, _worker(1, 1000.0), _worker(3, 1000.0))]

    assert worker_changes([1, 2], samples) == [{"offset_s": 0.0, "gone": [2], "new": [3]}]


def test_p99_is_stable_only_within_both_the_drift_and_the_spread_limit():
    steady = p99_stability([_window(10.0), _window(11.0), _window(12.0)])
    assert steady["last_over_first"] == 1.2
    assert steady["max_over_min"] == 1.2
    assert steady["stable"] is True

    drifting = p99_stability([_window(10.0), _window(10.0 * (P99_DRIFT_LIMIT + 0.1))])
    assert drifting["stable"] is False

    spike = p99_stability([_window(10.0), _window(10.0 * (P99_SPREAD_LIMIT + 1)), _window(10.0)])
    assert spike["last_over_first"] == 1.0
    assert spike["max_over_min"] == P99_SPREAD_LIMIT + 1
    assert spike["stable"] is False


def test_one_window_leaves_p99_stability_unjudged():
    summary = summarize([_window(5.0)], _steady_samples(2), [1, 2], rate=500.0)

    assert summary["p99"]["stable"] is None
    assert "p99_stable" not in summary["checks"]
    assert summary["passed"] is True


def test_a_clean_soak_passes_every_check():
    windows = [_window(5.0), _window(5.5)]

    summary = summarize(windows, _steady_samples(), [1, 2], rate=500.0)

    assert summary["checks"] == {
        "zero_errors": True,
        "workers_kept": True,
        "private_memory_growth_within_limit": True,
        "client_kept_rate": True,
        "p99_stable": True,
    }
    assert summary["passed"] is True
    assert summary["requests"] == 200
    assert summary_lines(summary)[0].startswith("soak PASSED")


def test_a_single_error_fails_the_soak_and_the_summary_says_which_check():
    windows = [_window(5.0), _window(5.0, errors=1)]

    summary = summarize(windows, _steady_samples(), [1, 2], rate=500.0)

    assert summary["errors"] == 1
    assert summary["passed"] is False
    assert "zero_errors NO" in summary_lines(summary)[0]


def test_an_error_in_the_warm_up_fails_the_soak_too():
    windows = [_window(5.0), _window(5.0)]

    summary = summarize(windows, _steady_samples(), [1, 2], rate=500.0, warm_up_errors=1)

    assert summary["errors"] == 0
    assert summary["checks"]["zero_errors"] is False
    assert summary["passed"] is False
