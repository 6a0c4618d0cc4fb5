"""SDXL students and teachers in the real A1111 webui 1.10.1, on tiny SDXL checkpoints.

tests/a1111_host.py builds real `sgm` DiffusionEngines (SDXL's model code, from the webui's own
clone) with a small UNet that keeps SDXL's conditioning: a dict of a 2048-wide cross-attention
context (CLIP-L and OpenCLIP-G hidden states side by side) and a 2816-wide vector (the pooled
OpenCLIP-G embedding and the size/crop embeddings). Each check compares with the webui's own
sampler, or with the UNet evaluated directly on a call's inputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import a1111_host
import webui_lora
from kdistpp.registry import REGISTRY
from webui_api import SCRIPT, generate, same_image
from webui_sdxl import (CfgEvaluations, check_guided_evaluations, check_guided_steps_before_the_refiner_switch,
                        check_hires_fix, check_img2img)

STUDENT, TEACHER, REFINER = "xl_student", "xl_teacher", "xl_refiner"
REFINER_ARCH = "xl_refiner_arch"  # of SDXL's refiner architecture: context 1280, vector 2560
LORA_PROMPT = "a red cube <lora:xl_speed:1>"  # a kohya-format speed LoRA on the SDXL student's UNet


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    shared, app = a1111_host.start(tmp_path_factory.mktemp("a1111_sdxl"), {"student": 11, "teacher": 22})
    from fastapi.testclient import TestClient
    from modules import sd_models

    from modules import extra_networks, script_callbacks
    from sgm.util import instantiate_from_config

    if "lora" not in extra_networks.extra_network_registry:
        script_callbacks.before_ui_callback()  # as the webui's api_only() does: the Lora extension registers here
    models = a1111_host.add_sdxl_checkpoints({STUDENT: 11, TEACHER: 22, REFINER: 33})
    a1111_host.add_sdxl_checkpoints({REFINER_ARCH: 44}, refiner=True)
    deltas = webui_lora.make_lora(models / f"{STUDENT}.safetensors",
                                  Path(shared.cmd_opts.lora_dir) / "xl_speed.safetensors")

    def unet(name, deltas=None, refiner=False):  # the SDXL UNet evaluated directly, with known weights
        config = a1111_host.sdxl_config(Path("unused"), refiner)["model"]["params"]["network_config"]
        module = instantiate_from_config(config).eval()
        module.load_state_dict(webui_lora.unet_state(models / f"{name}.safetensors", deltas))
        return module

    refs = {"student+lora": unet(STUDENT, deltas), "student": unet(STUDENT), "teacher": unet(TEACHER),
            "refiner": unet(REFINER), REFINER_ARCH: unet(REFINER_ARCH, refiner=True)}
    return type("Webui", (), {"shared": shared, "client": TestClient(app), "sd_models": sd_models, "refs": refs})


def xl(webui, sampler, **kwargs):
    settings = {"sd_model_checkpoint": STUDENT, **kwargs.pop("settings", {})}
    return generate(webui, sampler, settings=settings, **kwargs)


@pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.name)
def test_w0_and_no_teacher_give_the_webuis_own_sdxl_image(webui, entry):
    base = xl(webui, entry.webui_base)[0]
    assert webui.shared.sd_model.is_sdxl
    assert same_image(xl(webui, entry.label)[0], base)
    assert same_image(xl(webui, entry.label, teacher=TEACHER, w=0.0)[0], base)
    assert not same_image(xl(webui, entry.webui_base, seed=6)[0], base)


def model_named(webui, name):
    for model in webui.sd_models.model_data.loaded_sd_models:
        if model.sd_checkpoint_info.model_name == name:
            return model
    raise AssertionError(f"{name} is not in the webui's checkpoint cache")


def test_each_teacher_call_gets_sdxls_full_conditioning_at_the_teachers_cfg(webui):
    """The teacher, another SDXL checkpoint, is evaluated once per guided step on the student's conditioning
    dict: the 2048-wide cross-attention context and the 2816-wide vector of the prompt and of the negative
    prompt, combined at the teacher's CFG scale (3; the student's is 2)."""
    plain = xl(webui, "Euler Distillation++")[0]
    xl(webui, "Euler Distillation++", teacher=TEACHER, w=0.5)  # loads the teacher into the cache
    unets = {name: model_named(webui, name).model.diffusion_model for name in (STUDENT, TEACHER)}
    recorded = CfgEvaluations(unets)
    try:
        guided = xl(webui, "Euler Distillation++", teacher=TEACHER, w=0.5, guided_steps=2)[0]
    finally:
        recorded.remove()
    check_guided_evaluations(recorded.evaluations, STUDENT, TEACHER)
    assert not same_image(guided, plain)
    assert webui.shared.sd_model.sd_checkpoint_info.model_name == STUDENT


def evaluate(unet, args, kwargs):
    return unet(*args, **kwargs)


def test_a_speed_lora_student_with_its_checkpoint_as_teacher(webui):
    """An SDXL speed LoRA in the prompt is the student; "Same checkpoint, without the prompt's LoRAs" is its
    teacher: each call's output is reproduced by the SDXL UNet evaluated directly with the checkpoint's
    weights (teacher calls) or the checkpoint's plus the LoRA's deltas computed from the file (student calls)."""
    from kdistpp.integrations.webui_teachers import SAME_CHECKPOINT

    plain = xl(webui, "Euler Distillation++", prompt=LORA_PROMPT)[0]  # loads the student and the LoRA
    student = webui.shared.sd_model
    calls = webui_lora.Calls(student.model.diffusion_model)
    try:
        guided = xl(webui, "Euler Distillation++", prompt=LORA_PROMPT, teacher=SAME_CHECKPOINT, w=0.5,
                    guided_steps=2)[0]
    finally:
        calls.remove()
    refs = {k: webui.refs[k] for k in ("student", "student+lora")}
    assert webui_lora.which_weights(calls.calls, refs, evaluate) == [
        "student+lora", "student", "student+lora", "student", "student+lora", "student+lora"]
    assert all(k["context"].shape[-1] == 2048 and k["y"].shape[-1] == 2816 for _, k, _ in calls.calls)
    assert not same_image(guided, plain) and webui.shared.sd_model is student


@pytest.mark.parametrize("student, teacher", [(STUDENT, "teacher"), ("student", TEACHER)], ids=["sd1-teacher",
                                                                                                  "sdxl-teacher"])
def test_a_teacher_of_the_other_family_is_refused_before_any_model_call(webui, student, teacher):
    """SD1 and SDXL differ in latents' meaning, text conditioning (a 768-or-so-wide tensor against SDXL's
    dict) and UNet: either way round the teacher is refused, naming both, before any UNet call."""
    xl(webui, "Euler", settings={"sd_model_checkpoint": student})
    model = webui.shared.sd_model
    calls = webui_lora.Calls(model.model.diffusion_model)
    try:
        response = webui.client.post("/sdapi/v1/txt2img", json=request(student, teacher))
    finally:
        calls.remove()
    assert response.status_code == 500
    families = {STUDENT: "SDXL (text context 2048)", "student": "SD1 (text context 32)",
                TEACHER: "SDXL (text context 2048)", "teacher": "SD1 (text context 32)"}
    assert (f"teacher {teacher!r} is an {families[teacher]} model but the student is an {families[student]} model"
            in response.text), response.text[:2000]
    assert calls.calls == []
    assert webui.shared.sd_model is model


def request(student, teacher, guided_steps=1, **body):
    return {"prompt": "a red cube", "steps": 4, "width": 64, "height": 64, "seed": 5, "cfg_scale": 2.0,
            "sampler_name": "Euler Distillation++", "override_settings": {"sd_model_checkpoint": student},
            "alwayson_scripts": {SCRIPT: {"args": [teacher, 0.5, guided_steps, 3.0, "interpolate", "student", 0.0,
                                                   0.0]}}, **body}


class AllUNetCalls(webui_lora.Calls):
    """Every forward of any SDXL UNet (sgm's UNetModel), whichever cached model object runs it: at the refiner
    switch the webui may load the refiner into a cached model's object."""

    def __init__(self):
        from sgm.modules.diffusionmodules.openaimodel import UNetModel

        self.calls = []
        self.handle = torch.nn.modules.module.register_module_forward_hook(
            lambda m, a, k, out: self.record(m, a, k, out) if isinstance(m, UNetModel) else None, with_kwargs=True)


def refiner_request(teacher, guided_steps, refiner):
    return request(STUDENT, teacher, guided_steps=guided_steps, refiner_checkpoint=refiner, refiner_switch_at=0.5)


def which_weights(calls, refs):
    """For each UNet call, the checkpoint whose UNet reproduces it: among the base-architecture checkpoints
    for calls with SDXL's 2048-wide context, the refiner-architecture one for the others (1280 wide)."""
    base = {k: refs[k] for k in ("student", "teacher", "refiner")}
    names = []
    for call in calls:
        wide = call[1]["context"].shape[-1] == 2048
        names += webui_lora.which_weights([call], base if wide else {"refiner": refs[REFINER_ARCH]}, evaluate)
    return names


REFINER_CASES = [(TEACHER, REFINER), ("same", REFINER), (TEACHER, REFINER_ARCH)]


@pytest.mark.parametrize("teacher, refiner", REFINER_CASES, ids=["teacher", "same", "refiner-architecture"])
def test_guided_steps_before_the_refiner_switch_are_the_teachers(webui, teacher, refiner):
    from kdistpp.integrations.webui_teachers import SAME_CHECKPOINT

    same = teacher == "same"
    request = refiner_request(SAME_CHECKPOINT if same else teacher, 2, refiner)
    check_guided_steps_before_the_refiner_switch(webui, request, AllUNetCalls, which_weights, same,
                                                 refiner == REFINER_ARCH, refiner)


@pytest.mark.parametrize("teacher, refiner", REFINER_CASES, ids=["teacher", "same", "refiner-architecture"])
def test_a_guided_step_after_the_refiner_switch_is_refused(webui, teacher, refiner):
    """A third guided step would come after the switch, where the sampled model is the refiner: it is refused
    with the reason, before the teacher runs."""
    from kdistpp.integrations.webui_teachers import SAME_CHECKPOINT

    teacher = SAME_CHECKPOINT if teacher == "same" else teacher
    calls = AllUNetCalls()
    try:
        response = webui.client.post("/sdapi/v1/txt2img", json=refiner_request(teacher, 3, refiner))
    finally:
        calls.remove()
    assert response.status_code == 500
    assert "a guided step comes after the refiner switch" in response.text, response.text[:2000]
    expected_teacher = "student" if teacher == SAME_CHECKPOINT else "teacher"
    assert which_weights(calls.calls, webui.refs) == [
        "student", expected_teacher, "student", expected_teacher, "refiner"]


def recorded_generation(webui, **request):
    """A generation with the teacher (loaded before), its CFG evaluations recorded; returns (image, evaluations)."""
    xl(webui, "Euler a Distillation++", teacher=TEACHER, w=0.5, **request)  # loads the teacher
    recorded = CfgEvaluations({name: model_named(webui, name).model.diffusion_model for name in (STUDENT, TEACHER)})
    try:
        image = xl(webui, "Euler a Distillation++", teacher=TEACHER, w=0.5, **request)[0]
    finally:
        recorded.remove()
    return image, recorded.evaluations


HIRES = {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 4,
         "denoising_strength": 0.6}


def test_hires_fix(webui):
    check_hires_fix(webui, xl, recorded_generation, HIRES, STUDENT, TEACHER)


def test_img2img(webui):
    check_img2img(webui, xl, recorded_generation, STUDENT, TEACHER)
