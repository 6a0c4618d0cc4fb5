"""Tiny random-weight SD1.5-family models built by ComfyUI itself, for tests in the real host.

ComfyUI's layers skip weight initialisation, so the weights are filled here from a seed. A LoRA
student is `base.clone()` plus `add_patches`, exactly what ComfyUI's LoraLoader does.
"""

from __future__ import annotations

import torch

from hosts import fill

UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
        "transformer_depth": [1, 0], "channel_mult": [1, 2], "transformer_depth_middle": 1,
        "use_linear_in_transformer": False, "context_dim": 32, "num_heads": 2,
        "transformer_depth_output": [1, 1, 0, 0], "use_temporal_attention": False, "use_temporal_resblock": False}
CONTEXT = 32


def tiny_sd15(comfy, seed: int, latent_format=None):
    """A ModelPatcher around a BaseModel with a small SD1.5 UNet and seeded weights (CPU, float32)."""
    config = comfy.supported_models.SD15({**UNET, "dtype": torch.float32})
    config.set_inference_dtype(torch.float32, None)
    if latent_format is not None:
        config.latent_format = latent_format
    model = config.get_model({}, device=torch.device("cpu"))
    fill(model.diffusion_model, seed)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def lora_clone(comfy, base, seed: int, strength: float = 1.0):
    """A LoRA student the way LoraLoader makes one (`comfy.sd.load_lora_for_models`): a clone of
    `base` whose attention projections carry a rank-2 kohya-format LoRA."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name, p in base.model.diffusion_model.named_parameters():
        if p.ndim == 2 and name.endswith(".weight") and ".attn" in name:
            key = "lora_unet_" + name[: -len(".weight")].replace(".", "_")
            lora[f"{key}.lora_up.weight"] = torch.randn(p.shape[0], 2, generator=g) * 0.5
            lora[f"{key}.lora_down.weight"] = torch.randn(2, p.shape[1], generator=g) * 0.5
            lora[f"{key}.alpha"] = torch.tensor(2.0)
    assert lora
    student, _ = comfy.sd.load_lora_for_models(base, None, lora, strength, 0.0)
    assert len(student.patches) == len(lora) // 3
    return student


def tiny_controlnet(comfy, seed: int):
    """A ControlNet for `tiny_sd15`, built as ComfyUI's ControlNet loader builds one: its `cldm`
    network (the UNet's config without the output channels, an RGB hint) wrapped in
    `comfy.controlnet.ControlNet`, whose own ModelPatcher is what sampling loads."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    config = {k: v for k, v in UNET.items() if k != "out_channels"}
    network = comfy.cldm.cldm.ControlNet(**config, hint_channels=3, dtype=torch.float32, device=torch.device("cpu"),
                                         operations=comfy.ops.disable_weight_init)
    fill(network, seed)
    return comfy.controlnet.ControlNet(network, load_device=comfy.model_management.get_torch_device())


def controlled(comfy, control_net, positive, negative, strength: float = 1.0):
    """Conditioning with the ControlNet applied, by ComfyUI's ControlNetApplyAdvanced node (a grey hint)."""
    import nodes

    hint = torch.full((1, 64, 64, 3), 0.5)
    return nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control_net, hint, strength, 0.0, 1.0)


def conditioning(seed: int, batch: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, 7, CONTEXT, generator=g), {}]]
