"""SDXL students and teachers in the real Forge webui (dfdcbab), on tiny SDXL checkpoints.

tests/forge_host.py builds them from Forge's own classes (its UNet with SDXL's 2048-wide context and
2816-wide vector, CLIP-L and CLIP-G text encoders of SDXL's widths, a small VAE) and Forge's loader
makes them StableDiffusionXL engines. Each check compares with Forge's own sampler, or with the UNet
evaluated directly on a call's inputs.
"""

from __future__ import annotations

import pytest

import forge_host
from kdistpp.registry import REGISTRY
from webui_api import generate, same_image
from webui_sdxl import CfgEvaluations, check_guided_evaluations

STUDENT, TEACHER = "xl_student", "xl_teacher"


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    shared, app = forge_host.start(tmp_path_factory.mktemp("forge_sdxl"), {"student": 11, "teacher": 22})
    from fastapi.testclient import TestClient
    from modules import sd_models

    forge_host.add_sdxl_checkpoints({STUDENT: 11, TEACHER: 22})
    return type("Forge", (), {"shared": shared, "client": TestClient(app), "sd_models": sd_models})


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
