"""The two ComfyUI nodes in ComfyUI's V3 schema (`comfy_api.latest`): the Distillation++ Sampler
(a SAMPLER for SamplerCustom / SamplerCustomAdvanced, refining kdistpp's own solvers) and the
Distillation++ Guider (a GUIDER for SamplerCustomAdvanced, refining the student's estimate inside any
ComfyUI sampler). This module imports ComfyUI; the repository's `__init__.py` loads it through
`comfy_entrypoint` only inside ComfyUI. What runs is in kdistpp.integrations.comfyui.

Node ids and input names (and their order, which saved workflows' widget values follow) are those of
the nodes' first release, so saved workflows load unchanged.
"""

from __future__ import annotations

import comfy.samplers
from comfy_api.latest import ComfyExtension, io

from ..refine import DIRECTIONS, FORMS
from .comfyui import (BASE_SAMPLERS, CATEGORY, GUIDER_NAME, NODE_NAME, RENOISE, DryRunFirst, comfy_modules,
                      guided_evaluations, guided_steps_option, sample_distpp)

SAMPLER_ID = "KdistppDistillationPPSampler"
GUIDER_ID = "KdistppDistillationPPGuider"
GUIDER_CATEGORY = "sampling/custom_sampling/guiders"


def teacher_inputs(student: str) -> list:
    """The teacher MODEL with its conditioning and CFG; `student` says where the student comes from."""
    return [
        io.Model.Input("teacher", tooltip=f"the base model of the student {student} (e.g. SDXL base for "
                                          "SDXL-Lightning / DMD2 / LCM, Qwen-Image for Qwen-Image-Lightning); "
                                          "checked against it when sampling starts"),
        io.Conditioning.Input("teacher_positive", tooltip="the teacher's prompt (encode with the teacher's CLIP)"),
        io.Conditioning.Input("teacher_negative", tooltip="the teacher's negative prompt"),
        io.Float.Input("teacher_cfg", default=5.0, min=0.0, max=30.0, step=0.1,
                       tooltip="the teacher's CFG scale (the paper: 7.5 for SDXL)"),
    ]


def weight_input(note: str = "") -> io.Float.Input:
    return io.Float.Input("w", default=0.3, min=0.0, max=1.0, step=0.01,
                          tooltip="teacher weight (the paper's lambda): Lightning 0.1, Turbo 0.02-0.1, DMD2 0.01 and "
                                  f"LCM 0.01-0.02 with form eps; 0 = the plain sampler{note}")


def settings_inputs() -> list:
    """Which steps are refined and how (the same inputs on both nodes)."""
    return [
        io.Int.Input("guided_steps", default=1, min=0, max=100,
                     tooltip="the first N steps are refined (the paper: 1); more than the schedule's steps fails "
                             "when sampling starts"),
        io.Combo.Input("form", options=list(FORMS), default="interpolate",
                       tooltip="interpolate = eq. 9 (renoise, teacher, lerp); guidance = eq. 10 (teacher at the "
                               "student's point); eps = the authors' mixing for consistency students (LCM, DMD2)"),
        io.Combo.Input("renoise", options=list(RENOISE), default="next",
                       tooltip="the teacher's noise level: the next sigma (the paper's decreasing schedule), the "
                               "current one, or random"),
    ]


def window_inputs() -> list:
    return [
        io.Float.Input("guide_sigma_min", default=0.0, min=0.0, max=1000.0, step=0.01, optional=True,
                       tooltip="with guide_sigma_max > 0: guide every step whose sigma lies in [min, max] instead "
                               "of the first N steps"),
        io.Float.Input("guide_sigma_max", default=0.0, min=0.0, max=1000.0, step=0.01, optional=True,
                       tooltip="0 = off (use guided_steps); else the upper end of the sigma window to guide"),
    ]


class DistillationPPSampler(io.ComfyNode):
    """Distillation++ (Park et al. 2024) as a SAMPLER: the teacher refines the student's first step(s)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=SAMPLER_ID,
            display_name=NODE_NAME,
            category=CATEGORY,
            description="Distillation++ (Park et al. 2024): on the first step(s) the distilled student's estimate is "
                        "renoised, denoised by its teacher at the teacher's CFG, and moved a fraction w toward it; "
                        "the sampler then continues. Feed the SAMPLER to SamplerCustom with the student model: the "
                        "student is the model SamplerCustom samples (checked against the teacher when sampling "
                        "starts). One teacher call per guided step; at w = 0 it is ComfyUI's own sampler of the "
                        "same name, same seed.",
            inputs=[
                *teacher_inputs("SamplerCustom samples"),
                io.Combo.Input("base_sampler", options=BASE_SAMPLERS, default="euler",
                               tooltip="the solver the refinement is inserted into; 'consistency' is ComfyUI's lcm "
                                       "(LCM, DMD2)"),
                weight_input(),
                *settings_inputs(),
                io.Combo.Input("direction", options=list(DIRECTIONS), default="student", optional=True,
                               tooltip="student = the authors' update (keep the student's noise, replace its clean "
                                       "estimate); refined = the refined estimate everywhere (a smaller step for the "
                                       "same w)"),
                *window_inputs(),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, teacher, teacher_positive, teacher_negative, teacher_cfg, base_sampler, w, guided_steps, form,
                renoise, direction="student", guide_sigma_min=0.0, guide_sigma_max=0.0) -> io.NodeOutput:
        steps = guided_steps_option(guided_steps, guide_sigma_min, guide_sigma_max)
        options = dict(teacher_model=teacher, positive=teacher_positive, negative=teacher_negative,
                       teacher_cfg=teacher_cfg, base=base_sampler, w=w, guidance_steps=steps, form=form,
                       renoise=renoise, direction=direction)
        return io.NodeOutput(comfy.samplers.KSAMPLER(sample_distpp, extra_options=options))


class Guider_DistillationPP(comfy.samplers.CFGGuider):
    """ComfyUI's CFGGuider for the student, whose estimate the teacher refines at the guided sigmas of
    whatever sampler runs it (kdistpp.integrations.comfyui.GuidedEvaluations says which evaluation)."""

    def __init__(self, model_patcher, teacher, teacher_positive, teacher_negative, teacher_cfg, **settings):
        super().__init__(model_patcher)
        self.teacher = (teacher, teacher_positive, teacher_negative, teacher_cfg)
        self.settings = settings  # w, guidance_steps, form, renoise
        self.evaluations = None  # the running sample's GuidedEvaluations; the last run's after it
        self.running = False

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed,
                     latent_shapes=None):
        # `latent_image` as CFGGuider.sample passed it on (before process_latent_in): what the teacher's sample takes
        comfy = comfy_modules()
        self.evaluations = guided_evaluations(comfy, self, *self.teacher, noise, latent_image, sigmas, denoise_mask,
                                              seed, latent_shapes=latent_shapes, **self.settings)
        if not self.evaluations.active:  # w = 0 or no guided step: CFGGuider's run, untouched
            return super().inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask, callback,
                                        disable_pbar, seed, latent_shapes=latent_shapes)
        self.running = True
        try:
            samples = super().inner_sample(noise, latent_image, device,
                                           DryRunFirst(sampler, self.evaluations,
                                                       comfy.model_patcher.create_model_options_clone),
                                           sigmas, denoise_mask, callback, disable_pbar, seed,
                                           latent_shapes=latent_shapes)
        finally:
            self.running = False
        name = getattr(getattr(sampler, "sampler_function", None), "__name__", type(sampler).__name__)
        self.evaluations.check_every_guided_step_was_refined(name)
        return samples

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (CFGGuider's signature)
        if not self.running:
            return super().predict_noise(x, timestep, model_options, seed)
        return self.evaluations(x, timestep, model_options=model_options, seed=seed)


class DistillationPPGuider(io.ComfyNode):
    """Distillation++ (Park et al. 2024) as a GUIDER: any ComfyUI sampler, the teacher refining its estimate."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=GUIDER_ID,
            display_name=GUIDER_NAME,
            category=GUIDER_CATEGORY,
            description="Distillation++ (Park et al. 2024) with any sampler: a CFG guider for the distilled student "
                        "whose estimate, at the guided steps' sigmas, is renoised, denoised by its teacher at the "
                        "teacher's CFG, and moved a fraction w toward it; the refined estimate replaces the "
                        "student's in the sampler chosen with KSamplerSelect (w acts smaller than in the "
                        "Distillation++ Sampler: docs/comfyui.md gives the factor). Feed the GUIDER to "
                        "SamplerCustomAdvanced. One teacher call per guided step; at w = 0 it is ComfyUI's CFGGuider, "
                        "same seed, same image.",
            inputs=[
                io.Model.Input("model", tooltip="the distilled student (e.g. Qwen-Image with its Lightning LoRA), with "
                                                "its own model sampling"),
                io.Conditioning.Input("positive", tooltip="the student's prompt"),
                io.Conditioning.Input("negative", tooltip="the student's negative prompt (unused at cfg 1)"),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="the student's CFG scale (1 for most distilled students: one call per step)"),
                *teacher_inputs("(this node's model input)"),
                weight_input(" (ComfyUI's CFGGuider). The refined estimate replaces the student's inside the sampler, "
                             "so a step moves by 1 - sigma_next / sigma times what the Distillation++ Sampler's w "
                             "moves it (1 on a flow model's first step from s = 1)"),
                *settings_inputs(),
                *window_inputs(),
            ],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg, teacher, teacher_positive, teacher_negative, teacher_cfg, w,
                guided_steps, form, renoise, guide_sigma_min=0.0, guide_sigma_max=0.0) -> io.NodeOutput:
        guider = Guider_DistillationPP(model, teacher, teacher_positive, teacher_negative, teacher_cfg, w=w,
                                       guidance_steps=guided_steps_option(guided_steps, guide_sigma_min,
                                                                          guide_sigma_max),
                                       form=form, renoise=renoise)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider)


class KdistppExtension(ComfyExtension):
    """The nodes ComfyUI registers from this repository."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [DistillationPPSampler, DistillationPPGuider]
