"""`simclr bench`: the speed of each piece of the fast path beside the per-image formulation the popular SimCLR
repositories use, measured in one process on one device: augmentation, the loss, and the whole training step."""

from __future__ import annotations

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

from .augment import SimCLRAugment, pil_pipeline, reference_view
from .config import make_config
from .data import CIFAR10_MEAN, CIFAR10_STD, ImageData, load_splits
from .errors import UserError
from .evaluate import channels_last
from .loss import nt_xent_loss
from .models import build_model
from .optim import WarmupCosineSchedule, build_optimizer, scaled_lr
from .train import BatchSource, TrainStep, device_description, resolve_device, step_seed


def mask_and_gather_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent as the popular repositories compute it, for comparison only: build a (2N, 2N) label matrix,
    drop the diagonal with a boolean mask, pull the positives and negatives out with boolean indexing, and put
    the positive in column 0 of a cross-entropy. Same value as `nt_xent_loss`; more memory passes, and the
    boolean indexing has data-dependent shapes (a host sync on a GPU, a graph break for torch.compile)."""
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
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = Image.fromarray(self.images[index].permute(1, 2, 0).numpy())
        return self.transform(image), self.transform(image)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], Any], device: torch.device, repeat: int, warmup: int = 2) -> float:
    """Median wall time of `fn` over `repeat` calls after `warmup` untimed ones, with the device synchronised."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_augmentation(images: torch.Tensor, device: torch.device, batch: int = 512, repeat: int = 20,
                       compile: bool = False) -> dict[str, Any]:
    """Images/s of the batched augmentation on `device` and of the per-image paths (PIL, torchvision tensors)."""
    images = images[:batch]
    augment = SimCLRAugment().to(device)
    apply = torch.compile(augment.apply) if compile else augment.apply
    on_device = images.to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    _, _, height, width = images.shape

    def batched() -> torch.Tensor:
        return apply(on_device, augment.sample_params(batch, height, width, generator, device))

    batched_s = seconds_per_call(batched, device, repeat, warmup=3 if compile else 2)
    pipeline = pil_pipeline()
    pil_images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
    pil_s = seconds_per_call(lambda: torch.stack([pipeline(image) for image in pil_images]),
                             torch.device("cpu"), max(3, repeat // 4), warmup=1)
    params = augment.sample_params(batch, height, width, torch.Generator().manual_seed(0))
    cpu_augment = SimCLRAugment()
    ref_s = seconds_per_call(lambda: [reference_view(images[i], params, i, cpu_augment) for i in range(batch)],
                             torch.device("cpu"), 3, warmup=0)
    return {"batch": batch, "compiled": compile, "batched_images_per_s": batch / batched_s,
            "pil_images_per_s": batch / pil_s, "reference_images_per_s": batch / ref_s,
            "speedup_vs_pil": pil_s / batched_s, "speedup_vs_reference": ref_s / batched_s}


def bench_loss(device: torch.device, n: int = 1024, dim: int = 128, repeat: int = 20) -> dict[str, Any]:
    """Forward + backward time of `nt_xent_loss` and of the mask-and-gather formulation, same inputs."""
    generator = torch.Generator(device=device).manual_seed(0)
    z1 = torch.randn(n, dim, device=device, generator=generator, requires_grad=True)
    z2 = torch.randn(n, dim, device=device, generator=generator, requires_grad=True)

    def run(loss_fn: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def call() -> None:
            z1.grad = z2.grad = None
            loss_fn(z1, z2, 0.5).backward()
        return call

    ours = seconds_per_call(run(nt_xent_loss), device, repeat, warmup=3)
    theirs = seconds_per_call(run(mask_and_gather_nt_xent), device, repeat, warmup=3)
    return {"n": n, "dim": dim, "ours_ms": ours * 1e3, "mask_and_gather_ms": theirs * 1e3,
            "speedup": theirs / ours}


def _train_step(config: dict[str, Any], device: torch.device, compile: bool) -> TrainStep:
    model = build_model(config, CIFAR10_MEAN, CIFAR10_STD).to(device)
    if channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer("lars", model, scaled_lr(1.0, config["batch_size"]), 1e-4)
    schedule = WarmupCosineSchedule(optimizer, 10_000, 100)
    return TrainStep(model, SimCLRAugment().to(device), optimizer, schedule, 0.5, device, compile)


def _peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def bench_train_step(images: torch.Tensor, device: torch.device, batch_size: int, width: int, steps: int,
                     workers: int, compile: bool = False) -> dict[str, Any]:
    """Views/s of whole training steps (augmentation included) for ResNet-18 CIFAR at `width`: the fast path
    (uint8 data on the device, batched augmentation) and the per-image path (PIL in DataLoader workers)."""
    config = make_config("quick", width=width, batch_size=batch_size, train_subset=None)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(device)
    step = _train_step(config, device, compile)
    source = BatchSource(ImageData(images, torch.zeros(len(images), dtype=torch.long), ["x"]), "device",
                         batch_size, 0, device)
    generator = torch.Generator(device=device)
    warmup = 3 if compile else 2
    batches = source.epoch(0)
    for i in range(warmup):
        generator.manual_seed(step_seed(0, 0, i))
        step(next(batches), generator)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        generator.manual_seed(step_seed(0, 0, warmup + i))
        step(next(batches), generator)
    _sync(device)
    fast = 2 * batch_size * steps / (time.perf_counter() - t0)
    fast_peak = _peak_mb(device)
    del step, batches, source

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step = _train_step(config, device, compile=False)
    loader = DataLoader(PILTwoViews(images, pil_pipeline()), batch_size=batch_size, shuffle=True, drop_last=True,
                        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    # Enough untimed steps that the workers' prefetch queue has drained to its steady state.
    warmup = max(2, 2 * workers)
    batches = iter(loader)

    def classic_step() -> None:
        v1, v2 = next(batches)
        views = torch.cat([v1, v2]).to(device, non_blocking=True)
        if channels_last(device):
            views = views.contiguous(memory_format=torch.channels_last)
        step.on_views(views)

    for _ in range(warmup):
        classic_step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        classic_step()
    _sync(device)
    classic = 2 * batch_size * steps / (time.perf_counter() - t0)
    return {"batch_size": batch_size, "width": width, "steps": steps, "workers": workers, "compiled": compile,
            "fast_views_per_s": fast, "dataloader_views_per_s": classic, "speedup": fast / classic,
            "fast_peak_mb": fast_peak, "dataloader_peak_mb": _peak_mb(device)}


def bench_images(data_root: str | Path, need: int) -> tuple[torch.Tensor, str]:
    """CIFAR-10 train images if they are on disk, else seeded random ones (speed does not depend on content)."""
    try:
        splits = load_splits("cifar10", data_root, None, download=False)
        return splits.train.images, f"CIFAR-10 train ({len(splits.train)} images)"
    except UserError:
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (need, 3, 32, 32), dtype=torch.uint8, generator=generator)
        return images, f"random 32x32 images ({need}; no CIFAR-10 under {data_root})"


def run_bench(device: str = "auto", batch_sizes: Sequence[int] = (256, 512), width: int | None = None,
              steps: int | None = None, workers: int | None = None, compile: bool = False,
              data_root: str | Path = "data", out: str | Path | None = None,
              progress: Callable[[str], None] = print, augment_batch: int = 512,
              loss_n: int = 1024) -> dict[str, Any]:
    """All benchmarks on one device; writes the JSON to `out` when given and returns it."""
    dev = resolve_device(device)
    on_gpu = dev.type == "cuda"
    # Full width on a GPU; on a CPU the quick preset's width 8, where one full-width step takes half a minute.
    width = width if width is not None else (64 if on_gpu else 8)
    steps = steps if steps is not None else (30 if on_gpu else 4)
    workers = workers if workers is not None else min(os.cpu_count() or 1, 16)
    need = max(augment_batch, max(batch_sizes) * (steps + max(2, 2 * workers) + 4))
    images, data_note = bench_images(data_root, need)
    if len(images) < need:
        raise UserError(f"the benchmark needs {need} images but {data_note}: lower --steps or --batch-sizes")
    result: dict[str, Any] = {
        "device": device_description(dev), "torch": torch.__version__, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "data": data_note,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    progress(f"bench on {result['device']} with {data_note}")
    progress(f"augmentation ({augment_batch} images) ...")
    result["augmentation"] = bench_augmentation(images, dev, augment_batch, compile=compile)
    progress(f"loss (N={loss_n}, D=128) ...")
    result["loss"] = bench_loss(dev, loss_n)
    result["train_step"] = []
    for batch_size in batch_sizes:
        progress(f"training step, batch {batch_size}, ResNet-18 CIFAR width {width} ...")
        result["train_step"].append(bench_train_step(images, dev, batch_size, width, steps, workers, compile))
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_bench(result: dict[str, Any]) -> str:
    """The table `simclr bench` prints."""
    aug, loss = result["augmentation"], result["loss"]
    lines = [f"device: {result['device']}  |  torch {result['torch']}  |  data: {result['data']}", ""]
    rows = [("what", "ours", "per-image / popular", "speedup"),
            (f"augmentation, images/s (batch {aug['batch']})", f"{aug['batched_images_per_s']:,.0f}",
             f"{aug['pil_images_per_s']:,.0f} (PIL)", f"{aug['speedup_vs_pil']:.1f}x"),
            ("", "", f"{aug['reference_images_per_s']:,.0f} (torchvision tensors)",
             f"{aug['speedup_vs_reference']:.1f}x"),
            (f"loss fwd+bwd, ms (N={loss['n']}, D={loss['dim']})", f"{loss['ours_ms']:.2f}",
             f"{loss['mask_and_gather_ms']:.2f} (mask and gather)", f"{loss['speedup']:.1f}x")]
    for r in result["train_step"]:
        memory = ""
        if r["fast_peak_mb"] is not None:
            memory = f", peak {r['fast_peak_mb']:,.0f} / {r['dataloader_peak_mb']:,.0f} MiB"
        rows.append((f"train step, views/s (R18 w{r['width']}, batch {r['batch_size']}{memory})",
                     f"{r['fast_views_per_s']:,.0f}",
                     f"{r['dataloader_views_per_s']:,.0f} (PIL DataLoader, {r['workers']} workers)",
                     f"{r['speedup']:.1f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) if i in (0, 2) else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)
