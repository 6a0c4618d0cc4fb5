"""Tiny random-weight models built by ComfyUI itself, for tests in the real host: SD1.5-family UNets
and rectified-flow (CONST) transformers, Flux, SD3, Wan 2.1 T2V, Qwen-Image, Lumina 2, Z-Image,
Chroma and HiDream, from `comfy.supported_models`.

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


# The smallest configs ComfyUI's own classes accept: one double and one single block of width 32 (Flux,
# RoPE axes summing to the head width); one joint block of width 64 (SD3: MMDiT's width is 64 * depth).
FLUX = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 8, "context_in_dim": CONTEXT,
        "hidden_size": 32, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
        "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
        "txt_ids_dims": []}
SD3 = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 1, "input_size": None, "adm_in_channels": 8,
       "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": CONTEXT, "out_features": 64}},
       "num_patches": 64, "pos_embed_max_size": 8, "pos_embed_scaling_factor": None, "x_block_self_attn_layers": []}
# Wan 2.1 text-to-video (the architecture of Wan 2.2 A14B's two experts as well): one block of width 32,
# two heads (RoPE axes 8 + 4 + 4 = the head width); video latents are 5-D: (batch, 16, frames, h, w).
WAN = {"image_model": "wan2.1", "model_type": "t2v", "in_dim": 16, "out_dim": 16, "dim": 32, "ffn_dim": 64,
       "freq_dim": 32, "text_dim": CONTEXT, "num_heads": 2, "num_layers": 1}
WAN_LATENT = (1, 16, 2, 8, 8)
# Qwen-Image: one double-stream block of width 32 (two heads of 16 = RoPE axes 4 + 6 + 6), 2x2 patches of
# its 16-channel Wan 2.1 latent (64 input features); ComfyUI gives it 5-D latents (batch, 16, 1, h, w).
QWEN_IMAGE = {"image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 1,
              "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": CONTEXT,
              "pooled_projection_dim": 8, "axes_dims_rope": [4, 6, 6]}
# Lumina 2 (NextDiT): one refiner and one main block of width 32, two heads (RoPE axes 4 + 6 + 6).
LUMINA2 = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 32, "cap_feat_dim": CONTEXT,
           "n_layers": 1, "n_refiner_layers": 1, "qk_norm": True, "n_heads": 2, "n_kv_heads": 2, "multiple_of": 16,
           "ffn_dim_multiplier": 4.0, "axes_dims": [4, 6, 6], "axes_lens": [300, 512, 512], "rope_theta": 10000.0}
# Z-Image (NextDiT with Z-Image's modulation, timestep scale and pad tokens): its modulation takes a 256-wide
# timestep embedding, so the width is 256 (eight heads of 32 = RoPE axes 8 + 12 + 12), one block of each kind
# and a narrow feed-forward (128; the real model's is 8/3 of its width) to keep it quick on CPU.
Z_IMAGE = {**LUMINA2, "dim": 256, "n_heads": 8, "n_kv_heads": 8, "ffn_dim_multiplier": 0.5,
           "axes_dims": [8, 12, 12], "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "z_image_modulation": True,
           "time_scale": 1000.0, "pad_tokens_multiple": 32}
# Chroma (Flux's blocks without their modulation layers: one Approximator MLP gives every block's modulation
# from the timestep, guidance and a block index; Flux's 2x2-patched 64 features in and out).
CHROMA = {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": CONTEXT, "hidden_size": 32,
          "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [4, 6, 6],
          "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 32, "hidden_dim": 32,
          "n_layers": 1, "txt_ids_dims": [], "vec_in_dim": 8}
# HiDream (HiDreamImageTransformer2DModel): one double- and one single-stream block of width 32 (two heads of
# 16 = RoPE axes 8 + 4 + 4), each with two routed experts (one active) and a shared one; each block reads its
# own layer of the Llama-3 hidden states (`conditioning_llama3`: batch, layers, tokens, LLAMA) besides T5's.
LLAMA = 24
HIDREAM = {"image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 1,
           "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
           "caption_channels": [CONTEXT, LLAMA], "text_emb_dim": 8, "num_routed_experts": 2,
           "num_activated_experts": 1, "axes_dims_rope": [8, 4, 4], "max_resolution": [8, 8], "llama_layers": [0, 1]}
POOLED = 8  # Flux and SD3 take a pooled text vector (`pooled_output` in the conditioning) of this width
FLOW_LATENT = (1, 16, 8, 8)


def tiny_flow(comfy, family: str, seed: int):
    """A ModelPatcher around ComfyUI's Flux, SD3, Wan 2.1 T2V, Qwen-Image, Lumina 2, Z-Image, Chroma or
    HiDream BaseModel (CONST model sampling: ModelSamplingFlux for Flux, Qwen-Image and Chroma,
    ModelSamplingDiscreteFlow with shift 3 / 8 / 6 / 3 / 1 for SD3, Wan, Lumina 2, Z-Image and HiDream)
    with a tiny transformer and seeded weights (CPU, float32)."""
    supported, unet = {"flux": (comfy.supported_models.Flux, FLUX), "sd3": (comfy.supported_models.SD3, SD3),
                       "wan21": (comfy.supported_models.WAN21_T2V, WAN),
                       "qwen_image": (comfy.supported_models.QwenImage, QWEN_IMAGE),
                       "lumina2": (comfy.supported_models.Lumina2, LUMINA2),
                       "z_image": (comfy.supported_models.ZImage, Z_IMAGE),
                       "chroma": (comfy.supported_models.Chroma, CHROMA),
                       "hidream": (comfy.supported_models.HiDream, HIDREAM)}[family]
    config = supported({**unet, "dtype": torch.float32})
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    fill(model.diffusion_model, seed)
    if family == "sd3":  # a checkpoint's buffer, left uninitialised by ComfyUI
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            model.diffusion_model.pos_embed.copy_(0.1 * torch.randn(model.diffusion_model.pos_embed.shape, generator=g))
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def flow_conditioning(seed: int, batch: int = 1, family: str | None = None):
    """Conditioning for `tiny_flow`: text tokens and the pooled vector Flux and SD3 take (and, for
    HiDream, the Llama-3 hidden states of its two blocks)."""
    g = torch.Generator().manual_seed(seed)
    cond = [[torch.randn(batch, 7, CONTEXT, generator=g), {"pooled_output": torch.randn(batch, POOLED, generator=g)}]]
    if family == "hidream":
        cond[0][1]["conditioning_llama3"] = torch.randn(batch, len(HIDREAM["llama_layers"]), 5, LLAMA, generator=g)
    return cond


def lora_clone(comfy, base, seed: int, strength: float = 1.0):
    """A LoRA student the way LoraLoader makes one (`comfy.sd.load_lora_for_models`): a clone of
    `base` whose attention projections carry a rank-2 kohya-format LoRA (SD1.5's `attn1`/`attn2`,
    SD3's joint blocks' `attn`, Flux's double blocks' `img_attn`/`txt_attn`)."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name, p in base.model.diffusion_model.named_parameters():
        if p.ndim == 2 and name.endswith(".weight") and (".attn" in name or "_attn." in name):
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


# LTX-2 (LTXAV): video and audio in one transformer, one block of width 32 for the video (two heads of 16)
# and 16 for the audio (two of 8); its latents are 128-channel video and 8-channel x 16-bin audio, which
# ComfyUI samples together as one packed latent (`comfy.nested_tensor`, `latent_shapes`).
LTXAV = {"image_model": "ltxav", "in_channels": 128, "audio_in_channels": 128, "cross_attention_dim": 32,
         "audio_cross_attention_dim": 16, "attention_head_dim": 16, "audio_attention_head_dim": 8,
         "num_attention_heads": 2, "audio_num_attention_heads": 2, "caption_channels": 16, "num_layers": 1}
LTXAV_VIDEO, LTXAV_AUDIO = (1, 128, 2, 4, 4), (1, 8, 5, 16)


def tiny_ltxav(comfy, seed: int):
    """A ModelPatcher around ComfyUI's LTX-2 audio-video BaseModel (CONST model sampling) with a tiny
    transformer and seeded weights (CPU, float32); its text context is CONTEXT wide (video and audio halves)."""
    config = comfy.supported_models.LTXAV({**LTXAV, "dtype": torch.float32})
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    fill(model.diffusion_model, seed)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))
