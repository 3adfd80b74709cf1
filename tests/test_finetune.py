"""The semi-supervised protocol: label fractions, per-class metrics, fine-tuning and the supervised baseline."""

import math

import pytest
import torch

import simclr_lib.evaluate as evaluate
from simclr_lib.data import ImageData
from simclr_lib.errors import UserError
from simclr_lib.evaluate import (
    confusion_matrix,
    finetune,
    label_fraction_indices,
    linear_probe,
    per_class_accuracy,
    supervised_baseline,
    train_classifier,
)
from simclr_lib.models import SimCLR

COLOURS = torch.tensor([[220, 30, 30], [30, 200, 40], [40, 50, 210], [230, 220, 40]])
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
RESULT_KEYS = {"top1", "train_top1", "per_class", "confusion", "epochs", "steps", "labelled_images"}


def solid_colours(per_class: int, seed: int) -> ImageData:
    """An easy task: 16x16 images of one of 4 solid colours plus pixel noise; the label is the colour."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(COLOURS)).repeat(per_class)
    noise = torch.randint(-40, 41, (len(labels), 3, 16, 16), generator=g)
    images = (COLOURS[labels].view(-1, 3, 1, 1) + noise).clamp(0, 255).to(torch.uint8)
    return ImageData(images, labels, ["red", "green", "blue", "yellow"])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These networks are tiny: one thread is as fast, and it leaves the other core to whatever shares the machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task():
    return solid_colours(8, seed=0), solid_colours(16, seed=1)


def tiny_model(seed: int) -> SimCLR:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SimCLR("resnet18", width=4, mean=MEAN, std=STD)


def state_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------------------------------
# label_fraction_indices
# --------------------------------------------------------------------------------------------------


def test_label_fraction_is_balanced_exact_and_sorted():
    labels = torch.arange(10).repeat_interleave(100)[torch.randperm(1000, generator=torch.Generator().manual_seed(0))]
    for percent, size in [(10, 100), (1, 10), (2.5, 25), (50, 500), (100, 1000)]:
        idx = label_fraction_indices(labels, percent, seed=0)
        assert len(idx) == size == round(1000 * percent / 100)
        assert torch.equal(idx, idx.sort().values) and len(idx.unique()) == len(idx)
        counts = torch.bincount(labels[idx], minlength=10)
        # as even as possible; the remainder goes to the lowest labels
        base, extra = divmod(size, 10)
        assert counts.tolist() == [base + 1] * extra + [base] * (10 - extra)


def test_label_fraction_is_seeded():
    labels = torch.arange(5).repeat(200)
    a, b = label_fraction_indices(labels, 10, seed=3), label_fraction_indices(labels, 10, seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, label_fraction_indices(labels, 10, seed=4))


def test_label_fraction_keeps_one_image_per_class_for_tiny_fractions():
    labels = torch.arange(10).repeat(30)  # 300 images: 1 % would be 3 images, fewer than the 10 classes
    for percent in (0.01, 1, 3):
        idx = label_fraction_indices(labels, percent)
        assert len(idx) == 10 and torch.equal(labels[idx].sort().values, torch.arange(10))


@pytest.mark.parametrize("percent", [0, -1, 101])
def test_label_fraction_rejects_bad_percent(percent):
    with pytest.raises(UserError):
        label_fraction_indices(torch.arange(4).repeat(5), percent)


# --------------------------------------------------------------------------------------------------
# Per-class metrics against a naive loop
# --------------------------------------------------------------------------------------------------


def test_confusion_and_per_class_match_naive_loop():
    g = torch.Generator().manual_seed(0)
    c = 5
    labels = torch.randint(0, c - 1, (200,), generator=g)  # class 4 never occurs as a true label
    predictions = torch.where(torch.rand(200, generator=g) < 0.6, labels, torch.randint(0, c, (200,), generator=g))
    naive = [[0] * c for _ in range(c)]
    for t, p in zip(labels.tolist(), predictions.tolist()):
        naive[t][p] += 1
    confusion = confusion_matrix(predictions, labels, c)
    assert confusion.dtype == torch.int64 and confusion.shape == (c, c)
    assert confusion.tolist() == naive

    accuracy = per_class_accuracy(predictions, labels, c)
    for cls in range(c - 1):
        members = [i for i in range(200) if labels[i] == cls]
        expected = 100.0 * sum(int(predictions[i] == cls) for i in members) / len(members)
        assert accuracy[cls] == pytest.approx(expected)
    assert math.isnan(accuracy[c - 1])  # no examples of that class: no accuracy, not 0 %


# --------------------------------------------------------------------------------------------------
# train_classifier / finetune / supervised_baseline
# --------------------------------------------------------------------------------------------------


def test_train_classifier_leaves_the_encoder_alone_and_reports_everything(task):
    train, test = task
    model = tiny_model(0).train()
    before = state_copy(model)
    result = train_classifier(model.encoder, model.feature_dim, train, test, 4, MEAN, STD, epochs=2,
                              batch_size=12)
    assert_same_state(before, state_copy(model))  # weights and BatchNorm running statistics
    assert model.training and all(p.grad is None for p in model.parameters())

    assert RESULT_KEYS <= result.keys()
    assert 0 <= result["top1"] <= 100 and 0 <= result["train_top1"] <= 100
    # 32 images at batch 12: two full batches and a kept last batch of 8, per epoch
    assert result["epochs"] == 2 and result["steps"] == 6 and result["labelled_images"] == 32
    confusion = torch.tensor(result["confusion"])
    assert confusion.shape == (4, 4) and confusion.sum(1).tolist() == [16] * 4
    assert confusion.trace().item() / len(test) * 100 == pytest.approx(result["top1"])
    assert len(result["per_class"]) == 4 and all(0 <= a <= 100 for a in result["per_class"])


def test_a_last_batch_of_one_image_is_dropped(task):
    train, test = task
    model = tiny_model(0)
    result = train_classifier(model.encoder, model.feature_dim, train.subset(torch.arange(9)), test, 4, MEAN, STD,
                              epochs=1, batch_size=4)
    assert result["steps"] == 2  # 4 + 4, the ninth image alone would break BatchNorm


def test_a_tiny_label_fraction_gets_at_least_min_steps(task):
    train, test = task  # 32 images at batch 16: 2 steps per epoch
    model = tiny_model(0)
    result = train_classifier(model.encoder, model.feature_dim, train, test, 4, MEAN, STD, epochs=1, batch_size=16,
                              min_steps=7)
    assert result["epochs"] == 4 and result["steps"] == 8  # whole epochs, at least 7 steps


def test_finetuning_learns_an_easy_task(task):
    # 40 steps at batch 16: fewer steps or smaller batches leave BatchNorm's running statistics (used in eval
    # mode) too far from the batch statistics the network was trained with, and whole classes get mixed up.
    train, test = solid_colours(16, seed=0), task[1]
    result = finetune(tiny_model(0), train, test, 4, epochs=10, batch_size=16, lr=0.05)
    assert result["steps"] == 40
    assert result["top1"] >= 90 and result["train_top1"] >= 90, result


def test_supervised_baseline_starts_from_a_fresh_network_with_the_same_budget(task, monkeypatch):
    train, test = task
    model = tiny_model(123)  # stands in for a pretrained model: weights that no seed-0 init gives
    seen = []

    def spy(encoder, *args, **kwargs):
        seen.append(state_copy(encoder))
        return train_classifier(encoder, *args, **kwargs)

    monkeypatch.setattr(evaluate, "train_classifier", spy)
    kwargs = dict(epochs=1, batch_size=12, seed=0)
    tuned = evaluate.finetune(model, train, test, 4, **kwargs)
    scratch = evaluate.supervised_baseline(model, train, test, 4, **kwargs)

    pretrained, fresh = seen
    assert_same_state(pretrained, state_copy(model.encoder))
    assert any(not torch.equal(fresh[k], pretrained[k]) for k in fresh if k.endswith("weight"))
    assert_same_state(fresh, state_copy(tiny_model(0).encoder))  # the architecture re-initialised with `seed`
    assert scratch["steps"] == tuned["steps"] and scratch["labelled_images"] == tuned["labelled_images"]
    assert scratch != tuned


def test_same_seed_same_result(task):
    train, test = task
    model = tiny_model(0)
    rng = torch.get_rng_state()
    kwargs = dict(epochs=1, batch_size=12)
    first = supervised_baseline(model, train, test, 4, seed=5, **kwargs)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's global RNG is not consumed
    assert supervised_baseline(model, train, test, 4, seed=5, **kwargs) == first
    assert finetune(model, train, test, 4, seed=5, **kwargs) == finetune(model, train, test, 4, seed=5, **kwargs)
    assert finetune(model, train, test, 4, seed=6, **kwargs) != finetune(model, train, test, 4, seed=5, **kwargs)


# --------------------------------------------------------------------------------------------------
# linear_probe's new per-class outputs
# --------------------------------------------------------------------------------------------------


def test_linear_probe_reports_a_consistent_confusion_matrix():
    g = torch.Generator().manual_seed(0)
    n, d, c = 400, 6, 4
    x = torch.randn(2 * n, d, generator=g)
    y = (x @ torch.randn(d, c, generator=g)).argmax(1)
    result = linear_probe(x[:n], y[:n], x[n:], y[n:], c, epochs=5, batch_size=64)
    confusion = torch.tensor(result["confusion"])
    assert confusion.shape == (c, c)
    assert torch.equal(confusion.sum(1), torch.bincount(y[n:], minlength=c))
    assert confusion.trace().item() / n == pytest.approx(result["top1"] / 100)
    expected = (100.0 * confusion.diagonal() / confusion.sum(1)).tolist()
    assert result["per_class"] == pytest.approx(expected)
