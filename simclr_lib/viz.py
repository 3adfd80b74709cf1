"""Figures: every plot the notebooks and the command line show, each returned as a matplotlib Figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Save as PNG (creating the folder) and release the figure's memory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_training_curves(records: list[dict[str, Any]]) -> Figure:
    """Loss per logged step, learning rate, and the kNN monitor per epoch, from metrics.jsonl records."""
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    knn = [r for r in epochs if "knn_monitor_top1" in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1)
    axes[0].set(title="NT-Xent loss", xlabel="step", ylabel="loss (mean over logged steps)")
    axes[1].plot([r["step"] for r in steps], [r["lr"] for r in steps], lw=1, color="tab:orange")
    axes[1].set(title="learning rate (warmup + cosine, per step)", xlabel="step", ylabel="lr")
    axes[2].plot([r["epoch"] for r in knn], [r["knn_monitor_top1"] for r in knn], marker="o", color="tab:green")
    axes[2].set(title="kNN monitor (subset)", xlabel="epoch", ylabel="top-1 (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def show_images(images: torch.Tensor, mean=None, std=None, nrow: int = 8, title: str | None = None,
                row_labels: list[str] | None = None) -> Figure:
    """A grid of images (uint8, [0, 1] float, or normalised float when mean/std are given)."""
    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        images = images.float() / 255
    elif mean is not None:
        images = images * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    images = images.clamp(0, 1)
    rows = (len(images) + nrow - 1) // nrow
    fig, axes = plt.subplots(rows, nrow, figsize=(1.3 * nrow, 1.3 * rows + (0.4 if title else 0)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i < len(images):
            ax.imshow(images[i].permute(1, 2, 0).numpy(), interpolation="nearest")
        else:
            ax.axis("off")
    if row_labels:
        for r, label in enumerate(row_labels[:rows]):
            axes[r, 0].set_ylabel(label, fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_augmentation_grid(images: torch.Tensor, augment, n_views: int = 6, seed: int = 0) -> Figure:
    """Each row: an original image, then `n_views` independent SimCLR views of it."""
    generator = torch.Generator().manual_seed(seed)
    originals = images.cpu()
    views = [augment(originals, generator) for _ in range(n_views)]
    mean = torch.tensor(augment.mean).view(1, 3, 1, 1)
    std = torch.tensor(augment.std).view(1, 3, 1, 1)
    originals = torch.nn.functional.interpolate(originals.float() / 255 if originals.dtype == torch.uint8
                                                else originals.float(), size=views[0].shape[-1])
    grid = torch.stack([originals] + [(v * std + mean).clamp(0, 1) for v in views], dim=1).flatten(0, 1)
    return show_images(grid, nrow=n_views + 1, title="original, then independent augmented views")
