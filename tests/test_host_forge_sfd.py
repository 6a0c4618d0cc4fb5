"""An SFD LoRA student exported by kdistpp, loaded by the real Forge webui through `<lora:name:1>`.

The teacher is one of the harness's SD1.5-format checkpoints (made with Forge's own module classes);
kdistpp's student is a diffusers UNet holding the same weights (read through kdistpp's ldm key map)
with LoRA adapters, and `kdistpp.sfd.export.save_lora` writes it into Forge's models/Lora. A generation
with `<lora:sfd:1>` in the prompt runs Forge's own LoRA loading and sampler; every UNet call it makes
is then compared with kdistpp's student evaluated on the call's inputs: the same output to float32
rounding, and clearly not the teacher's. The same for an SD3 checkpoint (Forge's MMDiT) and a diffusers SD3
student holding its weights (converted by diffusers' single-file map), exported in kohya's SD3 format, the
one Forge maps. `.ci/run` runs this file in .venv-forge (which holds diffusers and peft).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import forge_host
import webui_lora

TEACHER = "sfd_teacher"


def diffusers_unet_from_checkpoint(checkpoint: Path):
    """The checkpoint's UNet as a diffusers UNet2DConditionModel of the same (one-level SD1.5) architecture."""
    import diffusers

    from kdistpp.sfd.export import ldm_unet_path

    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(320,),
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=768, attention_head_dim=8)
    ldm = webui_lora.unet_state(checkpoint)
    state = {}
    for name in unet.state_dict():
        module, param = name.rsplit(".", 1)
        state[name] = ldm.pop(f"{ldm_unet_path(module, unet.config)}.{param}")
    assert not ldm, sorted(ldm)[:5]  # every checkpoint weight found its diffusers place
    unet.load_state_dict(state)
    return unet.eval()


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    shared, app = forge_host.start(tmp_path_factory.mktemp("forge_sfd"), {TEACHER: 31})
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    import diffusers
    from fastapi.testclient import TestClient
    from modules import extra_networks, script_callbacks, sd_models

    from kdistpp.sfd.export import save_lora
    from kdistpp.sfd.lora import add_lora
    from kdistpp.sfd.networks import UNetStudent

    if "lora" not in extra_networks.extra_network_registry:
        script_callbacks.before_ui_callback()  # as Forge's api_only() does: the Lora extension registers here
    unet = diffusers_unet_from_checkpoint(forge_host._started["models"] / f"{TEACHER}.safetensors")
    scheduler = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    student = UNetStudent(add_lora(unet, rank=4, alpha=2.0), scheduler)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # adapters as after training: far from peft's zero start
        for name, p in student.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / p.shape[-1] ** 0.5))
    save_lora(student, Path(shared.cmd_opts.lora_dir) / "sfd.safetensors")
    return type("Forge", (), {"client": TestClient(app), "sd_models": sd_models, "student": student})


def test_forges_lora_loader_runs_the_exported_student(forge):
    from kdistpp.sfd.lora import adapters_disabled

    body = {"prompt": "a red cube <lora:sfd:1>", "steps": 2, "width": 64, "height": 64, "seed": 5,
            "sampler_name": "Euler", "cfg_scale": 1.0, "override_settings": {"sd_model_checkpoint": TEACHER}}
    assert forge.client.post("/sdapi/v1/txt2img", json=body).status_code == 200  # loads the checkpoint and LoRA
    unet_model = forge.sd_models.model_data.sd_model.forge_objects_original.unet.model
    calls = webui_lora.Calls(unet_model.diffusion_model)
    try:
        response = forge.client.post("/sdapi/v1/txt2img", json=body)
    finally:
        calls.remove()
    assert response.status_code == 200, response.text[:2000]
    assert len(calls.calls) == 2  # cfg 1: one conditional call per step
    unet = forge.student.unet
    with torch.no_grad():
        for args, kwargs, output in calls.calls:
            inputs = (args[0].float(), args[1].float())
            context = kwargs["context"].float()
            ours = unet(*inputs, encoder_hidden_states=context).sample
            with adapters_disabled(unet):
                teacher = unet(*inputs, encoder_hidden_states=context).sample
            scale = float(output.float().abs().max())
            assert float((ours - output.float()).abs().max()) <= 1e-3 * scale
            assert float((teacher - output.float()).abs().max()) > 1e-2 * scale  # the LoRA was applied


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
