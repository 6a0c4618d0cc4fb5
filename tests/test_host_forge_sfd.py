"""An SFD LoRA student exported by kdistpp, in the real Forge webui through `<lora:name:1>`: alone, and with its
teacher (the same checkpoint without the LoRA) in Forge's "Euler Distillation++" sampler.

The teacher is one of the harness's SD1.5-format checkpoints (made with Forge's own module classes). The
checks are tests/webui_sfd.py's. `.ci/run` runs this file in .venv-forge (which holds diffusers and peft).
"""

from __future__ import annotations

import pytest

import forge_host
import webui_sfd

ARCHITECTURE = dict(block_out_channels=(320,), down_block_types=("CrossAttnDownBlock2D",),
                    up_block_types=("CrossAttnUpBlock2D",), cross_attention_dim=768, attention_head_dim=8)


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    shared, app = forge_host.start(tmp_path_factory.mktemp("forge_sfd"), {webui_sfd.TEACHER: 31})
    from modules import sd_models

    # the UNet module both the LoRA clone and the checkpoint's own patcher evaluate (Forge merges the patches)
    return webui_sfd.host_with_exported_student(
        shared, app, forge_host._started["models"] / f"{webui_sfd.TEACHER}.safetensors", ARCHITECTURE,
        lambda: sd_models.model_data.sd_model.forge_objects_original.unet.model.diffusion_model)


def test_forges_lora_loader_runs_the_exported_student(forge):
    webui_sfd.check_the_lora_runs_the_exported_student(forge)


def test_euler_distillation_pp_runs_the_exported_student_with_the_checkpoint_as_teacher(forge):
    webui_sfd.check_distpp_with_the_same_checkpoint_as_teacher(forge)
