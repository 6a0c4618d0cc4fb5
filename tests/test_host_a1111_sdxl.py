"""SDXL students and teachers in the real A1111 webui 1.10.1, on tiny SDXL checkpoints.

tests/a1111_host.py builds real `sgm` DiffusionEngines (SDXL's model code, from the webui's own
clone) with a small UNet that keeps SDXL's conditioning: a dict of a 2048-wide cross-attention
context (CLIP-L and OpenCLIP-G hidden states side by side) and a 2816-wide vector (the pooled
OpenCLIP-G embedding and the size/crop embeddings). Each check compares with the webui's own
sampler, or with the UNet evaluated directly on a call's inputs.
"""

from __future__ import annotations

import pytest
import torch

import a1111_host
from kdistpp.registry import REGISTRY
from webui_api import generate, same_image
from webui_sdxl import CfgEvaluations, check_guided_evaluations

STUDENT, TEACHER = "xl_student", "xl_teacher"


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    shared, app = a1111_host.start(tmp_path_factory.mktemp("a1111_sdxl"), {"student": 11, "teacher": 22})
    from fastapi.testclient import TestClient
    from modules import sd_models

    a1111_host.add_sdxl_checkpoints({STUDENT: 11, TEACHER: 22})
    return type("Webui", (), {"shared": shared, "client": TestClient(app), "sd_models": sd_models})


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
