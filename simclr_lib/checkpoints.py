"""Where a checkpoint comes from: a run folder, a .pt file, or an http(s)/file URL downloaded once into runs/."""

from __future__ import annotations

import hashlib
import shutil
import urllib.parse
import urllib.request
from pathlib import Path

from .errors import UserError

CHECKPOINT = "checkpoint.pt"


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
