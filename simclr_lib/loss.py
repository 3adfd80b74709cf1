"""NT-Xent (normalised temperature-scaled cross-entropy), the SimCLR loss, also known as InfoNCE."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .distributed import gather_with_grad


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Mean NT-Xent loss over all 2N anchors of two views; z1[i] and z2[i] (raw projections, (N, D)) are a pair.

    Each anchor's candidates are the other 2N - 1 embeddings, L2-normalised: a (2N-1)-way cross-entropy. Logits
    are fp32 whatever the autocast dtype (exp(s / T) overflows fp16 for small T; cross_entropy uses log-sum-exp).
    Under torch.distributed (world size > 1) z1, z2 are this rank's rows and the negatives come from every rank."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be (N, D); got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _nt_xent_distributed(z1, z2, temperature)
    if n < 2:
        raise ValueError("NT-Xent needs at least 2 pairs: with N = 1 there is no negative")
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    # An anchor is not its own candidate: -inf on the diagonal drops it from the softmax.
    logits = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
    # Row i's positive sits N places away: i -> i + N for the first view, i + N -> i for the second.
    # Built from the actual N, never from a configured batch size, so a short last batch works.
    targets = torch.arange(2 * n, device=z.device).add_(n).remainder_(2 * n)
    return F.cross_entropy(logits, targets)


@torch.no_grad()
def contrastive_accuracy(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """The fraction (0-1) of the 2N anchors whose positive is the most similar of their 2N - 1 candidates: the
    accuracy of the classification NT-Xent trains, as a 0-d tensor on z's device (no host sync). Under torchrun,
    over this rank's own pairs."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    similarity = (z @ z.T).fill_diagonal_(float("-inf"))
    targets = torch.arange(2 * n, device=z.device).add_(n).remainder_(2 * n)
    return (similarity.argmax(dim=1) == targets).float().mean()


def _nt_xent_distributed(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent of this rank's 2n anchors against every rank's candidates, laid out as in one process on the global
    batch (all first views in rank order, then all second views): anchor (rank r, row i) is itself at column
    r n + i (or N + r n + i), its positive N columns away. Averaged over ranks (as DDP does), the global loss."""
    n, rank = z1.shape[0], dist.get_rank()
    a, b = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    candidates = torch.cat([gather_with_grad(a), gather_with_grad(b)])  # (2N, D)
    big_n = candidates.shape[0] // 2
    logits = torch.cat([a, b]) @ candidates.T / temperature  # (2n, 2N)
    rows = torch.arange(2 * n, device=logits.device)
    own = torch.arange(n, device=logits.device) + rank * n
    self_columns = torch.cat([own, own + big_n])
    logits = logits.index_put((rows, self_columns), torch.tensor(float("-inf"), device=logits.device))
    targets = torch.cat([own + big_n, own])
    return F.cross_entropy(logits, targets)


def nt_xent_loss_naive(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """The paper's formula written as a plain loop over anchors: slow, obviously correct, for tests and teaching.

    l(i, j) = -log( exp(sim(z_i, z_j) / T) / sum_{k != i} exp(sim(z_i, z_k) / T) ),
    L = 1 / 2N * sum_k [ l(2k-1, 2k) + l(2k, 2k-1) ]   (paper, Algorithm 1)"""
    z = torch.cat([z1, z2]).double()
    n2 = z.shape[0]

    def sim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ b) / (a.norm() * b.norm())

    total = z.new_zeros(())
    for i in range(n2):
        j = (i + n2 // 2) % n2  # the other view of the same image
        denominator = sum(torch.exp(sim(z[i], z[k]) / temperature) for k in range(n2) if k != i)
        total = total - torch.log(torch.exp(sim(z[i], z[j]) / temperature) / denominator)
    return total / n2
