"""Class-conditional toys: their denoisers against Tweedie's formula on the exact density, the CFG
identities, the exact classifier, and the students' construction."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import DEVICE
from kdistpp import conditional_toys as ct


def log_density(problem, x, sigma, label=None):
    """log p_sigma(x | c) = log sum_{k in c} w_k N(x; mu_k, (s_k^2 + sigma^2) I), written out."""
    m = problem.mixture
    var = m.stds**2 + sigma**2  # (K, dim)
    diff = x[:, None, :].double() - m.means[None]
    logn = -0.5 * (diff**2 / var + torch.log(2 * math.pi * var)).sum(-1) + m.weights.log()[None]
    if label is not None:
        logn = logn.masked_fill(problem.classes[None, :] != label[:, None], float("-inf"))
    return torch.logsumexp(logn, dim=1)


@pytest.mark.parametrize("dim", [2, 16])
@pytest.mark.parametrize("sigma", [0.3, 2.0, 9.0])
def test_denoisers_are_tweedie_on_the_exact_density(dim, sigma):
    problem = ct.class_rings(n_classes=3, modes_per_class=2, dim=dim, seed=dim)
    x = torch.randn(64, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * (2 + sigma)
    label = torch.arange(64) % 3
    for cond in (None, label):
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(log_density(problem, xg, sigma, cond).sum(), xg)
        expected = x + sigma**2 * grad
        s = torch.full((64,), sigma, dtype=torch.float64)
        got = problem.unconditional(x, s) if cond is None else problem.conditional(x, s, cond)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_cfg_identities_and_uncond_protocol():
    problem = ct.class_rings(dim=2)
    x = (torch.randn(32, 2) * 3).to(DEVICE)
    s, label = torch.full((32,), 1.5, device=DEVICE), (torch.arange(32) % 4).to(DEVICE)
    c, u = problem.conditional(x, s, label), problem.unconditional(x, s)
    torch.testing.assert_close(problem.cfg(1.0)(x, s, label=label), c)
    torch.testing.assert_close(problem.cfg(0.0)(x, s, label=label), u)
    teacher = problem.cfg(5.0)
    torch.testing.assert_close(teacher(x, s, label=label), u + 5.0 * (c - u))
    torch.testing.assert_close(teacher.last_uncond_denoised, u)


def test_exact_classifier_and_class_samples():
    problem = ct.class_rings(n_classes=4, modes_per_class=3, dim=2, std=0.3)
    labels = torch.arange(2000) % 4
    samples = problem.sample(labels, generator=torch.Generator().manual_seed(0))
    post = problem.class_posterior(samples)
    torch.testing.assert_close(post.sum(1), torch.ones(2000, dtype=post.dtype))
    adherence = post[torch.arange(2000), labels].mean()
    assert adherence > 0.9
    assert (post.argmax(1) == labels).double().mean() > 0.9


def test_within_class_reweighting_keeps_class_totals_and_drops_small_modes():
    problem = ct.class_rings(n_classes=2, modes_per_class=3, dim=2)
    sharper = problem.within_class(temperature=3.0, std_scale=0.5)
    for c in range(2):
        members = problem.classes == c
        assert float(sharper.mixture.weights[members].sum()) == pytest.approx(float(problem.mixture.weights[members].sum()))
        top = problem.mixture.weights[members].argmax()
        assert sharper.mixture.weights[members][top] > problem.mixture.weights[members][top]
    torch.testing.assert_close(sharper.mixture.stds, problem.mixture.stds * 0.5)


def test_students_differ_from_the_teacher_and_spread_is_per_class():
    problem = ct.class_rings(dim=2)
    x = (torch.randn(16, 2) * 4).to(DEVICE)
    s, label = torch.full((16,), 2.0, device=DEVICE), (torch.arange(16) % 4).to(DEVICE)
    teacher = problem.cfg(3.0)(x, s, label=label)
    for name, student in ct.students(problem, 3.0).items():
        out = student(x, s, label=label)
        assert out.shape == x.shape and (out - teacher).abs().max() > 1e-3, name
    spread = ct.within_class_spread(torch.tensor([[0.0, 0.0], [2.0, 0.0], [5.0, 5.0], [5.0, 5.0]]),
                                    torch.tensor([0, 0, 1, 1]), 2)
    torch.testing.assert_close(spread, torch.tensor([2.0, 0.0], dtype=torch.float64))


def test_bad_class_assignment_is_refused():
    mixture = ct.class_rings(n_classes=2, modes_per_class=2).mixture
    with pytest.raises(ValueError, match="one class index"):
        ct.ClassMixture(mixture, [0, 1, 0])
    with pytest.raises(ValueError, match="at least one component"):
        ct.ClassMixture(mixture, [0, 2, 0, 2])


def test_blurred_classes_mix_in_the_next_class():
    problem = ct.class_rings(dim=2)
    x, s = torch.randn(8, 2) * 3, torch.full((8,), 1.0)
    label = torch.arange(8) % 4
    u, c, n = problem.unconditional(x, s), problem.conditional(x, s, label), problem.conditional(x, s, (label + 1) % 4)
    torch.testing.assert_close(ct.BlurredClasses(problem, 2.0, leak=0.25)(x, s, label=label),
                               u + 2.0 * (0.75 * c + 0.25 * n - u))
