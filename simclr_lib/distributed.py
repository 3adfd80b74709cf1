"""Data-parallel training with `torchrun` + DistributedDataParallel, CPU (gloo) or GPU (nccl), that computes what
one process would on the whole global batch: `gather_with_grad` gives NT-Xent every rank's negatives (its backward
sums the gradient over ranks before keeping our slice; some public implementations skip the sum, a known bug),
`GlobalBatchNorm` is the paper's global BN (also on CPU with gloo, unlike SyncBatchNorm), and each rank applies its
slice of the global batch's augmentation drawn from the shared step seed (see `simclr_lib.train.TrainStep`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .errors import UserError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank among world_size processes, and its local rank on the node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:  # more than one process
        return self.world_size > 1

    @property
    def is_main(self) -> bool:  # rank 0 alone logs, evaluates and writes files
        return self.rank == 0


def _active() -> bool:  # more than one process: else every collective here is a no-op
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def current() -> DistInfo:
    """The process group this process belongs to (world size 1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def init_from_env(device: str) -> DistInfo:
    """Join torchrun's process group (nccl on CUDA, each process on the GPU of its LOCAL_RANK; gloo otherwise)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # not started by torchrun (or another launcher setting it)
        return DistInfo()
    if dist.is_initialized():
        return current()
    use_cuda = device != "cpu" and torch.cuda.is_available() and not device.startswith("mps")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s): lower "
                            "--nproc_per_node")
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return current()


def shutdown() -> None:
    """Leave the process group (a no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _summed(tensor: torch.Tensor) -> torch.Tensor:  # a contiguous copy (as the collectives need) summed over ranks
    out = tensor.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out)
    return out


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every rank's loss depends on our rows: sum their gradients, then keep our slice.
        return _summed(grad)[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` (n, ...) of every rank in rank order (world * n, ...); its gradient sums all ranks' losses'."""
    return _GatherWithGrad.apply(tensor) if _active() else tensor


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return _summed(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _summed(grad)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over ranks, differentiable (the gradient is summed over ranks too)."""
    return _AllReduceSum.apply(tensor) if _active() else tensor


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm1d/2d (same parameters and buffers) with training statistics over all ranks, in fp32 and through a
    differentiable all-reduce so the gradients are global too; with one process or in eval mode, exactly BatchNorm."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 3, 4):
            raise ValueError(f"expected 2-D, 3-D or 4-D input, got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and _active()):
            return super().forward(input)
        self._check_input_dim(input)
        x = input.float()
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.numel() // x.shape[1] * dist.get_world_size()  # every rank has the same batch shape
        mean = all_reduce_sum(x.sum(dim=dims)) / count
        centred = x - mean.view(shape)
        var = all_reduce_sum(centred.pow(2).sum(dim=dims)) / count
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * count / max(count - 1, 1), momentum)
        return out.to(input.dtype)


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer in `module` by a GlobalBatchNorm with the same parameters and buffers."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        device = next(iter(module.state_dict().values())).device
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, device=device)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_batchnorm(child))
    return module


def _all_reduce_scalar(value: float, device: torch.device, op: dist.ReduceOp, dtype: torch.dtype | None = None):
    tensor = torch.tensor(value, dtype=dtype, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.item()


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest of an integer over ranks (a collective), e.g. so every rank trains the same number of epochs."""
    return int(_all_reduce_scalar(value, device, dist.ReduceOp.MIN, torch.int64)) if _active() else value


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if `flag` is true on any rank (a collective: every rank must call it at the same point)."""
    return bool(_all_reduce_scalar(float(flag), device, dist.ReduceOp.MAX)) if _active() else flag


def barrier() -> None:
    """Wait for every rank (a no-op with one process)."""
    if _active():
        dist.barrier()


def broadcast_object(value: object) -> object:
    """Rank 0's `value` on every rank (e.g. the run folder's name)."""
    box = [value]
    if _active():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The average of a (detached) tensor over ranks; unchanged with one process."""
    return _summed(value) / dist.get_world_size() if _active() else value
