"""Evaluation of frozen representations: feature extraction, weighted kNN and the linear probe."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from .models import SimCLR


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (BatchNorm and reductions stay fp32 under autocast); nothing elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def channels_last(device: torch.device) -> bool:
    """Whether to run convolutions in NHWC layout: faster on CUDA (tensor cores) and on CPU (oneDNN), ~1.5x."""
    return device.type in ("cuda", "cpu")


@torch.no_grad()
def extract_features(model: SimCLR, images: torch.Tensor, batch_size: int = 512,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Representations h (N, feature_dim), float32 on `device`, of uint8 images, with the encoder in eval mode.

    Eval mode matters: in train mode BatchNorm would use (and update its running statistics with) the
    evaluation batches, which leaks test data into the network and changes the numbers.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        chunks = []
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size].to(device, non_blocking=True)
            if channels_last(device):
                batch = batch.contiguous(memory_format=torch.channels_last)
            with autocast(device):
                chunks.append(model.encode(batch).float())
        return torch.cat(chunks)
    finally:
        model.train(was_training)


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                k: int = 200, temperature: float = 0.1, chunk_size: int = 1024) -> torch.Tensor:
    """Weighted kNN (Wu et al. 2018): each of the k most cosine-similar bank items votes exp(sim / T) for its class."""
    bank = F.normalize(bank.float(), dim=1)
    bank_labels = bank_labels.to(bank.device)
    k = min(k, len(bank))
    predictions = []
    for start in range(0, len(queries), chunk_size):
        q = F.normalize(queries[start:start + chunk_size].to(bank.device).float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes, device=bank.device)
        votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                 num_classes: int, k: int = 200, temperature: float = 0.1) -> float:
    """Top-1 accuracy in percent of `knn_predict`."""
    pred = knn_predict(bank, bank_labels, queries, num_classes, k, temperature)
    return 100.0 * (pred.cpu() == query_labels.cpu()).float().mean().item()


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, epochs: int = 100, lr: float = 0.1,
                 batch_size: int = 512, weight_decay: float = 0.0, seed: int = 0,
                 progress: bool = False) -> dict[str, float]:
    """Train a linear classifier on frozen, precomputed features; report train and test top-1 in percent.

    The paper's protocol: SGD with Nesterov momentum 0.9, cosine decay stepped per iteration, no
    augmentation. Features are standardised with the training set's mean and std first (a fixed affine map,
    so the classifier stays linear in h) to make one learning rate work for every encoder. The reported
    accuracy is the last epoch's; nothing is chosen on the test set.
    """
    device = train_features.device
    mean, std = train_features.mean(0), train_features.std(0) + 1e-6
    x_train, x_test = (train_features - mean) / std, (test_features.to(device) - mean) / std
    y_train = train_labels.to(device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = torch.nn.Linear(x_train.shape[1], num_classes).to(device)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=0.9, nesterov=True,
                                weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    epochs_iter = range(epochs)
    if progress:
        from tqdm.auto import tqdm
        epochs_iter = tqdm(epochs_iter, desc="linear probe", leave=False)
    for _ in epochs_iter:
        order = torch.randperm(len(x_train), generator=generator).to(device)
        for start in range(0, len(x_train), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(classifier(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    with torch.no_grad():
        train_top1 = (classifier(x_train).argmax(1) == y_train).float().mean().item() * 100
        test_top1 = (classifier(x_test).argmax(1).cpu() == test_labels.cpu()).float().mean().item() * 100
    return {"top1": test_top1, "train_top1": train_top1}
