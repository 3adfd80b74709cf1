"""Encoders (ResNet-18/50 with the CIFAR stem), the projection head and the SimCLR model."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .augment import normalize
from .checkpoints import read_model_checkpoint
from .config import BACKBONES, HEAD_NORMS, Config
from .data import CIFAR10_MEAN, CIFAR10_STD
from .errors import UserError


class _NarrowResNet(ResNet):
    """torchvision's ResNet with every stage's width scaled, for quick CPU runs (width=64 is the standard net)."""

    def __init__(self, block: type[nn.Module], layers: list[int], width: int) -> None:
        super().__init__(block, layers)
        # Rebuild the stages with scaled widths using torchvision's own block and layer code.
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        for i, blocks in enumerate(layers):
            setattr(self, f"layer{i + 1}", self._make_layer(block, width * 2**i, blocks, stride=1 if i == 0 else 2))
        self.fc = nn.Linear(width * 8 * block.expansion, 1000)
        for m in self.modules():  # the same initialisation torchvision applies
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def resnet_encoder(backbone: str = "resnet18", cifar_stem: bool = True, width: int = 64) -> nn.Module:
    """A torchvision ResNet-18/50 without its fc layer, giving h (B, 512) / (B, 2048) at width 64.
    The CIFAR stem (paper, Appendix B.9: a 3x3 stride-1 conv1, no max-pool) keeps a 32x32 image from shrinking
    to 8x8 before the first residual stage; it suits STL-10's 96 px too, not ImageNet-size images."""
    if backbone not in BACKBONES:
        raise UserError(f"unknown backbone {backbone!r}: choose one of {', '.join(BACKBONES)}")
    if width < 1:
        raise UserError(f"width must be a positive integer, got {width}")
    if width == 64:
        net = getattr(torchvision.models, backbone)(weights=None)
    else:
        block, layers = (BasicBlock, [2, 2, 2, 2]) if backbone == "resnet18" else (Bottleneck, [3, 4, 6, 3])
        net = _NarrowResNet(block, layers, width)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    net.feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


class ProjectionHead(nn.Module):
    """The MLP g(.) that maps the representation h to the space z where the contrastive loss is applied.
    `batch_norm`: "none", "hidden" (after the hidden layer) or "all" (after both layers, as the official code; here
    the last one has no learned scale or shift)."""

    def __init__(self, in_dim: int, hidden_dim: int | None = None, out_dim: int = 128, batch_norm: str = "none"):
        super().__init__()
        if batch_norm not in HEAD_NORMS:
            raise UserError(f"unknown projection-head batch_norm {batch_norm!r}: choose one of {', '.join(HEAD_NORMS)}")
        hidden_dim, hidden_bn, last_bn = hidden_dim or in_dim, batch_norm != "none", batch_norm == "all"
        # No bias before a BatchNorm: it would cancel.
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=not hidden_bn),
                                 *([nn.BatchNorm1d(hidden_dim)] if hidden_bn else []), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, out_dim, bias=not last_bn),
                                 *([nn.BatchNorm1d(out_dim, affine=False)] if last_bn else []))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Project representations (B, in_dim) to (B, out_dim)."""
        return self.net(h)


class SimCLR(nn.Module):
    """Encoder f(.) + projection head g(.); `forward` gives z for the loss, `encode` gives h for evaluation."""

    def __init__(self, backbone: str = "resnet18", cifar_stem: bool = True, width: int = 64,
                 proj_hidden_dim: int | None = None, proj_dim: int = 128, proj_batch_norm: str = "none",
                 mean: tuple[float, ...] = CIFAR10_MEAN, std: tuple[float, ...] = CIFAR10_STD) -> None:
        super().__init__()
        if isinstance(proj_batch_norm, bool):  # checkpoints of earlier versions: BatchNorm after the hidden layer
            proj_batch_norm = "hidden" if proj_batch_norm else "none"
        self.arch = dict(backbone=backbone, cifar_stem=cifar_stem, width=width, proj_hidden_dim=proj_hidden_dim,
                         proj_dim=proj_dim, proj_batch_norm=proj_batch_norm, mean=tuple(mean), std=tuple(std))
        self.encoder = resnet_encoder(backbone, cifar_stem, width)
        self.feature_dim: int = self.encoder.feature_dim
        self.projector = ProjectionHead(self.feature_dim, proj_hidden_dim, proj_dim, proj_batch_norm)
        # Buffers so the normalisation travels with the weights (state_dict, .to(device)).
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        """Projections z (B, proj_dim) of views that `SimCLRAugment` made (already normalised)."""
        return self.projector(self.encoder(views))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Representations h (B, feature_dim) of raw uint8 or [0, 1] float images (normalised here)."""
        return self.encoder(normalize(images, self.mean, self.std))

    @classmethod
    def from_checkpoint(cls, source: str | Path, sha256: str | None = None) -> SimCLR:
        """Rebuild a trained model from a run folder, a checkpoint file or an http(s)/file URL of one (on the CPU)."""
        path, state = read_model_checkpoint(source, sha256)
        model = cls(**state["arch"])
        load_model_state(model, state["model"], str(path), state.get("encoder_only", False))
        return model


def load_model_state(model: nn.Module, state: dict, source: str, encoder_only: bool = False) -> None:
    """Load weights, turning a shape mismatch (other backbone, width or head) or missing keys into one clear error;
    `encoder_only`: weights of the encoder alone (an exported or torchvision file), unexpected keys named and left."""
    own = {k: v for k, v in model.state_dict().items() if k.startswith("encoder.") or not encoder_only}
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if bad or missing or unexpected and not encoder_only:
        what = (f"shape mismatch at {bad[0]}" if bad else f"{len(missing)} missing keys, e.g. {missing[0]}" if missing
                else f"unexpected keys, e.g. {unexpected[0]}")
        raise UserError(f"{source} does not fit this model ({what}): it was trained with another backbone, "
                        "width or head")
    model.load_state_dict({k: state[k] for k in own}, strict=not encoder_only)
    if encoder_only:
        names = ", ".join(k.removeprefix("encoder.") for k in unexpected)  # as the file names them
        ignored = f"; ignored {len(unexpected)} unexpected keys: {names}" if unexpected else ""
        print(f"loaded the encoder of {source} (the projection head is newly initialised){ignored}")


def export_encoder(model: SimCLR) -> dict:
    """The contents of `simclr export`'s file: the encoder's weights under torchvision's ResNet key names (fp32), the
    normalisation it expects (x / 255 - mean) / std, its architecture and whether it has the CIFAR stem."""
    weights = {k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in model.encoder.state_dict().items()}
    return {"state_dict": weights, "mean": [float(v) for v in model.arch["mean"]],
            "std": [float(v) for v in model.arch["std"]], "arch": model.arch["backbone"],
            "cifar_stem": model.arch["cifar_stem"], "width": model.arch["width"]}


def build_model(config: Config, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> SimCLR:
    """The SimCLR model a config describes; seeded by config.seed so the random init is reproducible."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return SimCLR(config.backbone, config.cifar_stem, config.width, config.proj_hidden_dim, config.proj_dim,
                      config.proj_batch_norm, mean, std)


@torch.no_grad()
def stage_shapes(encoder: nn.Module, image_size: int = 32) -> dict[str, tuple[int, ...]]:
    """The output shape (C, H, W) of each stage of a ResNet encoder for one image_size x image_size input."""
    was_training = encoder.training
    encoder.eval()
    x = torch.zeros(1, 3, image_size, image_size)
    shapes = {"input": tuple(x.shape[1:])}
    for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
        x = getattr(encoder, name)(x)
        if name in ("conv1", "maxpool") or name.startswith("layer"):
            shapes[name] = tuple(x.shape[1:])
    shapes["avgpool"] = tuple(encoder.avgpool(x).flatten(1).shape[1:])
    encoder.train(was_training)
    return shapes
