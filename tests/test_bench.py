"""`simclr bench`: the comparison formulations are right, and the command runs end to end on a CPU."""

import json
import re

import pytest
import torch

from simclr_lib.augment import pil_pipeline
from simclr_lib.bench import PILTwoViews, format_bench, mask_and_gather_nt_xent, run_bench
from simclr_lib.cli import main
from simclr_lib.loss import nt_xent_loss


@pytest.mark.parametrize("n", [2, 7])
def test_mask_and_gather_equals_nt_xent(n):
    # The speed comparison is only fair if both compute the same loss, gradients included.
    g = torch.Generator().manual_seed(n)
    z1 = torch.randn(n, 5, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(n, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ours = nt_xent_loss(z1, z2, 0.3)
    grads = torch.autograd.grad(ours, (z1, z2))
    theirs = mask_and_gather_nt_xent(z1, z2, 0.3)
    their_grads = torch.autograd.grad(theirs, (z1, z2))
    assert torch.allclose(ours, theirs.float(), atol=1e-6)
    for a, b in zip(grads, their_grads):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


def test_pil_two_views_gives_two_different_normalised_views():
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    v1, v2 = PILTwoViews(images, pil_pipeline())[1]
    assert v1.shape == v2.shape == (3, 32, 32) and not torch.equal(v1, v2)


def test_run_bench_on_cpu_writes_json_and_table(tmp_path):
    out = tmp_path / "bench.json"
    result = run_bench("cpu", batch_sizes=[8], width=2, steps=1, workers=0, data_root=tmp_path / "none",
                       out=out, progress=lambda _: None, augment_batch=16, loss_n=16)
    saved = json.loads(out.read_text())
    assert saved["device"].startswith("CPU") and "random" in saved["data"]
    assert saved["augmentation"]["batched_images_per_s"] > 0 and saved["loss"]["ours_ms"] > 0
    (step,) = saved["train_step"]
    assert step["batch_size"] == 8 and step["width"] == 2 and step["fast_views_per_s"] > 0
    assert step["dataloader_views_per_s"] > 0 and step["fast_peak_mb"] is None
    table = format_bench(result)
    assert "augmentation" in table and "mask and gather" in table and "batch 8" in table


@pytest.mark.parametrize("flags, message", [
    (["--batch-sizes", "many"], "--batch-sizes takes integers"),
    (["--batch-sizes", "1"], "at least 2"),
    (["--steps", "0"], "--steps:? must be at least 1"),
])
def test_bench_bad_flags_exit_2(flags, message, capsys):
    try:
        code = main(["bench", "--device", "cpu", *flags])
    except SystemExit as exc:  # a value the flag's argparse type refuses exits from parse_args
        code = exc.code
    assert code == 2 and re.search(message, capsys.readouterr().err)


def test_bench_never_overwrites(tmp_path, capsys):
    out = tmp_path / "b.json"
    out.write_text("{}")
    assert main(["bench", "--device", "cpu", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == "{}"
