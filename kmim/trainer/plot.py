"""Training curves from ``metrics.jsonl`` as one PNG (matplotlib's Agg canvas: no display, no global state)."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kmim.files import atomic_write

# (metric, panel title); a panel is drawn only when its metric was logged.
MIM_PANELS = (("loss", "loss"), ("acc", "masked-token accuracy"), ("mto_h", "MTO heterogeneity H(l)"), ("lr", "lr"))
FINETUNE_PANELS = (("loss", "loss"), ("acc", "train top-1"), ("val_top1", "validation top-1"), ("lr", "lr"))


def plot_curves(metrics: Path, out: Path, panels: tuple = MIM_PANELS) -> None:
    """Plot each (metric, title) of ``panels`` that was logged against step (the loss also as the objective
    alone with MTO; per-layer H(l)); nothing to plot, no file."""
    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    panels = [(key, title) for key, title in panels if any(key in r for r in rows)]
    if not panels:
        return
    fig = Figure(figsize=(4.5 * len(panels), 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (key, title) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        have = [r for r in rows if key in r]
        steps = [r["step"] for r in have]
        if key == "mto_h":
            for layer in range(len(have[0][key])):
                ax.plot(steps, [r[key][layer] for r in have], label=f"H({layer})")
            ax.legend(fontsize="small")
        else:
            ax.plot(steps, [r[key] for r in have], label=key, marker="o" if len(have) < 30 else None)
            if key == "loss" and any("loss_main" in r for r in have):
                main = [r for r in have if "loss_main" in r]
                ax.plot([r["step"] for r in main], [r["loss_main"] for r in main], label="objective only")
                ax.legend(fontsize="small")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    atomic_write(Path(out), lambda p: fig.savefig(p, format="png", dpi=100))
