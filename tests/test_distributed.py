"""Data-parallel training on CPU with the gloo backend and 2 processes: the same numbers as one process on the
concatenated batch, and a torchrun launch of run.py that writes one run folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from simclr_lib import distributed
from simclr_lib.config import make_config
from simclr_lib.loss import nt_xent_loss
from simclr_lib.models import build_model

ROOT = Path(__file__).resolve().parents[1]
WORLD, GLOBAL_BATCH = 2, 8


def global_views() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g), torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g)


def model_config():
    # BN in the projection head too, so both BatchNorm2d (encoder) and BatchNorm1d (head) are exercised.
    return make_config("quick", width=4, proj_batch_norm="all", device="cpu")


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def rank_worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    model = distributed.convert_batchnorm(build_model(model_config()))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    v1, v2 = global_views()
    n = GLOBAL_BATCH // WORLD
    local = torch.cat([v1[rank * n:(rank + 1) * n], v2[rank * n:(rank + 1) * n]])
    z = ddp(local)
    loss = nt_xent_loss(z[:n], z[n:], 0.5)
    loss.backward()
    global_loss = distributed.mean_over_ranks(loss.detach())
    if rank == 0:
        torch.save({"loss": global_loss, "grads": gradients(model),
                    "buffers": {k: v.clone() for k, v in model.state_dict().items() if "running" in k}}, out)
    dist.destroy_process_group()


def test_two_processes_give_the_loss_and_gradients_of_one_process_on_the_whole_batch(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(rank_worker, args=(str(tmp_path / "init"), str(out)), nprocs=WORLD, join=True)
    result = torch.load(out, weights_only=True)

    model = build_model(model_config())
    v1, v2 = global_views()
    z = model(torch.cat([v1, v2]))
    loss = nt_xent_loss(z[:GLOBAL_BATCH], z[GLOBAL_BATCH:], 0.5)
    loss.backward()
    expected = gradients(model)

    assert torch.allclose(result["loss"], loss.detach(), atol=1e-5)
    assert result["grads"].keys() == expected.keys()
    encoder = [k for k in expected if k.startswith("encoder.")]
    assert len(encoder) > 10
    for name in expected:
        assert torch.allclose(result["grads"][name], expected[name], atol=1e-5, rtol=1e-4), name
    # global BatchNorm: the running statistics are those of the whole batch as well
    for name, value in result["buffers"].items():
        assert torch.allclose(value, model.state_dict()[name], atol=1e-5), name


def test_without_a_process_group_the_helpers_are_identities():
    x = torch.randn(4, 3, requires_grad=True)
    assert distributed.gather_with_grad(x) is x and distributed.all_reduce_sum(x) is x
    assert distributed.current().world_size == 1 and not distributed.current().enabled
    bn = torch.nn.BatchNorm2d(3)
    converted = distributed.convert_batchnorm(torch.nn.Sequential(bn))[0]
    assert isinstance(converted, distributed.GlobalBatchNorm)
    y = torch.randn(5, 3, 4, 4)
    assert torch.allclose(converted(y), torch.nn.BatchNorm2d(3)(y))


def first_loss(run_dir: Path) -> float:
    return next(r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "step")["loss"]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_torchrun_two_processes_write_one_run_folder(tiny_folder, tmp_path):
    args = ["--dataset", "folder", "--data-root", str(tiny_folder), "--epochs", "2", "--batch-size", "16",
            "--width", "4", "--train-subset", "64", "--probe-epochs", "2", "--knn-k", "5", "--knn-monitor-size",
            "20", "--knn-every", "0", "--log-every", "1", "--no-progress", "--device", "cpu", "--tsne-points", "20"]
    runs = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "run.py"), *args, "--out", str(runs / "ddp")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert [p.name for p in runs.iterdir()] == ["ddp"]
    summary = json.loads((runs / "ddp" / "summary.json").read_text())
    assert summary["epochs"] == 2 and 0 <= summary["knn_top1"] <= 100
    assert proc.stdout.count("run folder:") == 1  # rank 0 alone prints
    # The same global batch in one process: the first step's loss agrees (same views, global BN, all negatives).
    single = subprocess.run([sys.executable, str(ROOT / "run.py"), *args, "--epochs", "1", "--out",
                             str(tmp_path / "single")], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    assert first_loss(runs / "ddp") == pytest.approx(first_loss(tmp_path / "single"), abs=1e-4)
