"""The evaluation's pictures: a heatmap PNG of the table (epoch x eval fold, one panel per metric) and the
markdown artifact embedding it as a data URI. matplotlib (Agg backend, no display) loads only here."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

from epochwise.evaluate import epoch_means, metric_names


def heatmap_png(rows: Sequence[dict], title: str) -> bytes:
    """PNG bytes: one panel per metric, epochs as rows, eval folds as columns, values written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    metrics = metric_names(rows)
    epochs = sorted({int(r["epoch"]) for r in rows})
    folds = sorted({str(r["eval fold"]) for r in rows})
    fig, axes = plt.subplots(
        1,
        len(metrics),
        figsize=(1.5 + 1.4 * len(folds) * len(metrics), 1.6 + 0.5 * len(epochs)),
        squeeze=False,
        sharey=True,
        layout="constrained",
    )
    for ax, metric in zip(axes[0], metrics, strict=True):
        grid = [[float("nan")] * len(folds) for _ in epochs]
        for r in rows:
            if r["metric"] == metric:
                grid[epochs.index(int(r["epoch"]))][folds.index(str(r["eval fold"]))] = float(r["value"])
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(folds)), folds, rotation=30, ha="right")
        if ax is axes[0][0]:
            ax.set_yticks(range(len(epochs)), [f"epoch {e}" for e in epochs])
        ax.set_title(metric)
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                if value == value:  # not NaN
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def markdown(rows: Sequence[dict], png: bytes, fold: str, best: int) -> str:
    """The ``<fold>-evaluation-heatmap`` markdown: the picture inline and the per-epoch means."""
    metrics = metric_names(rows)
    lines = [f"# {fold}: evaluation", "", f"![heatmap](data:image/png;base64,{base64.b64encode(png).decode()})", ""]
    lines += ["| epoch | " + " | ".join(f"mean {m}" for m in metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    means = {m: epoch_means(rows, m) for m in metrics}
    for epoch in sorted(means[metrics[0]]):
        mark = " (best-eval)" if epoch == best else ""
        lines.append(
            f"| {epoch}{mark} | " + " | ".join(f"{means[m].get(epoch, float('nan')):.4f}" for m in metrics) + " |"
        )
    return "\n".join(lines) + "\n"
