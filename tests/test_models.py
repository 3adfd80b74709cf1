"""Encoders with and without the CIFAR stem, the projection head, SimCLR and checkpoints."""

import pytest
import torch
import torch.nn as nn
import torchvision

from simclr_lib.augment import normalize
from simclr_lib.config import Config
from simclr_lib.errors import UserError
from simclr_lib.models import ProjectionHead, SimCLR, build_model, resnet_encoder


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("backbone, dim", [("resnet18", 512), ("resnet50", 2048)])
def test_cifar_stem_and_feature_dims(backbone, dim):
    enc = resnet_encoder(backbone, cifar_stem=True)
    assert (enc.conv1.kernel_size, enc.conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(enc.maxpool, nn.Identity) and isinstance(enc.fc, nn.Identity)
    assert enc.feature_dim == dim
    enc.eval()
    with torch.no_grad():
        assert enc(torch.randn(2, 3, 32, 32)).shape == (2, dim)
        # the stem keeps 32x32 until layer1: the last stage sees 4x4 maps, not 1x1
        x = enc.maxpool(enc.relu(enc.bn1(enc.conv1(torch.randn(1, 3, 32, 32)))))
        assert x.shape[-1] == 32
        assert enc.layer4(enc.layer3(enc.layer2(enc.layer1(x)))).shape[-1] == 4


def test_imagenet_stem_is_torchvisions_network():
    enc = resnet_encoder("resnet18", cifar_stem=False)
    ref = torchvision.models.resnet18()
    assert enc.conv1.kernel_size == (7, 7) and isinstance(enc.maxpool, nn.MaxPool2d)
    assert n_params(enc) == n_params(ref) - n_params(ref.fc)
    x = torch.randn(1, 3, 32, 32)
    x = enc.maxpool(enc.relu(enc.bn1(enc.conv1(x))))
    assert x.shape[-1] == 8  # what the ImageNet stem does to a CIFAR image


def test_narrow_width_scales_every_stage():
    enc = resnet_encoder("resnet18", width=16)
    assert enc.feature_dim == 128 and enc.conv1.out_channels == 16
    assert enc.layer4[-1].conv2.out_channels == 128
    assert n_params(enc) < n_params(resnet_encoder("resnet18")) / 10
    assert resnet_encoder("resnet50", width=16).feature_dim == 512


def test_projection_head_shapes():
    head = ProjectionHead(512, 512, 128)
    assert head(torch.randn(3, 512)).shape == (3, 128)
    assert sum(isinstance(m, nn.ReLU) for m in head.modules()) == 1
    for where, count in (("none", 0), ("hidden", 1), ("all", 2)):
        bn = ProjectionHead(64, 32, 16, batch_norm=where)
        norms = [m for m in bn.modules() if isinstance(m, nn.BatchNorm1d)]
        assert len(norms) == count
        # no bias right before a BatchNorm (it would cancel); the last BatchNorm learns nothing (official code)
        linears = [m for m in bn.modules() if isinstance(m, nn.Linear)]
        assert [m.bias is None for m in linears] == [count >= 1, count == 2]
        assert bn.train()(torch.randn(8, 64)).shape == (8, 16)
    z = ProjectionHead(64, 32, 16, batch_norm="all").train()(torch.randn(8, 64))
    torch.testing.assert_close(z.mean(0), torch.zeros(16), atol=1e-5, rtol=0)  # normalised over the batch
    with pytest.raises(UserError, match="batch_norm"):
        ProjectionHead(64, batch_norm="yes")


def test_checkpoints_of_earlier_versions_with_a_boolean_head_flag_still_load():
    assert SimCLR(width=4, proj_batch_norm=True).arch["proj_batch_norm"] == "hidden"
    assert SimCLR(width=4, proj_batch_norm=False).arch["proj_batch_norm"] == "none"


def test_simclr_forward_and_encode():
    torch.manual_seed(0)
    model = SimCLR("resnet18", width=8).eval()
    assert model.feature_dim == 64
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        h_uint8 = model.encode(images)
        h_float = model.encode(images.float() / 255)
        z = model(normalize(images, model.mean, model.std))
    assert h_uint8.shape == (2, 64) and z.shape == (2, 128)
    torch.testing.assert_close(h_uint8, h_float)


def test_build_model_is_seeded():
    config = Config(seed=3, backbone="resnet18", cifar_stem=True, width=8, proj_hidden_dim=None, proj_dim=32,
                    proj_batch_norm="none")
    a, b = build_model(config), build_model(config)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    c = build_model(config.replace(seed=4))
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_from_checkpoint_roundtrip_and_clear_errors(tmp_path):
    model = SimCLR("resnet18", width=8)
    torch.save({"arch": model.arch, "model": model.state_dict()}, tmp_path / "checkpoint.pt")
    loaded = SimCLR.from_checkpoint(tmp_path)
    for (ka, va), (kb, vb) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    other = SimCLR("resnet18", width=16)
    torch.save({"arch": model.arch, "model": other.state_dict()}, tmp_path / "mismatch.pt")
    with pytest.raises(UserError, match="another backbone"):
        SimCLR.from_checkpoint(tmp_path / "mismatch.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        SimCLR.from_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(UserError, match="no checkpoint"):
        SimCLR.from_checkpoint(tmp_path / "missing")
