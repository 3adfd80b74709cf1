"""Figures: every plot the notebooks and the command line show, each returned as a matplotlib Figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .augment import SimCLRAugment, to_unit_float
from .data import CIFAR10_MEAN, CIFAR10_STD

MATCH_COLOUR, MISMATCH_COLOUR = "tab:green", "tab:red"  # plot_retrieval: a neighbour of the query's class, or not


def _tidy(fig: Figure, *axes: Any, legend: bool = False) -> Figure:
    """A light grid (and a legend) on `axes`, then a tight layout: every figure's last step."""
    for ax in axes:
        ax.grid(alpha=0.3)
        if legend:
            ax.legend()
    fig.tight_layout()
    return fig


def _denormalize(images: torch.Tensor, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> torch.Tensor:
    """Normalised images back to [0, 1] for display (the inverse of augment.normalize)."""
    mean, std = (torch.as_tensor(v, dtype=torch.float32).cpu().reshape(1, 3, 1, 1) for v in (mean, std))
    return (images.detach().float().cpu() * std + mean).clamp(0, 1)


def _as_rgb(image: torch.Tensor) -> np.ndarray:
    """One (3, H, W) uint8 or [0, 1] float image as an (H, W, 3) array imshow understands."""
    return to_unit_float(image.detach().cpu()).clamp(0, 1).permute(1, 2, 0).numpy()


def _to_numpy(values: Any) -> np.ndarray:
    """A tensor (on any device), list or array as a NumPy array."""
    return np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values)


def _view_rows(originals: torch.Tensor, views: torch.Tensor, mean, std) -> torch.Tensor:
    """Rows [original, its views...] as [0, 1] images, flattened for show_images; `views` is (B, n, 3, H, W)."""
    originals = torch.nn.functional.interpolate(to_unit_float(originals.cpu()), size=views.shape[-1])
    return torch.cat([originals[:, None], _denormalize(views.flatten(0, 1), mean, std).unflatten(0, views.shape[:2])],
                     dim=1).flatten(0, 1)


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Save as PNG (creating the folder) and release the figure's memory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_training_curves(records: list[dict[str, Any]]) -> Figure:
    """Loss and lr per logged step, kNN monitor per epoch and contrastive accuracy (if logged), from metrics.jsonl."""
    steps = [r for r in records if r.get("kind") == "step"]
    knn = [r for r in records if r.get("kind") == "epoch" and "knn_monitor_top1" in r]
    accuracy = [r for r in steps if "contrastive_acc" in r]
    fig, axes = plt.subplots(1, 4 if accuracy else 3, figsize=(17 if accuracy else 13, 3.6))
    axes[0].plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1)
    axes[0].set(title="NT-Xent loss", xlabel="step", ylabel="loss (mean over logged steps)")
    axes[1].plot([r["step"] for r in steps], [r["lr"] for r in steps], lw=1, color="tab:orange")
    axes[1].set(title="learning rate (warmup + cosine, per step)", xlabel="step", ylabel="lr")
    axes[2].plot([r["epoch"] for r in knn], [r["knn_monitor_top1"] for r in knn], marker="o", color="tab:green")
    axes[2].set(title="kNN monitor (subset)", xlabel="epoch", ylabel="top-1 (%)")
    if accuracy:
        axes[3].plot([r["step"] for r in accuracy], [100 * r["contrastive_acc"] for r in accuracy], lw=1,
                     color="tab:purple")
        axes[3].set(title="contrastive accuracy (positive ranked first)", xlabel="step", ylabel="% of anchors")
    return _tidy(fig, *axes)


def show_images(images: torch.Tensor, mean=None, std=None, nrow: int = 8, title: str | None = None,
                row_labels: list[str] | None = None) -> Figure:
    """A grid of images (uint8, [0, 1] float, or normalised float when mean/std are given)."""
    if mean is not None and images.dtype != torch.uint8:
        images = _denormalize(images, mean, std)
    rows = (len(images) + nrow - 1) // nrow
    fig, axes = plt.subplots(rows, nrow, figsize=(1.3 * nrow, 1.3 * rows + (0.4 if title else 0)), squeeze=False)
    plt.setp(axes, xticks=[], yticks=[])
    for ax, image in zip(axes.flat, images):
        ax.imshow(_as_rgb(image), interpolation="nearest")
    for ax in axes.flat[len(images):]:  # the empty end of the last row
        ax.axis("off")
    for r, label in enumerate((row_labels or [])[:rows]):
        axes[r, 0].set_ylabel(label, fontsize=9)
    if title:
        fig.suptitle(title)
    return _tidy(fig)


def plot_augmentation_grid(images: torch.Tensor, augment, n_views: int = 6, seed: int = 0,
                           title: str = "original, then independent augmented views") -> Figure:
    """Each row: an original image, then `n_views` independent SimCLR views of it."""
    generator = torch.Generator().manual_seed(seed)
    views = torch.stack([augment(images.cpu(), generator) for _ in range(n_views)], dim=1)
    return show_images(_view_rows(images, views, augment.mean, augment.std), nrow=n_views + 1, title=title)


def class_colours(n: int) -> list[Any]:
    """n distinguishable colours from a qualitative palette (tab10, tab20, then evenly spaced hues)."""
    if n <= 20:
        return list(plt.get_cmap("tab10" if n <= 10 else "tab20").colors[:n])
    # Beyond 20 classes (CIFAR-100) no qualitative palette is long enough; spread hues evenly instead.
    return [plt.get_cmap("hsv")(i / n) for i in range(n)]


def tsne_embedding(features: torch.Tensor, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """A 2-d t-SNE map (N, 2) of L2-normalised features, reduced to at most 50 dimensions with PCA first."""
    from sklearn.decomposition import PCA  # scikit-learn takes seconds to import: only load it when needed
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits  # installed with scikit-learn
    x = torch.nn.functional.normalize(features.detach().float().cpu().flatten(1), dim=1).numpy()
    if (n := len(x)) < 4:
        raise ValueError(f"t-SNE needs at least 4 points, got {n}")
    # kNN and the linear probe compare features by cosine similarity; normalising makes t-SNE see the same geometry.
    n_components = min(50, n, x.shape[1])
    if x.shape[1] > n_components:
        # Standard practice (van der Maaten): PCA to 50 dims keeps the structure and makes the neighbour search cheap.
        x = PCA(n_components=n_components, random_state=seed).fit_transform(x)
    # sklearn refuses perplexity >= N; a third of the points is the usual cap for tiny inputs.
    perplexity = min(perplexity, (n - 1) / 3)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    # One OpenMP thread: with PyTorch's own OpenMP runtime loaded, sklearn's multi-threaded Barnes-Hut loop was
    # 2-10x slower on a 2-core machine (Colab-sized) than a single thread; the result is the same either way.
    with threadpool_limits(limits=1, user_api="openmp"):
        return tsne.fit_transform(x)


def plot_tsne(embeddings: dict[str, np.ndarray], labels: Any, classes: list[str], title: str | None = None) -> Figure:
    """Side-by-side 2-d maps (e.g. random init vs trained encoder), points coloured by class, one shared legend."""
    labels, colours = _to_numpy(labels).astype(int), class_colours(len(classes))
    fig, axes = plt.subplots(1, len(embeddings), figsize=(5 * len(embeddings) + 1.5, 5), squeeze=False,
                             layout="constrained")
    for ax, (name, points) in zip(axes[0], embeddings.items()):
        points = _to_numpy(points)
        # Small, translucent points: thousands of them overlap, and the density of each colour is what matters.
        ax.scatter(points[:, 0], points[:, 1], c=[colours[i] for i in labels], s=6, alpha=0.7, linewidths=0)
        # t-SNE coordinates have no units and no meaning of their own: only who sits near whom does.
        ax.set(title=name, xlabel="t-SNE dimension 1", ylabel="t-SNE dimension 2")
    plt.setp(axes, xticks=[], yticks=[])
    # Built by hand so every class gets an entry with a visible marker, even one absent from the points shown.
    handles = [Line2D([], [], marker="o", linestyle="", markersize=7, color=colours[i], label=name)
               for i, name in enumerate(classes)]
    fig.legend(handles=handles, loc="outside right center", title="true class", ncols=1 + len(classes) // 25)
    fig.suptitle(title or "t-SNE of encoder features (colour: true class, not used to compute the map)")
    return fig


def plot_retrieval(queries: torch.Tensor, neighbours: torch.Tensor, query_labels: Any, neighbour_labels: Any,
                   classes: list[str], similarities: torch.Tensor | None = None) -> Figure:
    """Each row: a query image, then its k nearest training images, titled with their class (green = same class)."""
    n_queries, k = neighbours.shape[:2]
    query_labels = _to_numpy(query_labels).astype(int).reshape(n_queries)
    neighbour_labels = _to_numpy(neighbour_labels).astype(int).reshape(n_queries, k)
    sims = None if similarities is None else _to_numpy(similarities).reshape(n_queries, k)
    fig, axes = plt.subplots(n_queries, k + 1, figsize=(1.5 * (k + 1) + 0.5, 1.75 * n_queries + 0.8),
                             squeeze=False, layout="constrained")
    for row in range(n_queries):
        axes[row, 0].imshow(_as_rgb(queries[row]), interpolation="nearest")
        axes[row, 0].set_title(f"query:\n{classes[query_labels[row]]}", fontsize=9, fontweight="bold")
        for col, ax in enumerate(axes[row, 1:]):
            ax.imshow(_as_rgb(neighbours[row, col]), interpolation="nearest")
            label = neighbour_labels[row, col]
            colour = MATCH_COLOUR if label == query_labels[row] else MISMATCH_COLOUR
            text = classes[label] if sims is None else f"{classes[label]}\ncos {sims[row, col]:.2f}"
            ax.set_title(text, fontsize=9, color=colour)
            # A coloured frame makes right and wrong neighbours visible at a glance, not only in the title.
            plt.setp(list(ax.spines.values()), edgecolor=colour, linewidth=2)
    plt.setp(axes, xticks=[], yticks=[])
    for col, ax in enumerate(axes[-1]):
        ax.set_xlabel("query" if col == 0 else f"neighbour {col}", fontsize=8)
    fig.legend(handles=[Patch(color=MATCH_COLOUR, label="same class as the query"),
                        Patch(color=MISMATCH_COLOUR, label="another class")],
               loc="outside lower center", ncols=2, fontsize=9)
    fig.suptitle("nearest training images by cosine similarity of encoder features")
    return fig


def plot_confusion_matrix(confusion: Any, classes: list[str], title: str = "linear probe: confusion matrix") -> Figure:
    """A heatmap of a confusion matrix (rows = true class), each row in percent of its true class."""
    import seaborn as sns  # slow to import; only needed here
    counts = _to_numpy(confusion).astype(float)
    totals = counts.sum(axis=1, keepdims=True)
    percent = np.divide(100 * counts, totals, out=np.zeros_like(counts), where=totals > 0)  # an empty row stays 0
    n, size = len(classes), max(5.0, 0.6 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    # Beyond ~20 classes the numbers no longer fit in their cells; the colours still show the structure.
    sns.heatmap(percent, annot=n <= 20, fmt=".1f", annot_kws={"fontsize": 8}, cmap="Blues", vmin=0, vmax=100,
                square=True, xticklabels=classes, yticklabels=classes, ax=ax,
                cbar_kws={"label": "% of the true class's test images"})
    ax.set(title=title, xlabel="predicted class", ylabel="true class")
    ax.tick_params(axis="x", labelrotation=45)
    ax.tick_params(axis="y", labelrotation=0)
    return _tidy(fig)


def plot_accuracy_bars(results: dict[str, dict[str, float]], title: str,
                       xlabel: str = "fraction of training labels used", ylabel: str = "top-1 accuracy (%)") -> Figure:
    """Grouped bars, one group per outer key (e.g. label fraction), one bar per method, values written on bars."""
    groups = list(results)
    # Methods in order of first appearance; a method missing from a group simply has no bar there.
    methods: list[str] = list(dict.fromkeys(m for values in results.values() for m in values))
    x, width = np.arange(len(groups)), 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(groups) * max(1, len(methods)) + 2), 4))
    highest = 0.0
    for j, method in enumerate(methods):
        present = [i for i, g in enumerate(groups) if results[g].get(method) is not None]
        values = [float(results[groups[i]][method]) for i in present]
        offset = (j - (len(methods) - 1) / 2) * width
        bars = ax.bar(x[present] + offset, values, width, label=method)
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
        highest = max([highest, *values])
    ax.set_xticks(x, groups)
    # The y range leaves room for the labels above the tallest bar; the grid stays behind the bars.
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, ylim=(0, highest * 1.12 + 1), axisbelow=True)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="method", loc="upper left", bbox_to_anchor=(1.01, 1))  # outside the axes: it never hides a bar
    return _tidy(fig)


def plot_single_augmentations(images: torch.Tensor, n_samples: int = 5, seed: int = 0, image_size: int = 32,
                              mean=None, std=None) -> Figure:
    """One row per augmentation alone (crop, flip, colour jitter, grayscale, blur): an image, then random draws."""
    mean, std = mean or CIFAR10_MEAN, std or CIFAR10_STD
    off = dict(crop_scale=(1.0, 1.0), flip_prob=0.0, color_prob=0.0, gray_prob=0.0, blur_prob=0.0)
    ops = {"crop + resize": dict(crop_scale=(0.08, 1.0)), "horizontal flip": dict(flip_prob=1.0),
           "colour jitter": dict(color_prob=1.0), "grayscale": dict(gray_prob=1.0),
           "Gaussian blur": dict(blur_prob=1.0)}
    image, generator = images[:1].cpu(), torch.Generator().manual_seed(seed)
    augments = [SimCLRAugment(image_size=image_size, mean=mean, std=std, **(off | on)) for on in ops.values()]
    views = torch.stack([torch.cat([augment(image, generator) for _ in range(n_samples)]) for augment in augments])
    return show_images(_view_rows(image.expand(len(ops), -1, -1, -1), views, mean, std), nrow=n_samples + 1,
                       row_labels=list(ops), title="each augmentation alone: the original, then random draws")


def plot_similarity_matrix(z1: torch.Tensor, z2: torch.Tensor, title: str = "cosine similarity of 2N embeddings"
                           ) -> Figure:
    """Heatmap of the (2N, 2N) cosine similarities NT-Xent works on, with the positive pairs outlined."""
    z = torch.nn.functional.normalize(torch.cat([z1, z2]).detach().float().cpu(), dim=1)
    sim, n = (z @ z.T).numpy(), len(z1)
    fig, ax = plt.subplots(figsize=(5.2, 4.5))
    im = ax.imshow(sim, cmap="RdBu_r", vmin=-1, vmax=1)
    for i in range(2 * n):  # the positive of row i sits N columns away
        ax.add_patch(plt.Rectangle(((i + n) % (2 * n) - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="gold", lw=2))
    labels = [f"{i}a" for i in range(n)] + [f"{i}b" for i in range(n)]
    ax.set_xticks(range(2 * n), labels, fontsize=7, rotation=90)
    ax.set_yticks(range(2 * n), labels, fontsize=7)
    ax.set(title=title, xlabel="candidate (image, view)", ylabel="anchor (image, view)")
    fig.colorbar(im, ax=ax, label="cosine similarity (gold: positive pair)")
    return _tidy(fig)


def plot_temperature_effect(similarities: torch.Tensor, positive: int = 0,
                            temperatures: tuple[float, ...] = (0.05, 0.1, 0.5, 1.0)) -> Figure:
    """One anchor's softmax exp(s/T) / sum exp(s/T) over its candidates' similarities, one line per temperature T."""
    # Small T sharpens it onto the most similar candidates (hard negatives weigh more); large T flattens it.
    sims = similarities.detach().float().cpu()
    order = sims.argsort(descending=True)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for t in temperatures:
        probs = torch.softmax(sims / t, dim=0)[order]
        ax.plot(range(len(sims)), probs.numpy(), marker="o", ms=3, label=f"T = {t:g}")
    rank = int((order == positive).nonzero()[0, 0])
    ax.axvline(rank, color="gold", lw=2, ls="--", label="the positive")
    ax.set(title="softmax over candidates at different temperatures", xlabel="candidates, most similar first",
           ylabel="probability")
    return _tidy(fig, ax, legend=True)


def plot_stage_sizes(shapes: dict[str, dict[str, tuple[int, ...]]]) -> Figure:
    """Spatial size of the feature map after each ResNet stage, one line per stem (e.g. CIFAR vs ImageNet)."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, stages in shapes.items():
        ax.plot(list(stages), [s[-1] for s in stages.values()], marker="o", label=name)
    ax.set(title="feature-map side length through the encoder (32x32 input)", xlabel="stage",
           ylabel="height = width (pixels)")
    ax.set_yscale("log", base=2)
    return _tidy(fig, ax, legend=True)
