"""The PNG charts beside a report: every unit's reconstruction loss across the network (before and
after reconstruction, after reconstruction without ModCap when that was compared, the merged groups
shaded), and the most sensitive layer parts of an `analyze` run."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

from .files import write_atomically

if TYPE_CHECKING:
    from .report import UnitLosses
    from .sensitivity import Analysis


def plot_unit_losses(losses: UnitLosses, path: Path, title: str) -> None:
    """Every unit's loss before and after reconstruction, as a PNG at `path`. A bare Figure draws on its own Agg canvas:
    no pyplot, so no backend is chosen and no figure registry is touched in the user's process."""
    from matplotlib.figure import Figure

    names = losses.units
    positions = list(range(len(names)))
    figure = Figure(figsize=(max(6.0, 0.45 * len(names)), 4.0))
    axes = figure.subplots()
    axes.plot(positions, losses.before, marker="o", color="grey", label="before (initialised)")
    if losses.after_without_modcap is not None:
        axes.plot(positions, losses.after_without_modcap, marker="o",
                  label=f"after, unit by unit (oscillation {losses.oscillation_without_modcap:.3f})")
    label = "after, ModCap groups" if losses.groups else "after reconstruction"
    axes.plot(positions, losses.after, marker="o", label=f"{label} (oscillation {losses.oscillation:.3f})")
    for group in losses.groups or []:
        if len(group) > 1:
            axes.axvspan(group[0] - 0.4, group[-1] + 0.4, color="tab:orange", alpha=0.15)
    axes.set_yscale("log")
    axes.set_xticks(positions, names, rotation=60, ha="right", fontsize=8)
    axes.set_ylabel("unit output error (256 images)")
    axes.set_title(title + ("; shaded: units reconstructed jointly" if losses.groups else ""), fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    write_png(figure, path)


CHART_BARS = 40


def plot_sensitivity(analysis: Analysis, path: Path) -> None:
    """The most sensitive layer parts of an `analyze` run: the SQNR of the first output with only
    that part quantized, as horizontal bars, the most sensitive at the top."""
    from matplotlib.figure import Figure

    ranked = analysis.ranked("layer")[:CHART_BARS]
    figure = Figure(figsize=(8.0, max(3.0, 0.25 * len(ranked) + 1.0)))
    axes = figure.subplots()
    colours = {"weights": "tab:blue", "activations": "tab:orange"}
    positions = range(len(ranked))[::-1]
    axes.barh(list(positions), [s.only[0].sqnr_db for s in ranked],
              color=[colours[s.part.quantized] for s in ranked])
    axes.set_yticks(list(positions), [f"{s.part.name[:50]} ({s.part.quantized})" for s in ranked], fontsize=7)
    axes.set_xlabel(f"SQNR of {analysis.whole[0].name!r} with only this part quantized (dB; lower: more sensitive)")
    axes.set_title(f"{analysis.model}, W{analysis.wbits}A{analysis.abits}, round to nearest", fontsize=9)
    write_png(figure, path)


def write_png(figure, path: Path) -> None:
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=120)
    write_atomically(path, image.getvalue())
