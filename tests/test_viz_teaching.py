"""The teaching figures of the notebooks: each op alone, the similarity matrix, temperature, stage sizes."""

import matplotlib

matplotlib.use("Agg")

import torch  # noqa: E402

from simclr_lib import viz  # noqa: E402
from simclr_lib.models import resnet_encoder, stage_shapes  # noqa: E402


def test_stage_shapes_show_what_the_stem_does():
    cifar = stage_shapes(resnet_encoder("resnet18", cifar_stem=True, width=8))
    imagenet = stage_shapes(resnet_encoder("resnet18", cifar_stem=False, width=8))
    assert cifar["maxpool"] == (8, 32, 32) and cifar["layer4"] == (64, 4, 4) and cifar["avgpool"] == (64,)
    assert imagenet["maxpool"] == (8, 8, 8) and imagenet["layer4"] == (64, 1, 1)
    fig = viz.plot_stage_sizes({"CIFAR stem": cifar, "ImageNet stem": imagenet})
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["CIFAR stem", "ImageNet stem"]


def test_single_augmentations_has_one_row_per_op():
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    fig = viz.plot_single_augmentations(images, n_samples=3)
    image_axes = [ax for ax in fig.axes if ax.images]
    assert len(image_axes) == 5 * 4
    assert [fig.axes[r * 4].get_ylabel() for r in range(5)] == ["crop + resize", "horizontal flip", "colour jitter",
                                                                 "grayscale", "Gaussian blur"]
    # the flip row really is the mirrored original
    original = image_axes[4].images[0].get_array()
    flipped = image_axes[5].images[0].get_array()
    assert abs(flipped[:, ::-1] - original).max() < 1e-5


def test_similarity_matrix_marks_the_positives():
    z = torch.randn(3, 8)
    fig = viz.plot_similarity_matrix(z, z + 0.01)
    ax = fig.axes[0]
    assert len(ax.patches) == 6
    assert abs(ax.images[0].get_array()[0, 3] - 1) < 1e-3  # view a of image 0 vs view b of image 0


def test_temperature_sharpens_the_softmax():
    sims = torch.tensor([0.9, 0.5, 0.1, -0.3])
    fig = viz.plot_temperature_effect(sims, positive=0, temperatures=(0.1, 1.0))
    lines = fig.axes[0].get_lines()
    assert lines[0].get_ydata()[0] > lines[1].get_ydata()[0]  # T = 0.1 puts more mass on the top candidate
