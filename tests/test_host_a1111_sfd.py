"""An SFD LoRA student exported by kdistpp, in the real A1111 webui 1.10.1 through `<lora:name:1>`: alone, and
with its teacher (the same checkpoint without the LoRA) in the webui's "Euler Distillation++" sampler.

The teacher is one of the harness's SD1-format checkpoints (Stability's ldm UNet, attention on the first
level only, so the up path's upsampler sits in slot 1, not 2). The checks are tests/webui_sfd.py's.
`.ci/run` runs this file in .venv-a1111 (with diffusers and peft added).
"""

from __future__ import annotations

import pytest

import a1111_host
import webui_sfd

ARCHITECTURE = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=a1111_host.CONTEXT,
                    attention_head_dim=2, norm_num_groups=32)


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    shared, app = a1111_host.start(tmp_path_factory.mktemp("a1111_sfd"), {webui_sfd.TEACHER: 41})
    return webui_sfd.host_with_exported_student(
        shared, app, a1111_host._started["models"] / f"{webui_sfd.TEACHER}.safetensors", ARCHITECTURE,
        lambda: shared.sd_model.model.diffusion_model,
        targets=("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in"))


def test_the_webuis_lora_extension_runs_the_exported_student(webui):
    webui_sfd.check_the_lora_runs_the_exported_student(webui)


def test_euler_distillation_pp_runs_the_exported_student_with_the_checkpoint_as_teacher(webui):
    webui_sfd.check_distpp_with_the_same_checkpoint_as_teacher(webui)
