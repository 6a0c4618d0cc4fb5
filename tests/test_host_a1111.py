"""The extension inside the real A1111 webui 1.10.1: requests through its API route, on tiny checkpoints.

tests/a1111_host.py starts the pinned webui with this repository cloned into extensions/, as
"Install from URL" does; the student and teacher are two random SD1-style checkpoints. Images are
compared as the API returns them (PNG pixels): "the same image" is what a user checks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import a1111_host
from kdistpp.registry import REGISTRY
from webui_api import SCRIPT, generate, init_image, mask_image, same_image


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    shared, app = a1111_host.start(tmp_path_factory.mktemp("a1111"), {"student": 11, "teacher": 22})
    from fastapi.testclient import TestClient

    from modules import sd_models

    return type("Webui", (), {"shared": shared, "client": TestClient(app), "sd_models": sd_models})


def teacher_model(webui):
    for model in webui.sd_models.model_data.loaded_sd_models:
        if model.sd_checkpoint_info.model_name == "teacher":
            return model
    raise AssertionError("the teacher is not in the webui's checkpoint cache")


class UNetCalls:
    """Counts forward passes of a model's UNet, and the order of device moves around them."""

    def __init__(self, webui, model, monkeypatch):
        self.events, self.model = [], model
        self.hook = model.model.diffusion_model.register_forward_pre_hook(lambda *_: self.events.append("unet"))
        for name in ("send_model_to_device", "send_model_to_cpu"):
            real = getattr(webui.sd_models, name)

            def record(m, real=real, name=name):
                if m is self.model:
                    self.events.append(name)
                return real(m)

            monkeypatch.setattr(webui.sd_models, name, record)

    @property
    def calls(self):
        return self.events.count("unet")


@pytest.fixture
def unet_calls(webui, monkeypatch):
    """Makes UNetCalls for a model; their hooks are removed after the test."""
    made = []

    def make(model):
        made.append(UNetCalls(webui, model, monkeypatch))
        return made[-1]

    yield make
    for recorder in made:
        recorder.hook.remove()


@pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.name)
def test_w0_and_no_teacher_give_the_webuis_own_sampler_image(webui, entry):
    base = generate(webui, entry.webui_base)[0]
    assert same_image(generate(webui, entry.label)[0], base)
    assert same_image(generate(webui, entry.label, teacher="teacher", w=0.0)[0], base)
    other = generate(webui, entry.webui_base, seed=6)[0]
    assert not same_image(other, base)  # the pixels do see the sampler's result


@pytest.mark.parametrize("entry", [e for e in REGISTRY if e.name in ("euler_ancestral", "dpmpp_2s_ancestral")],
                         ids=lambda e: e.name)
def test_the_eta_setting_is_honoured(webui, entry):
    base = generate(webui, entry.webui_base, eta=0.4)[0]
    assert same_image(generate(webui, entry.label, eta=0.4)[0], base)
    assert not same_image(generate(webui, entry.label)[0], base)


@pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.name)
def test_a_batch_gives_the_images_of_its_seeds_alone(webui, entry):
    for kwargs in ({}, {"teacher": "teacher", "w": 0.5}):
        batch = generate(webui, entry.label, seed=40, batch_size=2, **kwargs)
        alone = generate(webui, entry.label, seed=41, **kwargs)[0]
        assert same_image(batch[1], alone)  # the webui's own samplers differ by as much (batched convolutions)
        assert not same_image(batch[0], batch[1])


@pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.name)
def test_the_teacher_is_called_once_per_guided_step_on_the_device(webui, entry, unet_calls):
    generate(webui, entry.label, teacher="teacher", w=0.5)  # loads the teacher into the cache
    calls = unet_calls(teacher_model(webui))
    guided = generate(webui, entry.label, teacher="teacher", w=0.5, guided_steps=2)[0]
    # one batched cond+uncond call per guided step, each inside a move to the device and back
    assert calls.events == ["send_model_to_device", "unet", "send_model_to_cpu"] * 2
    assert not same_image(guided, generate(webui, entry.label)[0])
    assert webui.shared.sd_model.sd_checkpoint_info.model_name == "student"


def test_the_teacher_stays_on_the_device_when_the_webui_keeps_several_there(webui, unet_calls):
    generate(webui, "Euler Distillation++", teacher="teacher", w=0.5)
    calls = unet_calls(teacher_model(webui))
    generate(webui, "Euler Distillation++", teacher="teacher", w=0.5, settings={"sd_checkpoints_keep_in_cpu": False})
    assert calls.events == ["send_model_to_device", "unet"]


def test_cached_checkpoints_are_matched_by_file_after_a_rescan(webui, monkeypatch):
    generate(webui, "Euler Distillation++", teacher="teacher", w=0.5)
    webui.client.post("/sdapi/v1/refresh-checkpoints")  # new CheckpointInfo objects for the same files
    loads, real = [], webui.sd_models.reload_model_weights
    monkeypatch.setattr(webui.sd_models, "reload_model_weights",
                        lambda *a, info=None, **k: loads.append(info and info.model_name) or real(*a, info=info, **k))
    generate(webui, "Euler Distillation++", teacher="teacher", w=0.5)
    assert "teacher" not in loads  # found in the cache: no swap of the active model


class RecordingDict(dict):
    def __init__(self, data):
        super().__init__(data)
        self.writes = []

    def __setitem__(self, key, value):
        self.writes.append((key, value))
        super().__setitem__(key, value)


def test_loading_the_teacher_writes_nothing_to_the_settings(webui, monkeypatch):
    generate(webui, "Euler Distillation++", teacher="teacher", w=0.5)
    webui.sd_models.model_data.loaded_sd_models.remove(teacher_model(webui))  # evicted: the next run loads it
    monkeypatch.setattr(webui.shared.opts, "data", RecordingDict(webui.shared.opts.data))
    generate(webui, "Euler Distillation++", teacher="teacher", w=0.5)
    teacher_model(webui)  # loaded again
    assert not [value for key, value in webui.shared.opts.data.writes if "teacher" in str(value)]


def test_the_same_seed_gives_the_same_guided_image(webui):
    first = generate(webui, "Euler a Distillation++", teacher="teacher", w=0.5)[0]
    assert np.array_equal(first, generate(webui, "Euler a Distillation++", teacher="teacher", w=0.5)[0])


@pytest.mark.parametrize("inpaint", [False, True], ids=["img2img", "inpaint"])
def test_img2img_and_inpaint(webui, inpaint, unet_calls):
    request = {"init_images": [init_image()], "denoising_strength": 0.6}
    if inpaint:
        request["mask"] = mask_image()
    generate(webui, "Euler a", route="img2img", **request)  # the webui's first img2img differs from later ones
    base = generate(webui, "Euler a", route="img2img", **request)[0]
    assert same_image(generate(webui, "Euler a Distillation++", route="img2img", **request)[0], base)
    generate(webui, "Euler a Distillation++", route="img2img", teacher="teacher", w=0.5, **request)
    calls = unet_calls(teacher_model(webui))
    guided = generate(webui, "Euler a Distillation++", route="img2img", teacher="teacher", w=0.5, **request)[0]
    assert calls.calls == 1 and not same_image(guided, base)
    if inpaint:  # outside the mask the webui keeps the original; the teacher must not change that
        assert np.abs(guided[:8] - base[:8]).max() <= 1


def test_the_infotext_records_the_teacher(webui):
    response = webui.client.post("/sdapi/v1/txt2img", json={
        "prompt": "a", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler Distillation++", "seed": 1,
        "override_settings": {"sd_model_checkpoint": "student"},
        "alwayson_scripts": {SCRIPT: {"args": ["teacher", 0.25, 1, 3.0, "interpolate", "student", 0.0, 0.0]}}})
    info = response.json()["info"]
    assert "DistillationPP teacher: teacher" in info and "DistillationPP w: 0.25" in info



def test_the_sigma_noise_setting_reaches_dpmpp_2s_a(webui, monkeypatch):
    monkeypatch.setitem(webui.shared.opts.data, "s_noise", 0.7)  # Settings > Sampler parameters > Sigma noise
    base = generate(webui, "DPM++ 2S a")[0]
    assert same_image(generate(webui, "DPM++ 2S a Distillation++")[0], base)
    monkeypatch.setitem(webui.shared.opts.data, "s_noise", 1.0)
    assert not same_image(generate(webui, "DPM++ 2S a Distillation++")[0], base)


def test_the_teacher_follows_the_prompt_schedule_of_the_step_it_guides(webui):
    generate(webui, "Euler Distillation++", teacher="teacher", w=0.5)
    seen = {"student": [], "teacher": []}
    hooks = []
    for model in webui.sd_models.model_data.loaded_sd_models:
        name = model.sd_checkpoint_info.model_name
        hooks.append(model.model.diffusion_model.register_forward_pre_hook(
            lambda module, args, kwargs, name=name: seen[name].append(kwargs["context"].clone()), with_kwargs=True))
    try:
        # the prompt changes right after step 1, the step the window guides (sigmas of 4 Automatic steps: 14.6, 2.92,
        # 0.93, 0.03): the teacher must see step 1's prompt, not the next one
        body = {"prompt": "[a red cube:a green ball:1]", "steps": 4, "width": 64, "height": 64, "seed": 3,
                "sampler_name": "Euler Distillation++", "cfg_scale": 2.0,
                "override_settings": {"sd_model_checkpoint": "student"},
                "alwayson_scripts": {SCRIPT: {"args": ["teacher", 0.5, 1, 3.0, "interpolate", "student", 1.0, 3.0]}}}
        assert webui.client.post("/sdapi/v1/txt2img", json=body).status_code == 200
    finally:
        for hook in hooks:
            hook.remove()
    assert len(seen["teacher"]) == 1 and len(seen["student"]) == 4
    assert torch.equal(seen["teacher"][0], seen["student"][1])  # the prompt of the step it guides
    assert not torch.equal(seen["student"][1], seen["student"][2])  # the schedule did change the prompt, right after


def test_an_sd3_student_is_refused_before_any_model_call(webui):
    """A1111 1.10.1 wraps SD3 (a rectified-flow model) in its SD3Denoiser: the extension refuses it
    instead of sampling it with VE steps."""
    from modules.models.sd3.sd3_model import SD3Denoiser

    from kdistpp.integrations import webui as extension

    calls = []

    class StudentCFG:
        inner_model = SD3Denoiser(None, torch.linspace(1.0, 0.01, 10))

        def __call__(self, x, sigma, **extra):
            calls.append(sigma)
            return x

    sample = extension.make_sampler_function(REGISTRY[0])
    with pytest.raises(ValueError, match="the model is a flow-matching model"):
        sample(StudentCFG(), torch.zeros(1, 4, 8, 8), torch.tensor([1.0, 0.5, 0.0]), disable=True)
    assert calls == []
