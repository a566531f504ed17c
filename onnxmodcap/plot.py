"""A PNG of every unit's reconstruction loss across the network: before and after reconstruction,
after reconstruction without ModCap when that was compared, and the merged groups shaded."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

from .files import write_atomically

if TYPE_CHECKING:
    from .report import UnitLosses


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
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=120)
    write_atomically(path, image.getvalue())
