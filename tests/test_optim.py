"""LARS, its exclusions, learning-rate scaling and the per-step warmup + cosine schedule."""

import math

import pytest
import torch
import torch.nn as nn

from simclr_lib.optim import LARS, WarmupCosineSchedule, build_optimizer, param_groups, scaled_lr, warmup_cosine


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))


def test_param_groups_exclude_batchnorm_and_biases():
    net = small_net()
    decay, exclude = param_groups(net, weight_decay=1e-4)
    decay_ids = {id(p) for p in decay["params"]}
    exclude_ids = {id(p) for p in exclude["params"]}
    assert decay_ids == {id(net[0].weight), id(net[3].weight)}
    assert exclude_ids == {id(net[0].bias), id(net[1].weight), id(net[1].bias), id(net[3].bias)}
    assert decay["weight_decay"] == 1e-4 and exclude["weight_decay"] == 0.0
    assert exclude["lars_exclude"] and not decay["lars_exclude"]


@pytest.mark.parametrize("eta, clip, decay_all, lr", [(0.001, False, False, 0.5), (0.02, True, True, 0.5),
                                                   (0.02, True, False, 0.001), (0.5, False, True, 0.1)])
def test_lars_matches_the_formula_and_skips_excluded_parameters(eta, clip, decay_all, lr):
    net = small_net()
    x = torch.randn(2, 3, 4, 4)
    wd, momentum = 1e-3, 0.9
    opt = LARS(param_groups(net, wd, decay_all), lr=lr, momentum=momentum, eta=eta, clip=clip)
    expected = {}
    buffers = {}
    for step in range(2):
        net(x).square().mean().backward()
        for group_excluded, group in zip((False, True), opt.param_groups):
            for p in group["params"]:
                g = p.grad.clone()
                if not group_excluded or decay_all:
                    g = g + wd * p.detach()
                if not group_excluded:  # the paper's LARS: decay, then trust ratio, then momentum
                    trust = eta * p.detach().norm() / g.norm()
                    g = g * (min(trust.item() / lr, 1.0) if clip else trust)  # LARC: never above plain SGD
                buffers[id(p)] = g if step == 0 else momentum * buffers[id(p)] + g
                expected[id(p)] = p.detach() - lr * buffers[id(p)]
        opt.step()
        opt.zero_grad()
        for p in net.parameters():
            torch.testing.assert_close(p.detach(), expected[id(p)], rtol=1e-5, atol=1e-7)


def test_weight_decay_all_decays_batchnorm_and_biases_too():
    decay, exclude = param_groups(small_net(), weight_decay=5e-4, decay_all=True)
    assert decay["weight_decay"] == exclude["weight_decay"] == 5e-4 and exclude["lars_exclude"]
    sgd = build_optimizer("sgd", small_net(), lr=0.1, weight_decay=5e-4, decay_all=True)
    assert [g["weight_decay"] for g in sgd.param_groups] == [5e-4, 5e-4]


def test_lars_trust_is_one_for_zero_weights():
    w = nn.Parameter(torch.zeros(3))
    opt = LARS([{"params": [w], "weight_decay": 0.0, "lars_exclude": False}], lr=0.1)
    w.grad = torch.ones(3)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((3,), -0.1))


@pytest.mark.parametrize("name, kind", [("lars", LARS), ("sgd", torch.optim.SGD), ("adam", torch.optim.Adam)])
def test_build_optimizer(name, kind):
    opt = build_optimizer(name, small_net(), lr=0.1, weight_decay=1e-6)
    assert isinstance(opt, kind) and len(opt.param_groups) == 2


def test_scaled_lr():
    assert scaled_lr(0.3, 1024, "linear") == pytest.approx(1.2)
    assert scaled_lr(0.075, 1024, "sqrt") == pytest.approx(2.4)
    assert scaled_lr(3e-4, 512, "none") == 3e-4


def test_schedule_values_at_warmup_end_and_last_step():
    total, warmup = 100, 10
    assert warmup_cosine(0, total, warmup) == pytest.approx(0.1)
    assert warmup_cosine(warmup - 1, total, warmup) == pytest.approx(1.0)  # warmup ends at the peak
    assert warmup_cosine(warmup, total, warmup) == pytest.approx(1.0)      # cosine starts at the peak
    mid = warmup + (total - 1 - warmup) / 2
    assert warmup_cosine(int(mid), total, warmup) == pytest.approx(0.5 * (1 + math.cos(math.pi * int(mid - warmup)
                                                                                      / (total - 1 - warmup))))
    assert warmup_cosine(total - 1, total, warmup) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(total - 1, total, warmup, final_fraction=0.1) == pytest.approx(0.1)
    values = [warmup_cosine(s, total, warmup) for s in range(total)]
    assert all(a <= b for a, b in zip(values[:warmup], values[1:warmup]))
    assert all(a >= b for a, b in zip(values[warmup:], values[warmup + 1:]))


def test_schedule_steps_per_iteration_and_resumes():
    net = small_net()
    opt = build_optimizer("sgd", net, lr=2.0, weight_decay=0)
    sched = WarmupCosineSchedule(opt, total_steps=50, warmup_steps=5)
    seen = []
    for _ in range(50):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[4] == pytest.approx(2.0) and seen[-1] == pytest.approx(0.0, abs=1e-12)
    assert seen[25] < seen[10]  # it really decays within the run
    # a schedule restored from state_dict gives the same next learning rate
    opt2 = build_optimizer("sgd", small_net(), lr=2.0, weight_decay=0)
    sched2 = WarmupCosineSchedule(opt2, total_steps=50, warmup_steps=5)
    partial = WarmupCosineSchedule(build_optimizer("sgd", small_net(), lr=2.0, weight_decay=0), 50, 5)
    for _ in range(20):
        partial.step()
    sched2.load_state_dict(partial.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(seen[20])
