"""ComfyUI node: a Distillation++ SAMPLER for SamplerCustom / SamplerCustomAdvanced.

The node takes the student and teacher MODELs, the teacher's positive/negative conditioning and
CFG, and the Distillation++ settings; it returns a SAMPLER. At sampling time the student is the
model SamplerCustom passes in (with its own conditioning and CFG); the teacher is prepared and
evaluated through ComfyUI's own path (`prepare_sampling`, `process_conds`, `sampling_function`),
so its LoRAs, patches and conditioning behave as in any ComfyUI sampler.

This module imports without ComfyUI; the node only needs it when it runs. Install: docs/comfyui.md.
"""

from __future__ import annotations

import torch

from .. import SAMPLERS
from ..guided_steps import SigmaWindow
from ..refine import DIRECTIONS, FORMS

RENOISE = ("next", "current", "random")
CATEGORY = "sampling/custom_sampling/samplers"


def comfy_modules():
    """ComfyUI's sampler modules, or a clear error outside ComfyUI."""
    try:
        import comfy.sampler_helpers as helpers
        import comfy.samplers as samplers
    except ImportError as err:
        raise RuntimeError("the kdistpp Distillation++ node runs inside ComfyUI (comfy.samplers was not found); "
                           "install it into ComfyUI's custom_nodes as docs/comfyui.md describes") from err
    return samplers, helpers


class ComfyTeacher:
    """The teacher as a kdistpp denoiser, D(x, sigma) = CFG of its positive/negative conditioning.

    A context manager: entering loads the teacher and prepares its conditioning for this latent
    (ComfyUI's `prepare_sampling` + `process_conds`); leaving unloads what it loaded.
    """

    def __init__(self, model_patcher, positive, negative, cfg: float, seed=None, modules=None):
        self.patcher, self.positive, self.negative, self.cfg, self.seed = model_patcher, positive, negative, cfg, seed
        self.samplers, self.helpers = modules or comfy_modules()
        self.inner = self.conds = self.loaded = None

    def prepare(self, x: torch.Tensor) -> "ComfyTeacher":
        conds = {"positive": self.helpers.convert_cond(self.positive), "negative": self.helpers.convert_cond(self.negative)}
        self.inner, conds, self.loaded = self.helpers.prepare_sampling(self.patcher, x.shape, conds, self.patcher.model_options)
        self.patcher.pre_run()
        self.conds = self.samplers.process_conds(self.inner, x, conds, x.device, torch.zeros_like(x), None, self.seed)
        return self

    def __call__(self, x, sigma, **_ignored):
        # extra_args of the student (its denoise mask, model_options) are not the teacher's: dropped
        return self.samplers.sampling_function(self.inner, x, sigma, self.conds.get("negative"), self.conds.get("positive"),
                                               self.cfg, model_options=self.patcher.model_options, seed=self.seed)

    def release(self) -> None:
        if self.inner is not None:
            self.patcher.cleanup()
            self.helpers.cleanup_models(self.conds, self.loaded)
            self.inner = None


def guided_steps_option(guided_steps: int, sigma_min: float = 0.0, sigma_max: float = 0.0):
    """The node's choice of guided steps: a sigma window when its upper end is set, else the first N."""
    return SigmaWindow(sigma_min, sigma_max) if sigma_max > 0 else guided_steps


def sample_distpp(model, x, sigmas, extra_args=None, callback=None, disable=None, *, teacher_model, positive, negative,
                  teacher_cfg, base, w, guidance_steps, form, renoise, direction="student"):
    """The SAMPLER's function, called by ComfyUI's KSAMPLER.sample with the student wrapped as `model`."""
    extra_args = extra_args or {}
    teacher = ComfyTeacher(teacher_model, positive, negative, teacher_cfg, extra_args.get("seed")).prepare(x)
    try:
        return SAMPLERS[base](model, x, sigmas, extra_args, callback, disable, teacher=teacher, w=w,
                              guidance_steps=guidance_steps, form=form, renoise=renoise, teacher_extra_args={},
                              direction=direction)
    finally:
        teacher.release()


def same_latent_space(student, teacher) -> None:
    s = type(getattr(getattr(student, "model", None), "latent_format", None))
    t = type(getattr(getattr(teacher, "model", None), "latent_format", None))
    if s is not t:
        raise ValueError(f"student and teacher work in different latent spaces ({s.__name__} vs {t.__name__}): "
                         "pick a teacher of the student's family (e.g. SDXL base for SDXL-Lightning)")


class DistillationPPSampler:
    """Distillation++ (Park et al. 2024): the teacher refines the student's first step(s)."""

    DESCRIPTION = ("Distillation++ (Park et al. 2024): on the first step(s) the distilled student's estimate is "
                   "renoised, denoised by its teacher at the teacher's CFG, and moved a fraction w toward it; the "
                   "sampler then continues. Feed the SAMPLER to SamplerCustom with the student model. One teacher "
                   "call per guided step.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "student": ("MODEL", {"tooltip": "the distilled model SamplerCustom samples (checked for latent-space match)"}),
            "teacher": ("MODEL", {"tooltip": "its base model (e.g. SDXL base for SDXL-Lightning / DMD2 / LCM)"}),
            "teacher_positive": ("CONDITIONING", {"tooltip": "the teacher's prompt (encode with the teacher's CLIP)"}),
            "teacher_negative": ("CONDITIONING", {"tooltip": "the teacher's negative prompt"}),
            "teacher_cfg": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 30.0, "step": 0.1,
                                      "tooltip": "the teacher's CFG scale (the paper: 7.5 for SDXL)"}),
            "base_sampler": (list(SAMPLERS), {"default": "euler", "tooltip": "the solver the refinement is inserted "
                                              "into; 'consistency' is ComfyUI's lcm (LCM, DMD2)"}),
            "w": ("FLOAT", {"default": 0.3, "min": 0.0, "max": 1.0, "step": 0.01,
                            "tooltip": "teacher weight (the paper's lambda): Lightning 0.1, Turbo 0.02-0.1, "
                                       "DMD2 0.01 and LCM 0.01-0.02 with form eps; 0 = the plain sampler"}),
            "guided_steps": ("INT", {"default": 1, "min": 0, "max": 100,
                                     "tooltip": "the first N steps are refined (the paper: 1); more than the "
                                                "schedule's steps fails when sampling starts"}),
            "form": (list(FORMS), {"default": "interpolate", "tooltip": "interpolate = eq. 9 (renoise, teacher, "
                                   "lerp); guidance = eq. 10 (teacher at the student's point); eps = the authors' "
                                   "mixing for consistency students (LCM, DMD2)"}),
            "renoise": (list(RENOISE), {"default": "next", "tooltip": "the teacher's noise level: the next sigma "
                                        "(the paper's decreasing schedule), the current one, or random"}),
        }, "optional": {
            "direction": (list(DIRECTIONS), {"default": "student", "tooltip": "student = the authors' update (keep "
                                             "the student's noise, replace its clean estimate); refined = the refined "
                                             "estimate everywhere (a smaller step for the same w)"}),
            "guide_sigma_min": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1000.0, "step": 0.01,
                                          "tooltip": "with guide_sigma_max > 0: guide every step whose sigma lies in "
                                                     "[min, max] instead of the first N steps"}),
            "guide_sigma_max": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1000.0, "step": 0.01,
                                          "tooltip": "0 = off (use guided_steps); else the upper end of the sigma "
                                                     "window to guide"}),
        }}

    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "build"
    CATEGORY = CATEGORY

    def build(self, student, teacher, teacher_positive, teacher_negative, teacher_cfg, base_sampler, w, guided_steps,
              form, renoise, direction="student", guide_sigma_min=0.0, guide_sigma_max=0.0):
        samplers, _ = comfy_modules()
        same_latent_space(student, teacher)
        steps = guided_steps_option(guided_steps, guide_sigma_min, guide_sigma_max)
        options = dict(teacher_model=teacher, positive=teacher_positive, negative=teacher_negative, teacher_cfg=teacher_cfg,
                       base=base_sampler, w=w, guidance_steps=steps, form=form, renoise=renoise, direction=direction)
        return (samplers.KSAMPLER(sample_distpp, extra_options=options),)


NODE_CLASS_MAPPINGS = {"KdistppDistillationPPSampler": DistillationPPSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"KdistppDistillationPPSampler": "Distillation++ Sampler (kdistpp)"}
