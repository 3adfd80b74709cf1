"""Checkpoint sources: run folders, files, and file:// URLs (no network) with SHA-256 checks."""

import pytest
import torch

from simclr_lib.checkpoints import resolve_checkpoint, sha256_of
from simclr_lib.errors import UserError
from simclr_lib.models import SimCLR


@pytest.fixture
def checkpoint(tmp_path):
    model = SimCLR("resnet18", width=4)
    path = tmp_path / "trained" / "checkpoint.pt"
    path.parent.mkdir()
    torch.save({"arch": model.arch, "model": model.state_dict()}, path)
    return model, path


def test_run_folder_and_file(checkpoint):
    _, path = checkpoint
    assert resolve_checkpoint(path.parent) == path
    assert resolve_checkpoint(path) == path
    with pytest.raises(UserError, match="no checkpoint"):
        resolve_checkpoint(path.parent / "nothing-here")


def test_file_url_is_copied_once_and_checked(checkpoint, tmp_path):
    model, path = checkpoint
    runs = tmp_path / "runs"
    digest = sha256_of(path)
    local = resolve_checkpoint(path.as_uri(), runs_root=runs, sha256=digest)
    assert local == runs / "downloaded-checkpoint" / "checkpoint.pt" and sha256_of(local) == digest
    path.unlink()  # the second call must not fetch again
    assert resolve_checkpoint(path.as_uri(), runs_root=runs) == local
    loaded = SimCLR.from_checkpoint(local)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_sha256_mismatch_is_one_clear_error_and_removes_the_download(checkpoint, tmp_path):
    _, path = checkpoint
    runs = tmp_path / "runs"
    with pytest.raises(UserError, match="expected 0000000000000000"):
        resolve_checkpoint(path.as_uri(), runs_root=runs, sha256="0" * 64)
    assert not (runs / "downloaded-checkpoint" / "checkpoint.pt").exists()
    with pytest.raises(UserError, match="expected"):  # a local file is checked but never deleted
        resolve_checkpoint(path, sha256="0" * 64)
    assert path.exists()


def test_unreachable_url_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot download"):
        resolve_checkpoint((tmp_path / "missing.pt").as_uri(), runs_root=tmp_path / "runs")
