"""SDXL students and teachers in the real Forge webui (dfdcbab), on tiny SDXL checkpoints.

tests/forge_host.py builds them from Forge's own classes (its UNet with SDXL's 2048-wide context and
2816-wide vector, CLIP-L and CLIP-G text encoders of SDXL's widths, a small VAE) and Forge's loader
makes them StableDiffusionXL engines. Each check compares with Forge's own sampler, or with the UNet
evaluated directly on a call's inputs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import forge_host
import webui_lora
from kdistpp.registry import REGISTRY
from webui_api import SCRIPT, generate, same_image
from webui_sdxl import (CfgEvaluations, check_guided_evaluations, check_guided_steps_before_the_refiner_switch,
                        check_hires_fix, check_img2img)

STUDENT, TEACHER, REFINER = "xl_student", "xl_teacher", "xl_refiner"
REFINER_ARCH = "xl_refiner_arch"  # of SDXL's refiner architecture: context 1280, vector 2560
LORA_PROMPT = "a red cube <lora:xl_speed:1>"  # a kohya-format speed LoRA on the SDXL student's UNet


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    shared, app = forge_host.start(tmp_path_factory.mktemp("forge_sdxl"), {"student": 11, "teacher": 22})
    from fastapi.testclient import TestClient
    from modules import sd_models

    from modules import extra_networks, script_callbacks

    from backend.nn.unet import IntegratedUNet2DConditionModel

    if "lora" not in extra_networks.extra_network_registry:
        script_callbacks.before_ui_callback()  # as Forge's api_only() does: the Lora extension registers here
    models = forge_host.add_sdxl_checkpoints({STUDENT: 11, TEACHER: 22, REFINER: 33})
    forge_host.add_sdxl_checkpoints({REFINER_ARCH: 44}, refiner=True)
    deltas = webui_lora.make_lora(models / f"{STUDENT}.safetensors",
                                  Path(shared.cmd_opts.lora_dir) / "xl_speed.safetensors")

    def unet(name, deltas=None, refiner=False):  # the SDXL UNet evaluated directly, with known weights
        module = IntegratedUNet2DConditionModel(**(forge_host.SDXL_REFINER_UNET if refiner
                                                   else forge_host.SDXL_UNET)).eval()
        module.load_state_dict(webui_lora.unet_state(models / f"{name}.safetensors", deltas))
        return module

    refs = {"student+lora": unet(STUDENT, deltas), "student": unet(STUDENT), "teacher": unet(TEACHER),
            "refiner": unet(REFINER), REFINER_ARCH: unet(REFINER_ARCH, refiner=True)}
    return type("Forge", (), {"shared": shared, "client": TestClient(app), "sd_models": sd_models, "refs": refs})


def xl(forge, sampler, **kwargs):
    settings = {"sd_model_checkpoint": STUDENT, **kwargs.pop("settings", {})}
    return generate(forge, sampler, settings=settings, **kwargs)


@pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.name)
def test_w0_and_no_teacher_give_forges_own_sdxl_image(forge, entry):
    base = xl(forge, entry.webui_base)[0]
    engine = forge.sd_models.model_data.sd_model
    assert type(engine).__name__ == "StableDiffusionXL" and engine.sd_checkpoint_info.model_name == STUDENT
    assert same_image(xl(forge, entry.label)[0], base)
    assert same_image(xl(forge, entry.label, teacher=TEACHER, w=0.0)[0], base)
    assert not same_image(xl(forge, entry.webui_base, seed=6)[0], base)


def test_each_teacher_call_gets_sdxls_full_conditioning_at_the_teachers_cfg(forge):
    """The teacher, another SDXL checkpoint (a second engine from Forge's loader), is evaluated once per
    guided step on the student's conditioning dict (crossattn 2048 wide, vector 2816 wide) of the prompt and
    the negative prompt, combined at the teacher's CFG scale (3; the student's is 2)."""
    from kdistpp.integrations import webui_teachers

    plain = xl(forge, "Euler Distillation++")[0]
    xl(forge, "Euler Distillation++", teacher=TEACHER, w=0.5)  # loads the teacher
    student = forge.sd_models.model_data.sd_model
    teacher = webui_teachers._forge_teacher["engine"]
    assert type(teacher).__name__ == "StableDiffusionXL"
    recorded = CfgEvaluations({STUDENT: student.forge_objects_original.unet.model.diffusion_model,
                               TEACHER: teacher.forge_objects.unet.model.diffusion_model})
    try:
        guided = xl(forge, "Euler Distillation++", teacher=TEACHER, w=0.5, guided_steps=2)[0]
    finally:
        recorded.remove()
    check_guided_evaluations(recorded.evaluations, STUDENT, TEACHER)
    assert not same_image(guided, plain)
    assert forge.sd_models.model_data.sd_model.sd_checkpoint_info.model_name == STUDENT


def evaluate(unet, args, kwargs):
    return unet(args[0].float(), args[1].float(), context=kwargs["context"].float(), y=kwargs["y"].float())


def test_a_speed_lora_student_with_its_checkpoint_as_teacher(forge):
    """An SDXL speed LoRA in the prompt is the student (Forge's Lora extension patches a clone of the UNet
    patcher); "Same checkpoint, without the prompt's LoRAs" is its teacher: each call's output is reproduced
    by the SDXL UNet evaluated directly with the checkpoint's weights (teacher calls) or the checkpoint's plus
    the LoRA's deltas computed from the file (student calls)."""
    from kdistpp.integrations.webui_teachers import SAME_CHECKPOINT

    plain = xl(forge, "Euler Distillation++", prompt=LORA_PROMPT)[0]  # loads the student and the LoRA
    engine = forge.sd_models.model_data.sd_model
    calls = webui_lora.Calls(engine.forge_objects_original.unet.model.diffusion_model)
    try:
        guided = xl(forge, "Euler Distillation++", prompt=LORA_PROMPT, teacher=SAME_CHECKPOINT, w=0.5,
                    guided_steps=2)[0]
    finally:
        calls.remove()
    refs = {k: forge.refs[k] for k in ("student", "student+lora")}
    assert webui_lora.which_weights(calls.calls, refs, evaluate) == [
        "student+lora", "student", "student+lora", "student", "student+lora", "student+lora"]
    assert all(k["context"].shape[-1] == 2048 and k["y"].shape[-1] == 2816 for _, k, _ in calls.calls)
    assert not same_image(guided, plain) and forge.sd_models.model_data.sd_model is engine


@pytest.mark.parametrize("student, teacher", [(STUDENT, "teacher"), ("student", TEACHER)], ids=["sd1-teacher",
                                                                                                  "sdxl-teacher"])
def test_a_teacher_of_the_other_family_is_refused_before_any_model_call(forge, student, teacher):
    """SD1 and SDXL differ in latents' meaning, text conditioning and UNet: either way round the teacher
    (an engine from Forge's loader) is refused, naming both, before any UNet call, and is not kept."""
    from kdistpp.integrations import webui_teachers

    xl(forge, "Euler", settings={"sd_model_checkpoint": student})
    engine = forge.sd_models.model_data.sd_model
    calls = webui_lora.Calls(engine.forge_objects_original.unet.model.diffusion_model)
    families = {STUDENT: "SDXL (text context 2048)", "student": "SD1 (text context 768)",
                TEACHER: "SDXL (text context 2048)", "teacher": "SD1 (text context 768)"}
    message = f"teacher {teacher!r} is an {families[teacher]} model but the student is an {families[student]} model"
    try:
        with pytest.raises(ValueError, match=re.escape(message)):  # Forge's API passes the error on
            forge.client.post("/sdapi/v1/txt2img", json=request(student, teacher))
    finally:
        calls.remove()
    assert calls.calls == []
    assert forge.sd_models.model_data.sd_model is engine and "engine" not in webui_teachers._forge_teacher


def request(student, teacher, guided_steps=1, **body):
    return {"prompt": "a red cube", "steps": 4, "width": 64, "height": 64, "seed": 5, "cfg_scale": 2.0,
            "sampler_name": "Euler Distillation++", "override_settings": {"sd_model_checkpoint": student},
            "alwayson_scripts": {SCRIPT: {"args": [teacher, 0.5, guided_steps, 3.0, "interpolate", "student", 0.0,
                                                   0.0]}}, **body}


class AllUNetCalls(webui_lora.Calls):
    """Every forward of any of Forge's UNets, whichever engine runs it (the refiner switch loads a new one)."""

    def __init__(self):
        from backend.nn.unet import IntegratedUNet2DConditionModel

        self.calls = []
        self.handle = torch.nn.modules.module.register_module_forward_hook(
            lambda m, a, k, out: self.record(m, a, k, out) if isinstance(m, IntegratedUNet2DConditionModel) else None,
            with_kwargs=True)


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
def test_guided_steps_before_the_refiner_switch_are_the_teachers(forge, teacher, refiner):
    from kdistpp.integrations.webui_teachers import SAME_CHECKPOINT

    same = teacher == "same"
    request = refiner_request(SAME_CHECKPOINT if same else teacher, 2, refiner)
    check_guided_steps_before_the_refiner_switch(forge, request, AllUNetCalls, which_weights, same,
                                                 refiner == REFINER_ARCH, refiner)


@pytest.mark.parametrize("teacher, refiner", REFINER_CASES, ids=["teacher", "same", "refiner-architecture"])
def test_a_guided_step_after_the_refiner_switch_is_refused(forge, teacher, refiner):
    """A third guided step would come after the switch, where the sampled model is the refiner: it is refused
    with the reason, before the teacher runs."""
    from kdistpp.integrations.webui_teachers import SAME_CHECKPOINT

    teacher = SAME_CHECKPOINT if teacher == "same" else teacher
    calls = AllUNetCalls()
    try:
        with pytest.raises(ValueError, match="a guided step comes after the refiner switch"):
            forge.client.post("/sdapi/v1/txt2img", json=refiner_request(teacher, 3, refiner))
    finally:
        calls.remove()
    expected_teacher = "student" if teacher == SAME_CHECKPOINT else "teacher"
    assert which_weights(calls.calls, forge.refs) == [
        "student", expected_teacher, "student", expected_teacher, "refiner"]

def recorded_generation(forge, **request):
    """A generation with the teacher (loaded before), its CFG evaluations recorded; returns (image, evaluations)."""
    from kdistpp.integrations import webui_teachers

    xl(forge, "Euler a Distillation++", teacher=TEACHER, w=0.5, **request)  # loads the teacher
    student = forge.sd_models.model_data.sd_model
    recorded = CfgEvaluations({
        STUDENT: student.forge_objects_original.unet.model.diffusion_model,
        TEACHER: webui_teachers._forge_teacher["engine"].forge_objects.unet.model.diffusion_model})
    try:
        image = xl(forge, "Euler a Distillation++", teacher=TEACHER, w=0.5, **request)[0]
    finally:
        recorded.remove()
    return image, recorded.evaluations


HIRES = {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 4,
         "denoising_strength": 0.6, "hr_cfg": 2.0, "hr_additional_modules": ["Use same choices"]}


def test_hires_fix(forge):
    check_hires_fix(forge, xl, recorded_generation, HIRES, STUDENT, TEACHER)


def test_img2img(forge):
    check_img2img(forge, xl, recorded_generation, STUDENT, TEACHER)
