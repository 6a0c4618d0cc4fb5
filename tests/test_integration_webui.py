"""The A1111/Forge extension logic against fakes of exactly the webui interfaces it uses.

The fakes follow A1111 >= 1.6: `KDiffusionSampler(fn, model)` calls `fn(model_wrap_cfg, x, extra_args=...,
disable=False, callback=..., sigmas=...)` (sigmas because the signature names it), extra_args =
{cond, image_cond, uncond, cond_scale, s_min_uncond}; the CFG denoiser is an nn.Module whose
`inner_model` is its `model_wrap`; checkpoints are cached in `sd_models.model_data.loaded_sd_models`.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import types

import pytest
import torch

import kdistpp
from conftest import DEVICE
from kdistpp.integrations import webui

SamplerData = collections.namedtuple("SamplerData", ["name", "constructor", "aliases", "options"])


class SDModel:
    def __init__(self, title, bias, parameterization="eps"):
        self.sd_checkpoint_info = types.SimpleNamespace(title=title, filename=f"{title}.safetensors")
        self.bias, self.parameterization = bias, parameterization


class CompVisDenoiser(torch.nn.Module):
    def __init__(self, model, quantize=False):
        super().__init__()
        self.inner_model = model

    def forward(self, x, sigma, cond):
        s = sigma.reshape(-1, 1, 1, 1)
        mean = self.inner_model.bias + cond.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        return mean + (x - mean) / (1 + s**2)


class CompVisVDenoiser(CompVisDenoiser):
    pass


class CFGDenoiser(torch.nn.Module):
    """The webui's CFG denoiser: cond and uncond in one batch through inner_model."""

    def __init__(self, sd_model):
        super().__init__()
        self.model_wrap = CompVisDenoiser(sd_model)
        self.scales, self.step = [], 0

    @property
    def inner_model(self):
        return self.model_wrap

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        self.scales.append((self.inner_model.inner_model.sd_checkpoint_info.title, cond_scale))
        out = self.inner_model(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond]))
        c, u = out.chunk(2)
        return u + (c - u) * cond_scale


CLASSES = (CompVisDenoiser, CompVisVDenoiser)


class Opts:
    """The webui's options: values in `data`, read as attributes."""

    def __init__(self, data):
        self.__dict__["data"] = dict(data)

    def __getattr__(self, name):
        try:
            return self.data[name]
        except KeyError:
            raise AttributeError(name) from None


def fake_webui(limit=2):
    models = {"student": SDModel("student", 0.0), "base": SDModel("base", 2.0)}
    shared = types.SimpleNamespace(sd_model=models["student"],
                                   opts=Opts({"sd_checkpoints_limit": limit, "sd_checkpoints_keep_in_cpu": True}))
    model_data = types.SimpleNamespace(loaded_sd_models=[models["student"]])
    loads = []

    def reload_model_weights(info=None):
        loads.append(info.title)
        model = models[info.title]
        if model not in model_data.loaded_sd_models:
            model_data.loaded_sd_models.append(model)
        shared.sd_model = model

    sd_models = types.SimpleNamespace(
        get_closet_checkpoint_match=lambda t: models[t].sd_checkpoint_info if t in models else None,
        model_data=model_data, reload_model_weights=reload_model_weights, SkipWritingToConfig=contextlib.nullcontext,
        send_model_to_device=lambda m: loads.append(("device", m.sd_checkpoint_info.title)),
        send_model_to_cpu=lambda m: loads.append(("cpu", m.sd_checkpoint_info.title)),
        send_model_to_trash=lambda m: loads.append(("trash", m.sd_checkpoint_info.title)))

    class KDiffusionSampler:
        def __init__(self, funcname, sd_model):
            self.func, self.model_wrap_cfg = funcname, CFGDenoiser(sd_model)
            self.steps_seen = []

        def callback_state(self, d):
            self.steps_seen.append(d["i"])

        def sample(self, x, sigmas, cond, uncond, cfg_scale):
            kwargs = {"sigmas": sigmas} if "sigmas" in inspect.signature(self.func).parameters else {}
            extra = {"cond": cond, "image_cond": None, "uncond": uncond, "cond_scale": cfg_scale, "s_min_uncond": 0.0}
            return self.func(self.model_wrap_cfg, x, extra_args=extra, disable=False, callback=self.callback_state, **kwargs)

    sd_samplers = types.SimpleNamespace(all_samplers=[], all_samplers_map={}, set_samplers=lambda: loads.append("set"))
    ns = types.SimpleNamespace(sd_models=sd_models, sd_samplers=sd_samplers, common=types.SimpleNamespace(SamplerData=SamplerData),
                               kdiffusion=types.SimpleNamespace(KDiffusionSampler=KDiffusionSampler, sampler_extra_params={}),
                               lcm=types.SimpleNamespace(LCMSampler=KDiffusionSampler), rng=None, shared=shared)
    return ns, loads


@pytest.fixture(autouse=True)
def reset_settings():
    yield
    webui.settings = webui.Settings()


def run(fake, label, x, sigmas):
    sampler = fake.sd_samplers.all_samplers_map[label].constructor(fake.shared.sd_model)
    cond = torch.full((x.shape[0], 3, 8), 0.5, device=DEVICE)
    return sampler, sampler.sample(x, sigmas, cond, torch.zeros_like(cond), 1.0)


def test_imports_without_the_webui_and_fails_clearly_when_registering():
    with pytest.raises(RuntimeError, match="inside the A1111 or Forge webui"):
        webui.register()
    with pytest.raises(ValueError, match="form"):
        webui.Settings(form="blend")
    with pytest.raises(ValueError, match="direction"):
        webui.Settings(direction="teacher")
    with pytest.raises(ValueError, match="SigmaWindow"):
        webui.Settings(sigma_min=5.0, sigma_max=1.0)
    for bad in (-1.0, float("nan"), 0.5, 0.999):  # a scale in (0, 1) sits on the slider next to Auto (0)
        with pytest.raises(ValueError, match=r"teacher_cfg must be 0 for Auto .* or a CFG scale of 1 or more"):
            webui.Settings(teacher_cfg=bad)
    assert [webui.Settings(teacher_cfg=ok).teacher_cfg for ok in (0.0, 1.0, 1.5)] == [0.0, 1.0, 1.5]


def test_settings_choose_the_guided_steps():
    sigmas = [14.6, 5.0, 1.9, 0.7, 0.0]
    assert webui.Settings(guided_steps=2).plan(sigmas) == ([0, 1], "next")
    assert webui.Settings(guided_steps=9).plan(sigmas) == ([0, 1, 2], "next")  # capped; the last step has no next sigma
    assert webui.Settings(guided_steps=2, sigma_min=0.5, sigma_max=4.0).plan(sigmas) == ([2], "next")  # the window decides
    assert webui.Settings(sigma_min=0.0, sigma_max=0.8).plan(sigmas) == ([3], "current")  # the last step alone
    assert webui.Settings(guided_steps=1).plan([14.6, 0.0]) == ([0], "current")  # a 1-step student
    assert webui.Settings(guided_steps=9, form="guidance").plan(sigmas) == ([0, 1, 2, 3], "next")  # no renoise
    assert webui.Settings(guided_steps=9).plan([14.6, 5.0, 1.9]) == ([0, 1], "next")  # img2img-like, no final 0


def test_register_adds_every_sampler_once():
    fake, loads = fake_webui()
    webui.register(fake, CLASSES)
    webui.register(fake, CLASSES)
    assert [d.name for d in fake.sd_samplers.all_samplers] == list(webui.LABELS.values())
    assert loads.count("set") == 2


@pytest.mark.parametrize("base", list(webui.LABELS))
def test_teacher_runs_through_a_copy_of_the_webui_cfg_denoiser(base):
    fake, loads = fake_webui()
    webui.register(fake, CLASSES)
    webui.settings = webui.Settings(teacher="base", w=0.5, guided_steps=2, teacher_cfg=6.0)
    sigmas = torch.tensor([14.6, 3.0, 1.0, 0.3, 0.0], device=DEVICE)
    x = torch.randn(2, 4, 8, 8, device=DEVICE) * 14.6
    sampler, out = run(fake, webui.LABELS[base], x, sigmas)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert sampler.steps_seen == [0, 1, 2, 3]
    assert fake.shared.sd_model.sd_checkpoint_info.title == "student"  # the student stays the webui's model
    assert loads == ["set", "base", "student", *[("device", "base"), ("cpu", "base")] * 2]
    assert sampler.model_wrap_cfg.model_wrap.inner_model.sd_checkpoint_info.title == "student"  # not replaced
    scales = sampler.model_wrap_cfg.scales  # the copy shares the webui denoiser's state, as a copy would in the webui
    assert scales.count(("base", 6.0)) == 2 and scales.count(("student", 1.0)) == len(scales) - 2


def test_w0_or_no_teacher_is_the_plain_sampler_and_the_teacher_pulls_the_result():
    fake, loads = fake_webui()
    webui.register(fake, CLASSES)
    sigmas = torch.tensor([14.6, 3.0, 1.0, 0.0], device=DEVICE)
    x = torch.randn(2, 4, 8, 8, device=DEVICE) * 14.6
    plain = run(fake, "Euler Distillation++", x, sigmas)[1]
    assert loads == ["set"]  # no teacher loaded
    webui.settings = webui.Settings(teacher="base", w=0.5, teacher_cfg=1.0)
    guided = run(fake, "Euler Distillation++", x, sigmas)[1]
    assert guided.mean() - plain.mean() > 0.1  # toward the teacher's higher data mean


def test_a_teacher_beyond_the_checkpoint_limit_is_released_when_set_back_to_none_and_a_missing_one_is_named():
    fake, loads = fake_webui(limit=1)  # the webui's default: one checkpoint in memory
    webui.register(fake, CLASSES)
    sigmas = torch.tensor([14.6, 1.0, 0.0], device=DEVICE)
    x = torch.randn(1, 4, 8, 8, device=DEVICE)
    loaded = fake.sd_models.model_data.loaded_sd_models
    webui.settings = webui.Settings(teacher="base")
    run(fake, "Euler Distillation++", x, sigmas)
    assert [m.sd_checkpoint_info.title for m in loaded] == ["student", "base"]  # beside the student
    assert fake.shared.opts.sd_checkpoints_limit == 1  # the user's setting is left as it was
    webui.settings = webui.Settings()  # the teacher set back to None: the next generation frees it
    run(fake, "Euler Distillation++", x, sigmas)
    assert [m.sd_checkpoint_info.title for m in loaded] == ["student"] and loads[-1] == ("trash", "base")
    webui.settings = webui.Settings(teacher="missing")
    with pytest.raises(ValueError, match="not found"):
        run(fake, "Euler Distillation++", x, sigmas)


def test_the_extension_script_compiles():
    import pathlib
    import py_compile

    root = pathlib.Path(__file__).parent.parent
    py_compile.compile(str(root / "scripts" / "kdistpp_distillation_pp.py"), doraise=True)
