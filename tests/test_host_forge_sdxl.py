"""SDXL students and teachers in the real Forge webui (dfdcbab), on tiny SDXL checkpoints.

tests/forge_host.py builds them from Forge's own classes (its UNet with SDXL's 2048-wide context and
2816-wide vector, CLIP-L and CLIP-G text encoders of SDXL's widths, a small VAE) and Forge's loader
makes them StableDiffusionXL engines. Each check compares with Forge's own sampler, or with the UNet
evaluated directly on a call's inputs. The tests are tests/webui_sdxl.py's, run here with Forge
(TestSdxl, given Forge by the `sdxl` fixture).
"""

from __future__ import annotations

import re

import pytest
import torch

import forge_host
import webui_lora
from webui_sdxl import STUDENT, TEACHER, SdxlWebui, SdxlWebuiTests, sdxl_host


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    def build_unet(refiner):  # Forge's own UNet class
        from backend.nn.unet import IntegratedUNet2DConditionModel

        return IntegratedUNet2DConditionModel(**(forge_host.SDXL_REFINER_UNET if refiner else forge_host.SDXL_UNET))

    return sdxl_host(forge_host, tmp_path_factory.mktemp("forge_sdxl"), "Forge", build_unet)


def student_and_teacher_unets(forge):
    """The student's UNet and the teacher's (a second StableDiffusionXL engine from Forge's loader)."""
    from kdistpp.integrations import webui_teachers

    teacher = webui_teachers._forge_teacher["engine"]
    assert type(teacher).__name__ == "StableDiffusionXL"
    return {STUDENT: forge.sd_models.model_data.sd_model.forge_objects_original.unet.model.diffusion_model,
            TEACHER: teacher.forge_objects.unet.model.diffusion_model}


def refused(forge, body, message):
    """Forge's API passes a refused request's error on: the test client raises it."""
    with pytest.raises(ValueError, match=re.escape(message)):
        forge.client.post("/sdapi/v1/txt2img", json=body)


def is_sdxl_student(forge):
    engine = forge.sd_models.model_data.sd_model
    return type(engine).__name__ == "StableDiffusionXL" and engine.sd_checkpoint_info.model_name == STUDENT


def teacher_kept(forge):
    from kdistpp.integrations import webui_teachers

    return "engine" in webui_teachers._forge_teacher


class AllUNetCalls(webui_lora.Calls):
    """Every forward of any of Forge's UNets, whichever engine runs it (the refiner switch loads a new one)."""

    def __init__(self):
        from backend.nn.unet import IntegratedUNet2DConditionModel

        self.calls = []
        self.handle = torch.nn.modules.module.register_module_forward_hook(
            lambda m, a, k, out: self.record(m, a, k, out) if isinstance(m, IntegratedUNet2DConditionModel) else None,
            with_kwargs=True)


@pytest.fixture(scope="module")
def sdxl(forge):
    return SdxlWebui(
        host=forge, current_model=lambda forge: forge.sd_models.model_data.sd_model,
        unet_of=lambda engine: engine.forge_objects_original.unet.model.diffusion_model,
        unets=student_and_teacher_unets,
        evaluate=lambda unet, args, kwargs: unet(args[0].float(), args[1].float(), context=kwargs["context"].float(),
                                                 y=kwargs["y"].float()),
        all_unet_calls=AllUNetCalls, refused=refused, is_sdxl_student=is_sdxl_student, sd1_context=768,
        hires={"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 4,
               "denoising_strength": 0.6, "hr_cfg": 2.0, "hr_additional_modules": ["Use same choices"]},
        teacher_kept=teacher_kept)


class TestSdxl(SdxlWebuiTests):
    """tests/webui_sdxl.py's tests, in this webui."""
