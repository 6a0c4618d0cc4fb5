"""Toy models are exact where they claim to be; metrics behave as distances."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kdistpp import metrics, toys
from conftest import DEVICE


@given(k=st.integers(1, 4), dim=st.integers(1, 6), sigma=st.floats(0.05, 20.0), seed=st.integers(0, 999))
def test_mixture_denoiser_is_tweedie(k, dim, sigma, seed):
    """D(x, sigma) = x + sigma^2 grad log p_sigma(x) (Tweedie), checked through autograd."""
    g = torch.Generator().manual_seed(seed)
    mix = toys.GaussianMixture(torch.randn(k, dim, generator=g) * 3, torch.rand(k, dim, generator=g) + 0.2,
                               torch.rand(k, generator=g) + 0.1)
    x = (torch.randn(5, dim, generator=g, dtype=torch.float64) * (sigma + 1)).requires_grad_()
    s = torch.full((5,), sigma, dtype=torch.float64)
    r, var0, var, diff = mix.responsibilities(x, s)
    logp = torch.logsumexp(-0.5 * ((diff**2 / var) + var.log()).sum(-1) + mix.weights.log(), dim=-1)
    (grad,) = torch.autograd.grad(logp.sum(), x)
    torch.testing.assert_close(mix(x.detach(), s), x.detach() + sigma**2 * grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_toys_run_on_any_device_and_dtype(dtype):
    mix = toys.ring_mixture(8, 4.0, 0.35, dim=16)
    sig = torch.tensor([20.0, 4.0, 0.5, 0.0])
    x = torch.randn(4, 16, device=DEVICE).to(dtype)
    s = torch.full((4,), 4.0, device=DEVICE)
    for model in (mix, toys.ProgressiveStudent(mix, sig), toys.ConsistencyStudent(mix), toys.mode_biased_student(mix)):
        out = model(x, s)
        assert out.dtype == dtype and out.device == x.device and torch.isfinite(out).all()


def test_progressive_student_is_the_teacher_flow_to_its_next_sigma():
    mix = toys.ring_mixture(4, 3.0, 0.5, dim=2)
    sig = torch.tensor([10.0, 2.0, 0.0])
    x = torch.randn(64, 2, dtype=torch.float64) * 10
    s = torch.full((64,), 10.0, dtype=torch.float64)
    one = toys.ProgressiveStudent(mix, sig, substeps=1)(x, s)  # one Euler sub-step: the teacher itself
    torch.testing.assert_close(one, mix(x, s))
    many = toys.ProgressiveStudent(mix, sig, substeps=400)(x, s)
    x_next = x + (x - many) / 10.0 * (2.0 - 10.0)  # an Euler step with the student lands on the flow
    fine = toys.ProgressiveStudent(mix, sig, substeps=800)(x, s)
    torch.testing.assert_close(x_next, x + (x - fine) / 10.0 * (2.0 - 10.0), atol=2e-2, rtol=0)


def test_mixture_sampling_and_mode_weights():
    mix = toys.ring_mixture(6, 5.0, 0.3, dim=3)
    samples = mix.sample(20000, torch.Generator().manual_seed(0))
    assert metrics.mode_weight_error(samples, mix) < 0.02
    biased = mix.biased(3.0, 0.5).sample(20000, torch.Generator().manual_seed(0))
    assert metrics.mode_weight_error(biased, mix) > 0.1


def test_metrics_are_zero_on_identical_sets_and_grow_with_a_shift():
    a = torch.randn(1500, 4, generator=torch.Generator().manual_seed(0))
    for fn in (metrics.sliced_wasserstein, metrics.energy_distance, metrics.frechet_distance):
        assert fn(a, a) == pytest.approx(0.0, abs=1e-6)
        near, far = fn(a, a + 0.3), fn(a, a + 1.0)
        assert 0 < near < far


def test_frechet_distance_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200000, 2, generator=g, dtype=torch.float64)
    b = torch.randn(200000, 2, generator=g, dtype=torch.float64) * 2 + torch.tensor([1.0, 0.0], dtype=torch.float64)
    # N(0, I) vs N((1, 0), 4I): |mu|^2 + tr(I + 4I - 2 * 2I) = 1 + 2
    assert metrics.frechet_distance(a, b) == pytest.approx(3.0, rel=0.02)


def test_sliced_wasserstein_of_a_shift_is_the_projected_shift():
    a = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))
    shift = torch.tensor([3.0, 0.0])
    # W2 of a translation by v along unit u is |u . v|; averaged over directions: |v| sqrt(E cos^2) = |v| / sqrt(2)
    assert metrics.sliced_wasserstein(a, a + shift, n_projections=2000) == pytest.approx(3.0 / 2**0.5, rel=0.03)
