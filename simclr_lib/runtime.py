"""Where and how computations run: the device, mixed precision, memory layout, and replayable seeds."""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from .errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then the CPU; an explicit device that is not there is a UserError."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if (device.type == "cuda" and not torch.cuda.is_available()) or (device.type == "mps" and not mps):
        raise UserError(f"device {name!r} asked for but {device.type.upper()} is not available here: "
                        "use --device cpu or auto")
    return device


def device_description(device: torch.device) -> str:
    """A human-readable name of the hardware, for reports next to every number."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    return device.type


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto': bf16 on GPUs that have it, fp16 (with a gradient scaler) on older ones like Colab's T4, else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """Mixed-precision autocast for bf16 or fp16 (BatchNorm, the loss and reductions stay fp32); nothing for fp32."""
    precision = resolve_precision(precision, device)
    if precision == "fp32" or device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def channels_last(module: nn.Module, device: torch.device) -> bool:
    """Whether to run `module`'s convolutions in NHWC layout: on CUDA (tensor cores), and on the CPU (oneDNN, ~5x
    faster training here) only when every convolution has at least 8 output channels: narrower ones (width 2 and
    4) corrupted the heap at random in oneDNN's NHWC path (torch 2.14.1, AMD EPYC)."""
    widths = [m.out_channels for m in module.modules() if isinstance(m, nn.Conv2d)]
    return device.type == "cuda" or (device.type == "cpu" and bool(widths) and min(widths) >= 8)


def on_device(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` moved to `device`, in channels-last layout where that is faster and safe; cuDNN autotuning on CUDA."""
    module = module.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return module.to(memory_format=torch.channels_last) if channels_last(module, device) else module


def to_layout(images: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """A (B, C, H, W) batch in the memory layout of `model`'s first convolution (see `on_device`)."""
    weight = next((m.weight for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    nhwc = weight is not None and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)
    return images.contiguous(memory_format=torch.channels_last) if nhwc else images


def step_seed(seed: int, epoch: int, step: int) -> int:
    """A seed that depends only on (seed, epoch, step), so any step's randomness can be replayed on resume."""
    return (((seed * 1_000_003) + epoch) * 1_000_003 + step) % (2**63 - 1)
