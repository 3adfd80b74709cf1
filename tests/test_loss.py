"""NT-Xent against a naive loop over the paper's formula."""

import pytest
import torch

from simclr_lib.loss import contrastive_accuracy, nt_xent_loss, nt_xent_loss_naive


@pytest.mark.parametrize("n", [2, 3, 7, 16])
@pytest.mark.parametrize("temperature", [0.07, 0.5, 1.0])
def test_value_and_gradients_match_naive_loop(n, temperature):
    g = torch.Generator().manual_seed(n)
    z1 = torch.randn(n, 8, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(n, 8, generator=g, dtype=torch.float64, requires_grad=True)
    fast = nt_xent_loss(z1, z2, temperature)
    fast_grads = torch.autograd.grad(fast, (z1, z2))
    naive = nt_xent_loss_naive(z1, z2, temperature)
    naive_grads = torch.autograd.grad(naive, (z1, z2))
    # fast computes its logits in fp32, so compare at fp32 precision
    assert fast.item() == pytest.approx(naive.item(), rel=1e-5, abs=1e-6)
    for a, b in zip(fast_grads, naive_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


def test_symmetric_in_views_and_scale_invariant():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    assert nt_xent_loss(z1, z2).item() == pytest.approx(nt_xent_loss(z2, z1).item(), rel=1e-6)
    # inputs are normalised inside: scaling a projection does not change the loss
    assert nt_xent_loss(3 * z1, 0.1 * z2).item() == pytest.approx(nt_xent_loss(z1, z2).item(), rel=1e-5)


def test_no_dependence_on_a_configured_batch_size():
    # The same 5 pairs give the same loss whether they are a whole batch or a short last batch of a run with
    # batch size 8: the function has no batch size to misconfigure, and targets come from the tensors.
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    short = nt_xent_loss(z1[:5], z2[:5])
    assert short.item() == pytest.approx(nt_xent_loss_naive(z1[:5], z2[:5]).item(), rel=1e-5)
    assert short.item() != pytest.approx(nt_xent_loss(z1, z2).item(), rel=1e-3)


def test_perfect_alignment_gives_the_lower_bound():
    # Positives identical and negatives orthogonal: each anchor's softmax is exp(1/T) / (exp(1/T) + 2N - 2).
    n, t = 4, 0.5
    z = torch.eye(n, 8)
    expected = -torch.log(torch.exp(torch.tensor(1 / t)) / (torch.exp(torch.tensor(1 / t)) + 2 * n - 2))
    assert nt_xent_loss(z, z.clone(), t).item() == pytest.approx(expected.item(), rel=1e-6)


def test_logits_stay_fp32_under_low_precision():
    # With T = 0.05 a half-precision exp(s / T) overflows; the loss must still be finite and equal the fp32 one.
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(6, 32, generator=g), torch.randn(6, 32, generator=g)
    ref = nt_xent_loss(z1, z2, 0.05)
    low = nt_xent_loss(z1.bfloat16(), z2.bfloat16(), 0.05)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert low.item() == pytest.approx(ref.item(), rel=2e-2)


@pytest.mark.parametrize("bad", [dict(n=1), dict(temperature=0.0), dict(shape_mismatch=True)])
def test_rejects_invalid_input(bad):
    n = bad.get("n", 3)
    z1 = torch.randn(n, 4)
    z2 = torch.randn(n + 1 if bad.get("shape_mismatch") else n, 4)
    with pytest.raises(ValueError):
        nt_xent_loss(z1, z2, bad.get("temperature", 0.5))


@pytest.mark.parametrize("n", [2, 5, 16])
def test_contrastive_accuracy_matches_a_loop_over_anchors(n):
    g = torch.Generator().manual_seed(n)
    z1 = torch.randn(n, 4, generator=g)
    z2 = z1 + 0.8 * torch.randn(n, 4, generator=g)  # some positives win, some do not
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    hits = 0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        best = max((k for k in range(2 * n) if k != i), key=lambda k: float(z[i] @ z[k]))
        hits += best == positive
    assert contrastive_accuracy(z1, z2).item() == pytest.approx(hits / (2 * n))
    assert contrastive_accuracy(z1, z1.clone()).item() == 1.0  # identical views: every positive ranks first
