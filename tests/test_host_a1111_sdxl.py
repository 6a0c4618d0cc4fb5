"""SDXL students and teachers in the real A1111 webui 1.10.1, on tiny SDXL checkpoints.

tests/a1111_host.py builds real `sgm` DiffusionEngines (SDXL's model code, from the webui's own
clone) with a small UNet that keeps SDXL's conditioning: a dict of a 2048-wide cross-attention
context (CLIP-L and OpenCLIP-G hidden states side by side) and a 2816-wide vector (the pooled
OpenCLIP-G embedding and the size/crop embeddings). Each check compares with the webui's own
sampler, or with the UNet evaluated directly on a call's inputs. The tests are tests/webui_sdxl.py's,
run here with this webui (TestSdxl, given the webui by the `sdxl` fixture).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import a1111_host
import webui_lora
from webui_sdxl import STUDENT, TEACHER, SdxlWebui, SdxlWebuiTests, sdxl_host


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    def build_unet(refiner):  # sgm's UNetModel, from the webui's SDXL config
        from sgm.util import instantiate_from_config

        return instantiate_from_config(a1111_host.sdxl_config(Path("unused"), refiner)["model"]["params"]
                                       ["network_config"])

    return sdxl_host(a1111_host, tmp_path_factory.mktemp("a1111_sdxl"), "Webui", build_unet)


def refused(webui, body, message):
    """The webui answers a refused request with 500 and the error's message."""
    response = webui.client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 500
    assert message in response.text, response.text[:2000]


class AllUNetCalls(webui_lora.Calls):
    """Every forward of any SDXL UNet (sgm's UNetModel), whichever cached model object runs it: at the refiner
    switch the webui may load the refiner into a cached model's object."""

    def __init__(self):
        from sgm.modules.diffusionmodules.openaimodel import UNetModel

        self.calls = []
        self.handle = torch.nn.modules.module.register_module_forward_hook(
            lambda m, a, k, out: self.record(m, a, k, out) if isinstance(m, UNetModel) else None, with_kwargs=True)


@pytest.fixture(scope="module")
def sdxl(webui):
    return SdxlWebui(
        host=webui, current_model=lambda webui: webui.shared.sd_model,
        unet_of=lambda model: model.model.diffusion_model,
        unets=lambda webui: {name: a1111_host.model_named(webui, name).model.diffusion_model for name in (STUDENT, TEACHER)},
        evaluate=lambda unet, args, kwargs: unet(*args, **kwargs), all_unet_calls=AllUNetCalls, refused=refused,
        is_sdxl_student=lambda webui: webui.shared.sd_model.is_sdxl, sd1_context=32,
        hires={"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 4,
               "denoising_strength": 0.6})


class TestSdxl(SdxlWebuiTests):
    """tests/webui_sdxl.py's tests, in this webui."""
