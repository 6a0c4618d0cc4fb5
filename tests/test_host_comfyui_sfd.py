"""An SFD LoRA student exported by kdistpp, loaded by real ComfyUI (the pinned 0.8.0 tree).

A tiny diffusers SD1.5-architecture UNet, a tiny Flux transformer and a tiny SD3 transformer are the
teachers; kdistpp trains a LoRA student on each and exports it (kohya keys for the UNet, peft keys for Flux
and SD3). ComfyUI builds the same network from its own config, loads the teacher's weights (converted by
ComfyUI's own diffusers maps; the UNet's through a checkpoint file), applies the file with `comfy.sd.load_lora_for_models` (the LoraLoader
node's path) and computes the denoised output with its own model sampling: it equals kdistpp's student on
the same input to float32 rounding. Needs ComfyUI's requirements plus diffusers and peft (`.ci/run`
installs them in .venv-comfyui); elsewhere it skips.
"""

from __future__ import annotations

import pytest
import torch

from comfy_models import POOLED, SD3 as COMFY_SD3
from hosts import import_comfy

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from kdistpp.sfd import SFDConfig, SFDTrainer  # noqa: E402
from kdistpp.sfd.export import save_lora  # noqa: E402
from kdistpp.sfd.lora import LoRATeacher, add_lora  # noqa: E402
from kdistpp.sfd.networks import UNetStudent  # noqa: E402

CONTEXT = 32
# ComfyUI's SD15 UNet config for the same tiny architecture as the diffusers UNet below: attention on every
# level (ComfyUI's diffusers map reads transformer_depth_output from its end, so only a symmetric one maps);
# 8 heads, as ComfyUI's SD15 class sets whatever the config says.
COMFY_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
              "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 32,
              "num_res_blocks": [1, 1], "transformer_depth": [1, 1], "channel_mult": [1, 2],
              "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": CONTEXT,
              "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1], "use_temporal_attention": False,
              "use_temporal_resblock": False, "dtype": torch.float32}


def tiny_teacher():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
        cross_attention_dim=CONTEXT, attention_head_dim=8, norm_num_groups=32)
    with torch.no_grad():  # diffusers zero-initialises conv_out: a zero output would hide everything
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    return unet.eval()


@pytest.fixture(scope="module")
def comfy():
    return import_comfy(full=True)


SD_CONFIG = dict(num_steps=3, sigma_min=0.1, sigma_max=14.0, batch_size=2, lr=2e-2, iterations=3)


def trained_sd15_student(comfy, tmp_path, targets=("to_q", "to_k", "to_v", "to_out.0")):
    """(kdistpp's trained LoRA student, ComfyUI's model with the exported file loaded by LoraLoader's function,
    ComfyUI's teacher: the checkpoint's model without the LoRA, of which the LoRA model is a clone)."""
    import safetensors.torch

    import comfy.utils

    unet = tiny_teacher()
    teacher_state = {k: v.clone() for k, v in unet.state_dict().items()}
    scheduler = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    student = UNetStudent(add_lora(unet, rank=4, alpha=2.0, target_modules=targets), scheduler)

    def condition(generator, batch):
        return {"cond": {"encoder_hidden_states": torch.randn(batch, 5, CONTEXT, generator=generator)}}

    SFDTrainer(student, LoRATeacher(student), SFDConfig(**SD_CONFIG), shape=(4, 8, 8),
               condition=condition).fit(progress=False)
    lora_path = save_lora(student, tmp_path / "sfd_student.safetensors")

    # ComfyUI: the teacher as a checkpoint (its own diffusers -> ldm map), the LoRA through LoraLoader's function
    model_config = comfy.supported_models.SD15(dict(COMFY_UNET))
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({}, device=torch.device("cpu"))
    to_ldm = comfy.utils.unet_to_diffusers(model_config.unet_config)
    checkpoint = {f"model.diffusion_model.{to_ldm[k]}": v for k, v in teacher_state.items()}
    assert len(checkpoint) == len(teacher_state)
    safetensors.torch.save_file(checkpoint, str(tmp_path / "teacher.safetensors"))
    base.load_model_weights(comfy.utils.load_torch_file(str(tmp_path / "teacher.safetensors")), "model.diffusion_model.")
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=torch.device("cpu"))
    lora = comfy.utils.load_torch_file(str(lora_path))
    loaded, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
    assert len(loaded.patches) == len(lora) // 3  # every module of the file found its layer
    return student, loaded, patcher


@pytest.mark.parametrize("targets", ["attention", "attention_and_resnets"])
def test_exported_lora_in_comfyuis_loader_gives_the_students_denoised_output(comfy, tmp_path, targets):
    names = ("to_q", "to_k", "to_v", "to_out.0") + (("conv1", "conv2", "time_emb_proj", "proj_in", "ff.net.2")
                                                   if targets != "attention" else ())
    student, loaded, _ = trained_sd15_student(comfy, tmp_path, names)
    comfy.model_management.load_models_gpu([loaded])
    g = torch.Generator().manual_seed(0)
    t = 400
    sigma = loaded.model.model_sampling.sigmas[t].reshape(1).expand(2)
    x = torch.randn(2, 4, 8, 8, generator=g) * float(sigma[0])
    context = torch.randn(2, 5, CONTEXT, generator=g)
    with torch.no_grad():
        ours = student(x, sigma, {"encoder_hidden_states": context})
        teacher_out = LoRATeacher(student)(x, sigma, cond={"encoder_hidden_states": context})
        device = comfy.model_management.get_torch_device()
        theirs = loaded.model.apply_model(x.to(device), sigma.to(device), c_crossattn=context.to(device)).cpu()
    scale = float(ours.abs().max())
    assert float((ours - teacher_out).abs().max()) > 1e-3 * scale  # the LoRA moves the output: the check below means something
    assert torch.allclose(theirs, ours, rtol=1e-4, atol=1e-5 * scale), float((theirs - ours).abs().max())


def test_comfyuis_euler_on_the_students_timestamps_gives_kdistpps_sfd_sample(comfy, tmp_path):
    """SamplerCustom (Euler, cfg 1, SFD timestamps as SIGMAS) with the exported LoRA draws the sample
    `kdistpp.sfd.sample_sfd` draws from the same noise, in ComfyUI's latent scaling. ComfyUI calls an SD
    UNet at the nearest integer timestep, kdistpp at the fractional one a sigma maps to: the timestamps
    here are two of the model's own sigmas (N = 2, NFE 1), where the two agree; in between they differ by
    the rounding (docs/sfd.md)."""
    import comfy.sample
    import comfy_extras.nodes_custom_sampler as ncs

    from kdistpp.sfd import sample_sfd

    student, loaded, _ = trained_sd15_student(comfy, tmp_path)
    grid = loaded.model.model_sampling.sigmas
    config = SFDConfig(num_steps=2, sigma_min=float(grid[20]), sigma_max=float(grid[899]))  # below the largest
    sigmas = config.timestamps()  # sigma: ComfyUI then scales the noise by sigma, as kdistpp
    context = torch.randn(1, 5, CONTEXT, generator=torch.Generator().manual_seed(4))
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    out = ncs.SamplerCustom.execute(loaded, True, 7, 1.0, [[context, {}]], [[torch.zeros_like(context), {}]],
                                    comfy.samplers.ksampler("euler"), sigmas, latent)
    theirs = out.result[0]["samples"] * loaded.model.latent_format.scale_factor  # back to the model's latent space
    cond = {"cond": {"encoder_hidden_states": context}}
    with torch.no_grad():
        ours = sample_sfd(student, comfy.sample.prepare_noise(latent["samples"], 7) * config.sigma_max, config,
                          extra_args=cond, disable=True)
        other = sample_sfd(student, comfy.sample.prepare_noise(latent["samples"], 8) * config.sigma_max, config,
                           extra_args=cond, disable=True)
    scale = float(ours.abs().max())
    assert float((other - ours).abs().max()) > 1e-2 * scale  # another seed is far off: the comparison can fail
    assert torch.allclose(theirs, ours, rtol=1e-4, atol=1e-5 * scale), float((theirs - ours).abs().max())


# The exported student with its teacher in kdistpp's Distillation++ nodes: the teacher is the checkpoint's
# model without the LoRA (the LoRA model is its clone: one BaseModel, whose weights ComfyUI patches for the
# student and unpatches for the teacher). Schedules lie on the model's own sigma grid (below its largest),
# where ComfyUI's integer timesteps and kdistpp's fractional ones agree (see the test above).
DISTPP_GRID = (899, 400, 100)
SEED, TEACHER_CFG = 7, 2.0


@pytest.fixture(scope="module")
def sfd_models(comfy, tmp_path_factory):
    return trained_sd15_student(comfy, tmp_path_factory.mktemp("sfd_distpp"))


def grid_schedule(loaded):
    grid = loaded.model.model_sampling.sigmas
    return torch.cat([grid[list(DISTPP_GRID)], torch.zeros(1)])


def contexts():
    g = torch.Generator().manual_seed(11)
    return [torch.randn(1, 5, CONTEXT, generator=g) for _ in range(2)]  # the prompt and the negative prompt


class Denoisings:
    """Every model evaluation of a patcher (ComfyUI's model_function_wrapper on a clone of it): the input,
    sigma and context the evaluation hands the model, and the denoised output it returns."""

    def __init__(self):
        self.log: list[tuple] = []

    def watch(self, patcher, who: str):
        clone = patcher.clone()

        def wrapper(apply_model, args):
            out = apply_model(args["input"], args["timestep"], **args["c"])
            self.log.append((who, args["input"].clone(), args["timestep"].clone(), args["c"]["c_crossattn"].clone(),
                             out.clone()))
            return out

        clone.set_model_unet_function_wrapper(wrapper)
        return clone


def run_node(comfy, kind, student_model, teacher_model, w, seed=SEED, guided_steps=1):
    """One sample of 3 steps at CFG 1 through kdistpp's node: kind 'sampler' is the Distillation++ Sampler (Euler)
    in SamplerCustom, 'guider' the Distillation++ Guider with KSamplerSelect's Euler in SamplerCustomAdvanced;
    kind 'comfyui' / 'cfgguider' are ComfyUI's own runs they equal at w = 0. Returned in the model's latent space."""
    import comfy_extras.nodes_custom_sampler as ncs

    from kdistpp.integrations.comfyui_nodes import DistillationPPGuider, DistillationPPSampler

    positive, negative = ([[c, {}]] for c in contexts())
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    sigmas = grid_schedule(student_model)
    with torch.no_grad():
        if kind in ("sampler", "comfyui"):
            sampler = comfy.samplers.ksampler("euler") if kind == "comfyui" else DistillationPPSampler.execute(
                teacher_model, positive, negative, TEACHER_CFG, "euler", w, guided_steps, "interpolate",
                "next").result[0]
            out = ncs.SamplerCustom.execute(student_model, True, seed, 1.0, positive, negative, sampler, sigmas, latent)
        else:
            guider = ncs.CFGGuider.execute(student_model, positive, negative, 1.0).result[0] if kind == "cfgguider" \
                else DistillationPPGuider.execute(student_model, positive, negative, 1.0, teacher_model, positive,
                                                  negative, TEACHER_CFG, w, guided_steps, "interpolate",
                                                  "next").result[0]
            out = ncs.SamplerCustomAdvanced.execute(ncs.RandomNoise.execute(seed).result[0], guider,
                                                    ncs.KSamplerSelect.execute("euler").result[0], sigmas, latent)
    return out.result[0]["samples"] * student_model.model.latent_format.scale_factor


def kdistpp_run(comfy, student, loaded, kind, w, seed=SEED):
    """The same run recomputed with kdistpp's own Euler sampler on kdistpp's trained student and its SFD teacher
    (the student with its adapters off) at the teacher's CFG: the Sampler node is direction 'student', the
    Guider's refined estimate replaces the student's (direction 'refined'). The renoise noise is the nodes'
    documented stream: a generator seeded with ComfyUI's seed + 0x5EED."""
    import comfy.sample

    from kdistpp import sample_euler_distpp

    positive, negative = contexts()
    sfd_teacher = LoRATeacher(student)

    def teacher(x, sigma, **_):
        cond = sfd_teacher(x, sigma, cond={"encoder_hidden_states": positive})
        uncond = sfd_teacher(x, sigma, cond={"encoder_hidden_states": negative})
        return uncond + TEACHER_CFG * (cond - uncond)

    sigmas = grid_schedule(loaded)
    x = comfy.sample.prepare_noise(torch.zeros(1, 4, 8, 8), seed) * sigmas[0]
    with torch.no_grad():
        return sample_euler_distpp(student, x, sigmas, {"cond": {"encoder_hidden_states": positive}}, disable=True,
                                   teacher=teacher, w=w, guidance_steps=1, form="interpolate", renoise="next",
                                   renoise_generator=torch.Generator().manual_seed(seed + 0x5EED),
                                   direction="refined" if kind == "guider" else "student")


@pytest.mark.parametrize("kind", ["sampler", "guider"])
def test_at_w0_the_distpp_nodes_sample_the_exported_student_as_comfyuis_own_sampler(comfy, sfd_models, kind):
    """w = 0 with the checkpoint as teacher: the Guider is CFGGuider's run and the Sampler node SamplerCustom's
    Euler, bit for bit (Euler's step is a difference of two float32 sigmas, which kdistpp's float64 arithmetic
    rounds to the same float32 value), and the teacher is never called."""
    student, loaded, base = sfd_models
    theirs = run_node(comfy, "comfyui" if kind == "sampler" else "cfgguider", loaded, None, 0.0)
    watched = Denoisings()
    ours = run_node(comfy, kind, loaded, watched.watch(base, "teacher"), 0.0)
    other_seed = run_node(comfy, kind, loaded, base, 0.0, seed=SEED + 1)
    assert not torch.equal(other_seed, theirs)  # the comparison can fail
    assert torch.equal(ours, theirs)
    assert watched.log == []


@pytest.mark.parametrize("kind", ["sampler", "guider"])
def test_guided_the_teacher_is_the_checkpoint_without_the_lora_and_the_sample_is_kdistpps(comfy, sfd_models, kind):
    """One guided step at w 0.5: every evaluation of the LoRA model is kdistpp's trained student on the same
    input; the teacher is evaluated once (its cond and uncond in one batch), right after the guided step's
    student evaluation, with the checkpoint's own weights: kdistpp's SFD teacher on the same input, clearly not
    the student; and the sample is kdistpp's Euler Distillation++ recomputed on kdistpp's networks."""
    student, loaded, base = sfd_models
    denoisings = Denoisings()
    ours = run_node(comfy, kind, denoisings.watch(loaded, "student"), denoisings.watch(base, "teacher"), 0.5)
    assert [who for who, *_ in denoisings.log] == ["student", "teacher", "student", "student"]
    sfd_teacher = LoRATeacher(student)
    with torch.no_grad():
        for who, x, sigma, context, out in denoisings.log:
            cond = {"encoder_hidden_states": context}
            expected, other = student(x, sigma, cond), sfd_teacher(x, sigma, cond=cond)
            if who == "teacher":
                expected, other = other, expected
                assert x.shape[0] == 2  # the teacher's CFG: prompt and negative prompt in one call
            scale = float(out.abs().max())
            error, off = float((out - expected).abs().max()), float((out - other).abs().max())
            # float32 rounding to the expected network; the other is off by far more (the check can tell them apart)
            assert error <= 1e-5 * scale and off > 100 * error, (who, error / scale, off / scale)
    recomputed = kdistpp_run(comfy, student, loaded, kind, 0.5)
    unguided = kdistpp_run(comfy, student, loaded, kind, 0.0)
    scale = float(recomputed.abs().max())
    assert float((unguided - recomputed).abs().max()) > 1e-3 * scale  # the teacher moved the sample
    torch.testing.assert_close(ours, recomputed, rtol=1e-4, atol=1e-5 * scale)


def tiny_diffusers_flux():
    """A diffusers Flux transformer of the architecture of ComfyUI's Flux config below (2x2 patches of a
    16-channel latent; diffusers' Flux blocks have an MLP ratio of 4)."""
    torch.manual_seed(1)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=CONTEXT, pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    with torch.no_grad():  # diffusers zero-initialises some output layers
        for p in transformer.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    return transformer.eval()


COMFY_FLUX = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 8, "context_in_dim": CONTEXT,
              "hidden_size": 32, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
              "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
              "txt_ids_dims": []}


COMFY_FLUX_FP32 = {**COMFY_FLUX, "dtype": torch.float32}


def comfy_flow_model_with_lora(model_config, teacher_state, lora_path, caplog):
    """ComfyUI's own model of `model_config` holding the teacher's diffusers weights (converted by ComfyUI's
    diffusers-MMDiT map, every weight found), with the LoRA file applied by LoraLoader's function and the
    patched model loaded; checks every module of the file found its (fused) layer."""
    import comfy.model_detection
    import comfy.utils

    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({}, device=torch.device("cpu"))
    converted = comfy.model_detection.convert_diffusers_mmdit(teacher_state, "")
    missing, unexpected = base.diffusion_model.load_state_dict(converted, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=torch.device("cpu"))
    with caplog.at_level("WARNING"):
        loaded, _ = comfy.sd.load_lora_for_models(patcher, None, comfy.utils.load_torch_file(str(lora_path)), 1.0, 0.0)
    assert "lora key not loaded" not in caplog.text
    assert len(loaded.patches) > 0
    comfy.model_management.load_models_gpu([loaded])
    return loaded


def test_exported_flux_lora_in_comfyuis_loader_gives_the_students_denoised_output(comfy, tmp_path, caplog):
    import comfy.model_detection
    import comfy.utils

    from kdistpp.integrations.diffusers import flow_cond
    from kdistpp.sfd import FlowAsVE
    from kdistpp.sfd.networks import FlowTransformerStudent

    transformer = tiny_diffusers_flux()
    teacher_state = {k: v.clone() for k, v in transformer.state_dict().items()}
    student = FlowAsVE(FlowTransformerStudent(add_lora(transformer, rank=4, alpha=2.0, target_modules=(
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")), guidance=3.5))
    g = torch.Generator().manual_seed(0)

    def condition(generator, batch):
        return {"cond": flow_cond(torch.randn(batch, 5, CONTEXT, generator=generator), torch.randn(batch, 8, generator=generator))}

    config = SFDConfig(num_steps=3, batch_size=2, lr=2e-2, iterations=3)
    SFDTrainer(student, LoRATeacher(student), config, shape=(16, 4, 4), condition=condition).fit(progress=False)
    lora_path = save_lora(student, tmp_path / "sfd_flux.safetensors")

    # ComfyUI: its Flux model, the teacher's diffusers weights converted by ComfyUI's own diffusers-Flux map
    loaded = comfy_flow_model_with_lora(comfy.supported_models.Flux(COMFY_FLUX_FP32), teacher_state, lora_path, caplog)

    s = torch.full((2,), 0.6)
    x = torch.randn(2, 16, 4, 4, generator=g)
    context, pooled = torch.randn(2, 5, CONTEXT, generator=g), torch.randn(2, 8, generator=g)
    with torch.no_grad():
        ours = student.flow_model(x, s, flow_cond(context, pooled))
        teacher_out = LoRATeacher(student.flow_model)(x, s, cond=flow_cond(context, pooled))
        device = comfy.model_management.get_torch_device()
        theirs = loaded.model.apply_model(x.to(device), s.to(device), c_crossattn=context.to(device),
                                          y=pooled.to(device), guidance=torch.full((2,), 3.5, device=device)).cpu()
    scale = float(ours.abs().max())
    assert float((ours - teacher_out).abs().max()) > 1e-3 * scale  # the LoRA moves the output
    assert torch.allclose(theirs, ours, rtol=1e-4, atol=1e-5 * scale), float((theirs - ours).abs().max())


def tiny_diffusers_sd3():
    """A diffusers SD3 transformer of the architecture of `comfy_models.SD3` (ComfyUI's MMDiT of depth 1:
    one joint block, one head of width 64, 2x2 patches of a 16-channel latent, a position-embedding grid of 8)."""
    torch.manual_seed(2)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=64,
        num_attention_heads=1, joint_attention_dim=CONTEXT, caption_projection_dim=64,
        pooled_projection_dim=POOLED, pos_embed_max_size=8)
    with torch.no_grad():  # diffusers zero-initialises some output layers
        for p in transformer.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    return transformer.eval()


SD3_TARGETS = {"attention": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"),
               "attention_mlp_and_modulation": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                                "add_v_proj", "ff.net.0.proj", "ff.net.2", "norm1.linear",
                                                "norm1_context.linear")}


@pytest.mark.parametrize("file_format", ["diffusers", "kohya"])
@pytest.mark.parametrize("targets", sorted(SD3_TARGETS))
def test_exported_sd3_lora_in_comfyuis_loader_gives_the_students_denoised_output(comfy, tmp_path, caplog, targets,
                                                                                 file_format):
    """The SD3 file (diffusers: peft keys, alpha / rank folded into lora_B, no `.alpha` keys; kohya: MMDiT
    names, q, k, v as one LoRA on the fused qkv) through LoraLoader's function onto ComfyUI's own SD3 model
    with the teacher's weights converted by ComfyUI's diffusers-MMDiT map: ComfyUI's denoised output is the
    trained student's."""
    import comfy.model_detection
    import comfy.utils

    from kdistpp.integrations.diffusers import flow_cond
    from kdistpp.sfd import FlowAsVE
    from kdistpp.sfd.networks import FlowTransformerStudent

    transformer = tiny_diffusers_sd3()
    teacher_state = {k: v.clone() for k, v in transformer.state_dict().items()}
    # alpha 2 at rank 4: a scale of 1/2 the file must carry
    student = FlowAsVE(FlowTransformerStudent(add_lora(transformer, rank=4, alpha=2.0,
                                                       target_modules=SD3_TARGETS[targets])))
    g = torch.Generator().manual_seed(0)

    def condition(generator, batch):
        return {"cond": flow_cond(torch.randn(batch, 5, CONTEXT, generator=generator),
                                  torch.randn(batch, POOLED, generator=generator))}

    config = SFDConfig(num_steps=3, batch_size=2, lr=2e-2, iterations=3)
    SFDTrainer(student, LoRATeacher(student), config, shape=(16, 8, 8), condition=condition).fit(progress=False)
    lora_path = save_lora(student, tmp_path / "sfd_sd3.safetensors", format=file_format)

    # ComfyUI: its SD3 model, the teacher's diffusers weights converted by ComfyUI's own diffusers-MMDiT map
    lora = comfy.utils.load_torch_file(str(lora_path))
    if file_format == "diffusers":  # the SD3 format diffusers' loader accepts: no alpha, peft names
        assert all(k.startswith("transformer.") and ".lora_" in k for k in lora)
    else:
        assert all(k.startswith("lora_unet_joint_blocks_0_") for k in lora)
    loaded = comfy_flow_model_with_lora(comfy.supported_models.SD3({**COMFY_SD3, "dtype": torch.float32}),
                                        teacher_state, lora_path, caplog)

    s = torch.tensor([0.35, 0.8])
    x = torch.randn(2, 16, 8, 8, generator=g)
    context, pooled = torch.randn(2, 5, CONTEXT, generator=g), torch.randn(2, POOLED, generator=g)
    with torch.no_grad():
        ours = student.flow_model(x, s, flow_cond(context, pooled))
        teacher_out = LoRATeacher(student.flow_model)(x, s, cond=flow_cond(context, pooled))
        device = comfy.model_management.get_torch_device()
        theirs = loaded.model.apply_model(x.to(device), s.to(device), c_crossattn=context.to(device),
                                          y=pooled.to(device)).cpu()
    scale = float(ours.abs().max())
    assert float((ours - teacher_out).abs().max()) > 1e-3 * scale  # the LoRA moves the output
    assert torch.allclose(theirs, ours, rtol=1e-4, atol=1e-5 * scale), float((theirs - ours).abs().max())


def test_the_kohya_sd3_map_is_comfyuis_diffusers_to_mmdit_map(comfy):
    """Every Linear of a diffusers SD3 transformer of depth 3 whose first block has SD3.5's second attention
    (the last block context-only): `mmdit_path`'s MMDiT module, qkv slot and scale/shift swap are those of
    ComfyUI's own `comfy.utils.mmdit_to_diffusers` key map."""
    import comfy.utils

    from kdistpp.sfd.export import mmdit_path

    depth = 3
    torch.manual_seed(0)
    network = diffusers.SD3Transformer2DModel(  # MMDiT's width is 64 * depth, which ComfyUI's qkv offsets assume
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=depth, attention_head_dim=64,
        num_attention_heads=depth, joint_attention_dim=16, caption_projection_dim=64 * depth,
        pooled_projection_dim=16, pos_embed_max_size=8, dual_attention_layers=(0,))
    theirs = comfy.utils.mmdit_to_diffusers({"depth": depth})
    linears = [name for name, module in network.named_modules() if isinstance(module, torch.nn.Linear)]
    assert "transformer_blocks.0.attn2.to_q" in linears and "transformer_blocks.2.ff_context.net.2" not in linears
    for name in linears:
        entry = theirs[f"{name}.weight"]
        if isinstance(entry, str):  # a module of its own
            expected = (entry.removesuffix(".weight"), None, False)
        elif entry[1] is None:  # (key, None, swap_scale_shift): the two halves of the output swapped
            expected = (entry[0].removesuffix(".weight"), None, True)
        else:  # (fused qkv key, (dim, start, length)): q, k or v's rows of the fused Linear
            _, start, length = entry[1]
            expected = (entry[0].removesuffix(".weight"), start // length, False)
        assert mmdit_path(name, network) == expected, name
    assert len(linears) == 50
