"""PNG plots of a benchmark's results."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first


def plot(results: dict, out: Path) -> None:
    """Write the plots of ``results`` into ``out``.

    throughput.png (per scenario), latency.png (percentiles against offered load) and, after a
    soak, soak.png (latency per window; each worker's RSS, PSS and private dirty memory at
    every sample).
    """
    soaked = next((s for s in results["scenarios"] if "soak" in s["results"]), None)
    if soaked is not None:
        _plot_soak(soaked["results"]["soak"], out)
    scenarios = [s for s in results["scenarios"] if "max-32-connections" in s["results"]]
    if not scenarios:
        return

    figure, axes = plt.subplots(figsize=(7, 3.5))
    names = [scenario["name"] for scenario in scenarios]
    rates = [
        scenario["results"]["max-32-connections"]["requests_per_second"] for scenario in scenarios
    ]
    axes.barh(names, rates, color="tab:blue")
    for y, rate in enumerate(rates):
        axes.text(rate, y, f" {rate:.0f}", va="center")
    axes.set_xlabel("requests/s at 32 connections")
    axes.set_title("Maximum throughput")
    figure.tight_layout()
    figure.savefig(out / "throughput.png", dpi=120)
    plt.close(figure)

    swept = next((s for s in scenarios if s["name"] in ("embedded", "given-server")), None)
    if swept is None:
        return
    fixed = sorted(
        (float(key.split("-")[1].removesuffix("/s")), value)
        for key, value in swept["results"].items()
        if key.startswith("fixed-")
    )
    figure, axes = plt.subplots(figsize=(7, 3.5))
    offered = [rate for rate, _ in fixed]
    for percentile in ("p50_ms", "p90_ms", "p99_ms"):
        axes.plot(offered, [value[percentile] for _, value in fixed], marker="o", label=percentile)
    axes.set_xlabel("offered load, requests/s (open loop)")
    axes.set_ylabel("latency, ms")
    axes.set_title(f"Latency against offered load ({swept['name']})")
    axes.legend()
    figure.tight_layout()
    figure.savefig(out / "latency.png", dpi=120)
    plt.close(figure)


def _plot_soak(soak: dict, out: Path) -> None:
    windows, samples = soak["windows"], soak["memory_samples"]
    figure, (latency, memory) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)

    ends = [window["end_s"] / 60 for window in windows]
    for percentile in ("p50_ms", "p90_ms", "p99_ms"):
        latency.plot(ends, [w[percentile] for w in windows], marker="o", label=percentile)
    latency.set_ylabel("latency, ms")
    latency.set_ylim(bottom=0)
    latency.set_title(
        f"Soak at {soak['rate']:g} requests/s, per window of {soak['window_seconds']:g} s"
    )
    latency.legend()

    growth = {row["pid"]: row for row in soak["summary"]["memory"]}
    pids = sorted({worker["pid"] for sample in samples for worker in sample["workers"]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, pid in enumerate(pids):
        color = colors[index % len(colors)]
        for kind, style in (("rss_mb", "-"), ("pss_mb", "--"), ("private_dirty_mb", ":")):
            points = [
                (sample["offset_s"] / 60, worker[kind])
                for sample in samples
                for worker in sample["workers"]
                if worker["pid"] == pid
            ]
            memory.plot(
                [minute for minute, _ in points],
                [megabytes for _, megabytes in points],
                style,
                marker=".",
                color=color,
                label=_memory_label(pid, kind.removesuffix("_mb"), growth.get(pid)),
            )
    memory.set_xlabel("minutes after the warm-up")
    memory.set_ylabel("memory, MB")
    memory.set_ylim(bottom=0)
    # Below the axes: the lines of RSS, PSS and private memory leave no corner free.
    memory.legend(fontsize="small", ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    figure.tight_layout()
    figure.savefig(out / "soak.png", dpi=120, bbox_inches="tight")
    plt.close(figure)


def _memory_label(pid: int, kind: str, growth: dict | None) -> str:
    label = f"worker {pid} {kind.replace('_', ' ').upper()}"
    percent = None if growth is None else growth[f"{kind}_growth_percent"]
    return label if percent is None else f"{label} ({percent:+.1f}%)"
