"""Feature extraction in eval mode, weighted kNN against a naive loop, and the linear probe."""

import pytest
import torch

from simclr_lib.evaluate import extract_features, knn_accuracy, knn_predict, linear_probe
from simclr_lib.models import SimCLR


def naive_knn(bank, bank_labels, queries, num_classes, k, t):
    preds = []
    for q in queries:
        sims = [(torch.dot(q, b) / (q.norm() * b.norm())).item() for b in bank]
        top = sorted(range(len(bank)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in top:
            votes[bank_labels[i]] += torch.exp(torch.tensor(sims[i] / t)).item()
        preds.append(max(range(num_classes), key=lambda c: votes[c]))
    return torch.tensor(preds)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_matches_naive_loop(k):
    g = torch.Generator().manual_seed(k)
    bank, queries = torch.randn(60, 8, generator=g), torch.randn(25, 8, generator=g)
    labels = torch.randint(0, 4, (60,), generator=g)
    fast = knn_predict(bank, labels, queries, 4, k=k, temperature=0.1, chunk_size=7)
    assert torch.equal(fast, naive_knn(bank, labels, queries, 4, k, 0.1))


def test_knn_finds_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 5
    labels = torch.arange(3).repeat_interleave(40)
    feats = centres[labels] + torch.randn(120, 16, generator=g)
    assert knn_accuracy(feats[::2], labels[::2], feats[1::2], labels[1::2], 3, k=10) == 100.0


def test_extract_features_uses_eval_mode_and_leaves_the_model_unchanged():
    torch.manual_seed(0)
    model = SimCLR("resnet18", width=8).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    feats = extract_features(model, images, batch_size=4)
    assert feats.shape == (10, model.feature_dim) and not feats.requires_grad
    assert model.training  # mode restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm running stats untouched
    # eval mode: a batch's features do not depend on the other images in the batch
    torch.testing.assert_close(extract_features(model, images[:3], batch_size=3), feats[:3])


def test_linear_probe_separable_and_shuffled():
    g = torch.Generator().manual_seed(0)
    n, d, c = 2000, 10, 5
    w = torch.randn(d, c, generator=g)
    x = torch.randn(2 * n, d, generator=g)
    y = (x @ w).argmax(1)  # linearly separable by construction
    result = linear_probe(x[:n], y[:n], x[n:], y[n:], c, epochs=30, batch_size=64)
    assert result["train_top1"] > 98 and result["top1"] > 96
    shuffled = y[:n][torch.randperm(n, generator=g)]
    chance = linear_probe(x[:n], shuffled, x[n:], y[n:], c, epochs=30, batch_size=64)
    assert chance["top1"] < 100 / c + 8
