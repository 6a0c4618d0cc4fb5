"""An SFD LoRA student exported by kdistpp, loaded by the real A1111 webui 1.10.1 through `<lora:name:1>`.

The teacher is one of the harness's SD1-format checkpoints (Stability's ldm UNet, attention on the first
level only, so the up path's upsampler sits in slot 1, not 2); kdistpp's student is a diffusers UNet
holding the same weights (read through kdistpp's ldm key map) with LoRA adapters, written by
`kdistpp.sfd.export.save_lora` into the webui's models/Lora. A generation with `<lora:sfd:1>` runs the
webui's own Lora extension and sampler; each UNet call it makes is compared with kdistpp's student on
the call's inputs. `.ci/run` runs this file in .venv-a1111 (with diffusers and peft added).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import a1111_host
import webui_lora

TEACHER = "sfd_teacher"


def diffusers_unet_from_checkpoint(checkpoint: Path):
    """The checkpoint's UNet as a diffusers UNet2DConditionModel of the harness's architecture."""
    import diffusers

    from kdistpp.sfd.export import ldm_unet_path

    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=a1111_host.CONTEXT, attention_head_dim=2, norm_num_groups=32)
    ldm = webui_lora.unet_state(checkpoint)
    state = {}
    for name in unet.state_dict():
        module, param = name.rsplit(".", 1)
        state[name] = ldm.pop(f"{ldm_unet_path(module, unet.config)}.{param}")
    assert not ldm, sorted(ldm)[:5]  # every checkpoint weight found its diffusers place
    unet.load_state_dict(state)
    return unet.eval()


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    shared, app = a1111_host.start(tmp_path_factory.mktemp("a1111_sfd"), {TEACHER: 41})
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    import diffusers
    from fastapi.testclient import TestClient
    from modules import extra_networks, script_callbacks

    from kdistpp.sfd.export import save_lora
    from kdistpp.sfd.lora import add_lora
    from kdistpp.sfd.networks import UNetStudent

    if "lora" not in extra_networks.extra_network_registry:
        script_callbacks.before_ui_callback()  # as the webui's api_only() does: the Lora extension registers here
    unet = diffusers_unet_from_checkpoint(a1111_host._started["models"] / f"{TEACHER}.safetensors")
    scheduler = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    student = UNetStudent(add_lora(unet, rank=4, alpha=2.0, target_modules=(
        "to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in")), scheduler)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # adapters as after training: far from peft's zero start
        for name, p in student.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / p[0].numel() ** 0.5))
    save_lora(student, Path(shared.cmd_opts.lora_dir) / "sfd.safetensors")
    return type("Webui", (), {"shared": shared, "client": TestClient(app), "student": student})


def test_the_webuis_lora_extension_runs_the_exported_student(webui):
    from kdistpp.sfd.lora import adapters_disabled

    body = {"prompt": "a red cube <lora:sfd:1>", "steps": 2, "width": 64, "height": 64, "seed": 5,
            "sampler_name": "Euler", "cfg_scale": 1.0, "override_settings": {"sd_model_checkpoint": TEACHER}}
    assert webui.client.post("/sdapi/v1/txt2img", json=body).status_code == 200  # loads the checkpoint and LoRA
    calls = webui_lora.Calls(webui.shared.sd_model.model.diffusion_model)
    try:
        response = webui.client.post("/sdapi/v1/txt2img", json=body)
    finally:
        calls.remove()
    assert response.status_code == 200, response.text[:2000]
    assert calls.calls  # the webui's UNet ran
    unet = webui.student.unet
    with torch.no_grad():
        for args, kwargs, output in calls.calls:
            x, t = args[0].float(), args[1].float()
            context = (kwargs["context"] if "context" in kwargs else args[2]).float()
            ours = unet(x, t, encoder_hidden_states=context).sample
            with adapters_disabled(unet):
                teacher = unet(x, t, encoder_hidden_states=context).sample
            scale = float(output.float().abs().max())
            assert float((ours - output.float()).abs().max()) <= 1e-3 * scale
            assert float((teacher - output.float()).abs().max()) > 1e-2 * scale  # the LoRA was applied
