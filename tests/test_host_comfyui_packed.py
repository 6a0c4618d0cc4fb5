"""Packed latents inside real ComfyUI (the pinned 0.8.0 tree): LTX-2's video and audio latents, joined
by ComfyUI's LTXVConcatAVLatent node into one nested latent, sampled with a tiny random LTX-2 (LTXAV)
student and teacher by both Distillation++ nodes (the SAMPLER in SamplerCustom, the GUIDER in
SamplerCustomAdvanced).

ComfyUI samples a nested latent packed into one flat tensor and hands the model the parts' shapes
(`latent_shapes`). The teacher's evaluation is read at the teacher model (ComfyUI's
model_function_wrapper) and compared with ComfyUI's own evaluation of the same state, reached from the
unpacked nested latent and mask: a `CFGGuider.sample` of the teacher.
"""

from __future__ import annotations

import pytest
import torch

from comfy_models import CONTEXT, LTXAV_AUDIO, LTXAV_VIDEO, tiny_ltxav
from hosts import import_comfy

SEED, TEACHER_CFG = 7, 3.0


@pytest.fixture(scope="module")
def comfy():
    comfy = import_comfy(full=True)
    import comfy.nested_tensor  # noqa: F401

    return comfy


def text(seed: int):
    return [[torch.randn(1, 7, CONTEXT, generator=torch.Generator().manual_seed(seed)), {}]]


def audio_video_latent():
    """Image-to-video with sound, as LTXVConcatAVLatent builds it: the first video frame kept (mask 0),
    the rest and the audio generated."""
    from comfy_extras.nodes_lt import LTXVConcatAVLatent

    g = torch.Generator().manual_seed(1)
    mask = torch.ones(1, 1, *LTXAV_VIDEO[2:])
    mask[:, :, 0] = 0.0
    video = {"samples": torch.randn(LTXAV_VIDEO, generator=g), "noise_mask": mask}
    audio = {"samples": torch.zeros(LTXAV_AUDIO)}
    return LTXVConcatAVLatent.execute(video, audio).result[0]


class TeacherCalls:
    """The teacher's model evaluations (input, timestep, output), read at the model."""

    def __init__(self, patcher):
        self.calls = []
        self.patcher = patcher.clone()

        def wrapper(apply_model, args):
            out = apply_model(args["input"], args["timestep"], **args["c"])
            self.calls.append((args["input"].clone(), args["timestep"].clone(), out.clone()))
            return out

        self.patcher.set_model_unet_function_wrapper(wrapper)


def run(comfy, which: str, student, teacher, latent, w: float, sigmas):
    import comfy_extras.nodes_custom_sampler as ncs

    from kdistpp.integrations.comfyui_nodes import DistillationPPGuider, DistillationPPSampler

    settings = dict(w=w, guided_steps=1, form="interpolate", renoise="next")
    with torch.no_grad():
        if which == "sampler":
            sampler = DistillationPPSampler.execute(teacher, text(3), text(4), TEACHER_CFG, "euler", **settings)
            return ncs.SamplerCustom.execute(student, True, SEED, 1.0, text(1), text(2), sampler.result[0], sigmas,
                                             latent).result[0]["samples"]
        guider = DistillationPPGuider.execute(student, text(1), text(2), 1.0, teacher, text(3), text(4), TEACHER_CFG,
                                              **settings).result[0]
        return ncs.SamplerCustomAdvanced.execute(ncs.RandomNoise.execute(SEED).result[0], guider,
                                                 ncs.KSamplerSelect.execute("euler").result[0], sigmas,
                                                 latent).result[0]["samples"]


def comfyuis_teacher_evaluation(comfy, teacher, latent, sigmas, x, sigma):
    """ComfyUI's own evaluation of the teacher (CFGGuider at the teacher's CFG) at the packed state x and
    sigma, sampling the nested latent and mask as the user's graph holds them."""
    guider = comfy.samplers.CFGGuider(teacher)
    guider.set_conds(text(3), text(4))
    guider.set_cfg(TEACHER_CFG)

    def one_evaluation(model, noise, sigmas, extra_args=None, callback=None, disable=None):
        model(x.to(noise), sigma.to(noise), **extra_args)
        return noise

    noise = comfy.sample.prepare_noise(latent["samples"], SEED)
    with torch.no_grad():
        guider.sample(noise, latent["samples"], comfy.samplers.KSAMPLER(one_evaluation), sigmas,
                      denoise_mask=latent["noise_mask"], disable_pbar=True, seed=SEED)


@pytest.mark.parametrize("which", ["sampler", "guider"])
def test_packed_audio_video_latents_reach_the_teacher_as_comfyui_hands_them(comfy, which):
    import comfy_extras.nodes_custom_sampler as ncs

    student, teacher = tiny_ltxav(comfy, 5), TeacherCalls(tiny_ltxav(comfy, 0))
    latent = audio_video_latent()
    sigmas = ncs.BasicScheduler.execute(student, "simple", 3, 1.0).result[0]
    plain = run(comfy, which, student, teacher.patcher, latent, 0.0, sigmas)
    assert not teacher.calls
    guided = run(comfy, which, student, teacher.patcher, latent, 0.5, sigmas)
    assert [t.shape for t in guided.unbind()] == [torch.Size(LTXAV_VIDEO), torch.Size(LTXAV_AUDIO)]
    assert all(torch.isfinite(t).all() for t in guided.unbind())
    assert len(teacher.calls) == 1  # one guided step; cond and uncond in one batch
    x, timestep, theirs = teacher.calls[0]
    sigma = torch.tensor([float(sigmas[1])])  # renoise='next': the teacher sees the next sigma
    assert abs(float(timestep.reshape(-1)[0]) - float(sigma)) <= 1e-6
    comfyuis_teacher_evaluation(comfy, teacher.patcher, latent, sigmas, x[:1], sigma)
    reference = teacher.calls[1][2]
    torch.testing.assert_close(theirs, reference, rtol=1e-5, atol=1e-5)
    # the teacher moved the guided run, and in both parts
    for a, b in zip(guided.unbind(), plain.unbind()):
        assert (a - b).abs().max() > 1e-3
