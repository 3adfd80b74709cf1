"""`simclr bench`: the speed of each piece of the fast path beside the per-image formulation the popular SimCLR
repositories use, measured in one process on one device: augmentation, the loss, and the whole training step."""

from __future__ import annotations

import gc
import itertools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from .augment import SimCLRAugment, pil_pipeline, reference_view
from .config import Config, make_config
from .data import CIFAR10_MEAN, CIFAR10_STD, DatasetSplits, ImageData, load_splits
from .errors import UserError
from .loss import nt_xent_loss
from .models import build_model
from .optim import WarmupCosineSchedule, optimizer_for
from .runtime import device_description, on_device, resolve_device, step_seed, to_layout
from .train import BatchSource, TrainStep, make_augment


def mask_and_gather_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent as popular repositories compute it (for comparison only): a (2N, 2N) label matrix, boolean masks and
    indexing (data-dependent shapes: a host sync on a GPU, a graph break for torch.compile), positive in column 0."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    ids = torch.arange(n, device=z.device).repeat(2)
    same = ids.view(-1, 1) == ids.view(1, -1)
    off_diagonal = ~torch.eye(2 * n, dtype=torch.bool, device=z.device)
    similarity = (z @ z.T)[off_diagonal].view(2 * n, -1)
    same = same[off_diagonal].view(2 * n, -1)
    positives = similarity[same].view(2 * n, 1)
    negatives = similarity[~same].view(2 * n, -1)
    logits = torch.cat([positives, negatives], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(2 * n, dtype=torch.long, device=z.device))


class PILTwoViews(Dataset):
    """The classic data path: each item is two views of one image, made one image at a time with PIL."""

    def __init__(self, images: torch.Tensor, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = Image.fromarray(self.images[index].permute(1, 2, 0).numpy())
        return self.transform(image), self.transform(image)


def _error_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def seconds_per_call(fn: Callable[[], Any], device: torch.device, repeat: int, warmup: int = 2) -> float:
    """Median wall time of `fn` over `repeat` calls after `warmup` untimed ones, with the device synchronised."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _batched_augmentation_seconds(images: torch.Tensor, device: torch.device, repeat: int, compile: bool) -> float:
    """Seconds per call of the batched augmentation of `images` on `device`, eager or compiled."""
    augment = SimCLRAugment().to(device)
    apply = torch.compile(augment.apply, dynamic=False) if compile else augment.apply
    on_device, generator = images.to(device), torch.Generator(device=device).manual_seed(0)
    batch, _, h, w = images.shape
    return seconds_per_call(lambda: apply(on_device, augment.sample_params(batch, h, w, generator, device)),
                            device, repeat, warmup=3 if compile else 2)


def bench_augmentation(images: torch.Tensor, device: torch.device, batch: int = 512,
                       repeat: int = 20) -> dict[str, Any]:
    """Images/s of the batched augmentation on `device` and of the per-image paths (PIL, torchvision tensors)."""
    images = images[:batch]
    batched_s = _batched_augmentation_seconds(images, device, repeat, compile=False)
    pipeline = pil_pipeline()
    pil_images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
    pil_s = seconds_per_call(lambda: torch.stack([pipeline(image) for image in pil_images]),
                             torch.device("cpu"), max(3, repeat // 4), warmup=1)
    _, _, h, w = images.shape
    params = SimCLRAugment().sample_params(batch, h, w, torch.Generator().manual_seed(0))
    cpu_augment = SimCLRAugment()
    ref_s = seconds_per_call(lambda: [reference_view(images[i], params, i, cpu_augment) for i in range(batch)],
                             torch.device("cpu"), 3, warmup=0)
    return {"batch": batch, "batched_images_per_s": batch / batched_s,
            "pil_images_per_s": batch / pil_s, "reference_images_per_s": batch / ref_s,
            "speedup_vs_pil": pil_s / batched_s, "speedup_vs_reference": ref_s / batched_s}


def bench_compiled_augmentation(images: torch.Tensor, device: torch.device, batch: int = 512,
                                repeat: int = 20) -> dict[str, Any]:
    """Images/s of the batched augmentation compiled by torch.compile, or the compiler's error in one line."""
    torch._dynamo.reset()  # a fresh compilation, not one cached in this process
    try:
        return {"compiled_images_per_s": batch / _batched_augmentation_seconds(images[:batch], device, repeat, True)}
    except Exception as exc:  # whatever the compiler raises, the eager figure stands
        return {"compile_error": _error_line(exc)}


def bench_loss(device: torch.device, n: int = 1024, dim: int = 128, repeat: int = 20) -> dict[str, Any]:
    """Forward + backward time of `nt_xent_loss` and of the mask-and-gather formulation, same inputs."""
    generator = torch.Generator(device=device).manual_seed(0)
    z1, z2 = (torch.randn(n, dim, device=device, generator=generator, requires_grad=True) for _ in range(2))

    def fwd_bwd(loss_fn: Callable[..., torch.Tensor]) -> None:
        z1.grad = z2.grad = None
        loss_fn(z1, z2, 0.5).backward()

    ours = seconds_per_call(lambda: fwd_bwd(nt_xent_loss), device, repeat, warmup=3)
    theirs = seconds_per_call(lambda: fwd_bwd(mask_and_gather_nt_xent), device, repeat, warmup=3)
    return {"n": n, "dim": dim, "ours_ms": ours * 1e3, "mask_and_gather_ms": theirs * 1e3, "speedup": theirs / ours}


# Dense half-precision tensor-core peaks (bf16; fp16 on T4 and V100, which have no bf16), in TFLOPS, from the
# vendor data sheets; matched in this order against the CUDA device name.
TENSOR_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0),
                      ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0), ("T4", 65.0), ("V100", 125.0))


def tensor_peak_tflops(device_name: str) -> float | None:
    """The GPU's dense bf16 (or fp16) tensor peak in TFLOPS, when this table knows the card."""
    return next((peak for key, peak in TENSOR_PEAK_TFLOPS if key in device_name), None)


def train_flops_per_view(config: Config) -> float:
    """FLOPs of one view in a training step: forward and backward of encoder and head, as counted by PyTorch's
    FlopCounterMode (matrix products and convolutions, 2 per multiply-add) on two views on the CPU."""
    model = build_model(config, CIFAR10_MEAN, CIFAR10_STD)
    size = config.image_size or 32
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(2, 3, size, size)).sum().backward()
    return counter.get_total_flops() / 2


def _train_step(splits: DatasetSplits, config: Config, device: torch.device, compile: bool) -> TrainStep:
    """The training step of a run of `config` (model, head, augmentation, optimiser, temperature, precision)."""
    if device.type == "cuda":  # the peak memory counted from here on is this path's alone
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = on_device(build_model(config, splits.mean, splits.std), device)
    optimizer = optimizer_for(config, model)
    return TrainStep(model, make_augment(config, splits).to(device), optimizer,
                     WarmupCosineSchedule(optimizer, 10_000, 100), config.temperature, device, compile,
                     precision=config.precision, bn_per_view=config.bn_per_view)


def _peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _views_per_s(step: Callable[[], None], device: torch.device, warmup: int, steps: int,
                 batch_size: int) -> tuple[float, float]:
    """Views/s over `steps` timed steps, and the seconds that the `warmup` untimed steps before them took beyond
    the same number of timed ones: the one-off cost of compilation and autotuning."""
    first = seconds_per_call(lambda: [step() for _ in range(warmup)], device, 1, warmup=0)
    seconds = seconds_per_call(lambda: [step() for _ in range(steps)], device, 1, warmup=0)
    return 2 * batch_size * steps / seconds, max(0.0, first - warmup * seconds / steps)


def _fast_path(splits: DatasetSplits, device: torch.device, config: Config, steps: int,
               compile: bool) -> tuple[float, float]:
    step = _train_step(splits, config, device, compile)
    source = BatchSource(splits.train, "device", config.batch_size, 0, device)
    batches = (batch for epoch in itertools.count() for batch in source.epoch(epoch))
    generator, seeds = torch.Generator(device=device), itertools.count()
    return _views_per_s(lambda: step(next(batches), generator.manual_seed(step_seed(0, 0, next(seeds)))), device,
                        3 if compile else 2, steps, config.batch_size)


def _dataloader_path(splits: DatasetSplits, device: torch.device, config: Config, steps: int, workers: int) -> float:
    step = _train_step(splits, config, device, compile=False)
    loader = DataLoader(PILTwoViews(splits.train.images, pil_pipeline()), batch_size=config.batch_size, shuffle=True,
                        drop_last=True, num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=workers > 0)
    batches = (batch for _ in itertools.count() for batch in loader)  # epoch after epoch: big batches, few images

    def one() -> None:
        v1, v2 = next(batches)
        step.on_views(to_layout(torch.cat([v1, v2]).to(device, non_blocking=True), step.model))

    # Enough untimed steps that the workers' prefetch queue has drained to its steady state.
    return _views_per_s(one, device, max(2, 2 * workers), steps, config.batch_size)[0]


def bench_train_step(splits: DatasetSplits, device: torch.device, config: Config, steps: int,
                     workers: int) -> dict[str, Any]:
    """Views/s of whole training steps (augmentation included) of a run of `config` on a CIFAR-stem ResNet: the
    fast path (uint8 data on the device, batched augmentation) and the per-image path (PIL in DataLoader workers),
    with the fast path's achieved TFLOPS and its fraction of the GPU's tensor peak where the card is known."""
    fast, _ = _fast_path(splits, device, config, steps, compile=False)
    fast_peak = _peak_mb(device)
    classic = _dataloader_path(splits, device, config, steps, workers)
    flops = train_flops_per_view(config)
    peak = tensor_peak_tflops(device_description(device)) if device.type == "cuda" else None
    return {"preset": config.preset, "backbone": config.backbone, "batch_size": config.batch_size,
            "width": config.width, "steps": steps, "workers": workers, "fast_views_per_s": fast,
            "dataloader_views_per_s": classic, "speedup": fast / classic, "fast_peak_mb": fast_peak,
            "dataloader_peak_mb": _peak_mb(device), "train_gflops_per_view": flops / 1e9,
            "fast_tflops": fast * flops / 1e12, "tensor_peak_tflops": peak,
            "fraction_of_peak": fast * flops / 1e12 / peak if peak else None}


def bench_compiled_step(splits: DatasetSplits, device: torch.device, config: Config,
                        row: dict[str, Any]) -> dict[str, Any]:
    """The fast path of `bench_train_step`'s `row` compiled by torch.compile (model, augmentation, loss): views/s,
    peak memory, TFLOPS, the one-off compile time, and the compile time again with the compiler's on-disk cache
    warm (what a run after the bench pays); a compiler that fails here is an answer too (`compile_error`)."""
    try:
        torch._dynamo.reset()  # a fresh compilation in this process (the on-disk caches may be warm already)
        views, compile_seconds = _fast_path(splits, device, config, row["steps"], compile=True)
        peak_mb = _peak_mb(device)
        torch._dynamo.reset()
        _, cached_seconds = _fast_path(splits, device, config, row["steps"], compile=True)
    except Exception as exc:  # whatever the compiler raises, the eager figures stand
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"compile_error": _error_line(exc)}
    tflops, peak = views * row["train_gflops_per_view"] / 1e3, row["tensor_peak_tflops"]
    return {"compiled_views_per_s": views, "compile_seconds": compile_seconds,
            "cached_compile_seconds": cached_seconds, "compiled_peak_mb": peak_mb, "compiled_tflops": tflops,
            "compiled_fraction_of_peak": tflops / peak if peak else None,
            "compile_speedup": views / row["fast_views_per_s"]}


def _bench_data(data_root: str | Path, need: int) -> tuple[DatasetSplits, str]:
    """CIFAR-10 if it is on disk, else `need` seeded random images (speed does not depend on content)."""
    try:
        splits = load_splits("cifar10", data_root, None, download=False)
        return splits, f"CIFAR-10 train ({len(splits.train)} images)"
    except UserError:
        images = torch.randint(0, 256, (need, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        data = ImageData(images, torch.zeros(need, dtype=torch.long), ["x"])
        return (DatasetSplits("cifar10", data, data, data, CIFAR10_MEAN, CIFAR10_STD, "random"),
                f"random 32x32 images ({need}; no CIFAR-10 under {data_root})")


def run_bench(device: str = "auto", batch_sizes: Sequence[int] = (256, 512), width: int | None = None,
              steps: int | None = None, workers: int | None = None, compile: bool = False,
              data_root: str | Path = "data", out: str | Path | None = None, progress: Callable[[str], None] = print,
              augment_batch: int = 512, loss_n: int = 1024, backbone: str | None = None,
              preset: str = "quick") -> dict[str, Any]:
    """All benchmarks on one device; the training step is that of a run of `preset` (head, augmentation,
    optimiser, temperature, precision) with `backbone` (default: the preset's) at `width` and each batch size.
    Writes the JSON to `out` when given, after every part, and returns it."""
    dev = resolve_device(device)
    on_gpu = dev.type == "cuda"
    # Full width on a GPU; on a CPU the quick preset's width 8, where one full-width step takes half a minute.
    width = width if width is not None else (64 if on_gpu else 8)
    steps = steps if steps is not None else (30 if on_gpu else 4)
    workers = workers if workers is not None else min(os.cpu_count() or 1, 16)
    base = make_config(preset, backbone=backbone, width=width)
    # Both paths go round the images as often as they need; 8 batches keep the DataLoader's epoch ends rare.
    need = max(augment_batch, 8 * max(batch_sizes))
    splits, data_note = _bench_data(data_root, need)
    images = splits.train.images
    if len(images) < need:
        raise UserError(f"the benchmark needs {need} images but {data_note}: lower --batch-sizes")
    result: dict[str, Any] = {"device": device_description(dev), "torch": torch.__version__,
                              "python": platform.python_version(), "cpu_count": os.cpu_count(),
                              "torch_threads": torch.get_num_threads(), "data": data_note, "preset": preset,
                              "date": time.strftime("%Y-%m-%d %H:%M:%S")}

    def save() -> None:  # after every part, so that a crash or a time limit later keeps what was measured
        if out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            partial = Path(f"{out}.partial")
            partial.write_text(json.dumps(result, indent=2) + "\n")
            os.replace(partial, out)  # whole or not at all, even when stopped while writing

    progress(f"bench on {result['device']} with {data_note}")
    progress(f"augmentation ({augment_batch} images) ...")
    result["augmentation"] = bench_augmentation(images, dev, augment_batch)
    progress(f"loss (N={loss_n}, D=128) ...")
    result["loss"] = bench_loss(dev, loss_n)
    result["train_step"] = []
    save()
    configs = [base.replace(batch_size=batch_size) for batch_size in batch_sizes]
    for config in configs:  # every eager figure first: a compiler that hangs cannot take them with it
        progress(f"training step of {preset}, batch {config.batch_size}, {config.backbone} CIFAR width {width} ...")
        try:
            row = bench_train_step(splits, dev, config, steps, workers)
        except torch.cuda.OutOfMemoryError:  # an answer too: this batch does not fit on this card
            gc.collect()
            torch.cuda.empty_cache()
            row = {"preset": preset, "backbone": config.backbone, "batch_size": config.batch_size, "width": width,
                   "out_of_memory": True}
            progress(f"  batch {config.batch_size}: out of GPU memory")
        result["train_step"].append(row)
        save()
    if not compile:
        return result
    progress("augmentation compiled ...")
    result["augmentation"].update(bench_compiled_augmentation(images, dev, augment_batch))
    save()
    for config, row in zip(configs, result["train_step"]):
        if row.get("out_of_memory"):
            continue
        progress(f"training step compiled, batch {config.batch_size} ...")
        row.update(bench_compiled_step(splits, dev, config, row))
        if "compile_error" in row:
            progress(f"  compiling failed: {row['compile_error']}")
        save()
    return result


def compile_decision(bench: dict[str, Any], config: Config, seconds: float,
                     margin: float = 1.05) -> tuple[bool, str]:
    """Whether to compile a run of `config` with `seconds` of pretraining, after a bench with `--compile` of its
    preset, backbone, width and batch size in the same place: yes when the compiled step, its compile time with the
    cache the bench left (`cached_compile_seconds`) taken off `seconds`, trains at least `margin` times the views
    of the eager step; and why, in one line."""
    key = (config.preset, config.backbone, config.width, config.batch_size)
    rows = [r for r in bench.get("train_step", []) if "compiled_views_per_s" in r
            and (r.get("preset"), r["backbone"], r["width"], r["batch_size"]) == key]
    if not rows:
        return False, (f"compile: no (the bench timed no compiled step of {config.preset}, {config.backbone} width "
                       f"{config.width}, batch {config.batch_size})")
    row = rows[-1]
    compile_seconds = row.get("cached_compile_seconds", row["compile_seconds"])
    gain = row["compiled_views_per_s"] * max(0.0, seconds - compile_seconds) / (row["fast_views_per_s"] * seconds)
    return gain >= margin, (f"compile: {'yes' if gain >= margin else 'no'} (batch {config.batch_size}: compiled "
                            f"{row['compiled_views_per_s']:,.0f} vs eager {row['fast_views_per_s']:,.0f} views/s, "
                            f"compile {compile_seconds:.0f} s: {gain:.2f}x the views in {seconds:.0f} s)")


def decide(argv: Sequence[str]) -> int:
    """`python -m simclr_lib.bench BENCH_JSON PRESET SECONDS`: prints the compile decision for a run of PRESET
    with SECONDS of pretraining; exit status 0 for compile, 1 for eager (also when BENCH_JSON is missing or bad)."""
    path, preset, seconds = argv
    try:
        bench = json.loads(Path(path).read_text())
        ok, why = compile_decision(bench, make_config(preset), float(seconds))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UserError) as exc:
        ok, why = False, f"compile: no ({path} unreadable: {_error_line(exc)})"
    print(why)
    return 0 if ok else 1


def format_bench(result: dict[str, Any]) -> str:
    """The table `simclr bench` prints."""
    aug, loss = result["augmentation"], result["loss"]
    lines = [f"device: {result['device']}  |  torch {result['torch']}  |  data: {result['data']}  |  training step of "
             f"{result.get('preset', 'quick')}", ""]
    rows = [("what", "ours", "per-image / popular", "speedup"),
            (f"augmentation, images/s (batch {aug['batch']})", f"{aug['batched_images_per_s']:,.0f}",
             f"{aug['pil_images_per_s']:,.0f} (PIL)", f"{aug['speedup_vs_pil']:.1f}x"),
            ("", "", f"{aug['reference_images_per_s']:,.0f} (torchvision tensors)",
             f"{aug['speedup_vs_reference']:.1f}x"),
            *([("  the same, compiled", f"{aug['compiled_images_per_s']:,.0f}", "eager (above)",
                f"{aug['compiled_images_per_s'] / aug['batched_images_per_s']:.2f}x")]
              if "compiled_images_per_s" in aug else []),
            (f"loss fwd+bwd, ms (N={loss['n']}, D={loss['dim']})", f"{loss['ours_ms']:.2f}",
             f"{loss['mask_and_gather_ms']:.2f} (mask and gather)", f"{loss['speedup']:.1f}x")]
    for r in result["train_step"]:
        if r.get("out_of_memory"):
            rows.append((f"train step ({r['backbone'].replace('resnet', 'R')} w{r['width']}, batch {r['batch_size']})",
                         "out of memory", "", ""))
            continue
        memory = ("" if r["fast_peak_mb"] is None
                  else f", peak {r['fast_peak_mb']:,.0f} / {r['dataloader_peak_mb']:,.0f} MiB")
        peak = f", {r['fraction_of_peak']:.0%} of peak" if r.get("fraction_of_peak") else ""
        name = r.get("backbone", "resnet18").replace("resnet", "R")
        rows.append((f"train step, views/s ({name} w{r['width']}, batch {r['batch_size']}{memory}, "
                     f"{r['fast_tflops']:.3g} TFLOPS{peak})" if "fast_tflops" in r else
                     f"train step, views/s ({name} w{r['width']}, batch {r['batch_size']}{memory})",
                     f"{r['fast_views_per_s']:,.0f}", f"{r['dataloader_views_per_s']:,.0f} (PIL DataLoader, "
                     f"{r['workers']} workers)", f"{r['speedup']:.1f}x"))
        if "compile_error" in r:
            rows.append(("  the same step compiled", "failed", r["compile_error"][:60], ""))
        if "compiled_views_per_s" in r:
            peak = f", {r['compiled_fraction_of_peak']:.0%} of peak" if r.get("compiled_fraction_of_peak") else ""
            cached = f", {r['cached_compile_seconds']:.0f} s cached" if "cached_compile_seconds" in r else ""
            rows.append((f"  the same step compiled ({r['compiled_tflops']:.3g} TFLOPS{peak}, compiled in "
                         f"{r['compile_seconds']:.0f} s{cached})", f"{r['compiled_views_per_s']:,.0f}",
                         "eager (above)", f"{r['compile_speedup']:.2f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines += ["  ".join(cell.ljust(w) if i in (0, 2) else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
              for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys
    sys.exit(decide(sys.argv[1:]))
