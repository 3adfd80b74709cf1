"""Shared fixtures: a tiny generated ImageFolder data set (no downloads in tests)."""

import pytest
import torch
from PIL import Image


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """4 classes of 16x16 images, 24 train / 6 test each, with a colour per class so there is signal."""
    root = tmp_path_factory.mktemp("tiny")
    g = torch.Generator().manual_seed(0)
    colours = torch.tensor([[220, 40, 40], [40, 200, 40], [40, 40, 220], [200, 200, 40]])
    for split, n in (("train", 24), ("test", 6)):
        for c, name in enumerate(["a", "b", "c", "d"]):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                noise = torch.randint(-40, 40, (16, 16, 3), generator=g)
                img = (colours[c] + noise).clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(img).save(folder / f"{i}.png")
    return root
