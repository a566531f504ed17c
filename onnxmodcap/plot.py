"""A PNG of the reconstruction loss of every unit, before and after, across the network."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or wanted
import matplotlib.pyplot as plt  # noqa: E402


def plot_unit_losses(units: list[dict], path: Path, title: str) -> None:
    names = [unit["name"] for unit in units]
    positions = range(len(units))
    figure, axes = plt.subplots(figsize=(max(6.0, 0.45 * len(units)), 4.0))
    axes.plot(positions, [u["loss_before"] for u in units], marker="o", label="before (initialised)")
    axes.plot(positions, [u["loss_after"] for u in units], marker="o", label="after reconstruction")
    axes.set_yscale("log")
    axes.set_xticks(list(positions), names, rotation=60, ha="right", fontsize=8)
    axes.set_ylabel("unit output error")
    axes.set_title(title, fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
