"""The Distillation++ node inside real ComfyUI (the pinned 0.8.0 tree), on tiny random SD1.5 models
and tiny rectified-flow (CONST) Flux, SD3, Wan 2.1, Qwen-Image, Lumina 2, Z-Image, Chroma and HiDream models.

Everything runs through ComfyUI's own code: models built by `comfy.supported_models`, LoRA students
by `comfy.sd.load_lora_for_models` (LoraLoader's path), sampling by the `SamplerCustom` node with
the SAMPLER the V3 node's `execute` returns, and ComfyUI's model management. Needs ComfyUI's
requirements: `.ci/run` runs this file in .venv-comfyui; elsewhere it skips with the reason.

Tolerance at w = 0: ComfyUI keeps sigmas as float32 tensors, kdistpp does its scalar step math in
float64, so the samples agree to float32 rounding, not bit for bit. A random UNet's samples reach a
few hundred, and a one-ulp change of ComfyUI's own float32 sigmas moves its 2S ancestral sample by
2e-6 (at the seed compared) to 6e-5 (other seeds) of that scale after four steps; the absolute
tolerance is 1e-5 of the sample's scale, a seed's change moves it by far more (checked).
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch

import kdistpp
from comfy_models import (FLOW_LATENT, WAN_LATENT, conditioning, controlled, flow_conditioning, lora_clone,
                          tiny_controlnet, tiny_flow, tiny_sd15)
from hosts import import_comfy

BASES = {"euler": "euler", "euler_ancestral": "euler_ancestral", "dpmpp_2s_ancestral": "dpmpp_2s_ancestral",
         "dpmpp_2m": "dpmpp_2m", "consistency": "lcm"}


@pytest.fixture(scope="module")
def comfy():
    return import_comfy(full=True)


@pytest.fixture(scope="module")
def node(comfy):
    from kdistpp.integrations.comfyui_nodes import DistillationPPSampler

    return DistillationPPSampler


class Calls:
    """Counts the forward calls of a UNet (at the model: whatever path calls it) and what it saw."""

    def __init__(self, patcher):
        self.count, self.batches, self.checksums = 0, [], []
        self.module = patcher.model.diffusion_model
        self.handle = self.module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.count += 1
        self.batches.append(args[0].shape[0])
        w = module.input_blocks[1][1].transformer_blocks[0].attn1.to_q.weight
        self.checksums.append(float(w.double().sum()))

    def remove(self):
        self.handle.remove()


def sigmas(comfy, patcher, steps=4, denoise=1.0):
    import comfy_extras.nodes_custom_sampler as ncs

    return ncs.BasicScheduler.execute(patcher, "karras", steps, denoise).result[0]


def sample(comfy, model, sampler, sig, positive=None, negative=None, cfg=1.0, seed=3, latent=None, mask=None):
    import comfy_extras.nodes_custom_sampler as ncs

    image = {"samples": torch.zeros(1, 4, 8, 8) if latent is None else latent}
    if mask is not None:
        image["noise_mask"] = mask
    out = ncs.SamplerCustom.execute(model, True, seed, cfg, positive or conditioning(1), negative or conditioning(2),
                                    sampler, sig, image)
    return out.result[0]["samples"]


def distpp(node, teacher, base, w, **kw):
    options = dict(teacher_positive=conditioning(1), teacher_negative=conditioning(2), teacher_cfg=3.0,
                   base_sampler=base, w=w, guided_steps=1, form="interpolate", renoise="next")
    options.update(kw)
    return node.execute(teacher, **options).result[0]


@pytest.mark.parametrize("base", BASES)
def test_w0_equals_comfyuis_own_sampler_at_the_same_seed(comfy, node, base):
    teacher = tiny_sd15(comfy, 0)
    student = lora_clone(comfy, teacher, 1)
    sig = sigmas(comfy, student)
    theirs = sample(comfy, student, comfy.samplers.ksampler(BASES[base]), sig, seed=11)
    calls = Calls(teacher)
    ours = sample(comfy, student, distpp(node, teacher, base, 0.0), sig, seed=11)
    calls.remove()
    atol = 1e-5 * float(theirs.abs().max())  # float32 rounding at the sample's scale (module docstring)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=atol)
    other_seed = sample(comfy, student, comfy.samplers.ksampler(BASES[base]), sig, seed=12)
    assert (other_seed - theirs).abs().max() > 100 * atol  # the comparison can fail
    assert calls.count == len(sig) - 1 + (len(sig) - 2 if base == "dpmpp_2s_ancestral" else 0)  # student calls only


@pytest.mark.parametrize("base", ["euler", "euler_ancestral", "consistency"])
def test_lora_student_keeps_its_patches_around_every_teacher_call(comfy, node, base):
    teacher = tiny_sd15(comfy, 0)
    student = lora_clone(comfy, teacher, 1)
    sig = sigmas(comfy, student)
    calls = Calls(teacher)  # the one UNet module both patchers share
    guided = sample(comfy, student, distpp(node, teacher, base, 0.5, guided_steps=2), sig, cfg=1.0)
    calls.remove()
    # student, teacher (cfg 3: batch 2), student, teacher, student, student
    assert calls.batches == [1, 2, 1, 2, 1, 1]
    lora, base_sum = calls.checksums[0], calls.checksums[1]
    assert lora != pytest.approx(base_sum)  # the LoRA changes the weights the student samples with
    assert calls.checksums == pytest.approx([lora, base_sum, lora, base_sum, lora, lora])
    plain_base = sample(comfy, teacher, comfy.samplers.ksampler(BASES[base]), sig)
    assert (guided - plain_base).abs().max() > 1e-3


def test_teacher_is_not_loaded_at_w0_or_with_no_guided_step(comfy, node, monkeypatch):
    teacher, student = tiny_sd15(comfy, 0), tiny_sd15(comfy, 5)
    sig = sigmas(comfy, student)
    loaded = []
    original = comfy.model_management.load_models_gpu
    monkeypatch.setattr(comfy.model_management, "load_models_gpu",
                        lambda models, *a, **k: (loaded.extend(models), original(models, *a, **k))[1])
    calls = Calls(teacher)
    sample(comfy, student, distpp(node, teacher, "euler", 0.0), sig)
    with pytest.warns(kdistpp.GuidanceWarning, match="guides no step"):  # the core says so; the run is unguided
        sample(comfy, student, distpp(node, teacher, "euler", 0.4, guided_steps=0), sig)
    assert calls.count == 0 and all(m is not teacher for m in loaded)
    sample(comfy, student, distpp(node, teacher, "euler", 0.4, guided_steps=1), sig)
    calls.remove()
    assert calls.count == 1 and calls.batches == [2] and any(m is teacher for m in loaded)


def test_models_the_students_sampling_loaded_are_loaded_again_after_each_teacher_call(comfy, node, monkeypatch):
    """A ControlNet on the student's conditioning (ComfyUI's ControlNetApplyAdvanced) is loaded by the
    student's sampling; the teacher's load may evict it (here the host has room for one sampling's
    models, as a small GPU would). After each teacher call the student's patcher is loaded again
    together with what its sampling loaded, with the memory estimate that sampling used."""
    management = comfy.model_management
    teacher, student = tiny_sd15(comfy, 0), tiny_sd15(comfy, 5)
    control_net = tiny_controlnet(comfy, 2)
    positive, negative = controlled(comfy, control_net, conditioning(1), conditioning(2))
    original = management.load_models_gpu
    student_loads = []  # (models, memory_required, minimum_memory_required) of each load with the student

    def room_for_one_sampling(models, *args, **kwargs):
        if any(m is teacher for m in models):
            management.unload_all_models()
        if any(m is student for m in models):
            student_loads.append(({id(m) for m in models}, kwargs.get("memory_required"),
                                  kwargs.get("minimum_memory_required")))
        return original(models, *args, **kwargs)

    monkeypatch.setattr(management, "load_models_gpu", room_for_one_sampling)
    seen = []  # at each ControlNet call (one per student call): are the ControlNet and the student loaded
    hook = control_net.control_model.register_forward_pre_hook(lambda module, args: seen.append(
        (control_net.control_model_wrapped in management.loaded_models(), student in management.loaded_models())))
    calls = Calls(teacher)
    sig = sigmas(comfy, student)
    try:
        sample(comfy, student, distpp(node, teacher, "euler", 0.5, guided_steps=2), sig,
               positive=positive, negative=negative)
    finally:
        hook.remove()
        calls.remove()
    assert calls.count == 2  # two teacher calls, each of which evicted the student's models
    assert seen == [(True, True)] * (len(sig) - 1)
    assert len(student_loads) == 3  # the student's sampling, then once after each teacher call
    assert id(control_net.control_model_wrapped) in student_loads[0][0] and student_loads[0][1] > 0
    assert student_loads[1] == student_loads[0] and student_loads[2] == student_loads[0]


def test_teacher_gets_comfyuis_model_preparation(comfy, node):
    """Wrappers registered on the teacher's patcher and transformer_options reach its model calls."""
    import comfy.patcher_extension as ext

    teacher, student = tiny_sd15(comfy, 0), tiny_sd15(comfy, 5)
    teacher = teacher.clone()
    seen = []

    def wrapper(executor, *args, **kwargs):
        seen.append(args[-1].get("sample_sigmas") if isinstance(args[-1], dict) else None)
        return executor(*args, **kwargs)

    teacher.add_wrapper_with_key(ext.WrappersMP.DIFFUSION_MODEL, "kdistpp-test", wrapper)
    sig = sigmas(comfy, student)
    sample(comfy, student, distpp(node, teacher, "euler", 0.4), sig)
    assert len(seen) == 1  # the teacher's one call went through its wrapper
    assert seen[0] is not None and torch.equal(seen[0].cpu(), sig.cpu())  # with the student's schedule


def test_renoise_noise_follows_the_seed_and_draws_nothing_from_the_global_rng(comfy, node):
    """The renoise noise has its own generator seeded from ComfyUI's seed: the same seed gives the
    same image, and a guided run leaves the global RNG (which ComfyUI seeds when it makes the
    starting noise, and other nodes draw from) where an unguided run leaves it."""
    teacher, student = tiny_sd15(comfy, 0), tiny_sd15(comfy, 5)
    sig = sigmas(comfy, student)

    def run(seed, w):
        out = sample(comfy, student, distpp(node, teacher, "euler_ancestral", w), sig, seed=seed)
        return out, torch.rand(4)

    (a, after_guided), (b, _) = run(7, 0.4), run(7, 0.4)
    torch.testing.assert_close(a, b)
    _, after_plain = run(7, 0.0)
    torch.testing.assert_close(after_guided, after_plain)
    assert (run(8, 0.4)[0] - a).abs().max() > 1e-3


@pytest.mark.parametrize("base", ["euler", "euler_ancestral"])
def test_random_renoise_level_comes_from_the_seeded_generator_not_the_global_rng(comfy, node, base):
    """renoise='random' draws its level (and the renoise noise) from the node's generator seeded from
    ComfyUI's seed: the global RNG is where sampling found it, and the same seed gives the same image."""
    teacher, student = tiny_sd15(comfy, 0), tiny_sd15(comfy, 5)
    sig = sigmas(comfy, student)
    states = []

    def run(seed):
        sampler = distpp(node, teacher, base, 0.4, guided_steps=2, renoise="random")
        inner = sampler.sampler_function

        def recorded(*args, **kwargs):  # the global RNG around the sampler's whole run, teacher calls included
            before = torch.get_rng_state()
            try:
                return inner(*args, **kwargs)
            finally:
                states.append((before, torch.get_rng_state()))

        sampler.sampler_function = recorded
        return sample(comfy, student, sampler, sig, seed=seed)

    calls = Calls(teacher)
    a, b = run(7), run(7)
    calls.remove()
    assert calls.count == 4  # two guided steps per run
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(torch.equal(before, after) for before, after in states)
    assert (run(8) - a).abs().max() > 1e-3


@pytest.mark.parametrize("seed", [0xFFFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF - 0x5EED])
def test_the_top_seeds_renoise_without_overflow(comfy, node, seed):
    """ComfyUI's seed widget goes up to 2**64 - 1; the renoise stream's seed (the seed plus an offset)
    wraps into what torch.Generator takes, including the seed whose offset lands on 2**64 - 1
    (ComfyUI's own CPU noise sampler adds 1 to the seed it is given)."""
    teacher, student = tiny_sd15(comfy, 0), tiny_sd15(comfy, 5)
    sig = sigmas(comfy, student)
    calls = Calls(teacher)
    out = sample(comfy, student, distpp(node, teacher, "euler", 0.4), sig, seed=seed)
    calls.remove()
    again = sample(comfy, student, distpp(node, teacher, "euler", 0.4), sig, seed=seed)
    assert calls.count == 1 and torch.isfinite(out).all()
    torch.testing.assert_close(out, again)


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_img2img_and_inpaint_with_a_teacher(comfy, node, mode):
    teacher, student = tiny_sd15(comfy, 0), tiny_sd15(comfy, 5)
    sig = sigmas(comfy, student, steps=4, denoise=0.6)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    mask = None
    if mode == "inpaint":
        mask = torch.zeros(1, 8, 8)
        mask[:, 2:6, 2:6] = 1.0
    calls = Calls(teacher)
    out = sample(comfy, student, distpp(node, teacher, "euler", 0.5), sig, latent=latent, mask=mask)
    calls.remove()
    plain = sample(comfy, student, distpp(node, teacher, "euler", 0.0), sig, latent=latent, mask=mask)
    assert calls.count == 1 and torch.isfinite(out).all()
    changed = (out - plain).abs() > 1e-4
    if mode == "inpaint":  # the teacher changes the masked region only; the rest is the source latent
        assert changed[..., 2:6, 2:6].any() and not changed[..., :2, :].any()
        torch.testing.assert_close(out[..., :2, :], latent[..., :2, :] * 1.0, rtol=1e-4, atol=1e-4)
    else:
        assert changed.any()


def flow_sampling(comfy, patcher):
    """ComfyUI's own ModelSamplingSD3 node on a tiny SD1.5 patcher: a flow-matching (CONST) model_sampling."""
    import comfy_extras.nodes_model_advanced as advanced

    return advanced.ModelSamplingSD3().patch(patcher, 3.0)[0]


@pytest.mark.parametrize("which", ["sampled", "teacher"])
def test_a_flow_and_a_ve_model_together_are_refused_at_sampling_time_before_any_model_call(comfy, node, which):
    """The node has no student input: the model SamplerCustom samples is checked when it samples,
    and the error (which ComfyUI shows as SamplerCustom's) names the input to change. Here the two
    share a latent space and differ in their model sampling alone (one CONST)."""
    from kdistpp.integrations.comfyui import SAMPLED, TEACHER

    teacher, student = tiny_sd15(comfy, 0), tiny_sd15(comfy, 5)
    sig = sigmas(comfy, student)
    if which == "sampled":
        student, flow, ve = flow_sampling(comfy, student), SAMPLED, TEACHER
    else:
        teacher, flow, ve = flow_sampling(comfy, teacher), TEACHER, SAMPLED
    sampler = distpp(node, teacher, "euler", 0.3)  # building it checks nothing
    calls = [Calls(teacher), Calls(student)]
    try:
        with pytest.raises(ValueError, match="parametrized differently") as err:
            sample(comfy, student, sampler, sig)
    finally:
        for c in calls:
            c.remove()
    assert f"{flow} is a rectified-flow model" in str(err.value) and f"{ve} is a VE" in str(err.value)
    assert [c.count for c in calls] == [0, 0]


def test_a_teacher_from_another_latent_space_is_refused_when_the_student_samples(comfy, node):
    """Checked against the model SamplerCustom actually samples: one node, sampled by a student of
    the teacher's latent space (fine) and by one of another (refused before any model call)."""
    import comfy.latent_formats

    teacher = tiny_sd15(comfy, 0)
    same, other = tiny_sd15(comfy, 5), tiny_sd15(comfy, 6, latent_format=comfy.latent_formats.SDXL())
    sig = sigmas(comfy, same)
    sampler = distpp(node, teacher, "euler", 0.3)
    assert torch.isfinite(sample(comfy, same, sampler, sig)).all()
    calls = [Calls(teacher), Calls(other)]
    try:
        with pytest.raises(ValueError, match="different latent spaces") as err:
            sample(comfy, other, sampler, sig)
    finally:
        for c in calls:
            c.remove()
    assert "`teacher` input" in str(err.value) and "SD15" in str(err.value) and "SDXL" in str(err.value)
    assert [c.count for c in calls] == [0, 0]


FLOW_FAMILIES = ["flux", "sd3"]
# More rectified-flow image families, from ComfyUI's own classes: Qwen-Image (ModelSamplingFlux, shift 1.15;
# 5-D latents), Lumina 2 and Z-Image (NextDiT, ModelSamplingDiscreteFlow, shift 6 / 3), Chroma
# (ModelSamplingFlux; Flux's blocks modulated by one Approximator MLP) and HiDream (ModelSamplingDiscreteFlow,
# t = 1000 s; mixture-of-experts blocks, Llama-3 and T5 text).
IMAGE_FLOW_FAMILIES = FLOW_FAMILIES + ["qwen_image", "lumina2", "z_image", "chroma", "hidream"]


class Inputs:
    """Counts the forward calls of any diffusion model (at the model) and keeps its inputs x, t."""

    def __init__(self, patcher):
        self.calls = []
        self.handle = patcher.model.diffusion_model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls.append((args[0].detach().clone(), args[1].detach().clone()))

    def remove(self):
        self.handle.remove()


def flow_sample(comfy, model, sampler, sig, seed=3, family=None):
    return sample(comfy, model, sampler, sig, positive=flow_conditioning(1, family=family),
                  negative=flow_conditioning(2, family=family), seed=seed, latent=torch.zeros(FLOW_LATENT))


def flow_distpp(node, teacher, base, w, family=None, **kw):
    return distpp(node, teacher, base, w, teacher_positive=flow_conditioning(3, family=family),
                  teacher_negative=flow_conditioning(4, family=family), **kw)


def flow_sigmas(comfy, patcher, steps=4):
    """ComfyUI's `simple` schedule in the model's own flow sigmas s: it starts at s = 1 (pure noise)."""
    import comfy_extras.nodes_custom_sampler as ncs

    sig = ncs.BasicScheduler.execute(patcher, "simple", steps, 1.0).result[0]
    assert float(sig[0]) == 1.0 and float(sig[-1]) == 0.0
    return sig


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("family", IMAGE_FLOW_FAMILIES)
def test_flow_models_at_w0_equal_comfyuis_own_sampler_at_the_same_seed(comfy, node, family, base):
    """A rectified-flow (CONST) student, Flux, SD3, Qwen-Image, Lumina 2, Z-Image, Chroma or HiDream from
    ComfyUI's own classes: the node samples it with parametrization='flow' and gives ComfyUI's image, whose samplers
    take their *_RF variants."""
    teacher, student = tiny_flow(comfy, family, 0), tiny_flow(comfy, family, 1)
    assert isinstance(student.get_model_object("model_sampling"), comfy.model_sampling.CONST)
    sig = flow_sigmas(comfy, student)
    theirs = flow_sample(comfy, student, comfy.samplers.ksampler(BASES[base]), sig, seed=11, family=family)
    calls = Inputs(teacher)
    ours = flow_sample(comfy, student, flow_distpp(node, teacher, base, 0.0, family=family), sig, seed=11,
                       family=family)
    calls.remove()
    atol = 1e-5 * float(theirs.abs().max())  # float32 rounding at the sample's scale (module docstring)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=atol)
    other_seed = flow_sample(comfy, student, comfy.samplers.ksampler(BASES[base]), sig, seed=12, family=family)
    assert (other_seed - theirs).abs().max() > 100 * atol  # the comparison can fail
    assert calls.calls == []


@pytest.mark.parametrize("family", IMAGE_FLOW_FAMILIES)
def test_a_flow_teacher_is_handed_the_flow_renoised_student_estimate(comfy, node, family):
    """With the teacher on, the teacher is called once (counted at its model) at s_r = the next sigma,
    on x_r = (1 - s_r) x0s + s_r n built from the student's estimate x0s: regressed on x0s it has
    slope 1 - s_r and a residual of scale s_r (a VE renoise x0s + sigma n would give slope 1)."""
    teacher, student = tiny_flow(comfy, family, 0), tiny_flow(comfy, family, 1).clone()
    estimates = []

    def record(args):  # the student's CFG'd estimate at each of its calls, as SamplerCustom gets it
        estimates.append((float(args["sigma"].flatten()[0]), args["denoised"].detach().clone()))
        return args["denoised"]

    student.set_model_sampler_post_cfg_function(record)
    sig = flow_sigmas(comfy, student)
    inputs = Inputs(teacher)
    try:
        out = flow_sample(comfy, student, flow_distpp(node, teacher, "euler", 0.3, renoise="next", family=family), sig,
                          family=family)
    finally:
        inputs.remove()
    assert torch.isfinite(out).all()
    assert len(inputs.calls) == 1  # one guided step, one batched (cond + uncond) teacher call
    x_r, t = inputs.calls[0]
    s_r = float(sig[1])
    assert torch.allclose(t.double(), teacher.get_model_object("model_sampling").timestep(sig[1:2]).double())
    assert estimates[0][0] == 1.0
    x0s = estimates[0][1].double().flatten()
    x_r = x_r[0].double().flatten()
    assert torch.equal(inputs.calls[0][0][0], inputs.calls[0][0][1])  # cond and uncond rows: one point
    assert_flow_renoised(x_r, x0s, s_r)


def assert_flow_renoised(x_r, x0s, s_r):
    """x_r is (1 - s_r) x0s + s_r n: regressed on x0s, slope 1 - s_r and a unit-noise residual scaled by s_r."""
    a, b = x0s - x0s.mean(), x_r - x_r.mean()
    slope = float((a * b).sum() / (a * a).sum())
    residual = x_r - (1 - s_r) * x0s
    assert abs(slope - (1 - s_r)) < 0.05 * s_r, (slope, 1 - s_r)
    assert abs(float(residual.std()) / s_r - 1) < 0.1  # unit noise scaled by s_r
    assert abs(float(residual.mean())) < 0.1 * s_r


@pytest.mark.parametrize("which", ["sampler", "guider"])
def test_a_1_step_flow_student_guided_at_its_only_step_renoises_at_half_not_pure_noise(comfy, node, which):
    """A 1-step Flux schedule [1, 0] with renoise 'current' (the only level a step to 0 has): s = 1 is pure
    noise, so the teacher is called at s_r = 0.5 on the student's estimate renoised there, and the run warns."""
    import comfy_extras.nodes_custom_sampler as ncs

    from kdistpp.integrations.comfyui_nodes import DistillationPPGuider

    teacher, student = tiny_flow(comfy, "flux", 0), tiny_flow(comfy, "flux", 1).clone()
    estimates = []

    def record(args):
        estimates.append(args["denoised"].detach().clone())
        return args["denoised"]

    student.set_model_sampler_post_cfg_function(record)
    sig = flow_sigmas(comfy, student, steps=1)
    inputs = Inputs(teacher)
    try:
        with pytest.warns(kdistpp.GuidanceWarning, match="pure noise"):
            if which == "sampler":
                flow_sample(comfy, student, flow_distpp(node, teacher, "euler", 0.3, renoise="current"), sig)
            else:
                guider = DistillationPPGuider.execute(student, flow_conditioning(1), flow_conditioning(2), 1.0, teacher,
                                                      flow_conditioning(3), flow_conditioning(4), 3.0, w=0.3,
                                                      guided_steps=1, form="interpolate", renoise="current").result[0]
                ncs.SamplerCustomAdvanced.execute(ncs.RandomNoise.execute(3).result[0], guider,
                                                  ncs.KSamplerSelect.execute("euler").result[0], sig,
                                                  {"samples": torch.zeros(FLOW_LATENT)})
    finally:
        inputs.remove()
    assert len(inputs.calls) == 1
    x_r, t = inputs.calls[0]
    assert torch.allclose(t.double(), torch.tensor(0.5, dtype=torch.float64))  # Flux's timestep is s
    assert_flow_renoised(x_r[0].double().flatten(), estimates[0].double().flatten(), 0.5)


@pytest.mark.parametrize("which", ["sampled", "teacher"])
@pytest.mark.parametrize("family", FLOW_FAMILIES)
def test_an_sd15_teacher_for_a_flow_student_and_the_reverse_are_refused(comfy, node, family, which):
    """Student and teacher must share the parametrization: refused when sampling starts, before
    any model call, with an error naming which input is the flow model and which is not."""
    from kdistpp.integrations.comfyui import SAMPLED, TEACHER

    sd15, flow = tiny_sd15(comfy, 0), tiny_flow(comfy, family, 1)
    if which == "sampled":  # a flow student with an SD1.5 teacher
        student, teacher, flow_input, ve_input = flow, sd15, SAMPLED, TEACHER
        run = lambda sampler: flow_sample(comfy, student, sampler, flow_sigmas(comfy, student))  # noqa: E731
    else:
        student, teacher, flow_input, ve_input = sd15, flow, TEACHER, SAMPLED
        run = lambda sampler: sample(comfy, student, sampler, sigmas(comfy, student))  # noqa: E731
    sampler = distpp(node, teacher, "euler", 0.3)  # building it checks nothing
    calls = [Inputs(teacher), Inputs(student)]
    try:
        with pytest.raises(ValueError, match="parametrized differently") as err:
            run(sampler)
    finally:
        for c in calls:
            c.remove()
    assert f"{flow_input} is a rectified-flow model" in str(err.value)
    assert f"{ve_input} is a VE" in str(err.value)
    assert [len(c.calls) for c in calls] == [0, 0]


class Forwards:
    """Each forward call of a diffusion model (at the model): its inputs, output, the guidance it got
    and the checksum of one of its weights (`weight`, a parameter name), as the call saw them."""

    def __init__(self, patcher, weight=None):
        self.calls, self.weight = [], weight
        module = patcher.model.diffusion_model
        self.handles = [module.register_forward_pre_hook(self.before, with_kwargs=True),
                        module.register_forward_hook(self.after)]

    def before(self, module, args, kwargs):
        guidance = kwargs.get("guidance")
        weight = module.get_parameter(self.weight) if self.weight else None
        inputs = {k: v.detach().clone() for k, v in kwargs.items()
                  if k in ("context", "y", "guidance") and v is not None}
        self.calls.append({"x": args[0].detach().clone(), "t": args[1].detach().clone(), "inputs": inputs,
                           "guidance": None if guidance is None else guidance.detach().clone(),
                           "checksum": None if weight is None else float(weight.double().sum())})

    def after(self, module, args, output):
        self.calls[-1]["output"] = output.detach().clone()

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("family", FLOW_FAMILIES)
def test_a_flow_lora_student_keeps_its_patches_around_every_teacher_call(comfy, node, family):
    """A LoRA student on a Flux or SD3 base with that base as its teacher (LoraLoader's clone +
    add_patches): one transformer, patched for every student call and unpatched for every teacher
    call, whose output is the base's own on the same inputs."""
    teacher = tiny_flow(comfy, family, 0)
    student = lora_clone(comfy, teacher, 1)
    weight = min(student.patches)[len("diffusion_model."):]
    sig = flow_sigmas(comfy, student)
    calls = Forwards(teacher, weight)  # the one transformer both patchers share
    try:
        guided = flow_sample(comfy, student, flow_distpp(node, teacher, "euler", 0.5, guided_steps=2), sig)
    finally:
        calls.remove()
    assert torch.isfinite(guided).all()
    # student, teacher (cfg 3: batch 2), student, teacher, student, student
    assert [c["x"].shape[0] for c in calls.calls] == [1, 2, 1, 2, 1, 1]
    lora, base_sum = calls.calls[0]["checksum"], calls.calls[1]["checksum"]
    assert lora != pytest.approx(base_sum)  # the LoRA changes the weights the student samples with
    assert [c["checksum"] for c in calls.calls] == pytest.approx([lora, base_sum, lora, base_sum, lora, lora])
    base = tiny_flow(comfy, family, 0).model.diffusion_model  # the same seed: the base's weights, never patched
    for i in (1, 3):
        call = calls.calls[i]
        with torch.no_grad():
            expected = base(call["x"], call["t"], **call["inputs"])
        torch.testing.assert_close(call["output"], expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the LoRA's output on the teacher's inputs differs: the comparison can fail
        patched = lora_clone(comfy, tiny_flow(comfy, family, 0), 1)
        patched.patch_model()
        lora_out = patched.model.diffusion_model(calls.calls[1]["x"], calls.calls[1]["t"], **calls.calls[1]["inputs"])
        patched.unpatch_model()
    assert (lora_out - calls.calls[1]["output"]).abs().max() > 1e-3


def test_flux_guidance_on_the_teachers_conditioning_reaches_the_teacher(comfy, node):
    """Flux's distilled guidance: FluxGuidance (comfy_extras.nodes_flux) on the teacher's conditioning
    sets what the teacher's transformer receives; the student receives its own conditioning's."""
    from comfy_extras.nodes_flux import FluxGuidance

    teacher, student = tiny_flow(comfy, "flux", 0), tiny_flow(comfy, "flux", 1)
    guidance = lambda cond, value: FluxGuidance.execute(cond, value).result[0]  # noqa: E731
    sig = flow_sigmas(comfy, student)
    sampler = distpp(node, teacher, "euler", 0.3, teacher_positive=guidance(flow_conditioning(3), 4.5),
                     teacher_negative=guidance(flow_conditioning(4), 4.5))
    t_calls, s_calls = Forwards(teacher), Forwards(student)
    try:
        out = sample(comfy, student, sampler, sig, positive=guidance(flow_conditioning(1), 1.25),
                     negative=flow_conditioning(2), latent=torch.zeros(FLOW_LATENT))
    finally:
        t_calls.remove()
        s_calls.remove()
    assert torch.isfinite(out).all()
    assert len(t_calls.calls) == 1 and len(s_calls.calls) == len(sig) - 1
    assert t_calls.calls[0]["guidance"].tolist() == [4.5, 4.5]  # cond and uncond rows of its one call
    assert all(c["guidance"].tolist() == [1.25] for c in s_calls.calls)  # the student's cfg 1: cond only


def shifted(comfy, family, patcher):
    """ComfyUI's ModelSamplingSD3 / ModelSamplingFlux node on the patcher: another shift."""
    import comfy_extras.nodes_model_advanced as advanced

    if family == "sd3":
        return advanced.ModelSamplingSD3().patch(patcher, 6.0)[0]
    return advanced.ModelSamplingFlux().patch(patcher, 2.0, 1.0, 512, 512)[0]


@pytest.mark.parametrize("which", ["student", "teacher"])
@pytest.mark.parametrize("family", FLOW_FAMILIES)
def test_a_shifted_flow_student_or_teacher(comfy, node, family, which):
    """ModelSamplingSD3 / ModelSamplingFlux on the student or the teacher. A shifted student: its
    schedule is the shifted one and at w = 0 the node gives ComfyUI's image. Either way the teacher is
    evaluated at the student's s: the shift changes the schedule, not the map from s to the timestep."""
    teacher, student = tiny_flow(comfy, family, 0), tiny_flow(comfy, family, 1)
    plain_sig = flow_sigmas(comfy, student)
    if which == "student":
        student = shifted(comfy, family, student)
    else:
        teacher = shifted(comfy, family, teacher)
    sig = flow_latent_sigmas(comfy, student, 1.0)  # Flux's shifted table starts a float32 ulp below s = 1
    assert float(sig[0]) == pytest.approx(1.0, abs=1e-6)
    assert (sig - plain_sig).abs().max() > 0.01 if which == "student" else torch.equal(sig, plain_sig)
    if which == "student":
        for base in ("euler", "euler_ancestral"):
            theirs = flow_sample(comfy, student, comfy.samplers.ksampler(base), sig, seed=11)
            ours = flow_sample(comfy, student, flow_distpp(node, teacher, base, 0.0), sig, seed=11)
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * float(theirs.abs().max()))
    calls = Forwards(teacher)
    try:
        out = flow_sample(comfy, student, flow_distpp(node, teacher, "euler", 0.3), sig)
    finally:
        calls.remove()
    assert torch.isfinite(out).all() and len(calls.calls) == 1
    multiplier = 1000.0 if family == "sd3" else 1.0  # SD3: t = 1000 s; Flux: t = s, whatever the shift
    expected = teacher.get_model_object("model_sampling").timestep(sig[1:2]).double()
    assert torch.allclose(calls.calls[0]["t"].double(), expected.expand(2))
    assert torch.allclose(expected, sig[1:2].double() * multiplier, rtol=1e-6)


def flow_latent_sigmas(comfy, patcher, denoise):
    import comfy_extras.nodes_custom_sampler as ncs

    return ncs.BasicScheduler.execute(patcher, "simple", 4, denoise).result[0]


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
@pytest.mark.parametrize("family", FLOW_FAMILIES)
def test_flow_img2img_and_inpaint_with_a_teacher(comfy, node, family, mode):
    """denoise 0.6 from a source latent, and a noise mask, with a flow student and teacher."""
    teacher, student = tiny_flow(comfy, family, 0), tiny_flow(comfy, family, 1)
    sig = flow_latent_sigmas(comfy, student, 0.6)
    assert float(sig[0]) < 1.0
    latent = torch.randn(FLOW_LATENT, generator=torch.Generator().manual_seed(4))
    mask = None
    if mode == "inpaint":
        mask = torch.zeros(1, 8, 8)
        mask[:, 2:6, 2:6] = 1.0

    def run(w):
        return sample(comfy, student, flow_distpp(node, teacher, "euler", w), sig, positive=flow_conditioning(1),
                      negative=flow_conditioning(2), latent=latent, mask=mask)

    calls = Forwards(teacher)
    try:
        out = run(0.5)
    finally:
        calls.remove()
    plain = run(0.0)
    assert len(calls.calls) == 1 and torch.isfinite(out).all()
    changed = (out - plain).abs() > 1e-4
    if mode == "inpaint":  # the teacher changes the masked region only; the rest is the source latent
        assert changed[..., 2:6, 2:6].any() and not changed[..., :2, :].any()
        torch.testing.assert_close(out[..., :2, :], latent[..., :2, :], rtol=1e-4, atol=1e-4)
    else:
        assert changed.any()


def wan_sample(comfy, model, sampler, sig, seed=3, latent=None, add_noise=True):
    """SamplerCustom on a Wan video latent (5-D), as the Wan workflows run it (cfg 1 here: one call)."""
    import comfy_extras.nodes_custom_sampler as ncs

    image = {"samples": torch.zeros(WAN_LATENT) if latent is None else latent}
    out = ncs.SamplerCustom.execute(model, add_noise, seed, 1.0, conditioning(1), conditioning(2), sampler, sig, image)
    return out.result[0]["samples"]


def wan_distpp(node, teacher, base, w, **kw):
    return distpp(node, teacher, base, w, teacher_positive=conditioning(3), teacher_negative=conditioning(4), **kw)


@pytest.mark.parametrize("base", BASES)
def test_wan21_video_at_w0_equals_comfyuis_own_sampler_at_the_same_seed(comfy, node, base):
    """Wan 2.1 text-to-video (comfy.supported_models.WAN21_T2V, 5-D latents, shift 8): w = 0 gives
    ComfyUI's own sampler's video at the same seed, the teacher untouched."""
    teacher, student = tiny_flow(comfy, "wan21", 0), tiny_flow(comfy, "wan21", 1)
    assert isinstance(student.get_model_object("model_sampling"), comfy.model_sampling.CONST)
    sig = flow_sigmas(comfy, student)
    theirs = wan_sample(comfy, student, comfy.samplers.ksampler(BASES[base]), sig, seed=11)
    assert theirs.shape == WAN_LATENT
    calls = Forwards(teacher)
    ours = wan_sample(comfy, student, wan_distpp(node, teacher, base, 0.0), sig, seed=11)
    calls.remove()
    atol = 1e-5 * float(theirs.abs().max())
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=atol)
    other_seed = wan_sample(comfy, student, comfy.samplers.ksampler(BASES[base]), sig, seed=12)
    assert (other_seed - theirs).abs().max() > 100 * atol  # the comparison can fail
    assert calls.calls == []


def test_wan22_two_experts_each_guided_by_its_own_teacher(comfy, node):
    """Wan 2.2 A14B's split: SplitSigmas cuts one schedule; the high-noise expert samples the first part
    (SamplerCustom, add_noise on) and the low-noise expert the rest (add_noise off), each SamplerCustom
    with its own Distillation++ node and teacher. Each teacher is called only at its own part's sigmas."""
    import comfy_extras.nodes_custom_sampler as ncs

    high_teacher, low_teacher = tiny_flow(comfy, "wan21", 0), tiny_flow(comfy, "wan21", 2)
    high, low = tiny_flow(comfy, "wan21", 1), tiny_flow(comfy, "wan21", 3)
    sig = ncs.BasicScheduler.execute(high, "simple", 6, 1.0).result[0]
    high_sig, low_sig = ncs.SplitSigmas.execute(sig, 3).result
    models = {"high teacher": high_teacher, "low teacher": low_teacher, "high": high, "low": low}

    def run(w):
        calls = {name: Forwards(m) for name, m in models.items()}
        try:
            first = wan_sample(comfy, high, wan_distpp(node, high_teacher, "euler", w, guided_steps=2), high_sig)
            video = wan_sample(comfy, low, wan_distpp(node, low_teacher, "euler", w, guided_steps=2), low_sig,
                               latent=first, add_noise=False)
        finally:
            for c in calls.values():
                c.remove()
        return video, {name: [c["t"].double() for c in c_.calls] for name, c_ in calls.items()}

    video, t = run(0.3)
    plain, t_plain = run(0.0)
    assert torch.isfinite(video).all() and video.shape == WAN_LATENT
    assert (video - plain).abs().max() > 1e-4
    timestep = lambda m, s: m.get_model_object("model_sampling").timestep(s).double()  # noqa: E731
    assert [float(x[0]) for x in t["high"]] == pytest.approx([float(timestep(high, s)) for s in high_sig[:-1]])
    assert [float(x[0]) for x in t["low"]] == pytest.approx([float(timestep(low, s)) for s in low_sig[:-1]])
    # renoise 'next': each guided step's teacher at its own part's next sigma (two per part), cond + uncond
    assert [x.tolist() for x in t["high teacher"]] == [[pytest.approx(float(timestep(high_teacher, s)))] * 2
                                                       for s in high_sig[1:3]]
    assert [x.tolist() for x in t["low teacher"]] == [[pytest.approx(float(timestep(low_teacher, s)))] * 2
                                                      for s in low_sig[1:3]]
    assert all(float(x.min()) >= float(timestep(high, high_sig[-1])) for x in t["high teacher"])
    assert all(float(x.max()) <= float(timestep(low, low_sig[0])) for x in t["low teacher"])
    assert t_plain["high teacher"] == [] and t_plain["low teacher"] == []


def test_guided_steps_past_the_schedule_fail_clearly(comfy, node):
    teacher, student = tiny_sd15(comfy, 0), tiny_sd15(comfy, 5)
    with pytest.raises(ValueError, match=r"guided_steps=9 \(an input of the Distillation\+\+ Sampler"):
        sample(comfy, student, distpp(node, teacher, "euler", 0.3, guided_steps=9), sigmas(comfy, student))


@pytest.mark.parametrize("folder", ["kdistpp", "ComfyUI-kdistpp"])
def test_a_clone_or_copy_of_the_repository_loads_as_a_custom_node(comfy, tmp_path, folder):
    """What ComfyUI-Manager does (git clone into custom_nodes/), loaded by ComfyUI's own loader."""
    import asyncio

    import nodes

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    target = tmp_path / "custom_nodes" / folder
    shutil.copytree(repo, target, ignore=shutil.ignore_patterns(".venv*", ".git", "__pycache__", "docs", "benchmarks",
                                                              "*.egg-info", ".hypothesis", "kdistpp-demo"))
    saved = {k: v for k, v in sys.modules.items() if k == "kdistpp" or k.startswith("kdistpp.")}
    for k in saved:
        del sys.modules[k]  # as in a fresh ComfyUI process, where kdistpp is not installed
    before = dict(nodes.NODE_CLASS_MAPPINGS)
    try:
        ok = asyncio.run(nodes.load_custom_node(str(target)))
        assert ok, "ComfyUI reported IMPORT FAILED"
        for node_id in ("KdistppDistillationPPSampler", "KdistppDistillationPPGuider"):  # from comfy_entrypoint
            assert nodes.NODE_CLASS_MAPPINGS[node_id].GET_SCHEMA().node_id == node_id
        assert sys.modules["kdistpp"].__file__.startswith(str(target))
    finally:
        nodes.NODE_CLASS_MAPPINGS.clear()
        nodes.NODE_CLASS_MAPPINGS.update(before)
        for k in [k for k in sys.modules if k == "kdistpp" or k.startswith("kdistpp.")]:
            del sys.modules[k]
        sys.modules.update(saved)
