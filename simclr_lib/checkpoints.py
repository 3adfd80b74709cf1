"""Where a checkpoint comes from: a run folder, a .pt file, or an http(s)/file URL downloaded once into runs/."""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: to a temporary file, flushed to disk, then renamed over the old one. A kill at any
    moment leaves either the previous checkpoint or the new one, never a torn file."""
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
            kept = sorted(self.run_dir.glob("checkpoint-epoch*.pt"))
            for stale in kept[:-self.keep]:
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


def is_url(source: str) -> bool:
    """Whether `source` is an http(s):// or file:// URL."""
    return urllib.parse.urlparse(str(source)).scheme in ("http", "https", "file")


def resolve_checkpoint(source: str | Path, runs_root: str | Path = "runs", sha256: str | None = None) -> Path:
    """The local checkpoint file `source` names, downloading a URL once into runs/downloaded-<name>/.

    A run folder means its checkpoint.pt. With `sha256` the file must have that digest; a mismatching
    download is deleted so that the next attempt downloads it again.
    """
    text = str(source)
    if is_url(text):
        url = urllib.parse.urlparse(text)
        name = Path(urllib.parse.unquote(url.path)).name or CHECKPOINT
        folder = Path(runs_root) / f"downloaded-{Path(name).stem}"
        path = folder / CHECKPOINT
        if not path.is_file():
            folder.mkdir(parents=True, exist_ok=True)
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
        path = Path(text)
        if path.is_dir():
            path = path / CHECKPOINT
        if not path.is_file():
            raise UserError(f"no checkpoint at {path}: pass a run folder holding {CHECKPOINT}, a .pt file, "
                            "or an http(s)/file URL")
    if sha256 is not None:
        actual = sha256_of(path)
        if actual.lower() != sha256.lower():
            if is_url(text):
                path.unlink()
            raise UserError(f"{path} has sha256 {actual[:16]}..., expected {sha256[:16]}...: the file is corrupt "
                            "or not the one you meant")
    return path
