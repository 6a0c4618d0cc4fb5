"""The diffusers flow-transformer adapter (SD3/3.5, Flux) against the diffusers pipelines themselves,
with tiny random transformers (no download, no text encoders: the pipelines take prompt embeddings)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import DEVICE

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")  # diffusers' SD3 and Flux pipeline classes need it

import kdistpp  # noqa: E402
from kdistpp.integrations.diffusers import (  # noqa: E402
    DiffusersFlowTransformerDenoiser,
    flow_cond,
    flow_sigmas,
    flow_transformer_denoiser,
    pack_flux_latents,
    unpack_flux_latents,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DIM, TOKENS, LATENT = 16, 5, 8  # text width, prompt tokens, latent side (8x8 latents: 64x64 "pixels")


def example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_sd3(seed: int, dtype=torch.float32):
    torch.manual_seed(seed)
    model = diffusers.SD3Transformer2DModel(
        sample_size=LATENT, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=DIM, joint_attention_dim=DIM, pooled_projection_dim=DIM, out_channels=4,
    ).to(DEVICE).eval()
    return model if dtype == torch.float32 else model.to(dtype)


def tiny_flux(seed: int, guidance_embeds: bool):
    torch.manual_seed(seed)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=DIM, pooled_projection_dim=DIM, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),
    ).to(DEVICE).eval()


SCHEDULERS = {
    "sd3": dict(shift=3.0),
    "sd3-dynamic": dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.16),
    "flux-dev": dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15),
    "flux-schnell": dict(shift=1.0),
}


def scheduler(name: str):
    return diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULERS[name])


def embeds(seed: int, batch: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, TOKENS, DIM, generator=g).to(DEVICE), torch.randn(batch, DIM, generator=g).to(DEVICE)


def noise(seed: int, channels: int = 4, batch: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, LATENT, LATENT, generator=g).to(DEVICE)


def sd3_pipeline(transformer, sched):
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=sched, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
        tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_pipeline(transformer, sched):
    pipe = diffusers.FluxPipeline(transformer=transformer, scheduler=sched, vae=None, text_encoder=None,
                                  tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def close(a, b):
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def count_calls(transformer):
    """Records (batch, timestep, guidance) of each call of the transformer."""
    calls, forward = [], transformer.forward

    def recording(*args, **kwargs):
        g = kwargs.get("guidance")
        calls.append((kwargs["hidden_states"].shape[0], kwargs["timestep"].tolist(), None if g is None else g.tolist()))
        return forward(*args, **kwargs)

    transformer.forward = recording
    return calls


# (a) at w = 0 the samplers reproduce the pipelines ----------------------------------------------------

@pytest.mark.parametrize("sched_name", ["sd3", "sd3-dynamic"])
def test_sd3_at_w0_equals_the_pipeline_student_and_cfg_teacher(sched_name):
    student_tr, teacher_tr = tiny_sd3(0), tiny_sd3(1)
    (pe, pp), (npe, npp), x = embeds(0), embeds(1), noise(2)
    steps = 3
    sd35 = example("sd35_turbo_distpp")
    with torch.no_grad():
        ours = sd35.distpp_latents(student_tr, teacher_tr, scheduler(sched_name), pe, pp, npe, npp, x, steps=steps,
                                   w=0.0, disable=True)
        pipe = sd3_pipeline(student_tr, scheduler(sched_name))
        expected = pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, guidance_scale=0.0, num_inference_steps=steps,
                        height=8 * LATENT, width=8 * LATENT, latents=x, output_type="latent").images
        sigmas = flow_sigmas(scheduler(sched_name), steps, "sd3", image_seq_len=(LATENT // 2) ** 2)
        assert torch.equal(sigmas, pipe.scheduler.sigmas.cpu())
        assert close(ours, expected)

        # the teacher's CFG (one batched call, on x0) equals the pipeline's CFG (two halves, on v)
        teacher = flow_transformer_denoiser(teacher_tr, cond=flow_cond(pe, pp), uncond=flow_cond(npe, npp),
                                            cond_scale=4.0)
        ours_cfg = kdistpp.sample_euler_distpp(teacher, x, sigmas.to(DEVICE), parametrization="flow", disable=True)
        expected_cfg = sd3_pipeline(teacher_tr, scheduler(sched_name))(
            prompt_embeds=pe, pooled_prompt_embeds=pp, negative_prompt_embeds=npe, negative_pooled_prompt_embeds=npp,
            guidance_scale=4.0, num_inference_steps=steps, height=8 * LATENT, width=8 * LATENT, latents=x,
            output_type="latent").images
        assert close(ours_cfg, expected_cfg)


@pytest.mark.parametrize("sched_name", ["flux-schnell", "flux-dev"])
def test_flux_at_w0_equals_the_pipeline_schnell_and_guided_dev(sched_name):
    schnell_tr, dev_tr = tiny_flux(0, guidance_embeds=False), tiny_flux(1, guidance_embeds=True)
    (pe, pp), x = embeds(0), noise(2)
    steps = 3
    seq_len = (LATENT // 2) ** 2
    flux = example("flux_schnell_distpp")
    with torch.no_grad():
        ours = flux.distpp_latents(schnell_tr, dev_tr, scheduler(sched_name), pe, pp, x, steps=steps, w=0.0,
                                   disable=True)
        pipe = flux_pipeline(schnell_tr, scheduler(sched_name))
        expected = pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, num_inference_steps=steps, height=8 * LATENT,
                        width=8 * LATENT, latents=pack_flux_latents(x), output_type="latent").images
        sigmas = flow_sigmas(scheduler(sched_name), steps, "flux", image_seq_len=seq_len)
        assert torch.equal(sigmas, pipe.scheduler.sigmas.cpu())
        assert close(ours, unpack_flux_latents(expected, LATENT, LATENT))

        # FLUX.1-dev's distilled guidance is an input of the model, as in the pipeline
        dev = flow_transformer_denoiser(dev_tr, cond=flow_cond(pe, pp), guidance=3.5)
        ours_dev = kdistpp.sample_euler_distpp(dev, x, sigmas.to(DEVICE), parametrization="flow", disable=True)
        expected_dev = flux_pipeline(dev_tr, scheduler(sched_name))(
            prompt_embeds=pe, pooled_prompt_embeds=pp, guidance_scale=3.5, num_inference_steps=steps,
            height=8 * LATENT, width=8 * LATENT, latents=pack_flux_latents(x), output_type="latent").images
        assert close(ours_dev, unpack_flux_latents(expected_dev, LATENT, LATENT))


def test_flux_packing_matches_the_pipeline_and_round_trips():
    x = noise(3, channels=4, batch=2)
    packed = pack_flux_latents(x)
    assert torch.equal(packed, diffusers.FluxPipeline._pack_latents(x, 2, 4, LATENT, LATENT))
    assert torch.equal(unpack_flux_latents(packed, LATENT, LATENT), x)


# (b) a teacher guides: one call per guided step, and the result moves ---------------------------------

def test_sd3_cfg_teacher_is_one_batched_call_per_guided_step():
    student_tr, teacher_tr = tiny_sd3(0), tiny_sd3(1)
    (pe, pp), (npe, npp), x = embeds(0, batch=2), embeds(1, batch=2), noise(2, batch=2)
    calls = count_calls(teacher_tr)
    sd35 = example("sd35_turbo_distpp")
    sched = scheduler("sd3")
    with torch.no_grad():
        plain = sd35.distpp_latents(student_tr, teacher_tr, sched, pe, pp, npe, npp, x, w=0.0, disable=True)
        calls.clear()
        guided = sd35.distpp_latents(student_tr, teacher_tr, sched, pe, pp, npe, npp, x, w=0.3, disable=True)
        sigmas = flow_sigmas(sched, 4, "sd3")
    assert len(calls) == 1 and calls[0][0] == 4  # cond and uncond of both samples in one call
    assert calls[0][1] == pytest.approx([float(sigmas[1]) * 1000] * 4)  # renoised to the next sigma
    assert torch.isfinite(guided).all() and not close(guided, plain)

    student = flow_transformer_denoiser(student_tr, cond=flow_cond(pe, pp))
    teacher = flow_transformer_denoiser(teacher_tr, cond=flow_cond(pe, pp), uncond=flow_cond(npe, npp), cond_scale=4.0)
    calls.clear()
    with torch.no_grad():
        kdistpp.sample_euler_distpp(student, x, sigmas.to(DEVICE), teacher=teacher, w=0.3, guidance_steps=2,
                                    parametrization="flow", disable=True)
    assert [c[0] for c in calls] == [4, 4]


def test_flux_dev_teacher_gets_its_guidance_once_per_guided_step():
    schnell_tr, dev_tr = tiny_flux(0, guidance_embeds=False), tiny_flux(1, guidance_embeds=True)
    (pe, pp), x = embeds(0), noise(2)
    calls = count_calls(dev_tr)
    flux = example("flux_schnell_distpp")
    sched = scheduler("flux-schnell")
    with torch.no_grad():
        plain = flux.distpp_latents(schnell_tr, dev_tr, sched, pe, pp, x, w=0.0, disable=True)
        calls.clear()
        guided = flux.distpp_latents(schnell_tr, dev_tr, sched, pe, pp, x, w=0.3, teacher_guidance=3.5, disable=True)
    assert calls == [(1, [0.75], [3.5])]  # schnell sigmas 1, .75, .5, .25: renoised to 0.75, as t / 1000
    assert torch.isfinite(guided).all() and not close(guided, plain)


def test_the_transformer_runs_in_its_dtype_and_the_result_keeps_the_callers():
    tr = tiny_sd3(0, dtype=torch.bfloat16)
    seen = []
    forward = tr.forward
    tr.forward = lambda *a, **kw: seen.append(kw["hidden_states"].dtype) or forward(*a, **kw)
    pe, pp = embeds(0)
    den = flow_transformer_denoiser(tr, cond=flow_cond(pe, pp))
    with torch.no_grad():
        out = den(noise(1), torch.tensor([0.5], device=DEVICE))
    assert seen == [torch.bfloat16] and out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.filterwarnings("ignore:There are modules")  # diffusers' note on .to(bf16), which the pipeline gets too
def test_a_bf16_latent_ends_no_further_from_the_fp32_run_than_the_pipelines_bf16_run():
    """CFG of two bf16 estimates is combined in float32: over a few seeds the bf16 run's distance from
    the float32 run is at most the SD3 pipeline's own bf16 run's (the pipeline as the independent check)."""
    ours_err = theirs_err = 0.0
    for seed in range(3):
        tr32, tr16 = tiny_sd3(seed), tiny_sd3(seed, dtype=torch.bfloat16)
        (pe, pp), (npe, npp), x = embeds(seed + 10), embeds(seed + 20), noise(seed + 30)
        sigmas = flow_sigmas(scheduler("sd3"), 8, "sd3").to(DEVICE)
        with torch.no_grad():
            reference = kdistpp.sample_euler_distpp(
                flow_transformer_denoiser(tr32, flow_cond(pe, pp), flow_cond(npe, npp), 4.0), x, sigmas, disable=True)
            ours = kdistpp.sample_euler_distpp(
                flow_transformer_denoiser(tr16, flow_cond(pe, pp), flow_cond(npe, npp), 4.0), x.bfloat16(), sigmas,
                disable=True)
            half = [t.bfloat16() for t in (pe, pp, npe, npp, x)]
            theirs = sd3_pipeline(tr16, scheduler("sd3"))(
                prompt_embeds=half[0], pooled_prompt_embeds=half[1], negative_prompt_embeds=half[2],
                negative_pooled_prompt_embeds=half[3], guidance_scale=4.0, num_inference_steps=8, height=8 * LATENT,
                width=8 * LATENT, latents=half[4], output_type="latent").images
        assert ours.dtype == theirs.dtype == torch.bfloat16
        ours_err += float((ours.float() - reference).norm() / reference.norm())
        theirs_err += float((theirs.float() - reference).norm() / reference.norm())
    assert 0 < ours_err <= theirs_err


# (c) bad inputs -------------------------------------------------------------------------------------

class UnknownTransformer:
    config = {"in_channels": 4}

    def __call__(self, *args, **kwargs):
        raise AssertionError("not to be called")


def test_bad_inputs_get_clear_errors():
    sd3, schnell, dev = tiny_sd3(0), tiny_flux(0, False), tiny_flux(1, True)
    pe, pp = embeds(0)
    cond = flow_cond(pe, pp)
    with pytest.raises(TypeError, match="SD3Transformer2DModel"):
        flow_transformer_denoiser(object(), cond=cond)
    with pytest.raises(TypeError, match="kind="):
        flow_transformer_denoiser(UnknownTransformer(), cond=cond)
    with pytest.raises(ValueError, match="kind must be"):
        flow_transformer_denoiser(sd3, cond=cond, kind="sdxl")
    with pytest.raises(ValueError, match="guidance=3.5"):
        flow_transformer_denoiser(dev, cond=cond)
    with pytest.raises(ValueError, match="guidance=None"):
        flow_transformer_denoiser(schnell, cond=cond, guidance=3.5)
    with pytest.raises(ValueError, match="no guidance input"):
        flow_transformer_denoiser(sd3, cond=cond, guidance=3.5)
    with pytest.raises(TypeError, match="pooled_projections"):
        flow_transformer_denoiser(sd3, cond={"encoder_hidden_states": pe})
    with pytest.raises(TypeError, match="flow_cond"):
        flow_transformer_denoiser(sd3, cond=(pe, pp))
    with pytest.raises(ValueError, match="needs an uncond"):
        flow_transformer_denoiser(sd3, cond=cond, cond_scale=4.0)
    with pytest.raises(ValueError, match="same shapes"):
        flow_transformer_denoiser(sd3, cond=cond, uncond=flow_cond(pe[:, :3], pp), cond_scale=4.0)

    s = torch.tensor([0.5], device=DEVICE)
    with pytest.raises(ValueError, match="unpack_flux_latents"):
        DiffusersFlowTransformerDenoiser(schnell)(pack_flux_latents(noise(0)), s, cond=cond)
    with pytest.raises(ValueError, match="16 input channels"):
        DiffusersFlowTransformerDenoiser(schnell)(noise(0, channels=16), s, cond=cond)
    with pytest.raises(ValueError, match="even height"):
        DiffusersFlowTransformerDenoiser(schnell)(noise(0)[..., :7], s, cond=cond)
    with pytest.raises(ValueError, match="batch"):
        DiffusersFlowTransformerDenoiser(sd3)(noise(0, batch=2), s, cond=cond)
    with pytest.raises(ValueError, match="flow sigmas"):  # VE sigmas handed to a flow run
        kdistpp.sample_euler_distpp(flow_transformer_denoiser(sd3, cond=cond), noise(0),
                                    kdistpp.get_sigmas_karras(4, 0.03, 14.6), parametrization="flow", disable=True)

    with pytest.raises(ValueError, match="image_seq_len"):
        flow_sigmas(scheduler("flux-schnell"), 4, "flux")
    with pytest.raises(ValueError, match="image_seq_len"):
        flow_sigmas(scheduler("sd3-dynamic"), 4, "sd3")
    with pytest.raises(ValueError, match="kind must be"):
        flow_sigmas(scheduler("sd3"), 4, "sdxl")
    with pytest.raises(ValueError, match="positive integer"):
        flow_sigmas(scheduler("sd3"), 0, "sd3")
    with pytest.raises(TypeError, match="FlowMatchEulerDiscreteScheduler"):
        flow_sigmas(object(), 4, "sd3")
    with pytest.raises(ValueError, match="invert_sigmas"):
        flow_sigmas(diffusers.FlowMatchEulerDiscreteScheduler(invert_sigmas=True), 4, "sd3")


def test_flow_sigmas_leaves_the_callers_scheduler_alone():
    sched = scheduler("sd3")
    sched.set_timesteps(7)
    before = sched.sigmas.clone()
    assert torch.equal(flow_sigmas(sched, 4, "sd3")[[0, -1]], torch.tensor([1.0, 0.0]))
    assert torch.equal(sched.sigmas, before)


# the example scripts: their parsers work without weights ----------------------------------------------

@pytest.mark.parametrize("name", ["flux_schnell_distpp", "sd35_turbo_distpp"])
def test_example_help_works_without_weights(name, capsys):
    module = example(name)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--device" in out and "--prompt" in out and "--w" in out
    assert "hub" in module.__doc__ and 'pip install -e ".[diffusers]"' in module.__doc__
