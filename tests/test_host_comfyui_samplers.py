"""kdistpp at w = 0 against ComfyUI's own k-diffusion functions, imported from the host tree.

CFG++: kdistpp's cfg_pp=True samplers must equal ComfyUI's `*_cfg_pp` samplers (they are what
ComfyUI users A/B against). The model below speaks ComfyUI's post-CFG protocol (it calls the
`sampler_post_cfg_function`s with the unconditional estimate, as comfy.samplers.cfg_function does)
and kdistpp's (`last_uncond_denoised`), so both samplers see the same denoiser.

Tolerance: ComfyUI keeps sigmas as float32 tensors, kdistpp does its scalar step math in float64,
so results agree to float32 rounding (rtol 1e-5), not bit for bit.
"""

from __future__ import annotations

import pytest
import torch

import kdistpp
from conftest import DEVICE, ElementwiseDenoiser
from hosts import import_comfy

SIGMAS = kdistpp.get_sigmas_karras(6, 0.03, 14.6)


class VEModelSampling:
    """Stands for an eps model's model_sampling: ComfyUI reads its half-log-SNR as -log(sigma)."""


class ComfyStyleCFG:
    """C and U from two different denoisers; CFG result passed through ComfyUI's post-CFG hooks."""

    def __init__(self, scale=2.5):
        self.cond, self.uncond, self.scale = ElementwiseDenoiser(bias=0.8), ElementwiseDenoiser(bias=-0.5, scale=1.5), scale
        self.last_uncond_denoised = None
        patcher = type("Patcher", (), {"get_model_object": staticmethod(lambda name: VEModelSampling())})()
        inner = type("Inner", (), {"model_sampling": VEModelSampling()})()
        self.inner_model = type("Wrapped", (), {"model_patcher": patcher, "inner_model": inner})()

    def __call__(self, x, sigma, model_options=None, seed=None, **_):
        c, u = self.cond(x, sigma), self.uncond(x, sigma)
        out = u + (c - u) * self.scale
        for fn in (model_options or {}).get("sampler_post_cfg_function", []):
            out = fn({"denoised": out, "uncond_denoised": u, "cond_denoised": c, "sigma": sigma, "input": x,
                      "model_options": model_options, "cond_scale": self.scale})
        self.last_uncond_denoised = u
        return out


def replayed_noise(seed, shape):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(shape, generator=g, device=DEVICE)


CFG_PP = {"euler": ("sample_euler_cfg_pp", {}), "euler_ancestral": ("sample_euler_ancestral_cfg_pp", {"eta": 1.0}),
          "dpmpp_2s_ancestral": ("sample_dpmpp_2s_ancestral_cfg_pp", {"eta": 1.0}),
          "dpmpp_2m": ("sample_dpmpp_2m_cfg_pp", {})}


@pytest.mark.parametrize("name", CFG_PP)
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_cfg_pp_equals_comfyui_at_w0(name, scale):
    comfy = import_comfy()
    fn_name, kw = CFG_PP[name]
    shape = (2, 4, 5, 5)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * float(SIGMAS[0])).to(DEVICE)
    noise = lambda: {"noise_sampler": replayed_noise(4, shape)} if kw else {}  # the same draws for both
    theirs = getattr(comfy.k_diffusion.sampling, fn_name)(ComfyStyleCFG(scale), x, SIGMAS.to(DEVICE),
                                                          extra_args={"model_options": {}}, disable=True, **kw, **noise())
    ours = kdistpp.SAMPLERS[name](ComfyStyleCFG(scale), x, SIGMAS, teacher=ElementwiseDenoiser(), w=0.0, cfg_pp=True,
                                  disable=True, **noise())
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", CFG_PP)
def test_cfg_pp_differs_from_plain_when_uncond_differs(name):
    """The comparison above can fail: CFG++ is not the plain sampler on this model."""
    comfy = import_comfy()
    fn_name, kw = CFG_PP[name]
    plain = {"euler": "sample_euler", "euler_ancestral": "sample_euler_ancestral",
             "dpmpp_2s_ancestral": "sample_dpmpp_2s_ancestral", "dpmpp_2m": "sample_dpmpp_2m"}[name]
    shape = (2, 4, 5, 5)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * float(SIGMAS[0])).to(DEVICE)
    noise = lambda: {"noise_sampler": replayed_noise(4, shape)} if kw else {}
    theirs = getattr(comfy.k_diffusion.sampling, plain)(ComfyStyleCFG(4.0), x, SIGMAS.to(DEVICE),
                                                        extra_args={"model_options": {}}, disable=True, **noise())
    ours = kdistpp.SAMPLERS[name](ComfyStyleCFG(4.0), x, SIGMAS, teacher=ElementwiseDenoiser(), w=0.0, cfg_pp=True,
                                  disable=True, **noise())
    assert (ours - theirs).abs().max() > 1e-3


class FlowModel:
    """A flow model as ComfyUI's samplers see it: the denoiser, with its CONST model_sampling where
    sample_euler_ancestral / sample_dpmpp_2s_ancestral / sample_lcm look for it."""

    def __init__(self, comfy):
        self.model, sampling = ElementwiseDenoiser(bias=0.3), comfy.model_sampling.CONST()
        self.inner_model = type("Wrapped", (), {"inner_model": type("Inner", (), {"model_sampling": sampling})()})()

    def __call__(self, x, sigma, **_):
        return self.model(x, sigma)


FLOW_BASES = {"euler": ("sample_euler", {}), "euler_ancestral": ("sample_euler_ancestral", {"eta": 1.0}),
              "dpmpp_2s_ancestral": ("sample_dpmpp_2s_ancestral", {"eta": 1.0}), "dpmpp_2m": ("sample_dpmpp_2m", {}),
              "consistency": ("sample_lcm", {})}


@pytest.mark.parametrize("name", FLOW_BASES)
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_samplers_equal_comfyuis_on_a_const_model_at_w0(name, shift):
    """ComfyUI runs its *_RF ancestral variants and noise_scaling for CONST (flow) models; kdistpp's
    parametrization='flow' samplers must give the same sample, from a schedule starting at s = 1."""
    comfy = import_comfy()
    fn_name, kw = FLOW_BASES[name]
    shape = (2, 4, 5, 5)
    sigmas = kdistpp.get_sigmas_flow(5, shift=shift)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    noisy = name in ("euler_ancestral", "dpmpp_2s_ancestral", "consistency")
    noise = lambda: {"noise_sampler": replayed_noise(4, shape)} if noisy else {}  # noqa: E731
    theirs = getattr(comfy.k_diffusion.sampling, fn_name)(FlowModel(comfy), x, sigmas.to(DEVICE), disable=True, **kw,
                                                          **noise())
    ours = kdistpp.SAMPLERS[name](FlowModel(comfy), x, sigmas, disable=True, parametrization="flow", **kw, **noise())
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    if noisy:  # the VE update on the same model is a different sample: the comparison can fail
        ve = kdistpp.SAMPLERS[name](FlowModel(comfy), x, sigmas, disable=True, parametrization="ve", **kw, **noise())
        assert (ve - theirs).abs().max() > 1e-3
