"""The exported SFD student: the kohya LoRA file loaded by diffusers' own LoRA loader, the merged full
weights loaded by from_pretrained, SD3's MMDiT names, and the refusals (no adapters; an SFD-v step
embedding; a kohya SD3 file for another network or a module MMDiT has no LoRA name for)."""

from __future__ import annotations

import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from kdistpp.sfd.export import ldm_unet_path, save_full, save_lora  # noqa: E402
from kdistpp.sfd.lora import add_lora  # noqa: E402
from kdistpp.sfd.networks import UNetStudent  # noqa: E402

CONTEXT = 32
SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def tiny_unet():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CONTEXT, attention_head_dim=8, norm_num_groups=32)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    return unet.eval()


def trained_lora_student(alpha=8.0, step_conditioned=False):
    """A LoRA student whose adapters are far from zero (as after training), with alpha != rank."""
    unet = tiny_unet()
    student = UNetStudent(add_lora(copy.deepcopy(unet), rank=4, alpha=alpha), diffusers.DDPMScheduler(**SCHEDULE),
                          step_conditioned=step_conditioned)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return student, unet


def inputs():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g) * 3.0
    return x, torch.full((2,), 3.0), {"encoder_hidden_states": torch.randn(2, 5, CONTEXT, generator=g)}


def test_diffusers_lora_loader_reads_the_exported_file_as_the_student(tmp_path):
    student, unet = trained_lora_student()
    path = save_lora(student, tmp_path / "student.safetensors")
    state_dict, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(path), unet_config=unet.config)
    diffusers.StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, unet, adapter_name="sfd")
    x, sigma, cond = inputs()
    with torch.no_grad():
        ours = student(x, sigma, cond)
        theirs = UNetStudent(unet, diffusers.DDPMScheduler(**SCHEDULE))(x, sigma, cond)
        plain = UNetStudent(tiny_unet(), diffusers.DDPMScheduler(**SCHEDULE))(x, sigma, cond)
    assert float((ours - plain).abs().max()) > 1e-2  # the adapters matter
    assert torch.allclose(theirs, ours, atol=1e-5, rtol=1e-5)


def test_full_export_is_the_merged_student(tmp_path):
    student, _ = trained_lora_student()
    folder = save_full(student, tmp_path / "unet")
    merged = diffusers.UNet2DConditionModel.from_pretrained(str(folder)).eval()
    x, sigma, cond = inputs()
    with torch.no_grad():
        assert torch.allclose(UNetStudent(merged, diffusers.DDPMScheduler(**SCHEDULE))(x, sigma, cond),
                              student(x, sigma, cond), atol=1e-5, rtol=1e-5)


def test_ldm_paths_of_the_sd15_layout():
    class SD15:
        layers_per_block = 2
        down_block_types = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
        up_block_types = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3

    # known SD1.5 correspondences (the original repository's layout)
    assert ldm_unet_path("down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q", SD15) == \
        "input_blocks.2.1.transformer_blocks.0.attn1.to_q"
    assert ldm_unet_path("down_blocks.2.downsamplers.0.conv", SD15) == "input_blocks.9.0.op"
    assert ldm_unet_path("down_blocks.3.resnets.1.conv2", SD15) == "input_blocks.11.0.out_layers.3"
    assert ldm_unet_path("mid_block.resnets.1.time_emb_proj", SD15) == "middle_block.2.emb_layers.1"
    assert ldm_unet_path("up_blocks.0.upsamplers.0.conv", SD15) == "output_blocks.2.1.conv"
    assert ldm_unet_path("up_blocks.1.upsamplers.0.conv", SD15) == "output_blocks.5.2.conv"
    assert ldm_unet_path("up_blocks.3.attentions.2.proj_out", SD15) == "output_blocks.11.1.proj_out"
    assert ldm_unet_path("time_embedding.linear_2", SD15) == "time_embed.2"


def test_export_refusals(tmp_path):
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_lora(UNetStudent(tiny_unet(), diffusers.DDPMScheduler(**SCHEDULE)), tmp_path / "x.safetensors")
    student, _ = trained_lora_student(step_conditioned=True)
    with pytest.raises(ValueError, match="step embedding"):
        save_lora(student, tmp_path / "x.safetensors")


def tiny_sd3_lora_student(targets):
    from kdistpp.sfd.networks import FlowTransformerStudent

    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16)
    return FlowTransformerStudent(add_lora(transformer, rank=2, alpha=1.0, target_modules=targets)).eval()


def test_mmdit_paths_of_the_sd3_layout():
    from kdistpp.sfd.export import mmdit_path

    network = tiny_sd3_lora_student(("to_q",)).transformer
    assert mmdit_path("transformer_blocks.0.attn.add_k_proj", network) == (
        "joint_blocks.0.context_block.attn.qkv", 1, False)
    assert mmdit_path("transformer_blocks.1.attn.to_v", network) == ("joint_blocks.1.x_block.attn.qkv", 2, False)
    assert mmdit_path("transformer_blocks.0.ff_context.net.2", network) == (
        "joint_blocks.0.context_block.mlp.fc2", None, False)
    # only the last block's context modulation (scale, shift in diffusers) and the output norm's are two-way
    assert mmdit_path("transformer_blocks.0.norm1_context.linear", network)[2] is False
    assert mmdit_path("transformer_blocks.1.norm1_context.linear", network) == (
        "joint_blocks.1.context_block.adaLN_modulation.1", None, True)
    assert mmdit_path("norm_out.linear", network) == ("final_layer.adaLN_modulation.1", None, True)


def test_sd3_kohya_format_refusals(tmp_path):
    with pytest.raises(ValueError, match="format must be"):
        save_lora(tiny_sd3_lora_student(("to_q",)), tmp_path / "x.safetensors", format="peft")
    with pytest.raises(ValueError, match="UNet2DConditionModel student's LoRA is written in kohya .*not in diffusers"):
        save_lora(trained_lora_student()[0], tmp_path / "x.safetensors", format="diffusers")
    with pytest.raises(ValueError, match="no MMDiT module for the SD3 module 'pos_embed.proj'"):
        save_lora(tiny_sd3_lora_student(("to_q", "pos_embed.proj")), tmp_path / "x.safetensors", format="kohya")
    assert not (tmp_path / "x.safetensors").exists()


def test_an_sfd_v_student_exports_as_a_full_network_for_one_step_count(tmp_path):
    student, _ = trained_lora_student(step_conditioned=True)
    with torch.no_grad():  # a step embedding as after training: its last layer away from zero
        for p in student.step_embedding.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    x, sigma, cond = inputs()
    with pytest.raises(ValueError, match="num_steps=n"):
        save_full(student, tmp_path / "unet")
    outputs = {}
    for n in (3, 5):
        folder = save_full(student, tmp_path / f"unet{n}", num_steps=n)
        network = diffusers.UNet2DConditionModel.from_pretrained(str(folder)).eval()
        with torch.no_grad():
            outputs[n] = UNetStudent(network, diffusers.DDPMScheduler(**SCHEDULE))(x, sigma, cond)
            assert torch.allclose(outputs[n], student(x, sigma, cond, num_steps=n), atol=1e-5, rtol=1e-5)
    assert float((outputs[3] - outputs[5]).abs().max()) > 1e-3  # the step count is in the written weights


def test_an_sfd_v_flux_student_exports_as_a_full_transformer_for_one_step_count(tmp_path):
    from kdistpp.integrations.diffusers import flow_cond
    from kdistpp.sfd.networks import FlowTransformerStudent

    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=False, axes_dims_rope=(2, 2, 4)).eval()
    student = FlowTransformerStudent(transformer, step_conditioned=True)
    with torch.no_grad():
        for p in student.step_embedding.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    g = torch.Generator().manual_seed(2)
    x, s = torch.randn(2, 4, 4, 4, generator=g), torch.full((2,), 0.6)
    cond = flow_cond(torch.randn(2, 5, 16, generator=g), torch.randn(2, 16, generator=g))
    folder = save_full(student, tmp_path / "transformer", num_steps=4)
    network = diffusers.FluxTransformer2DModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        ours, plain = student(x, s, cond, num_steps=4), student(x, s, cond)
        theirs = FlowTransformerStudent(network)(x, s, cond)
    assert float((ours - plain).abs().max()) > 1e-3  # the step embedding matters
    assert torch.allclose(theirs, ours, atol=1e-5, rtol=1e-5)
