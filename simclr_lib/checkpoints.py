"""Where a checkpoint comes from: a run folder, a .pt file, or an http(s)/file URL downloaded once into runs/."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically (temporary file, fsync, rename): a kill at any moment leaves the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written file is never left to be mistaken for a checkpoint
        raise


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint safely (weights_only: tensors and plain containers, no code from pickles)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"cannot read checkpoint {path}: {exc.__class__.__name__}: {exc}") from None


def checkpoint_name(epoch: int, step_in_epoch: int = 0) -> str:
    """The file name an older checkpoint keeps: checkpoint-epoch0007.pt, or ...-step0012.pt mid-epoch."""
    return f"checkpoint-epoch{epoch:04d}" + (f"-step{step_in_epoch:04d}" if step_in_epoch else "") + ".pt"


def _position(path: Path) -> tuple[int, int]:
    # (epoch, step): the writing order, which the names' text order is not ("-step0012.pt" sorts before ".pt")
    match = re.fullmatch(r"checkpoint-epoch(\d+)(?:-step(\d+))?\.pt", path.name)
    return (int(match[1]), int(match[2] or 0)) if match else (-1, -1)


class CheckpointWriter:
    """checkpoint.pt in a run folder, always the latest; with keep=N the N checkpoints before it stay too, as
    checkpoint-epochNNNN.pt (hard links where the file system allows, so keeping costs no extra write)."""

    def __init__(self, run_dir: Path, keep: int = 0, enabled: bool = True) -> None:
        self.run_dir, self.keep, self.enabled = Path(run_dir), keep, enabled
        self.path = self.run_dir / CHECKPOINT
        self.last_name: str | None = None  # what the current checkpoint.pt becomes when it is replaced

    def write(self, state: dict[str, Any]) -> None:
        """Save `state` as checkpoint.pt (only where enabled, i.e. on rank 0), keeping older ones as asked."""
        if not self.enabled:
            return
        if self.keep and self.last_name and self.path.exists():
            older = self.run_dir / self.last_name
            if not older.exists():
                try:
                    os.link(self.path, older)
                except OSError:
                    shutil.copyfile(self.path, older)
            for stale in sorted(self.run_dir.glob("checkpoint-epoch*.pt"), key=_position)[:-self.keep]:
                stale.unlink()
        save_checkpoint(self.path, state)
        self.last_name = checkpoint_name(state["epoch"], state.get("step_in_epoch", 0))


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_model_checkpoint(source: str | Path, sha256: str | None = None) -> tuple[Path, dict[str, Any]]:
    """The local path and the contents of a SimCLR checkpoint that `source` names (see `resolve_checkpoint`)."""
    path = resolve_checkpoint(source, sha256=sha256)
    return path, _as_model_checkpoint(load_checkpoint(path), path)


def _as_model_checkpoint(state: Any, path: Path) -> dict[str, Any]:
    """A checkpoint of this project as it is; an encoder file of `simclr export` or a bare torchvision ResNet
    state_dict as one whose "model" holds the encoder only ("encoder_only": the projection head stays new)."""
    if isinstance(state, dict) and "arch" in state and "model" in state:
        return state
    nested = isinstance(state, dict) and isinstance(state.get("state_dict"), dict)  # also {"state_dict", "epoch"...}
    exported = nested and {"arch", "cifar_stem", "mean", "std"} <= state.keys()
    weights = state["state_dict"] if nested else state
    if isinstance(weights, dict) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in weights.items()):
        weights = {k.removeprefix("module."): v for k, v in weights.items()}  # saved from DataParallel/DDP
    if not isinstance(weights, dict) or "conv1.weight" not in weights:
        raise UserError(f"{path} is neither a checkpoint of this project, nor an exported encoder, nor a torchvision "
                        "ResNet state_dict (no conv1.weight)")
    conv1 = weights["conv1.weight"]
    arch = dict(backbone="resnet50" if "layer1.0.conv3.weight" in weights else "resnet18",
                cifar_stem=conv1.shape[-1] == 3, width=conv1.shape[0])
    if exported:
        arch |= dict(backbone=state["arch"], cifar_stem=state["cifar_stem"], mean=tuple(state["mean"]),
                     std=tuple(state["std"]))
    elif not arch["cifar_stem"]:  # a torchvision ResNet with its ImageNet stem: ImageNet's normalisation
        arch |= dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    return {"arch": arch, "model": {f"encoder.{k}": v for k, v in weights.items()}, "encoder_only": True,
            "image_size": state.get("image_size") if exported else None}


def resolve_checkpoint(source: str | Path, runs_root: str | Path = "runs", sha256: str | None = None) -> Path:
    """The checkpoint file `source` (a run folder, a file, or a URL downloaded once into runs/downloaded-<name>/)
    names; with `sha256`, or a `<file>.sha256` beside it, it must have that digest (a mismatching download is
    deleted, to be fetched again)."""
    text, url = str(source), urllib.parse.urlparse(str(source))
    if remote := url.scheme in ("http", "https", "file"):
        name = Path(urllib.parse.unquote(url.path)).name or CHECKPOINT
        path = Path(runs_root) / f"downloaded-{Path(name).stem}" / CHECKPOINT
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".part")
            try:
                with urllib.request.urlopen(text, timeout=60) as response, open(tmp, "wb") as f:
                    shutil.copyfileobj(response, f)
            except (OSError, ValueError) as exc:
                tmp.unlink(missing_ok=True)
                raise UserError(f"cannot download {text}: {exc}") from None
            tmp.replace(path)
            print(f"downloaded {text} -> {path}")
    else:
        path = Path(text) / CHECKPOINT if Path(text).is_dir() else Path(text)
        if not path.is_file():
            raise UserError(f"no checkpoint at {path}: pass a run folder holding {CHECKPOINT}, a .pt file, "
                            "or an http(s)/file URL")
    sidecar = path.with_name(path.name + ".sha256")  # e.g. the shipped encoder's checkpoint.pt.sha256
    if sha256 is None and sidecar.is_file():
        if not (sha256 := next(iter(sidecar.read_text().split()), None)):
            raise UserError(f"{sidecar} is empty: restore it (git checkout) or delete it to load {path} unchecked")
    if sha256 is not None and (actual := sha256_of(path)).lower() != sha256.lower():
        if remote:
            path.unlink()
        raise UserError(f"{path} has sha256 {actual[:16]}..., expected {sha256[:16]}...: the file is corrupt "
                        "or not the one you meant")
    return path
