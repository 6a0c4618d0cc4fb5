"""The ComfyUI node against fakes of exactly the ComfyUI interfaces it uses.

The fakes follow ComfyUI's comfy/samplers.py and comfy/sampler_helpers.py: KSAMPLER.sample calls
`sampler_function(model_k, noise, sigmas, extra_args=..., callback=k_callback, disable=..., **extra_options)`
with extra_args {"model_options", "seed", "denoise_mask"}, and k_callback reads x["i"], x["denoised"], x["x"].
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import types

import pytest
import torch

import kdistpp
from conftest import DEVICE
from kdistpp.integrations import comfyui

LOG = []


class LatentFormat:
    pass


class OtherLatentFormat:
    pass


class BaseModel:
    """A fake comfy BaseModel: a denoiser whose data mean is the cross-attention conditioning's mean."""

    def __init__(self, bias, latent_format=LatentFormat):
        self.bias, self.latent_format = bias, latent_format()

    def denoise(self, x, sigma, cross_attn):
        s = sigma.reshape(-1, 1, 1, 1)
        mean = self.bias + cross_attn.mean()
        return mean + (x - mean) / (1 + s**2)


class ModelPatcher:
    def __init__(self, bias, latent_format=LatentFormat):
        self.model = BaseModel(bias, latent_format)
        self.model_options = {"transformer_options": {}}
        self.load_device = DEVICE

    def pre_run(self):
        LOG.append("pre_run")

    def cleanup(self):
        LOG.append("cleanup")


def fake_comfy(monkeypatch):
    samplers, helpers = types.ModuleType("comfy.samplers"), types.ModuleType("comfy.sampler_helpers")

    def convert_cond(cond):
        return [{"cross_attn": c[0], "model_conds": {}, **c[1]} for c in cond]

    def prepare_sampling(model, noise_shape, conds, model_options=None):
        LOG.append(("prepare_sampling", model, tuple(noise_shape)))
        return model.model, conds, [model]

    def process_conds(model, noise, conds, device, latent_image=None, denoise_mask=None, seed=None):
        LOG.append(("process_conds", seed))
        return conds

    def cleanup_models(conds, models):
        LOG.append("cleanup_models")

    def sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None):  # noqa: B006
        LOG.append(("teacher", cond_scale))
        c = model.denoise(x, timestep, cond[0]["cross_attn"])
        u = model.denoise(x, timestep, uncond[0]["cross_attn"])
        return u + (c - u) * cond_scale

    class KSAMPLER:
        def __init__(self, sampler_function, extra_options={}, inpaint_options={}):  # noqa: B006
            self.sampler_function, self.extra_options = sampler_function, extra_options

        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                   disable_pbar=False):
            extra_args["denoise_mask"] = denoise_mask

            def model_k(x, sigma, denoise_mask=None, model_options={}, seed=None):  # noqa: B006
                return model_wrap(x, sigma, model_options=model_options, seed=seed)

            total = len(sigmas) - 1
            k_callback = (lambda d: callback(d["i"], d["denoised"], d["x"], total)) if callback else None
            return self.sampler_function(model_k, noise * sigmas[0], sigmas, extra_args=extra_args, callback=k_callback,
                                         disable=disable_pbar, **self.extra_options)

    samplers.KSAMPLER, samplers.process_conds, samplers.sampling_function = KSAMPLER, process_conds, sampling_function
    helpers.convert_cond, helpers.prepare_sampling, helpers.cleanup_models = convert_cond, prepare_sampling, cleanup_models
    comfy = types.ModuleType("comfy")
    comfy.samplers, comfy.sampler_helpers = samplers, helpers
    for name, module in (("comfy", comfy), ("comfy.samplers", samplers), ("comfy.sampler_helpers", helpers)):
        monkeypatch.setitem(sys.modules, name, module)
    LOG.clear()
    return samplers


def conditioning(value):
    return [[torch.full((1, 3, 8), value, device=DEVICE), {"pooled_output": None}]]


def build(student, teacher, **kw):
    options = dict(teacher_positive=conditioning(1.0), teacher_negative=conditioning(-1.0), teacher_cfg=4.0,
                   base_sampler="euler", w=0.5, guided_steps=1, form="interpolate", renoise="next")
    options.update(kw)
    return comfyui.DistillationPPSampler().build(student, teacher, **options)[0]


def student_wrap(patcher):
    return lambda x, sigma, model_options, seed: patcher.model.denoise(x, sigma, torch.zeros(1, device=x.device))


def test_node_imports_without_comfyui_and_fails_clearly_when_run(monkeypatch):
    monkeypatch.setitem(sys.modules, "comfy", None)
    path = pathlib.Path(__file__).parent.parent / "comfyui_kdistpp" / "__init__.py"
    spec = importlib.util.spec_from_file_location("comfyui_kdistpp", path)
    package = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(package)
    assert package.NODE_CLASS_MAPPINGS["KdistppDistillationPPSampler"] is comfyui.DistillationPPSampler
    types_ = comfyui.DistillationPPSampler.INPUT_TYPES()["required"]
    assert types_["student"][0] == "MODEL" and types_["teacher"][0] == "MODEL"
    assert "euler" in types_["base_sampler"][0] and comfyui.DistillationPPSampler.RETURN_TYPES == ("SAMPLER",)
    with pytest.raises(RuntimeError, match="inside ComfyUI"):
        build(ModelPatcher(0.0), ModelPatcher(0.5))


@pytest.mark.parametrize("base", ["euler", "euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m", "consistency"])
def test_sampler_runs_the_teacher_through_comfyui_conditioning_path(monkeypatch, base):
    fake_comfy(monkeypatch)
    student, teacher = ModelPatcher(0.0), ModelPatcher(0.5)
    sampler = build(student, teacher, base_sampler=base, guided_steps=2)
    sigmas = torch.tensor([14.6, 3.0, 1.0, 0.3, 0.0], device=DEVICE)
    steps = []
    noise = torch.randn(1, 4, 8, 8, device=DEVICE)
    out = sampler.sample(student_wrap(student), sigmas, {"model_options": {}, "seed": 7}, lambda *a: steps.append(a[0]),
                         noise, disable_pbar=True)
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert steps == [0, 1, 2, 3]
    assert LOG[0] == ("prepare_sampling", teacher, (1, 4, 8, 8)) and ("process_conds", 7) in LOG
    assert [e for e in LOG if isinstance(e, tuple) and e[0] == "teacher"] == [("teacher", 4.0)] * 2
    assert LOG[-2:] == ["cleanup", "cleanup_models"]


def test_teacher_changes_the_result_and_w0_does_not(monkeypatch):
    fake_comfy(monkeypatch)
    student, teacher = ModelPatcher(0.0), ModelPatcher(2.0)
    sigmas = torch.tensor([14.6, 3.0, 1.0, 0.0], device=DEVICE)
    noise = torch.randn(1, 4, 8, 8, device=DEVICE)
    run = lambda w: build(student, teacher, w=w).sample(student_wrap(student), sigmas, {"model_options": {}, "seed": 0},  # noqa: E731
                                                       None, noise, disable_pbar=True)
    torch.manual_seed(0)
    plain = run(0.0)
    torch.manual_seed(0)
    guided = run(0.5)
    assert (guided.mean() - plain.mean()) > 0.1  # pulled toward the teacher's higher data mean


def test_teacher_is_released_when_sampling_fails(monkeypatch):
    fake_comfy(monkeypatch)
    student, teacher = ModelPatcher(0.0), ModelPatcher(0.5)

    def broken(x, sigma, model_options, seed):
        raise RuntimeError("student failed")

    with pytest.raises(RuntimeError, match="student failed"):
        build(student, teacher).sample(broken, torch.tensor([3.0, 1.0, 0.0]), {"model_options": {}}, None,
                                       torch.randn(1, 4, 8, 8), disable_pbar=True)
    assert LOG[-2:] == ["cleanup", "cleanup_models"]


def test_teacher_from_another_latent_space_is_refused(monkeypatch):
    fake_comfy(monkeypatch)
    with pytest.raises(ValueError, match="different latent spaces"):
        build(ModelPatcher(0.0), ModelPatcher(0.0, OtherLatentFormat))


def test_sigma_window_and_direction_reach_the_sampler(monkeypatch):
    fake_comfy(monkeypatch)
    student, teacher = ModelPatcher(0.0), ModelPatcher(0.5)
    sigmas = torch.tensor([14.6, 3.0, 1.0, 0.3, 0.0], device=DEVICE)
    noise = torch.randn(1, 4, 8, 8, device=DEVICE)
    sampler = build(student, teacher, guided_steps=1, guide_sigma_min=0.9, guide_sigma_max=3.5, renoise="current")
    assert sampler.extra_options["guidance_steps"] == kdistpp.SigmaWindow(0.9, 3.5)
    sampler.sample(student_wrap(student), sigmas, {"model_options": {}, "seed": 1}, None, noise, disable_pbar=True)
    assert [e for e in LOG if isinstance(e, tuple) and e[0] == "teacher"] == [("teacher", 4.0)] * 2  # sigmas 3 and 1
    refined = build(student, teacher, direction="refined")
    assert refined.extra_options["direction"] == "refined" and refined.extra_options["guidance_steps"] == 1
    inputs = comfyui.DistillationPPSampler.INPUT_TYPES()
    assert all("tooltip" in spec[1] for group in inputs.values() for spec in group.values())
    assert comfyui.DistillationPPSampler.DESCRIPTION
