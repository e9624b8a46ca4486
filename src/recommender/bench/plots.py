"""PNG plots of a benchmark's results."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first


def plot(results: dict, out: Path) -> None:
    """Write throughput.png (per scenario) and latency.png (percentiles against offered load)."""
    scenarios = results["scenarios"]

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
