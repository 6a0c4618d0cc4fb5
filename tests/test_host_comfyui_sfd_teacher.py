"""A whole SD 1.x checkpoint file (UNet, CLIP and VAE) as the SFD command's teacher, with the VAE in the
layout ComfyUI's own diffusers-to-checkpoint map writes.

The checkpoint holds the tiny pipeline of tests/test_sfd_cli.py with a 4-level VAE (the depth of SD's, which
ComfyUI's map assumes): its UNet under kdistpp's ldm map, its CLIP under
`cond_stage_model.transformer.text_model.`, and its VAE as `first_stage_model.` plus
`comfy.diffusers_convert.convert_vae_state_dict` (what ComfyUI's VAE loader applies to a diffusers-format
VAE). The config folder holds no weights at all, so `kdistpp.sfd.teacher` must take every component from
the file: through diffusers' single-file loading they equal the folder pipeline's. Runs in .venv-comfyui;
elsewhere it skips.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from hosts import import_comfy

diffusers = pytest.importorskip("diffusers")

from test_sfd_cli import config_folder, ldm_checkpoint, teacher_dir  # noqa: E402,F401  (teacher_dir: a fixture)


def test_a_checkpoint_holding_unet_clip_and_vae_gives_the_folders_pipeline(teacher_dir, tmp_path):  # noqa: F811
    import_comfy()
    from safetensors.torch import load_file, save_file

    import comfy.diffusers_convert

    from kdistpp.sfd.teacher import check_teacher, load_pipeline

    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dir, teacher)
    shutil.rmtree(teacher / "vae")
    torch.manual_seed(1)
    diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,) * 4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=1, norm_num_groups=8, sample_size=64).save_pretrained(str(teacher / "vae"))
    state = load_file(str(ldm_checkpoint(teacher, tmp_path / "unet_clip.safetensors")))
    vae = diffusers.AutoencoderKL.from_pretrained(str(teacher / "vae")).state_dict()
    for key, value in comfy.diffusers_convert.convert_vae_state_dict(vae).items():
        state[f"first_stage_model.{key}"] = value.contiguous()
    save_file(state, str(tmp_path / "sd15_full.safetensors"))
    configs = config_folder(teacher, tmp_path / "configs", ("unet", "text_encoder", "vae"))

    ours = load_pipeline(check_teacher(str(tmp_path / "sd15_full.safetensors"), str(configs)))
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(str(teacher))
    for component in ("unet", "text_encoder", "vae"):
        a, b = getattr(ours, component).state_dict(), getattr(theirs, component).state_dict()
        assert set(a) == set(b), component
        for key in b:
            assert torch.equal(a[key], b[key]), (component, key)
