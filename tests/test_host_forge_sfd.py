"""An SFD LoRA student exported by kdistpp, in the real Forge webui through `<lora:name:1>`: alone, and with its
teacher (the same checkpoint without the LoRA) in Forge's "Euler Distillation++" sampler.

The teacher is one of the harness's SD1.5-format checkpoints (made with Forge's own module classes). The
checks are tests/webui_sfd.py's. The same for an SD3 checkpoint (Forge's MMDiT) and a diffusers SD3
student holding its weights (converted by diffusers' single-file map), exported in kohya's SD3 format, the
one Forge maps. `.ci/run` runs this file in .venv-forge (which holds diffusers and peft).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import forge_host
import webui_lora
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


SD3_TEACHER = "sfd_sd3_teacher"
SD3_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "ff.net.0.proj",
               "ff.net.2", "norm1.linear", "norm1_context.linear")


def diffusers_sd3_from_checkpoint(checkpoint: Path):
    """The checkpoint's MMDiT as a diffusers SD3Transformer2DModel (forge_host.MMDIT's sizes), its weights
    converted by diffusers' own single-file map."""
    import diffusers
    import safetensors.torch
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    mmdit = forge_host.MMDIT
    state = {k: v.float() for k, v in safetensors.torch.load_file(str(checkpoint)).items()
             if k.startswith("model.diffusion_model.")}
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=mmdit["patch_size"], in_channels=mmdit["in_channels"],
        out_channels=mmdit["out_channels"], num_layers=mmdit["depth"], attention_head_dim=64,
        num_attention_heads=mmdit["depth"],
        joint_attention_dim=mmdit["context_embedder_config"]["params"]["in_features"],
        caption_projection_dim=64 * mmdit["depth"], pooled_projection_dim=mmdit["adm_in_channels"],
        pos_embed_max_size=mmdit["pos_embed_max_size"])
    transformer.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(state))  # strict: every weight
    return transformer.eval()


@pytest.fixture(scope="module")
def forge_sd3(tmp_path_factory):
    shared, app = forge_host.start_flow(tmp_path_factory.mktemp("forge_sfd_sd3"), {SD3_TEACHER: ("sd3", 88)})
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from fastapi.testclient import TestClient
    from modules import extra_networks, script_callbacks, sd_models

    from kdistpp.sfd.export import save_lora
    from kdistpp.sfd.lora import add_lora
    from kdistpp.sfd.networks import FlowTransformerStudent

    if "lora" not in extra_networks.extra_network_registry:
        script_callbacks.before_ui_callback()
    transformer = diffusers_sd3_from_checkpoint(forge_host._started["models"] / f"{SD3_TEACHER}.safetensors")
    student = FlowTransformerStudent(add_lora(transformer, rank=4, alpha=2.0, target_modules=SD3_TARGETS))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # adapters as after training: far from peft's zero start
        for name, p in student.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / p.shape[-1] ** 0.5))
    lora_dir = Path(shared.cmd_opts.lora_dir)
    save_lora(student, lora_dir / "sfd_sd3.safetensors", format="kohya")
    save_lora(student, lora_dir / "sfd_sd3_diffusers.safetensors")
    return type("Forge", (), {"client": TestClient(app), "sd_models": sd_models, "transformer": transformer})


def sd3_calls(forge, lora):
    """Every MMDiT call of a 2-step Euler generation at CFG 1 with `<lora:{lora}:1>` on the SD3 teacher."""
    body = {"prompt": f"a red cube <lora:{lora}:1>", "steps": 2, "width": 64, "height": 64, "seed": 5,
            "sampler_name": "Euler", "cfg_scale": 1.0, "override_settings": {"sd_model_checkpoint": SD3_TEACHER}}
    assert forge.client.post("/sdapi/v1/txt2img", json=body).status_code == 200  # loads the checkpoint and LoRA
    calls = webui_lora.Calls(forge.sd_models.model_data.sd_model.forge_objects_original.unet.model.diffusion_model)
    try:
        response = forge.client.post("/sdapi/v1/txt2img", json=body)
    finally:
        calls.remove()
    assert response.status_code == 200, response.text[:2000]
    assert len(calls.calls) == 2  # cfg 1: one conditional call per step
    return calls.calls


def sd3_errors(forge, calls):
    """Per call: (largest difference from the student, from the teacher, largest output), on the call's inputs."""
    from kdistpp.sfd.lora import adapters_disabled

    transformer, errors = forge.transformer, []
    with torch.no_grad():
        for args, kwargs, output in calls:
            inputs = dict(hidden_states=args[0].float(), timestep=args[1].float(),
                          encoder_hidden_states=kwargs["context"].float(), pooled_projections=kwargs["y"].float())
            ours = transformer(**inputs).sample
            with adapters_disabled(transformer):
                teacher = transformer(**inputs).sample
            output = output.float()
            errors.append((float((ours - output).abs().max()), float((teacher - output).abs().max()),
                           float(output.abs().max())))
    return errors


def test_forges_lora_loader_runs_the_exported_sd3_student_in_kohyas_format(forge_sd3):
    """`<lora:sfd_sd3:1>` (the kohya-format file, fused qkv) on the SD3 checkpoint: every MMDiT call of
    Forge's generation is the student's on the call's inputs (timestep 1000 s), and not the teacher's."""
    for student, teacher, scale in sd3_errors(forge_sd3, sd3_calls(forge_sd3, "sfd_sd3")):
        assert student <= 1e-5 * scale, (student, teacher, scale)  # float32 rounding
        assert teacher > 1e-2 * scale, (student, teacher, scale)  # the LoRA was applied


def test_forge_maps_no_diffusers_sd3_lora_names(forge_sd3):
    """The diffusers-format SD3 file (diffusers' loader's) loads nothing in Forge: its generation is the
    teacher's, which is why Forge needs the kohya format."""
    for student, teacher, scale in sd3_errors(forge_sd3, sd3_calls(forge_sd3, "sfd_sd3_diffusers")):
        assert teacher <= 1e-5 * scale and student > 1e-2 * scale, (student, teacher, scale)
