"""SFD on diffusers networks: tiny random UNet2DConditionModels (SD 1.x and SDXL conditioning, epsilon
and v) and a Flux transformer as students and teachers, LoRA (peft) and full, SFD-v step conditioning."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import DEVICE

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from kdistpp.integrations.diffusers import flow_cond, sdxl_time_ids  # noqa: E402
from kdistpp.sfd import FlowAsVE, SFDConfig, SFDTrainer  # noqa: E402
from kdistpp.sfd.lora import LoRATeacher, add_lora, adapters_disabled  # noqa: E402
from kdistpp.sfd.networks import CFGTeacher, FlowTransformerStudent, UNetStudent  # noqa: E402
from test_integration_diffusers import TEXT_DIM, tiny_unet  # noqa: E402  (the same tiny SD/SDXL UNets)

TOKENS = 5
SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
CONFIG = dict(sigma_min=0.1, sigma_max=14.6, batch_size=2, lr=1e-3, iterations=2)




def scheduler(prediction_type="epsilon"):
    return diffusers.DDPMScheduler(prediction_type=prediction_type, **SCHEDULE)


def unet_cond(batch: int, seed: int, sdxl: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    cond = {"encoder_hidden_states": torch.randn(batch, TOKENS, TEXT_DIM, generator=g).to(DEVICE)}
    if sdxl:
        cond["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, TEXT_DIM, generator=g).to(DEVICE),
                                     "time_ids": sdxl_time_ids(64, 64, batch, device=DEVICE)}
    return cond


def prompts_condition(sdxl: bool = False):
    """Each batch draws its prompts' conditioning, as a prompt-embedding cache would give it."""
    def condition(generator, batch):
        return {"cond": unet_cond(batch, int(torch.randint(1000, (), generator=generator)), sdxl)}
    return condition


def frozen_copy(module):
    return copy.deepcopy(module).requires_grad_(False)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_unet_student_is_the_unets_x0_estimate_at_a_training_timestep(prediction_type):
    unet, sched = tiny_unet(), scheduler(prediction_type)
    t = 500
    a = sched.alphas_cumprod[t].double()
    sigma = float(((1 - a) / a).sqrt())
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)).to(DEVICE) * sigma
    cond = unet_cond(2, 1)
    with torch.no_grad():
        ours = UNetStudent(unet, sched)(x, torch.full((2,), sigma, device=DEVICE), cond)
        # the DDPM state x_t = sqrt(a) x0 + sqrt(1 - a) eps is x * sqrt(a); x0 from the scheduler's own formulas
        x_t = x * float(a.sqrt())
        out = unet(x_t, torch.tensor(t), **cond).sample
        if prediction_type == "epsilon":
            x0 = (x_t - float((1 - a).sqrt()) * out) / float(a.sqrt())
        else:
            x0 = float(a.sqrt()) * x_t - float((1 - a).sqrt()) * out
    assert torch.allclose(ours, x0, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sdxl", [False, True])
def test_lora_student_starts_as_its_teacher_and_training_changes_only_its_adapters(sdxl):
    unet, sched = tiny_unet(sdxl), scheduler()
    teacher = UNetStudent(frozen_copy(unet), sched)
    student = UNetStudent(add_lora(unet, rank=4), sched)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)).to(DEVICE) * 14.6
    sigma, cond = torch.full((2,), 14.6, device=DEVICE), unet_cond(2, 7, sdxl)
    with torch.no_grad():
        assert torch.equal(student(x, sigma, cond), teacher(x, sigma, cond))  # lora_B starts at zero
    trainer = SFDTrainer(student, LoRATeacher(student), SFDConfig(num_steps=3, **CONFIG), shape=(4, 8, 8),
                         condition=prompts_condition(sdxl))
    trainer.fit(progress=False)
    after = student.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    lora_keys = {k for k in after if "lora_" in k}
    assert changed and changed <= lora_keys
    assert any("lora_A" in k for k in changed) and any("lora_B" in k for k in changed)
    with torch.no_grad():
        assert not torch.allclose(student(x, sigma, cond), teacher(x, sigma, cond), atol=1e-6)
        # the teacher the trainer saw throughout is the frozen original, with the adapters off
        assert torch.equal(LoRATeacher(student)(x, sigma, cond=cond), teacher(x, sigma, cond))


def test_full_student_trains_every_weight_and_the_teacher_stays():
    unet, sched = tiny_unet(), scheduler()
    teacher = UNetStudent(frozen_copy(unet), sched)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = UNetStudent(unet, sched)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    SFDTrainer(student, teacher, SFDConfig(num_steps=3, **CONFIG), shape=(4, 8, 8),
               condition=prompts_condition()).fit(progress=False)
    trained = [k for k, v in student.state_dict().items() if not torch.equal(v, before[k])]
    assert len(trained) > 0.9 * len(before)
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())


def test_sfd_v_unet_student_starts_as_its_teacher_and_learns_per_step_count():
    unet, sched = tiny_unet(), scheduler()
    teacher = UNetStudent(frozen_copy(unet), sched)
    student = UNetStudent(add_lora(unet, rank=4), sched, step_conditioned=True)
    assert student.step_embedding.mlp[0].weight.requires_grad
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)).to(DEVICE) * 3.0
    sigma, cond = torch.full((2,), 3.0, device=DEVICE), unet_cond(2, 7)
    with torch.no_grad():
        for n in (3, 4):
            assert torch.equal(student(x, sigma, cond, num_steps=n), teacher(x, sigma, cond))
    SFDTrainer(student, LoRATeacher(student), SFDConfig(num_steps=(3, 4), **{**CONFIG, "iterations": 4}),
               shape=(4, 8, 8), condition=prompts_condition()).fit(progress=False)
    with torch.no_grad():
        with adapters_disabled(student.unet):  # the step embedding alone now tells N = 3 from N = 4
            d3, d4 = student(x, sigma, cond, num_steps=3), student(x, sigma, cond, num_steps=4)
        assert not torch.allclose(d3, d4, atol=1e-6)
    with pytest.raises(TypeError, match="not step-conditioned"):
        UNetStudent(tiny_unet(), sched)(x, sigma, cond, num_steps=3)


def test_teacher_guidance_is_one_by_default_and_a_scale_guides_against_the_empty_prompt():
    unet, sched = tiny_unet(), scheduler()
    denoiser = UNetStudent(unet, sched)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)).to(DEVICE) * 2.0
    sigma, cond, uncond = torch.full((2,), 2.0, device=DEVICE), unet_cond(2, 7), unet_cond(1, 8)
    with torch.no_grad():
        c = denoiser(x, sigma, cond)
        u = denoiser(x, sigma, {"encoder_hidden_states": uncond["encoder_hidden_states"].expand(2, -1, -1)})
        assert torch.equal(CFGTeacher(denoiser, uncond)(x, sigma, cond=cond), c)
        guided = CFGTeacher(denoiser, uncond, cond_scale=4.0)(x, sigma, cond=cond)
    assert torch.allclose(guided, u + 4.0 * (c - u), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="needs uncond"):
        CFGTeacher(denoiser, None, cond_scale=4.0)


def tiny_flux(seed: int = 0, guidance_embeds: bool = False):
    torch.manual_seed(seed)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),
    ).to(DEVICE).eval()


def flux_condition(generator, batch):
    seed = int(torch.randint(1000, (), generator=generator))
    g = torch.Generator().manual_seed(seed)
    return {"cond": flow_cond(torch.randn(batch, TOKENS, 16, generator=g).to(DEVICE),
                              torch.randn(batch, 16, generator=g).to(DEVICE))}


@pytest.mark.parametrize("guidance", [None, 3.5])
def test_flux_lora_student_trains_through_the_flow_path(guidance):
    transformer = tiny_flux(guidance_embeds=guidance is not None)
    teacher = FlowTransformerStudent(frozen_copy(transformer), guidance=guidance)
    student = FlowAsVE(FlowTransformerStudent(add_lora(transformer, rank=2), guidance=guidance, step_conditioned=True))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    s = torch.full((2,), 0.7, device=DEVICE)
    cond = flux_condition(torch.Generator().manual_seed(0), 2)["cond"]
    with torch.no_grad():
        assert torch.equal(student.flow_model(x, s, cond, num_steps=3), teacher(x, s, cond))
    SFDTrainer(student, LoRATeacher(student), SFDConfig(num_steps=(3, 4), **CONFIG), shape=(4, 4, 4),
               condition=flux_condition).fit(progress=False)
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k or "step_embedding" in k for k in changed)
    assert any("step_embedding" in k for k in changed) and any("lora_B" in k for k in changed)


def test_bf16_autocast_runs_the_networks_in_bf16_and_keeps_float32_weights():
    unet, sched = tiny_unet(), scheduler()
    student = UNetStudent(add_lora(unet, rank=4), sched)
    seen = set()
    hook = student.unet.conv_in.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    trainer = SFDTrainer(student, LoRATeacher(student), SFDConfig(num_steps=3, **CONFIG), shape=(4, 8, 8),
                         condition=prompts_condition(), autocast=torch.bfloat16)
    loss = trainer.train_batch()
    hook.remove()
    assert seen == {torch.bfloat16} and torch.isfinite(torch.tensor(loss))
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert all(s["exp_avg"].dtype == torch.float32 for s in trainer.optimizer.state.values())
    with pytest.raises(TypeError, match="autocast"):
        SFDTrainer(student, LoRATeacher(student), SFDConfig(num_steps=3, **CONFIG), autocast="bf16")


def test_gradient_checkpointing_trains_the_same_weights(monkeypatch):
    import torch.utils.checkpoint

    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = []
    for checkpointing in (False, True):
        unet = tiny_unet()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        torch.manual_seed(3)
        student = UNetStudent(add_lora(unet, rank=4), scheduler())
        student.unet.train()
        SFDTrainer(student, LoRATeacher(student), SFDConfig(num_steps=3, **CONFIG), shape=(4, 8, 8),
                   condition=prompts_condition()).fit(progress=False)
        results.append({k: v for k, v in student.state_dict().items() if "lora_" in k})
    assert calls  # the checkpointed run recomputed its blocks
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        assert torch.allclose(results[0][key], results[1][key], atol=1e-6), key


def test_a_flow_teacher_with_a_ve_student_and_an_unwrapped_flow_network_are_refused():
    unet_student = UNetStudent(tiny_unet(), scheduler())
    flux = FlowTransformerStudent(tiny_flux())
    config = SFDConfig(num_steps=3, **CONFIG)
    with pytest.raises(ValueError, match="teacher is a flow network and the student a VE"):
        SFDTrainer(unet_student, FlowAsVE(flux), config)
    with pytest.raises(ValueError, match="teacher is a VE .UNet. network and the student a flow"):
        SFDTrainer(FlowAsVE(FlowTransformerStudent(tiny_flux())), CFGTeacher(unet_student), config)
    with pytest.raises(TypeError, match="the student is a flow network"):
        SFDTrainer(FlowTransformerStudent(tiny_flux()), FlowAsVE(flux), config)
    # kdistpp's own diffusers flow adapter, which declares parametrization 'flow', as teacher: called in flow
    # coordinates, it would be handed VE sigmas
    from kdistpp.integrations.diffusers import DiffusersFlowTransformerDenoiser
    with pytest.raises(TypeError, match="the teacher is a flow network"):
        SFDTrainer(FlowAsVE(flux), DiffusersFlowTransformerDenoiser(tiny_flux()), config)


def test_sd3_lora_student_trains_through_the_flow_path_at_a_teacher_cfg():
    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=16, pooled_projection_dim=16, out_channels=4).eval()
    student = FlowAsVE(FlowTransformerStudent(add_lora(transformer, rank=2), step_conditioned=False))
    empty = flow_cond(torch.zeros(1, TOKENS, 16), torch.zeros(1, 16))
    teacher = CFGTeacher(LoRATeacher(student), empty, cond_scale=2.0)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    SFDTrainer(student, teacher, SFDConfig(num_steps=3, **CONFIG), shape=(4, 4, 4), condition=flux_condition).fit(
        progress=False)
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)
