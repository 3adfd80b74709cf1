"""Regenerate the README's figures in docs/figures/ from the package: augmentation grid, temperature plot, t-SNE.

Usage: python scripts/make_figures.py [RUN_DIR]   (t-SNE of RUN_DIR, else of the newest run holding a checkpoint,
else of a quick run trained first)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simclr_lib import viz  # noqa: E402
from simclr_lib.augment import SimCLRAugment  # noqa: E402
from simclr_lib.data import load_splits  # noqa: E402
from simclr_lib.evaluate import extract_features  # noqa: E402
from simclr_lib.jobs import load_trained, random_init_model  # noqa: E402
from simclr_lib.notebook import ensure_trained_run  # noqa: E402
from simclr_lib.runtime import resolve_device  # noqa: E402


def newest_run(runs: Path) -> Path | None:
    """The most recently written run folder holding checkpoint.pt."""
    found = sorted(runs.glob("*/checkpoint.pt"), key=lambda p: p.stat().st_mtime)
    return found[-1].parent if found else None


def main() -> None:
    """Write docs/figures/{augmentations,temperature,tsne}.png."""
    out = ROOT / "docs" / "figures"
    data_root = ROOT / "data"
    splits = load_splits("cifar10", data_root, download=False)
    first_of_class = [int((splits.test.labels == c).nonzero()[0]) for c in range(4)]
    augment = SimCLRAugment(mean=splits.mean, std=splits.std)
    viz.save_figure(viz.plot_augmentation_grid(splits.test.images[first_of_class], augment, n_views=7),
                    out / "augmentations.png")
    generator = torch.Generator().manual_seed(0)
    sims = torch.cat([torch.tensor([0.8]), torch.rand(15, generator=generator) * 1.2 - 0.4])
    viz.save_figure(viz.plot_temperature_effect(sims, positive=0), out / "temperature.png")

    run_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else newest_run(ROOT / "runs")
    run_dir = ensure_trained_run(run_dir, data_root)
    model, config, _, _ = load_trained(run_dir)
    device = resolve_device(config.device)
    subset = splits.test.subset(torch.arange(0, len(splits.test), 5))  # 2,000 test images
    embeddings = {name: viz.tsne_embedding(extract_features(net.to(device), subset.images, 512, device).cpu())
                  for name, net in (("random init", random_init_model(config, splits, device)),
                                    (f"trained ({config.preset})", model))}
    viz.save_figure(viz.plot_tsne(embeddings, subset.labels, splits.test.classes,
                                  title=f"t-SNE of 2000 CIFAR-10 test images' representations ({run_dir.name})"),
                    out / "tsne.png")
    print(f"wrote {out}/augmentations.png, temperature.png, tsne.png (t-SNE of {run_dir})")


if __name__ == "__main__":
    main()
