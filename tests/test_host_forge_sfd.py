"""An SFD LoRA student exported by kdistpp, loaded by the real Forge webui through `<lora:name:1>`.

The teacher is one of the harness's SD1.5-format checkpoints (made with Forge's own module classes);
kdistpp's student is a diffusers UNet holding the same weights (read through kdistpp's ldm key map)
with LoRA adapters, and `kdistpp.sfd.export.save_lora` writes it into Forge's models/Lora. A generation
with `<lora:sfd:1>` in the prompt runs Forge's own LoRA loading and sampler; every UNet call it makes
is then compared with kdistpp's student evaluated on the call's inputs: the same output to float32
rounding, and clearly not the teacher's. `.ci/run` runs this file in .venv-forge (which holds diffusers
and peft).
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
