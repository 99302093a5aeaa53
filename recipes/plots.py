"""Loss-curve PNGs shared by the training stages."""

from __future__ import annotations

from pathlib import Path


def save_loss_curve(
    path: Path,
    train: list[tuple[float, float]],
    held_out: list[tuple[float, float]],
    held_out_label: str,
    ylabel: str,
    baseline: tuple[float, str] | None = None,
) -> Path:
    """Draw (step, loss) train and held-out series, and an optional (value, label) baseline, to a PNG; return `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train", linewidth=1)
    if held_out:
        ax.plot(*zip(*held_out), "o-", label=held_out_label)
    if baseline is not None:
        ax.axhline(baseline[0], color="gray", linestyle="--", label=baseline[1])
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
