"""`simclr bench`: the comparison formulations are right, and the command runs end to end on a CPU."""

import json
import re

import pytest
import torch

from simclr_lib import bench
from simclr_lib.augment import pil_pipeline
from simclr_lib.bench import PILTwoViews, format_bench, mask_and_gather_nt_xent, run_bench
from simclr_lib.cli import main
from simclr_lib.config import make_config
from simclr_lib.loss import nt_xent_loss
from simclr_lib.models import build_model


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


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_run_bench_on_cpu_writes_json_and_table(tmp_path, backbone):
    # 16 random images are two batches: both paths must go round them more than once (2 untimed steps + 1 timed)
    out = tmp_path / "bench.json"
    result = run_bench("cpu", batch_sizes=[8], width=2, steps=1, workers=0, data_root=tmp_path / "none",
                       out=out, progress=lambda _: None, augment_batch=16, loss_n=16, backbone=backbone)
    saved = json.loads(out.read_text())
    assert saved["device"].startswith("CPU") and "random" in saved["data"]
    assert saved["augmentation"]["batched_images_per_s"] > 0 and saved["loss"]["ours_ms"] > 0
    (step,) = saved["train_step"]
    assert step["batch_size"] == 8 and step["width"] == 2 and step["fast_views_per_s"] > 0
    assert step["dataloader_views_per_s"] > 0 and step["fast_peak_mb"] is None and step["backbone"] == backbone
    assert step["fast_tflops"] > 0 and step["fraction_of_peak"] is None  # no tensor peak for a CPU
    table = format_bench(result)
    assert "augmentation" in table and "mask and gather" in table and "batch 8" in table and "TFLOPS" in table


def test_a_batch_that_does_not_fit_is_a_row_and_every_row_is_saved_at_once(tmp_path, monkeypatch):
    # On a small card the larger batches run out of memory: that is an answer (the memory table says so), and a
    # crash at a later batch size keeps the rows measured before it.
    measured = bench.bench_train_step

    def step(splits, device, config, *args):
        if config.batch_size == 16:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        if config.batch_size == 24:
            raise RuntimeError("the machine went away")
        return measured(splits, device, config, *args)

    monkeypatch.setattr(bench, "bench_train_step", step)
    out = tmp_path / "bench.json"
    with pytest.raises(RuntimeError, match="went away"):
        run_bench("cpu", batch_sizes=[8, 16, 24], width=2, steps=1, workers=0, data_root=tmp_path / "none", out=out,
                  progress=lambda _: None, augment_batch=16, loss_n=16)
    saved = json.loads(out.read_text())
    fits, too_big = saved["train_step"]
    assert fits["batch_size"] == 8 and fits["fast_views_per_s"] > 0 and "out_of_memory" not in fits
    assert too_big == {"preset": "quick", "backbone": "resnet18", "batch_size": 16, "width": 2, "out_of_memory": True}
    assert re.search(r"batch 16\)\s+out of memory", format_bench(saved))


def naive_training_flops(model, size):
    """3 x the forward FLOPs of every convolution and linear layer (2 per multiply-add), summed by hand from the
    shapes, less the first convolution's gradient with respect to its input (the images need none)."""
    forward = []

    def count(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            forward.append(2 * module.in_channels // module.groups * k * output[0].numel())  # one image
        elif isinstance(module, torch.nn.Linear):
            forward.append(2 * module.in_features * module.out_features)

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    model(torch.zeros(2, 3, size, size))  # two images: BatchNorm in train mode needs more than one
    for hook in hooks:
        hook.remove()
    return 3 * sum(forward) - forward[0]


@pytest.mark.parametrize("backbone, width, head", [("resnet18", 64, "none"), ("resnet50", 8, "all")])
def test_training_flops_per_view_match_a_count_by_hand(backbone, width, head):
    config = make_config("quick", backbone=backbone, width=width, proj_batch_norm=head)
    expected = naive_training_flops(build_model(config, (0.5,) * 3, (0.25,) * 3), 32)
    assert bench.train_flops_per_view(config) == pytest.approx(expected, rel=1e-9)
    if backbone == "resnet18":  # the CIFAR-stem ResNet-18: 0.56 G multiply-adds per image forward
        assert 3.2e9 < expected < 3.5e9


def test_tensor_peaks_are_matched_by_card_name():
    names = ("NVIDIA H200", "NVIDIA H100 PCIe", "NVIDIA H100 80GB HBM3", "NVIDIA L40S", "NVIDIA L4", "Tesla T4", "X")
    assert [bench.tensor_peak_tflops(name) for name in names] == [989.4, 756.0, 989.4, 362.1, 121.0, 65.0, None]


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


def test_bench_compile_times_the_compiled_step_beside_the_eager_one(tmp_path, monkeypatch):
    # torch.compile itself is torch's (tests/test_train.py checks compiled augmentation and loss against eager, and
    # that a compiled run never recompiles); here a stand-in records what is compiled and that the compiled
    # callables are what the bench then runs.
    compiled, calls = [], {}

    def stand_in(fn, **kwargs):
        compiled.append(kwargs)
        name = getattr(fn, "__name__", type(fn).__name__)

        def call(*args, **kw):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kw)
        return call

    monkeypatch.setattr(torch, "compile", stand_in)
    out = tmp_path / "bench.json"
    result = run_bench("cpu", batch_sizes=[8], width=2, steps=1, workers=0, compile=True, data_root=tmp_path / "none",
                       out=out, progress=lambda _: None, augment_batch=16, loss_n=16, preset="cifar10-r18-10min")
    # the augmentation alone, then the step twice (cold, then with the cache warm): model, augmentation, loss
    assert compiled == [{"dynamic": False}] * 7
    steps = 2 * (3 + 1)  # twice: 3 first steps and 1 timed one
    assert calls == {"apply": 3 + 20 + 2 * steps, "SimCLR": steps, "nt_xent_loss": steps}  # two views a step
    (row,) = json.loads(out.read_text())["train_step"]
    assert row["fast_views_per_s"] > 0 and row["compiled_views_per_s"] > 0
    assert row["compile_seconds"] >= 0 and row["cached_compile_seconds"] >= 0
    assert row["compile_speedup"] == pytest.approx(row["compiled_views_per_s"] / row["fast_views_per_s"])
    assert row["compiled_tflops"] == pytest.approx(row["compiled_views_per_s"] * row["train_gflops_per_view"] / 1e3)
    assert result["augmentation"]["compiled_images_per_s"] > 0
    assert re.search(r"the same step compiled .*compiled in \d+ s, \d+ s cached\)\s+[\d,]+\s+eager",
                     format_bench(result))
    # the decision reads the rows the bench writes
    decision, why = bench.compile_decision(result, make_config("cifar10-r18-10min", width=2, batch_size=8), 1e6)
    assert why.startswith(f"compile: {'yes' if decision else 'no'} (batch 8: compiled ")


def test_a_compiler_that_fails_leaves_the_eager_figures(tmp_path, monkeypatch):
    def broken(fn, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("no C compiler\nmore lines")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    out = tmp_path / "bench.json"
    result = run_bench("cpu", batch_sizes=[8], width=2, steps=1, workers=0, compile=True, data_root=tmp_path / "none",
                       out=out, progress=lambda _: None, augment_batch=16, loss_n=16)
    (row,) = json.loads(out.read_text())["train_step"]
    error = "RuntimeError: no C compiler"  # the first line
    assert row["fast_views_per_s"] > 0 and row["compile_error"] == error and "compiled_views_per_s" not in row
    assert result["augmentation"]["compile_error"] == error
    assert re.search(r"the same step compiled\s+failed\s+RuntimeError: no C compiler", format_bench(result))
    assert not bench.compile_decision(result, make_config("quick", width=2, batch_size=8), 300)[0]


def _bench_row(compiled, compile_seconds, width=64, batch_size=512, preset="cifar10-r18-10min"):
    return {"preset": preset, "backbone": "resnet18", "width": width, "batch_size": batch_size,
            "fast_views_per_s": 50_000.0, "compiled_views_per_s": compiled, "compile_seconds": compile_seconds}


@pytest.mark.parametrize("row, seconds, pays", [
    (_bench_row(75_000, 60), 300, True),    # 1.5x on 240 of 300 s: 1.2x the views
    (_bench_row(60_000, 60), 300, False),   # 1.2x on 240 of 300 s: 0.96x
    (_bench_row(75_000, 60), 90, False),    # a short budget: 0.5x
    (_bench_row(55_000, 0), 300, True),     # 1.1x for nothing: yes (over the 5 % margin)
    (_bench_row(52_000, 0), 300, False),    # 1.04x: inside the 5 % margin, not worth a compiler
    (_bench_row(90_000, 10, width=8), 300, False),       # another width: the bench did not time this run's step
    (_bench_row(90_000, 10, batch_size=256), 300, False),  # another batch size
    (_bench_row(90_000, 10, preset="quick"), 300, False),  # another recipe's step (head, optimiser)
])
def test_compile_decision_counts_the_compile_time_against_the_budget(row, seconds, pays):
    config = make_config("cifar10-r18-10min")
    decision, why = bench.compile_decision({"train_step": [row]}, config, seconds)
    assert decision is pays and why.startswith(f"compile: {'yes' if pays else 'no'}")


def test_the_bench_times_the_step_of_the_preset_it_is_given(tmp_path):
    # --preset cifar10-r18-10min times what that run trains: SGD at 0.12 x 512/256 with weight decay on every
    # parameter, BatchNorm in the head, T 0.5 (the GPU job compiles the run only from this row)
    splits, _ = bench._bench_data(tmp_path / "none", 16)
    step = bench._train_step(splits, make_config("cifar10-r18-10min", width=2), torch.device("cpu"), compile=False)
    assert isinstance(step.optimizer, torch.optim.SGD) and step.temperature == 0.5
    assert [g["initial_lr"] for g in step.optimizer.param_groups] == pytest.approx([0.24, 0.24])  # before warmup
    assert [g["weight_decay"] for g in step.optimizer.param_groups] == [5e-4, 5e-4]
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in step.model.modules())
    result = run_bench("cpu", batch_sizes=[8], width=2, steps=1, workers=0, data_root=tmp_path / "none",
                       progress=lambda _: None, augment_batch=16, loss_n=16, preset="cifar10-r18-10min")
    (row,) = result["train_step"]
    assert (row["preset"], row["backbone"], row["batch_size"]) == ("cifar10-r18-10min", "resnet18", 8)
    assert "training step of cifar10-r18-10min" in format_bench(result)


def test_the_jobs_decision_command_exits_0_to_compile_and_1_otherwise(tmp_path, capsys):
    # scripts/gpu_check.sh runs `python -m simclr_lib.bench BENCH_JSON PRESET SECONDS` and compiles on status 0
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"train_step": [_bench_row(90_000, 20)]}))
    assert bench.decide([str(path), "cifar10-r18-10min", "300"]) == 0
    assert capsys.readouterr().out.startswith("compile: yes (batch 512: compiled 90,000 vs eager 50,000 views/s")
    assert bench.decide([str(path), "seed-r50-bs256", "300"]) == 1  # no row of that preset's step
    path.write_text('{"train_step": [{"pres')  # cut short
    assert bench.decide([str(path), "cifar10-r18-10min", "300"]) == 1
    assert bench.decide([str(tmp_path / "none.json"), "cifar10-r18-10min", "300"]) == 1
    assert "unreadable" in capsys.readouterr().out
