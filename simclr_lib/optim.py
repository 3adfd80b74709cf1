"""Optimisers (LARS, SGD, Adam), the BN/bias exclusions, and the per-step warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import LR_SCALINGS, OPTIMIZERS, Config
from .errors import UserError


def scaled_lr(base_lr: float, batch_size: int, rule: str = "linear") -> float:
    """The paper's learning-rate scaling: base * batch / 256 (linear), base * sqrt(batch) (sqrt), or base (none)."""
    if rule == "linear":
        return base_lr * batch_size / 256
    if rule == "sqrt":
        return base_lr * math.sqrt(batch_size)
    if rule == "none":
        return base_lr
    raise UserError(f"unknown lr_scaling {rule!r}: choose one of {', '.join(LR_SCALINGS)}")


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict]:
    """Two groups as in the paper: weights, and BatchNorm parameters + biases (no LARS, no decay unless `decay_all`)."""
    decay, exclude = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_norm = isinstance(module, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm)
            (exclude if is_norm or name == "bias" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
            {"params": exclude, "weight_decay": weight_decay if decay_all else 0.0, "lars_exclude": True}]


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as SimCLR uses it: momentum SGD with each weight tensor's update scaled by
    trust = eta * ||w|| / ||g + wd * w||; `clip` caps it at 1 / lr, so no layer steps faster than plain SGD at the
    global lr (LARC, as solo-learn). `lars_exclude=True` groups (BatchNorm, biases) get plain momentum SGD, with
    weight decay if their group has it."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001,
                 clip: bool = False):
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip=clip,
                                      lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        """One update with multi-tensor (foreach) kernels; trust ratios stay on the device (no host sync)."""
        with torch.enable_grad():
            loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            if not group["lars_exclude"]:
                w_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(grads))
                # A zero norm (fresh zero weights, or no gradient) means "no adaptation", trust 1.
                trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm,
                                    torch.ones_like(w_norm))
                if group["clip"]:  # the group's lr is a float: no host sync
                    trust = torch.clamp(trust / max(group["lr"], 1e-12), max=1.0)
                grads = torch._foreach_mul(grads, list(trust.unbind()))
            for p in params:
                if "momentum_buffer" not in self.state[p]:  # from zero: the first step's buffer is the update itself
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            buffers = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, grads)
            torch._foreach_add_(params, buffers, alpha=-group["lr"])
        return loss


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float, momentum: float = 0.9,
                    decay_all: bool = False, lars_eta: float = 1e-3, lars_clip: bool = False):
    """LARS, SGD (momentum) or Adam over `param_groups(model)`; `lr` is the already scaled learning rate."""
    groups = param_groups(model, weight_decay, decay_all)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, eta=lars_eta, clip=lars_clip)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    raise UserError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")


def optimizer_for(config: Config, model: nn.Module) -> torch.optim.Optimizer:
    """The optimiser a config asks for over `model`, its learning rate scaled to the batch size."""
    return build_optimizer(config.optimizer, model, scaled_lr(config.lr, config.batch_size, config.lr_scaling),
                           config.weight_decay, config.momentum, config.weight_decay_all, config.lars_eta,
                           config.lars_clip)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, final_fraction: float = 0.0) -> float:
    """The lr multiplier at `step`: linear warmup to 1 (step 0 gets 1/warmup, never 0), then cosine decay to
    exactly `final_fraction` at the last step (total_steps - 1)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps))
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


class WarmupCosineSchedule:
    """Per-iteration schedule: `step()` after every optimiser step sets each group's lr for the next one (unlike
    the common bug of a CosineAnnealingLR with T_max = steps per epoch stepped once per epoch, which never decays)."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                 final_fraction: float = 0.0) -> None:
        self.optimizer, self.total_steps, self.warmup_steps = optimizer, total_steps, warmup_steps
        self.final_fraction, self.last_step = final_fraction, 0
        self.base_lrs = [g.setdefault("initial_lr", g["lr"]) for g in optimizer.param_groups]
        self._apply()

    def _apply(self) -> None:
        factor = warmup_cosine(self.last_step, self.total_steps, self.warmup_steps, self.final_fraction)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def step(self) -> None:
        """Advance one iteration."""
        self.last_step += 1
        self._apply()

    def state_dict(self) -> dict:
        """Everything needed to resume."""
        return {k: getattr(self, k) for k in ("total_steps", "warmup_steps", "final_fraction", "base_lrs", "last_step")}

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()`."""
        self.__dict__.update(state)
        self._apply()
