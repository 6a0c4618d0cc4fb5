"""The diffusers adapter against diffusers' own scheduler math, with tiny random UNets (no download)."""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE

diffusers = pytest.importorskip("diffusers")

import kdistpp  # noqa: E402
from kdistpp.integrations.diffusers import (  # noqa: E402
    DiffusersUNetDenoiser,
    sdxl_time_ids,
    sigmas_at_timesteps,
    unet_denoiser,
)

TEXT_DIM = 32


def tiny_unet(sdxl: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + TEXT_DIM) if sdxl else {}
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=8, norm_num_groups=32, **extra,
    ).to(DEVICE).eval()


def conditions(sdxl: bool, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    cond = {"encoder_hidden_states": torch.randn(batch, 7, TEXT_DIM, generator=g).to(DEVICE)}
    if sdxl:
        cond["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, TEXT_DIM, generator=g).to(DEVICE),
                                     "time_ids": sdxl_time_ids(64, 64, batch, device=DEVICE)}
    return cond


@pytest.mark.parametrize("sdxl", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_one_euler_step_equals_euler_discrete_scheduler_step(sdxl, prediction_type):
    unet = tiny_unet(sdxl)
    scheduler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                 timestep_spacing="trailing", prediction_type=prediction_type)
    scheduler.set_timesteps(4)
    cond = conditions(sdxl, 2, 0)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)).to(DEVICE) * scheduler.init_noise_sigma
    with torch.no_grad():
        t = scheduler.timesteps[0]
        eps = unet(scheduler.scale_model_input(x, t), t, **cond).sample
        expected = scheduler.step(eps, t, x).prev_sample
    student = unet_denoiser(unet, scheduler, cond=cond)
    ours = kdistpp.sample_euler_distpp(student, x, scheduler.sigmas[:2].to(DEVICE), disable=True, teacher=student, w=0.0)
    assert torch.allclose(ours, expected, rtol=1e-4, atol=1e-4 * float(scheduler.init_noise_sigma))


def test_sigma_timestep_conversion_matches_the_scheduler():
    scheduler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                 timestep_spacing="trailing")
    scheduler.set_timesteps(4)
    den = DiffusersUNetDenoiser(tiny_unet(False), scheduler)
    assert torch.allclose(den.sigma_to_t(scheduler.sigmas[:-1]), scheduler.timesteps.float(), atol=1e-3)
    assert torch.allclose(sigmas_at_timesteps(den, scheduler.timesteps), scheduler.sigmas, rtol=1e-5)
    t = torch.tensor([0.0, 10.5, 500.25, 999.0])
    assert torch.allclose(den.sigma_to_t(den.t_to_sigma(t)), t, atol=1e-3)


def test_teacher_cfg_is_one_batched_call_and_a_full_distpp_sample_runs():
    student_unet, teacher_unet = tiny_unet(True, seed=0), tiny_unet(True, seed=1)
    scheduler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    calls = []
    forward = teacher_unet.forward
    teacher_unet.forward = lambda x, t, **kw: calls.append(x.shape[0]) or forward(x, t, **kw)
    cond, uncond = conditions(True, 2, 0), conditions(True, 2, 1)
    student = unet_denoiser(student_unet, scheduler, cond=cond)
    teacher = unet_denoiser(teacher_unet, scheduler, cond=cond, uncond=uncond, cond_scale=5.0)
    den = DiffusersUNetDenoiser(student_unet, scheduler)
    sigmas = sigmas_at_timesteps(den, [999, 749, 499, 249]).to(DEVICE)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)).to(DEVICE) * sigmas[0]
    for name, sampler in kdistpp.SAMPLERS.items():
        calls.clear()
        out = sampler(student, x, sigmas, disable=True, teacher=teacher, w=0.3)
        assert out.shape == x.shape and torch.isfinite(out).all(), name
        assert calls == [4], name  # one guided step: one teacher call on the doubled batch


def test_bad_input_gets_a_clear_error():
    with pytest.raises(TypeError, match="alphas_cumprod"):
        DiffusersUNetDenoiser(tiny_unet(False), object())
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusersUNetDenoiser(tiny_unet(False), torch.linspace(0.99, 0.01, 1000), prediction_type="flow")


def test_the_sdxl_example_script_compiles():
    import pathlib
    import py_compile

    py_compile.compile(str(pathlib.Path(__file__).parent.parent / "examples" / "sdxl_lightning_distpp.py"), doraise=True)
