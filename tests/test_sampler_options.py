"""Sampler options the paper's runs and the hosts use: churn, s_tmin/s_tmax, the noise-sampler
protocol, teacher_guided's arguments and dtypes, the CFG denoiser, and the one sampler registry."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from k_diffusion import sampling as K

import kdistpp
from conftest import DEVICE, ElementwiseDenoiser
from kdistpp.integrations import comfyui, webui

SIGMAS = kdistpp.get_sigmas_karras(4, 0.05, 14.6)
SIG = [float(s) for s in SIGMAS]
ROOT = Path(__file__).resolve().parents[1]


def latent(seed=0, shape=(2, 3, 4)):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * SIG[0]).to(DEVICE)


def own_noise(seed, shape=(2, 3, 4)):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(shape, generator=g, device=DEVICE)


def test_churned_guided_euler_step_written_out():
    """Churn raises sigma to sigma_hat with noise, then the guided step runs from (x_hat, sigma_hat)."""
    x, student, teacher, w, churn = latent(1), ElementwiseDenoiser(), ElementwiseDenoiser(bias=1.0), 0.2, 2.0
    sig = SIGMAS[:2]
    torch.manual_seed(5)
    got = kdistpp.sample_euler_distpp(student, x, sig, s_churn=churn, teacher=teacher, w=w,
                                      renoise_sampler=own_noise(2), disable=True)
    torch.manual_seed(5)
    gamma = min(churn / 1, 2**0.5 - 1)
    sigma_hat = SIG[0] * (gamma + 1)
    x_hat = x + torch.randn_like(x) * (sigma_hat**2 - SIG[0] ** 2) ** 0.5
    x0s = student(x_hat, torch.full((2,), sigma_hat, device=DEVICE))
    x0t = teacher(x0s + SIG[1] * own_noise(2)(None, None), torch.full((2,), SIG[1], device=DEVICE))
    expected = x0s + w * (x0t - x0s) + SIG[1] * (x_hat - x0s) / sigma_hat
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("s_tmin,s_tmax", [(0.0, 1.0), (1.0, 20.0), (5.0, 6.0)])
def test_churn_window_equals_k_diffusion(s_tmin, s_tmax):
    x, student = latent(2), ElementwiseDenoiser()
    kw = dict(s_churn=3.0, s_tmin=s_tmin, s_tmax=s_tmax)
    torch.manual_seed(0)
    theirs = K.sample_euler(student, x, SIGMAS.to(DEVICE), disable=True, **kw)
    torch.manual_seed(0)
    ours = kdistpp.sample_euler_distpp(student, x, SIGMAS, teacher=student, w=0.0, disable=True, **kw)
    # k-diffusion 0.1.1 draws churn noise every step, kdistpp only where it churns: equal when the
    # churned steps come first (the window tops the schedule), else compare the unchurned prefix.
    churned = [s_tmin <= s <= s_tmax for s in SIG[:-1]]
    if churned == sorted(churned, reverse=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    else:
        plain = kdistpp.sample_euler_distpp(student, x, SIGMAS, teacher=student, w=0.0, disable=True)
        assert (ours - plain).abs().max() > 1e-4  # the window churned something


def test_churn_only_inside_the_window():
    x, student = latent(3), ElementwiseDenoiser()
    seen = []
    kdistpp.sample_euler_distpp(student, x, SIGMAS, s_churn=4.0, s_tmin=SIG[2] * 0.99, s_tmax=SIG[1] * 1.01, teacher=student,
                                w=0.0, disable=True, callback=seen.append)
    hat = [float(d["sigma_hat"]) / float(d["sigma"]) for d in seen]
    assert hat[0] == 1.0 and hat[1] > 1.0 and hat[2] > 1.0 and hat[3] == 1.0


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2s_ancestral", "consistency"])
def test_noise_sampler_gets_the_callers_sigma_pair_each_step(name):
    calls = []

    def sampler(sigma, sigma_next):
        calls.append((sigma, sigma_next))
        return torch.zeros(2, 3, 4, device=DEVICE)

    kdistpp.SAMPLERS[name](ElementwiseDenoiser(), latent(4), SIGMAS, noise_sampler=sampler, teacher=ElementwiseDenoiser(),
                           w=0.0, disable=True)
    assert [(float(a), float(b)) for a, b in calls] == [(SIG[i], SIG[i + 1]) for i in range(len(SIG) - 2)]
    assert all(isinstance(a, torch.Tensor) for a, _ in calls)  # the caller's sigmas elements, as k-diffusion


def test_renoise_sampler_gets_the_step_sigma_pair():
    calls = []

    def sampler(sigma, sigma_next):
        calls.append((float(sigma), float(sigma_next)))
        return torch.zeros(2, 3, 4, device=DEVICE)

    kdistpp.sample_euler_distpp(ElementwiseDenoiser(), latent(4), SIGMAS, teacher=ElementwiseDenoiser(), w=0.1,
                                guidance_steps=[1, 2], renoise_sampler=sampler, disable=True)
    assert calls == [(SIG[1], SIG[2]), (SIG[2], SIG[3])]


def test_teacher_guided_passes_each_calls_extra_args_and_keeps_dtype():
    student, teacher = ElementwiseDenoiser(), ElementwiseDenoiser(bias=1.0)
    wrapped = kdistpp.teacher_guided(student, teacher, SIGMAS, w=0.3)
    x = latent(5).half()
    out = wrapped(x, SIGMAS[:1].to(DEVICE).expand(2), cond="c", scale=2)
    assert out.dtype == torch.float16
    assert teacher.inputs[0][2] == {"cond": "c", "scale": 2} and teacher.inputs[0][0].dtype == torch.float16
    fixed = kdistpp.teacher_guided(student, teacher, SIGMAS, w=0.3, teacher_extra_args={"cond": "t"})
    fixed(x, SIGMAS[:1].to(DEVICE).expand(2), cond="c")
    assert teacher.inputs[1][2] == {"cond": "t"}
    # unguided sigma: passes through, student output unchanged (and, as sigma_1 was skipped, a warning)
    with pytest.warns(kdistpp.GuidanceWarning, match="sigma_1"):
        passed = wrapped(x, SIGMAS[2:3].to(DEVICE).expand(2))
    torch.testing.assert_close(passed, student(x, SIGMAS[2:3].to(DEVICE).expand(2)))


def test_zero_dim_tensor_w_equals_float_w():
    x, student, teacher = latent(6), ElementwiseDenoiser(), ElementwiseDenoiser(bias=1.0)
    a = kdistpp.sample_euler_distpp(student, x, SIGMAS, teacher=teacher, w=torch.tensor(0.3), renoise_sampler=own_noise(1),
                                    disable=True)
    b = kdistpp.sample_euler_distpp(student, x, SIGMAS, teacher=teacher, w=0.3, renoise_sampler=own_noise(1), disable=True)
    c = kdistpp.sample_euler_distpp(student, x, SIGMAS, teacher=teacher, w=0.0, disable=True)
    assert torch.equal(a, b) and not torch.equal(a, c)


class Conditional:
    """A denoiser whose estimate depends on its condition: D = shrink(x - cond) + cond."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, cond):
        self.calls.append((x.shape[0], cond))
        c = cond["vec"] if isinstance(cond, dict) else cond
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return c[..., None] + (x - c[..., None]) / (1 + s**2)


def test_cfg_denoiser_is_uncond_plus_scale_times_difference_in_one_call():
    inner = Conditional()
    cond, uncond = torch.randn(2, 3, device=DEVICE), torch.randn(2, 3, device=DEVICE)
    x, sigma = latent(7), torch.full((2,), 3.0, device=DEVICE)
    model = kdistpp.CFGDenoiser(inner, cond=cond, uncond=uncond, cond_scale=4.5)
    out = model(x, sigma)
    c, u = Conditional()(x, sigma, cond), Conditional()(x, sigma, uncond)
    torch.testing.assert_close(out, u + 4.5 * (c - u))
    torch.testing.assert_close(model.last_uncond_denoised, u)
    assert [n for n, _ in inner.calls] == [4]  # one call on the doubled batch
    # per-call overrides, as k-diffusion's extra_args pass them
    torch.testing.assert_close(model(x, sigma, cond=uncond, uncond=cond, cond_scale=2.0), c + 2.0 * (u - c))
    # dict conditions (SDXL's added conds) are batched key by key
    dmodel = kdistpp.CFGDenoiser(inner, cond={"vec": cond}, uncond={"vec": uncond}, cond_scale=1.5)
    torch.testing.assert_close(dmodel(x, sigma), u + 1.5 * (c - u))
    # no uncond: one call, and that estimate is the unconditional one too
    single = kdistpp.CFGDenoiser(inner, cond=cond)
    torch.testing.assert_close(single(x, sigma), c)
    torch.testing.assert_close(single.last_uncond_denoised, c)
    with pytest.raises(TypeError, match="tensors"):
        kdistpp.CFGDenoiser(inner, cond=[1], uncond=[2])(x, sigma)


def test_registry_is_the_one_list():
    exported = {n for n in kdistpp.__all__ if n.startswith("sample_") and n.endswith("_distpp")}
    assert {e.fn.__name__ for e in kdistpp.REGISTRY} == exported
    assert kdistpp.SAMPLERS == {e.name: e.fn for e in kdistpp.REGISTRY}
    assert webui.LABELS == {e.name: e.label for e in kdistpp.REGISTRY}
    assert comfyui.BASE_SAMPLERS == list(kdistpp.SAMPLERS)
    assert len({e.label for e in kdistpp.REGISTRY}) == len(kdistpp.REGISTRY)
    readme = (ROOT / "README.md").read_text()
    for e in kdistpp.REGISTRY:
        assert e.fn.__name__ in readme, f"README does not list {e.fn.__name__}"
        assert ("cfg_pp" in inspect.signature(e.fn).parameters) == e.cfg_pp
        assert "direction" in inspect.signature(e.fn).parameters


def test_docstrings_document_exactly_the_parameters_each_sampler_takes():
    for e in kdistpp.REGISTRY:
        params = inspect.signature(e.fn).parameters
        keyword_only = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY]
        for name in keyword_only:
            assert f"{name}" in e.fn.__doc__, (e.name, name)
        assert ("cfg_pp:" in e.fn.__doc__) == ("cfg_pp" in params), e.name


def test_euler_draws_random_numbers_only_where_it_churns():
    """As ComfyUI's sample_euler: no churn, no draw, so the global RNG stream is the host's."""
    x, student = latent(8), ElementwiseDenoiser()
    torch.manual_seed(0)
    kdistpp.sample_euler_distpp(student, x, SIGMAS, s_churn=1.0, s_tmin=100.0, teacher=student, w=0.0, disable=True)
    after = torch.rand(3, device=DEVICE)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3, device=DEVICE))


def test_eta_zero_ancestral_is_deterministic_and_equals_k_diffusion():
    x, student = latent(9), ElementwiseDenoiser()
    noise = lambda s, sn: torch.full((2, 3, 4), 7.0, device=DEVICE)  # would show if any noise were added
    euler = kdistpp.sample_euler_distpp(student, x, SIGMAS, teacher=student, w=0.0, disable=True)
    euler_a = kdistpp.sample_euler_ancestral_distpp(student, x, SIGMAS, eta=0.0, noise_sampler=noise, teacher=student,
                                                    w=0.0, disable=True)
    torch.testing.assert_close(euler_a, euler)
    theirs = K.sample_dpmpp_2s_ancestral(student, x, SIGMAS.to(DEVICE), eta=0.0, noise_sampler=noise, disable=True)
    ours = kdistpp.sample_dpmpp_2s_ancestral_distpp(student, x, SIGMAS, eta=0.0, noise_sampler=noise, teacher=student,
                                                    w=0.0, disable=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
